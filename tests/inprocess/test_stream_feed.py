"""A classifier's node judging a stream (daemon/streaming.py): a whole app in this process, a real mosquitto on
127.0.0.1. Each window's verdict is the class and the probabilities the app's own model gives that row, a
stream does not become training rows for a model that needs labels, and a damaged state file does not stop
the node."""

from __future__ import annotations

import json
import threading

import numpy as np
import trio

from gossipfl.learning.quality import predicted_classes
from gossipfl.testing.cluster import free_port_base
from tests.streams_broker import Broker, Publisher, Subscriber

TIMEOUT = 30.0


def test_a_classifier_publishes_class_and_probabilities_per_window(tmp_path, make_apps, small_digits):
    x, _ = small_digits
    with Broker(tmp_path / "broker") as broker:
        mqtt = {"enabled": True, "port": broker.port, "topics": ["lab/px=px"], "channels": ["px"],
                "window_length": 64, "window_stride": 64, "result_topic": "lab/verdict", "reconnect_min": 0.2}
        (app,) = make_apps(1, base_port=free_port_base(), per_node={0: {"mqtt": mqtt}})
        subscriber = Subscriber(broker.port, ["lab/verdict"])
        publisher = Publisher(broker.port)
        got = threading.Event()

        # A damaged state file: one line, a counter, the file kept aside, and the node starts anyway.
        assert app.stream is not None
        app.stream.state_file.write_bytes(b'{"version": 1, "judged_through": "many"')
        app.stream._load()
        assert app.counters.values.get("stream.state_damaged") == 1
        assert app.stream.state_file.with_name("stream.json.damaged").exists() and not app.stream.state_file.exists()

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                await nursery.start(app.run)
                feed = app.stream
                assert feed is not None and not feed.trains  # a classifier does not learn from unlabelled rows
                with trio.fail_after(TIMEOUT):
                    await feed.source.wait_until(lambda: feed.source.subscribed)
                rows = x[:3]
                payloads = [f"{v:g}".encode() for v in rows.ravel()]
                await trio.to_thread.run_sync(publisher.publish_many, "lab/px", payloads)
                with trio.fail_after(TIMEOUT):
                    while len([m for m in subscriber.taken() if not m[2]]) < 3:
                        await trio.sleep(0.05)
                expected, _ = await app.learner.predict(rows.astype(np.float32))
                verdicts = [json.loads(p) for _, p, retained in subscriber.taken() if not retained]
                assert [v["seq"] for v in verdicts] == [0, 1, 2]
                assert [v["class"] for v in verdicts] == predicted_classes(expected).tolist()
                for verdict in verdicts:
                    assert len(verdict["probabilities"]) == 10 and abs(sum(verdict["probabilities"]) - 1) < 1e-4
                assert app.learner.data.report()["stream_rows"] == 0
                assert app.counters.values.get("stream.windows_judged") == 3
                got.set()
                nursery.cancel_scope.cancel()
            assert json.loads(app.stream.state_file.read_text())["judged_through"] == 2  # written at the stop

        try:
            trio.run(main)
        finally:
            publisher.close()
            subscriber.close()
        assert got.is_set()
