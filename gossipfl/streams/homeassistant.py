"""Home Assistant MQTT discovery: the retained messages that make a node's verdicts appear in Home Assistant as a
device with sensors, with no YAML written by hand.

Home Assistant subscribes to ``<prefix>/<component>/<node>/<object>/config``; each retained JSON payload there
declares one entity that reads its state from a topic we publish anyway (the verdicts, ``mqtt.result_topic``)
through a template. The availability topic carries ``online`` (published at each connection) and ``offline``
(the broker's last will, sent when the daemon's connection drops without a goodbye), so a dead device shows as
unavailable rather than as a last reading frozen in time.

Pure: topics and payloads in, nothing sent here (``gossipfld.streaming`` publishes them).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

ONLINE, OFFLINE = "online", "offline"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class Discovery:
    prefix: str  # "homeassistant", as Home Assistant's MQTT integration expects by default
    node: str  # the node's name (node.name)
    result_topic: str
    task: str  # "anomaly", "classification" or "regression": which entities the verdicts feed

    @property
    def object_id(self) -> str:
        return "gossipfl_" + _UNSAFE.sub("_", self.node)

    @property
    def availability_topic(self) -> str:
        return f"{self.result_topic}/availability"

    def messages(self) -> list[tuple[str, bytes]]:
        """(topic, payload) of every entity's config message, to be published retained."""
        device = {"identifiers": [self.object_id], "name": f"gossipfl {self.node}", "manufacturer": "gossipfl",
                  "model": f"gossipfld ({self.task} model)"}
        common = {"state_topic": self.result_topic, "availability_topic": self.availability_topic,
                  "payload_available": ONLINE, "payload_not_available": OFFLINE, "device": device}
        entities: list[tuple[str, str, dict[str, object]]] = []
        if self.task == "anomaly":
            entities += [
                ("sensor", "score", {"name": "Anomaly score", "value_template": "{{ value_json.score }}",
                                     "state_class": "measurement"}),
                ("binary_sensor", "anomaly", {
                    "name": "Anomaly", "device_class": "problem", "payload_on": "ON", "payload_off": "OFF",
                    "value_template": "{{ 'ON' if value_json.anomaly else 'OFF' }}"}),
            ]
        elif self.task == "classification":
            entities.append(("sensor", "class", {"name": "Class", "value_template": "{{ value_json['class'] }}"}))
        else:
            entities.append(("sensor", "value", {"name": "Prediction", "value_template": "{{ value_json.value }}",
                                                 "state_class": "measurement"}))
        out = []
        for component, name, config in entities:
            unique = f"{self.object_id}_{name}"
            payload = {**config, **common, "unique_id": unique, "object_id": unique}
            out.append((f"{self.prefix}/{component}/{self.object_id}/{name}/config",
                        json.dumps(payload, sort_keys=True).encode()))
        return out
