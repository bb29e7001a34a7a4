"""gossipfl.protocol._blosc: the ctypes binding to C-Blosc2 against python-blosc2, call for call."""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import subprocess
import sys

import blosc2
import numpy as np
import pytest

from gossipfl.protocol import _blosc

NATIVE = _blosc.NativeBlosc.load()
PYTHON = _blosc.PythonBlosc()
BACKENDS = [pytest.param(NATIVE, id="native"), pytest.param(PYTHON, id="python-blosc2")]


def arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out: list[np.ndarray] = []
    for n in (1, 7, 1000, 70_001):
        out.append((rng.standard_normal(n) * 1e-3).astype(np.float32))
        out.append((rng.standard_normal(n) * 1e-3).astype(np.float16))
        out.append(rng.integers(-127, 128, n, dtype=np.int8))
    out += [np.zeros(50_000, np.float32), rng.integers(0, 1 << 32, 3000, dtype=np.uint32)]
    return out


def test_the_wheel_ships_the_library_and_it_is_used() -> None:
    # If this fails after a blosc2 upgrade, the codec still works through python-blosc2, but every
    # daemon pays ~25 MB more: check the structs in gossipfl/protocol/_blosc.py against the new blosc2.h.
    assert NATIVE is not None, f"no usable libblosc2 in {_blosc._library_paths()}"
    assert isinstance(_blosc.BACKEND, _blosc.NativeBlosc)


def test_importing_the_codec_does_not_import_python_blosc2() -> None:
    code = "import sys, gossipfl.protocol.codec; print('blosc2' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_chunks_are_byte_identical_to_python_blosc2() -> None:
    assert NATIVE is not None
    codecs = (_blosc.BLOSCLZ, _blosc.LZ4, _blosc.LZ4HC, _blosc.ZSTD)
    filters = (_blosc.NOFILTER, _blosc.SHUFFLE, _blosc.BITSHUFFLE)
    for arr, codec, clevel, filt in itertools.product(arrays(), codecs, (0, 1, 9), filters):
        raw = memoryview(arr.view(np.uint8))
        ours = NATIVE.compress(raw, typesize=arr.itemsize, codec=codec, clevel=clevel, filt=filt, nthreads=1)
        theirs = blosc2.compress2(raw, typesize=arr.itemsize, codec=blosc2.Codec(codec), clevel=clevel, nthreads=1,
                                  filters=[blosc2.Filter(filt)], filters_meta=[0])
        assert ours == theirs, (arr.dtype, arr.size, codec, clevel, filt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nthreads", [1, 2])
def test_round_trip_and_sizes(backend: _blosc.Backend, nthreads: int) -> None:
    for arr in arrays():
        raw = memoryview(arr.view(np.uint8))
        chunk = backend.compress(raw, typesize=arr.itemsize, codec=_blosc.ZSTD, clevel=1, filt=_blosc.SHUFFLE,
                                 nthreads=nthreads)
        assert backend.cbuffer_sizes(memoryview(chunk))[:2] == (len(raw), len(chunk))
        assert backend.cbuffer_sizes(memoryview(chunk)) == tuple(blosc2.get_cbuffer_sizes(chunk))
        out = np.full(len(raw), 0xAA, np.uint8)
        backend.decompress_into(memoryview(chunk), out, nthreads)
        assert out.tobytes() == raw.tobytes()
        # and across implementations, both ways
        assert blosc2.decompress2(chunk) == raw.tobytes()
        other = blosc2.compress2(raw, typesize=arr.itemsize, codec=blosc2.Codec.LZ4, clevel=5)
        out[:] = 0
        backend.decompress_into(memoryview(other), out, nthreads)
        assert out.tobytes() == raw.tobytes()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_chunks_raise_value_error(backend: _blosc.Backend) -> None:
    arr = (np.random.default_rng(1).standard_normal(4096) * 1e-3).astype(np.float32)
    chunk = bytearray(backend.compress(memoryview(arr.view(np.uint8)), typesize=4, codec=_blosc.ZSTD, clevel=1,
                                       filt=_blosc.SHUFFLE, nthreads=1))
    out = np.empty(arr.nbytes, np.uint8)
    damaged = bytearray(chunk)
    damaged[40:60] = b"\xff" * 20  # inside the compressed stream
    cut = chunk[: len(chunk) // 2]  # header claims more than there is
    for bad in (damaged, cut):
        # refused, or decoded to garbage that the codec's hash and checks refuse first: never a crash
        with contextlib.suppress(ValueError, RuntimeError):
            backend.decompress_into(memoryview(bytes(bad)), out, 1)
    if backend is NATIVE:
        with pytest.raises(ValueError):
            NATIVE.decompress_into(memoryview(bytes(cut)), out, 1)
        with pytest.raises(ValueError):
            NATIVE.decompress_into(memoryview(bytes(chunk)), np.empty(arr.nbytes - 4, np.uint8), 1)
        with pytest.raises(ValueError):
            NATIVE.cbuffer_sizes(memoryview(bytes(chunk[:16])))
        with pytest.raises(ValueError):
            NATIVE.decompress_into(memoryview(bytes(chunk)), np.empty(arr.nbytes, np.uint8)[::-1], 1)


def test_layout_check_refuses_a_library_whose_structs_differ(monkeypatch: pytest.MonkeyPatch) -> None:
    assert NATIVE is not None
    assert NATIVE._layout_ok()

    class Shifted(ctypes.Structure):  # same size, but compcode takes two bytes: every later byte field moves
        _fields_ = [("compcode", ctypes.c_uint16), *_blosc._CParams._fields_[1:]]

    assert ctypes.sizeof(Shifted) == ctypes.sizeof(_blosc._CParams)
    monkeypatch.setattr(NATIVE._lib.blosc2_get_blosc2_cparams_defaults, "restype", Shifted)
    assert not NATIVE._layout_ok()
