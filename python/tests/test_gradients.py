"""The returned grad is dL/dlogp: central finite differences of the loss."""

from __future__ import annotations

import numpy as np
import pytest

import cppo
from conftest import random_batch, readme_batch

H = 1e-6

# Configs whose loss is smooth in logp (no mask decision to flip) ...
SMOOTH = [
    {"rule": "none"},
    {"rule": "none", "aggregation": "seq-mean-token-mean"},
    {"rule": "none", "aggregation": "seq-mean-token-sum-norm", "norm_length": 16},
    {"rule": "none", "objective": "gspo"},
    {"rule": "none", "objective": "gmpo"},
    {"rule": "none", "objective": {"kind": "sapo"}},
    {"rule": "none", "kl": {"estimator": "k3", "coef": 0.1}},
]


def _fd_check(logp, logp_old, adv, mask, cfg, **kw):
    """Central differences at every response position, where the decisions at ±h are
    those at logp (the loss is smooth there); returns how many were checked."""
    ev = cppo.evaluate(logp, logp_old, adv, mask, cfg, **kw)
    checked = 0
    for i, j in zip(*np.nonzero(mask)):
        up, down = logp.copy(), logp.copy()
        up[i, j] += H
        down[i, j] -= H
        if up[i, j] > 0:
            continue
        e_up = cppo.evaluate(up, logp_old, adv, mask, cfg, **kw)
        e_down = cppo.evaluate(down, logp_old, adv, mask, cfg, **kw)
        if not ((e_up.keep == ev.keep).all() and (e_down.keep == ev.keep).all()):
            continue  # a decision flips within ±h: not differentiable here
        fd = (e_up.loss - e_down.loss) / (2 * H)
        assert fd == pytest.approx(ev.grad[i, j], rel=1e-5, abs=1e-8), (cfg, i, j)
        checked += 1
    # Off the mask the gradient is 0.
    assert (ev.grad[~mask] == 0).all()
    return checked


@pytest.mark.parametrize("cfg", SMOOTH, ids=lambda c: str(c))
def test_finite_differences_smooth(cfg):
    """Smooth configs: the gradient equals central differences at every response token."""
    logp, logp_old, adv, mask = random_batch(7, 4, 9, drift=0.2)
    kw = {}
    if "kl" in cfg:
        kw["logp_ref"] = np.where(mask, logp_old - 0.05, 0.0)
    assert _fd_check(logp, logp_old, adv, mask, cfg, **kw) == mask.sum()


@pytest.mark.parametrize("cfg", [None, "dppo", "grpo", {"rule": "cppo", "objective": "ppo_clip"}, "unirl"])
def test_finite_differences_where_no_decision_flips(cfg):
    """Masking rules: piecewise smooth; checked where no keep decision flips."""
    logp, logp_old, adv, mask = random_batch(11, 4, 12, drift=0.25)
    assert _fd_check(logp, logp_old, adv, mask, cfg) > mask.sum() // 2


def test_finite_differences_readme_batch():
    """The README's batch under the default CPPO config."""
    logp, logp_old, adv, mask = readme_batch(np.float64)
    logp = np.where(mask, logp, 0.0)
    assert _fd_check(logp, logp_old, adv, mask, None) >= 4
