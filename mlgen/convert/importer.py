"""``import_hf``: a Hugging Face model directory -> mlgen's transformer, streamed into its shards.

Every parameter is created by ``jax.make_array_from_callback`` with its target sharding: the
callback of each device reads only the checkpoint slices its shard covers (one tensor slice per
layer of a stacked weight), so no device, and no host buffer, ever holds a whole stacked weight.
"""

from __future__ import annotations

import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from mlgen import sharding
from mlgen.convert import layout
from mlgen.convert.layout import ConvertError
from mlgen.convert.reader import Checkpoint, check_shapes, read, read_config
from mlgen.models.transformer import Transformer, TransformerConfig
from mlgen.nn.policy import Policy

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def policy_for(dtype: str | None) -> Policy:
    """The model policy of an imported model: parameters and compute in ``dtype``
    (default float32)."""
    dtype = dtype or "float32"
    if dtype not in _DTYPES:
        raise ConvertError(f"dtype: must be one of {list(_DTYPES)}, got {dtype!r}")
    return Policy(params=dtype, compute=dtype)


def _gpt2_prefix(names: set[str]) -> str:
    return "transformer." if any(n.startswith("transformer.") for n in names) else ""


def load_params(path: str, arch: str, cfg: TransformerConfig, abstract: dict) -> dict:
    """The parameters of ``cfg`` read from the checkpoint in ``path``, as ``abstract`` (a pure
    dict of ``jax.ShapeDtypeStruct``; with shardings: each device reads only its shard) gives
    them."""
    flat = layout.flatten(abstract)
    with Checkpoint(path) as ckpt:
        prefix = _gpt2_prefix(ckpt.names) if arch == layout.GPT2 else ""
        srcs = layout.sources(cfg, arch, prefix)
        missing = sorted(set(flat) - set(srcs))
        if missing:  # mlgen's model has a parameter no table names: a bug, not a bad checkpoint
            raise ConvertError(f"{missing[0]}: no checkpoint tensor maps to this parameter")
        used = set()
        for key, src in srcs.items():
            n = src.lead(key)
            shape = tuple(flat[key].shape)
            check_shapes(ckpt, src, shape[n:], shape[:n])
            used.update(src.names(tuple(range(k) for k in shape[:n])))
        extra = sorted(ckpt.names - used)
        if extra:
            raise ConvertError(
                f"{extra[0]}: a tensor of the checkpoint that {arch} with this config.json does "
                f"not have ({len(extra)} such tensors)"
            )
        out = {}
        for key, src in srcs.items():
            leaf = flat[key]
            shape = tuple(leaf.shape)
            target = leaf.sharding or SingleDeviceSharding(jax.devices()[0])
            dtype = np.dtype(leaf.dtype)

            def callback(index, src=src, shape=shape, key=key, dtype=dtype):
                return read(ckpt, src, shape, index, lead=src.lead(key), dtype=dtype)

            out[key] = jax.make_array_from_callback(shape, target, callback)
    return layout.nest(out)


def _active_mesh() -> Mesh | None:
    mesh = jax.sharding.get_mesh()
    return None if mesh is None or mesh.empty else mesh


def abstract_params(
    cfg: TransformerConfig, policy: Policy, mesh: Mesh | None
) -> tuple[nnx.GraphDef, dict]:
    """The model's graph and its parameters' shapes, dtypes and (with a mesh, under the active
    logical-axis rules) shardings, with nothing allocated."""

    def make():
        return Transformer(cfg, policy=policy, rngs=nnx.Rngs(params=0))

    if mesh is not None:
        graphdef, abstract, _ = sharding.sharded_init(make, mesh, abstract=True)
        return graphdef, abstract
    graphdef, state = nnx.split(nnx.eval_shape(make))
    return graphdef, nnx.to_pure_dict(state)


def import_hf(
    path: str | os.PathLike,
    *,
    dtype: str | None = None,
    mesh: Mesh | None = None,
    rules: str | sharding.Rules | None = None,
) -> tuple[TransformerConfig, Transformer]:
    """Loads a Hugging Face causal LM directory as mlgen's transformer.

    Reads ``config.json`` and ``model.safetensors`` (or the shards ``model.safetensors.index.json``
    lists) with ``safetensors``; pickled weights (``.bin``) are refused. Supported:
    ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``, ``MixtralForCausalLM``,
    ``GPT2LMHeadModel``, and the state-space stacks ``Mamba2ForCausalLM`` (``pattern="m"``) and
    ``JambaForCausalLM`` (attention / Mamba layers and MoE as ``pattern`` + ``moe_every``).

    Args:
      path: the model directory.
      dtype: ``"float32"`` (default) or ``"bfloat16"``: the parameters' and compute dtype.
      mesh: shard the parameters over this mesh (default: the active one, ``jax.set_mesh`` /
        ``mlgen.sharding.use``; none: one device). Each device reads only its shards.
      rules: logical-axis rules with ``mesh`` (default: the active ones, else ``"auto"``).

    Returns:
      ``(model_config, model)``: ``model(tokens [B, T])`` gives float32 logits ``[B, T, V]``;
      with a mesh, call it under ``mlgen.sharding.use(mesh, rules)``.

    Raises:
      ConvertError: one line naming what is wrong (an unknown architecture, a missing tensor,
        a tensor whose shape does not match config.json, pickled weights only).
    """
    path = os.fspath(path)
    arch, cfg = layout.to_mlgen(read_config(path))
    policy = policy_for(dtype)
    mesh = mesh if mesh is not None else _active_mesh()
    if mesh is None:
        graphdef, abstract = abstract_params(cfg, policy, None)
    else:
        active = tuple(flax.core.spmd.get_logical_axis_rules())
        rules = rules if rules is not None else (active or "auto")
        with sharding.use(mesh, rules):
            graphdef, abstract = abstract_params(cfg, policy, mesh)
    params = load_params(path, arch, cfg, abstract)
    return cfg, nnx.merge(graphdef, params)
