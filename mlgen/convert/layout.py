"""Where each mlgen transformer parameter lives in a Hugging Face checkpoint, and how the two
configs map onto each other.

A parameter of mlgen's transformer (stacked blocks: a leading layers axis) is made of one
Hugging Face tensor per layer. :class:`Source` says which tensor and how its dimensions hold
mlgen's: each checkpoint dimension holds one or several consecutive mlgen dimensions
(``q_proj.weight`` ``[N*H, D]`` holds mlgen's ``q.kernel`` ``[D, N, H]`` as ``((1, 2), (0,))``),
and GPT-2's fused ``c_attn`` holds q, k and v side by side (``offset``). Importing and exporting
both read these tables; nothing else knows a Hugging Face name.

Supported: ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` (the llama
flavour), ``MixtralForCausalLM`` (the llama flavour with an MoE layer in every block: one
checkpoint tensor per layer and expert, ``{i}`` and ``{j}`` in its name) and ``GPT2LMHeadModel``
(the gpt2 flavour); ``Mamba2ForCausalLM`` and ``JambaForCausalLM`` (state-space and hybrid
stacks, import only: their tables are in ``layout_ssm``).
"""

from __future__ import annotations

from typing import Any

from mlgen.convert.layout_ssm import (
    JAMBA,
    MAMBA2,
    jamba_config,
    jamba_sources,
    mamba2_config,
    mamba2_sources,
)
from mlgen.convert.source import ConvertError, Source, need, validated
from mlgen.models.transformer import TransformerConfig

LLAMA_FAMILY = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "MixtralForCausalLM": "mixtral",
}
MIXTRAL = "MixtralForCausalLM"
GPT2 = "GPT2LMHeadModel"
ARCHITECTURES = (*LLAMA_FAMILY, GPT2, MAMBA2, JAMBA)

# Buffers some checkpoints carry that are no parameters (recomputed by every implementation).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


def _key(path: tuple[str, ...]) -> str:
    return "/".join(path)


def sources(cfg: TransformerConfig, arch: str, prefix: str = "") -> dict[str, Source]:
    """mlgen parameter path (``blocks/attn/q/kernel``) -> its :class:`Source`.

    ``prefix``: GPT-2 checkpoints name their tensors ``transformer.h.0...`` or ``h.0...``.
    """
    if arch == GPT2:
        return _gpt2(cfg, prefix)
    if arch == MAMBA2:
        return mamba2_sources(cfg)
    if arch == JAMBA:
        return jamba_sources(cfg)
    if arch not in LLAMA_FAMILY:
        raise ConvertError(_unknown(arch))
    L = "model.layers.{i}."
    out = {
        "embed/embedding": Source("model.embed_tokens.weight", ((0,), (1,))),
        "final_norm/scale": Source("model.norm.weight", ((0,),)),
        "blocks/attn_norm/scale": Source(L + "input_layernorm.weight", ((0,),)),
        "blocks/mlp_norm/scale": Source(L + "post_attention_layernorm.weight", ((0,),)),
        "blocks/attn/o/kernel": Source(L + "self_attn.o_proj.weight", ((2,), (0, 1))),
    }
    if arch == MIXTRAL:
        moe = L + "block_sparse_moe."
        out["blocks/moe/router/kernel"] = Source(moe + "gate.weight", ((1,), (0,)))
        for ours, theirs in (("gate", "w1"), ("down", "w2"), ("up", "w3")):
            out[f"blocks/moe/{ours}"] = Source(moe + f"experts.{{j}}.{theirs}.weight", ((1,), (0,)))
    else:
        for p in ("gate", "up", "down"):
            out[f"blocks/mlp/{p}/kernel"] = Source(L + f"mlp.{p}_proj.weight", ((1,), (0,)))
    for p in "qkv":
        out[f"blocks/attn/{p}/kernel"] = Source(L + f"self_attn.{p}_proj.weight", ((1, 2), (0,)))
        if cfg.qkv_bias:
            out[f"blocks/attn/{p}/bias"] = Source(L + f"self_attn.{p}_proj.bias", ((0, 1),))
    if not cfg.tied:
        out["head/kernel"] = Source("lm_head.weight", ((1,), (0,)))
    return out


def _gpt2(cfg: TransformerConfig, prefix: str) -> dict[str, Source]:
    L = prefix + "h.{i}."
    D = cfg.num_heads * cfg.head_size
    out = {
        "embed/embedding": Source(prefix + "wte.weight", ((0,), (1,))),
        "pos_embed": Source(prefix + "wpe.weight", ((0,), (1,))),
        "final_norm/scale": Source(prefix + "ln_f.weight", ((0,),)),
        "final_norm/bias": Source(prefix + "ln_f.bias", ((0,),)),
        "blocks/attn/o/kernel": Source(L + "attn.c_proj.weight", ((0, 1), (2,))),
        "blocks/attn/o/bias": Source(L + "attn.c_proj.bias", ((0,),)),
        "blocks/mlp/up/kernel": Source(L + "mlp.c_fc.weight", ((0,), (1,))),
        "blocks/mlp/up/bias": Source(L + "mlp.c_fc.bias", ((0,),)),
        "blocks/mlp/down/kernel": Source(L + "mlp.c_proj.weight", ((0,), (1,))),
        "blocks/mlp/down/bias": Source(L + "mlp.c_proj.bias", ((0,),)),
    }
    for norm, hf in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
        out[f"blocks/{norm}/scale"] = Source(L + f"{hf}.weight", ((0,),))
        out[f"blocks/{norm}/bias"] = Source(L + f"{hf}.bias", ((0,),))
    for j, p in enumerate("qkv"):
        out[f"blocks/attn/{p}/kernel"] = Source(
            L + "attn.c_attn.weight", ((0,), (1, 2)), offset=(1, j * D, 3 * D)
        )
        out[f"blocks/attn/{p}/bias"] = Source(
            L + "attn.c_attn.bias", ((0, 1),), offset=(0, j * D, 3 * D)
        )
    if not cfg.tied:
        out["head/kernel"] = Source("lm_head.weight", ((1,), (0,)))
    return out


def flatten(tree: dict, prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    """``{"a": {"b": x}}`` -> ``{"a/b": x}`` (mlgen parameter paths)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, (*prefix, str(k))))
        else:
            out["/".join((*prefix, str(k)))] = v
    return out


def nest(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        *parents, leaf = path.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def _unknown(arch: Any) -> str:
    return f"architectures: {arch!r} is not supported; mlgen converts {list(ARCHITECTURES)}"


# ----------------------------------------------------------------------------- configs
def architecture(hf: dict) -> str:
    archs = hf.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise ConvertError(_unknown(archs[0] if len(archs) == 1 else archs))
    return archs[0]


def _rope(hf: dict) -> tuple[float, dict]:
    """``(theta, scaling dict)`` from transformers' ``rope_parameters`` (v5) or the older
    ``rope_theta`` + ``rope_scaling``."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    theta = float(hf.get("rope_theta", params.get("rope_theta", 10000.0)))
    scaling = {**params, **legacy}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    need(
        kind in ("default", "llama3"),
        "rope_scaling",
        f"rope type {kind!r} is not supported (mlgen has 'default' and 'llama3')",
    )
    return theta, scaling if kind == "llama3" else {}


def to_mlgen(hf: dict) -> tuple[str, TransformerConfig]:
    """``(architecture, TransformerConfig)`` of a Hugging Face ``config.json`` dict."""
    arch = architecture(hf)
    if arch == MAMBA2:
        return arch, mamba2_config(hf)
    if arch == JAMBA:
        return arch, jamba_config(hf)
    if arch == GPT2:
        act = hf.get("activation_function", "gelu_new")
        need(
            act in ("gelu_new", "gelu_pytorch_tanh"),
            "activation_function",
            f"{act!r} (mlgen's GPT-2 MLP is the tanh GELU)",
        )
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            need(not hf.get(flag, False), flag, "not supported")
        need(hf.get("scale_attn_weights", True), "scale_attn_weights", "must be true")
        cfg = TransformerConfig(
            flavour="gpt2",
            vocab_size=hf["vocab_size"],
            num_layers=hf["n_layer"],
            d_model=hf["n_embd"],
            num_heads=hf["n_head"],
            mlp_dim=hf.get("n_inner") or 0,
            max_len=hf["n_positions"],
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            tie_embeddings=hf.get("tie_word_embeddings", True),
        )
        return arch, validated(cfg)
    kind = LLAMA_FAMILY[arch]
    need(hf.get("hidden_act", "silu") == "silu", "hidden_act", f"{hf.get('hidden_act')!r}")
    need(not hf.get("mlp_bias", False), "mlp_bias", "MLP biases are not supported")
    need(
        not hf.get("attention_bias", False) or kind == "qwen2",
        "attention_bias",
        "biases on q/k/v and o are not supported (Qwen2's q/k/v biases are)",
    )
    need(hf.get("pretraining_tp", 1) == 1, "pretraining_tp", "must be 1")
    theta, scaling = _rope(hf)
    window = 0
    if kind == "mistral":
        window = hf.get("sliding_window") or 0
    elif kind == "qwen2" and hf.get("use_sliding_window", False):
        need(
            hf.get("max_window_layers", 0) == 0,
            "max_window_layers",
            "a sliding window on some layers only is not supported",
        )
        window = hf.get("sliding_window") or 0
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    moe = {}
    if kind == "mixtral":
        moe = dict(
            moe_every=1,
            num_experts=hf["num_local_experts"],
            experts_per_token=hf["num_experts_per_tok"],
            moe_lb_weight=float(hf.get("router_aux_loss_coef", 0.001)),
            moe_z_weight=0.0,  # Mixtral trains with the load-balancing loss alone
        )
        need(
            not hf.get("router_jitter_noise", 0.0),
            "router_jitter_noise",
            "router noise is not supported",
        )
        window = hf.get("sliding_window") or 0
    rope = {}
    if scaling:
        rope = dict(
            rope_scaling="llama3",
            rope_scaling_factor=float(scaling["factor"]),
            rope_low_freq_factor=float(scaling["low_freq_factor"]),
            rope_high_freq_factor=float(scaling["high_freq_factor"]),
            rope_original_max_len=int(scaling["original_max_position_embeddings"]),
        )
    cfg = TransformerConfig(
        flavour="llama",
        vocab_size=hf["vocab_size"],
        num_layers=hf["num_hidden_layers"],
        d_model=hf["hidden_size"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        mlp_dim=hf["intermediate_size"],
        max_len=hf.get("max_position_embeddings", 2048),
        rope_theta=theta,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=kind == "qwen2",
        sliding_window=int(window),
        **rope,
        **moe,
    )
    return arch, validated(cfg)


def export_architecture(cfg: TransformerConfig) -> str:
    """The Hugging Face class an mlgen config exports as."""
    if cfg.has_ssm:
        raise ConvertError(
            f"model.pattern: {cfg.pattern!r} has SSM layers, which mlgen does not export "
            f"({MAMBA2} and {JAMBA} are import only)"
        )
    if cfg.flavour == "llama" and not cfg.rope_theta:
        raise ConvertError(
            "model.rope_theta: 0 (no RoPE) has no Hugging Face Llama-family class to export as"
        )
    if cfg.flavour == "gpt2":
        if cfg.kv_heads != cfg.num_heads or cfg.head_size * cfg.num_heads != cfg.d_model:
            raise ConvertError(
                "model.num_kv_heads: GPT-2 has multi-head attention with head_dim = "
                "d_model / num_heads; this model cannot be exported as GPT2LMHeadModel"
            )
        return GPT2
    if cfg.moe_every:
        mixtral = (
            cfg.moe_every == 1
            and not cfg.num_shared_experts
            and cfg.moe_score == "softmax"
            and cfg.moe_renormalize
            and not cfg.qkv_bias
        )
        if not mixtral:
            raise ConvertError(
                "model.moe_every: only Mixtral's MoE (every layer, softmax top-k renormalised, "
                "no shared experts, no q/k/v biases) is exported"
            )
        return MIXTRAL
    if cfg.qkv_bias:
        if cfg.sliding_window:
            raise ConvertError(
                "model.sliding_window: a model with q/k/v biases (Qwen2) and a sliding window "
                "is not exported"
            )
        return "Qwen2ForCausalLM"
    return "MistralForCausalLM" if cfg.sliding_window else "LlamaForCausalLM"


def to_hf(cfg: TransformerConfig, dtype: str) -> dict:
    """A Hugging Face ``config.json`` dict for ``cfg`` (``dtype``: the tensors' dtype)."""
    arch = export_architecture(cfg)
    common = dict(
        architectures=[arch],
        vocab_size=cfg.vocab_size,
        dtype=dtype,
        torch_dtype=dtype,  # transformers before v5
        tie_word_embeddings=cfg.tied,
    )
    if arch == GPT2:
        return dict(
            common,
            model_type="gpt2",
            n_layer=cfg.num_layers,
            n_embd=cfg.d_model,
            n_head=cfg.num_heads,
            n_inner=cfg.mlp_dim or None,
            n_positions=cfg.max_len,
            layer_norm_epsilon=cfg.norm_eps,
            activation_function="gelu_new",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "llama3":
        rope.update(
            rope_type="llama3",
            factor=cfg.rope_scaling_factor,
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_max_len,
        )
    out = dict(
        common,
        model_type=LLAMA_FAMILY[arch],
        num_hidden_layers=cfg.num_layers,
        hidden_size=cfg.d_model,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_size,
        intermediate_size=cfg.hidden,
        hidden_act="silu",
        max_position_embeddings=cfg.max_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        rope_parameters=rope,
        rope_scaling=rope if cfg.rope_scaling == "llama3" else None,
        attention_dropout=0.0,
    )
    if arch == "LlamaForCausalLM":
        out.update(attention_bias=False, mlp_bias=False)
    if arch == "MistralForCausalLM":
        out["sliding_window"] = cfg.sliding_window
    if arch == "Qwen2ForCausalLM":
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=0)
    if arch == MIXTRAL:
        out.update(
            intermediate_size=cfg.expert_hidden,
            num_local_experts=cfg.num_experts,
            num_experts_per_tok=cfg.experts_per_token,
            router_aux_loss_coef=cfg.moe_lb_weight,
            router_jitter_noise=0.0,
            output_router_logits=False,
            sliding_window=cfg.sliding_window or None,
        )
    return out
