"""cppo.verl: the policy loss with verl's signature, aggregated as verl's ``agg_loss``.

The reference below is verl's ``agg_loss`` (verl/trainer/ppo/core_algos.py), written
again in numpy from its four formulas, applied to the crate's per-token loss; the
gradient's reference is the crate's gradient at verl's counts, times verl's factor.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import cppo  # noqa: E402
import cppo.verl  # noqa: E402
from conftest import random_batch  # noqa: E402


def verl_agg_loss(loss_mat, loss_mask, mode, dp_size=1, batch_num_tokens=None, global_batch_size=None,
                  loss_scale_factor=None):
    """verl's agg_loss, in float64 numpy."""
    m = loss_mask.astype(np.float64)
    lm = np.where(loss_mask, loss_mat, 0.0)
    if mode == "token-mean":
        n = m.sum() if batch_num_tokens is None else batch_num_tokens
        return lm.sum() / n * dp_size
    seq_tok = m.sum(-1)
    seq_mask = seq_tok > 0
    if mode == "seq-mean-token-sum":
        n = seq_mask.sum() if global_batch_size is None else global_batch_size
        return lm.sum(-1)[seq_mask].sum() / n * dp_size
    if mode == "seq-mean-token-mean":
        n = seq_mask.sum() if global_batch_size is None else global_batch_size
        return (lm.sum(-1) / (seq_tok + 1e-8))[seq_mask].sum() / n * dp_size
    z = loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor
    return lm.sum() / z


class ActorConfig:
    """The part of verl's ActorConfig the loss reads."""

    def __init__(self, **info):
        self.global_batch_info = info


def tensors(seed, b=6, l=12):
    logp, logp_old, adv, mask = random_batch(seed, b, l)
    logp = np.where(mask, logp, -1.0)  # torch's autograd needs no NaN here
    lp = torch.tensor(logp, requires_grad=True)
    return lp, torch.tensor(logp_old), torch.tensor(adv)[:, None].expand(b, l), torch.tensor(mask)


CASES = [
    ("token-mean", {}),
    ("token-mean", {"dp_size": 4, "batch_num_tokens": 200}),
    ("seq-mean-token-mean", {"dp_size": 2, "global_batch_size": 24}),
    ("seq-mean-token-sum", {"dp_size": 3, "global_batch_size": 18}),
    ("seq-mean-token-sum", {}),
    ("seq-mean-token-sum-norm", {"loss_scale_factor": 4096}),
    ("seq-mean-token-sum-norm", {}),
]


@pytest.mark.parametrize("mode,info", CASES)
@pytest.mark.parametrize("preset", ["cppo", "verl_pr6731", "grpo"])
def test_loss_and_gradient_are_verls_aggregation_of_the_crates(mode, info, preset):
    lp, lo, adv, mask = tensors(7)
    fn = cppo.verl.policy_loss(preset)
    loss, metrics = fn(lo, lp, adv, mask, loss_agg_mode=mode, config=ActorConfig(**info))
    loss.backward()
    # The crate's per-token loss does not depend on the aggregation.
    ev = cppo.torch.evaluate(lp, lo, adv, mask, preset)
    want = verl_agg_loss(ev.token_loss, mask.numpy(), mode, **info)
    # verl's seq-mean-token-mean divides each row by T_row + 1e-8; the crate by T_row:
    # a relative difference below 1e-8.
    rel = 1e-8 if mode == "seq-mean-token-mean" else 1e-12
    assert loss.item() == pytest.approx(want, rel=rel, abs=1e-15)
    # The gradient: the crate's, at verl's counts, times verl's factor.
    cfg = dict(cppo.resolve_config(preset), aggregation=mode)
    if mode == "token-mean":
        cfg["num_tokens"] = info.get("batch_num_tokens")
        factor = info.get("dp_size", 1)
    elif mode == "seq-mean-token-sum-norm":
        cfg["norm_length"] = info.get("loss_scale_factor")
        factor = ev.counts.seqs
    else:
        cfg["num_seqs"] = info.get("global_batch_size")
        factor = info.get("dp_size", 1)
    grad = cppo.torch.evaluate(lp, lo, adv, mask, cfg).grad * factor
    np.testing.assert_array_equal(lp.grad.numpy(), grad)
    assert {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"} <= metrics.keys()
    assert metrics["actor/cppo/masked_frac"] == ev.diagnostics["masked_frac"]
    assert all(isinstance(v, float) for v in metrics.values())


def test_ranks_with_global_counts_add_up_to_the_whole_batch():
    """Two data-parallel ranks with verl's global counts: the mean of their gradients
    (what FSDP's all-reduce gives) is the whole batch's gradient."""
    lp, lo, adv, mask = tensors(3, b=8)
    fn = cppo.verl.policy_loss()
    whole, _ = fn(lo, lp, adv, mask, "token-mean", ActorConfig())
    whole.backward()
    g_whole = lp.grad.clone()
    n = int(mask.sum())
    losses, grads = [], []
    for rows in (slice(0, 5), slice(5, 8)):
        part = lp.detach()[rows].clone().requires_grad_(True)
        loss, _ = fn(lo[rows], part, adv[rows], mask[rows], "token-mean", ActorConfig(dp_size=2, batch_num_tokens=n))
        loss.backward()
        losses.append(loss.item())
        grads.append(part.grad)
    assert np.mean(losses) == pytest.approx(whole.item(), rel=1e-12)
    np.testing.assert_allclose(torch.cat(grads).numpy() / 2, g_whole.numpy(), rtol=1e-12, atol=0)


def test_is_weights_and_bad_arguments():
    lp, lo, adv, mask = tensors(5)
    w = torch.full(lp.shape, 0.5, dtype=lp.dtype)
    fn = cppo.verl.policy_loss("dppo")
    plain, _ = fn(lo, lp, adv, mask)
    weighted, _ = fn(lo, lp, adv, mask, rollout_is_weights=w)
    assert weighted.item() == pytest.approx(0.5 * plain.item(), rel=1e-12)
    with pytest.raises(ValueError, match="loss_agg_mode 'mean'"):
        fn(lo, lp, adv, mask, "mean")
    with pytest.raises(cppo.CppoError) as e:
        cppo.verl.policy_loss({"rule": {"kind": "cppo", "detla": 0.1}})
    assert e.value.hint == "delta"


def test_register_puts_the_function_in_verls_registry(monkeypatch):
    registry = {}

    def register_policy_loss(name):
        def decorator(fn):
            registry[name] = fn
            return fn

        return decorator

    core = types.ModuleType("verl.trainer.ppo.core_algos")
    core.register_policy_loss = register_policy_loss
    for name in ["verl", "verl.trainer", "verl.trainer.ppo"]:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "verl.trainer.ppo.core_algos", core)
    fn = cppo.verl.register("cppo_test", "verl_pr6731")
    assert registry == {"cppo_test": fn}
    lp, lo, adv, mask = tensors(1)
    loss, _ = fn(lo, lp, adv, mask, "seq-mean-token-sum-norm", ActorConfig())
    assert np.isfinite(loss.item())
