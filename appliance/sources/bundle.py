"""Unbundling an EC2 image bundle: parts fetched in parallel → AES-128-CBC → gunzip → untar, one stream.

A bundle (``ec2-bundles.md``) is a manifest (:mod:`.bundle_manifest`) and encrypted parts stored beside
it. :func:`unbundle_to_file` reads the manifest from a local path, ``s3://bucket/key`` or an http(s) URL,
verifies its signature when user certificates are given, unwraps the AES key and IV with the cloud's
private key, fetches the parts ``parallel`` at a time (:func:`.ordered.ordered_fetch`, memory bounded by
``parallel + 1`` parts), checks each part's SHA-1 before a byte of it is used, and runs decrypt →
gunzip → tar as one stream with a SHA-1 tap over the tar stream (the manifest's ``image/digest``).

Tar safety as for OVA: exactly one member, a regular file, with a plain name (no ``/``, ``..``, NUL),
of exactly ``image/size`` bytes; the decompressed stream may not exceed ``image/size`` + 1 MiB of tar
overhead (a gzip bomb stops there). The image is written to a partial beside the output and renamed into
place only once every check passed: on any failure nothing is left (:mod:`appliance.partials`).
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import threading
import urllib.parse
import zlib
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ..errors import BundleInvalid, Finding, ImageRejected
from ..partials import Ledger, partial_file, publish
from ..redact import redact_url
from . import s3 as s3mod
from .bundle_manifest import (
    MAX_BUNDLE_MANIFEST_BYTES,
    BundleManifest,
    BundlePart,
    parse_bundle_manifest,
    unwrap,
    verify_signature,
)
from .http import HttpClient, SourceUnavailable
from .ordered import LinkedEvent, ordered_fetch
from .urlfilter import UrlPolicy, parse_s3_url

CHUNK = 1 << 20
#: tar headers, end-of-archive blocks and record padding allowed beyond ``image/size``
TAR_OVERHEAD = 1 << 20
#: the largest part accepted (euca2ools and the AWS tools write 10 MiB parts)
MAX_PART_BYTES = 64 << 20


@dataclass(frozen=True)
class UnbundleResult:
    path: Path
    size: int
    sha256: str
    #: the tar stream's SHA-1, as the manifest's ``image/digest``
    digest: str
    name: str
    parts: int


# --------------------------------------------------------------------------------------------- locations


class BundleLocation:
    """Where a manifest and its parts are: a directory, an S3 prefix or an http(s) URL's directory."""

    def __init__(
        self,
        manifest: str,
        policy: UrlPolicy,
        s3cfg: Mapping[str, Any] | None = None,
        *,
        http: HttpClient | None = None,
        s3_client: Any = None,
        cancel: threading.Event | None = None,
    ) -> None:
        self.manifest, self.policy, self.cancel = manifest, policy, cancel
        lowered = manifest.lower()
        if lowered.startswith("s3://"):
            self.kind = "s3"
            self.bucket, self.key = parse_s3_url(manifest)
            cfg = s3cfg if s3cfg is not None else (policy.sources.s3 if policy.sources else {})
            self.s3 = s3_client or s3mod.s3_client(cfg, policy, max_pool_connections=16)
        elif lowered.startswith(("http://", "https://")):
            self.kind = "http"
            self.http = http or HttpClient(policy)
        else:
            self.kind = "file"
            self.path = Path(manifest)

    def __str__(self) -> str:
        return redact_url(self.manifest) if self.kind == "http" else self.manifest

    def _read(self, where: str, limit: int, stop: threading.Event | None = None) -> bytes:
        cancel = stop or self.cancel
        if self.kind == "file":
            try:
                with open(where, "rb") as f:
                    return f.read(limit + 1)
            except OSError as exc:
                raise SourceUnavailable(f"cannot read {where}: {exc.strerror}") from None
        if self.kind == "s3":
            bucket, key = parse_s3_url(where)
            with s3mod.open_object(self.s3, bucket, key, cancel=cancel) as stream:
                return _bounded(stream.iter_chunks(), limit)
        with self.http.get_stream(where, cancel=cancel) as response:
            if response.status != 200:
                raise SourceUnavailable(
                    f"{redact_url(where)} answered HTTP {response.status}", status=response.status
                )
            return _bounded(response.iter_chunks(), limit)

    def read_manifest(self) -> bytes:
        data = self._read(self.manifest, MAX_BUNDLE_MANIFEST_BYTES)
        if len(data) > MAX_BUNDLE_MANIFEST_BYTES:
            raise BundleInvalid(
                "Manifest", f"the bundle manifest is larger than {MAX_BUNDLE_MANIFEST_BYTES} bytes"
            )
        return data

    def part(self, filename: str) -> str:
        """Where the part ``filename`` (a plain name, checked by the manifest parser) is."""
        if self.kind == "file":
            return str(self.path.parent / filename)
        if self.kind == "s3":
            prefix = self.key.rsplit("/", 1)[0] + "/" if "/" in self.key else ""
            return f"s3://{self.bucket}/{prefix}{filename}"
        split = urllib.parse.urlsplit(self.manifest)
        path = split.path.rsplit("/", 1)[0] + "/" + urllib.parse.quote(filename)
        return urllib.parse.urlunsplit(split._replace(path=path, query="", fragment=""))

    def read_part(self, part: BundlePart, stop: threading.Event) -> bytes:
        return check_part(part, self._read(self.part(part.filename), MAX_PART_BYTES, stop))


def _bounded(chunks: Iterator[bytes], limit: int) -> bytes:
    out = bytearray()
    for chunk in chunks:
        out += chunk
        if len(out) > limit:
            break
    return bytes(out)


# --------------------------------------------------------------------------------------------- the stream


class _Tapped:
    """A read()-able view of a chunk generator, hashing (SHA-1) and counting every byte it yields."""

    def __init__(self, chunks: Iterator[bytes], limit: int) -> None:
        self._chunks, self._buf, self.limit = chunks, b"", limit
        self.sha1 = hashlib.sha1()
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buf) < n:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buf += chunk
        out, self._buf = (self._buf, b"") if n < 0 else (self._buf[:n], self._buf[n:])
        self.count += len(out)
        if self.count > self.limit:
            raise BundleInvalid(
                "Size", f"the bundle unpacks to more than image/size + {TAR_OVERHEAD} bytes of tar stream"
            )
        self.sha1.update(out)
        return out


def _decrypted(ciphertexts: Iterator[bytes], key: bytes, iv: bytes) -> Generator[bytes, None, None]:
    decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    unpadder = sym_padding.PKCS7(128).unpadder()
    for data in ciphertexts:
        yield unpadder.update(decryptor.update(data))
    try:
        yield unpadder.update(decryptor.finalize()) + unpadder.finalize()
    except ValueError:
        raise BundleInvalid(
            "Decrypt", "the bundle's ciphertext does not decrypt (bad padding): wrong key, or corrupt parts"
        ) from None


def _gunzipped(compressed: Iterator[bytes]) -> Generator[bytes, None, None]:
    z = zlib.decompressobj(31)
    try:
        for data in compressed:
            if z.eof:
                if data:
                    raise BundleInvalid("Decrypt", "the bundle has data after its gzip stream")
                continue
            while True:
                out = z.decompress(data, CHUNK)
                data = z.unconsumed_tail
                if out:
                    yield out
                elif not data:
                    break
        if not z.eof or z.unused_data:
            raise BundleInvalid("Decrypt", "the bundle's gzip stream is truncated or followed by other data")
    except zlib.error as exc:
        raise BundleInvalid(
            "Decrypt", f"the decrypted bundle is not a gzip stream ({exc}): wrong key, or corrupt parts"
        ) from None


def _safe_member(member: tarfile.TarInfo, size: int) -> None:
    name = member.name
    if not member.isreg():
        raise BundleInvalid(
            "Tar",
            f"the bundle's tar member {name[:80]!r} is not a regular file (links and devices are refused)",
        )
    if not name or "/" in name.rstrip("/") or name in (".", "..") or ".." in name.split("/") or "\0" in name:
        raise BundleInvalid("Tar", f"the bundle's tar member name {name[:80]!r} is not a plain file name")
    if member.size != size:
        raise BundleInvalid(
            "Size", f"the bundle's tar member holds {member.size} bytes, image/size says {size}"
        )


#: tar typeflags of a regular file (ustar ``0``, old tar NUL), at byte 156 of a 512-byte header.
#: Anything else first — a GNU long name or link (``L``/``K``), a pax header (``x``/``g``), a sparse
#: member (``S``) — is refused before :mod:`tarfile` reads its body into memory: a bundle holds one
#: regular member with a short plain name, and those headers' bodies are bounded only by the stream
_TAR_HEADER, _TAR_TYPEFLAG, _TAR_REGULAR = 512, 156, (b"0", b"\0")


class _Replayed:
    """``stream`` with ``head`` (already read from it) put back in front."""

    def __init__(self, head: bytes, stream: _Tapped) -> None:
        self._head, self._stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if not self._head:
            return self._stream.read(n)
        if n < 0:
            data, self._head = self._head + self._stream.read(), b""
            return data
        data, self._head = self._head[:n], self._head[n:]
        return data


def _first_header(stream: _Tapped) -> bytes:
    head = b""
    while len(head) < _TAR_HEADER and (more := stream.read(_TAR_HEADER - len(head))):
        head += more
    if len(head) == _TAR_HEADER and head[_TAR_TYPEFLAG : _TAR_TYPEFLAG + 1] not in _TAR_REGULAR:
        kind = head[_TAR_TYPEFLAG : _TAR_TYPEFLAG + 1]
        raise BundleInvalid(
            "Tar",
            f"the bundle's tar stream starts with a {kind!r} header, not a regular file "
            "(long names, pax headers, links and sparse members are refused)",
        )
    return head


def _untar(
    stream: _Tapped, size: int, out: Any, on_progress: Callable[[int], None] | None
) -> tuple[int, str]:
    sha256, written = hashlib.sha256(), 0
    try:
        replayed = _Replayed(_first_header(stream), stream)
        with tarfile.open(fileobj=replayed, mode="r|") as tar:  # type: ignore[call-overload]
            member = tar.next()
            if member is None:
                raise BundleInvalid("Tar", "the bundle's tar stream holds no member")
            _safe_member(member, size)
            body = tar.extractfile(member)
            assert body is not None
            while chunk := body.read(CHUNK):
                out.write(chunk)
                sha256.update(chunk)
                written += len(chunk)
                if on_progress is not None:
                    on_progress(written)
            if tar.next() is not None:
                raise BundleInvalid("Tar", "the bundle's tar stream holds more than one member")
    except tarfile.TarError as exc:
        raise BundleInvalid("Tar", f"the bundle's tar stream is not valid: {exc}") from None
    while stream.read(CHUNK):  # the rest of the tar stream (zero blocks, record padding) for the digest
        pass
    if written != size:
        raise BundleInvalid("Size", f"the bundle unpacked to {written} bytes, image/size says {size}")
    return written, sha256.hexdigest()


def check_part(part: BundlePart, data: bytes) -> bytes:
    """``data`` when it is the part the manifest digests; ``BundleInvalid.PartDigest`` otherwise."""
    if len(data) > MAX_PART_BYTES:
        raise BundleInvalid("Size", f"bundle part {part.index} is larger than {MAX_PART_BYTES} bytes")
    if hashlib.sha1(data).hexdigest() != part.sha1:
        raise BundleInvalid(
            "PartDigest",
            f"bundle part {part.index} does not match its SHA1 digest in the manifest: it is corrupt or was "
            "replaced",
        )
    return data


def size_limit(size: int, max_bytes: int | None) -> None:
    """``SizeLimitExceeded.Download`` when the image is larger than ``max_bytes``."""
    if max_bytes is not None and size > max_bytes:
        raise ImageRejected(
            [
                Finding.error(
                    "SizeLimitExceeded.Download",
                    f"the bundle's image is {size} bytes, over the limit of {max_bytes} bytes",
                )
            ]
        )


def decrypt_parts(
    parts: Sequence[BundlePart],
    read_part: Callable[[BundlePart, threading.Event], bytes],
    key: bytes,
    iv: bytes,
    out: Any,
    *,
    size: int,
    bundled_size: int,
    digest: str | None,
    parallel: int = 4,
    cancel: threading.Event | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[int, str, str]:
    """Fetch ``parts`` (``read_part(part, stop)`` returns its checked bytes) ``parallel`` at a time, and
    write the image they hold to ``out`` (``write(bytes)``); (bytes, SHA-256, tar SHA-1). ``digest`` is
    the tar stream's expected SHA-1 (None: not checked, as for Eucalyptus download manifests)."""
    stop = LinkedEvent(cancel)
    fetched = ordered_fetch(
        parts,
        lambda part: read_part(part, stop),
        parallel=max(1, parallel),
        cancel=cancel,
        stop=stop,
        name="bundle-part",
    )
    total = 0

    def ciphertexts() -> Generator[bytes, None, None]:
        nonlocal total
        for _part, data in fetched:
            total += len(data)
            if total > bundled_size:
                raise BundleInvalid("Size", "the bundle's parts hold more bytes than its manifest says")
            yield data
        if total != bundled_size:
            raise BundleInvalid(
                "Size", f"the bundle's parts hold {total} bytes, the manifest says {bundled_size}"
            )

    tapped = _Tapped(_gunzipped(_decrypted(ciphertexts(), key, iv)), size + TAR_OVERHEAD)
    try:
        written, sha256 = _untar(tapped, size, out, on_progress)
    finally:
        fetched.close()
    found = tapped.sha1.hexdigest()
    if digest is not None and found != digest:
        raise BundleInvalid(
            "Digest", "the unbundled tar stream does not match the manifest's image/digest (SHA1)"
        )
    return written, sha256, found


def unbundle_stream(
    location: BundleLocation,
    manifest: BundleManifest,
    cloud_key: rsa.RSAPrivateKey,
    out: Any,
    *,
    parallel: int = 4,
    max_bytes: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[int, str, str]:
    """Write the image of ``manifest`` to the binary file ``out``; (bytes, SHA-256, tar SHA-1)."""
    size_limit(manifest.size, max_bytes)
    key = unwrap(manifest.ec2_encrypted_key, cloud_key, "AES key")
    iv = unwrap(manifest.ec2_encrypted_iv, cloud_key, "IV")
    return decrypt_parts(
        manifest.parts,
        location.read_part,
        key,
        iv,
        out,
        size=manifest.size,
        bundled_size=manifest.bundled_size,
        digest=manifest.digest,
        parallel=parallel,
        cancel=location.cancel,
        on_progress=on_progress,
    )


def unbundle_to_file(
    location: BundleLocation,
    cloud_key: rsa.RSAPrivateKey,
    dst: Path,
    *,
    user_keys: Sequence[rsa.RSAPublicKey] = (),
    parallel: int = 4,
    max_bytes: int | None = None,
    ledger: Ledger | None = None,
    on_progress: Callable[[int], None] | None = None,
    reserve: Callable[[int], None] | None = None,
) -> UnbundleResult:
    """Unbundle the bundle at ``location`` into ``dst`` (published only when every check passed).
    ``reserve(image_size)`` is called once the (verified) manifest says how large the image is.

    Raises :class:`BundleInvalid`, :class:`SourceUnavailable`, ``ImageRejected`` (size limit)."""
    manifest = parse_bundle_manifest(location.read_manifest())
    if user_keys:
        verify_signature(manifest, user_keys)
    if (max_bytes is None or manifest.size <= max_bytes) and reserve is not None:
        reserve(manifest.size)
    with partial_file(dst, ledger) as tmp:
        with open(tmp, "wb") as out:
            written, sha256, digest = unbundle_stream(
                location,
                manifest,
                cloud_key,
                out,
                parallel=parallel,
                max_bytes=max_bytes,
                on_progress=on_progress,
            )
            out.flush()
            os.fsync(out.fileno())
        publish(tmp, dst)
    return UnbundleResult(dst, written, sha256, digest, manifest.name, len(manifest.parts))
