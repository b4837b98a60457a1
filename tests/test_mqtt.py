"""MQTT sink against a real Mosquitto broker: discovery, presence, availability, outages, `streamer run`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from streamer.config import MqttSettings, load_settings
from streamer.errors import ConfigError
from streamer.match.gallery import Gallery
from streamer.publish.events import Heartbeat, Identity, TrackEnded, TrackStarted

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mosquitto import Collector, Mosquitto, available  # noqa: E402

pytestmark = pytest.mark.skipif(not available(), reason="needs the mosquitto broker (.ci/install-system-deps.sh)")

REPO = Path(__file__).resolve().parents[1]
HAMILTON = "face_recognition/examples/short_hamilton_clip.mp4"
LIN = "Lin-Manuel Miranda"
BOX = (10.0, 10.0, 60.0, 60.0)


@pytest.fixture
def broker(tmp_path):
    with Mosquitto(tmp_path / "broker") as broker:
        yield broker


def started(seq: int, track: int, stream: str = "cam0") -> TrackStarted:
    return TrackStarted(seq=seq, stream=stream, frame=seq, pts=seq / 30, track=track, box=BOX)


def named(seq: int, track: int, name: str | None, stream: str = "cam0", **extra) -> Identity:
    return Identity(seq=seq, stream=stream, frame=seq, pts=seq / 30, track=track, box=BOX, name=name,
                    score=0.9, distance=0.3, votes={name or "unknown": 2}, **extra)


def ended(seq: int, track: int, stream: str = "cam0") -> TrackEnded:
    return TrackEnded(seq=seq, stream=stream, frame=seq, pts=seq / 30, track=track, box=BOX, duration=1.0, frames=30)


def make_sink(broker: Mosquitto, streams=("cam0",), gallery=None, **settings):
    from streamer.publish.mqtt import MqttSink

    sink = MqttSink(MqttSettings(url=broker.url, **settings), streams=list(streams), gallery_path=gallery)
    wait_until(lambda: sink.stats()["connected"], 10, "the sink to connect")
    return sink


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def retained(port: int, topics: list[str], settle: float = 1.0, **login) -> dict[str, bytes]:
    """What a subscriber arriving now is told: the broker's retained messages."""
    late = Collector(port, topics, **login)
    time.sleep(settle)
    late.close()
    return {m.topic: m.payload for m in late.messages if m.retain}


def gallery_with(path: Path, *names: str) -> Path:
    with Gallery(path) as gallery:
        for name in names:
            gallery.add(name, np.random.default_rng(len(name)).normal(size=(1, 128)), "test-embedder")
    return path


# -- settings -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("mqtt", "error"),
    [
        ({"url": "mqtt://broker.lan"}, "publish.mqtt.url .*beyond this machine.*username.*password"),
        ({"url": "mqtt://10.0.0.2", "username": "cam"}, "beyond this machine"),
        ({"url": "mqtt://127.0.0.1", "password": "x"}, "publish.mqtt.username must be too"),
        ({"url": "http://127.0.0.1"}, "expected mqtt://HOST"),
        ({"url": "mqtt://127.0.0.1:70000"}, "port 1-65535"),
        ({"url": "mqtt://127.0.0.1", "topic_prefix": "a/#"}, "publish.mqtt.topic_prefix"),
        ({"url": "mqtt://127.0.0.1", "qos": {"identiy": 1}}, "unknown event kind 'identiy'"),
        ({"url": "mqtt://127.0.0.1", "ca_file": "/etc/hostname"}, "use mqtts://"),
    ],
)
def test_bad_mqtt_settings_fail_naming_the_setting(mqtt, error):
    with pytest.raises(ConfigError, match=error):
        load_settings(overrides={"publish": {"mqtt": mqtt}})


def test_broker_beyond_loopback_takes_a_login_and_secrets_stay_out_of_errors():
    settings = load_settings(overrides={"publish": {"mqtt": {"url": "mqtt://cam:s3cr%40t@10.0.0.2:1884"}}})
    mqtt = settings.publish.mqtt
    assert (mqtt.url, mqtt.host, mqtt.port, mqtt.username) == ("mqtt://10.0.0.2:1884", "10.0.0.2", 1884, "cam")
    assert mqtt.password.get_secret_value() == "s3cr@t"
    assert "s3cr" not in repr(settings) and "s3cr" not in json.dumps(settings.model_dump(mode="json"))
    with pytest.raises(ConfigError) as error:
        load_settings(overrides={"publish": {"mqtt": {"password": "hunter2"}}})  # url missing: dict is echoed
    assert "hunter2" not in str(error.value) and "publish.mqtt.url" in str(error.value)


# -- the sink against a real broker ---------------------------------------------------------------------------
def test_discovery_configs_arrive_and_follow_the_gallery(broker, tmp_path):
    gallery = gallery_with(tmp_path / "people.db", LIN)
    watcher = Collector(broker.port, ["homeassistant/#", "streamer/#"])
    sink = make_sink(broker, streams=["cam0", "door"], gallery=gallery)
    try:
        base = "homeassistant/sensor/streamer"
        tracker = "homeassistant/device_tracker/streamer/person_lin_manuel_miranda/config"
        wanted = [f"{base}/cam0_faces/config", f"{base}/cam0_last_person/config", f"{base}/door_faces/config",
                  f"{base}/door_last_person/config", tracker]
        for topic in wanted:
            watcher.wait_for(lambda m, t=topic: m.topic == t and m.payload, 10, topic)
        stored = retained(broker.port, ["homeassistant/#", "streamer/#"])
        for topic in wanted:
            config = json.loads(stored[topic])
            assert config["availability_topic"] == "streamer/availability"
            assert config["unique_id"] and config["device"]["identifiers"]
            assert config["state_topic"].startswith("streamer/")
        person = json.loads(stored[tracker])
        assert person["name"] == LIN and person["state_topic"] == "streamer/person/lin_manuel_miranda/presence"
        assert person["json_attributes_topic"] == person["state_topic"]
        assert json.loads(stored[person["state_topic"]])["state"] == "away"
        assert stored["streamer/availability"] == b"online"
        assert stored["streamer/door/faces_in_view"] == b"0"
        unique_ids = [json.loads(stored[t])["unique_id"] for t in wanted]
        assert len(set(unique_ids)) == len(unique_ids)

        # Enrol someone: their entity appears. Remove them: it goes away, from the broker too.
        ada = "homeassistant/device_tracker/streamer/person_ada_lovelace/config"
        with Gallery(gallery) as people:
            people.add("Ada Lovelace", np.ones((1, 128)), "test-embedder")
        watcher.wait_for(lambda m: m.topic == ada and m.payload, 10, "Ada's entity after enrolment")
        since = len(watcher.messages)
        with Gallery(gallery) as people:
            people.remove("Ada Lovelace")
        watcher.wait_for(lambda m: m.topic == ada and m.payload == b"", 10, "Ada's entity cleared", since)
        watcher.wait_for(lambda m: m.topic == "streamer/person/ada_lovelace/presence" and m.payload == b"", 10,
                         "Ada's presence cleared", since)
        stored = retained(broker.port, ["homeassistant/#", "streamer/#"])
        assert ada not in stored and "streamer/person/ada_lovelace/presence" not in stored
        assert tracker in stored
    finally:
        sink.close()
        watcher.close()
    assert retained(broker.port, ["streamer/availability"])["streamer/availability"] == b"offline"


def test_presence_home_while_seen_away_after_the_timeout(broker):
    watcher = Collector(broker.port, ["streamer/#"])
    sink = make_sink(broker, presence_timeout_s=0.5)
    presence = "streamer/person/lin_manuel_miranda/presence"
    try:
        sink.publish(started(1, 7))
        sink.publish(named(2, 7, LIN))
        home = watcher.wait_for(lambda m: m.topic == presence and json.loads(m.payload)["state"] == "home", 5, "home")
        state = json.loads(home.payload)
        assert state["camera"] == "cam0" and state["name"] == LIN and state["last_seen"]
        watcher.wait_for(lambda m: m.topic == "streamer/cam0/faces_in_view" and m.payload == b"1", 5, "one face")
        last = json.loads(watcher.wait_for(lambda m: m.topic == "streamer/cam0/last_person", 5, "last").payload)
        assert (last["name"], last["track"], last["camera"]) == (LIN, 7, "cam0")
        time.sleep(1.0)  # the track is still live: still home, whatever the timeout
        assert json.loads(retained(broker.port, [presence])[presence])["state"] == "home"
        since = len(watcher.messages)
        sink.publish(ended(3, 7))
        away = watcher.wait_for(lambda m: m.topic == presence and json.loads(m.payload)["state"] == "away", 5,
                                "away after the timeout", since)
        assert away.at - watcher.on("streamer/cam0/track.ended")[0].at >= 0.4
        assert json.loads(away.payload)["camera"] == "cam0"  # where they were last seen
    finally:
        sink.close()
        watcher.close()


def test_events_carry_the_zeromq_payload_and_crops_only_when_stamped(broker):
    watcher = Collector(broker.port, ["streamer/#"])
    sink = make_sink(broker)
    try:
        plain = named(1, 3, LIN)
        with_crop = named(2, 4, LIN, crop=True)  # the publisher stamps crop=True only when crops are on
        jpeg = b"\xff\xd8\xff\xe0fake-but-jpeg-framed"
        sink.publish(plain, jpeg)  # a crop without the stamp: must not leave
        sink.publish(with_crop, jpeg)
        sink.publish(Heartbeat(seq=3, streams={}, queues={}, uptime=1.0))
        watcher.wait_for(lambda m: m.topic == "streamer/*/heartbeat", 5, "the heartbeat")
        identities = watcher.on("streamer/cam0/identity")
        assert [m.payload for m in identities] == [plain.payload(), with_crop.payload()]
        assert "embedding" not in json.loads(identities[0].payload) and "crop" not in json.loads(identities[0].payload)
        assert [m.payload for m in watcher.on("streamer/cam0/identity/crop")] == [jpeg]
    finally:
        sink.close()
        watcher.close()


def test_broker_outage_queues_boundedly_never_blocks_and_recovers(broker):
    sink = make_sink(broker, queue=50)
    try:
        broker.kill()
        wait_until(lambda: not sink.stats()["connected"], 10, "the sink to notice the broker is gone")
        lost_at = time.monotonic()
        begin = time.perf_counter()
        for seq in range(1, 1001):
            sink.publish(started(seq, seq))
        elapsed = time.perf_counter() - begin
        assert elapsed < 0.5, f"publishing 1000 events took {elapsed:.3f} s with the broker down"
        stats = sink.stats()
        assert (stats["queued"], stats["dropped"], stats["sent"]) == (50, 950, 0)
        # paho retries 1 s after the loss, then 2 s later: restart between the two, and be subscribed first.
        time.sleep(max(0.0, lost_at + 1.4 - time.monotonic()))
        broker.start()
        watcher = Collector(broker.port, ["streamer/#"])
        try:
            watcher.wait_for(lambda m: m.topic == "streamer/cam0/track.started" and b'"seq":1000' in m.payload,
                             15, "the queued events after the broker came back")
            seqs = [json.loads(m.payload)["seq"] for m in watcher.on("streamer/cam0/track.started")]
            assert seqs == list(range(951, 1001)), "the newest 50 were kept, in order"
            assert sink.stats()["connects"] == 2 and sink.stats()["queued"] == 0
            # The restarted broker had forgotten everything (no persistence): the retained state came again.
            stored = retained(broker.port, ["streamer/#", "homeassistant/#"])
            assert stored["streamer/availability"] == b"online"
            assert stored["streamer/cam0/faces_in_view"] == b"1000"
            assert "homeassistant/sensor/streamer/cam0_faces/config" in stored
        finally:
            watcher.close()
    finally:
        sink.close()


def test_home_assistant_coming_online_gets_the_configs_again(broker):
    watcher = Collector(broker.port, ["homeassistant/#"])
    sink = make_sink(broker)
    faces = "homeassistant/sensor/streamer/cam0_faces/config"
    try:
        watcher.wait_for(lambda m: m.topic == faces, 10, "the first config")
        since = len(watcher.messages)
        time.sleep(0.5)
        assert not [m for m in watcher.messages[since:] if m.topic == faces], "sent again unasked"
        watcher.client.publish("homeassistant/status", b"online")  # what Home Assistant says when it (re)starts
        watcher.wait_for(lambda m: m.topic == faces and m.payload, 5, "the config again", since)
    finally:
        sink.close()
        watcher.close()


def test_entities_left_by_an_earlier_run_are_cleared(broker, tmp_path):
    gallery = gallery_with(tmp_path / "people.db", LIN, "Ada Lovelace")
    first = make_sink(broker, streams=["cam0", "porch"], gallery=gallery)
    porch = "homeassistant/sensor/streamer/porch_faces/config"
    wait_until(lambda: porch in retained(broker.port, ["homeassistant/#"], 0.2), 10, "the first run's configs")
    first.close()
    with Gallery(gallery) as people:
        people.remove("Ada Lovelace")  # while streamer is not running
    second = make_sink(broker, streams=["cam0"], gallery=gallery)
    try:
        def leftovers() -> list[str]:
            stored = retained(broker.port, ["homeassistant/#", "streamer/#"], 0.2)
            return [t for t in stored if "ada" in t or "porch" in t]

        wait_until(lambda: not leftovers(), 10, "Ada's and the porch camera's entities to be cleared")
        stored = retained(broker.port, ["homeassistant/#"])
        assert "homeassistant/device_tracker/streamer/person_lin_manuel_miranda/config" in stored
        assert "homeassistant/sensor/streamer/cam0_faces/config" in stored
    finally:
        second.close()


def test_username_and_password(tmp_path, caplog):
    from streamer.publish.mqtt import MqttSink

    with Mosquitto(tmp_path / "secure", users={"streamer": "right horse"}) as broker:
        wrong = MqttSink(MqttSettings(url=broker.url, username="streamer", password="wrong"), streams=["cam0"])
        try:
            wrong.publish(started(1, 1))
            wait_until(lambda: any("refused the connection" in r.getMessage()
                                   and "publish.mqtt.password" in r.getMessage() for r in caplog.records),
                       10, "the refusal naming publish.mqtt.password")
            assert wrong.stats()["connected"] == 0 and wrong.stats()["queued"] == 1
        finally:
            wrong.close()
        login = {"username": "streamer", "password": "right horse"}
        watcher = Collector(broker.port, ["streamer/#"], **login)
        sink = MqttSink(MqttSettings(url=broker.url, **login), streams=["cam0"])
        try:
            sink.publish(started(1, 1))
            watcher.wait_for(lambda m: m.topic == "streamer/cam0/track.started", 10, "an event with the right password")
        finally:
            sink.close()
            watcher.close()


# -- `streamer run` end to end ------------------------------------------------------------------------------

class Streamer:
    """`streamer run --config` in its own process group, with a ZeroMQ subscriber that timestamps arrivals."""

    def __init__(self, tmp_path: Path, config: str, gallery: Path, model_dir: Path, cache_dir: Path) -> None:
        from streamer.publish.subscriber import EventSubscriber

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.endpoint = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
        (tmp_path / "run.yaml").write_text(config)
        self.stderr_path = tmp_path / "stderr.txt"
        self.zmq: list[tuple[float, bytes, bytes]] = []  # (arrival, topic, payload)
        self._subscriber = EventSubscriber(self.endpoint, timeout_ms=100)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()
        env = {**os.environ, "STREAMER_MODEL_DIR": str(model_dir), "STREAMER_MODELS__CACHE_DIR": str(cache_dir),
               "PYTHONPATH": str(REPO)}
        with self.stderr_path.open("w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "streamer", "run", "--config", str(tmp_path / "run.yaml"), "--gallery",
                 str(gallery), "--publish", self.endpoint, "-q"],
                env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
            )

    def _receive(self) -> None:
        while not self._stop.is_set():
            message = self._subscriber.receive_message(100)
            if message is not None:
                self.zmq.append((time.monotonic(), message.topic, message.payload))

    def stderr(self) -> str:
        return self.stderr_path.read_text()[-4000:]

    def close(self) -> None:
        try:  # the supervisor and its workers: the group this test started
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(10)
        self._stop.set()
        self._thread.join(5)
        self._subscriber.close()


def event_seq(message) -> int:
    """seq of an event message (streamer/<stream>/<kind>); 0 for state topics."""
    if message.topic.count("/") != 2 or not message.payload.startswith(b"{"):
        return 0
    return json.loads(message.payload).get("seq", 0)


def live_loop_config(media_dir: Path, broker: Mosquitto, **mqtt) -> str:
    extra = "".join(f"    {key}: {value}\n" for key, value in mqtt.items())
    return (f"sources:\n  - url: {media_dir / HAMILTON}\n    live: true\n    loop: true\n"
            f"publish:\n  mqtt:\n    url: {broker.url}\n{extra}")


def test_hamilton_identity_and_presence_then_offline_on_stop(broker, tmp_path, media_dir, lin_gallery, model_dir,
                                                             cache_dir):
    watcher = Collector(broker.port, ["streamer/#", "homeassistant/#"])
    run = Streamer(tmp_path, live_loop_config(media_dir, broker, presence_timeout_s=1), lin_gallery, model_dir,
                   cache_dir)
    presence = "streamer/person/lin_manuel_miranda/presence"
    try:
        tracker = "homeassistant/device_tracker/streamer/person_lin_manuel_miranda/config"
        assert json.loads(watcher.wait_for(lambda m: m.topic == tracker, 60, "his entity").payload)["name"] == LIN
        identity = watcher.wait_for(lambda m: m.topic == "streamer/cam0/identity" and json.loads(m.payload)["name"]
                                    == LIN, 60, f"an identity naming {LIN}")
        home = watcher.wait_for(lambda m: m.topic == presence and json.loads(m.payload)["state"] == "home", 10, "home")
        assert json.loads(home.payload)["camera"] == "cam0"
        # He leaves the stage before the clip loops: away one timeout after his last sighting.
        away = watcher.wait_for(lambda m: m.topic == presence and json.loads(m.payload)["state"] == "away", 30, "away",
                                watcher.messages.index(home))
        # The MQTT message is the ZeroMQ payload, byte for byte.
        seq = json.loads(identity.payload)["seq"]
        zmq = [(at, payload) for at, topic, payload in run.zmq if topic == b"identity.cam0" and
               json.loads(payload)["seq"] == seq]
        assert zmq and zmq[0][1] == identity.payload
        assert identity.at - zmq[0][0] < 2.0, "the MQTT message came long after the ZeroMQ one"
        assert b"embedding" not in identity.payload and not watcher.on("streamer/cam0/identity/crop")
        assert away.wall - json.loads(away.payload)["last_seen_ts"] >= 0.9
        since = len(watcher.messages)
        run.process.send_signal(signal.SIGINT)
        assert run.process.wait(60) == 0, run.stderr()
        # A clean stop says offline itself (no last will needed) after the last events.
        bye = watcher.wait_for(lambda m: m.topic == "streamer/availability" and m.payload == b"offline", 5,
                               "offline on stop", since)
        assert watcher.on("streamer/cam0/stream.status")[-1].at <= bye.at
        assert retained(broker.port, ["streamer/availability"])["streamer/availability"] == b"offline"
    finally:
        run.close()
        watcher.close()


def test_broker_restart_mid_run_then_sigkill_leaves_the_last_will(broker, tmp_path, media_dir, lin_gallery,
                                                                   model_dir, cache_dir):
    watcher = Collector(broker.port, ["streamer/#"])
    run = Streamer(tmp_path, live_loop_config(media_dir, broker), lin_gallery, model_dir, cache_dir)
    try:
        first = watcher.wait_for(lambda m: m.topic.startswith("streamer/cam0/track."), 60, "events before the outage")
        wait_until(lambda: retained(broker.port, ["streamer/availability"]).get("streamer/availability") == b"online",
                   20, "availability online")
        broker.kill()
        time.sleep(1.0)
        before = max(event_seq(m) for m in watcher.messages)
        broker.start()  # same port, nothing retained
        since = len(watcher.messages)
        after = watcher.wait_for(lambda m: event_seq(m) > before, 30, "events after the broker came back", since)
        assert after.at > first.at
        # Retained state goes out again on reconnect, beside the queued events: wait for it (2 cores, loaded).
        config = "homeassistant/device_tracker/streamer/person_lin_manuel_miranda/config"
        stored = wait_until(
            lambda: (lambda got: got if got.get("streamer/availability") == b"online" and config in got else None)(
                retained(broker.port, ["streamer/#", "homeassistant/#"], 1.0)),
            20, "availability and discovery sent again",
        )
        assert stored["streamer/availability"] == b"online"
        assert run.process.poll() is None, "streamer stopped on the broker outage"
        os.kill(run.process.pid, signal.SIGKILL)  # the supervisor only: no goodbye, the broker's will speaks
        run.process.wait(10)
        wait_until(lambda: retained(broker.port, ["streamer/availability"], 0.2).get("streamer/availability")
                   == b"offline", 10, "the last will (offline)")
        assert "connection lost" in run.stderr()
    finally:
        run.close()
        watcher.close()
