"""The peer-to-peer protocol, sans I/O: what two nodes say to each other and how they keep their references.

``codec`` (the payload format of a model delta; ``quantize`` its schemes' arithmetic, ``chunks`` its blosc2
chunks, ``_blosc`` the C library's three calls, ``feedback`` error feedback's ``Reference``), ``messages`` and
``framing`` (the wire messages and their frames), ``references`` (per-peer delta references as a state
machine), ``peers`` (the table of known peers) and ``advert`` (the DNS-SD advert of a node and its checks).
"""
