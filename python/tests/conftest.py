"""Shared fixtures: the README's example batch, random batches, the golden fixtures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

#: The crate's golden fixtures (tests/data of the repository, beside python/).
GOLDEN = Path(__file__).resolve().parents[2] / "tests" / "data"


def readme_batch(dtype=np.float32):
    """The README's first example: two responses padded to four slots; the second has a
    hole in the mask (a tool output) and padding, both holding NaN."""
    logp = np.array([[-0.2, -1.0, -0.1, -2.5], [-0.3, np.nan, -0.9, np.nan]], dtype)
    logp_old = np.array([[-0.3, -1.6, -0.1, -1.2], [-0.2, 0.0, -1.4, 0.0]], dtype)
    advantages = np.array([1.0, -1.0], dtype)
    mask = np.array([[True, True, True, True], [True, False, True, False]])
    return logp, logp_old, advantages, mask


def random_batch(seed: int, b: int, l: int, dtype=np.float64, drift: float = 0.3):
    """A batch with ragged responses, per-row advantages and NaN in the padding."""
    rng = np.random.default_rng(seed)
    logp_old = np.log(rng.uniform(0.05, 1.0, (b, l)))
    logp = np.minimum(logp_old + rng.normal(0.0, drift, (b, l)), 0.0)
    advantages = rng.normal(size=b)
    lengths = rng.integers(1, l + 1, b)
    mask = np.arange(l)[None, :] < lengths[:, None]
    logp[~mask] = np.nan
    return logp.astype(dtype), logp_old.astype(dtype), advantages.astype(dtype), mask


@pytest.fixture
def readme():
    """The README's example batch, float32."""
    return readme_batch()


OUTPUTS = ("divergence", "weight", "threshold", "keep", "reason", "token_loss", "grad", "delta_b_row")


def assert_same_bits(a, b):
    """Two Evaluations are the same bits: the loss, every output, the diagnostics."""
    assert np.float64(a.loss).tobytes() == np.float64(b.loss).tobytes()
    for name in OUTPUTS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), name
    assert a.diagnostics == b.diagnostics
    assert a.tally == b.tally
