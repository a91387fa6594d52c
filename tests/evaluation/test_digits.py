"""Digit scoring: the Fréchet distance."""

import numpy as np
import pytest

from mlgen.evaluation.digits import frechet_distance


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4000, 3))
    assert frechet_distance(a, rng.standard_normal((4000, 3))) < 0.02
    assert frechet_distance(a, rng.standard_normal((4000, 3)) + 1.0) == pytest.approx(3.0, abs=0.1)
