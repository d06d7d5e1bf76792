"""Operator step modules dropped into ``hooks.plugins_dir``.

Every ``*.py`` file of the directory (not starting with ``_`` or ``.``) is imported by its path
under a private module name, and the step classes of its module-level ``STEPS`` mapping
(``{"action.name": StepClass}``) are registered. A file that cannot be imported, has no ``STEPS``,
or offers a class that is not a step is reported (logged, kept in ``Registry.plugin_errors`` and
listed by ``imaging steps``) and skipped: the other files still load. A plugin cannot replace an
action that is already registered (a built-in or another plugin's).

Plugins run with the appliance's privileges: the directory must be as trusted as the code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import sys
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config
from .registry import Registry

log = logging.getLogger(__name__)

#: private package name under which plugin modules live in ``sys.modules``
MODULE_PREFIX = "_imaging_plugins"

_lock = threading.Lock()
#: registry → plugin directories already loaded into it (an Engine per thread must not load twice)
_loaded: weakref.WeakKeyDictionary[Registry, set[Path]] = weakref.WeakKeyDictionary()


@dataclass
class PluginReport:
    """What :func:`load_plugins` did: ``loaded`` action → file, ``errors`` file → why it was skipped."""

    loaded: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def _module_name(path: Path) -> str:
    # The digest keeps two directories' "scan.py" apart; the stem keeps tracebacks readable.
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    stem = "".join(c if c.isalnum() else "_" for c in path.stem)
    return f"{MODULE_PREFIX}.{stem}_{digest}"


def _import(path: Path) -> Any:
    name = _module_name(path)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def plugin_files(directory: Path) -> list[Path]:
    """The plugin files of ``directory`` in load order (sorted by name)."""
    if not directory.is_dir():
        return []
    return sorted(
        p
        for p in directory.iterdir()
        if p.suffix == ".py" and p.is_file() and not p.name.startswith(("_", "."))
    )


def load_plugins(directory: Path | str, registry: Registry) -> PluginReport:
    """Import every plugin file of ``directory`` and register its ``STEPS`` into ``registry``."""
    directory = Path(directory)
    report = PluginReport()
    if not directory.is_dir():
        report.errors[str(directory)] = f"plugins directory {directory} does not exist"
    for path in plugin_files(directory):
        file = str(path)
        try:
            module = _import(path)
        except Exception as exc:  # a syntax error, a missing import, a crash at import time
            report.errors[file] = f"plugin {file} cannot be loaded: {type(exc).__name__}: {exc}"
            continue
        steps = getattr(module, "STEPS", None)
        if not isinstance(steps, dict) or not steps:
            report.errors[file] = (
                f"plugin {file} defines no STEPS mapping (STEPS = {{'action.name': StepClass}})"
            )
            continue
        problems = []
        for name, cls in steps.items():
            if not isinstance(name, str) or not name:
                problems.append(f"{name!r} is not an action name")
                continue
            if name in registry:
                problems.append(f"action {name!r} is already registered (plugins cannot replace actions)")
                continue
            try:
                registry.register(name, cls)
            except Exception as exc:  # not a step class, or an invalid schema
                problems.append(f"action {name!r}: {exc}")
                continue
            report.loaded[name] = file
        if problems:
            report.errors[file] = f"plugin {file}: " + "; ".join(problems)
    for file, error in report.errors.items():
        log.warning("%s", error)
        registry.plugin_errors[file] = error
    return report


def ensure_plugins(registry: Registry, config: Config) -> PluginReport | None:
    """Load ``config.hooks.plugins_dir`` into ``registry`` once (None when there is nothing to do)."""
    directory = config.hooks.plugins_dir
    if directory is None:
        return None
    with _lock:
        done = _loaded.setdefault(registry, set())
        if directory in done:
            return None
        done.add(directory)
        return load_plugins(directory, registry)
