"""The dimension alphabet, written once, and array type aliases.

B batch · T query length · S key length · D model width · N query heads · K kv heads ·
H head dim · F mlp width · V vocabulary · L layers · C channels · P patch tokens ·
E experts · k experts per token · M token-expert choices (T·k) · G slots per expert.
Einsums use these letters (``"BTD,DNH->BTNH"``); annotations use jaxtyping
(``Float[Array, "B T N H"]``).
"""

from typing import Any

import jax
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray  # noqa: F401  (re-exported)

PyTree = Any
Params = Any  # a pure nested dict of arrays (nnx.to_pure_dict of nnx.Param state)
Batch = dict[str, Any]
Metrics = dict[str, jax.Array]
