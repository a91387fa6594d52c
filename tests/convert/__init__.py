"""Tests of ``mlgen.convert`` against transformers itself.

The golden tests build tiny random models with transformers, which needs torch. torch comes from
the ``[hf]`` extra only on Python < 3.12: this machine kind's package index holds a CPU build of
torch for Python 3.11 alone, and PyPI's torch for 3.12 needs CUDA libraries the index cannot
give (``nvidia-cudnn-cu13`` is a placeholder there), so it does not install. On the 3.12 CI leg
those modules are therefore not run (``pytest.importorskip``); the 3.11 leg runs all of them,
and the tokenizer tests (``tests/data/test_pretrained_tokenizer.py``) run on both.
"""

NO_TORCH = (
    "torch: no installable build for this Python on this machine kind's index (the [hf] extra "
    "installs it on Python < 3.12; see tests/convert/__init__.py)"
)
