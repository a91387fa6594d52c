"""Tiny random Hugging Face models, built offline by transformers itself (2 layers, width 64,
vocab 128, float32), saved as safetensors. Needs torch (the 3.11 CI leg; see
tests/convert/__init__.py)."""

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
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


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = BUILDERS[name]().eval()
    # Biases and norms start at 0 / 1 in transformers: randomise every parameter so that a
    # mapping that drops or swaps one cannot hide behind an initial value.
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = p.ndim == 1 and ("norm" in name or ".ln_" in name) and name.endswith("weight")
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if norm else 0.08 * torch.randn_like(p))
    return model


def save(name: str, path, **kw):
    model = build(name)
    model.save_pretrained(path, safe_serialization=True, **kw)
    return model
