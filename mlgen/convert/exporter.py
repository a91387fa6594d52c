"""``export_hf``: mlgen's transformer -> a Hugging Face model directory (``config.json`` +
``model.safetensors``) that ``transformers.AutoModelForCausalLM.from_pretrained`` loads."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from mlgen.convert import layout
from mlgen.convert.reader import WEIGHTS
from mlgen.models.transformer import Transformer, TransformerConfig
from mlgen.nn.core import merge_adapters


def _to_tensor(src: layout.Source, value: np.ndarray, out: np.ndarray) -> None:
    """Writes one layer's mlgen ``value`` into its checkpoint tensor ``out``."""
    order = [d for g in src.groups for d in g]
    block = value.transpose(order).reshape(
        [int(np.prod([value.shape[d] for d in g])) for g in src.groups]
    )
    where = [slice(None)] * out.ndim
    if src.offset is not None:
        dim, start, _ = src.offset
        where[dim] = slice(start, start + block.shape[dim])
    out[tuple(where)] = block


def hf_tensors(cfg: TransformerConfig, params: dict) -> dict[str, np.ndarray]:
    """Checkpoint name -> tensor of mlgen ``params`` (a pure dict; gathered to the host one
    parameter at a time)."""
    arch = layout.export_architecture(cfg)
    srcs = layout.sources(cfg, arch, "transformer." if arch == layout.GPT2 else "")
    flat = layout.flatten(params)
    out: dict[str, np.ndarray] = {}
    for key, src in srcs.items():
        value = np.asarray(jax.device_get(flat[key]))
        n = src.lead(key)
        names = src.names(tuple(range(k) for k in value.shape[:n]))
        for name, each in zip(names, value.reshape((-1,) + value.shape[n:]), strict=True):
            if name not in out:
                out[name] = np.zeros(src.tensor_shape(each.shape), each.dtype)
            _to_tensor(src, each, out[name])
    return out


def export_hf(
    model_config: TransformerConfig,
    model: Transformer | dict,
    path: str | os.PathLike,
    *,
    special_ids: dict[str, int] | None = None,
):
    """Writes ``config.json`` and ``model.safetensors`` of ``model`` into the directory ``path``.

    Args:
      model_config: the model's config: llama flavour exports as ``LlamaForCausalLM``
        (``MistralForCausalLM`` with a sliding window, ``Qwen2ForCausalLM`` with q/k/v biases),
        gpt2 as ``GPT2LMHeadModel``.
      model: the module, or its parameters as a pure dict (``nnx.to_pure_dict``). LoRA
        adapters (``model_config.lora_rank`` > 0) are folded into their weights first
        (``mlgen.nn.core.merge_adapters``): Hugging Face's classes have no place for them.
      path: the output directory (created).
      special_ids: the tokenizer's ``bos_id`` / ``eos_id`` / ``pad_id`` (negative: none), written
        as ``bos_token_id`` ... in ``config.json`` and ``generation_config.json``, so that
        ``transformers.generate`` stops where ``mlgen generate`` does.

    Raises:
      ConvertError: a model that no supported Hugging Face class can hold (one line): SSM
        layers (``model.pattern`` with ``m``), no RoPE (``model.rope_theta=0``), MoE other
        than Mixtral's.
    """
    path = os.fspath(path)
    params = (
        nnx.to_pure_dict(nnx.state(model, nnx.Param)) if isinstance(model, nnx.Module) else model
    )
    if model_config.lora_rank:
        params = merge_adapters(params, model_config.lora.scale)
        model_config = dataclasses.replace(model_config, lora_rank=0)
    tensors = hf_tensors(model_config, params)
    dtypes = {t.dtype for t in tensors.values()}
    dtype = "bfloat16" if dtypes == {np.dtype(jnp.bfloat16)} else "float32"
    if dtype == "float32":
        tensors = {k: v.astype(np.float32) for k, v in tensors.items()}
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS), metadata={"format": "pt"})
    config = layout.to_hf(model_config, dtype)
    ids = {
        f"{name}_token_id": int(special_ids[f"{name}_id"])
        for name in ("bos", "eos", "pad")
        if special_ids and special_ids.get(f"{name}_id", -1) >= 0
    }
    config.update(ids)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    if ids:
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump(ids, f, indent=2, sort_keys=True)
