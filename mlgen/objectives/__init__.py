"""Objectives: ``loss(params, model_state, batch, rng) -> (loss, (metrics, model_state))``.

``params`` are the model's ``nnx.Param`` values and ``model_state`` its other variables
(batch statistics, counters; an empty dict for most models), both pure dicts; a loss returns
the model state its forward pass left behind. :func:`bind` and :func:`state_after` are the two
halves every objective uses.
"""

from typing import Any

from flax import nnx


def bind(graphdef: nnx.GraphDef, params: Any, model_state: Any) -> nnx.Module:
    """The model, rebuilt inside a traced function from its pure state."""
    return nnx.merge(graphdef, params, model_state) if model_state else nnx.merge(graphdef, params)


def state_after(model: nnx.Module, model_state: Any) -> Any:
    """The model's non-parameter variables after a forward pass (``model_state`` if it has none)."""
    if not model_state:
        return model_state
    return nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[2])


__all__ = ["bind", "state_after"]
