"""The confined child of an unbundle: gunzip and tar checks of a bundle's decrypted stream.

The task process decrypts a bundle (it holds the key) and feeds the plaintext — a gzip stream — to this
program's stdin; zlib and :mod:`tarfile` then read attacker-chosen bytes here, in a child started by
:mod:`appliance.sources.bundle_decrypt` under the decompressor's confinement policy
(:func:`appliance.confine.decompressor`: CPU and address-space limits, no network, an empty private
directory, a parent-death signal, no writable file). It is run by path
(``python -I …/bundle_untar.py --size N --overhead M``) and imports nothing but the standard library, so no
code of the appliance that touches credentials, the network or the task database is loaded beside the
parsers.

What it checks (tar safety as for OVA): the first 512-byte header is a regular file (``0`` or NUL
typeflag: a GNU long name or link, a pax header or a sparse member first is refused before :mod:`tarfile`
reads its body into memory), the member is the only one, a regular file with a plain name (no ``/``,
``..``, NUL) of exactly ``--size`` bytes, the gzip stream is whole (CRC, length) with nothing after it,
and the tar stream is at most ``--size`` + ``--overhead`` bytes (a gzip bomb stops there).

What it sends: stdout carries the **tar stream** as it decompresses, held back until the first header
passed the checks above (so a refused member never reaches the parent); the parent hashes all of it
(the manifest's ``image/digest`` is the SHA-1 of the tar stream) and takes the image from bytes
512 … 512 + size itself. stderr carries one JSON line at the end: ``{"total": N}`` (tar stream bytes) or
``{"error": "BundleInvalid.<kind>", "message": …}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import zlib
from collections.abc import Callable, Iterator

CHUNK = 1 << 20
#: a tar header block, the offset of its typeflag, the typeflags of a regular file (ustar ``0``, old NUL)
TAR_HEADER, TAR_TYPEFLAG, TAR_REGULAR = 512, 156, (b"0", b"\0")


class Refused(Exception):
    """A coded refusal (``BundleInvalid.<kind>``), reported to the parent as the result line."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = f"BundleInvalid.{kind}", message


def gunzipped(read: Callable[[int], bytes]) -> Iterator[bytes]:
    """The decompressed pieces (at most :data:`CHUNK` bytes each) of the one gzip stream ``read`` gives."""
    z = zlib.decompressobj(31)
    try:
        while data := read(CHUNK):
            if z.eof:
                raise Refused("Decrypt", "the bundle has data after its gzip stream")
            while True:
                out = z.decompress(data, CHUNK)
                data = z.unconsumed_tail
                if out:
                    yield out
                elif not data:
                    break
            if z.eof and z.unused_data:
                raise Refused("Decrypt", "the bundle has data after its gzip stream")
        if not z.eof:
            raise Refused("Decrypt", "the bundle's gzip stream is truncated")
    except zlib.error as exc:
        raise Refused(
            "Decrypt", f"the decrypted bundle is not a gzip stream ({exc}): wrong key, or corrupt parts"
        ) from None


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Tee:
    """A ``read()``-able view of the decompressed pieces that counts every byte read, refuses more than
    ``limit``, and sends what was read to ``out`` — held back until :meth:`release`."""

    def __init__(self, pieces: Iterator[bytes], limit: int, out: int) -> None:
        self._pieces, self._buf, self.limit, self.out = pieces, bytearray(), limit, out
        self.count = 0
        self._held: bytearray | None = bytearray()

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buf) < n:
            piece = next(self._pieces, None)
            if piece is None:
                break
            self._buf += piece
        take = len(self._buf) if n < 0 else min(n, len(self._buf))
        data = bytes(self._buf[:take])
        del self._buf[:take]
        self.count += len(data)
        if self.count > self.limit:
            raise Refused(
                "Size",
                f"the bundle unpacks to more than image/size + overhead ({self.limit} bytes) of tar stream",
            )
        if self._held is not None:
            self._held += data
        elif data:
            write_all(self.out, data)
        return data

    def release(self) -> None:
        """From now on every byte read goes straight to ``out`` (what was held first)."""
        if self._held is not None:
            write_all(self.out, self._held)
            self._held = None


class _Replayed:
    """``stream`` with ``head`` (already read from it) put back in front."""

    def __init__(self, head: bytes, stream: Tee) -> None:
        self._head, self._stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if not self._head:
            return self._stream.read(n)
        if n < 0:
            data, self._head = self._head + self._stream.read(), b""
            return data
        data, self._head = self._head[:n], self._head[n:]
        return data


def first_header(stream: Tee) -> bytes:
    """The first 512 bytes; :class:`Refused` when they are not the header of a regular file."""
    head = b""
    while len(head) < TAR_HEADER and (more := stream.read(TAR_HEADER - len(head))):
        head += more
    kind = head[TAR_TYPEFLAG : TAR_TYPEFLAG + 1]
    if len(head) == TAR_HEADER and kind not in TAR_REGULAR:
        raise Refused(
            "Tar",
            f"the bundle's tar stream starts with a {kind!r} header, not a regular file "
            "(long names, pax headers, links and sparse members are refused)",
        )
    return head


def safe_member(member: tarfile.TarInfo, size: int) -> None:
    name = member.name
    if not member.isreg():
        raise Refused(
            "Tar",
            f"the bundle's tar member {name[:80]!r} is not a regular file (links and devices are refused)",
        )
    if not name or "/" in name.rstrip("/") or name in (".", "..") or ".." in name.split("/") or "\0" in name:
        raise Refused("Tar", f"the bundle's tar member name {name[:80]!r} is not a plain file name")
    if member.size != size:
        raise Refused("Size", f"the bundle's tar member holds {member.size} bytes, image/size says {size}")


def untar(stream: Tee, size: int) -> int:
    """Check the tar stream (module docstring), sending it on as it is read; its length."""
    try:
        replayed = _Replayed(first_header(stream), stream)
        with tarfile.open(fileobj=replayed, mode="r|", bufsize=CHUNK) as tar:  # type: ignore[call-overload]
            member = tar.next()
            if member is None:
                raise Refused("Tar", "the bundle's tar stream holds no member")
            safe_member(member, size)
            stream.release()
            if tar.next() is not None:  # reads (and sends) the body on its way to the next header
                raise Refused("Tar", "the bundle's tar stream holds more than one member")
    except tarfile.TarError as exc:
        raise Refused("Tar", f"the bundle's tar stream is not valid: {exc}") from None
    while stream.read(CHUNK):  # the rest of the tar stream (zero blocks, record padding), for the digest
        pass
    if stream.count < TAR_HEADER + size:
        body = max(0, stream.count - TAR_HEADER)
        raise Refused("Size", f"the bundle's tar stream ends after {body} bytes, image/size says {size}")
    return stream.count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bundle_untar")
    parser.add_argument("--size", type=int, required=True, help="image/size: bytes of the one member")
    parser.add_argument("--overhead", type=int, required=True, help="tar stream bytes allowed beyond it")
    args = parser.parse_args(argv)

    def report(obj: dict[str, object]) -> None:
        sys.stderr.write(json.dumps(obj) + "\n")
        sys.stderr.flush()

    stdin = os.fdopen(0, "rb", buffering=0, closefd=False)
    try:
        total = untar(Tee(gunzipped(stdin.read), args.size + args.overhead, 1), args.size)
    except Refused as exc:
        report({"error": exc.code, "message": exc.message})
    except BrokenPipeError:
        return 1  # the parent stopped reading (a failure of its own, or cancelled)
    except MemoryError:
        report(
            {"error": "UnsafeImage.ResourceLimit", "message": "unpacking the bundle needed too much memory"}
        )
    else:
        report({"total": total})
    return 0


if __name__ == "__main__":
    sys.exit(main())
