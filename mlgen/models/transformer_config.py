"""The transformer's config (``TransformerConfig``: fields, derived sizes, validation) and what
follows from it by formula alone (``transformer_flops_per_token``). The model itself is
``mlgen.models.transformer``, which re-exports both."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from mlgen.config import ConfigError, check, prefixed
from mlgen.nn.core import LoRA
from mlgen.nn.moe import MoEConfig
from mlgen.nn.rope import Llama3Scaling
from mlgen.ops.attention import AttentionConfig


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
