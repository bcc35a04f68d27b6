"""Data and context parallelism across 4 torch.distributed (gloo, loopback) processes.

Data parallelism: with cppo.torch.global_counts in every rank's config, the ranks'
losses add up to the whole batch's, their gradients are its rows, and their merged
tallies give its diagnostics. Context parallelism: every rank holds one column chunk
of the same rows (cppo.chunk); the partials are all-gathered, the carries sent from
rank to rank, and the concatenated outputs are the whole rows' bit for bit.
Skipped without torch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

WORLD = 4
WORKER = Path(__file__).resolve().parent / "_distributed_worker.py"
CP_WORKER = Path(__file__).resolve().parent / "_context_parallel_worker.py"


def _free_port() -> int:
    """A TCP port on the loopback interface that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(worker: Path) -> None:
    """Launches ``worker`` as WORLD gloo ranks on the loopback interface and checks
    that every one exits 0 and prints ``rank r: ok``."""
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(WORLD),
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(WORLD)
    ]
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=180)
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {r} exited {p.returncode}:\n{out}"
        assert f"rank {r}: ok" in out


needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")


@needs_gloo
def test_four_gloo_ranks_add_up_to_the_whole_batch():
    """Four ranks, each a row shard, each with the global counts: rank 0 checks the sums."""
    _run_ranks(WORKER)


@needs_gloo
def test_four_gloo_ranks_of_column_chunks_give_the_whole_rows():
    """Four context-parallel ranks, each a column chunk of the same rows: partials and
    divergences all-gathered, carries sent rank to rank; every rank checks every
    per-token output against the whole rows' cppo.evaluate, bit for bit."""
    _run_ranks(CP_WORKER)
