"""Every attention backend against the reference (forward and gradients)."""

from mlgen.ops.attention import BlockSizes

from .attention_test_base import CASES, AttentionTestBase

_PALLAS_CASES = ("causal_gqa2_b2", "causal_decode_mqa", "segment_pair_empty_rows", "window_causal")
_PALLAS_SLOW = tuple(n for n in CASES if n not in _PALLAS_CASES)


class TestXla(AttentionTestBase):
    backend = "xla"


class TestBlockwise(AttentionTestBase):
    backend = "blockwise"
    # Small, unequal blocks so every case spans several query and key blocks.
    block_sizes = BlockSizes(block_q=16, block_k=8, block_q_bwd=8, block_k_bwd=16)


class TestBlockwiseDefaultBlocks(AttentionTestBase):
    backend = "blockwise"
    cases = ("causal_decode_mqa", "window_bidir_segments")


class TestAuto(AttentionTestBase):
    backend = "auto"
    cases = ("causal_gqa2_b2", "segment_pair_empty_rows")


class TestPallasGpuInterpret(AttentionTestBase):
    backend = "pallas_gpu"
    interpret = True
    block_sizes = BlockSizes(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)
    cases = _PALLAS_CASES
    slow_cases = _PALLAS_SLOW


class TestPallasGpuDefaultBlocks(AttentionTestBase):
    """The backend's own default block sizes (``block_sizes.pallas_gpu_default``) at lengths that
    are no power of two."""

    backend = "pallas_gpu"
    interpret = True
    cases = ("causal_gqa2_t77", "cross_gqa2")


class TestPallasTpuInterpret(AttentionTestBase):
    backend = "pallas_tpu"
    interpret = True
    # The interpreter accepts multiples of 8; on a TPU these must be multiples of 128.
    block_sizes = BlockSizes(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=8)
    cases = _PALLAS_CASES
    slow_cases = _PALLAS_SLOW


class TestReferenceThroughApi(AttentionTestBase):
    backend = "reference"
    cases = ("causal_decode_mqa",)
