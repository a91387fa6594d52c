"""Tunables of the blocked backends: frozen ``BlockSizes`` with per-shape defaults.

A backend clamps its block sizes to the (padded) problem so that tiny inputs do not pay
for a 512-wide block of padding. Defaults were picked on the hardware named beside them.
"""

from __future__ import annotations

import dataclasses

from mlgen.ops.attention._common import next_pow2, round_up


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """Query / key block sizes for forward and backward passes.

    Attributes:
      block_q: query rows per block in the forward pass (and the dQ pass).
      block_k: key rows per block in the forward pass (and the dQ pass).
      block_q_bwd: query rows per block in the dK/dV pass.
      block_k_bwd: key rows per block in the dK/dV pass.
    """

    block_q: int = 128
    block_k: int = 128
    block_q_bwd: int = 128
    block_k_bwd: int = 128

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"BlockSizes.{f.name} must be a positive int, got {v!r}")

    def clamp(self, T: int, S: int, multiple: int = 8) -> "BlockSizes":
        """Shrink blocks larger than the sequence (rounded up to ``multiple``)."""
        tq, tk = round_up(T, multiple), round_up(S, multiple)
        return BlockSizes(
            block_q=min(self.block_q, tq),
            block_k=min(self.block_k, tk),
            block_q_bwd=min(self.block_q_bwd, tq),
            block_k_bwd=min(self.block_k_bwd, tk),
        )


def blockwise_default(T: int, S: int, H: int) -> BlockSizes:
    # CPU (2 cores, AVX2): 512x512 blocks keep a [N, 512, 512] f32 score tile (8 MiB at N=8)
    # in cache-friendly dots; smaller blocks pay the while-loop overhead, bigger ones memory.
    del H
    return BlockSizes(block_q=512, block_k=512, block_q_bwd=512, block_k_bwd=512).clamp(T, S)


def pallas_gpu_default(T: int, S: int, H: int) -> BlockSizes:
    # Triton-style tiles: 128x64 forward fits shared memory up to H=128; halve for H=256.
    # The kernels take powers of two only (block iota ranges), so a short sequence gets the
    # power of two that covers it (T=77: 128, not 80).
    bk = 64 if H <= 128 else 32
    tq, tk = max(16, next_pow2(T)), max(16, next_pow2(S))
    return BlockSizes(
        block_q=min(128, tq), block_k=min(bk, tk), block_q_bwd=min(64, tq), block_k_bwd=min(bk, tk)
    )


def pallas_tpu_default(T: int, S: int, H: int) -> BlockSizes:
    # Mosaic: key blocks are the lane dimension of the score tile, so multiples of 128.
    del H
    bs = BlockSizes(block_q=512, block_k=512, block_q_bwd=256, block_k_bwd=512)
    return bs.clamp(T, S, multiple=128)
