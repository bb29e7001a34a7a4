"""gossipfl: serverless gossip learning for fleets of Linux devices.

The library is sans-I/O in the h11 sense: models, training graphs, data, codec, wire messages and
merge rules, with no sockets, no event loop and no clock of its own. The daemon (package ``gossipfld``)
wires it to the network; tests and benchmarks drive it directly.

Grouped by subsystem: ``learning`` (model, training, data, merge and aggregation rules), ``protocol`` (codec,
wire messages and framing, references, peers, adverts), ``identity`` (node ids, certificate files), with
``config``, ``control``, ``metrics``, ``errors`` and ``atomic`` beside them. Only two side packages do I/O:
``cli`` (the ``gossipfl`` command, TLS, certificates, the demo, the systemd service) and ``testing`` (a local
cluster of daemons and test peers). Nothing here imports the daemon.
"""

__version__ = "0.1.0"
