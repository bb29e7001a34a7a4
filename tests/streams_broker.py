"""A real MQTT broker for the stream tests: mosquitto on 127.0.0.1 only, on a free port, started from a
generated config and stopped at the end; ready once its port accepts a connection (polled, never a fixed sleep).

mosquitto is the Debian package ``mosquitto``; .ci/run installs it. Missing, the tests fail as root (CI, where
it is installed) and skip otherwise, as tests/e2e/test_systemd.py does for systemd's tools.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

HOST = "127.0.0.1"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        path = next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None)
    if path is None:
        if os.geteuid() == 0:
            pytest.fail(f"{name} is missing; .ci/run installs it (apt-get install mosquitto)")
        pytest.skip(f"{name} is missing and only root can install it (apt-get install mosquitto)")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class Broker:
    """mosquitto on ``127.0.0.1:port``; anonymous unless ``users`` (name -> password) are given."""

    def __init__(self, directory: Path, users: dict[str, str] | None = None, port: int | None = None,
                 tls: tuple[Path, Path, Path] | None = None) -> None:
        """``tls``: (CA, certificate, key) files; the listener then speaks TLS only and wants a client
        certificate the CA signed."""
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log = directory / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None
        # A test publishes thousands of readings in a burst: the broker holds what a subscriber has not taken yet
        # (mosquitto's default drops QoS 1 messages past 1000 waiting for one client, and says so to nobody).
        lines = [f"listener {self.port} {HOST}", "persistence false", "max_queued_messages 0", "log_dest stderr",
                 "log_type error", "log_type warning", "log_type notice", "log_type information"]
        if tls is not None:
            ca, cert, key = tls
            lines += [f"cafile {ca}", f"certfile {cert}", f"keyfile {key}", "require_certificate true"]
        if os.geteuid() == 0:
            lines.append("user root")  # as root mosquitto would switch to the user "mosquitto", who cannot read tmp
        if users:
            password_file = directory / "broker.passwd"
            for i, (name, password) in enumerate(users.items()):
                create = ["-c"] if i == 0 else []
                subprocess.run([tool("mosquitto_passwd"), *create, "-b", str(password_file), name, password],
                               check=True, capture_output=True, timeout=30)
            password_file.chmod(0o600)
            lines += ["allow_anonymous false", f"password_file {password_file}"]
        else:
            lines.append("allow_anonymous true")
        self.config = directory / "mosquitto.conf"
        self.config.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 15.0) -> Broker:
        assert self.proc is None, "already running"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([tool("mosquitto"), "-c", str(self.config)], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"mosquitto exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection((HOST, self.port), timeout=1.0):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"mosquitto did not accept on {HOST}:{self.port} within {timeout:.0f} s: "
                                         f"{self.log.read_text()[-2000:]}") from None
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Publisher:
    """A separate paho client that publishes to the broker, as a sensor would (blocking: call it from a
    worker thread under trio)."""

    def __init__(self, port: int, username: str = "", password: str = "") -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="")
        if username:
            self.client.username_pw_set(username, password)
        self.client.connect(HOST, port, keepalive=30)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes | str, timeout: float = 10.0) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=timeout)
        assert info.is_published(), f"publishing to {topic} timed out"

    def publish_many(self, topic: str, payloads: list[bytes], timeout: float = 60.0) -> None:
        """Publish in order (QoS 1) and wait until the broker has the last; paho keeps the rest in flight."""
        infos = [self.client.publish(topic, payload, qos=1) for payload in payloads]
        if infos:
            infos[-1].wait_for_publish(timeout=timeout)
            assert infos[-1].is_published(), f"publishing {len(payloads)} messages to {topic} timed out"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Subscriber:
    """A separate paho client that records every message on ``filters`` as (topic, payload, retained)."""

    def __init__(self, port: int, filters: list[str]) -> None:
        import threading

        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.messages: list[tuple[str, bytes, bool]] = []
        self.subscribed = threading.Event()
        self.lock = threading.Lock()
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="")

        def on_connect(client, userdata, flags, reason, properties):
            client.subscribe([(f, 1) for f in filters])

        def on_subscribe(client, userdata, mid, reasons, properties):
            self.subscribed.set()

        def on_message(client, userdata, message):
            with self.lock:
                self.messages.append((message.topic, bytes(message.payload), bool(message.retain)))

        self.client.on_connect, self.client.on_subscribe, self.client.on_message = on_connect, on_subscribe, on_message
        self.client.connect(HOST, port, keepalive=30)
        self.client.loop_start()
        assert self.subscribed.wait(15), "the test's subscriber was not subscribed within 15 s"

    def taken(self) -> list[tuple[str, bytes, bool]]:
        with self.lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
