"""CPPO with a fixed prefix budget, written as a PyTorch user would write it.

Binary TV divergence, linear position weights over each row's response tokens, the
token test w_t D_t <= delta and the prefix test S_t <= delta + delta_b W_{t-1} (prefix
sums by cumsum), the corrective bypass A (rho - 1) <= 0, the surrogate -rho A, token-mean
aggregation, and the gradient by autograd. This is the peer `peer.py` times against
`cppo bench --input`; `peer.py --check` first holds its mask and gradient equal to
`cppo eval`'s on the same batch, so that both sides compute the same thing.
"""
import torch


def cppo_fixed_budget(logp, logp_old, adv, mask, delta, delta_b, w_min):
    """Returns (loss, grad with respect to logp, keep mask) for (B, L) tensors and
    per-row advantages adv (B,)."""
    logp = logp.detach().requires_grad_(True)
    on = mask.to(logp.dtype)
    a = adv[:, None]
    with torch.no_grad():
        d = (logp.detach().exp() - logp_old.exp()).abs()
        # t: the 1-based ordinal of each response token in its row; T: the row's count.
        t = torch.cumsum(on, dim=1)
        big_t = on.sum(dim=1, keepdim=True)
        w = 1.0 - (1.0 - w_min) * (t - 1.0) / (big_t - 1.0).clamp(min=1.0)
        w = w.clamp(min=w_min) * on
        wd = w * d
        # The prefix sums in float64, as the crate keeps them.
        s = torch.cumsum(wd.double(), dim=1)
        w_before = torch.cumsum(w.double(), dim=1) - w.double()
        inside = (wd <= delta) & (s <= delta + delta_b * w_before)
        rho = (logp.detach() - logp_old).clamp(-20.0, 20.0).exp()
        away = a * (rho - 1.0) > 0
        keep = mask & (inside | ~away)
    ratio = (logp - logp_old).clamp(-20.0, 20.0).exp()
    loss = -(keep.to(logp.dtype) * ratio * a).sum() / on.sum().clamp(min=1.0)
    loss.backward()
    return loss.detach(), logp.grad, keep
