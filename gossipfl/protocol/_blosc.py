"""The three blosc2 calls the codec makes, bound to the C library without importing python-blosc2.

The codec needs one-shot ``compress``, ``decompress`` into a preallocated buffer, and the chunk header's
sizes: three functions of the C-Blosc2 library. python-blosc2 is an ndarray and compute package whose
``import blosc2`` loads numexpr, httpx, msgpack, ndindex and about 120 modules, and has no import mode
without them: 25 MB of resident memory after numpy alone, 14 MB on top of everything else a daemon
imports (``bench/memory.py``), in a process that only wants those three calls. Its
wheels also ship the C library itself, with headers, pkg-config and CMake files, for programs that link
to it (``blosc2/lib/libblosc2.so``, ``blosc2/include/blosc2.h``). This module calls that library through
ctypes, the way python-blosc2's ``compress2``/``decompress2``/``get_cbuffer_sizes`` call it: a fresh
context per call from ``blosc2_create_cctx``/``blosc2_create_dctx``, so calls from several threads never
share state, and the GIL is released during each call. The bytes produced are the same as
``blosc2.compress2`` with the same parameters (the tests compare them).

The parameter structs are passed by value, so their layout must match the library's. It is declared
below from ``blosc2.h`` and checked when the library is loaded: the defaults the library returns must be
the documented ones, and parameters written into a context must read back unchanged. Every struct starts
as the library's own defaults and has spare room at the end, so a field appended by a later release
keeps its default. If the library is
missing (a platform whose wheel does not ship it) or fails any check (a future release that changed the
structs), the same three calls go through python-blosc2 instead, which is correct everywhere and only
costs memory. ``BACKEND.name`` tells which one is in use.
"""

from __future__ import annotations

import ctypes
import importlib.util
import sys
from pathlib import Path
from typing import Protocol

import numpy as np

# Codec and filter ids of the C library (blosc2.h); the same numbers are in every chunk header.
BLOSCLZ, LZ4, LZ4HC, ZSTD = 0, 1, 2, 5
NOFILTER, SHUFFLE, BITSHUFFLE = 0, 1, 2
AUTO_SPLIT = 3  # python-blosc2's default split mode, so chunks are the same as its compress2 makes
MAX_OVERHEAD = 32  # BLOSC2_MAX_OVERHEAD: compression into len(src) + 32 bytes always succeeds
MAX_FILTERS = 6
_FORWARD_COMPAT_SPLIT = 4  # the library's own default, checked at load
# Spare bytes after the declared fields: a later release that appends a field writes its default there
# (every struct starts as the library's defaults) instead of past the end of our buffer.
_ROOM = 256


class Backend(Protocol):
    name: str

    def compress(self, src: memoryview, *, typesize: int, codec: int, clevel: int, filt: int,
                 nthreads: int) -> bytes:
        """One blosc2 chunk of ``src`` with a one-filter pipeline (``filt`` in slot 0)."""
        ...

    def decompress_into(self, chunk: memoryview, dst: np.ndarray, nthreads: int) -> None:
        """Decompress a whole chunk into ``dst`` (contiguous uint8); ValueError if blosc2 refuses it."""
        ...

    def cbuffer_sizes(self, chunk: memoryview) -> tuple[int, int, int]:
        """(uncompressed bytes, compressed bytes, block size) from a chunk's header."""
        ...


# ------------------------------------------------------------------------------------------ ctypes


class _CParams(ctypes.Structure):
    """``blosc2_cparams`` (blosc2.h)."""

    _fields_ = [
        ("compcode", ctypes.c_uint8),
        ("compcode_meta", ctypes.c_uint8),
        ("clevel", ctypes.c_uint8),
        ("use_dict", ctypes.c_int),
        ("typesize", ctypes.c_int32),
        ("nthreads", ctypes.c_int16),
        ("blocksize", ctypes.c_int32),
        ("splitmode", ctypes.c_int32),
        ("schunk", ctypes.c_void_p),
        ("filters", ctypes.c_uint8 * MAX_FILTERS),
        ("filters_meta", ctypes.c_uint8 * MAX_FILTERS),
        ("prefilter", ctypes.c_void_p),
        ("preparams", ctypes.c_void_p),
        ("tuner_params", ctypes.c_void_p),
        ("tuner_id", ctypes.c_int),
        ("instr_codec", ctypes.c_bool),
        ("codec_params", ctypes.c_void_p),
        ("filter_params", ctypes.c_void_p * MAX_FILTERS),
        ("_room", ctypes.c_uint8 * _ROOM),
    ]


class _DParams(ctypes.Structure):
    """``blosc2_dparams`` (blosc2.h)."""

    _fields_ = [
        ("nthreads", ctypes.c_int16),
        ("schunk", ctypes.c_void_p),
        ("postfilter", ctypes.c_void_p),
        ("postparams", ctypes.c_void_p),
        ("typesize", ctypes.c_int32),
        ("_room", ctypes.c_uint8 * _ROOM),
    ]


def _fields(params: ctypes.Structure) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, *_ in params._fields_:
        if name == "_room":
            continue
        value = getattr(params, name)
        out[name] = list(value) if isinstance(value, ctypes.Array) else value
    return out


_I32 = ctypes.c_int32
_CTX = ctypes.c_void_p
_PTR = ctypes.c_void_p


def _address(buf: memoryview | bytes | bytearray | np.ndarray) -> tuple[int, int, np.ndarray]:
    """Address and length of a contiguous buffer, and the array that keeps it alive during a call."""
    arr = buf if isinstance(buf, np.ndarray) else np.frombuffer(buf, np.uint8)
    if not arr.flags.c_contiguous:
        raise ValueError("blosc2 buffers must be contiguous")
    return int(arr.ctypes.data), int(arr.nbytes), arr


def _library_paths() -> list[Path]:
    """The shared library inside the installed python-blosc2 wheel; found without importing blosc2."""
    try:
        spec = importlib.util.find_spec("blosc2")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    names = {"linux": ("libblosc2.so",), "darwin": ("libblosc2.dylib",)}.get(sys.platform, ())
    return [Path(d) / "lib" / n for d in spec.submodule_search_locations for n in names]


class NativeBlosc:
    """C-Blosc2 through ctypes. ``load`` returns None unless the library is there and passes the checks."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self._lib = lib
        lib.blosc2_get_version_string.restype = ctypes.c_char_p
        lib.blosc2_get_version_string.argtypes = []
        lib.blosc2_get_blosc2_cparams_defaults.restype = _CParams
        lib.blosc2_get_blosc2_cparams_defaults.argtypes = []
        lib.blosc2_get_blosc2_dparams_defaults.restype = _DParams
        lib.blosc2_get_blosc2_dparams_defaults.argtypes = []
        lib.blosc2_create_cctx.restype = _CTX
        lib.blosc2_create_cctx.argtypes = [_CParams]
        lib.blosc2_create_dctx.restype = _CTX
        lib.blosc2_create_dctx.argtypes = [_DParams]
        lib.blosc2_free_ctx.restype = None
        lib.blosc2_free_ctx.argtypes = [_CTX]
        lib.blosc2_ctx_get_cparams.restype = ctypes.c_int
        lib.blosc2_ctx_get_cparams.argtypes = [_CTX, ctypes.POINTER(_CParams)]
        lib.blosc2_compress_ctx.restype = ctypes.c_int
        lib.blosc2_compress_ctx.argtypes = [_CTX, _PTR, _I32, _PTR, _I32]
        lib.blosc2_decompress_ctx.restype = ctypes.c_int
        lib.blosc2_decompress_ctx.argtypes = [_CTX, _PTR, _I32, _PTR, _I32]
        lib.blosc2_cbuffer_sizes.restype = ctypes.c_int
        lib.blosc2_cbuffer_sizes.argtypes = [_PTR, ctypes.POINTER(_I32), ctypes.POINTER(_I32), ctypes.POINTER(_I32)]
        lib.blosc2_init.restype = None
        lib.blosc2_init.argtypes = []
        lib.blosc2_init()
        self.version = lib.blosc2_get_version_string().decode("ascii", "replace")
        self.path = path
        self.name = f"C-Blosc2 {self.version} (ctypes, {path})"

    @classmethod
    def load(cls) -> NativeBlosc | None:
        for path in _library_paths():
            if not path.is_file():
                continue
            try:
                native = cls(ctypes.CDLL(str(path)), path)
            except (OSError, AttributeError):  # not loadable, or a symbol is missing
                continue
            if native._layout_ok():
                return native
        return None

    def _layout_ok(self) -> bool:
        """The structs declared here match the library's (see the module docstring)."""
        lib = self._lib
        d = _fields(lib.blosc2_get_blosc2_cparams_defaults())
        documented = {"compcode": BLOSCLZ, "compcode_meta": 0, "clevel": 5, "use_dict": 0, "typesize": 8,
                      "nthreads": 1, "blocksize": 0, "splitmode": _FORWARD_COMPAT_SPLIT, "schunk": None,
                      "filters": [0, 0, 0, 0, 0, SHUFFLE], "filters_meta": [0] * MAX_FILTERS,
                      "prefilter": None, "preparams": None, "tuner_params": None, "tuner_id": 0,
                      "instr_codec": False, "codec_params": None, "filter_params": [None] * MAX_FILTERS}
        if d != documented:
            return False
        dd = lib.blosc2_get_blosc2_dparams_defaults()
        if (dd.nthreads, dd.schunk, dd.postfilter, dd.postparams) != (1, None, None, None):
            return False
        probe = self._cparams(typesize=4, codec=ZSTD, clevel=3, filt=BITSHUFFLE, nthreads=2)
        ctx = lib.blosc2_create_cctx(probe)
        if not ctx:
            return False
        back = _CParams()
        try:
            rc = lib.blosc2_ctx_get_cparams(ctx, ctypes.byref(back))
        finally:
            lib.blosc2_free_ctx(ctx)
        got = _fields(back)
        return rc == 0 and all(got[k] == v for k, v in _fields(probe).items()
                               if k in ("compcode", "clevel", "typesize", "nthreads", "splitmode", "filters",
                                        "filters_meta", "use_dict", "blocksize"))

    def _cparams(self, *, typesize: int, codec: int, clevel: int, filt: int, nthreads: int) -> _CParams:
        # As python-blosc2's compress2 fills them: its defaults, our codec, level, threads and one filter.
        params = self._lib.blosc2_get_blosc2_cparams_defaults()
        params.compcode, params.compcode_meta, params.clevel = codec, 0, clevel
        params.use_dict, params.typesize, params.nthreads = 0, typesize, nthreads
        params.blocksize, params.splitmode = 0, AUTO_SPLIT
        for i in range(MAX_FILTERS):
            params.filters[i] = 0
            params.filters_meta[i] = 0
        params.filters[0] = filt
        return params

    def compress(self, src: memoryview, *, typesize: int, codec: int, clevel: int, filt: int,
                 nthreads: int) -> bytes:
        lib = self._lib
        src_addr, size, keep = _address(src)
        dest = np.empty(size + MAX_OVERHEAD, np.uint8)
        ctx = lib.blosc2_create_cctx(self._cparams(typesize=typesize, codec=codec, clevel=clevel, filt=filt,
                                                   nthreads=nthreads))
        if not ctx:
            raise RuntimeError("could not create a blosc2 compression context")
        try:
            n = lib.blosc2_compress_ctx(ctx, src_addr, size, int(dest.ctypes.data), dest.nbytes)
        finally:
            lib.blosc2_free_ctx(ctx)
        del keep
        if n <= 0:
            raise RuntimeError(f"blosc2 could not compress the data (error {n})")
        return dest[:n].tobytes()

    def decompress_into(self, chunk: memoryview, dst: np.ndarray, nthreads: int) -> None:
        lib = self._lib
        if not dst.flags.writeable:
            raise ValueError("the destination is read-only")
        src_addr, src_size, keep = _address(chunk)
        dst_addr, dst_size, _ = _address(dst)
        params = lib.blosc2_get_blosc2_dparams_defaults()
        params.nthreads = nthreads
        ctx = lib.blosc2_create_dctx(params)
        if not ctx:
            raise RuntimeError("could not create a blosc2 decompression context")
        try:
            n = lib.blosc2_decompress_ctx(ctx, src_addr, src_size, dst_addr, dst_size)
        finally:
            lib.blosc2_free_ctx(ctx)
        del keep
        if n != dst_size:
            raise ValueError(f"error while decompressing (blosc2 returned {n} for {dst_size} bytes)")

    def cbuffer_sizes(self, chunk: memoryview) -> tuple[int, int, int]:
        addr, size, keep = _address(chunk)
        if size < MAX_OVERHEAD:
            raise ValueError(f"{size} bytes is shorter than a blosc2 header ({MAX_OVERHEAD})")
        nbytes, cbytes, blocksize = _I32(), _I32(), _I32()
        rc = self._lib.blosc2_cbuffer_sizes(addr, ctypes.byref(nbytes), ctypes.byref(cbytes), ctypes.byref(blocksize))
        del keep
        if rc < 0:
            raise ValueError(f"not a blosc2 chunk header (error {rc})")
        return nbytes.value, cbytes.value, blocksize.value


# ------------------------------------------------------------------------------------------ fallback


class PythonBlosc:
    """The same calls through python-blosc2 (imported on first use)."""

    def __init__(self) -> None:
        import blosc2

        self._blosc2 = blosc2
        self.name = f"python-blosc2 {blosc2.__version__}"

    def compress(self, src: memoryview, *, typesize: int, codec: int, clevel: int, filt: int,
                 nthreads: int) -> bytes:
        b = self._blosc2
        return b.compress2(src, typesize=typesize, codec=b.Codec(codec), clevel=clevel, nthreads=nthreads,
                           filters=[b.Filter(filt)], filters_meta=[0], splitmode=b.SplitMode(AUTO_SPLIT))

    def decompress_into(self, chunk: memoryview, dst: np.ndarray, nthreads: int) -> None:
        self._blosc2.decompress2(chunk, dst=dst, nthreads=nthreads)

    def cbuffer_sizes(self, chunk: memoryview) -> tuple[int, int, int]:
        return tuple(self._blosc2.get_cbuffer_sizes(chunk))  # type: ignore[return-value]


BACKEND: Backend = NativeBlosc.load() or PythonBlosc()
