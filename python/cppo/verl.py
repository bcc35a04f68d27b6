"""verl glue: CPPO (or any rule of the crate) as a verl policy loss.

verl looks its policy losses up by name (``actor.policy_loss.loss_mode``) in a registry
of functions with one signature::

    fn(old_log_prob, log_prob, advantages, response_mask,
       loss_agg_mode="token-mean", config=None, rollout_is_weights=None)
        -> (pg_loss, pg_metrics)

:func:`policy_loss` makes such a function from a crate config, and :func:`register` puts
it in verl's registry. The crate decides the mask, the objective and the gradient; the
loss is aggregated as verl's ``agg_loss`` aggregates, so that the function is a drop-in
replacement under verl's data parallelism:

======================== =====================================================================
``loss_agg_mode``        the loss, with l the crate's per-token loss and m the response mask
======================== =====================================================================
token-mean               Σ m l / N_tok · dp_size, N_tok = ``batch_num_tokens`` (else Σ m)
seq-mean-token-mean      Σ_rows (Σ_t m l / T_row) / N_seq · dp_size, N_seq = ``global_batch_size``
seq-mean-token-sum       Σ m l / N_seq · dp_size
seq-mean-token-sum-norm  Σ m l / Z, Z = ``loss_scale_factor`` (else L); no N_seq, no dp_size
======================== =====================================================================

``batch_num_tokens``, ``global_batch_size``, ``dp_size`` and ``loss_scale_factor`` come
from verl's ``config.global_batch_info`` when it has them (verl fills it with the global
counts, so the ranks' losses are the whole batch's after FSDP averages their
gradients); without them the counts are the micro-batch's own and dp_size is 1. The
crate's own ``seq-mean-token-sum-norm`` also divides by N_seq (Dr. GRPO's form); here
the loss is multiplied back by the micro-batch's N_seq to be verl's. verl's
``seq-mean-token-mean`` divides each row by T_row + 1e-8, the crate by T_row: the losses
differ by less than one part in 10^8.

The gradient is the crate's exact gradient times the same factor, through
:func:`cppo.torch.loss`. ``rollout_is_weights`` become the crate's ``is_weights``. The
metrics are verl's three (``actor/pg_clipfrac``, ``actor/ppo_kl``,
``actor/pg_clipfrac_lower``, as verl defines them) and the crate's diagnostics under
``actor/cppo/``.

>>> import cppo.verl
>>> fn = cppo.verl.policy_loss("verl_pr6731")    # a preset, a dict or JSON text
>>> # cppo.verl.register("cppo", "verl_pr6731")  # then actor.policy_loss.loss_mode=cppo
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from . import ConfigLike, resolve_config
from . import torch as _torch

__all__ = ["policy_loss", "register", "AGGREGATIONS"]

#: verl's ``loss_agg_mode`` values, which are also the crate's aggregation names.
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def _batch_info(config: Any) -> dict:
    """verl's ``config.global_batch_info`` (an attribute or a mapping key), or {}."""
    if config is None:
        return {}
    info = getattr(config, "global_batch_info", None)
    if info is None and isinstance(config, dict):
        info = config.get("global_batch_info")
    return dict(info or {})


def policy_loss(cppo_config: ConfigLike = None) -> Callable:
    """A verl policy-loss function that applies ``cppo_config`` (a dict, JSON text, a
    preset's name, or None for the crate's CPPO defaults).

    The returned function has verl's signature (see the module docs); its
    ``loss_agg_mode`` replaces the config's aggregation, and the global counts of
    verl's ``config.global_batch_info`` replace ``num_tokens`` and ``num_seqs``.

    Raises:
        cppo.CppoError: ``cppo_config`` is not a valid config (at once, not at the
            first step).
    """
    base = resolve_config(cppo_config)

    def compute_policy_loss_cppo(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config: Optional[Any] = None,
        rollout_is_weights: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The crate's loss aggregated as verl's ``agg_loss``, and verl's metrics."""
        if loss_agg_mode not in AGGREGATIONS:
            raise ValueError(f"loss_agg_mode {loss_agg_mode!r}: verl's modes are {', '.join(AGGREGATIONS)}")
        info = _batch_info(config)
        dp_size = int(info.get("dp_size") or 1)
        cfg = dict(base, aggregation=loss_agg_mode)
        if loss_agg_mode == "token-mean":
            cfg["num_tokens"] = info.get("batch_num_tokens")
        elif loss_agg_mode == "seq-mean-token-sum-norm":
            cfg["norm_length"] = info.get("loss_scale_factor")
        else:
            cfg["num_seqs"] = info.get("global_batch_size")
        kw = {} if rollout_is_weights is None else {"is_weights": rollout_is_weights}
        loss, ev = _torch.loss(log_prob, old_log_prob, advantages, response_mask, cfg, return_evaluation=True, **kw)
        if loss_agg_mode == "seq-mean-token-sum-norm":
            factor = float(ev.counts.seqs)  # verl's sum over rows has no 1/N_seq
        else:
            factor = float(dp_size)
        if factor != 1.0:
            loss = loss * factor
        metrics = {f"actor/{k}": float(v) for k, v in ev.diagnostics["verl"].items()}
        metrics.update(ev.metrics(prefix="actor/cppo/"))
        return loss, metrics

    return compute_policy_loss_cppo


def register(name: str = "cppo", cppo_config: ConfigLike = None) -> Callable:
    """Registers :func:`policy_loss` (``cppo_config``) in verl's policy-loss registry
    under ``name`` (``actor.policy_loss.loss_mode=<name>`` then selects it) and returns
    the function. Needs verl (``verl.trainer.ppo.core_algos.register_policy_loss``).
    """
    from verl.trainer.ppo.core_algos import register_policy_loss

    return register_policy_loss(name)(policy_loss(cppo_config))
