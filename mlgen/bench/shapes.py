"""The peers' default shapes (``../shared/peers/*.py``), written once.

A speed claim is a ratio against a peer run on the same shape, so the shape is data, not a
convention kept in two places: ``mlgen bench train|generate|diffusion`` take their shape flags'
defaults from here (:meth:`Shape.add_flags`), ``mlgen bench all`` runs them with no shape flag,
and ``mlgen bench compare`` passes :meth:`Shape.argv` to both sides, the peer's own defaults
notwithstanding, so that a peer whose defaults drift is still measured on this shape.
"""

from __future__ import annotations

import argparse
import dataclasses

Value = int | str | tuple[int, ...]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Shape:
    """Flag values (``name`` -> value; ``layers_per_block`` is ``--layers-per-block``) that
    the peer script and mlgen's bench both take."""

    flags: tuple[tuple[str, Value], ...]

    def argv(self) -> list[str]:
        """The flags as a command line: ``["--layers", "6", "--channels", "64", "128", ...]``."""
        out = []
        for name, v in self.flags:
            out.append("--" + name.replace("_", "-"))
            out += [str(x) for x in v] if isinstance(v, tuple) else [str(v)]
        return out

    def add_flags(self, ap: argparse.ArgumentParser) -> None:
        """Adds one flag per value to ``ap``, defaulting to it (a tuple: ``nargs="+"``)."""
        for name, v in self.flags:
            flag = "--" + name.replace("_", "-")
            if isinstance(v, tuple):
                ap.add_argument(flag, type=type(v[0]), nargs="+", default=list(v))
            else:
                ap.add_argument(flag, type=type(v), default=v)

    def describe(self) -> str:
        """One line for a table: ``layers 6, width 384, ...``."""
        return ", ".join(
            f"{name.replace('_', ' ')} {' '.join(map(str, v)) if isinstance(v, tuple) else v}"
            for name, v in self.flags
        )


# lm_train.py and jax_minimal_lm_train.py: GPT-2, AdamW, float32.
LM_TRAIN = Shape(
    flags=(("layers", 6), ("width", 384), ("heads", 6), ("seq", 256), ("batch", 8), ("vocab", 512))
)
# lm_generate.py: KV-cache sampling, temperature 1, top-k 50, no early stop.
LM_GENERATE = Shape(
    flags=(
        ("layers", 6),
        ("width", 384),
        ("heads", 6),
        ("vocab", 512),
        ("batch", 8),
        ("prompt", 32),
        ("new", 224),
    )
)
# unet_train.py: 16x16x1 images, DDPM eps prediction, AdamW, float32.
UNET_TRAIN = Shape(
    flags=(("size", 16), ("channels", (64, 128)), ("layers_per_block", 2), ("batch", 64))
)
# The attention inside LM_TRAIN's step (no peer times attention alone): causal, B=8, T=256,
# 6 heads of 64.
LM_ATTENTION = Shape(flags=(("batch", 8), ("lengths", "256"), ("heads", 6), ("head_dim", 64)))
