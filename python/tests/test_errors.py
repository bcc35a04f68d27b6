"""Bad input raises cppo.CppoError, with the crate's message and where it is."""

from __future__ import annotations

import numpy as np
import pytest

import cppo
from conftest import readme_batch


def _raises(*args, **kw):
    """The CppoError that cppo.evaluate(*args, **kw) raises."""
    with pytest.raises(cppo.CppoError) as info:
        cppo.evaluate(*args, **kw)
    return info.value


def test_is_a_value_error_with_every_attribute():
    """CppoError is a ValueError named cppo.CppoError, with None defaults for its attributes."""
    assert issubclass(cppo.CppoError, ValueError)
    assert cppo.CppoError.__module__ == "cppo" and cppo.CppoError.__name__ == "CppoError"
    hand = cppo.CppoError("by hand")
    assert hand.array is None and hand.row is None and hand.field is None


def test_nan_at_a_response_position(readme):
    """NaN at a response position: array, row and column, and the crate's message."""
    logp, logp_old, adv, mask = readme
    logp = logp.copy()
    logp[1, 2] = np.nan
    e = _raises(logp, logp_old, adv, mask)
    assert (e.kind, e.array, e.row, e.col, e.k, e.field) == ("NonFinite", "logp", 1, 2, None, None)
    assert np.isnan(e.value)
    assert str(e) == "logp at row 1, column 2 is NaN, not a finite number"


def test_nan_in_padding_is_never_read(readme):
    """An infinity at a non-response position is no error."""
    logp, logp_old, adv, mask = readme
    logp_old = logp_old.copy()
    logp_old[1, 3] = np.inf
    cppo.evaluate(logp, logp_old, adv, mask)


def test_first_bad_value_in_row_major_order_whatever_the_threads():
    """The first bad value in row-major order is reported, on any number of threads."""
    logp, logp_old, adv, mask = readme_batch(np.float64)
    big = [np.tile(x, (200, 1)) if x.ndim == 2 else np.tile(x, 200) for x in (logp, logp_old, adv, mask)]
    big[1][150, 2] = -np.inf
    big[1][300, 0] = np.nan
    for threads in (1, 2, None):
        e = _raises(*big, threads=threads)
        assert (e.array, e.row, e.col) == ("logp_old", 150, 2)


def test_crate_messages():
    """The crate's messages and kinds for a positive log-prob, an advantage out of range, a negative IS weight."""
    e = _raises(np.array([[-0.1, 0.5]]), np.array([[-0.2, -0.3]]), np.array([1.0]), np.array([[True, True]]))
    assert e.kind == "PositiveLogProb" and (e.array, e.row, e.col) == ("logp", 0, 1)
    assert str(e) == "logp at row 0, column 1 is 0.5, above the 1e-4 tolerance for a log-probability"
    e = _raises(np.array([[-0.1]]), np.array([[-0.2]]), np.array([2e9]), np.array([[True]]))
    assert (e.kind, e.array, e.row, e.col) == ("OutOfRange", "advantages", 0, 0)
    w = np.array([[-1.0]])
    e = _raises(np.array([[-0.1]]), np.array([[-0.2]]), np.array([1.0]), np.array([[True]]), is_weights=w)
    assert (e.kind, e.array) == ("Negative", "is_weights")


def test_float_mask_must_be_finite_everywhere(readme):
    """A NaN in a float mask is an error, padding included."""
    logp, logp_old, adv, mask = readme
    m = mask.astype(np.float32)
    m[1, 3] = np.nan
    e = _raises(logp, logp_old, adv, m)
    assert (e.array, e.row, e.col) == ("mask", 1, 3)
    with pytest.raises(cppo.CppoError):
        cppo.counts(m)


def test_topk_position_has_k():
    """A bad top-K value carries its position along the K axis."""
    logp = np.array([[-0.5, -0.7]])
    topk = np.log(np.full((1, 2, 3), 0.2))
    bad = topk.copy()
    bad[0, 1, 2] = np.nan
    e = _raises(logp, logp, np.array([1.0]), np.array([[True, True]]), "paper_dense", topk_logp_old=topk, topk_logp=bad)
    assert (e.array, e.row, e.col, e.k) == ("topk_logp", 0, 1, 2)


def test_shape_mismatch(readme):
    """Shape errors name the array, in the crate's words where the crate finds them."""
    logp, logp_old, adv, mask = readme
    e = _raises(logp, logp_old[:, :3], adv, mask)
    assert (e.kind, e.array, e.row, e.col) == ("ShapeMismatch", "logp_old", None, None)
    assert str(e) == "logp_old has shape [2, 3], expected (2, 4)"
    e = _raises(logp, logp_old, np.ones(3, np.float32), mask)
    assert (e.kind, e.array) == ("ShapeMismatch", "advantages")
    e = _raises(logp, logp_old, adv, mask[:1])
    assert e.array == "mask"
    e = _raises(logp[0], logp_old, adv, mask)
    assert (e.kind, e.array) == ("ShapeMismatch", "logp")
    e = _raises(logp, logp_old, adv, mask, logp_ref=logp[:, :2])
    assert e.array == "logp_ref"


def test_dtypes(readme):
    """Wrong dtypes are refused with the conversion to make."""
    logp, logp_old, adv, mask = readme
    e = _raises(logp, logp_old.astype(np.float64), adv, mask)
    assert (e.kind, e.array) == ("Dtype", "logp_old") and "astype(np.float32)" in str(e)
    e = _raises(logp.astype(np.float16), logp_old, adv, mask)
    assert (e.kind, e.array) == ("Dtype", "logp")
    e = _raises(logp, logp_old, adv, mask.astype(np.float16))
    assert (e.kind, e.array) == ("Dtype", "mask")
    e = _raises(logp, logp_old, adv, mask.astype(np.complex64))
    assert e.array == "mask"


def test_missing_arrays(readme):
    """An array the config needs, or half of the top-K pair, missing."""
    e = _raises(*readme, config="paper_dense")
    assert (e.kind, e.array) == ("MissingArray", "topk_logp_old")
    e = _raises(*readme, config={"kl": {"estimator": "k1", "coef": 0.1}})
    assert (e.kind, e.array) == ("MissingArray", "logp_ref")
    logp = readme[0]
    e = _raises(*readme, topk_logp_old=np.zeros((2, 4, 2), logp.dtype))
    assert (e.kind, e.array) == ("MissingArray", "topk_logp")


def test_unknown_config_field_has_field_and_hint(readme):
    """Unknown fields and names: the field's path and the closest valid name."""
    e = _raises(*readme, config={"rule": {"kind": "dppo", "detla": 0.1}})
    assert (e.kind, e.field, e.hint) == ("ConfigParse", "rule.detla", "delta")
    assert "did you mean `delta`?" in str(e)
    assert (e.line, e.column) == (1, 33)
    e = _raises(*readme, config={"aggregation": "token_mean"})
    assert (e.field, e.hint) == ("aggregation", "token-mean")
    e = _raises(*readme, config={"rule": {"kind": "cpo"}})
    assert (e.field, e.hint) == ("rule.kind", "cppo")
    e = _raises(*readme, config={"objective": {"kind": "ppo_clip", "eps": 0.2}})
    assert e.field == "objective.eps"


def test_config_text_positions_are_the_callers(readme):
    """Line and column count in the text as given, leading whitespace included."""
    e = _raises(*readme, config='\n  {"rule": {"kind": "dppo",\n "detla": 0.1}}')
    assert (e.field, e.hint, e.line) == ("rule.detla", "delta", 3)


def test_bad_config_values_and_json(readme):
    """Out-of-range values, broken JSON, an unknown preset, a config of the wrong type."""
    e = _raises(*readme, config={"rule": {"kind": "dppo", "delta": -1}})
    assert (e.kind, e.field) == ("ConfigParse", "rule.delta")
    assert "must be > 0" in str(e)
    e = _raises(*readme, config='{"rule": ')
    assert e.kind == "ConfigParse" and e.line == 1
    e = _raises(*readme, config="{not json")
    assert e.kind == "ConfigParse"
    e = _raises(*readme, config="verl")  # not a preset
    assert (e.kind, e.field) == ("InvalidConfig", "preset")
    assert "verl_pr6731" in str(e)
    with pytest.raises(TypeError):
        cppo.evaluate(*readme, config=3)
    with pytest.raises(cppo.CppoError) as info:
        cppo.resolve_config({"rule": {"kind": "dppo", "detla": 0.1}})
    assert info.value.field == "rule.detla"


def test_count_override_below_the_batch(readme):
    """num_tokens below the batch's own count is an error naming the field."""
    e = _raises(*readme, config={"num_tokens": 5})
    assert (e.kind, e.field) == ("CountTooSmall", "num_tokens")
    assert str(e) == "config field num_tokens = 5 is smaller than this batch's own count 6"
