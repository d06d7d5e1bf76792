"""The decrypted image of a bundle as a stream of chunks (GetDecryptedImage for node controllers).

:func:`open_decrypted` does everything that can fail early before it returns (the manifest is read,
parsed and, with user certificates, verified; the AES key and IV are unwrapped with the cloud key), so a
caller can still answer with an error; then a thread runs the unbundle pipeline
(:func:`.bundle.decrypt_parts`) into a bounded queue. The iterator **holds back the last chunk** until the
pipeline finished and every check passed (part digests, padding, tar safety, size, image digest): a
reader that receives all ``manifest.size`` bytes got an image that passed, and one that is cut short knows
it failed (the HTTP response is shorter than its ``Content-Length``).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Sequence

from cryptography.hazmat.primitives.asymmetric import rsa

from ..config import Limits
from ..errors import Cancelled
from .bundle import BundleLocation
from .bundle_decrypt import decrypt_parts, size_limit
from .bundle_manifest import BundleManifest, parse_bundle_manifest, unwrap, verify_signature

#: chunks (1 MiB each) buffered between the pipeline and a slow reader
QUEUE_CHUNKS = 8
_DONE = object()


class _QueueWriter:
    def __init__(self, q: queue.Queue[object], stop: threading.Event) -> None:
        self.q, self.stop = q, stop

    def write(self, chunk: bytes) -> None:
        while True:
            if self.stop.is_set():
                raise Cancelled("the reader of the decrypted image went away")
            try:
                self.q.put(bytes(chunk), timeout=0.2)
                return
            except queue.Full:
                continue


def open_decrypted(
    location: BundleLocation,
    cloud_key: rsa.RSAPrivateKey,
    *,
    user_keys: Sequence[rsa.RSAPublicKey] = (),
    parallel: int = 4,
    max_bytes: int | None = None,
    limits: Limits | None = None,
) -> tuple[BundleManifest, Generator[bytes, None, None]]:
    """(the manifest, the image's chunks). Raises before returning for a bad manifest, signature, key or
    size; the iterator raises the pipeline's error (``BundleInvalid.*``, ``SourceUnavailable``) instead of
    handing over the last chunk."""
    manifest = parse_bundle_manifest(location.read_manifest())
    if user_keys:
        verify_signature(manifest, user_keys)
    size_limit(manifest.size, max_bytes)
    key = unwrap(manifest.ec2_encrypted_key, cloud_key, "AES key")
    iv = unwrap(manifest.ec2_encrypted_iv, cloud_key, "IV")
    return manifest, _chunks(location, manifest, key, iv, parallel, limits)


def _chunks(
    location: BundleLocation,
    manifest: BundleManifest,
    key: bytes,
    iv: bytes,
    parallel: int,
    limits: Limits | None,
) -> Generator[bytes, None, None]:
    q: queue.Queue[object] = queue.Queue(QUEUE_CHUNKS)
    stop = threading.Event()
    outcome: list[BaseException] = []

    def produce() -> None:
        try:
            decrypt_parts(
                manifest.parts,
                location.read_part,
                key,
                iv,
                _QueueWriter(q, stop),
                size=manifest.size,
                bundled_size=manifest.bundled_size,
                digest=manifest.digest,
                parallel=parallel,
                cancel=stop,
                limits=limits,
            )
        except BaseException as exc:  # handed to the reader's thread
            outcome.append(exc)
        while not stop.is_set():
            try:
                q.put(_DONE, timeout=0.2)
                return
            except queue.Full:
                continue

    thread = threading.Thread(target=produce, name="bundle-stream", daemon=True)
    thread.start()
    held: bytes | None = None
    try:
        while True:
            item = q.get()
            if item is _DONE:
                break
            assert isinstance(item, bytes)
            if held is not None:
                yield held
            held = item
        if outcome:
            raise outcome[0]
        if held is not None:
            yield held
    finally:
        stop.set()
        thread.join(timeout=30)
