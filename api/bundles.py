"""``GET /v1/bundles/decrypted-image?manifest=…``: GetDecryptedImage for node controllers.

An admin key (``role: admin``) names an EC2 image bundle manifest (``s3://bucket/key`` or an http(s)
URL, fetched under ``sources.*``); the answer streams its decrypted image (``application/octet-stream``,
``Content-Length`` = the manifest's ``image/size``), unbundled on the fly with the cloud key of
``bundles.*`` (:mod:`appliance.sources.bundle_stream`). Errors found before the first byte (manifest,
signature, key, size) are JSON errors; a failure later (a part digest, the tar checks, the image digest)
cuts the response short of its ``Content-Length``, since the last chunk is only sent once every check
passed. Like every request, the whole answer must be sent within ``api.timeout``.
"""

from __future__ import annotations

import falcon

from appliance.config import Config
from appliance.errors import UsageError
from appliance.sources.bundle import BundleLocation
from appliance.sources.bundle_manifest import configured_cloud_key
from appliance.sources.bundle_stream import open_decrypted
from appliance.sources.urlfilter import UrlPolicy


class DecryptedImageResource:
    """``GET /v1/bundles/decrypted-image``: the decrypted image of a bundle (admin keys only)."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        if req.context.accounts is not None:
            raise falcon.HTTPForbidden(
                title="AccessDenied", description="only an admin key (role: admin) may read decrypted bundles"
            )
        manifest = req.get_param("manifest") or ""
        if not manifest.lower().startswith(("s3://", "http://", "https://")):
            raise UsageError("manifest must be the s3:// or http(s) URL of a bundle manifest (.manifest.xml)")
        cfg = self.config
        location = BundleLocation(manifest, UrlPolicy.from_config(cfg.sources), cfg.sources.s3)
        bundle, chunks = open_decrypted(
            location,
            configured_cloud_key(cfg.bundles),
            parallel=cfg.bundles.parallel_parts,
            max_bytes=cfg.limits.max_decompressed_size,
        )
        resp.content_type = "application/octet-stream"
        resp.content_length = bundle.size
        resp.set_header("X-Imaging-Bundle-Digest", bundle.digest)
        resp.stream = chunks
