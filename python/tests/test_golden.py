"""The crate's golden fixtures (tests/data/, computed by independent float64
references), through the Python API: the same comparison as tests/golden.rs."""

from __future__ import annotations

import json

import numpy as np
import pytest

import cppo
from conftest import GOLDEN

CASES = sorted(p.name[: -len(".config.json")] for p in GOLDEN.glob("*.config.json")) if GOLDEN.is_dir() else []

pytestmark = pytest.mark.skipif(not CASES, reason=f"no golden fixtures at {GOLDEN}")


def _load(name):
    """A golden case's inputs, expected outputs and config text."""
    inp = dict(np.load(GOLDEN / f"{name}.input.npz"))
    exp = dict(np.load(GOLDEN / f"{name}.expected.npz"))
    text = (GOLDEN / f"{name}.config.json").read_text()
    return inp, exp, text


def _close(got, want, rel=1e-9):
    """|got − want| ≤ rel |want|, or 1e-15 absolute; NaN only where the reference has NaN."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    nan = np.isnan(want)
    assert (np.isnan(got) == nan).all()
    g, w = got[~nan], want[~nan]
    ok = (np.abs(g - w) <= rel * np.abs(w)) | (np.abs(g - w) <= 1e-15)
    assert ok.all(), f"worst {np.max(np.abs(g - w))}"


def test_there_are_cases():
    """The fixtures are there: the crate's twelve cases at least."""
    assert len(CASES) >= 12


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("as_dict", [False, True])
def test_golden_case(name, as_dict):
    """One golden case, with its config as text and as a dict: every array the fixture holds."""
    inp, exp, text = _load(name)
    config = json.loads(text) if as_dict else text
    ev = cppo.evaluate(
        inp["logp"],
        inp["logp_old"],
        inp["advantages"],
        inp["mask"],
        config,
        topk_logp_old=inp.get("topk_logp_old"),
        topk_logp=inp.get("topk_logp"),
        logp_ref=inp.get("logp_ref"),
        is_weights=inp.get("is_weights"),
    )
    assert "loss" in exp and "grad" in exp
    for what, want in exp.items():
        if what == "loss":
            assert abs(ev.loss - float(want)) <= 1e-9 * max(abs(float(want)), 1e-12)
        elif what == "reason":
            assert (ev.reason == want).all()
        elif what == "keep":
            assert (ev.keep == (want != 0)).all()
        else:
            _close(getattr(ev, what), want)
