"""gossipfl: serverless gossip learning for fleets of Linux devices.

The library is sans-I/O in the h11 sense: models, training graphs, data, codec, wire messages and
merge rules, with no sockets, no event loop and no clock of its own. The daemon (package ``gossipfld``)
wires it to the network; tests and benchmarks drive it directly.
"""

__version__ = "0.1.0"
