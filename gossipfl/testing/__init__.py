"""Test equipment that the tests, the benchmarks and the demo share: a local cluster of real ``gossipfld``
processes (``cluster``), a hand-driven misbehaving peer (``visitor``), and simulated hosts in Linux network
namespaces (``netns``). I/O is allowed here; nothing in the library proper imports this package.
"""
