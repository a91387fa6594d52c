"""Hugging Face's state-space LMs in mlgen's transformer: ``Mamba2ForCausalLM`` (a pure Mamba-2
stack, ``pattern="m"``, no feed-forward) and ``JambaForCausalLM`` (attention and Mamba layers
interleaved, MoE every ``expert_layer_period``-th layer; no RoPE).

Both fuse what mlgen keeps apart, and the tables here take the pieces back out by ``offset``:

- Mamba-2's ``in_proj.weight`` ``[2*Di + 2*G*S + N, D]`` holds, in that order, the gate ``z``,
  ``x``, ``b``, ``c`` and ``dt`` (mlgen's ``ssm/{z,x,b,c,dt}``); its depthwise ``conv1d.weight``
  ``[Di + 2*G*S, 1, K]`` the conv taps of ``x``, ``b``, ``c`` (``conv_{x,b,c}``, ``[K, ...]``;
  the size-1 axis is an empty dimension group).
- Jamba's ``mamba.in_proj.weight`` ``[2*Di, D]`` holds ``x`` then the gate ``z``; ``x_proj.weight``
  ``[R + 2*S, Di]`` the dt bottleneck (``dt_in``), ``b`` and ``c``; ``dt_proj.bias`` is mlgen's
  ``dt_bias`` (added inside the softplus in both).

A hybrid stack scans over groups of ``period`` layers (``mlgen.models.transformer.LayerGroup``):
each run of consecutive layers of one kind is ``blocks/runs/{r}/...``, and its :class:`Source`
carries the period, the run's first layer and whether it is stacked, which place layer ``i``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from mlgen.convert.source import Source, need, validated
from mlgen.models.transformer import TransformerConfig

MAMBA2 = "Mamba2ForCausalLM"
JAMBA = "JambaForCausalLM"

Kind = tuple[str, bool]  # (mixer "a" | "m", MoE feed-forward)


def runs(cfg: TransformerConfig) -> list[tuple[Kind, int, int]]:
    """``(kind, first layer, length)`` of each run of one layer group, as ``LayerGroup`` builds
    them: consecutive layers of the same kind."""
    out: list[tuple[Kind, int, int]] = []
    for i, kind in enumerate(cfg.kinds[: cfg.period]):
        if out and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1], out[-1][2] + 1)
        else:
            out.append((kind, i, 1))
    return out


def block_sources(
    cfg: TransformerConfig, layer: Callable[[str, bool], dict[str, Source]]
) -> dict[str, Source]:
    """The ``blocks/...`` entries of a stack whose layer of kind ``(mixer, moe)`` has the
    sources ``layer(mixer, moe)`` (keys relative to the block, names with ``{i}``)."""
    if cfg.period == 1:
        return {f"blocks/{k}": s for k, s in layer(*cfg.kinds[0]).items()}
    out = {}
    for r, (kind, start, n) in enumerate(runs(cfg)):
        for k, s in layer(*kind).items():
            where = dict(period=cfg.period, start=start, stacked=n > 1)
            out[f"blocks/runs/{r}/{k}"] = dataclasses.replace(s, **where)
    return out


def _rows(i: int) -> tuple[tuple[int, ...], ...]:
    """A ``[out, in]`` torch Linear weight holding mlgen's ``[in, out...]`` kernel with ``i``
    output dimensions."""
    return (tuple(range(1, 1 + i)), (0,))


# ----------------------------------------------------------------------------- Mamba-2
def mamba2_sources(cfg: TransformerConfig) -> dict[str, Source]:
    """mlgen parameter path -> :class:`Source` for ``Mamba2ForCausalLM``."""
    out = {
        "embed/embedding": Source("backbone.embeddings.weight", ((0,), (1,))),
        "final_norm/scale": Source("backbone.norm_f.weight", ((0,),)),
        **block_sources(cfg, lambda mixer, moe: _mamba2_layer(cfg)),
    }
    if not cfg.tied:
        out["head/kernel"] = Source("lm_head.weight", ((1,), (0,)))
    return out


def _mamba2_layer(cfg: TransformerConfig) -> dict[str, Source]:
    L = "backbone.layers.{i}."
    m = L + "mixer."
    Di, GS, N = cfg.ssm_inner, cfg.ssm_groups * cfg.ssm_states, cfg.ssm_heads
    proj, conv = 2 * Di + 2 * GS + N, Di + 2 * GS
    out = {
        "ssm_norm/scale": Source(L + "norm.weight", ((0,),)),
        "ssm/norm": Source(m + "norm.weight", ((0, 1),)),
        "ssm/o/kernel": Source(m + "out_proj.weight", ((2,), (0, 1))),
        **{f"ssm/{p}": Source(m + hf, ((0,),)) for p, hf in _PER_HEAD.items()},
    }
    # in_proj: z, x, b, c ([D, N, H] / [D, G, S] kernels) and dt ([D, N]) side by side.
    starts = {"z": 0, "x": Di, "b": 2 * Di, "c": 2 * Di + GS, "dt": 2 * Di + 2 * GS}
    for p, start in starts.items():
        n_out = 1 if p == "dt" else 2
        out[f"ssm/{p}/kernel"] = Source(m + "in_proj.weight", _rows(n_out), (0, start, proj))
        if cfg.ssm_bias:
            groups = ((0,),) if p == "dt" else ((0, 1),)
            out[f"ssm/{p}/bias"] = Source(m + "in_proj.bias", groups, (0, start, proj))
    for p, start in {"x": 0, "b": Di, "c": Di + GS}.items():
        out[f"ssm/conv_{p}"] = Source(m + "conv1d.weight", ((1, 2), (), (0,)), (0, start, conv))
        if cfg.ssm_conv_bias:
            out[f"ssm/conv_{p}_bias"] = Source(m + "conv1d.bias", ((0, 1),), (0, start, conv))
    if cfg.ssm_bias:
        out["ssm/o/bias"] = Source(m + "out_proj.bias", ((0,),))
    return out


_PER_HEAD = {"dt_bias": "dt_bias", "a_log": "A_log", "d": "D"}


def _float(v: Any) -> float:
    """A float of config.json, where transformers writes inf as ``{"__float__": "Infinity"}``."""
    if isinstance(v, dict) and "__float__" in v:
        return float(v["__float__"])
    return float(v)


def mamba2_config(hf: dict) -> TransformerConfig:
    """The mlgen config of a ``Mamba2ForCausalLM`` ``config.json``."""
    need(hf.get("hidden_act", "silu") == "silu", "hidden_act", f"{hf.get('hidden_act')!r}")
    raw = hf.get("time_step_limit", (0.0, math.inf))
    limit = tuple(_float(v) for v in raw)
    need(
        limit == (0.0, math.inf),
        "time_step_limit",
        f"{limit}: only the default (0.0, inf), dt unclamped, is supported",
    )
    D, heads, H = hf["hidden_size"], hf["num_heads"], hf["head_dim"]
    expand = hf.get("expand", 2)
    need(float(expand).is_integer(), "expand", f"must be an integer, got {expand}")
    need(
        heads * H == int(expand) * D,
        "num_heads",
        f"num_heads * head_dim = {heads * H} must equal expand * hidden_size = {int(expand) * D}",
    )
    cfg = TransformerConfig(
        flavour="llama",
        vocab_size=hf["vocab_size"],
        num_layers=hf["num_hidden_layers"],
        d_model=D,
        # No attention layer: the heads are the SSM's (what the mesh's heads axis splits).
        num_heads=heads,
        head_dim=H,
        rope_theta=0.0,
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        pattern="m",
        ssm="mamba2",
        ssm_state=hf.get("state_size", 128),
        ssm_expand=int(expand),
        ssm_head_dim=H,
        ssm_groups=hf.get("n_groups", 8),
        ssm_conv=hf.get("conv_kernel", 4),
        ssm_chunk=hf.get("chunk_size", 256),
        ssm_bias=bool(hf.get("use_bias", False)),
        ssm_conv_bias=bool(hf.get("use_conv_bias", True)),
        ssm_mlp=False,
    )
    return validated(cfg)


# ----------------------------------------------------------------------------- Jamba
def jamba_sources(cfg: TransformerConfig) -> dict[str, Source]:
    """mlgen parameter path -> :class:`Source` for ``JambaForCausalLM``."""
    out = {
        "embed/embedding": Source("model.embed_tokens.weight", ((0,), (1,))),
        "final_norm/scale": Source("model.final_layernorm.weight", ((0,),)),
        **block_sources(cfg, lambda mixer, moe: _jamba_layer(cfg, mixer, moe)),
    }
    if not cfg.tied:
        out["head/kernel"] = Source("lm_head.weight", ((1,), (0,)))
    return out


def _jamba_layer(cfg: TransformerConfig, mixer: str, moe: bool) -> dict[str, Source]:
    L = "model.layers.{i}."
    norm = "attn_norm" if mixer == "a" else "ssm_norm"
    out = {
        f"{norm}/scale": Source(L + "input_layernorm.weight", ((0,),)),
        "mlp_norm/scale": Source(L + "pre_ff_layernorm.weight", ((0,),)),
    }
    if mixer == "a":
        out["attn/o/kernel"] = Source(L + "self_attn.o_proj.weight", ((2,), (0, 1)))
        for p in "qkv":
            out[f"attn/{p}/kernel"] = Source(L + f"self_attn.{p}_proj.weight", _rows(2))
    else:
        out.update(_jamba_mamba(cfg, L + "mamba."))
    ff = L + "feed_forward."
    if moe:
        out["moe/router/kernel"] = Source(ff + "router.weight", _rows(1))
        for p in ("gate", "up", "down"):
            out[f"moe/{p}"] = Source(ff + f"experts.{{j}}.{p}_proj.weight", _rows(1))
    else:
        for p in ("gate", "up", "down"):
            out[f"mlp/{p}/kernel"] = Source(ff + f"{p}_proj.weight", _rows(1))
    return out


def _jamba_mamba(cfg: TransformerConfig, m: str) -> dict[str, Source]:
    Di, R, S = cfg.ssm_inner, cfg.dt_rank, cfg.ssm_states
    out = {
        "ssm/conv": Source(m + "conv1d.weight", ((1,), (), (0,))),
        "ssm/dt_proj/kernel": Source(m + "dt_proj.weight", _rows(1)),
        "ssm/dt_bias": Source(m + "dt_proj.bias", ((0,),)),
        "ssm/a_log": Source(m + "A_log", ((0,), (1,))),
        "ssm/d": Source(m + "D", ((0,),)),
        "ssm/o/kernel": Source(m + "out_proj.weight", _rows(1)),
    }
    for p, start in (("x", 0), ("z", Di)):  # in_proj: x, then the gate z
        out[f"ssm/{p}/kernel"] = Source(m + "in_proj.weight", _rows(1), (0, start, 2 * Di))
        if cfg.ssm_bias:
            out[f"ssm/{p}/bias"] = Source(m + "in_proj.bias", ((0,),), (0, start, 2 * Di))
    for p, start in (("dt_in", 0), ("b", R), ("c", R + S)):  # x_proj: dt rank, b, c
        out[f"ssm/{p}/kernel"] = Source(m + "x_proj.weight", _rows(1), (0, start, R + 2 * S))
    for p in ("dt", "b", "c"):
        out[f"ssm/{p}_norm/scale"] = Source(m + f"{p}_layernorm.weight", ((0,),))
    if cfg.ssm_conv_bias:
        out["ssm/conv_bias"] = Source(m + "conv1d.bias", ((0,),))
    if cfg.ssm_bias:
        out["ssm/o/bias"] = Source(m + "out_proj.bias", ((0,),))
    return out


def _pattern(letters: str, moe_every: int) -> str:
    """The shortest repeating unit of the layers' mixer letters that the layer scan can take:
    it divides the depth and so does its lcm with ``moe_every`` (at worst: every layer)."""
    n = len(letters)
    for p in range(1, n + 1):
        unit = letters[:p]
        if n % math.lcm(p, moe_every or 1) == 0 and unit * (n // p) == letters:
            return unit
    return letters


def jamba_config(hf: dict) -> TransformerConfig:
    """The mlgen config of a ``JambaForCausalLM`` ``config.json``."""
    need(hf.get("hidden_act", "silu") == "silu", "hidden_act", f"{hf.get('hidden_act')!r}")
    need(
        hf.get("sliding_window") is None,
        "sliding_window",
        f"{hf.get('sliding_window')}: a sliding window is not supported",
    )
    n = hf["num_hidden_layers"]
    a_period, a_offset = hf.get("attn_layer_period", 8), hf.get("attn_layer_offset", 4)
    e_period, e_offset = hf.get("expert_layer_period", 2), hf.get("expert_layer_offset", 1)
    experts = hf.get("num_experts", hf.get("num_local_experts", 16))
    letters = "".join("a" if i % a_period == a_offset else "m" for i in range(n))
    has_moe = experts > 1 and any(i % e_period == e_offset for i in range(n))
    moe = {}
    if has_moe:
        need(
            e_offset == e_period - 1,
            "expert_layer_offset",
            f"{e_offset}: mlgen puts the MoE layers at i % expert_layer_period == "
            f"expert_layer_period - 1 = {e_period - 1} (moe_every)",
        )
        need(
            n % e_period == 0,
            "expert_layer_period",
            f"{e_period} does not divide num_hidden_layers={n} (mlgen's moe_every must)",
        )
        moe = dict(
            moe_every=e_period,
            num_experts=experts,
            experts_per_token=hf.get("num_experts_per_tok", 2),
            moe_score="softmax",
            moe_renormalize=False,  # Jamba keeps the top-k softmax weights as they are
            moe_lb_weight=float(hf.get("router_aux_loss_coef", 0.001)),
            moe_z_weight=0.0,
        )
    heads = hf["num_attention_heads"]
    D = hf["hidden_size"]
    dt_rank = hf.get("mamba_dt_rank", "auto")
    cfg = TransformerConfig(
        flavour="llama",
        vocab_size=hf["vocab_size"],
        num_layers=n,
        d_model=D,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or D // heads,
        mlp_dim=hf["intermediate_size"],
        max_len=hf.get("max_position_embeddings", 262144),
        rope_theta=0.0,  # Jamba's attention layers have no positional encoding
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        pattern=_pattern(letters, moe.get("moe_every", 0)),
        ssm="mamba",
        ssm_state=hf.get("mamba_d_state", 16),
        ssm_expand=hf.get("mamba_expand", 2),
        ssm_conv=hf.get("mamba_d_conv", 4),
        ssm_dt_rank=0 if dt_rank == "auto" else int(dt_rank),
        ssm_bias=bool(hf.get("mamba_proj_bias", False)),
        ssm_conv_bias=bool(hf.get("mamba_conv_bias", True)),
        ssm_inner_norms=True,
        ssm_mlp=True,
        **moe,
    )
    return validated(cfg)
