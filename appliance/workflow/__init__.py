"""Declarative workflows: YAML files of steps, run by an engine that records everything in the store.

Modules, one concern each:

- :mod:`.schema` - the workflow file schema and located errors (file, step, field)
- :mod:`.finder` - finding workflow files (path, name, ``artifact://``) and reading their YAML
- :mod:`.loader` - validating workflows: params, steps, templates' names, actions' arguments, includes
- :mod:`.templating` - sandboxed Jinja2 rendering, native values, dry-run placeholders
- :mod:`.registry` - action name → step class (entry points ``imaging.steps`` + in-process)
- :mod:`.step` - the step contract (:class:`Step`) and :class:`StepContext`
- :mod:`.callbacks` - the one reporting interface (:class:`EngineCallbacks`)
- :mod:`.runner` - executing one task: loops, includes, retries, timeouts, undo, ledger
- :mod:`.supervisor` - ownership: lease heartbeat, cancel polling, signals, orphan detection
- :mod:`.planner` - dry run
- :mod:`.engine` - :class:`Engine`: submit, run, resume, recover, plan
"""

from .callbacks import CompositeCallbacks, EngineCallbacks
from .engine import Engine, recover
from .loader import WorkflowLoader
from .model import ParamSpec, StepSpec, Workflow, WorkflowInfo
from .registry import Registry, StepInfo, StepUnavailable, default_registry
from .schema import WorkflowError
from .step import Step, StepContext
from .supervisor import find_orphans

__all__ = [
    "CompositeCallbacks",
    "Engine",
    "EngineCallbacks",
    "ParamSpec",
    "Registry",
    "Step",
    "StepContext",
    "StepInfo",
    "StepSpec",
    "StepUnavailable",
    "Workflow",
    "WorkflowError",
    "WorkflowInfo",
    "WorkflowLoader",
    "default_registry",
    "find_orphans",
    "recover",
]
