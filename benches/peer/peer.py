"""Times the crate against PyTorch on one batch, side by side, in interleaved rounds.

The batch is the one the performance issue names: B x L float32 log-probs, 90% of the
slots response tokens, per-row advantages; the config is CPPO with binary TV and a fixed
budget (delta 0.2, delta_b 0.05, w_min 0.8), the surrogate, token-mean. Each round
times, on the same number of threads:

- eager PyTorch (cppo_torch.py: elementwise ops, cumsum, autograd);
- the same function under torch.compile (inductor, C++ on CPU);
- `cppo bench --input BATCH.npz --outputs grad` (evaluate_into writing the gradient
  and the keep mask, timed by the crate itself over at least --min-time seconds).

Each prints tokens per second (B x L slots per second, the best of its runs in the
round); the summary is the median over rounds of each round's ratios, with the machine.
With --check, the torch mask and gradient are first compared with `cppo eval`'s.
--numerics exact,f32_exp times the crate under each of its numerics in every round (the
f32 exponentials of `"numerics": "f32_exp"` are what the torch peer computes in on f32
inputs); the summary then has one set of ratios per numerics.

Setup: python3 -m venv .venv && .venv/bin/pip install numpy torch
Usage: .venv/bin/python benches/peer/peer.py target/release/cppo [--rows 64] [--len 8192]
       [--threads 2] [--rounds 5] [--check] [--numerics exact,f32_exp]
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cppo_torch import cppo_fixed_budget  # noqa: E402

DELTA, DELTA_B, W_MIN = 0.2, 0.05, 0.8
CONFIG = {
    "divergence": "binary_tv",
    "rule": {"kind": "cppo", "delta": DELTA, "delta_b": DELTA_B, "w_min": W_MIN,
             "calibration": None},
    "objective": {"kind": "surrogate"},
    "aggregation": "token-mean",
}


def make_batch(rows, length, seed=0):
    rng = np.random.default_rng(seed)
    lq = np.log(rng.uniform(0.05, 1.0, (rows, length))).astype(np.float32)
    lp = np.minimum(lq + rng.normal(0.0, 0.1, (rows, length)).astype(np.float32), 0.0)
    adv = rng.normal(0.0, 1.0, rows).astype(np.float32)
    mask = np.zeros((rows, length), dtype=bool)
    mask[:, : int(length * 0.9)] = True
    return lp, lq, adv, mask


def best_rate(fn, tokens, min_time=0.5, min_runs=3):
    fn()  # warm-up
    times, total = [], 0.0
    while len(times) < min_runs or total < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        total += times[-1]
    return tokens / min(times)


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def check(cppo_bin, d, batch_path, tensors, numerics):
    out = os.path.join(d, "out.npz")
    cfg = os.path.join(d, f"cfg_{numerics}.json")
    subprocess.run([cppo_bin, "eval", "--config", cfg, "--input", batch_path, "--output", out],
                   check=True)
    got = np.load(out)
    _, grad, keep = cppo_fixed_budget(*tensors, DELTA, DELTA_B, W_MIN)
    same_keep = np.array_equal(got["keep"], keep.numpy())
    scale = np.abs(got["grad"]).max()
    err = np.abs(got["grad"] - grad.numpy()).max() / max(scale, 1e-30)
    print(f"check ({numerics}): keep masks equal: {same_keep}; "
          f"max |grad difference| / max |grad| = {err:.2e}")
    if not same_keep or err > 1e-5:
        sys.exit("the torch peer and cppo eval disagree: the comparison would be unfair")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cppo_bin")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--len", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--numerics", default="exact",
                    help="the crate's numerics to time, comma-separated: exact, f32_exp")
    a = ap.parse_args()
    modes = a.numerics.split(",")
    torch.set_num_threads(a.threads)
    lp, lq, adv, mask = make_batch(a.rows, a.len)
    tensors = [torch.from_numpy(x) for x in (lp, lq, adv, mask)]
    tokens = a.rows * a.len
    eager = lambda: cppo_fixed_budget(*tensors, DELTA, DELTA_B, W_MIN)  # noqa: E731
    compiled_fn = torch.compile(cppo_fixed_budget)
    compiled = lambda: compiled_fn(*tensors, DELTA, DELTA_B, W_MIN)  # noqa: E731
    compiled()  # compile outside the timing
    rounds = []
    with tempfile.TemporaryDirectory() as d:
        batch_path = os.path.join(d, "batch.npz")
        np.savez(batch_path, logp=lp, logp_old=lq, advantages=adv, mask=mask)
        for m in modes:
            with open(os.path.join(d, f"cfg_{m}.json"), "w") as f:
                json.dump({**CONFIG, "numerics": m}, f)
            if a.check:
                check(a.cppo_bin, d, batch_path, tensors, m)
        for r in range(a.rounds):
            te = best_rate(eager, tokens)
            tc = best_rate(compiled, tokens)
            tr = {}
            for m in modes:
                run = subprocess.run(
                    [a.cppo_bin, "bench", "--input", batch_path,
                     "--config", os.path.join(d, f"cfg_{m}.json"),
                     "--threads", str(a.threads), "--outputs", "grad"],
                    capture_output=True, text=True, check=True)
                bench = json.loads(run.stdout)
                tr[m] = bench["tokens_per_s"]
            rounds.append((tr, te, tc))
            crate = "  ".join(f"cppo {m} {tr[m] / 1e6:.1f}" for m in modes)
            print(f"round {r}: {crate}  torch eager {te / 1e6:.1f}  "
                  f"torch.compile {tc / 1e6:.1f}  (M tokens/s)")
    med = lambda xs: round(statistics.median(xs), 2)  # noqa: E731
    summary = {
        "rows": a.rows, "len": a.len, "threads": a.threads, "rounds": a.rounds,
        "cpu": cpu_model(), "isa": bench["isa"], "torch": torch.__version__,
        "eager_m_tokens_per_s": med([e / 1e6 for _, e, _ in rounds]),
        "compile_m_tokens_per_s": med([c / 1e6 for _, _, c in rounds]),
    }
    for m in modes:
        # The exact numerics keep the keys they always had.
        sfx = "" if m == "exact" else f"_{m}"
        summary[f"cppo_vs_torch_compile{sfx}"] = med([r[m] / c for r, _, c in rounds])
        summary[f"cppo_vs_torch_eager{sfx}"] = med([r[m] / e for r, e, _ in rounds])
        summary[f"cppo_m_tokens_per_s{sfx}"] = med([r[m] / 1e6 for r, _, _ in rounds])
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
