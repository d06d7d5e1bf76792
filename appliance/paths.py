"""Every file and directory the appliance keeps, named in one place.

``state_dir`` (``config.state_dir``) holds the appliance's own state; :class:`StatePaths` names what
lives under it. The fixed paths of the appliance image (where the configuration, the state and the
boot-time error file are) are the module constants. Nothing else in the toolkit spells these names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: the service configuration of an installed appliance (``imaging --config`` overrides it)
SYSTEM_CONFIG = Path("/etc/imaging/imaging.yaml")
#: ``state_dir`` of the appliance image (user data cannot move it)
IMAGE_STATE_DIR = Path("/var/lib/imaging")
#: written by ``imaging configure`` when the user data is invalid: keeps the services from starting
CONFIG_ERROR_FILE = Path("/run/imaging/config-error.json")
#: the name, next to the config error file (``/run/imaging``), of the flag ``imaging configure`` keeps
#: while ``limits.task_io_weight`` is set: the image's udev rule then selects the BFQ IO scheduler
IO_WEIGHT_FLAG_NAME = "io-weight"
#: the rendezvous line an image may carry (``imaging:v1::<controller-url>:<enrolment-secret>``), read
#: by ``imaging configure`` when the instance has no user data
BAKED_RENDEZVOUS = Path("/etc/imaging/rendezvous")


def default_state_dir() -> Path:
    """``state_dir`` of the embedded defaults: ``$XDG_STATE_HOME/imaging`` (``~/.local/state/imaging``)."""
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "imaging"


@dataclass(frozen=True)
class StatePaths:
    """What lives under one ``state_dir``."""

    root: Path

    @property
    def db(self) -> Path:
        """The task database (SQLite): tasks, steps, events, the cleanup ledger, the report outbox."""
        return self.root / "imaging.db"

    @property
    def worker_heartbeat(self) -> Path:
        """The worker's heartbeat, rewritten every poll (:mod:`appliance.service.heartbeat`)."""
        return self.root / "worker.json"

    @property
    def config_announced(self) -> Path:
        """The newest configuration version the controller announced in a report reply (live updates:
        ``imaging reconfigure --watch`` fetches it at once instead of at its next poll)."""
        return self.root / "config-announced"

    @property
    def mounts(self) -> Path:
        """Records of guest mounts and loop devices, written before each is made (crash sweeps)."""
        return self.root / "mounts"

    @property
    def scratch(self) -> Path:
        """Default ``scratch.root``: per-task scratch directories under the shared quota."""
        return self.root / "scratch"

    @property
    def uploads(self) -> Path:
        """Default ``sources.upload.directory``: staged uploads, one directory per account and upload."""
        return self.root / "uploads"

    @property
    def cache(self) -> Path:
        """Default ``artifacts.cache_dir``: verified files by digest (``sha256/<hex>``), artifact indexes."""
        return self.root / "cache"

    @property
    def volumes(self) -> Path:
        """Default directory of the ``file`` volume target: one sparse RAW file per volume."""
        return self.root / "volumes"

    @property
    def images(self) -> Path:
        """Default directory of the ``file`` image target."""
        return self.root / "images"


#: the state of the appliance image
IMAGE_STATE = StatePaths(IMAGE_STATE_DIR)
