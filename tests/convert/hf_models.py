"""Tiny random Hugging Face models, built offline by transformers itself (2-8 layers, width 64,
vocab 128, float32), saved as safetensors. Needs torch (the 3.11 CI leg; see
tests/convert/__init__.py)."""

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    JambaConfig,
    JambaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Mamba2Config,
    Mamba2ForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from tests.convert.tokenizer_files import TEXT, VOCAB, write_tokenizer  # noqa: F401

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # short, so that a 16-dim head has frequencies in all three bands (scaled, blended, kept)
    "original_max_position_embeddings": 16,
    "rope_theta": 10000.0,
}

# name -> () -> a transformers model
BUILDERS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**_COMMON, rope_theta=5000.0)),
    "llama_tied": lambda: LlamaForCausalLM(
        LlamaConfig(**_COMMON, tie_word_embeddings=True, rms_norm_eps=1e-5)
    ),
    "llama3_rope": lambda: LlamaForCausalLM(LlamaConfig(**_COMMON, rope_parameters=LLAMA3_ROPE)),
    # a window shorter than the test sequences (24 tokens)
    "mistral": lambda: MistralForCausalLM(MistralConfig(**_COMMON, sliding_window=8)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**_COMMON)),  # q/k/v biases
    # 4 experts, top-2, every layer an MoE layer
    "mixtral": lambda: MixtralForCausalLM(
        MixtralConfig(**_COMMON, num_local_experts=4, num_experts_per_tok=2)
    ),
    "gpt2": lambda: GPT2LMHeadModel(
        GPT2Config(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
        )
    ),
}


_IDS = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_MAMBA2 = dict(
    _IDS,
    hidden_size=64,
    num_hidden_layers=2,
    num_heads=8,
    head_dim=16,
    state_size=16,
    n_groups=2,
    chunk_size=8,  # the tests' lengths are no multiple of it
)
_JAMBA = dict(
    _IDS,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts=4,
    num_experts_per_tok=2,
    mamba_d_state=8,
)

# State-space and hybrid models (import only: not in BUILDERS, whose models also export).
SSM_BUILDERS = {
    "mamba2": lambda: Mamba2ForCausalLM(Mamba2Config(**_MAMBA2)),
    "mamba2_bias_tied": lambda: Mamba2ForCausalLM(
        Mamba2Config(**_MAMBA2, use_bias=True, use_conv_bias=False, tie_word_embeddings=True)
    ),
    # 6 layers in 2 scan groups of "m m a+MoE": a stacked run of 2 Mamba layers, then one.
    "jamba": lambda: JambaForCausalLM(
        JambaConfig(
            **_JAMBA,
            num_hidden_layers=6,
            attn_layer_period=3,
            attn_layer_offset=2,
            expert_layer_period=3,
            expert_layer_offset=2,
        )
    ),
    # "a m+MoE" twice: MoE on the Mamba layers, biases on the Mamba projections, tied embeddings.
    "jamba_bias_tied": lambda: JambaForCausalLM(
        JambaConfig(
            **_JAMBA,
            num_hidden_layers=4,
            attn_layer_period=2,
            attn_layer_offset=0,
            expert_layer_period=2,
            expert_layer_offset=1,
            mamba_proj_bias=True,
            mamba_conv_bias=False,
            tie_word_embeddings=True,
        )
    ),
}


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = {**BUILDERS, **SSM_BUILDERS}[name]().eval()
    # Biases and norms start at 0 / 1 in transformers: randomise every parameter so that a
    # mapping that drops or swaps one cannot hide behind an initial value. The SSM decays
    # (A_log) and time steps (dt biases) are jittered around their initial values instead,
    # which keep the recurrence in its usual range.
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = p.ndim == 1 and ("norm" in name or ".ln_" in name) and name.endswith("weight")
            if name.endswith(("A_log", "dt_bias", "dt_proj.bias")):
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if norm else 0.08 * torch.randn_like(p))
    return model


def save(name: str, path, **kw):
    model = build(name)
    model.save_pretrained(path, safe_serialization=True, **kw)
    return model
