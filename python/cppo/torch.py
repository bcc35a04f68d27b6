"""PyTorch glue: the crate's loss as a tensor whose backward is the crate's gradient.

Importing this module needs PyTorch (``import cppo`` alone never imports it).

>>> import torch, cppo.torch
>>> logp = torch.tensor([[-0.2, -1.0, -0.1]], requires_grad=True)
>>> loss = cppo.torch.loss(logp, torch.tensor([[-0.3, -1.6, -0.1]]), torch.tensor([1.0]),
...                        torch.tensor([[1, 1, 0]]))
>>> loss.backward()  # logp.grad is exactly cppo.evaluate(...).grad

The tensors may live on any device: they are copied to the host (``.detach().cpu()``,
no copy for CPU tensors), the crate computes there, and the gradient goes back to
``logp``'s device and dtype. bfloat16 and float16 log-probs are computed in float32.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

try:
    import torch
except ImportError as e:  # pragma: no cover - exercised only without torch
    raise ImportError("cppo.torch needs PyTorch (pip install torch); cppo itself does not") from e

from . import ConfigLike, Counts, Evaluation
from . import counts as _counts
from . import evaluate as _evaluate

__all__ = ["loss", "evaluate", "global_counts"]

_MASK_DTYPES = {
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float32,
    torch.float64,
}


def _compute_dtype(logp: torch.Tensor) -> torch.dtype:
    """The float type the crate computes in for ``logp``: float64 stays, the rest is float32."""
    return torch.float64 if logp.dtype == torch.float64 else torch.float32


_NUMPY_FLOATS = {torch.float32: np.float32, torch.float64: np.float64}


def _host(x: Any, dtype: Optional[torch.dtype]) -> Any:
    """A float input (tensor or numpy array) as a host numpy array in ``dtype``, the
    compute dtype (no copy for a CPU tensor or an array already in it); with ``dtype``
    None, a tensor in its own dtype. Anything else (a list) is left to cppo.evaluate."""
    if isinstance(x, np.ndarray):
        return x if dtype is None else x.astype(_NUMPY_FLOATS[dtype], copy=False)
    if not isinstance(x, torch.Tensor):
        return x
    x = x.detach()
    if dtype is not None and x.dtype != dtype:
        x = x.to(dtype)
    return x.cpu().numpy()


def _host_mask(mask: Any) -> Any:
    """The mask as a host numpy array, in its own dtype when the crate takes it."""
    if isinstance(mask, torch.Tensor) and mask.dtype not in _MASK_DTYPES:
        mask = mask.detach().to(torch.float32)
    return _host(mask, None)


def _evaluate_tensors(logp, logp_old, advantages, mask, config, kw) -> Evaluation:
    """:func:`cppo.evaluate` on tensors (or arrays), every float input in logp's compute dtype."""
    dt = _compute_dtype(logp) if isinstance(logp, torch.Tensor) else None
    floats = {k: _host(v, dt) for k, v in kw.items() if k != "threads"}
    return _evaluate(
        _host(logp, dt),
        _host(logp_old, dt),
        _host(advantages, dt),
        _host_mask(mask),
        config,
        threads=kw.get("threads"),
        **floats,
    )


class CppoLoss(torch.autograd.Function):
    """The crate's loss as an autograd function of ``logp``.

    Forward runs :func:`cppo.evaluate` on the host and returns the loss as a 0-d tensor
    in logp's dtype and device; backward returns ``grad_output * grad``, the crate's
    exact dL/dlogp. The other inputs are constants. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, logp, logp_old, advantages, mask, config, kw, sink):
        """Evaluates the batch; ``sink`` (a list) receives the :class:`cppo.Evaluation`."""
        ev = _evaluate_tensors(logp, logp_old, advantages, mask, config, kw)
        sink.append(ev)
        grad = torch.from_numpy(ev.grad).to(device=logp.device, dtype=logp.dtype)
        ctx.save_for_backward(grad)
        return torch.tensor(ev.loss, dtype=logp.dtype, device=logp.device)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        """``grad_output`` times the crate's gradient, for ``logp`` only."""
        (grad,) = ctx.saved_tensors
        return grad_output * grad, None, None, None, None, None, None


def loss(
    logp: torch.Tensor,
    logp_old: Any,
    advantages: Any,
    mask: Any,
    config: ConfigLike = None,
    *,
    return_evaluation: bool = False,
    **kw: Any,
):
    """The crate's loss as a scalar tensor whose backward gives ``logp`` exactly the
    crate's gradient.

    Args:
        logp: (B, L) log-probs of the sampled tokens, with its autograd graph, on any
            device, float32/float64 (bfloat16 and float16 are computed in float32).
        logp_old, advantages, mask: as :func:`cppo.evaluate`, as tensors (any device) or
            numpy arrays; float tensors are converted to logp's compute dtype.
        config: as :func:`cppo.evaluate`.
        return_evaluation: also return the :class:`cppo.Evaluation` (outputs,
            diagnostics) of the same call.
        **kw: ``topk_logp_old``, ``topk_logp``, ``logp_ref``, ``is_weights`` (tensors or
            arrays, constants) and ``threads``, as :func:`cppo.evaluate`.

    Returns:
        The 0-d loss tensor (logp's dtype and device), or ``(loss, evaluation)``.

    Raises:
        cppo.CppoError: as :func:`cppo.evaluate`.
    """
    if not isinstance(logp, torch.Tensor):
        raise TypeError(f"logp must be a torch.Tensor, not {type(logp).__name__}")
    sink: list = []
    out = CppoLoss.apply(logp, logp_old, advantages, mask, config, kw, sink)
    return (out, sink[0]) if return_evaluation else out


def evaluate(logp: Any, logp_old: Any, advantages: Any, mask: Any, config: ConfigLike = None, **kw: Any) -> Evaluation:
    """:func:`cppo.evaluate` on tensors (any device; detached, copied to the host), every
    float input in logp's compute dtype. No autograd: for audits and logging."""
    return _evaluate_tensors(logp, logp_old, advantages, mask, config, kw)


def global_counts(mask: Any, group: Any = None) -> Counts:
    """This rank's :func:`cppo.counts`, summed over the ranks of ``group`` (default:
    the world) with one ``torch.distributed.all_reduce``: the ``num_tokens`` and
    ``num_seqs`` to put in every rank's config so that the ranks' losses and gradients
    add up to the whole batch's.

    The two counts travel as an int64 tensor on ``mask``'s device (a CUDA tensor under
    NCCL; CPU under gloo).
    """
    import torch.distributed as dist

    c = _counts(_host_mask(mask))
    device = mask.device if isinstance(mask, torch.Tensor) else torch.device("cpu")
    t = torch.tensor([c.tokens, c.seqs], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    tokens, seqs = (int(x) for x in t.cpu().tolist())
    return Counts(tokens, seqs)

