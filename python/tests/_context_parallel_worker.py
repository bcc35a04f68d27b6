"""One rank of tests/test_distributed.py's context-parallel test (launched 4 times,
with the torch.distributed env:// variables set): every rank holds one column chunk of
the same rows. The partials (and, for a calibrated budget, the divergences) are
all-gathered; the carries go from rank r - 1 to rank r with send/recv; every rank then
checks that the concatenated outputs are the whole rows' cppo.evaluate, bit for bit."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import cppo
from cppo.chunk import Carries, ChunkPos, RowPartials, divergences, evaluate_chunk, needs_divergences
from cppo.chunk import row_partials, whole_rows

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import random_batch  # noqa: E402

CONFIGS = [
    None,  # CPPO with a calibrated budget: the divergences are all-gathered too
    {"rule": {"kind": "cppo", "calibration": None}},
    {"rule": "dppo", "aggregation": "seq-mean-token-mean"},
    {"rule": "trm_avg"},
    {"rule": "dppo", "objective": "gspo"},
]
OUTPUTS = ("divergence", "weight", "threshold", "keep", "reason", "token_loss", "grad")
B, L = 9, 37
EDGES = [0, 5, 17, 18, 37]  # uneven chunks: 5, 12, 1 and 19 columns


def send_carries(carries: Carries, dst: int) -> None:
    """The carries' bytes to rank ``dst``: their length, then the bytes."""
    data = torch.frombuffer(bytearray(carries.to_bytes()), dtype=torch.uint8)
    dist.send(torch.tensor([data.numel()], dtype=torch.int64), dst)
    dist.send(data, dst)


def recv_carries(src: int) -> Carries:
    """The carries rank ``src`` sent (checked by the crate as they are read)."""
    n = torch.zeros(1, dtype=torch.int64)
    dist.recv(n, src)
    data = torch.empty(int(n.item()), dtype=torch.uint8)
    dist.recv(data, src)
    return Carries.from_bytes(data.numpy().tobytes())


def check(rank: int, world: int, config, per_token: bool) -> None:
    """One config: rank r computes chunk r; every rank compares the gathered outputs."""
    batch = random_batch(1, B, L)
    if per_token:
        batch = (*batch[:2], np.random.default_rng(2).normal(size=(B, L)), batch[3])
    cols = slice(EDGES[rank], EDGES[rank + 1])
    logp, logp_old, adv, mask = batch
    mine = (logp[:, cols], logp_old[:, cols], adv if adv.ndim == 1 else adv[:, cols], mask[:, cols])
    pos = ChunkPos(cols.start, L)

    # First pass: the partials, all-gathered and merged; the divergences if needed.
    parts = [None] * world
    dist.all_gather_object(parts, row_partials(*mine, pos, config))
    merged = RowPartials(B)
    for p in parts:
        merged = merged.merge(p)
    d = None
    if needs_divergences(config):
        ds = [None] * world
        dist.all_gather_object(ds, divergences(*mine, pos, config))
        d = np.concatenate(ds, axis=1)
    rows = whole_rows(merged, d, config)

    # Second pass: the carries from rank to rank, in column order.
    carries = Carries(B) if rank == 0 else recv_carries(rank - 1)
    ev, carries = evaluate_chunk(*mine, pos, rows, carries, config)
    if rank + 1 < world:
        send_carries(carries, rank + 1)
    else:
        carries.finish(rows, L)

    gathered = [None] * world
    dist.all_gather_object(gathered, {k: getattr(ev, k) for k in (*OUTPUTS, "delta_b_row", "loss")})
    whole = cppo.evaluate(*batch, config)
    for k in OUTPUTS:
        got = np.concatenate([g[k] for g in gathered], axis=1)
        want = getattr(whole, k)
        assert got.dtype == want.dtype and got.shape == want.shape, (config, k)
        assert got.tobytes() == want.tobytes(), (config, k)
    for g in gathered:
        assert g["delta_b_row"].tobytes() == whole.delta_b_row.tobytes(), config
    loss = sum(g["loss"] for g in gathered)
    assert abs(loss - whole.loss) <= 1e-12 * max(1.0, abs(whole.loss)), (config, loss, whole.loss)


def main() -> None:
    """Every config, then a clean shutdown; an exception fails this rank's exit code."""
    dist.init_process_group("gloo", init_method="env://")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == len(EDGES) - 1
    for config in CONFIGS:
        for per_token in (False, True):
            check(rank, world, config, per_token)
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank}: ok")


if __name__ == "__main__":
    main()
