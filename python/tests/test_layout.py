"""Zero-copy of numpy inputs, and correct results for any layout."""

from __future__ import annotations

import numpy as np
import pytest

import cppo
from cppo import _cppo
from conftest import assert_same_bits, random_batch


def _address(a):
    """The address of an array's first element."""
    return a.__array_interface__["data"][0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_c_contiguous_input_is_read_in_place(dtype):
    """A C-contiguous array (and a strided view) is handed on and read in place, not copied."""
    logp = random_batch(0, 5, 7, dtype)[0]
    # The Python layer hands the same object on, and the crate's view starts at its data.
    assert cppo._float_array(logp, "logp", (2,), None) is logp
    assert _cppo._view_address(logp) == _address(logp)
    # A strided view too is read in place, not copied.
    view = logp[1:, ::2]
    assert cppo._float_array(view, "logp", (2,), None) is view
    assert _cppo._view_address(view) == _address(view)
    t = logp.T
    assert _cppo._view_address(t) == _address(t)


def _contiguous(batch):
    """C-contiguous copies of a batch's arrays."""
    return tuple(np.ascontiguousarray(x) for x in batch)


def test_transposed_inputs():
    """Fortran-order and transposed arrays give the same bits as contiguous ones."""
    logp, logp_old, adv, mask = random_batch(1, 9, 13)
    # Fortran-order arrays holding the same values.
    f = tuple(np.asfortranarray(x) if x.ndim == 2 else x for x in (logp, logp_old, adv, mask))
    assert not f[0].flags.c_contiguous
    assert_same_bits(cppo.evaluate(*f), cppo.evaluate(logp, logp_old, adv, mask))
    # The transpose of a (L, B) array.
    lt = np.ascontiguousarray(logp.T).T
    assert_same_bits(cppo.evaluate(lt, logp_old, adv, mask), cppo.evaluate(logp, logp_old, adv, mask))


def test_sliced_and_reversed_inputs():
    """Sliced and reversed (negative-stride) views give the same bits as their copies."""
    logp, logp_old, adv, mask = random_batch(2, 20, 30)
    s = (slice(1, None, 3), slice(None, None, -2))
    sliced = (logp[s], logp_old[s], adv[s[0]], mask[s])
    assert_same_bits(cppo.evaluate(*sliced), cppo.evaluate(*_contiguous(sliced)))


def test_broadcast_inputs():
    """Zero strides: one row of logp_old broadcast to every row, per-token advantages
    broadcast from per-row ones."""
    logp, logp_old, adv, mask = random_batch(3, 6, 10)
    old = np.broadcast_to(logp_old[:1], logp.shape)
    a2 = np.broadcast_to(adv[:, None], logp.shape)
    want = cppo.evaluate(logp, np.ascontiguousarray(old), np.ascontiguousarray(a2), mask)
    assert_same_bits(cppo.evaluate(logp, old, a2, mask), want)


def test_byte_swapped_and_misaligned_inputs_are_copied_and_correct():
    """Big-endian and misaligned arrays are copied first, and give the same bits."""
    logp, logp_old, adv, mask = random_batch(4, 4, 6)
    want = cppo.evaluate(logp, logp_old, adv, mask)
    swapped = logp.astype(logp.dtype.newbyteorder(">"))
    assert_same_bits(cppo.evaluate(swapped, logp_old, adv, mask), want)
    buf = np.zeros(logp.nbytes + 1, np.uint8)
    odd = np.frombuffer(buf.data, np.float64, logp.size, offset=1).reshape(logp.shape)
    assert not odd.flags.aligned
    # frombuffer gives a read-only view: fill it through the buffer.
    buf[1:] = np.frombuffer(np.ascontiguousarray(logp).tobytes(), np.uint8)
    assert_same_bits(cppo.evaluate(odd, logp_old, adv, mask), want)


def test_read_only_inputs():
    """Read-only arrays are fine: the crate only reads."""
    logp, logp_old, adv, mask = random_batch(5, 4, 6)
    want = cppo.evaluate(logp, logp_old, adv, mask)
    for x in (logp, logp_old, adv, mask):
        x.setflags(write=False)
    assert_same_bits(cppo.evaluate(logp, logp_old, adv, mask), want)


def test_same_array_twice():
    """The same array as logp and logp_old: no divergence."""
    logp, _, adv, mask = random_batch(6, 3, 5)
    ev = cppo.evaluate(logp, logp, adv, mask)
    assert ev.diagnostics["divergence_max"] == 0.0
