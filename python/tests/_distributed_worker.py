"""One rank of tests/test_distributed.py (launched 4 times, with the torch.distributed
env:// variables set): shards a batch by rows, runs cppo.torch.loss with the global
counts, and on rank 0 checks that the shards add up to the whole batch."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import cppo
import cppo.torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import random_batch  # noqa: E402

CONFIGS = [
    None,
    {"rule": "dppo", "aggregation": "seq-mean-token-mean"},
    "verl_pr6731_scripts",
    {"preset": "grpo", "aggregation": "seq-mean-token-sum"},
]


def check(rank: int, world: int, base) -> None:
    """One config: every rank its shard; rank 0 compares with the whole batch."""
    batch = random_batch(0, 23, 40)  # 23 rows: uneven shards of 6, 6, 6, 5
    rows = np.array_split(np.arange(23), world)[rank]
    logp, logp_old, adv, mask = (torch.from_numpy(np.ascontiguousarray(x[rows])) for x in batch)
    counts = cppo.torch.global_counts(mask)
    if base is None:
        cfg = {}
    elif isinstance(base, str):
        cfg = {"preset": base}
    else:
        cfg = dict(base)
    cfg.update(num_tokens=counts.tokens, num_seqs=counts.seqs)
    logp = logp.clone().requires_grad_(True)
    loss, ev = cppo.torch.loss(logp, logp_old, adv, mask, cfg, return_evaluation=True)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    grads = [None] * world
    dist.all_gather_object(grads, logp.grad.numpy())
    tallies = [None] * world
    dist.all_gather_object(tallies, ev.tally)
    if rank == 0:
        whole = cppo.evaluate(*batch, base)
        assert counts == whole.counts, (counts, whole.counts)
        assert abs(total.item() - whole.loss) <= 1e-12 * abs(whole.loss), (base, total.item(), whole.loss)
        grad = np.concatenate(grads)
        assert np.array_equal(grad, whole.grad), base
        diagnostics, _ = cppo.merge_tallies(tallies, cfg)
        for key in ("response_tokens", "sequences", "kept_tokens", "masked_frac", "ratio_max", "divergence_max"):
            assert diagnostics[key] == whole.diagnostics[key], key
        assert abs(diagnostics["loss"] - whole.loss) <= 1e-12 * abs(whole.loss)


def main() -> None:
    """Every config, then a clean shutdown; an exception fails this rank's exit code."""
    dist.init_process_group("gloo", init_method="env://")
    rank, world = dist.get_rank(), dist.get_world_size()
    for base in CONFIGS:
        check(rank, world, base)
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank}: ok")


if __name__ == "__main__":
    main()
