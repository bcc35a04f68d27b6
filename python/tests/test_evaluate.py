"""cppo.evaluate against hand-worked examples, and the config, counts and shard API."""

from __future__ import annotations

import json

import numpy as np
import pytest

import cppo
from conftest import OUTPUTS, random_batch, readme_batch


def test_readme_example_reasons_and_grad(readme):
    """The README's first example: reason codes, keep, zero gradient off the mask and where masked."""
    ev = cppo.evaluate(*readme)
    # 1 feasible, 3 masked by the token threshold, 2 kept by the corrective bypass,
    # 0 not a response token: the README's assertion.
    assert ev.reason.tolist() == [[1, 3, 2, 2], [1, 0, 2, 0]]
    assert ev.reason.dtype == np.uint8
    assert ev.keep.tolist() == [[True, False, True, True], [True, False, True, False]]
    # Zero gradient off the mask (the NaN there is never read) and where masked.
    assert ev.grad[1, 1] == 0.0 and ev.grad[1, 3] == 0.0
    assert ev.grad[0, 1] == 0.0
    for name in ("divergence", "token_loss", "grad"):
        assert getattr(ev, name)[1, 1] == 0.0, name
    assert ev.grad.dtype == np.float32 and ev.grad.shape == (2, 4)
    assert ev.delta_b_row.shape == (2,)
    assert isinstance(ev.loss, float) and np.isfinite(ev.loss)
    d = ev.diagnostics
    assert d["response_tokens"] == 6 and d["sequences"] == 2 and d["kept_tokens"] == 5
    assert d["masked_frac"] == pytest.approx(1 / 6)
    assert ev.counts == cppo.Counts(6, 2)


def test_readme_example_by_hand():
    """The surrogate loss, by hand: token-mean of −ρA over the kept tokens."""
    logp, logp_old, adv, mask = readme_batch(np.float64)
    ev = cppo.evaluate(logp, logp_old, adv, mask)
    rho = np.exp(np.where(mask, logp - logp_old, 0.0))
    a = np.broadcast_to(adv[:, None], logp.shape)
    want = -(rho * a)[ev.keep].sum() / mask.sum()
    assert ev.loss == pytest.approx(want, rel=1e-12)
    grad = np.where(ev.keep, -rho * a / mask.sum(), 0.0)
    np.testing.assert_allclose(ev.grad, grad, rtol=1e-12, atol=0)
    np.testing.assert_allclose(ev.token_loss, np.where(ev.keep, -rho * a, 0.0), rtol=1e-12)
    # Binary TV, |p − q|, at response positions.
    d = np.where(mask, np.abs(np.exp(np.where(mask, logp, 0)) - np.exp(logp_old)), 0.0)
    np.testing.assert_allclose(ev.divergence, d, rtol=1e-12, atol=1e-15)


def test_diagnostics_hold_the_trainers_metrics(readme):
    """The diagnostics hold verl's and UniRL's metrics, under their names."""
    d = cppo.evaluate(*readme).diagnostics
    for key in ("pg_clipfrac", "pg_clipfrac_lower", "ppo_kl"):
        assert key in d["verl"]
    for key in ("masked_fraction", "approx_kl", "ratio_mean", "ratio_max"):
        assert key in d["unirl"]
    assert d["verl"]["pg_clipfrac"] == pytest.approx(1 / (6 + 1e-8))
    assert d["unirl"]["masked_fraction"] == d["masked_frac"]
    assert len(d["masked_frac_by_decile"]) == 10
    assert set(d["delta_b_row"]) == {"mean", "min", "max", "frac_at_floor", "frac_at_ceiling"}
    assert d["clip_frac"] is None  # the surrogate has no clip
    json.dumps(d)  # plain JSON types


def test_metrics_flatten_for_a_logger(readme):
    """Evaluation.metrics flattens the diagnostics to floats, leaving out None."""
    m = cppo.evaluate(*readme).metrics(prefix="actor/cppo/")
    assert m["actor/cppo/verl/pg_clipfrac"] > 0
    assert "actor/cppo/masked_frac_by_decile/9" in m
    assert "actor/cppo/delta_b_row/mean" in m
    assert "actor/cppo/clip_frac" not in m  # None is left out
    assert all(isinstance(v, float) for v in m.values())


def test_per_token_advantages_equal_broadcast_ones(readme):
    """(B,) advantages are (B, L) ones broadcast along the row."""
    logp, logp_old, adv, mask = readme
    per_row = cppo.evaluate(logp, logp_old, adv, mask)
    per_token = cppo.evaluate(logp, logp_old, np.repeat(adv[:, None], 4, axis=1), mask)
    assert per_row.loss == per_token.loss
    assert per_row.grad.tobytes() == per_token.grad.tobytes()


@pytest.mark.parametrize(
    "dtype",
    [bool, np.uint8, np.int8, np.int16, np.int32, np.int64, np.uint16, np.uint32, np.uint64, np.float32, np.float64],
)
def test_every_mask_type(readme, dtype):
    """Every mask element type the crate takes gives the same result (nonzero = response)."""
    logp, logp_old, adv, mask = readme
    want = cppo.evaluate(logp, logp_old, adv, mask)
    got = cppo.evaluate(logp, logp_old, adv, mask.astype(dtype) * (3 if dtype is not bool else 1))
    assert got.loss == want.loss
    assert got.reason.tolist() == want.reason.tolist()


def test_lists_are_converted():
    """Python lists are converted (to float64 for the floats)."""
    ev = cppo.evaluate([[-0.2, -1.0]], [[-0.3, -1.6]], [1.0], [[1, 1]])
    assert ev.grad.dtype == np.float64
    assert ev.reason.tolist() == [[1, 4]]  # the second token passes w·D ≤ δ, not the budget


def test_config_forms_agree(readme):
    """A preset name, a dict, JSON text and a preset in a dict give the same config."""
    by_name = cppo.evaluate(*readme, config="dppo")
    by_dict = cppo.evaluate(*readme, config={"rule": "dppo"})
    by_json = cppo.evaluate(*readme, config='{"rule": {"kind": "dppo", "delta": 0.15}}')
    by_preset = cppo.evaluate(*readme, config={"preset": "dppo"})
    for ev in (by_dict, by_json, by_preset):
        assert ev.loss == by_name.loss and ev.reason.tolist() == by_name.reason.tolist()
    assert cppo.evaluate(*readme).loss == cppo.evaluate(*readme, config="cppo").loss
    # numpy scalars in a dict are fine.
    ev = cppo.evaluate(*readme, config={"rule": {"kind": "dppo", "delta": np.float32(0.15)}})
    assert ev.loss == by_name.loss


def test_presets_and_resolved_configs():
    """The presets' names, and resolved configs that read back as themselves."""
    names = cppo.presets()
    assert names[:3] == ["cppo", "dppo", "grpo"]
    assert {"verl_pr6731", "unirl", "paper_dense"} <= set(names)
    assert set(cppo.describe_presets()) == set(names)
    for name in names:
        full = cppo.resolve_config(name)
        assert cppo.resolve_config(full) == full  # the resolved form reads back the same
    verl = cppo.resolve_config({"preset": "verl_pr6731", "num_tokens": 4096})
    assert verl["rule"]["positions"] == "column" and verl["num_tokens"] == 4096
    assert verl["objective"] == {"kind": "detached_is", "ratio_cap": 3.0}
    assert cppo.resolve_config() == cppo.resolve_config("cppo")


def test_counts():
    """cppo.counts: response tokens and non-empty rows, for any layout and for no rows."""
    mask = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 1]], np.uint8)
    assert cppo.counts(mask) == cppo.Counts(tokens=5, seqs=2)
    assert cppo.counts(mask.astype(bool).T.copy().T) == (5, 2)
    assert cppo.counts(np.zeros((0, 3), bool)) == (0, 0)


def test_shards_with_global_counts_add_up_to_the_whole():
    """Data parallelism: each shard runs with the global N_tok and N_seq; the shards'
    losses add up to the whole batch's, their gradients are its rows, and their merged
    tallies give its diagnostics."""
    logp, logp_old, adv, mask = random_batch(3, 12, 40)
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        cfg = {"rule": "dppo", "aggregation": agg}
        whole = cppo.evaluate(logp, logp_old, adv, mask, cfg)
        parts = [slice(0, 5), slice(5, 12)]
        total = cppo.Counts(0, 0)
        for s in parts:
            c = cppo.counts(mask[s])
            total = cppo.Counts(total.tokens + c.tokens, total.seqs + c.seqs)
        assert total == whole.counts
        g = {**cfg, "num_tokens": total.tokens, "num_seqs": total.seqs}
        shards = [cppo.evaluate(logp[s], logp_old[s], adv[s], mask[s], g) for s in parts]
        assert sum(e.loss for e in shards) == pytest.approx(whole.loss, rel=1e-12)
        np.testing.assert_allclose(np.concatenate([e.grad for e in shards]), whole.grad, rtol=1e-12, atol=0)
        diagnostics, tally = cppo.merge_tallies([e.tally for e in shards], g)
        assert tally["tokens"] == whole.tally["tokens"]
        assert tally["by_reason"] == whole.tally["by_reason"]
        assert diagnostics["masked_frac"] == whole.diagnostics["masked_frac"]
        assert diagnostics["loss"] == pytest.approx(whole.loss, rel=1e-12)
        assert diagnostics["ratio_max"] == whole.diagnostics["ratio_max"]


def test_a_tally_reads_back_as_the_same_bits():
    """A tally through JSON and merge_tallies is the same bits."""
    ev = cppo.evaluate(*random_batch(8, 16, 64))
    diagnostics, tally = cppo.merge_tallies([ev.tally])
    assert tally == ev.tally
    assert diagnostics == ev.diagnostics


def test_merge_tallies_of_empty_shards():
    """A shard with no response token has +inf minima, which JSON writes as null."""
    logp, logp_old, adv, mask = random_batch(4, 3, 8)
    empty = cppo.evaluate(logp, logp_old, adv, np.zeros_like(mask))
    assert empty.tally["ratio_min"] is None
    full = cppo.evaluate(logp, logp_old, adv, mask)
    diagnostics, tally = cppo.merge_tallies([empty.tally, full.tally])
    assert diagnostics["ratio_min"] == full.diagnostics["ratio_min"]
    assert diagnostics == full.diagnostics
    assert cppo.merge_tallies([empty.tally])[0]["ratio_min"] == 0.0


def test_outputs_are_owned_writeable_arrays(readme):
    """The outputs are C-contiguous, writeable numpy arrays."""
    ev = cppo.evaluate(*readme)
    for name in OUTPUTS:
        a = getattr(ev, name)
        assert isinstance(a, np.ndarray) and a.flags.c_contiguous and a.flags.writeable, name
    assert "Evaluation(loss=" in repr(ev)


def test_instruction_set():
    """The instruction set is one of the three the crate builds for."""
    assert cppo.INSTRUCTION_SET in ("avx512", "avx2", "baseline")


def test_f32_exp_numerics_is_close_to_exact():
    """``"numerics": "f32_exp"`` takes the exponentials in f32: the decisions of a random
    batch stay those of the exact engine, the gradient moves by f32 rounding, and the
    config resolves with the field."""
    logp, logp_old, adv, mask = random_batch(5, 16, 300, dtype=np.float32)
    exact = cppo.evaluate(logp, logp_old, adv, mask, config={"rule": "dppo"})
    fast = cppo.evaluate(logp, logp_old, adv, mask, config={"rule": "dppo", "numerics": "f32_exp"})
    assert fast.keep.tolist() == exact.keep.tolist()
    scale = np.abs(exact.grad).max()
    assert np.abs(fast.grad - exact.grad).max() <= 1e-5 * scale
    assert fast.loss == pytest.approx(exact.loss, rel=1e-5)
    assert cppo.resolve_config({"numerics": "f32_exp"})["numerics"] == "f32_exp"
    with pytest.raises(cppo.CppoError, match="f32_exp"):
        cppo.evaluate(logp, logp_old, adv, mask, config={"numerics": "f32-exp"})
