"""SHA-256 and MD5 whose running state can be saved and loaded again: the digest of a resumed stream.

hashlib's objects cannot be serialized, so a stream that resumes after its process was killed could
not give the digest of the whole source without fetching its first part again. :class:`SavedHash` runs
the same code hashlib runs (OpenSSL's libcrypto: SHA-NI where the CPU has it, the GIL released during
each update) through libcrypto's plain ``SHA256_*`` / ``MD5_*`` functions, whose context is a small
public struct (``openssl/sha.h``, ``openssl/md5.h``). :meth:`SavedHash.state` is that struct as hex,
:meth:`SavedHash.load` puts it back after checking it: the counters the C code indexes its block buffer
with, and the byte count (which must be the stream offset the caller says the state is at), so a
tampered state can neither make OpenSSL write outside the context nor pass for another offset.

:func:`available` is False where libcrypto or those functions are missing, or where they do not
compute what hashlib computes (checked once); callers then treat the digest of a resumed stream as
unknown.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
from typing import Any

#: bytes of one hash block (both algorithms)
_BLOCK = 64
_LIBRARIES = ("libcrypto.so.3", "libcrypto.so")


class _Sha256Ctx(ctypes.Structure):
    # typedef struct SHA256state_st { SHA_LONG h[8]; SHA_LONG Nl, Nh; SHA_LONG data[16];
    #                                 unsigned int num, md_len; } SHA256_CTX;
    _fields_ = [
        ("h", ctypes.c_uint32 * 8),
        ("Nl", ctypes.c_uint32),
        ("Nh", ctypes.c_uint32),
        ("data", ctypes.c_uint32 * 16),
        ("num", ctypes.c_uint32),
        ("md_len", ctypes.c_uint32),
    ]


class _Md5Ctx(ctypes.Structure):
    # typedef struct MD5state_st { MD5_LONG A, B, C, D; MD5_LONG Nl, Nh; MD5_LONG data[16];
    #                              unsigned int num; } MD5_CTX;
    _fields_ = [
        ("A", ctypes.c_uint32),
        ("B", ctypes.c_uint32),
        ("C", ctypes.c_uint32),
        ("D", ctypes.c_uint32),
        ("Nl", ctypes.c_uint32),
        ("Nh", ctypes.c_uint32),
        ("data", ctypes.c_uint32 * 16),
        ("num", ctypes.c_uint32),
    ]


#: name → (context struct, OpenSSL prefix, digest bytes)
_ALGORITHMS: dict[str, tuple[type[ctypes.Structure], str, int]] = {
    "sha256": (_Sha256Ctx, "SHA256", 32),
    "md5": (_Md5Ctx, "MD5", 16),
}


@functools.cache
def _lib() -> Any:
    """libcrypto with the functions' signatures declared, or None."""
    names = [n for n in (ctypes.util.find_library("crypto"), *_LIBRARIES) if n]
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            for _ctx, prefix, _size in _ALGORITHMS.values():
                init, update, final = (getattr(lib, f"{prefix}_{f}") for f in ("Init", "Update", "Final"))
                init.argtypes, init.restype = [ctypes.c_void_p], ctypes.c_int
                update.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
                update.restype = ctypes.c_int
                final.argtypes, final.restype = [ctypes.c_char_p, ctypes.c_void_p], ctypes.c_int
        except (OSError, AttributeError):
            continue
        return lib
    return None


@functools.cache
def available() -> bool:
    """Whether saved hashes work here: libcrypto has the functions and they agree with hashlib."""
    if _lib() is None:
        return False
    sample = bytes(range(256)) * 9 + b"tail"
    for name in _ALGORITHMS:
        h = SavedHash(name)
        h.update(sample[:100])
        copy = SavedHash(name)
        copy.load(h.state(), 100)
        copy.update(sample[100:])
        if copy.hexdigest() != hashlib.new(name, sample).hexdigest():
            return False
    return True


class SavedHash:
    """One running digest (``sha256`` or ``md5``) whose state can be saved (see the module docstring).
    Only where :func:`available` is true."""

    def __init__(self, name: str) -> None:
        if name not in _ALGORITHMS:
            raise ValueError(f"no saved hash {name!r}")
        lib = _lib()
        if lib is None:
            raise RuntimeError("libcrypto is not available for saved hashes")
        self.name = name
        ctx_type, prefix, self._size = _ALGORITHMS[name]
        self._ctx = ctx_type()
        self._update = getattr(lib, f"{prefix}_Update")
        self._final = getattr(lib, f"{prefix}_Final")
        getattr(lib, f"{prefix}_Init")(ctypes.byref(self._ctx))

    def update(self, data: bytes) -> None:
        self._update(ctypes.byref(self._ctx), data, len(data))

    @property
    def length(self) -> int:
        """Bytes hashed so far."""
        return ((self._ctx.Nh << 32) | self._ctx.Nl) >> 3

    def hexdigest(self) -> str:
        """The digest of what was hashed so far (the running state is kept)."""
        ctx = type(self._ctx).from_buffer_copy(self._ctx)
        out = ctypes.create_string_buffer(self._size)
        self._final(out, ctypes.byref(ctx))
        return out.raw.hex()

    def state(self) -> str:
        """The running state, as hex (JSON-able)."""
        return bytes(self._ctx).hex()

    def load(self, state: str, length: int) -> None:
        """Put back a :meth:`state` that hashed exactly ``length`` bytes. ValueError for anything else
        (nothing of it is loaded then)."""
        try:
            raw = bytes.fromhex(state)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"a saved {self.name} state is not hex") from exc
        if len(raw) != ctypes.sizeof(self._ctx):
            raise ValueError(f"a saved {self.name} state of {len(raw)} bytes, not {ctypes.sizeof(self._ctx)}")
        ctx = type(self._ctx).from_buffer_copy(raw)
        bits = (ctx.Nh << 32) | ctx.Nl
        num = ctx.num
        # num indexes the block buffer in OpenSSL's update: it must stay inside it
        if num >= _BLOCK or bits % 8 or (bits >> 3) % _BLOCK != num:
            raise ValueError(f"a saved {self.name} state whose counters do not fit together")
        if bits >> 3 != length:
            raise ValueError(f"a saved {self.name} state of {bits >> 3} bytes, not of the {length} expected")
        if self.name == "sha256" and ctx.md_len != self._size:
            raise ValueError("a saved sha256 state of another digest length")
        self._ctx = ctx
