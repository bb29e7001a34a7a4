"""Who a node is, sans I/O: node ids and allowlists (``ids``), its certificate, key and cluster CA files and
their checks (``node``: ``NodeIdentity``), and the strict DER reader they use (``der``).

The TLS side (the contexts, and loading an identity with OpenSSL's own checks) is ``gossipfl.cli.tls``;
making certificates is ``gossipfl.cli.certs``. docs/identity.md has the model and the reasons.
"""
