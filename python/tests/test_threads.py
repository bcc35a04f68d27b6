"""Bit-identical results whatever the thread count; float32 as the crate computes it;
the GIL released during the computation."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import cppo
from conftest import OUTPUTS, assert_same_bits, random_batch

CONFIGS = [None, "dppo", "grpo", "verl_pr6731", {"rule": "trm_avg"}, {"rule": "cppo_soft"}]


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_same_bits_for_every_thread_count(cfg, dtype):
    # 300 rows of 200 columns: several of the engine's row blocks (about 16k tokens each).
    """threads=1, 2, 3 and None give the same bits, for several configs and both float types."""
    batch = random_batch(1, 300, 200, dtype)
    ref = cppo.evaluate(*batch, cfg, threads=1)
    for threads in (2, 3, None):
        assert_same_bits(cppo.evaluate(*batch, cfg, threads=threads), ref)


def test_float32_is_the_float64_computation_rounded_once():
    """The crate widens f32 inputs to f64, computes in f64 and rounds each output once:
    an f32 batch gives the f64 computation of the same values, rounded to f32."""
    b32 = random_batch(2, 64, 96, np.float32)
    b64 = tuple(x.astype(np.float64) if x.dtype == np.float32 else x for x in b32)
    e32, e64 = cppo.evaluate(*b32), cppo.evaluate(*b64)
    assert e32.loss == e64.loss
    assert e32.diagnostics == e64.diagnostics
    for name in OUTPUTS:
        x, y = getattr(e32, name), getattr(e64, name)
        if x.dtype == np.float32:
            y = y.astype(np.float32)
        assert x.tobytes() == y.tobytes(), name


def test_threads_must_be_positive():
    """threads must be None or an integer >= 1."""
    batch = random_batch(0, 2, 3)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            cppo.evaluate(*batch, threads=bad)


def test_gil_is_released():
    """While one thread is inside cppo.evaluate, another runs Python code."""
    batch = random_batch(5, 512, 2048, np.float64)
    cppo.evaluate(*batch, threads=1)  # warm up
    span = {}

    def work():
        """Three evaluations on one thread, timed."""
        span["start"] = time.perf_counter()
        for _ in range(3):
            cppo.evaluate(*batch, threads=1)
        span["end"] = time.perf_counter()

    t = threading.Thread(target=work)
    ticks = []
    t.start()
    while t.is_alive():
        ticks.append(time.perf_counter())
        time.sleep(0.001)
    t.join()
    start, end = span["start"], span["end"]
    assert end - start > 0.05, "the batch is too small to tell"
    inside = [x for x in ticks if start + 0.01 < x < end - 0.01]
    assert len(inside) >= 5, f"{len(inside)} ticks in {end - start:.3f} s"
