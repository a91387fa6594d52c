"""Reading a Hugging Face checkpoint directory slice by slice (``safetensors``, never pickle).

:class:`Checkpoint` opens ``model.safetensors`` or the shards that
``model.safetensors.index.json`` lists, and reads any slice of a tensor without loading the rest
(``safe_open(...).get_slice``). :func:`read` assembles the slice of an mlgen parameter (a stacked
one: from one tensor per layer) that a device's shard covers.
"""

from __future__ import annotations

import contextlib
import json
import math
import os

import numpy as np
from safetensors import safe_open

from mlgen.convert.layout import IGNORED_SUFFIXES
from mlgen.convert.source import ConvertError, Source

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
_PICKLED = (".bin", ".pt", ".pth", ".ckpt")


def read_config(path: str) -> dict:
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise ConvertError(f"{path}: no config.json (not a Hugging Face model directory)")
    with open(file) as f:
        return json.load(f)


class Checkpoint(contextlib.AbstractContextManager):
    """The tensors of a model directory: ``names``, ``shape(name)``, ``read(name, slices)``."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, INDEX)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.isfile(os.path.join(path, WEIGHTS)):
            weight_map = None
        else:
            pickled = sorted(n for n in os.listdir(path) if n.endswith(_PICKLED))
            found = f"only pickled weights ({', '.join(pickled)})" if pickled else "no weights"
            raise ConvertError(
                f"{path}: {found}, no {WEIGHTS} (mlgen reads safetensors only, never unpickles): "
                "convert them with transformers: AutoModelForCausalLM.from_pretrained(path)"
                ".save_pretrained(path, safe_serialization=True)"
            )
        self._stack = contextlib.ExitStack()
        self._files: dict[str, object] = {}
        files = sorted(set(weight_map.values())) if weight_map else [WEIGHTS]
        self.where: dict[str, object] = {}
        for name in files:
            full = os.path.join(path, name)
            if not os.path.isfile(full):
                raise ConvertError(f"{INDEX}: lists {name}, which is not in {path}")
            handle = self._stack.enter_context(safe_open(full, framework="numpy"))
            self._files[name] = handle
        for name, handle in self._files.items():
            for key in handle.keys():
                if weight_map is None or weight_map.get(key) == name:
                    self.where[key] = handle

    def __exit__(self, *exc) -> None:
        self._stack.close()

    @property
    def names(self) -> set[str]:
        return {n for n in self.where if not n.endswith(IGNORED_SUFFIXES)}

    def _slice(self, name: str):
        if name not in self.where:
            raise ConvertError(f"{name}: missing from the checkpoint in {self.path}")
        return self.where[name].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def read(self, name: str, slices: tuple[slice, ...]) -> np.ndarray:
        return self._slice(name)[slices]


def check_shapes(ckpt: Checkpoint, src: Source, shape: tuple[int, ...], lead: tuple[int, ...]):
    """Raises a one-line :class:`ConvertError` naming the first tensor of ``src`` that is
    missing or does not have the shape the config gives it (``shape``: mlgen's, per tensor;
    ``lead``: the sizes of the dimensions that index tensors, layers and experts)."""
    want = src.tensor_shape(shape)
    for name in src.names(tuple(range(n) for n in lead)):
        got = ckpt.shape(name)
        if got != want:
            raise ConvertError(
                f"{name}: shape {got} in the checkpoint, but config.json gives {want}"
            )


def read(
    ckpt: Checkpoint,
    src: Source,
    shape: tuple[int, ...],
    index: tuple[slice, ...],
    *,
    lead: int,
    dtype,
) -> np.ndarray:
    """The block ``index`` of an mlgen parameter of ``shape`` (whose ``lead`` leading
    dimensions index tensors: layers, experts), read from the checkpoint slices that hold it
    and nothing more."""
    index = tuple(s.indices(n) for s, n in zip(index, shape))
    outer, index, inner = index[:lead], index[lead:], shape[lead:]
    ranges = tuple(range(a, b) for a, b, _ in outer)
    blocks = [_read_one(ckpt, src, name, inner, index, dtype) for name in src.names(ranges)]
    if not lead:
        return blocks[0]
    return np.stack(blocks).reshape(tuple(len(r) for r in ranges) + blocks[0].shape)


def _read_one(ckpt, src: Source, name: str, shape, index, dtype) -> np.ndarray:
    # Per checkpoint dimension: the rows of its outermost mlgen dimension that the block needs,
    # with the inner ones whole (a contiguous range); inner dimensions are cut afterwards.
    slices = []
    for j, group in enumerate(src.groups):
        if not group:  # a size-1 dimension that holds no mlgen dimension
            slices.append(slice(None))
            continue
        inner = math.prod(shape[d] for d in group[1:])
        start, stop, _ = index[group[0]]
        off = src.offset[1] if src.offset is not None and src.offset[0] == j else 0
        slices.append(slice(off + start * inner, off + stop * inner))
    block = np.asarray(ckpt.read(name, tuple(slices)))
    order = [d for g in src.groups for d in g]
    dims = [
        (index[d][1] - index[d][0]) if k == 0 else shape[d]
        for g in src.groups
        for k, d in enumerate(g)
    ]
    block = block.reshape(dims)
    cut = tuple(
        slice(None) if k == 0 else slice(index[d][0], index[d][1])
        for g in src.groups
        for k, d in enumerate(g)
    )
    block = block[cut].transpose(np.argsort(order))
    return block.astype(dtype)
