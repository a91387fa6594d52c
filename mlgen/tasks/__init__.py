"""Tasks: a model kind + an objective + data, with their cross-section checks.

Importing this package registers the built-in tasks (``lm``, ``diffusion``, ``vae``, ``mlm``,
``seq2seq``, ``superres``) with ``mlgen.config``; ``Config.task`` names one. A new task is one
module that ends with ``mlgen.tasks.base.register(TaskSpec(...))``.
"""

from mlgen.tasks import diffusion, encoder, latent, lm, superres, vae
from mlgen.tasks.base import TaskSpec, check_batch, policy, register, rules_for

__all__ = [
    "TaskSpec",
    "check_batch",
    "diffusion",
    "encoder",
    "latent",
    "lm",
    "policy",
    "register",
    "rules_for",
    "superres",
    "vae",
]
