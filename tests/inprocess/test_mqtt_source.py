"""gossipfld.mqtt.MqttSource against a real mosquitto broker on 127.0.0.1 (tests/streams_broker.py): rows from
what a separate client publishes, bad messages counted while the source keeps running, a reconnect after the
broker restarts on the same port, the buffer kept across a restart of the source, and the password file.

Every wait is on a condition under ``trio.fail_after``; nothing sleeps a fixed time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from gossipfl.errors import ConfigError
from gossipfl.metrics import Counters
from gossipfl.streams.settings import StreamSettings
from gossipfld.mqtt import MqttSource, _Message
from tests.streams_broker import HOST, Broker, Publisher

TIMEOUT = 20.0


def settings(port: int, **change: object) -> StreamSettings:
    base = StreamSettings(host=HOST, port=port, channels=["temp", "hum"], subscribe=["plant/#"],
                          topics=["plant/+/temp=temp", "plant/+/hum=hum", "plant/all"],
                          window_length=2, window_stride=2, reconnect_min=0.1, reconnect_max=0.5, keepalive=5)
    return dataclasses.replace(base, **change)  # type: ignore[arg-type]


async def publish(publisher: Publisher, *messages: tuple[str, str]) -> None:
    for topic, payload in messages:
        await trio.to_thread.run_sync(publisher.publish, topic, payload)


async def until(source: MqttSource, predicate: Callable[[], bool], what: str) -> None:
    try:
        with trio.fail_after(TIMEOUT):
            await source.wait_until(predicate)
    except trio.TooSlowError:
        raise AssertionError(f"timed out waiting for {what}: {source.status()} {source.counters.values}") from None


def counted(source: MqttSource, name: str) -> float:
    return source.counters.values.get(name, 0)


def test_rows_from_a_broker_bad_messages_counted_and_the_buffer_kept(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="gossipfld.mqtt")
    state = tmp_path / "rows.bin"

    async def main() -> None:
        with Broker(tmp_path / "broker") as broker:
            publisher = await trio.to_thread.run_sync(Publisher, broker.port)
            try:
                source = MqttSource(settings(broker.port), Counters(), state_file=state)
                assert source.feature_names == ("temp_0", "temp_1", "hum_0", "hum_1")
                async with trio.open_nursery() as nursery:
                    await nursery.start(source.run)
                    await until(source, lambda: source.subscribed, "the subscription")
                    await publish(publisher, ("plant/all", '{"temp": 1, "hum": 10}'),
                                  ("plant/all", '{"temp": 2, "hum": 20, "ts": 1700000000}'),
                                  ("plant/all", "{oops"), ("plant/x/pressure", "5"),
                                  ("plant/a/temp", "3"), ("plant/a/hum", "30"), ("plant/a/temp", "4"),
                                  ("plant/a/hum", "40"))
                    rows = []
                    with trio.fail_after(TIMEOUT):
                        async with contextlib.aclosing(source.rows()) as stream:
                            async for row in stream:
                                rows.append(row)
                                if len(rows) == 2:
                                    break
                    await until(source, lambda: counted(source, "mqtt.messages") == 8, "8 messages")
                    assert [(r.seq, r.values) for r in rows] == [(0, (1, 2, 10, 20)), (1, (3, 4, 30, 40))]
                    assert counted(source, "mqtt.dropped.not_json") == 1
                    assert counted(source, "mqtt.dropped.unknown_topic") == 1
                    assert counted(source, "mqtt.readings") == 6 and counted(source, "mqtt.rows") == 2
                    assert counted(source, "mqtt.connects") == 1
                    assert source.connected
                    nursery.cancel_scope.cancel()
                assert state.stat().st_mode & 0o777 == 0o600

                # A new source resumes the sequence from the state file: no number is given twice.
                again = MqttSource(settings(broker.port), Counters(), state_file=state)
                async with trio.open_nursery() as nursery:
                    await nursery.start(again.run)
                    assert [r.values for r in again.rows_after(0)] == [(3, 4, 30, 40)]
                    await until(again, lambda: again.subscribed, "the second subscription")
                    await publish(publisher, ("plant/all", '{"temp": 5, "hum": 50}'),
                                  ("plant/all", '{"temp": 6, "hum": 60}'))
                    await until(again, lambda: again.buffer.next_seq == 3, "the third row")
                    assert [(r.seq, r.values) for r in again.rows_after(1)] == [(2, (5, 6, 50, 60))]
                    nursery.cancel_scope.cancel()
            finally:
                await trio.to_thread.run_sync(publisher.close)

    trio.run(main)
    bad = [r.getMessage() for r in caplog.records if "dropped a message" in r.getMessage()]
    assert len(bad) == 2 and all("\n" not in line for line in bad), bad
    assert any("not_json" in line and "'plant/all'" in line for line in bad)
    assert any("unknown_topic" in line and "'plant/x/pressure'" in line for line in bad)


def test_reconnects_after_the_broker_restarts(tmp_path: Path) -> None:
    async def main() -> None:
        broker = Broker(tmp_path / "broker").start()
        try:
            source = MqttSource(settings(broker.port))
            async with trio.open_nursery() as nursery:
                await nursery.start(source.run)
                await until(source, lambda: source.subscribed, "the subscription")
                await trio.to_thread.run_sync(broker.stop)
                await until(source, lambda: not source.connected, "the disconnect")
                assert counted(source, "mqtt.disconnects") == 1
                broker = Broker(tmp_path / "broker", port=broker.port)  # same port, a fresh broker
                await trio.to_thread.run_sync(broker.start)
                await until(source, lambda: source.subscribed and counted(source, "mqtt.connects") == 2,
                            "the reconnect and the new subscription")
                publisher = await trio.to_thread.run_sync(Publisher, broker.port)
                try:
                    await publish(publisher, ("plant/all", '{"temp": 1, "hum": 2}'),
                                  ("plant/all", '{"temp": 3, "hum": 4}'))
                    await until(source, lambda: len(source.buffer) == 1, "a row after the reconnect")
                finally:
                    await trio.to_thread.run_sync(publisher.close)
                assert source.buffer.rows()[0].values == (1, 3, 2, 4)
                nursery.cancel_scope.cancel()
            assert not source.connected
        finally:
            broker.stop()

    trio.run(main)


def _password_file(path: Path, password: str, mode: int) -> Path:
    path.write_text(password + "\n")
    path.chmod(mode)
    return path


def test_password_file(tmp_path: Path) -> None:
    async def main() -> None:
        with Broker(tmp_path / "broker", users={"sensor": "s3cret"}) as broker:
            good = _password_file(tmp_path / "good.pw", "s3cret", 0o600)
            source = MqttSource(settings(broker.port, username="sensor", password_file=good))
            publisher = await trio.to_thread.run_sync(Publisher, broker.port, "sensor", "s3cret")
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(source.run)
                    await until(source, lambda: source.subscribed, "an authenticated subscription")
                    await publish(publisher, ("plant/all", '{"temp": 1, "hum": 2}'),
                                  ("plant/all", '{"temp": 3, "hum": 4}'))
                    await until(source, lambda: len(source.buffer) == 1, "a row")
                    nursery.cancel_scope.cancel()
            finally:
                await trio.to_thread.run_sync(publisher.close)

            wrong = _password_file(tmp_path / "wrong.pw", "guess", 0o600)
            refused = MqttSource(settings(broker.port, username="sensor", password_file=wrong))
            async with trio.open_nursery() as nursery:
                await nursery.start(refused.run)
                await until(refused, lambda: counted(refused, "mqtt.connect_failures") >= 1, "the refusal")
                assert not refused.subscribed and "refused" in (refused.last_error or "")
                nursery.cancel_scope.cancel()

    trio.run(main)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620])
def test_password_file_open_to_others_is_refused(tmp_path: Path, mode: int) -> None:
    loose = _password_file(tmp_path / "loose.pw", "s3cret", mode)
    source = MqttSource(settings(1883, username="sensor", password_file=loose))  # never dials: refused first

    async def main() -> None:
        await source.run()  # refused before it starts anything

    with pytest.raises(ConfigError) as caught:
        trio.run(main)
    message = str(caught.value)
    assert message == f"mqtt.password_file: {loose} is open to group or others (mode {mode:04o}); chmod 600 {loose}"


def test_password_file_link_and_empty_refused(tmp_path: Path) -> None:
    from gossipfld.mqtt import read_password

    target = _password_file(tmp_path / "target.pw", "s3cret", 0o600)
    (tmp_path / "link.pw").symlink_to(target)
    with pytest.raises(ConfigError, match="symbolic link"):
        read_password(tmp_path / "link.pw")
    with pytest.raises(ConfigError, match="is empty"):
        read_password(_password_file(tmp_path / "empty.pw", "", 0o600))
    with pytest.raises(ConfigError, match="cannot read"):
        read_password(tmp_path / "missing.pw")
    assert read_password(target) == "s3cret"


def test_tls_files_refused_naming_the_key(tmp_path: Path) -> None:
    source = MqttSource(settings(1883, tls_ca=tmp_path / "missing-ca.pem"))

    async def main() -> None:
        await source.run()  # refused before it starts anything

    with pytest.raises(ConfigError, match=r"^mqtt\.tls_ca: cannot load .*missing-ca\.pem"):
        trio.run(main)


def test_a_full_queue_drops_and_counts() -> None:
    source = MqttSource(settings(1883, queue=2))

    async def main() -> None:
        for _ in range(5):
            source._deliver(_Message("plant/all", b'{"temp": 1, "hum": 2}'))

    trio.run(main)
    assert source.counters.values["mqtt.messages"] == 5
    assert source.counters.values["mqtt.dropped.queue_full"] == 3


def _tls_files(directory: Path) -> dict[str, Path]:
    """A CA, a broker certificate for 127.0.0.1 (an IP SAN: the source checks the broker's name) and a
    client certificate, as PEM files."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test broker CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    files = {"ca": directory / "ca.pem"}
    directory.mkdir(parents=True, exist_ok=True)
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name, san in (("broker", x509.IPAddress(ipaddress.ip_address(HOST))), ("client", x509.DNSName("sensor"))):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])).issuer_name(ca_name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([san]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        files[f"{name}_cert"] = directory / f"{name}.crt"
        files[f"{name}_key"] = directory / f"{name}.key"
        files[f"{name}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{name}_key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
        files[f"{name}_key"].chmod(0o600)
    return files


def test_tls_to_the_broker(tmp_path: Path) -> None:
    files = _tls_files(tmp_path / "pki")
    tls = settings(0, tls_ca=files["ca"], tls_cert=files["client_cert"], tls_key=files["client_key"])

    async def main() -> None:
        with Broker(tmp_path / "broker", tls=(files["ca"], files["broker_cert"], files["broker_key"])) as broker:
            source = MqttSource(dataclasses.replace(tls, port=broker.port))
            async with trio.open_nursery() as nursery:
                await nursery.start(source.run)
                await until(source, lambda: source.subscribed, "a subscription over TLS")
                nursery.cancel_scope.cancel()
            # Without our client certificate the broker refuses the handshake; the source counts and retries.
            anonymous = MqttSource(dataclasses.replace(tls, port=broker.port, tls_cert=None, tls_key=None))
            async with trio.open_nursery() as nursery:
                await nursery.start(anonymous.run)
                await until(anonymous, lambda: counted(anonymous, "mqtt.connect_failures") >= 1, "a refusal")
                assert not anonymous.connected
                nursery.cancel_scope.cancel()

    trio.run(main)
