"""Which configured hooks need root: the ones that mount the guest (loop devices, mount, chroot).

The worker of the appliance image runs unprivileged; ``imaging configure`` asks
:func:`privileged_hooks` whether the configured hooks need more, and if so grants the worker exactly
that with a systemd drop-in (:mod:`appliance.boot.worker_dropin`).

Only actions known to mount are detected. An operator plugin that mounts the guest is not: the
worker then fails its task with ``Run.NotRoot``, and the operator adds the drop-in by hand.
"""

from __future__ import annotations

from typing import Any

from ..config import HOOK_POINTS, HooksConfig

#: actions that always mount the guest (:func:`appliance.guest.mount.mount_guest`)
PRIVILEGED_ACTIONS = frozenset({"hook.inject-metadata", "hook.run-in-guest"})
#: ``run`` mounts the guest only with ``where: chroot`` (``hook: run`` is spelt as either name)
RUN_ACTIONS = frozenset({"run", "hook.run"})


def needs_root(action: str, args: dict[str, Any]) -> bool:
    """Whether the action ``action`` with arguments ``args`` mounts the guest."""
    if action in PRIVILEGED_ACTIONS:
        return True
    # anything but a literal 'local' (a template included) may turn out to be 'chroot'
    return action in RUN_ACTIONS and args.get("where", "local") != "local"


def privileged_hooks(hooks: HooksConfig) -> list[str]:
    """The hooks that need root, as ``POINT[N] HOOK`` (config order); empty when none does."""
    return [
        f"{point}[{n}] {hook.hook}"
        for point in HOOK_POINTS
        for n, hook in enumerate(hooks.at(point))
        if needs_root(hook.action, hook.args) or needs_root(hook.hook, hook.args)
    ]
