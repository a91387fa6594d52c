"""Captions for labelled images: class names through caption templates, tokenized.

Text-to-image training on the digits needs prompts: each example gets a caption of its class
drawn from :data:`TRAIN_TEMPLATES` at random, per example and per epoch (a grain random map
seeded by the run, so resumed runs draw the same); validation and ``mlgen eval`` use
:data:`EVAL_TEMPLATES`, phrasings never seen in training. A template is a format string
with ``{word}`` (``seven``) and ``{digit}`` (``7``).

Captions become ``text_tokens`` int32 ``[S]`` (cut or padded to ``S = max_len`` with the
tokenizer's pad id) and ``text_mask`` int32 ``[S]`` (1 = a real token, 0 = padding); the empty
prompt is all padding (the learned null condition of :mod:`mlgen.models.text`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import grain
import numpy as np

from mlgen.data.tokenizer import Tokenizer

__all__ = [
    "DIGIT_WORDS",
    "EVAL_TEMPLATES",
    "TRAIN_TEMPLATES",
    "CaptionMap",
    "caption",
    "class_prompts",
    "get_tokenizer",
    "tokenize",
]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TRAIN_TEMPLATES = (
    "a handwritten {word}",
    "the digit {digit}",
    "number {word}",
    "{digit}",
    "{word}",
    "a picture of a {digit}",
    "the number {word}",
    "digit {word}",
    "a handwritten {digit}",
    "an image of the number {digit}",
)
EVAL_TEMPLATES = (
    "a drawing of a {word}",
    "the numeral {digit}",
    "handwritten number {digit}",
    "a {word}",
)


def caption(template: str, label: int) -> str:
    """``template`` filled for class ``label`` (a digit 0-9)."""
    return template.format(word=DIGIT_WORDS[label], digit=str(label))


def class_prompts(
    num_classes: int, templates: Sequence[str] = EVAL_TEMPLATES
) -> list[tuple[int, str]]:
    """``(label, prompt)`` for every class and template, class-major."""
    return [(c, caption(t, c)) for c in range(num_classes) for t in templates]


@functools.lru_cache(maxsize=8)
def get_tokenizer(name: str) -> Tokenizer:
    """``byte`` or a sentencepiece model path (``Tokenizer.load``)."""
    return Tokenizer.load(name)


def tokenize(tokenizer: Tokenizer, prompts: Sequence[str], max_len: int) -> dict[str, np.ndarray]:
    """``{"text_tokens", "text_mask"}`` int32 ``[len(prompts), max_len]`` (cut / padded)."""
    tokens = np.full((len(prompts), max_len), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(prompts), max_len), np.int32)
    for i, p in enumerate(prompts):
        ids = tokenizer.encode(p)[:max_len]
        tokens[i, : len(ids)] = ids
        mask[i, : len(ids)] = 1
    return {"text_tokens": tokens, "text_mask": mask}


class CaptionMap(grain.transforms.RandomMap):
    """Adds ``text_tokens`` / ``text_mask`` to an example from its ``labels``: a template drawn
    at random (per example, per epoch: grain seeds each element's draw by its index)."""

    def __init__(self, tokenizer_name: str, max_len: int, templates: Sequence[str]):
        self.tokenizer_name, self.max_len = tokenizer_name, max_len
        self.templates = tuple(templates)

    def random_map(self, element, rng: np.random.Generator):
        template = self.templates[int(rng.integers(len(self.templates)))]
        text = caption(template, int(element["labels"]))
        row = tokenize(get_tokenizer(self.tokenizer_name), [text], self.max_len)
        return dict(element, **{k: v[0] for k, v in row.items()})
