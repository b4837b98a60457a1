"""MQTT sink: events, per-person presence and Home Assistant discovery on the user's broker (paho-mqtt).

Topics (PREFIX is publish.mqtt.topic_prefix, "streamer" by default):

    PREFIX/<stream>/<kind>            the event's JSON, the same bytes as the ZeroMQ payload (QoS per kind:
                                      1 for identity, 0 otherwise); heartbeats have stream "*"
    PREFIX/<stream>/<kind>/crop       the face JPEG, only when publish.include_crops is on
    PREFIX/<stream>/faces_in_view     retained: how many tracked faces the camera sees now
    PREFIX/<stream>/last_person       retained JSON: the last person recognised there (name, score, when)
    PREFIX/person/<slug>/presence     retained JSON per enrolled person: state home|away, camera, last_seen
    PREFIX/availability               retained online|offline; the broker sets offline itself (last will)
                                      when streamer dies without saying goodbye

Home Assistant discovery (retained, under publish.mqtt.discovery_prefix): per camera a "faces in view" and a
"last recognised person" sensor, per enrolled person a device_tracker with the camera as an attribute.
People are read from the gallery, a file or PostgreSQL (held open read-only on a thread of its own, so a slow
database never holds up events; re-read when its change token moves: the file's data version, PostgreSQL's
LISTEN/NOTIFY generation): an enrolled person's entity appears within GALLERY_POLL_S, a removed person's
entity and presence topic are cleared (empty retained payload), and so are stale entities this instance
left behind in an earlier run.

Never stalls the pipeline: events wait in a bounded queue while the broker is away (oldest dropped and
counted); retained state (presence, counts, discovery) is kept as "latest value per topic" and sent again
on every (re)connect, so a broker restarted without persistence gets it all back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from streamer.config import MqttSettings
from streamer.errors import ConfigError
from streamer.logutil import RateLimitedLog
from streamer.publish.sinks import QueuedSink

log = logging.getLogger(__name__)

GALLERY_POLL_S = 2.0  # how soon enrolment and removal show in Home Assistant
PRESENCE_REFRESH_S = 10.0  # a present person's last_seen is republished at most this often
RECONNECT_MIN_S = 1  # paho doubles the delay after each failed attempt, up to the max
RECONNECT_MAX_S = 30
TICK_S = 0.25
CLOSE_RESERVE_S = 0.5  # of the stop budget, kept for "offline" and the disconnect


def topic_level(text: str) -> str:
    """`text` as one topic level: wildcards and separators would change what the topic means."""
    return re.sub(r"[+#/\x00]", "_", text) or "_"


def object_id(text: str) -> str:
    """A Home Assistant object/node id ([A-Za-z0-9_-]); a hash keeps ids apart that the cleaning would merge."""
    if re.fullmatch(r"[A-Za-z0-9_-]+", text):
        return text
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", ascii_text).strip("_")
    return f"{slug}_{_short_hash(text)}" if slug else _short_hash(text)


def person_slug(name: str) -> str:
    """lin_manuel_miranda for "Lin-Manuel Miranda": readable in topics; non-Latin names get a hash."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "_", ascii_name.lower()).strip("_")
    return slug or f"person_{_short_hash(name)}"


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds")


def _json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _encode(payload: bytes | dict[str, Any]) -> bytes:
    """Retained state is kept as a dict until it is sent: the caller's thread only stores values."""
    if isinstance(payload, bytes):
        return payload
    if "last_seen_ts" in payload:
        payload = {**payload, "last_seen": _iso(payload["last_seen_ts"])}
    return _json(payload)


class _GalleryWatch:
    """The gallery's people for presence: one read-only handle kept open, re-read only when `refresh()`'s
    token moves; reopened after an error (a file not made yet, a database restarted). Falsy without one."""

    def __init__(self, where: Any) -> None:
        from streamer.match.open import location

        self.where = location(where)
        self._gallery: Any = None
        self._token: Any = None
        self._names: set[str] | None = None
        self._note = RateLimitedLog(log, interval_s=300)
        self._lock = threading.Lock()  # names() at start and on the gallery thread; close() when it ends

    def __bool__(self) -> bool:
        return self.where is not None

    def names(self) -> set[str] | None:
        """Everyone enrolled; None when there is no gallery or it cannot be read now (keep what you have)."""
        if self.where is None:  # nobody to list: people appear as identity events name them
            return None
        from streamer.errors import GalleryError
        from streamer.match.open import open_gallery

        with self._lock:
            try:
                if self._gallery is None:
                    self._gallery = open_gallery(self.where, create=False, readonly=True)
                    self._token = None
                token = self._gallery.refresh()
                if token != self._token or self._names is None:
                    self._names = {person.name for person in self._gallery.people()}
                    self._token = token
                return set(self._names)
            except GalleryError as exc:
                self._note.warning("gallery", "MQTT presence: %s", exc)  # the message names the gallery
                self._drop()
                return None

    def _drop(self) -> None:
        gallery, self._gallery, self._names = self._gallery, None, None
        if gallery is not None:
            try:
                gallery.close()
            except Exception as exc:  # noqa: BLE001 - a broken handle is being thrown away anyway
                log.debug("closing the gallery: %s", exc)

    def close(self) -> None:
        with self._lock:
            self._drop()


@dataclass
class _Person:
    name: str
    slug: str
    state: str = "away"
    camera: str | None = None
    last_seen: float | None = None  # wall clock of the last sighting (the event's ts)
    seen_at: float = 0.0  # time.monotonic() of the last sighting: timeouts must not follow clock jumps
    published_at: float = 0.0
    tracks: set[tuple[str, int]] = field(default_factory=set)  # live tracks named after them


@dataclass
class _Camera:
    stream: str
    live: set[int] = field(default_factory=set)
    named: dict[int, str] = field(default_factory=dict)  # live track -> the name its identity gave


class MqttSink(QueuedSink):
    def __init__(
        self,
        settings: MqttSettings,
        *,
        streams: list[str],
        gallery: Any = None,
        gallery_path: Path | None = None,
    ) -> None:
        """`gallery`: a path, a postgresql:// URL or the `gallery` settings (`gallery_path`: the older name)."""
        import paho.mqtt.client as mqtt

        from streamer import __version__

        super().__init__("mqtt", settings.queue, tick_s=TICK_S)
        self.settings = settings
        self.prefix = settings.topic_prefix
        self.node = object_id(self.prefix.replace("/", "_"))
        self.availability = f"{self.prefix}/availability"
        self.where = f"{settings.host}:{settings.port}"
        self._gallery = _GalleryWatch(gallery if gallery is not None else gallery_path)
        self.version = __version__
        self.connects = 0
        self._mqtt = mqtt
        self._state = threading.Lock()  # people, cameras, retained: the caller's thread, paho's and the worker's
        self._people: dict[str, _Person] = {}
        self._cameras: dict[str, _Camera] = {}
        self._retained: dict[str, bytes | dict[str, Any]] = {}  # topic -> what it must hold; b"" clears it
        self._dirty: set[str] = set()
        self._resync = False
        self._gallery_wake = threading.Event()
        self._gallery_stop = threading.Event()
        self._net_log = RateLimitedLog(log, interval_s=60)
        self._next_check = 0.0
        self._closing = False
        self._final_deadline = float("inf")

        for stream in streams:
            self._camera(stream)
        self._gallery_thread = threading.Thread(target=self._watch_gallery, name="streamer-mqtt-gallery",
                                                daemon=True)
        self._set(self.availability, b"online")

        client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=settings.client_id or f"streamer-{socket.gethostname()[:40]}-{os.getpid()}",
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        if settings.username is not None:
            password = settings.password.get_secret_value() if settings.password is not None else None
            client.username_pw_set(settings.username, password)
        if settings.tls:
            try:
                client.tls_set(
                    ca_certs=str(settings.ca_file) if settings.ca_file else None,
                    certfile=str(settings.cert_file) if settings.cert_file else None,
                    keyfile=str(settings.key_file) if settings.key_file else None,
                )
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError: a file that is not PEM, a wrong key
                raise ConfigError(f"publish.mqtt: cannot use the TLS files (ca_file, cert_file, key_file): {exc}") \
                    from None
            if settings.tls_insecure:
                client.tls_insecure_set(True)
        client.will_set(self.availability, b"offline", qos=1, retain=True)
        client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        # paho's own queue (QoS 1 messages not yet acknowledged) is bounded too: it cannot grow either.
        client.max_queued_messages_set(settings.queue)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client
        if not settings.loopback and not settings.tls:
            log.warning("publish.mqtt: %s is beyond this machine without TLS: the password and the names of the "
                        "people seen travel unencrypted (use mqtts:// where the broker offers it)", self.where)
        # Read once before connecting: the broker's retained entities of these people must not look stale.
        self._refresh_people(self._gallery.names())
        client.connect_async(settings.host, settings.port, keepalive=settings.keepalive_s)
        client.loop_start()
        self.start()
        self._gallery_thread.start()
        log.info("publishing events to MQTT broker %s under %s/ (discovery %s)", self.where, self.prefix,
                 f"under {settings.discovery_prefix}/" if settings.discovery else "off")

    # -- the caller's thread: keep it to dictionary updates --------------------------------------------------
    def publish(self, event: Any, crop: bytes | None = None) -> None:
        self._observe(event)
        super().publish(event, crop)

    def stats(self) -> dict[str, int]:
        stats = super().stats()
        stats["connected"] = int(self._client.is_connected())
        stats["connects"] = self.connects
        return stats

    def _observe(self, event: Any) -> None:
        kind = event.kind
        if kind not in ("track.started", "track.updated", "track.ended", "identity", "attributes"):
            return
        now = time.monotonic()
        with self._state:
            camera = self._camera(event.stream)
            track = event.track
            if kind == "track.started":
                camera.live.add(track)
                self._set_faces(camera)
            elif kind == "track.ended":
                camera.live.discard(track)
                self._set_faces(camera)
                name = camera.named.pop(track, None)
                if name is not None and name in self._people:
                    person = self._people[name]
                    person.tracks.discard((camera.stream, track))
                    self._sighting(person, camera.stream, event.ts, now)
            elif kind == "identity":
                previous = camera.named.get(track)
                if previous is not None and previous != event.name and previous in self._people:
                    self._people[previous].tracks.discard((camera.stream, track))
                if event.name is None:
                    camera.named.pop(track, None)
                    return
                camera.named[track] = event.name
                person = self._people.get(event.name)
                if person is None:  # enrolled since the last gallery read
                    person = self._add_person(event.name)
                    self._gallery_wake.set()
                person.tracks.add((camera.stream, track))
                self._sighting(person, camera.stream, event.ts, now)
                self._set(f"{self.prefix}/{topic_level(camera.stream)}/last_person", {
                    "name": event.name, "camera": camera.stream, "track": track, "score": event.score,
                    "last_seen_ts": event.ts,
                })
            else:
                name = camera.named.get(track)
                if name is not None and name in self._people:
                    self._sighting(self._people[name], camera.stream, event.ts, now)

    # -- state (under self._state) ----------------------------------------------------------------------------
    def _set(self, topic: str, payload: bytes | dict[str, Any]) -> None:
        if self._retained.get(topic) != payload:
            self._retained[topic] = payload
            self._dirty.add(topic)

    def _camera(self, stream: str) -> _Camera:
        camera = self._cameras.get(stream)
        if camera is None:
            camera = self._cameras[stream] = _Camera(stream)
            self._set_faces(camera)
            if self.settings.discovery:
                for topic, config in self._camera_configs(stream).items():
                    self._set(topic, config)
        return camera

    def _set_faces(self, camera: _Camera) -> None:
        self._set(f"{self.prefix}/{topic_level(camera.stream)}/faces_in_view", str(len(camera.live)).encode())

    def _presence_topic(self, person: _Person) -> str:
        return f"{self.prefix}/person/{person.slug}/presence"

    def _tracker_topic(self, person: _Person) -> str:
        return f"{self.settings.discovery_prefix}/device_tracker/{self.node}/person_{person.slug}/config"

    def _add_person(self, name: str) -> _Person:
        slugs = {p.slug for p in self._people.values()}
        slug = person_slug(name)
        if slug in slugs:
            slug = f"{slug}_{_short_hash(name)}"
        person = self._people[name] = _Person(name, slug)
        self._set_presence(person)
        if self.settings.discovery:
            self._set(self._tracker_topic(person), self._person_config(person))
        return person

    def _remove_person(self, person: _Person) -> None:
        del self._people[person.name]
        self._set(self._presence_topic(person), b"")
        self._set(self._tracker_topic(person), b"")

    def _sighting(self, person: _Person, stream: str, ts: float, now: float) -> None:
        person.seen_at = now
        person.last_seen = ts
        if person.state != "home" or person.camera != stream or now - person.published_at >= PRESENCE_REFRESH_S:
            person.state = "home"
            person.camera = stream
            self._set_presence(person)

    def _set_presence(self, person: _Person) -> None:
        person.published_at = time.monotonic()
        self._set(self._presence_topic(person), {
            "name": person.name, "state": person.state, "camera": person.camera, "last_seen_ts": person.last_seen,
        })

    def _refresh_people(self, names: set[str] | None) -> None:
        if names is None:  # unreadable gallery: keep the entities we have rather than flap them
            return
        with self._state:
            for person in [p for p in self._people.values() if p.name not in names]:
                self._remove_person(person)
            for name in sorted(names - self._people.keys()):
                self._add_person(name)

    def _expire(self, now: float) -> None:
        timeout = self.settings.presence_timeout_s
        with self._state:
            for person in self._people.values():
                if person.state == "home" and not person.tracks and now - person.seen_at > timeout:
                    person.state = "away"
                    self._set_presence(person)

    # -- discovery payloads --------------------------------------------------------------------------------
    def _hub_device(self) -> dict[str, Any]:
        return {"identifiers": [self.node], "name": self.prefix, "manufacturer": "streamer",
                "model": "face recognition", "sw_version": self.version}

    def _common(self, unique_id: str, device: dict[str, Any]) -> dict[str, Any]:
        return {"unique_id": unique_id, "availability_topic": self.availability, "device": device,
                "origin": {"name": "streamer", "sw_version": self.version}}

    def _camera_configs(self, stream: str) -> dict[str, dict[str, Any]]:
        cam = object_id(stream)
        level = topic_level(stream)
        device = {"identifiers": [f"{self.node}_{cam}"], "name": stream, "manufacturer": "streamer",
                  "model": "camera", "via_device": self.node}
        base = f"{self.settings.discovery_prefix}/sensor/{self.node}"
        last = f"{self.prefix}/{level}/last_person"
        return {
            f"{base}/{cam}_faces/config": {
                "name": "Faces in view", "state_topic": f"{self.prefix}/{level}/faces_in_view",
                "state_class": "measurement", "icon": "mdi:face-recognition",
                **self._common(f"{self.node}_{cam}_faces", device),
            },
            f"{base}/{cam}_last_person/config": {
                "name": "Last recognised person", "state_topic": last, "value_template": "{{ value_json.name }}",
                "json_attributes_topic": last, "icon": "mdi:account-check",
                **self._common(f"{self.node}_{cam}_last_person", device),
            },
        }

    def _person_config(self, person: _Person) -> dict[str, Any]:
        topic = self._presence_topic(person)
        return {
            "name": person.name, "state_topic": topic, "value_template": "{{ value_json.state }}",
            "payload_home": "home", "payload_not_home": "away", "json_attributes_topic": topic,
            "source_type": "router", "icon": "mdi:account",
            **self._common(f"{self.node}_person_{person.slug}", self._hub_device()),
        }

    # -- paho's network thread --------------------------------------------------------------------------------
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            remedy = " (check publish.mqtt.username and publish.mqtt.password)" if reason.value in (134, 135, 4, 5) \
                else ""
            self._net_log.warning("refused", "MQTT broker %s refused the connection: %s%s; retrying",
                                  self.where, reason, remedy)
            return
        self.connects += 1
        if self.connects > 1:
            log.warning("MQTT broker %s: connected again", self.where)
        else:
            log.info("MQTT broker %s: connected", self.where)
        if self.settings.discovery:
            # Home Assistant says "online" here when it starts: it wants the configs again. Our own retained
            # configs come back too, which is how entities left over from an earlier run are found.
            client.subscribe([(f"{self.settings.discovery_prefix}/status", 0),
                              (f"{self.settings.discovery_prefix}/+/{self.node}/+/config", 0)])
        client.subscribe([(f"{self.prefix}/person/+/presence", 0), (f"{self.prefix}/+/faces_in_view", 0),
                          (f"{self.prefix}/+/last_person", 0)])
        with self._state:
            self._resync = True
        self._wake()

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        self._net_log.warning("unreachable", "cannot connect to MQTT broker %s (publish.mqtt.url): is it running and "
                              "reachable? Retrying in the background; up to %d events wait", self.where, self.maxsize)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if not self._closing:
            self._net_log.warning("lost", "MQTT broker %s: connection lost (%s); reconnecting, up to %d events wait",
                                  self.where, reason, self.maxsize)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        topic = message.topic
        if topic == f"{self.settings.discovery_prefix}/status":
            if message.payload == b"online":
                with self._state:
                    self._resync = True
                self._wake()
            return
        if message.payload and message.retain:  # stored on the broker, from us now or from an earlier run
            with self._state:
                if topic not in self._retained and not self._keeps(topic):
                    self._set(topic, b"")

    def _keeps(self, topic: str) -> bool:
        """A current camera's last person from an earlier run is still news; everything else we no longer
        publish (a removed person, a camera no longer configured) is cleared."""
        levels = {topic_level(stream) for stream in self._cameras}
        return topic.endswith("/last_person") and topic[len(self.prefix) + 1:-len("/last_person")] in levels

    # -- the worker thread --------------------------------------------------------------------------------
    def _ready(self) -> bool:
        return self._client.is_connected()

    def _deliver(self, event: Any, crop: bytes | None) -> bool | None:
        topic = f"{self.prefix}/{topic_level(event.stream)}/{event.kind}"
        qos = self.settings.qos.get(event.kind, 0)
        info = self._client.publish(topic, event.payload(), qos=qos)
        if info.rc == self._mqtt.MQTT_ERR_NO_CONN:
            self._push_front(event, crop)
            self._sleep(0.05)  # the disconnect callback is on its way
            return None
        if info.rc != self._mqtt.MQTT_ERR_SUCCESS:  # paho's QoS 1 queue is full: the broker is not acking
            return False
        # The publisher stamps crop=True only when the user enabled crops: the one place that decides.
        if crop is not None and getattr(event, "crop", None) is True:
            self._client.publish(f"{topic}/crop", crop, qos=0)
        return True

    def _tick(self) -> None:
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + TICK_S
            self._expire(now)
        if self._client.is_connected():
            self._flush_retained()

    def _flush_retained(self) -> None:
        with self._state:
            if self._resync:
                self._resync = False
                self._dirty.update(self._retained)
            if not self._dirty:
                return
            # Discovery configs first, availability last: Home Assistant then finds every entity and its state.
            discovery = self.settings.discovery_prefix + "/"
            order = sorted(self._dirty, key=lambda t: 2 if t == self.availability else int(not t.startswith(discovery)))
            pending = [(topic, self._retained[topic]) for topic in order]
        for topic, payload in pending:
            info = self._client.publish(topic, _encode(payload), qos=1, retain=True)
            if info.rc != self._mqtt.MQTT_ERR_SUCCESS:
                return
            with self._state:
                if self._retained.get(topic) == payload:
                    self._dirty.discard(topic)
                    if not payload:
                        del self._retained[topic]

    # -- the gallery thread ------------------------------------------------------------------------------
    def _watch_gallery(self) -> None:
        if not self._gallery:
            return
        try:
            while not self._gallery_stop.is_set():
                self._gallery_wake.wait(GALLERY_POLL_S)
                self._gallery_wake.clear()
                if not self._gallery_stop.is_set():
                    self._refresh_people(self._gallery.names())
        finally:
            self._gallery.close()

    def begin_close(self, deadline: float) -> None:
        self._final_deadline = deadline
        now = time.monotonic()
        super().begin_close(deadline - min(CLOSE_RESERVE_S, max(0.0, deadline - now) / 2))

    def _finish(self) -> None:
        self._closing = True
        self._gallery_stop.set()
        self._gallery_wake.set()
        client = self._client
        try:
            if client.is_connected():
                self._flush_retained()  # the last counts and presence, then goodbye
                info = client.publish(self.availability, b"offline", qos=1, retain=True)
                try:
                    info.wait_for_publish(max(0.05, self._final_deadline - time.monotonic() - 0.1))
                except (RuntimeError, ValueError):  # the connection went in between: the last will says it
                    pass
            client.disconnect()
        finally:
            client.loop_stop()
