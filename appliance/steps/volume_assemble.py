"""``volume.import``'s path for the VMDK/VHD subformats that do not stream (random access): the
upload assembled in scratch, part by part, inspected there and converted by qemu-img onto the volume.

An assembly is resumed only where its scratch is: its checkpoint names the assembly file by a token
kept beside it, and another appliance (or a scratch that is gone) assembles it again from part 0.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

from ..image.convert import convert_image
from ..image.inspect import inspect_image, require_safe
from ..nospace import is_no_space, no_space_error
from ..progress import StageMeter
from ..sources.digest import StreamDigest
from ..sources.manifest import ImportManifest, Part
from ..targets.base import Volume, insufficient_storage
from ..targets.rawio import RawWriter
from ..workflow.step import StepContext
from .meters import convert_meter, scaled
from .volume import GiB, InsufficientVolumeSize
from .volume_upload import download_upload, save_part_checkpoint, upload_source

#: beside an upload assembled in scratch: the token its checkpoints name (another scratch has another)
_UPLOAD_TOKEN = "upload.token"


def import_via_scratch(
    ctx: StepContext,
    m: ImportManifest,
    format: str,
    vol: Volume,
    state: dict[str, Any],
) -> dict[str, Any]:
    """An upload of a random-access VMDK/VHD subformat onto the volume: its parts assembled (each
    verified, checkpointed after each) into a file in scratch, inspected there, then converted by
    qemu-img onto the volume; ``InsufficientScratch`` when scratch fills up while it is assembled,
    ``InsufficientStorage`` when the volume's storage does."""
    upload = ctx.workdir / f"upload.{format.lower()}"
    marker = ctx.workdir / _UPLOAD_TOKEN
    # Made again on every run: the engine released this step's reservations when it was interrupted.
    reservation = ctx.scratch.reserve(m.size, f"assembling the {format} upload")
    doing = f"assembling the {format} upload"
    token = marker.read_text().strip() if marker.exists() and upload.exists() else None
    if token is None or state.get("upload") != token:
        # the checkpoint names an assembly in another scratch (a dead appliance's), or none: from
        # part 0 into a new file
        upload.unlink(missing_ok=True)
        token = secrets.token_hex(8)
        marker.write_text(token + "\n")
        state = {"next": 0, "done": 0}
    # parts already verified stay: the file is reopened, never truncated (a fresh one reads as zeros)
    fresh_upload = not upload.exists()
    with RawWriter(
        upload,
        zeroed=fresh_upload,
        create=True,
        error=lambda exc: no_space_error(upload.parent, doing) if is_no_space(exc) else None,
    ) as out:
        # the assembly is the first half of the task; its bytes go to scratch, not to the volume
        meter = StageMeter(
            "downloading",
            m.size,
            scaled(ctx.progress, (0.0, 50.0), converted=False),
            read=state["done"],
            written=state["done"],
        )

        def write(offset: int, chunk: bytes | memoryview) -> None:
            meter.read(offset + len(chunk))
            out.write(offset, chunk)
            meter.wrote(offset + len(chunk))

        def on_part(part: Part, done: int) -> None:
            save_part_checkpoint(ctx, part, done, {"upload": token})
            meter.wrote(done)

        # a resumed assembly: the verified parts already in the file are hashed from there
        digest = StreamDigest()
        for offset in range(0, state["done"], 1 << 20):
            digest.update(out.read(offset, min(1 << 20, state["done"] - offset)))
        with meter:
            download_upload(ctx, m, write, start_index=state["next"], on_part=on_part, digest=digest)
            out.flush()
        meter.flushed()
    ctx.progress({"phase": "validating", "done": 0})
    source = require_safe(
        inspect_image(
            upload, format.lower(), config=ctx.config, workdir=ctx.workdir, cancel=ctx.cancel, ledger=ctx
        )
    )
    if source.virtual_size and source.virtual_size > vol.size:
        raise InsufficientVolumeSize(
            f"the {format} image's virtual size is {source.virtual_size} bytes but volume {vol.id} holds "
            f"{vol.size}; import it into a volume of at least {-(-source.virtual_size // GiB)} GiB"
        )

    # the second half: bytes read from the assembly and written to the volume, rate and ETA;
    # 100 % only once the volume is flushed
    convert, on_convert = convert_meter(ctx.progress, upload.stat().st_size, scale=(50.0, 50.0))
    with convert:
        result = convert_image(
            upload,
            vol.path,
            "raw",
            format.lower(),
            config=ctx.config,
            workdir=ctx.workdir,
            on_progress=on_convert,
            cancel=ctx.cancel,
            ledger=ctx,
            # qemu-img writes onto the volume's storage, not into scratch
            no_space=lambda _where, doing: insufficient_storage(f"volume {vol.id} ({vol.path})", doing),
        )
    convert.flushed()  # convert_image flushed the volume before it returned
    if not result.block_device:
        # qemu-img wrote a new file of the image's virtual size: give it the volume's size and mode.
        os.chmod(vol.path, 0o600)
        if os.stat(vol.path).st_size < vol.size:
            os.truncate(vol.path, vol.size)
    upload.unlink(missing_ok=True)
    marker.unlink(missing_ok=True)
    ctx.scratch.release(reservation)
    return {
        "bytes_written": result.virtual_size,
        "format": format,
        "virtual_size": result.virtual_size,
        "streamed": False,
        "source": upload_source(m, digest),
    }
