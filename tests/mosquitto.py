"""A real Mosquitto broker for tests: loopback only, a free port, its own config in a temp folder.

    with Mosquitto(tmp_path) as broker:              # anonymous
        ...  broker.url -> "mqtt://127.0.0.1:PORT"
        broker.kill(); broker.restart()               # same port, retained messages gone (no persistence)
    Mosquitto(tmp_path, users={"cam": "secret"})      # password file made with mosquitto_passwd

Also `Collector`: a paho subscriber that records every message (topic, payload, retain, arrival time).
The Debian package `mosquitto` provides the broker (.ci/install-system-deps.sh installs it).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"


def available() -> bool:
    return Path(MOSQUITTO).is_file()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Mosquitto:
    def __init__(self, folder: Path, *, users: dict[str, str] | None = None, port: int | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        """`extra`: more mosquitto.conf lines, e.g. ("max_queued_messages 0",) for a bench."""
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.users = users or {}
        self.log = self.folder / "mosquitto.log"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "persistence false",  # a restarted broker has forgotten everything: what a crashed one does
            f"log_dest file {self.log}",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
        import getpass

        # As root, mosquitto would switch to its own user, who cannot read this folder.
        lines.append(f"user {getpass.getuser()}")
        if self.users:
            passwords = self.folder / "passwords"
            for index, (user, password) in enumerate(self.users.items()):
                flags = ["-c"] if index == 0 else []
                subprocess.run([MOSQUITTO_PASSWD, *flags, "-b", str(passwords), user, password], check=True,
                               capture_output=True)
            passwords.chmod(0o600)
            lines += ["allow_anonymous false", f"password_file {passwords}"]
        else:
            lines.append("allow_anonymous true")
        lines += extra
        self.config = self.folder / "mosquitto.conf"
        self.config.write_text("\n".join(lines) + "\n")
        self.process: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.process = subprocess.Popen([MOSQUITTO, "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE)
            while time.monotonic() < deadline and self.process.poll() is None:
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                        return
                except OSError:
                    time.sleep(0.05)
            if self.process.poll() is None or time.monotonic() >= deadline:
                self.kill()
                raise RuntimeError(f"mosquitto did not start on port {self.port}: {self.log_text()}")
            time.sleep(0.2)  # the port may still be held by the previous broker's socket: try again

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def restart(self) -> None:
        self.kill()
        self.start()

    def log_text(self) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        if self.process is not None and self.process.poll() is not None and self.process.stderr is not None:
            text += self.process.stderr.read().decode(errors="replace")
        return text[-3000:]

    def __enter__(self) -> Mosquitto:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool
    at: float  # time.monotonic() on arrival
    wall: float  # time.time() on arrival


class Collector:
    """Subscribes to `topics` on a broker and keeps every message; reconnects when the broker comes back."""

    def __init__(self, port: int, topics: list[str], *, username: str | None = None, password: str | None = None):
        import paho.mqtt.client as mqtt

        self.messages: list[Message] = []
        self._cond = threading.Condition()
        self._topics = topics
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.reconnect_delay_set(1, 2)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self._subscribed = threading.Event()
        self.client.connect_async("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("the test subscriber could not connect")

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        if not reason.is_failure:
            client.subscribe([(topic, 1) for topic in self._topics])

    def _on_subscribe(self, client, userdata, mid, reasons, properties) -> None:
        self._subscribed.set()  # the broker has the subscription: nothing published from now on is missed

    def _on_message(self, client, userdata, message) -> None:
        with self._cond:
            self.messages.append(Message(message.topic, bytes(message.payload), bool(message.retain),
                                         time.monotonic(), time.time()))
            self._cond.notify_all()

    def wait_for(self, predicate, timeout: float, what: str, since: int = 0) -> Message:
        """The first message from index `since` on that satisfies `predicate`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for message in self.messages[since:]:
                    if predicate(message):
                        return message
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = sorted({m.topic for m in self.messages})
                    raise AssertionError(f"timed out after {timeout} s waiting for {what}; topics seen: {seen}")
                self._cond.wait(remaining)

    def on(self, topic: str) -> list[Message]:
        with self._cond:
            return [m for m in self.messages if m.topic == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
