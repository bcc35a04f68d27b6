"""The column-chunk API (cppo.chunk): random batches split into 2-4 column chunks of
random widths, composed through row_partials, whole_rows and evaluate_chunk, give
cppo.evaluate's per-token outputs of the whole rows bit for bit; misuse raises
CppoError; the partials and carries pickle and are checked when read."""

from __future__ import annotations

import inspect
import pickle

import numpy as np
import pytest
from conftest import random_batch

import cppo
from cppo.chunk import (
    Carries,
    ChunkPos,
    RowPartials,
    WholeRows,
    divergences,
    evaluate_chunk,
    needs_divergences,
    row_counts,
    row_partials,
    whole_rows,
)

TOKEN_OUTPUTS = ("divergence", "weight", "threshold", "keep", "reason", "token_loss", "grad")

CONFIGS = {
    "cppo": None,  # a calibrated budget: the divergences are gathered
    "cppo_fixed_budget": {"rule": {"kind": "cppo", "calibration": None}},
    "cppo_column_positions": {"rule": {"kind": "cppo", "positions": "column"}},
    "dppo": {"rule": "dppo"},
    "trm_avg": {"rule": "trm_avg"},
    "trm_max": {"rule": "trm_max"},
    "gspo": {"rule": "dppo", "objective": "gspo"},
    "gspo_cppo": {"objective": "gspo"},
    "gmpo": {"rule": "dppo", "objective": "gmpo"},
    "minpro": {"objective": "minpro"},
    "seq_mean_token_mean": {"aggregation": "seq-mean-token-mean"},
    "token_sum_norm": {"rule": "dppo", "aggregation": "seq-mean-token-sum-norm"},
}


def split_columns(rng, width: int) -> list:
    """2 to 4 chunks of random widths (each >= 1) covering ``0..width``, as slices."""
    n = int(rng.integers(2, 5))
    cuts = np.sort(rng.choice(np.arange(1, width), n - 1, replace=False))
    edges = [0, *cuts.tolist(), width]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]


def chunk_arrays(batch, cols: slice):
    """The chunk's (logp, logp_old, advantages, mask): per-row advantages as they are,
    per-token ones sliced like the rest."""
    logp, logp_old, adv, mask = batch
    return logp[:, cols], logp_old[:, cols], adv if adv.ndim == 1 else adv[:, cols], mask[:, cols]


def run_chunks(batch, cols: list, config):
    """The whole protocol on one process: partials (and divergences) of every chunk,
    the whole rows, then the chunks in order. Returns the chunks' evaluations, the
    last carries and the rows."""
    b, width = batch[0].shape
    chunks = [chunk_arrays(batch, c) for c in cols]
    pos = [ChunkPos(c.start, width) for c in cols]
    partials = RowPartials(b)
    for ch, p in zip(chunks, pos):
        partials = partials.merge(row_partials(*ch, p, config))
    d = None
    if needs_divergences(config):
        d = np.concatenate([divergences(*ch, p, config) for ch, p in zip(chunks, pos)], axis=1)
    rows = whole_rows(partials, d, config)
    carries = Carries(b)
    evs = []
    for ch, p in zip(chunks, pos):
        before = carries
        ev, carries = evaluate_chunk(*ch, p, rows, carries, config)
        assert before.col == [p.col0] * b  # the incoming carries are left as they were
        evs.append(ev)
    carries.finish(rows, width)
    return evs, carries, rows


def assert_bits(x: np.ndarray, y: np.ndarray, what: str) -> None:
    """Same dtype, shape and bytes (NaN payloads and signed zeros included)."""
    assert x.dtype == y.dtype and x.shape == y.shape, what
    assert x.tobytes() == y.tobytes(), what


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("seed", range(4))
def test_chunks_reproduce_the_whole_rows_bit_for_bit(name, seed):
    """Every per-token output, concatenated over the chunks, is the whole rows'; the
    losses add up; the whole rows' counts and budgets are the batch's."""
    config = CONFIGS[name]
    rng = np.random.default_rng(1000 + seed)
    b, width = int(rng.integers(1, 9)), int(rng.integers(5, 41))
    dtype = np.float32 if seed % 2 else np.float64
    batch = random_batch(seed, b, width, dtype)
    if seed == 2:  # per-token advantages
        batch = (*batch[:2], rng.normal(size=(b, width)).astype(dtype), batch[3])
    whole = cppo.evaluate(*batch, config)
    cols = split_columns(rng, width)
    evs, carries, rows = run_chunks(batch, cols, config)
    for out in TOKEN_OUTPUTS:
        got = np.concatenate([getattr(ev, out) for ev in evs], axis=1)
        assert_bits(got, getattr(whole, out), f"{name}: {out}")
    # The row budgets: every chunk reports its row's δ_b^row, the whole row's.
    for ev in evs:
        assert_bits(ev.delta_b_row, whole.delta_b_row, f"{name}: delta_b_row")
    loss = sum(ev.loss for ev in evs)
    assert abs(loss - whole.loss) <= 1e-12 * max(1.0, abs(whole.loss)), (loss, whole.loss)
    assert row_counts(rows) == whole.counts
    assert rows.tokens == batch[3].sum(axis=1).tolist()
    assert carries.col == [width] * b and carries.tokens == rows.tokens
    assert sum(ev.counts.tokens for ev in evs) == whole.counts.tokens


def test_chunks_with_threads_and_uneven_batch():
    """The same bits whatever the thread count of each call."""
    batch = random_batch(7, 13, 33)
    cols = [slice(0, 5), slice(5, 6), slice(6, 33)]
    ref, _, _ = run_chunks(batch, cols, None)
    b, width = batch[0].shape
    partials = RowPartials(b)
    for c in cols:
        partials = partials.merge(row_partials(*chunk_arrays(batch, c), (c.start, width), threads=2))
    d = np.concatenate([divergences(*chunk_arrays(batch, c), (c.start, width), threads=3) for c in cols], axis=1)
    rows = whole_rows(partials, d)
    carries = Carries(b)
    for c, r in zip(cols, ref):
        ev, carries = evaluate_chunk(*chunk_arrays(batch, c), (c.start, width), rows, carries, threads=1)
        assert_bits(ev.grad, r.grad, "grad")


def test_partials_merge_in_any_order_and_divergences_in_any_column_order():
    """Merging is exact in any order; the gathered divergences' column order does not
    change δ_b^row."""
    batch = random_batch(3, 6, 24)
    cols = [slice(0, 7), slice(7, 15), slice(15, 24)]
    cfg = {"rule": "trm_avg"}
    parts = [row_partials(*chunk_arrays(batch, c), (c.start, 24), cfg) for c in cols]
    fwd = parts[0].merge(parts[1]).merge(parts[2])
    assert parts[2].merge(parts[0].merge(parts[1])) == fwd
    assert fwd == row_partials(*batch, (0, 24), cfg)
    ds = [divergences(*chunk_arrays(batch, c), (c.start, 24)) for c in cols]
    p = row_partials(*batch, (0, 24))
    a = whole_rows(p, np.concatenate(ds, axis=1)).delta_b_row
    b = whole_rows(p, np.concatenate(ds[::-1], axis=1)).delta_b_row
    assert a == b == cppo.evaluate(*batch).delta_b_row.tolist()


def test_pickle_and_bytes_round_trip():
    """RowPartials and Carries survive pickling and to_bytes/from_bytes, equal to the
    originals; a pickled carry continues the computation with the same bits."""
    batch = random_batch(5, 4, 12)
    cols = [slice(0, 4), slice(4, 12)]
    p = row_partials(*batch, (0, 12), {"rule": "trm_avg"})
    assert pickle.loads(pickle.dumps(p)) == p
    assert RowPartials.from_bytes(p.to_bytes()) == p
    ref, _, _ = run_chunks(batch, cols, None)
    partials = row_partials(*batch, (0, 12))
    rows = whole_rows(partials, divergences(*batch, (0, 12)))
    _, carries = evaluate_chunk(*chunk_arrays(batch, cols[0]), (0, 12), rows, Carries(4))
    again = pickle.loads(pickle.dumps(carries))
    assert again == carries and Carries.from_bytes(carries.to_bytes()) == carries
    assert again.col == [4] * 4
    ev, last = evaluate_chunk(*chunk_arrays(batch, cols[1]), (4, 12), rows, again)
    assert_bits(ev.grad, ref[1].grad, "grad")
    last.finish(rows, 12)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(rows)
    assert isinstance(rows, WholeRows) and len(rows) == 4


def test_bytes_are_checked_when_read():
    """Bytes that are not a carry's, truncated, or a carry the crate would never produce
    are refused with CppoError (kind Decode)."""
    good = Carries(1).to_bytes()
    for bad in [b"", b"garbage", good[:-1], good + b"\0", RowPartials(1).to_bytes()]:
        with pytest.raises(cppo.CppoError) as e:
            Carries.from_bytes(bad)
        assert e.value.kind == "Decode"
    # The carry's fields after the header and the row count: col, t (varints), then S,
    # W, the minimum ratio (f64). A carry at column 0 that has seen 5 tokens:
    header = len(good) - 1 - 2 - 24
    tampered = bytearray(good)
    tampered[header + 2] = 5
    with pytest.raises(cppo.CppoError, match="cannot have seen 5 response tokens"):
        Carries.from_bytes(bytes(tampered))
    tampered = bytearray(good)
    tampered[header + 3 + 16 : header + 3 + 24] = np.float64(-1.0).tobytes()
    with pytest.raises(cppo.CppoError, match="minimum ratio"):
        Carries.from_bytes(bytes(tampered))
    with pytest.raises(cppo.CppoError) as e:
        RowPartials.from_bytes(good)
    assert e.value.kind == "Decode"


def test_misuse_raises():
    """Chunks out of order, repeated or missing, a chunk past the width, mismatched
    lengths, missing divergences, MinPRO without its stop-gradient."""
    batch = random_batch(11, 5, 20)
    cols = [slice(0, 8), slice(8, 20)]
    first, second = (chunk_arrays(batch, c) for c in cols)
    partials = row_partials(*batch, (0, 20))
    rows = whole_rows(partials, divergences(*batch, (0, 20)))
    # The second chunk first.
    with pytest.raises(cppo.CppoError) as e:
        evaluate_chunk(*second, (8, 20), rows, Carries(5))
    assert e.value.kind == "ChunkOutOfOrder" and e.value.row == 0
    _, carries = evaluate_chunk(*first, (0, 20), rows, Carries(5))
    # The first chunk again.
    with pytest.raises(cppo.CppoError) as e:
        evaluate_chunk(*first, (0, 20), rows, carries)
    assert e.value.kind == "ChunkOutOfOrder"
    # Stopping before the last chunk.
    with pytest.raises(cppo.CppoError) as e:
        carries.finish(rows, 20)
    assert e.value.kind == "ChunkMismatch"
    # A chunk past the row width.
    with pytest.raises(cppo.CppoError) as e:
        evaluate_chunk(*second, (8, 19), rows, carries)
    assert e.value.kind == "ChunkMismatch"
    # Lengths: rows, carries, partials of another batch.
    with pytest.raises(cppo.CppoError) as e:
        evaluate_chunk(*second, (8, 20), rows, Carries(4))
    assert e.value.kind == "ShapeMismatch"
    with pytest.raises(cppo.CppoError) as e:
        partials.merge(RowPartials(3))
    assert e.value.kind == "ShapeMismatch"
    # A calibrated budget without the divergences, or with too few of them.
    with pytest.raises(cppo.CppoError) as e:
        whole_rows(partials)
    assert e.value.kind == "MissingArray" and e.value.array == "divergences"
    with pytest.raises(cppo.CppoError) as e:
        whole_rows(partials, divergences(*first, (0, 20)))
    assert e.value.kind == "ChunkMismatch"
    with pytest.raises(cppo.CppoError) as e:
        whole_rows(partials, np.zeros((5, 3), np.float32))
    assert e.value.kind == "Dtype"
    # MinPRO without its stop-gradient is refused under chunks.
    cfg = {"rule": "dppo", "objective": {"kind": "minpro", "stop_gradient": False}}
    rows = whole_rows(row_partials(*batch, (0, 20), cfg), config=cfg)
    with pytest.raises(cppo.CppoError) as e:
        evaluate_chunk(*first, (0, 20), rows, Carries(5), cfg)
    assert e.value.kind == "InvalidConfig" and e.value.field == "objective.stop_gradient"
    # Bad values are named by their whole-row column.
    bad = tuple(x.copy() for x in second)
    r, c = np.argwhere(bad[3])[0]
    bad[0][r, c] = np.nan
    with pytest.raises(cppo.CppoError) as e:
        row_partials(*bad, (8, 20), {"rule": "trm_avg"})
    assert (e.value.kind, e.value.row, e.value.col) == ("NonFinite", r, 8 + c)
    with pytest.raises(ValueError, match="col0"):
        row_partials(*first, (-1, 20))


def test_needs_divergences():
    """A calibrated CPPO budget needs them; a fixed one and other rules do not."""
    assert needs_divergences(None) and needs_divergences("cppo")
    assert not needs_divergences(CONFIGS["cppo_fixed_budget"])
    assert not needs_divergences({"rule": "trm_avg"})
    with pytest.raises(cppo.CppoError) as e:
        needs_divergences({"rule": {"kind": "dppo", "detla": 0.1}})
    assert e.value.field == "rule.detla"


def test_every_public_name_is_documented():
    """Every name in cppo.chunk.__all__, and the classes' public methods, have docstrings."""
    for name in cppo.chunk.__all__:
        obj = getattr(cppo.chunk, name)
        assert inspect.getdoc(obj), name
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if not attr.startswith("_") and callable(member):
                    assert inspect.getdoc(getattr(obj, attr)), f"{name}.{attr}"
