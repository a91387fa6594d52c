"""A tiny trained ``tokenizer.json`` (the tokenizers package; no torch needed)."""

import json

import tokenizers

VOCAB = 128
TEXT = [
    "def hello(world):\n    return world + 1\n",
    "the quick brown fox jumps over the lazy dog\n",
    "añadir ünïcode ✓ and tabs\there\n",
] * 20


def write_tokenizer(path, vocab_size: int = VOCAB) -> tokenizers.Tokenizer:
    """A byte-level BPE ``tokenizer.json`` trained on TEXT, with ``tokenizer_config.json``
    naming its specials (ids 0, 1, 2: pad, bos, eos, as the models above)."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(TEXT, trainer)
    tok.save(str(path / "tokenizer.json"))
    specials = {"pad_token": "<pad>", "bos_token": {"content": "<s>"}, "eos_token": "</s>"}
    (path / "tokenizer_config.json").write_text(json.dumps(specials))
    return tok
