"""Column chunks, for context parallelism and streaming: the crate's ``cppo::chunk``.

A batch's rows are split into column chunks (columns ``c0..c1`` of every row, each
chunk with its own ``logp``, ``logp_old``, ``advantages`` (per row, or the chunk's
columns of per-token ones), ``mask`` ... arrays), and the chunks are computed one
after the other, each from the carries the previous one left. The concatenated
per-token outputs are bit for bit those of :func:`cppo.evaluate` on the whole rows.

1. :func:`row_partials` of every chunk, merged per row (:meth:`RowPartials.merge`; an
   all-gather across context-parallel ranks); when :func:`needs_divergences` says so
   (a calibrated CPPO budget), also every chunk's :func:`divergences`, concatenated into
   the rows' (B, L) array.
2. :func:`whole_rows` of the merged partials (and the divergences).
3. :func:`evaluate_chunk` of each chunk in column order, from ``Carries(B)`` for the
   first; each returns its outputs and the carries for the next chunk.

>>> import numpy as np, cppo
>>> from cppo.chunk import ChunkPos, Carries, evaluate_chunk, row_partials, whole_rows
>>> logp = np.array([[-0.1, -0.7, -0.2, -1.5], [-0.3, -0.05, np.nan, np.nan]])
>>> logp_old = np.array([[-0.3, -0.2, -0.2, -0.4], [-0.9, -0.1, 0.0, 0.0]])
>>> adv, mask = np.array([1.0, -0.5]), ~np.isnan(logp)
>>> cfg = {"rule": "dppo"}
>>> cols = [slice(0, 1), slice(1, 4)]
>>> chunks = [(logp[:, c], logp_old[:, c], adv, mask[:, c]) for c in cols]
>>> pos = [ChunkPos(c.start, 4) for c in cols]
>>> partials = row_partials(*chunks[0], pos[0], cfg).merge(row_partials(*chunks[1], pos[1], cfg))
>>> rows = whole_rows(partials, config=cfg)
>>> carries, grads = Carries(2), []
>>> for chunk, p in zip(chunks, pos):
...     ev, carries = evaluate_chunk(*chunk, p, rows, carries, cfg)
...     grads.append(ev.grad)
>>> carries.finish(rows, 4)
>>> bool((np.concatenate(grads, axis=1) == cppo.evaluate(logp, logp_old, adv, mask, cfg).grad).all())
True

:class:`RowPartials` and :class:`Carries` pickle (and have ``to_bytes`` /
``from_bytes``), so that ``torch.distributed``'s ``all_gather_object`` and
``send``/``recv`` of their bytes move them between processes; the crate checks them as
they are read. :class:`WholeRows` does not: every rank builds its own from the gathered
partials.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import numpy as np

from . import (
    ConfigLike,
    CppoError,
    Counts,
    Evaluation,
    _as_array,
    _config_text,
    _cppo,
    _error,
    _inputs,
    _threads,
    _with_config_path,
)
from ._cppo import Carries, RowPartials, WholeRows

__all__ = [
    "Carries",
    "ChunkPos",
    "RowPartials",
    "WholeRows",
    "divergences",
    "evaluate_chunk",
    "needs_divergences",
    "row_counts",
    "row_partials",
    "whole_rows",
]


class ChunkPos(NamedTuple):
    """Where a chunk's columns sit in the whole rows (the crate's ``ChunkPos``):
    ``col0``, the whole-row column of its first column, and ``width``, the whole rows'
    padded width L (the default ``norm_length``, the ``column`` positions' horizon, the
    bound no chunk may pass). A plain ``(col0, width)`` tuple does as well."""

    col0: int
    width: int


def _pos(pos: Any) -> ChunkPos:
    """``pos`` as a ChunkPos of two integers >= 0."""
    try:
        col0, width = pos
    except (TypeError, ValueError):
        raise TypeError(f"pos must be a ChunkPos(col0, width) or a (col0, width) pair, not {pos!r}") from None
    for name, v in (("col0", col0), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"pos.{name} must be an integer >= 0, not {v!r}")
    return ChunkPos(int(col0), int(width))


def _call(native, arrays, optional, pos, config, threads, *middle):
    """Calls a native chunk function with the checked inputs; a config parse error gets
    its field path as :func:`cppo.evaluate`'s do."""
    p = _pos(pos)
    text = _config_text(config)
    try:
        return native(*arrays, p.col0, p.width, *middle, text, *optional, _threads(threads))
    except CppoError as e:
        raise _with_config_path(e, text) from None


def needs_divergences(config: ConfigLike = None) -> bool:
    """Whether :func:`whole_rows` needs the rows' gathered :func:`divergences` under
    ``config``: a CPPO budget with a calibration (the default config's), whose
    δ_b^row is a quantile of the whole row's divergences.

    >>> needs_divergences(None), needs_divergences({"rule": "dppo"})
    (True, False)

    Raises:
        CppoError: a bad config.
    """
    text = _config_text(config)
    try:
        return _cppo.needs_divergences(text)
    except CppoError as e:
        raise _with_config_path(e, text) from None


def row_partials(
    logp: Any,
    logp_old: Any,
    advantages: Any,
    mask: Any,
    pos: Any,
    config: ConfigLike = None,
    *,
    topk_logp_old: Any = None,
    topk_logp: Any = None,
    logp_ref: Any = None,
    is_weights: Any = None,
    threads: Optional[int] = None,
) -> RowPartials:
    """The first pass over one chunk: each row's mergeable partial (its response tokens
    and the exact sums whole-row rules and objectives need), the crate's
    ``chunk::row_partials``.

    Args:
        logp, logp_old, advantages, mask: the chunk's (B, Lc) arrays, as
            :func:`cppo.evaluate` takes them (``advantages`` (B,) or the chunk's (B, Lc)).
        pos: the chunk's :class:`ChunkPos` ``(col0, width)``.
        config: the config, as :func:`cppo.evaluate` takes it; the same for every chunk.
        topk_logp_old, topk_logp, logp_ref, is_weights, threads: as :func:`cppo.evaluate`'s,
            the chunk's columns.

    Returns:
        :class:`RowPartials`, one per row; merge a row's over all its chunks with
        :meth:`RowPartials.merge` (exact, in any order).

    Raises:
        CppoError: a bad value (named by its whole-row column), a shape mismatch, a bad
            config.
    """
    arrays, optional = _inputs(logp, logp_old, advantages, mask, topk_logp_old, topk_logp, logp_ref, is_weights)
    return _call(_cppo.row_partials, arrays, optional, pos, config, threads)


def divergences(
    logp: Any,
    logp_old: Any,
    advantages: Any,
    mask: Any,
    pos: Any,
    config: ConfigLike = None,
    *,
    topk_logp_old: Any = None,
    topk_logp: Any = None,
    logp_ref: Any = None,
    is_weights: Any = None,
    threads: Optional[int] = None,
) -> np.ndarray:
    """One chunk's divergences D_t, a (B, Lc) float64 array, NaN off the response
    tokens (the crate's ``chunk::divergences_into``). When :func:`needs_divergences`
    says so, concatenate the chunks' arrays along the columns (an all-gather; the column
    order does not matter) and pass them to :func:`whole_rows`.

    Arguments as :func:`row_partials`'.

    Raises:
        CppoError: a bad value at a response position, a shape mismatch, a bad config.
    """
    arrays, optional = _inputs(logp, logp_old, advantages, mask, topk_logp_old, topk_logp, logp_ref, is_weights)
    return _call(_cppo.divergences, arrays, optional, pos, config, threads)


def whole_rows(partials: RowPartials, divergences: Any = None, config: ConfigLike = None) -> WholeRows:
    """Each row's :class:`WholeRows` entry, what every chunk of the row reads (its
    response tokens T, the whole-row sums, δ_b^row), from ``partials`` merged over all
    of the row's chunks and, when :func:`needs_divergences` says so, ``divergences``:
    the row's (B, L) float64 divergences gathered from all its chunks (any width and
    column order; NaN off the response tokens, as :func:`divergences` writes them).
    The crate's ``chunk::whole_rows``.

    Raises:
        CppoError: divergences missing for a calibrated budget (``MissingArray``), not
            B rows of them (``ShapeMismatch``), not as many as the partials' tokens
            (``ChunkMismatch``), a bad config.
    """
    if not isinstance(partials, RowPartials):
        raise TypeError(f"partials must be RowPartials, not {type(partials).__name__}")
    if divergences is not None:
        divergences = _as_array(divergences, "divergences", np.dtype(np.float64))
        if divergences.dtype != np.float64 or divergences.ndim != 2:
            raise _error(
                f"divergences must be a 2-D float64 array, not {divergences.ndim}-D {divergences.dtype}",
                kind="Dtype" if divergences.dtype != np.float64 else "ShapeMismatch",
                array="divergences",
            )
    text = _config_text(config)
    try:
        return _cppo.whole_rows(partials, divergences, text)
    except CppoError as e:
        raise _with_config_path(e, text) from None


def row_counts(rows: WholeRows) -> Counts:
    """N_tok and N_seq of the whole rows (the crate's ``chunk::row_counts``): what a
    context-parallel group contributes to data-parallel global counts (a chunk's own
    :func:`cppo.counts` would count a split row once per chunk)."""
    return Counts(*rows.counts())


def evaluate_chunk(
    logp: Any,
    logp_old: Any,
    advantages: Any,
    mask: Any,
    pos: Any,
    rows: WholeRows,
    carries: Carries,
    config: ConfigLike = None,
    *,
    topk_logp_old: Any = None,
    topk_logp: Any = None,
    logp_ref: Any = None,
    is_weights: Any = None,
    threads: Optional[int] = None,
) -> tuple:
    """The second pass over one chunk (the crate's ``chunk::evaluate_chunk_into``): its
    outputs, from the rows' :class:`WholeRows` and the :class:`Carries` the previous
    chunk left (``Carries(B)`` before the first). Chunks of a row come in column order.

    Arguments as :func:`row_partials`', and ``rows`` (from :func:`whole_rows`) and
    ``carries`` (``carries.col`` must be ``pos.col0`` for every row). The aggregation's
    N_tok and N_seq are the whole rows' unless the config sets them.

    Returns:
        ``(evaluation, carries)``: an :class:`cppo.Evaluation` of the chunk's columns
        (its per-token outputs are the whole rows' columns ``col0..col0 + Lc``, bit for
        bit; ``loss`` the chunk's share, the chunks' losses add up to the whole's;
        ``diagnostics`` and ``tally`` the chunk's), and the carries for the next chunk.
        ``carries`` itself is left as it was. After the last chunk,
        :meth:`Carries.finish` checks that the chunks covered the rows.

    Raises:
        CppoError: ``ChunkOutOfOrder`` for a carry not at ``pos.col0``,
            ``ChunkMismatch`` for a chunk past the width or holding more tokens than its
            row, ``InvalidConfig`` for MinPRO without its stop-gradient (its gradient
            may reach an earlier chunk), and :func:`cppo.evaluate`'s errors.
    """
    if not isinstance(rows, WholeRows):
        raise TypeError(f"rows must be WholeRows (from whole_rows), not {type(rows).__name__}")
    if not isinstance(carries, Carries):
        raise TypeError(f"carries must be Carries, not {type(carries).__name__}")
    arrays, optional = _inputs(logp, logp_old, advantages, mask, topk_logp_old, topk_logp, logp_ref, is_weights)
    raw, out = _call(_cppo.evaluate_chunk, arrays, optional, pos, config, threads, rows, carries)
    return Evaluation._from_native(raw), out
