"""Task builders: turn a Config into a model, an objective and data for the one trainer.

Each task module defines ``validate(config, mesh_sizes)`` (cross-section checks, raising
``ConfigError``) and ``build(config, mesh) -> mlgen.train.task.Task``.
"""

import importlib
from types import ModuleType

TASKS = {
    "lm": "mlgen.tasks.lm",
    "diffusion": "mlgen.tasks.diffusion",
}


def get(name: str) -> ModuleType:
    return importlib.import_module(TASKS[name])
