"""``GET /v1/bundles/decrypted-image?manifest=…``: GetDecryptedImage for node controllers.

An admin key (``role: admin``) names an EC2 image bundle manifest (``s3://bucket/key`` or an http(s)
URL, fetched under ``sources.*``); the answer streams its decrypted image (``application/octet-stream``,
``Content-Length`` = the manifest's ``image/size``), unbundled on the fly with the cloud key of
``bundles.*`` (:mod:`appliance.sources.bundle_stream`).

The rule, as Walrus' GetDecryptedImage had it (``ec2-bundles.md`` §8), made explicit:

* **the signature is required**: the manifest must verify (SHA1withRSA over its raw
  ``<machine_configuration>`` + ``<image>``) against one of ``bundles.signer_certs`` (the owners', the
  cloud's, the node controllers' certificates); unsigned or not verifying: 422 ``BundleInvalid.Signature``;
  none configured: 503 ``InvalidConfiguration`` (the route serves nothing it cannot authenticate). The
  part digests and the image digest come from the signed bytes, so a manifest or part fetched over plain
  ``http://`` cannot be changed unnoticed;
* **the plaintext never travels in clear**: the decrypted image is what the bundle's encryption
  protected, so it is sent only over TLS (``api.tls``, or a TLS proxy gunicorn trusts for
  ``X-Forwarded-Proto``) or to a loopback client; a plain-http request from elsewhere: 403
  ``InsecureTransport``, before anything is read.

Errors found before the first byte (manifest, signature, key, size) are JSON errors; a failure later (a
part digest, the tar checks, the image digest) cuts the response short of its ``Content-Length``, since
the last chunk is only sent once every check passed. Like every request, the whole answer must be sent
within ``api.timeout``.
"""

from __future__ import annotations

import ipaddress

import falcon

from appliance.config import Config
from appliance.errors import ConfigError, ImagingError, UsageError
from appliance.sources.bundle import BundleLocation
from appliance.sources.bundle_manifest import configured_cloud_key, configured_signer_keys
from appliance.sources.bundle_stream import open_decrypted
from appliance.sources.urlfilter import UrlPolicy

INSECURE_TRANSPORT = "InsecureTransport"


def is_loopback(address: str) -> bool:
    """Whether the peer address is a loopback address (127.0.0.0/8, ::1, ::ffff:127.x)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


class DecryptedImageResource:
    """``GET /v1/bundles/decrypted-image``: the decrypted image of a bundle (admin keys only)."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        if req.context.accounts is not None:
            raise falcon.HTTPForbidden(
                title="AccessDenied", description="only an admin key (role: admin) may read decrypted bundles"
            )
        if req.scheme != "https" and not is_loopback(req.remote_addr):
            raise ImagingError(
                "the decrypted image of a bundle is sent only over HTTPS (api.tls) or to a loopback client: "
                "this request came over plain http",
                code=INSECURE_TRANSPORT,
            )
        manifest = req.get_param("manifest") or ""
        if not manifest.lower().startswith(("s3://", "http://", "https://")):
            raise UsageError("manifest must be the s3:// or http(s) URL of a bundle manifest (.manifest.xml)")
        cfg = self.config
        signers = configured_signer_keys(cfg.bundles)
        if not signers:
            raise ConfigError(
                "GetDecryptedImage serves only bundles whose manifest signature verifies, and no signer "
                "certificate is configured (bundles.signer_certs or bundles.signer_certs_file)"
            )
        location = BundleLocation(manifest, UrlPolicy.from_config(cfg.sources), cfg.sources.s3)
        bundle, chunks = open_decrypted(
            location,
            configured_cloud_key(cfg.bundles),
            user_keys=signers,
            parallel=cfg.bundles.parallel_parts,
            max_bytes=cfg.limits.max_decompressed_size,
            limits=cfg.limits,
        )
        resp.content_type = "application/octet-stream"
        resp.content_length = bundle.size
        resp.set_header("X-Imaging-Bundle-Digest", bundle.digest)
        resp.stream = chunks
