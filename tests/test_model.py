"""The verification metric: a NaN or inf where the original is finite is never a pass."""

import math

import numpy as np
import pytest

from rotaq.model import max_rel_error


def test_nan_output_is_an_infinite_error():
    ref = [np.array([[1.0, -2.0, 4.0]], np.float32)]
    assert math.isinf(max_rel_error(ref, [np.array([[1.0, np.nan, 4.0]], np.float32)]))
    assert math.isinf(max_rel_error(ref, [np.array([[1.0, -2.0, np.inf]], np.float32)]))
    assert max_rel_error(ref, [np.array([[1.0, -2.0, 4.2]], np.float32)]) == pytest.approx(0.05, rel=1e-5)


def test_matching_non_finite_values_are_no_error():
    ref = [np.array([0.5, -np.inf, np.nan])]  # masked logits, a NaN both sides
    assert max_rel_error(ref, [np.array([0.5, -np.inf, np.nan])]) == 0.0
    assert max_rel_error(ref, [np.array([0.55, -np.inf, np.nan])]) == pytest.approx(0.1)
