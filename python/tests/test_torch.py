"""cppo.torch: the loss tensor's backward is the crate's gradient. Skipped without torch."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import cppo  # noqa: E402
import cppo.torch  # noqa: E402
from conftest import random_batch, readme_batch  # noqa: E402


def _tensors(batch, dtype=None):
    """A batch's arrays as tensors, the float ones in ``dtype`` when given."""
    out = tuple(torch.from_numpy(np.ascontiguousarray(x)) for x in batch)
    if dtype is not None:
        out = tuple(t.to(dtype) if t.is_floating_point() else t for t in out)
    return out


def _as_float32(batch):
    """The float64 arrays of a batch as float32; the mask as it is."""
    return tuple(x.astype(np.float32) if x.dtype == np.float64 else x for x in batch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cfg", [None, "dppo", "verl_pr6731", {"rule": "none", "objective": "gspo"}], ids=str)
def test_backward_is_the_crate_gradient(dtype, cfg):
    """loss.backward() gives logp exactly the crate's grad, and the loss is the crate's."""
    batch = random_batch(0, 8, 16, np.float64)
    logp, logp_old, adv, mask = _tensors(batch, dtype)
    logp = logp.clone().requires_grad_(True)
    loss, ev = cppo.torch.loss(logp, logp_old, adv, mask, cfg, return_evaluation=True)
    assert loss.dim() == 0 and loss.dtype == dtype
    loss.backward()
    if dtype == torch.float32:
        batch = _as_float32(batch)
    want = cppo.evaluate(*batch, cfg)
    assert logp.grad.dtype == dtype
    assert logp.grad.numpy().tobytes() == want.grad.tobytes()
    assert logp.grad.numpy().tobytes() == ev.grad.tobytes()
    assert loss.item() == pytest.approx(want.loss, rel=1e-6 if dtype == torch.float32 else 0)


def test_grad_output_scales_the_gradient():
    """backward multiplies the crate's grad by grad_output."""
    logp, logp_old, adv, mask = _tensors(readme_batch(np.float64))
    logp = torch.where(mask, logp, 0.0).requires_grad_(True)
    (3.0 * cppo.torch.loss(logp, logp_old, adv, mask)).backward()
    ev = cppo.torch.evaluate(logp, logp_old, adv, mask)
    assert torch.equal(logp.grad, 3.0 * torch.from_numpy(ev.grad))
    assert ev.reason.tolist() == [[1, 3, 2, 2], [1, 0, 2, 0]]


def test_gradcheck_on_a_smooth_config():
    """torch.autograd.gradcheck agrees on a smooth config (rule none)."""
    logp, logp_old, adv, mask = _tensors(random_batch(1, 3, 5, np.float64))
    logp = torch.where(mask, logp, -0.5).requires_grad_(True)
    cfg = {"rule": "none"}
    assert torch.autograd.gradcheck(lambda lp: cppo.torch.loss(lp, logp_old, adv, mask, cfg), (logp,))


def test_graph_through_logp():
    """logp computed from parameters: the gradient flows on to them."""
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 10, requires_grad=True)
    tokens = torch.randint(0, 10, (4, 6))
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    logp_old = (logp.detach() + 0.05 * torch.randn(4, 6)).clamp(max=0.0)
    adv, mask = torch.randn(4), torch.ones(4, 6, dtype=torch.int64)
    cppo.torch.loss(logp, logp_old, adv, mask).backward(retain_graph=True)
    ev = cppo.evaluate(logp.detach().numpy(), logp_old.numpy(), adv.numpy(), mask.numpy())
    manual = torch.autograd.grad((torch.from_numpy(ev.grad) * logp).sum(), logits)[0]
    torch.testing.assert_close(logits.grad, manual, rtol=0, atol=0)


def test_low_precision_logp_computes_in_float32():
    """bfloat16 logp: computed in float32, gradient back in bfloat16."""
    batch = random_batch(2, 4, 8, np.float32)
    logp, logp_old, adv, mask = _tensors(batch)
    lp16 = logp.to(torch.bfloat16).requires_grad_(True)
    loss, ev = cppo.torch.loss(lp16, logp_old, adv, mask, return_evaluation=True)
    loss.backward()
    assert loss.dtype == torch.bfloat16 and lp16.grad.dtype == torch.bfloat16
    assert ev.grad.dtype == np.float32
    assert torch.equal(lp16.grad, torch.from_numpy(ev.grad).to(torch.bfloat16))


def test_mixed_inputs_and_options():
    """Float64 constants with a float32 logp, an integer mask, numpy arrays, kw options."""
    batch = random_batch(3, 5, 7, np.float64)
    logp, logp_old, adv, mask = _tensors(batch)
    lp32 = logp.float().requires_grad_(True)
    ref = np.where(batch[3], batch[1] - 0.1, 0.0)
    cfg = {"rule": "dppo", "kl": {"estimator": "k3", "coef": 0.05}}
    ref_t = torch.from_numpy(ref)
    loss = cppo.torch.loss(lp32, logp_old, adv.numpy(), mask.to(torch.int32), cfg, logp_ref=ref_t, threads=2)
    loss.backward()
    want = cppo.evaluate(*_as_float32(batch), cfg, logp_ref=ref.astype(np.float32))
    assert lp32.grad.numpy().tobytes() == want.grad.tobytes()


def test_non_contiguous_tensor():
    """A column-major tensor gives the same gradient as a contiguous one."""
    logp, logp_old, adv, mask = _tensors(random_batch(4, 6, 10, np.float64))
    t = logp.t().contiguous().t().requires_grad_(True)  # column-major
    cppo.torch.loss(t, logp_old, adv, mask).backward()
    want = cppo.evaluate(logp.numpy(), logp_old.numpy(), adv.numpy(), mask.numpy())
    assert torch.equal(t.grad, torch.from_numpy(want.grad))


def test_errors_propagate():
    """NaN in padding is fine; NaN at a response position raises CppoError; logp must be a tensor."""
    logp, logp_old, adv, mask = _tensors(readme_batch(np.float32))
    cppo.torch.loss(logp, logp_old, adv, mask)  # NaN in the padding only: fine
    bad = logp.clone()
    bad[0, 2] = float("nan")
    with pytest.raises(cppo.CppoError) as info:
        cppo.torch.loss(bad.requires_grad_(True), logp_old, adv, mask)
    assert (info.value.array, info.value.row, info.value.col) == ("logp", 0, 2)
    with pytest.raises(TypeError):
        cppo.torch.loss(logp.numpy(), logp_old, adv, mask)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_tensors():
    """CUDA tensors: the loss and the gradient come back on the device."""
    logp, logp_old, adv, mask = (t.cuda() for t in _tensors(random_batch(5, 4, 8, np.float32)))
    logp.requires_grad_(True)
    loss = cppo.torch.loss(logp, logp_old, adv, mask)
    loss.backward()
    assert loss.device == logp.device and logp.grad.device == logp.device
    want = cppo.evaluate(*(t.detach().cpu().numpy() for t in (logp, logp_old, adv, mask)))
    assert torch.equal(logp.grad.cpu(), torch.from_numpy(want.grad))
