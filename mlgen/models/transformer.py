"""Decoder-only transformer language model.

Supports:
- the Llama flavour: RMSNorm, RoPE (configurable theta, Llama 3 frequency scaling),
  SwiGLU, grouped-query attention, no biases (q/k/v biases as Qwen2 with ``qkv_bias``),
  untied embeddings by default (tied with ``tie_embeddings``), sliding-window attention
  (Mistral) with ``sliding_window``;
- the GPT-2 flavour: LayerNorm, learned positions, GELU MLP, biases, tied embeddings;
- layers stacked on a leading ``layers`` axis and run with a scan (compile time does not grow
  with depth), each block rematerialised by the run's policy (``mlgen.nn.policy``: ``none``,
  ``full``, ``dots``, ``dots_no_batch``, ``offload``);
- mixed precision from the same policy: parameter and compute dtypes (norms, softmax and the
  logits in float32);
- packed rows (``segment_ids`` + per-document ``positions``);
- the decoder protocol the LM sampler talks to: ``init_cache`` (one KV cache per layer, owned
  by its attention layer), ``decode`` (the per-layer loop), ``max_length``, ``for_decoding``;
- every attention backend of ``mlgen.ops.attention`` (``attention``: one ``AttentionConfig``);
- logical axis names on every parameter and activation constraints at block boundaries;
- mixture of experts (``moe_every`` > 0): every ``moe_every``-th layer's MLP is an MoE layer
  (``mlgen.nn.moe``: top-k routing, dropless or capacity dispatch, shared experts); the layer
  scan runs over groups of ``moe_every`` layers, so compile time stays independent of depth,
  and the routers' auxiliary losses come back with ``return_aux``;
- LoRA (``lora_rank`` > 0): low-rank adapters on the projections named in ``lora_targets``;
  only the adapters train (the family's ``trainable``), the base stays frozen.

The family spec (``FAMILY``, registered as ``"transformer"``) is at the end of the file.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from mlgen.config import ConfigError, check, prefixed
from mlgen.models.family import Family, register
from mlgen.nn.attention import KVCache, SelfAttention
from mlgen.nn.core import (
    Embed,
    LayerNorm,
    Linear,
    LoRA,
    RMSNorm,
    dropout,
    is_adapter,
    normal_init,
    param,
)
from mlgen.nn.infini import InfiniAttention
from mlgen.nn.mlp import MLP
from mlgen.nn.moe import MoE, MoEConfig, check_expert_mesh
from mlgen.nn.policy import Policy
from mlgen.nn.rope import Llama3Scaling
from mlgen.nn.ssm import Mamba, Mamba2, SSMState
from mlgen.ops.attention import AttentionConfig
from mlgen.sharding import constrain
from mlgen.typing import Array, Float, Int


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    flavour: Literal["llama", "gpt2"] = "llama"
    vocab_size: int = 256
    num_layers: int = 4
    d_model: int = 256
    num_heads: int = 4
    num_kv_heads: int = 0  # 0 = num_heads (multi-head); fewer = grouped-query attention
    head_dim: int = 0  # 0 = d_model // num_heads
    mlp_dim: int = 0  # 0 = 4 * d_model (gpt2) or 8/3 * d_model rounded up to 64 (llama)
    max_len: int = 1024  # learned position table size (gpt2)
    rope_theta: float = 10000.0
    # RoPE frequency scaling: "none" or "llama3" (Llama 3.1's long-context scaling, with the
    # four rope_scaling_* parameters below; Hugging Face's ``rope_scaling`` dict).
    rope_scaling: Literal["none", "llama3"] = "none"
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    qkv_bias: bool = False  # llama flavour: biases on the q/k/v projections (Qwen2); gpt2 has all
    sliding_window: int = 0  # > 0: a token attends to the last this-many positions (Mistral)
    tie_embeddings: bool | None = None  # None = flavour default (gpt2 tied, llama untied)
    norm_eps: float = 1e-5
    dropout: float = 0.0
    # LoRA: rank > 0 adds low-rank adapters to the projections in ``lora_targets`` (comma
    # separated: q, k, v, o, gate, up, down; "attn" = q,k,v,o, "mlp" = the MLP's, "all"), scaled
    # by lora_alpha / lora_rank; the base weights are frozen (no gradient, no optimizer state).
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: str = "q,k,v,o"
    # Mixture of experts: moe_every = k > 0 makes layers k-1, 2k-1, ... MoE layers (1: every
    # layer, as Mixtral); each has num_experts SwiGLU experts of width moe_mlp_dim (0 = the
    # dense MLP's), experts_per_token chosen per token, plus num_shared_experts always-on ones.
    moe_every: int = 0
    num_experts: int = 8
    experts_per_token: int = 2
    num_shared_experts: int = 0
    moe_mlp_dim: int = 0
    moe_score: Literal["softmax", "sigmoid"] = "softmax"
    moe_renormalize: bool = True  # divide the k chosen scores by their sum (Mixtral)
    moe_dispatch: Literal["dropless", "capacity"] = "dropless"
    moe_capacity_factor: float = 1.25
    moe_lb_weight: float = 0.01  # load-balancing loss weight (Mixtral's router_aux_loss_coef)
    moe_z_weight: float = 0.001  # router z-loss weight
    # Hybrid stacks: ``pattern`` is repeated over the layers, one letter per layer: "a" an
    # attention layer, "m" a state-space layer (``ssm``: "mamba2", Mamba-2's SSD mixer, or "mamba",
    # Mamba's selective scan as in Jamba). "a" alone is a transformer, "m" a pure Mamba LM,
    # "mmmammmm" Jamba's 7:1 interleave; with ``moe_every`` the layers scan in groups of
    # lcm(len(pattern), moe_every), so compile time stays independent of depth.
    pattern: str = "a"
    ssm: Literal["mamba2", "mamba"] = "mamba2"
    ssm_state: int = 0  # S, states per channel; 0 = 128 (mamba2) or 16 (mamba)
    ssm_expand: int = 2  # inner width = ssm_expand * d_model
    ssm_head_dim: int = 64  # mamba2: H channels per head (heads = inner width / H)
    ssm_groups: int = 1  # mamba2: groups of b/c shared by the heads (as GQA's kv heads)
    ssm_conv: int = 4  # width of the causal depthwise conv before the scan
    ssm_chunk: int = 128  # chunk length of the chunked scans (SSD's intra-chunk matmuls)
    ssm_dt_rank: int = 0  # mamba: rank of the dt projection; 0 = ceil(d_model / 16)
    ssm_bias: bool = False  # biases on the SSM layers' input / output projections
    ssm_conv_bias: bool = True
    ssm_inner_norms: bool = True  # mamba: RMSNorms on dt, b and c (Jamba's)
    ssm_mlp: bool = True  # SSM layers carry an MLP / MoE sublayer (Jamba) or none (Mamba-2 LMs)
    # Infini-attention (infini_segment > 0): the attention layers attend causally within segments
    # of this many tokens and read a compressive memory of the earlier segments, with a learned
    # gate; infini_delta uses the delta-rule memory update.
    infini_segment: int = 0
    infini_delta: bool = False
    attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
    # Dtypes and remat are the run's (``precision``, ``remat``: ``mlgen.nn.policy.Policy``).
    # Run the stacked layers with a lax.scan (compile time independent of depth) or unrolled,
    # one call per layer (MaxText's ``scan_layers``): same parameters either way. ``mlgen plan``
    # compiles short unrolled stacks to count every layer's cost (XLA counts a scan's body
    # once, and libtpu gives no step-time estimate for a program with the scan's loop).
    scan_layers: bool = True

    # Derived -------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def hidden(self) -> int:
        if self.mlp_dim:
            return self.mlp_dim
        if self.flavour == "gpt2":
            return 4 * self.d_model
        return -(-int(8 * self.d_model / 3) // 64) * 64

    @property
    def rope_scaler(self) -> Llama3Scaling | None:
        if self.rope_scaling == "none":
            return None
        return Llama3Scaling(
            factor=self.rope_scaling_factor,
            low_freq_factor=self.rope_low_freq_factor,
            high_freq_factor=self.rope_high_freq_factor,
            original_max_len=self.rope_original_max_len,
        )

    @property
    def moe(self) -> MoEConfig | None:
        """The MoE layers' config (None for a dense model)."""
        if not self.moe_every:
            return None
        return MoEConfig(**{ours: getattr(self, theirs) for theirs, ours in _MOE_FIELDS.items()})

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers // self.moe_every if self.moe_every else 0

    @property
    def expert_hidden(self) -> int:
        """Each expert's MLP width."""
        return self.moe_mlp_dim or self.hidden

    @property
    def lora(self) -> LoRA | None:
        return LoRA(self.lora_rank, self.lora_alpha) if self.lora_rank else None

    @property
    def adapted(self) -> frozenset[str]:
        """The projections that carry LoRA adapters (empty without LoRA)."""
        if not self.lora_rank:
            return frozenset()
        mlp = ("up", "down") if self.flavour == "gpt2" else ("gate", "up", "down")
        groups = {"attn": ("q", "k", "v", "o"), "mlp": mlp}
        groups["all"] = groups["attn"] + mlp
        out: set[str] = set()
        for name in self.lora_targets.split(","):
            out.update(groups.get(name.strip(), (name.strip(),)))
        return frozenset(out)

    @property
    def kinds(self) -> tuple[tuple[str, bool], ...]:
        """Each layer's ``(mixer, moe)``: mixer "a" (attention) or "m" (SSM), moe whether its
        feed-forward is an MoE layer."""
        k = self.moe_every
        return tuple(
            (self.pattern[i % len(self.pattern)], bool(k) and i % k == k - 1)
            for i in range(self.num_layers)
        )

    @property
    def period(self) -> int:
        """Layers per scan step: lcm(len(pattern), moe_every)."""
        return math.lcm(len(self.pattern), self.moe_every or 1)

    @property
    def has_ssm(self) -> bool:
        return "m" in self.pattern

    @property
    def ssm_inner(self) -> int:
        return self.ssm_expand * self.d_model

    @property
    def ssm_heads(self) -> int:
        return self.ssm_inner // self.ssm_head_dim

    @property
    def ssm_states(self) -> int:
        return self.ssm_state or (128 if self.ssm == "mamba2" else 16)

    @property
    def dt_rank(self) -> int:
        return self.ssm_dt_rank or -(-self.d_model // 16)

    @property
    def tied(self) -> bool:
        return self.flavour == "gpt2" if self.tie_embeddings is None else self.tie_embeddings

    def validate(self) -> None:
        for name in ("vocab_size", "num_layers", "d_model", "num_heads", "max_len"):
            check(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        check(
            self.flavour in ("llama", "gpt2"),
            "flavour",
            f"must be 'llama' or 'gpt2', got {self.flavour!r}",
        )
        if not self.head_dim:
            check(
                self.d_model % self.num_heads == 0,
                "num_heads",
                f"{self.num_heads} does not divide d_model={self.d_model} (or set head_dim)",
            )
        check(self.num_kv_heads >= 0, "num_kv_heads", f"must be >= 0, got {self.num_kv_heads}")
        check(
            self.num_heads % self.kv_heads == 0,
            "num_kv_heads",
            f"{self.kv_heads} does not divide num_heads={self.num_heads}",
        )
        check(
            self.head_size % 2 == 0
            or self.flavour == "gpt2"
            or not self.rope_theta
            or "a" not in self.pattern,
            "head_dim",
            f"RoPE needs an even head dim, got {self.head_size}",
        )
        check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        check(
            self.rope_theta >= 0, "rope_theta", f"must be >= 0 (0 = no RoPE), got {self.rope_theta}"
        )
        check(
            self.rope_scaling in ("none", "llama3"),
            "rope_scaling",
            f"must be 'none' or 'llama3', got {self.rope_scaling!r}",
        )
        if self.rope_scaling == "llama3":
            check(
                self.flavour == "llama",
                "rope_scaling",
                "gpt2 has learned positions, no RoPE",
            )
            check(
                self.rope_scaling_factor > 0,
                "rope_scaling_factor",
                f"must be > 0, got {self.rope_scaling_factor}",
            )
            check(
                self.rope_high_freq_factor > self.rope_low_freq_factor,
                "rope_high_freq_factor",
                f"must be > rope_low_freq_factor={self.rope_low_freq_factor}, "
                f"got {self.rope_high_freq_factor}",
            )
            check(
                self.rope_original_max_len > 0,
                "rope_original_max_len",
                f"must be > 0, got {self.rope_original_max_len}",
            )
        check(
            self.sliding_window >= 0,
            "sliding_window",
            f"must be >= 0 (0 = none), got {self.sliding_window}",
        )
        check(self.lora_rank >= 0, "lora_rank", f"must be >= 0 (0 = none), got {self.lora_rank}")
        if self.lora_rank:
            check(self.lora_alpha > 0, "lora_alpha", f"must be > 0, got {self.lora_alpha}")
            known = {"q", "k", "v", "o", "up", "down"} | (
                set() if self.flavour == "gpt2" else {"gate"}
            )
            unknown = sorted(self.adapted - known)
            check(
                not unknown,
                "lora_targets",
                f"unknown projection(s) {unknown} for the {self.flavour} flavour; choose from "
                f"{sorted(known)}, attn, mlp or all",
            )
        check(self.moe_every >= 0, "moe_every", f"must be >= 0 (0 = dense), got {self.moe_every}")
        if self.moe_every:
            check(
                self.num_layers % self.moe_every == 0,
                "moe_every",
                f"{self.moe_every} does not divide num_layers={self.num_layers}",
            )
            check(
                self.flavour == "llama", "moe_every", "MoE layers need the llama flavour (SwiGLU)"
            )
            check(self.moe_mlp_dim >= 0, "moe_mlp_dim", f"must be >= 0, got {self.moe_mlp_dim}")
            check(
                not self.adapted & {"gate", "up", "down"},
                "lora_targets",
                "LoRA adapts dense projections; MoE experts take none (use q,k,v,o)",
            )
            try:
                self.moe.validate()
            except ConfigError as e:  # named by this config's field, not MoEConfig's
                field, _, rest = str(e).partition(":")
                ours = {v: k for k, v in _MOE_FIELDS.items()}.get(field, field)
                raise ConfigError(f"{ours}:{rest}") from None
        self._validate_pattern()
        prefixed("attention", self.attention.validate)

    def _validate_pattern(self) -> None:
        bad = sorted(set(self.pattern) - {"a", "m"})
        check(
            bool(self.pattern) and not bad,
            "pattern",
            f"one letter per layer, 'a' (attention) or 'm' (SSM); got {self.pattern!r}",
        )
        check(
            self.num_layers % self.period == 0,
            "pattern",
            f"num_layers={self.num_layers} is not a multiple of the repeating group: "
            f"lcm(len(pattern)={len(self.pattern)}, moe_every={self.moe_every or 1}) = "
            f"{self.period}",
        )
        check(
            self.infini_segment >= 0,
            "infini_segment",
            f"must be >= 0 (0 = plain attention), got {self.infini_segment}",
        )
        if not self.has_ssm:
            return
        check(self.flavour == "llama", "pattern", "SSM layers need the llama flavour (RMSNorm)")
        check(self.ssm in ("mamba2", "mamba"), "ssm", f"'mamba2' or 'mamba', got {self.ssm!r}")
        for name in ("ssm_expand", "ssm_head_dim", "ssm_groups", "ssm_conv", "ssm_chunk"):
            check(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        for name in ("ssm_state", "ssm_dt_rank"):
            check(
                getattr(self, name) >= 0,
                name,
                f"must be >= 0 (0 = default), got {getattr(self, name)}",
            )
        if self.ssm == "mamba2":
            check(
                self.ssm_inner % self.ssm_head_dim == 0,
                "ssm_head_dim",
                f"{self.ssm_head_dim} does not divide the inner width "
                f"ssm_expand * d_model = {self.ssm_inner}",
            )
            check(
                self.ssm_heads % self.ssm_groups == 0,
                "ssm_groups",
                f"{self.ssm_groups} does not divide the {self.ssm_heads} SSM heads",
            )
        check(
            self.ssm_mlp
            or not self.moe_every
            or all(mixer == "a" for mixer, moe in self.kinds if moe),
            "moe_every",
            "an MoE layer falls on an SSM layer without a feed-forward (ssm_mlp=False)",
        )

    @property
    def max_length(self) -> int | None:
        """The longest sequence the model can take: the learned-position table (gpt2), else None."""
        return self.max_len if self.flavour == "gpt2" else None


# TransformerConfig field -> MoEConfig field
_MOE_FIELDS = {
    "num_experts": "num_experts",
    "experts_per_token": "experts_per_token",
    "num_shared_experts": "num_shared_experts",
    "moe_score": "score",
    "moe_renormalize": "renormalize",
    "moe_dispatch": "dispatch",
    "moe_capacity_factor": "capacity_factor",
    "moe_lb_weight": "load_balance_weight",
    "moe_z_weight": "router_z_weight",
}

# How the MoE layers' auxiliary values combine over layers: the extremes of the expert load,
# the mean of the rest (losses, the dropped fraction).
_AUX_REDUCE = {"expert_load_max": jnp.maximum, "expert_load_min": jnp.minimum}


def _aux_init(names) -> dict[str, jax.Array]:
    start = {jnp.maximum: -jnp.inf, jnp.minimum: jnp.inf}
    return {n: jnp.asarray(start.get(_AUX_REDUCE.get(n), 0.0), jnp.float32) for n in names}


def _aux_add(acc: dict, new: dict) -> dict:
    """Combines a layer's aux into the running values (a layer without MoE brings ``{}``)."""
    if not new:
        return acc
    return {k: _AUX_REDUCE.get(k, jnp.add)(acc[k], new[k]) for k in acc}


class Block(nnx.Module):
    """Pre-norm block: ``x + mixer(norm(x))``, then ``x + ffn(norm(x))``.

    The mixer is attention (``mixer="a"``: ``attn_norm``, ``attn``; Infini-attention with
    ``infini_segment``) or a state-space layer (``"m"``: ``ssm_norm``, ``ssm``); the feed-forward
    an MLP (``mlp_norm``, ``mlp``), an MoE layer (``moe``) or, for SSM layers with
    ``ssm_mlp=False``, none. Returns ``(x, aux)``: the MoE layer's auxiliary scalars, or ``{}``.
    """

    def __init__(
        self,
        cfg: TransformerConfig,
        *,
        policy: Policy,
        rngs: nnx.Rngs,
        moe: bool = False,
        mixer: str = "a",
    ):
        dtype, pdtype = policy.dtype, policy.param_dtype
        gpt2 = cfg.flavour == "gpt2"
        Norm = LayerNorm if gpt2 else RMSNorm
        norm = lambda: Norm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdtype, rngs=rngs)  # noqa: E731
        self.mixer = mixer
        attention = mixer == "a"
        self.attn_norm = norm() if attention else None
        self.attn = _attention(cfg, dtype, pdtype, rngs) if attention else None
        self.ssm_norm = None if attention else norm()
        self.ssm = None if attention else _ssm(cfg, dtype, pdtype, rngs)
        has_ffn = mixer == "a" or cfg.ssm_mlp
        self.mlp_norm = norm() if has_ffn else None
        self.mlp = (
            MLP(
                cfg.d_model,
                cfg.hidden,
                kind="gelu" if gpt2 else "swiglu",
                use_bias=gpt2,
                lora=cfg.lora,
                lora_targets=cfg.adapted,
                dtype=dtype,
                param_dtype=pdtype,
                rngs=rngs,
            )
            if has_ffn and not moe
            else None
        )
        self.moe = (
            MoE(cfg.d_model, cfg.expert_hidden, cfg.moe, dtype=dtype, param_dtype=pdtype, rngs=rngs)
            if moe
            else None
        )
        self.dropout = cfg.dropout

    def _ffn(self, x, segment_ids=None):
        if self.moe is None:
            return self.mlp(x), {}
        return self.moe(x, mask=None if segment_ids is None else segment_ids > 0)

    def _mix(self):
        return (self.attn_norm, self.attn) if self.mixer == "a" else (self.ssm_norm, self.ssm)

    def __call__(self, x, *, positions, segment_ids, rng=None):
        r1, r2 = jax.random.split(rng) if rng is not None else (None, None)
        norm, mix = self._mix()
        h = mix(norm(x), positions=positions, segment_ids=segment_ids)
        x = x + dropout(h, self.dropout, r1)
        aux = {}
        if self.mlp_norm is not None:
            h, aux = self._ffn(self.mlp_norm(x), segment_ids)
            x = x + dropout(h, self.dropout, r2)
        return constrain(x, _ACT), aux

    def init_cache(self, batch: int, max_len: int):
        """A KV cache (attention) or the conv + SSM state (``mlgen.nn.ssm.SSMState``)."""
        return self._mix()[1].init_cache(batch, max_len)

    def decode(self, x, positions, cache):
        norm, mix = self._mix()
        h, cache = mix.decode(norm(x), positions, cache)
        x = x + h
        if self.mlp_norm is not None:
            x = x + self._ffn(self.mlp_norm(x))[0]
        return constrain(x, _ACT), cache


def _attention(cfg: TransformerConfig, dtype, pdtype, rngs):
    gpt2 = cfg.flavour == "gpt2"
    kw = dict(
        use_bias=gpt2,
        qkv_bias=gpt2 or cfg.qkv_bias,
        rope_theta=None if gpt2 or not cfg.rope_theta else cfg.rope_theta,
        rope_scaling=None if gpt2 else cfg.rope_scaler,
        sliding_window=cfg.sliding_window or None,
        attention=cfg.attention,
        lora=cfg.lora,
        lora_targets=cfg.adapted,
        dtype=dtype,
        param_dtype=pdtype,
        rngs=rngs,
    )
    args = (cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_size)
    if cfg.infini_segment:
        return InfiniAttention(
            *args, segment_len=cfg.infini_segment, delta_rule=cfg.infini_delta, **kw
        )
    return SelfAttention(*args, **kw)


def _ssm(cfg: TransformerConfig, dtype, pdtype, rngs):
    kw = dict(
        state=cfg.ssm_states,
        conv=cfg.ssm_conv,
        chunk=cfg.ssm_chunk,
        use_bias=cfg.ssm_bias,
        conv_bias=cfg.ssm_conv_bias,
        norm_eps=cfg.norm_eps,
        dtype=dtype,
        param_dtype=pdtype,
        rngs=rngs,
    )
    if cfg.ssm == "mamba2":
        return Mamba2(
            cfg.d_model, heads=cfg.ssm_heads, head_dim=cfg.ssm_head_dim, groups=cfg.ssm_groups, **kw
        )
    return Mamba(
        cfg.d_model,
        inner=cfg.ssm_inner,
        dt_rank=cfg.dt_rank,
        inner_norms=cfg.ssm_inner_norms,
        **kw,
    )


class LayerGroup(nnx.Module):
    """One scan step of ``period`` consecutive layers of different kinds (a hybrid pattern, MoE
    every k-th layer). Consecutive layers of one kind form a run; a run of several is stacked on
    its own ``layers`` axis and run by an inner scan, a run of one is a plain block. Returns
    ``(x, aux)`` with the MoE layers' auxiliary values combined (``_aux_add``)."""

    def __init__(self, cfg: TransformerConfig, *, policy: Policy, rngs: nnx.Rngs):
        runs: list[tuple[tuple[str, bool], int]] = []
        for kind in cfg.kinds[: cfg.period]:
            if runs and runs[-1][0] == kind:
                runs[-1] = (kind, runs[-1][1] + 1)
            else:
                runs.append((kind, 1))

        def make(kind, r):
            return Block(cfg, policy=policy, rngs=r, moe=kind[1], mixer=kind[0])

        self.sizes = tuple(n for _, n in runs)
        self.runs = nnx.List(
            [
                make(kind, rngs) if n == 1 else _stack(n, lambda r, k=kind: make(k, r), rngs)
                for kind, n in runs
            ]
        )
        self.period = cfg.period

    def __call__(self, x, *, positions, segment_ids, rng=None, aux=None):
        rngs = jax.random.split(rng, self.period) if rng is not None else None
        aux = {} if aux is None else aux
        i = 0

        def body(block, carry, r):
            x, acc = carry
            x, new = block(x, positions=positions, segment_ids=segment_ids, rng=r)
            return x, _aux_add(acc, new)

        for run, n in zip(self.runs, self.sizes, strict=True):
            rs = None if rngs is None else rngs[i : i + n]
            if n == 1:
                x, aux = body(run, (x, aux), None if rs is None else rs[0])
            else:
                x, aux = _scan(run, (x, aux), rs, body)
            i += n
        return x, aux

    def layers(self) -> list[Block]:
        out = []
        for run, n in zip(self.runs, self.sizes, strict=True):
            out.extend([run] if n == 1 else _unstack(run, n))
        return out


def _stack(n: int, make, rngs: nnx.Rngs):
    """``n`` modules ``make(rngs)`` stacked on a leading ``layers`` axis."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def build(r):
        return make(r)

    return build(rngs)


def _scan(stacked, carry, xs, body):
    """``carry = body(layer, carry, x)`` over the layers of ``stacked`` (and ``xs``)."""

    @nnx.scan(
        in_axes=(0, nnx.Carry, 0),
        out_axes=nnx.Carry,
        transform_metadata={nnx.PARTITION_NAME: "layers"},
    )
    def run(layer, c, x):
        return body(layer, c, x)

    return run(stacked, carry, xs)


def _unstack(stacked, n: int) -> list:
    """The ``n`` modules of a stack (slices of its parameters)."""
    graphdef, state = nnx.split(stacked)
    return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(n)]


_ACT = ("batch", "length", "act_embed")


class Transformer(nnx.Module):
    """Decoder-only LM: tokens ``[B, T]`` -> logits ``[B, T, V]`` (float32).

    ``policy``: parameter / compute dtypes and the remat of each block (default: float32, none).
    """

    def __init__(self, cfg: TransformerConfig, *, policy: Policy = Policy(), rngs: nnx.Rngs):
        cfg.validate()
        self.cfg, self.policy = cfg, policy
        dtype, pdtype = policy.dtype, policy.param_dtype
        self.embed = Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=pdtype, rngs=rngs)
        self.pos_embed = (
            param(rngs, normal_init(0.01), (cfg.max_len, cfg.d_model), ("pos", "embed"), pdtype)
            if cfg.flavour == "gpt2"
            else None
        )

        # The scanned stack: layers all of one kind, or groups of ``period`` layers (a hybrid
        # pattern, MoE every moe_every-th layer).
        if cfg.period > 1:
            self.blocks = _stack(
                cfg.num_layers // cfg.period, lambda r: LayerGroup(cfg, policy=policy, rngs=r), rngs
            )
        else:
            mixer, moe = cfg.kinds[0]
            self.blocks = _stack(
                cfg.num_layers,
                lambda r: Block(cfg, policy=policy, rngs=r, moe=moe, mixer=mixer),
                rngs,
            )
        Norm = LayerNorm if cfg.flavour == "gpt2" else RMSNorm
        self.final_norm = Norm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdtype, rngs=rngs)
        self.head = (
            None
            if cfg.tied
            else Linear(
                cfg.d_model,
                cfg.vocab_size,
                in_names=("embed",),
                out_names=("vocab",),
                init=normal_init(0.02),
                dtype=dtype,
                param_dtype=pdtype,
                rngs=rngs,
            )
        )

    def _embed(self, tokens, positions):
        x = self.embed(tokens)
        if self.pos_embed is not None:
            x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(x.dtype)
        return constrain(x, _ACT)

    def __call__(
        self,
        tokens: Int[Array, "B T"],
        *,
        positions: Int[Array, "B T"] | None = None,
        segment_ids: Int[Array, "B T"] | None = None,
        rng: jax.Array | None = None,
        return_hidden: bool = False,
        return_aux: bool = False,
    ):
        """Returns logits ``[B, T, V]`` (or final hidden states ``[B, T, D]``
        with ``return_hidden``); with ``return_aux``, ``(that, aux)``.

        ``rng`` enables dropout (training); ``positions`` default to ``0..T-1``. ``aux``: the MoE
        layers' auxiliary float32 scalars (``mlgen.nn.moe.MoE``), averaged over those layers
        (``expert_load_max`` / ``_min``: their extremes); ``aux["loss"]`` is the weighted
        router loss an objective adds to its own. ``{}`` for a dense model.
        """
        cfg = self.cfg
        B, T = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        x = self._embed(tokens, positions)
        stack = cfg.num_layers // cfg.period
        layer_rngs = jax.random.split(rng, stack) if rng is not None and cfg.dropout > 0 else None
        names = (
            "loss",
            "lb_loss",
            "z_loss",
            "dropped_fraction",
            "expert_load_max",
            "expert_load_min",
        )
        aux = _aux_init(names if cfg.moe_every else ())

        def body(block, carry, lrng):
            x, acc = carry
            if isinstance(block, LayerGroup):
                return block(x, positions=positions, segment_ids=segment_ids, rng=lrng, aux=acc)
            x, new = block(x, positions=positions, segment_ids=segment_ids, rng=lrng)
            return x, _aux_add(acc, new)

        if cfg.scan_layers:
            scanned = self.policy.remat_block(body, prevent_cse=False)  # inside the layer scan
            x, aux = _scan(self.blocks, (x, aux), layer_rngs, scanned)
        else:  # one call per layer on its slice of the stacked weights: no loop in the program
            unrolled = self.policy.remat_block(body, prevent_cse=True)
            for i, block in enumerate(_unstack(self.blocks, stack)):
                x, aux = unrolled(block, (x, aux), None if layer_rngs is None else layer_rngs[i])
        x = self.final_norm(x)
        out = x if return_hidden else self.logits(x)
        if not return_aux:
            return out
        n = max(cfg.num_moe_layers, 1)
        return out, {k: v if k in _AUX_REDUCE else v / n for k, v in aux.items()}

    def logits(self, x: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
        # Accumulated and returned in float32 whatever the compute dtype: bfloat16 logits keep
        # ~3 significant digits (a logit of 8 is off by up to 0.03), the loss would inherit that.
        f32 = jnp.float32
        out = (
            self.embed.attend(x, out_dtype=f32)
            if self.head is None
            else self.head(x, out_dtype=f32)
        )
        return constrain(out, ("batch", "length", "act_vocab"))

    # -- the decoder protocol (mlgen.samplers.lm) ---------------------------------------------
    @property
    def max_length(self) -> int | None:
        """Positions the model can encode (gpt2's learned table), or None (RoPE)."""
        return self.cfg.max_length

    def init_cache(self, batch: int, max_len: int) -> tuple[KVCache | SSMState, ...]:
        """One empty cache per layer, made by the layer: a KV cache (attention) or the conv +
        SSM state (``mlgen.nn.ssm.SSMState``, whose size does not depend on ``max_len``)."""
        return tuple(block.init_cache(batch, max_len) for block in self._layers())

    def decode(
        self, tokens: Int[Array, "B T"], positions: Int[Array, "B T"], cache: tuple
    ) -> tuple[Float[Array, "B V"], tuple]:
        """Runs T new tokens per row through every layer, writing them to ``cache``.

        ``positions`` ``[B, T]`` are each token's position in its row; a negative position
        marks left padding (never attended to). Returns the next-token logits after the last
        of the T tokens ``[B, V]`` (no ``[B, T, V]`` logits) and the updated caches. Layers run
        one after another over their own caches: a layer scan would pass the stacked cache
        through as scanned inputs / outputs, which makes XLA copy it several times per token
        (~3x slower on CPU at the benchmark's shapes), while here each cache updates in place.
        """
        x = self._embed(tokens, jnp.maximum(positions, 0))
        new = []
        for block, layer_cache in zip(self._layers(), cache, strict=True):
            x, layer_cache = block.decode(x, positions, layer_cache)
            new.append(layer_cache)
        return self.logits(self.final_norm(x[:, -1:]))[:, 0], tuple(new)

    def for_decoding(self) -> "Transformer":
        """The module a decoding loop should carry: on CPU a copy whose stacked layers are split
        into one module per layer, else this model.

        ``decode`` slices each layer's weights out of the stacked ones. XLA:CPU copies such
        slices at every token (15-25% of the time per token at the benchmark's shapes), while
        GPU/TPU matmuls read them in place; slicing once, before the loop, costs one copy of the
        block weights in memory, so only CPU does it.
        """
        if jax.default_backend() != "cpu" or isinstance(self.blocks, nnx.List):
            return self
        graphdef, state = nnx.split(self)
        out = nnx.merge(graphdef, state)
        out.blocks = nnx.List(self._layers())
        return out

    def _layers(self) -> list[Block]:
        """One module per layer, in order (slices of the stacked block parameters)."""
        if isinstance(self.blocks, nnx.List):
            return list(self.blocks)
        cfg = self.cfg
        if cfg.period > 1:
            groups = _unstack(self.blocks, cfg.num_layers // cfg.period)
            return [layer for group in groups for layer in group.layers()]
        return _unstack(self.blocks, cfg.num_layers)


# Named size presets.
PRESETS = {
    "lm-tiny": TransformerConfig(
        flavour="llama", vocab_size=256, num_layers=4, d_model=256, num_heads=4, num_kv_heads=2
    ),
    "gpt2-bench": TransformerConfig(
        flavour="gpt2", vocab_size=512, num_layers=6, d_model=384, num_heads=6, max_len=256
    ),
}


def _check_mesh(cfg: TransformerConfig, shards) -> None:
    n = shards("heads")
    check(
        cfg.num_heads % n == 0,
        "num_heads",
        f"{cfg.num_heads} is not divisible by the {n} shards of the heads axis",
    )
    if cfg.has_ssm and cfg.ssm == "mamba2":
        check(
            cfg.ssm_heads % n == 0,
            "ssm_head_dim",
            f"the {cfg.ssm_heads} SSM heads are not divisible by the {n} shards of the heads axis",
        )
    if cfg.has_ssm and cfg.ssm == "mamba":
        m = shards("mlp")
        check(
            cfg.ssm_inner % m == 0,
            "ssm_expand",
            f"the SSM inner width {cfg.ssm_inner} is not divisible by the {m} shards of mlp",
        )
    if cfg.moe_every:
        check_expert_mesh(cfg.num_experts, shards("expert"))


_TOKENS = ("batch", "length")


def transformer_flops_per_token(
    cfg: TransformerConfig, seq_len: int, *, causal: bool = True
) -> float:
    """Training FLOPs per token of a decoder-only transformer (forward + backward).

    ``6 * N + 6 * L * T * N_q * H`` (causal; ``12 * L * T * N_q * H`` bidirectional), where

    - ``N`` counts the weights of every matmul a token goes through, per layer
      ``D * H * (2 N_q + 2 K)`` (q, k, v with ``K`` kv heads, o) plus the MLP's
      ``3 * D * F`` (llama: gate, up, down) or ``2 * D * F`` (gpt2: up, down), times ``L``
      layers, plus the output layer ``D * V`` (tied or not: the logits are a ``D x V`` matmul
      either way). The embedding lookup (a gather), learned positions, norms and biases are
      not counted.
    - each matmul weight costs 2 FLOPs per token forward (multiply + add) and 4 backward
      (the input's and the weight's gradients): 6 per weight per token;
    - attention's two ``T x T`` matmuls (``Q K^T`` and ``P V``) cost ``2 * 2 * T * N_q * H``
      FLOPs per token and layer forward, 3x that for training: ``12 * L * T * N_q * H``
      for the full square, halved for causal attention (only the lower triangle is needed).

    A state-space layer (``pattern`` letter "m") counts its projections' weights like any
    matmul, plus its scan's own forward work times 3: Mamba-2's SSD per token ``2 L (R S + N H)``
    (the intra-chunk scores and their product with x, chunk ``L``) ``+ 4 N H S`` (the chunk state
    and the entering state's read-out); Mamba's selective scan ``6 C S`` (decay, update and
    read-out per state, elementwise: no matmul, but it is the layer's work). Its cost does not
    grow with ``seq_len``.

    An MoE layer counts its active weights only: the router ``D * E`` plus ``3 * D * F_e`` for
    each of the ``experts_per_token`` routed and the ``num_shared_experts`` shared experts
    (Mixtral-8x7B: ~13B active of ~47B); the dispatch (sorting, gathers) is not counted.

    With LoRA (``lora_rank`` > 0) the frozen weights count 4 FLOPs per token (forward and the
    input's gradient: no weight gradient is computed) and the adapters' ``r * (in + out)``
    weights per adapted projection the full 6.

    Not counted: rematerialised recomputation (this is MFU, not hardware FLOPs utilisation),
    softmax, norms, activations and other elementwise work, the loss and the optimizer. Packed
    rows count the full ``T x T`` like unpacked ones.

    This is PaLM's convention (appendix B: ``6N + 12 L T d_attn`` per token, with ``N`` the
    non-embedding parameters) with the causal halving and the output layer that MaxText's
    ``calculate_tflops_training_per_device`` adds: its dense case is per step
    ``3 * (L * (ffn + qkv + projection) + embedding)`` learnable-weight FLOPs (``embedding`` =
    ``2 B T D V``, the logits) plus ``3 * L * attention / 2``, the same counts per token.
    (MaxText's older version and PaLM count ``6 * all parameters``, embedding table included.)

    Args:
      cfg: a ``mlgen.models.transformer.TransformerConfig`` (read: ``flavour``, ``d_model``,
        ``num_heads``, ``kv_heads``, ``head_size``, ``hidden``, ``vocab_size``,
        ``num_layers``).
      seq_len: ``T``, tokens per row.
      causal: the attention mask.
    """
    D, N, K, H, F = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_size, cfg.hidden
    mlp_mats = 3 if cfg.flavour == "llama" else 2
    n_attn = sum(mixer == "a" for mixer, _ in cfg.kinds)
    n_ssm = cfg.num_layers - n_attn
    n_mlp = n_attn + (n_ssm if cfg.ssm_mlp else 0)
    weights = n_attn * D * H * (2 * N + 2 * K) + n_mlp * mlp_mats * D * F + D * cfg.vocab_size
    if cfg.moe_every:  # active weights: the router, the k chosen and the shared experts
        active = cfg.experts_per_token + cfg.num_shared_experts
        moe_mlp = D * cfg.num_experts + 3 * D * cfg.expert_hidden * active
        weights += cfg.num_moe_layers * (moe_mlp - mlp_mats * D * F)
    scan = 0.0
    if n_ssm:
        ssm_weights, scan_fwd = _ssm_flops(cfg, seq_len)
        weights += n_ssm * ssm_weights
        scan = 3.0 * n_ssm * scan_fwd  # forward + backward (2x) of the scan's own work
    attention = 12 * n_attn * seq_len * N * H
    attention = (attention / 2 if causal else attention) + scan
    if not cfg.lora_rank:
        return 6.0 * weights + attention
    # LoRA: the frozen base costs its forward and the input gradient, 4 per weight (no weight
    # gradient); each adapter ``[in, r] + [r, out]`` the full 6.
    sizes = {"q": (D, N * H), "k": (D, K * H), "v": (D, K * H), "o": (N * H, D)}
    sizes.update(gate=(D, F), up=(D, F), down=(F, D))
    adapters = cfg.num_layers * sum(cfg.lora_rank * sum(sizes[t]) for t in cfg.adapted)
    return 4.0 * weights + 6.0 * adapters + attention


def _ssm_flops(cfg: TransformerConfig, seq_len: int) -> tuple[float, float]:
    """``(matmul weights, forward scan FLOPs per token)`` of one SSM layer."""
    D, S, C = cfg.d_model, cfg.ssm_states, cfg.ssm_inner
    if cfg.ssm == "mamba2":
        Nh, R = cfg.ssm_heads, cfg.ssm_groups
        weights = D * (2 * C + 2 * R * S + Nh) + C * D  # z, x, b, c, dt; out
        chunk = min(cfg.ssm_chunk, seq_len)
        return weights, 2.0 * chunk * (R * S + C) + 4.0 * C * S
    rank = cfg.dt_rank
    weights = 2 * D * C + C * (rank + 2 * S) + rank * C + C * D  # x, z; dt_in, b, c; dt; out
    return weights, 6.0 * C * S


FAMILY = register(
    Family(
        name="transformer",
        config=TransformerConfig,
        kind="decoder",
        build=lambda cfg, rngs, policy: Transformer(cfg, policy=policy, rngs=rngs),
        batch_axes={k: _TOKENS for k in ("inputs", "segment_ids", "positions")},
        logical_axes=frozenset(
            {
                "layers",
                "embed",
                "heads",
                "kv_heads",
                "head_dim",
                "mlp",
                "vocab",
                "norm",
                "pos",
                "expert",
                "batch",
                "length",
                "act_embed",
                "act_heads",
                "act_kv_heads",
                "act_mlp",
                "act_vocab",
            }
        ),
        check=_check_mesh,
        renamed={
            "attention_backend": "attention.backend",
            "attention_interpret": "attention.interpret",
        },
        flops_per_token=transformer_flops_per_token,
        trainable=lambda cfg: is_adapter if cfg.lora_rank else None,
    )
)
