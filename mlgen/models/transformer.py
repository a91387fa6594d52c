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

The config and the FLOPs formula are in ``mlgen.models.transformer_config`` (re-exported here);
the family spec (``FAMILY``, registered as ``"transformer"``) is at the end of this file.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mlgen.config import check
from mlgen.models.family import Family, register
from mlgen.models.transformer_config import TransformerConfig, transformer_flops_per_token
from mlgen.nn.attention import KVCache, SelfAttention
from mlgen.nn.core import (
    Embed,
    LayerNorm,
    Linear,
    RMSNorm,
    dropout,
    is_adapter,
    normal_init,
    param,
)
from mlgen.nn.infini import InfiniAttention
from mlgen.nn.mlp import MLP
from mlgen.nn.moe import MoE, check_expert_mesh
from mlgen.nn.policy import Policy
from mlgen.nn.ssm import Mamba, Mamba2, SSMState
from mlgen.sharding import constrain
from mlgen.typing import Array, Float, Int

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
        # The config class lived in this module until it moved to transformer_config.
        aliases=("mlgen.models.transformer:TransformerConfig",),
        trainable=lambda cfg: is_adapter if cfg.lora_rank else None,
    )
)
