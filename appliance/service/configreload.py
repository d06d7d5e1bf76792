"""Live configuration: the worker re-reads its configuration file between polls when it changed
(:mod:`appliance.boot.live` writes it). :class:`ConfigReload` is the part of
:class:`~.worker.Worker` that decides what a new file changes: the concurrency and poll interval at
once, the reporter on its next restart, per-task caps only at the next worker start; a file that
does not load, or that moves ``state_dir`` or the task database, is refused."""

from __future__ import annotations

import logging
import os

from .. import config as config_mod
from ..errors import ImagingError
from .taskcgroup import TaskCaps

log = logging.getLogger(__name__)


class ConfigReload:
    """Re-reading the configuration file (the state is the :class:`~.worker.Worker`'s)."""

    config: config_mod.Config
    concurrency: int
    #: ``--concurrency``: it wins over the configuration file, also after a reload
    concurrency_override: int | None
    #: the controller section changed: the reporter restarts on the new one
    reporter_stale: bool
    caps: TaskCaps
    #: (inode, mtime, size) of the configuration file as it was last read
    _config_stamp: tuple[int, int, int] | None

    def _stamp(self) -> tuple[int, int, int] | None:
        if self.config.source is None:
            return None
        try:
            st = os.stat(self.config.source)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def reload_config(self) -> bool:
        """Re-read the configuration file if it changed since it was read; True when it was taken."""
        stamp = self._stamp()
        if stamp is None or stamp == self._config_stamp or self.config.source is None:
            return False
        self._config_stamp = stamp
        try:
            new = config_mod.load(self.config.source)
        except ImagingError as exc:
            log.error(
                "configuration %s changed but does not load; keeping the running one: %s",
                self.config.source,
                exc.message,
            )
            return False
        if new.state_dir != self.config.state_dir:
            log.error(
                "configuration %s moves state_dir: that needs a restart; keeping the running one",
                self.config.source,
            )
            return False
        if new.store != self.config.store:
            log.error(
                "configuration %s moves the task database: that needs a worker restart (its claims and "
                "leases are in the running one); keeping the running configuration",
                self.config.source,
            )
            return False
        if new.controller != self.config.controller or (new.controller.mode == "pull" and new != self.config):
            # A pull reporter creates the imports it is handed with the configuration it was started
            # with (sources, targets, limits): any change restarts it, not only the controller section.
            self.reporter_stale = True
        if TaskCaps.from_config(new.worker) != self.caps:
            log.warning("per-task caps changed: they apply from the next worker start")
        self.config = new
        self.concurrency = self.concurrency_override or new.worker.concurrency
        log.info("configuration %s reloaded: concurrency %d", new.source, self.concurrency)
        return True
