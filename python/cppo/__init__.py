"""CPPO and token-level trust-region masks for LLM RL, over numpy arrays.

The math is the ``cppo`` Rust crate's; this package moves numpy arrays to it and back
without copies where the layout allows, releases the GIL while it computes, and raises
:class:`CppoError` for bad input.

>>> import numpy as np, cppo
>>> logp = np.array([[-0.2, -1.0, -0.1, -2.5], [-0.3, np.nan, -0.9, np.nan]], np.float32)
>>> logp_old = np.array([[-0.3, -1.6, -0.1, -1.2], [-0.2, 0.0, -1.4, 0.0]], np.float32)
>>> adv = np.array([1.0, -1.0], np.float32)
>>> mask = np.array([[1, 1, 1, 1], [1, 0, 1, 0]], bool)
>>> ev = cppo.evaluate(logp, logp_old, adv, mask)
>>> ev.reason.tolist()
[[1, 3, 2, 2], [1, 0, 2, 0]]

``cppo.torch`` (importable when PyTorch is installed) wraps :func:`evaluate` as a loss
tensor whose backward is the crate's gradient.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Union

import numpy as np

try:
    from . import _cppo
except ImportError as e:  # pragma: no cover - a source tree without the built module
    raise ImportError(
        f"cppo's native module is missing from {__path__[0]}: this looks like the source "
        "tree. Install the package (pip install ./python) and import it from elsewhere "
        "(run the tests with `pytest python/tests`, not `python -m pytest` inside python/)."
    ) from e
from ._cppo import CppoError

__all__ = [
    "CppoError",
    "Counts",
    "Evaluation",
    "chunk",
    "counts",
    "describe_presets",
    "evaluate",
    "merge_tallies",
    "presets",
    "resolve_config",
]

__version__ = "0.1.0"

#: The instruction set the crate's fused pass runs with on this CPU ("avx512", "avx2"
#: or "baseline"); every one gives the same bits.
INSTRUCTION_SET: str = _cppo.instruction_set

ConfigLike = Union[None, str, Mapping]

# The attributes every CppoError carries (None where they do not apply). Class-level
# defaults, so that a CppoError raised by hand has them too.
_ERROR_ATTRS = ("kind", "array", "row", "col", "k", "value", "field", "hint", "line", "column")
for _name in _ERROR_ATTRS:
    setattr(CppoError, _name, None)
del _name

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_MASKS = tuple(
    np.dtype(t)
    for t in (
        np.bool_,
        np.uint8,
        np.int8,
        np.int16,
        np.int32,
        np.int64,
        np.uint16,
        np.uint32,
        np.uint64,
        np.float32,
        np.float64,
    )
)


def _error(message: str, **attrs: Any) -> CppoError:
    """A CppoError raised by the Python layer, with the same attributes as the crate's."""
    err = CppoError(message)
    for name in _ERROR_ATTRS:
        setattr(err, name, attrs.get(name))
    return err


def _as_array(x: Any, name: str, dtype: Optional[np.dtype] = None) -> np.ndarray:
    """``x`` as a numpy array the crate can view in place.

    An ndarray is passed through untouched (no copy, whatever its strides) unless its
    memory cannot be viewed as typed elements: non-native byte order, misaligned data,
    or strides that are not a multiple of the element size; those are copied. Anything
    else (a list, a scalar, an object with ``__array__``) goes through ``np.asarray``,
    in ``dtype`` when one is given.
    """
    if isinstance(x, np.ndarray):
        a = x
    else:
        try:
            a = np.asarray(x, dtype=dtype) if dtype is not None else np.asarray(x)
        except (TypeError, ValueError) as e:
            raise _error(f"{name} cannot be read as a numpy array: {e}", kind="Dtype", array=name) from None
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    if not a.flags.aligned or any(s % a.itemsize for s in a.strides):
        a = np.array(a, order="C")
    return a


def _float_array(x: Any, name: str, ndims: tuple[int, ...], dtype: Optional[np.dtype]) -> np.ndarray:
    """A float input: ``dtype`` (``logp``'s) when given, else float32 or float64."""
    a = _as_array(x, name, dtype)
    if dtype is None and a.dtype not in _FLOATS:
        if a.dtype.kind in "iub" and not isinstance(x, np.ndarray):
            a = a.astype(np.float64)  # a list of ints
        else:
            raise _error(
                f"{name} has dtype {a.dtype}; cppo takes float32 or float64 "
                f"(convert with {name}.astype(np.float32))",
                kind="Dtype",
                array=name,
            )
    if dtype is not None and a.dtype != dtype:
        raise _error(
            f"{name} has dtype {a.dtype}, logp {dtype}: every float input has logp's type "
            f"(convert with {name}.astype(np.{dtype}))",
            kind="Dtype",
            array=name,
        )
    if a.ndim not in ndims:
        want = " or ".join(f"{n}-D" for n in ndims)
        raise _error(
            f"{name} has shape {a.shape}, expected a {want} array",
            kind="ShapeMismatch",
            array=name,
        )
    return a


def _mask_array(x: Any) -> np.ndarray:
    """The response mask: bool, an integer type, float32 or float64, 2-D."""
    a = _as_array(x, "mask")
    if a.dtype not in _MASKS:
        raise _error(
            f"mask has dtype {a.dtype}; cppo takes bool, an integer type, float32 or float64 "
            "(convert with mask.astype(bool))",
            kind="Dtype",
            array="mask",
        )
    if a.ndim != 2:
        raise _error(f"mask has shape {a.shape}, expected a 2-D array", kind="ShapeMismatch", array="mask")
    return a


def _json_default(x: Any) -> Any:
    """numpy scalars in a config dict, as Python numbers."""
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"config value {x!r} of type {type(x).__name__} is not JSON")


def _config_text(config: ConfigLike) -> Optional[str]:
    """The config as the crate reads it: None, JSON text, or a preset's name."""
    if config is None or isinstance(config, str):
        return config
    if isinstance(config, Mapping):
        return json.dumps(dict(config), default=_json_default)
    raise TypeError(f"config must be a dict, a JSON string, a preset name or None, not {type(config).__name__}")


def _json_path_at(text: str, end: int) -> Optional[str]:
    """The dotted path of the JSON key whose value is being read at offset ``end`` of
    ``text``: ``rule.kind`` in ``{"rule": {"kind": "cpo"}}`` at the end of ``"cpo"``.
    None where no key encloses the position."""
    stack: list = []  # per open object: [key, expecting a key]; per array: [index, None]
    i = 0
    while i < min(end, len(text)):
        c = text[i]
        if c == '"':
            j = i + 1
            while j < len(text) and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            if stack and stack[-1][1] is True:
                try:
                    stack[-1][0] = json.loads(text[i : j + 1])
                except ValueError:
                    return None
                stack[-1][1] = False
            i = j + 1
            continue
        if c == "{":
            stack.append([None, True])
        elif c == "[":
            stack.append([0, None])
        elif c in "}]":
            if stack:
                stack.pop()
        elif c == "," and stack:
            if stack[-1][1] is None:
                stack[-1][0] += 1
            else:
                stack[-1][1] = True
        i += 1
    keys = [str(k) for k, _ in stack if k is not None]
    return ".".join(keys) or None


def _error_offset(text: str, message: str, line: int, column: int) -> int:
    """Where in ``text`` a config parse error is: the end of the unknown name (an
    unknown variant's value, an unknown field's key: serde may report those at the end
    of an enclosing object), else serde_json's 1-based (line, column)."""
    m = re.search(r"unknown variant `([^`]*)`", message)
    if m:
        v = re.search(r":\s*" + re.escape(json.dumps(m.group(1))), text)
        if v:
            return v.end()
    m = re.search(r"unknown field `([^`]*)`", message)
    if m:
        k = re.search(re.escape(json.dumps(m.group(1))) + r"\s*:", text)
        if k:
            return k.start() + len(json.dumps(m.group(1)))
    lines = text.split("\n")
    return sum(len(x) + 1 for x in lines[: max(line, 1) - 1]) + column


def _with_config_path(err: CppoError, text: Optional[str]) -> CppoError:
    """A config parse error with ``field`` set to the dotted path of the key where
    reading stopped, when the crate's message names no path of its own (an unknown
    name, a wrong type): ``aggregation`` for an unknown aggregation, ``rule.detla`` for
    an unknown field ``detla`` of the rule."""
    if getattr(err, "kind", None) != "ConfigParse" or not text or err.line is None:
        return err
    path = _json_path_at(text, _error_offset(text, str(err), err.line, err.column))
    if path is None:
        return err
    if err.field is None or ("." not in err.field and path.endswith("." + err.field)):
        err.field = path
    return err


def _threads(threads: Optional[int]) -> Optional[int]:
    """None (the global rayon pool) or a thread count >= 1."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ValueError(f"threads must be None or an integer >= 1, not {threads!r}")
    return int(threads)


class Counts(NamedTuple):
    """Response tokens and sequences (rows with at least one response token) of a batch.

    Sum them over data-parallel ranks or micro-batches and pass the totals as the
    config's ``num_tokens`` and ``num_seqs``: the shards' losses and gradients then add
    up to the whole batch's.
    """

    tokens: int
    seqs: int


@dataclass(frozen=True, eq=False)
class Evaluation:
    """What :func:`evaluate` returns.

    ``loss`` is the aggregated loss. The per-token outputs are (B, L) numpy arrays in
    logp's float type (``keep`` bool, ``reason`` uint8: 0 not a response token, 1
    feasible, 2 kept by the corrective bypass, 3 masked by the token threshold, 4 masked
    by the prefix budget), zero at non-response positions; ``delta_b_row`` is (B,).
    ``grad`` is dL/dlogp. ``diagnostics`` is the crate's ``Diagnostics`` as a dict (its
    ``verl`` and ``unirl`` entries hold the metrics those trainers log, under their
    names); ``tally`` the mergeable counts and sums behind it (see :func:`merge_tallies`;
    its minima ``ratio_min`` and ``budget_min`` are None when there is nothing to take
    the minimum of, where the crate holds +inf).
    """

    loss: float
    divergence: np.ndarray
    weight: np.ndarray
    threshold: np.ndarray
    keep: np.ndarray
    reason: np.ndarray
    token_loss: np.ndarray
    grad: np.ndarray
    delta_b_row: np.ndarray
    diagnostics: dict
    tally: dict

    @classmethod
    def _from_native(cls, raw: dict) -> "Evaluation":
        """From the native module's result dict (diagnostics and tally as JSON text)."""
        raw = dict(raw)
        raw["diagnostics"] = json.loads(raw["diagnostics"])
        raw["tally"] = json.loads(raw["tally"])
        return cls(**raw)

    @property
    def counts(self) -> Counts:
        """This batch's own response tokens and sequences."""
        return Counts(self.diagnostics["response_tokens"], self.diagnostics["sequences"])

    def metrics(self, prefix: str = "cppo/") -> dict:
        """The diagnostics flattened for a logger: ``{prefix + name: float}``.

        Nested entries join with ``/`` (``verl/pg_clipfrac``, ``delta_b_row/mean``), the
        deciles are ``masked_frac_by_decile/0`` to ``/9``, and entries that are None (no
        clip, no threshold, no budget) are left out.
        """
        out: dict = {}

        def walk(key: str, v: Any) -> None:
            """Adds ``v`` under ``key``, descending into dicts and lists."""
            if v is None:
                return
            if isinstance(v, dict):
                for k, x in v.items():
                    walk(f"{key}/{k}", x)
            elif isinstance(v, list):
                for i, x in enumerate(v):
                    walk(f"{key}/{i}", x)
            else:
                out[prefix + key] = float(v)

        for k, v in self.diagnostics.items():
            walk(k, v)
        return out

    def __repr__(self) -> str:
        """A one-line summary: the loss, the shape and dtype, the tokens and the masked fraction."""
        d = self.diagnostics
        return (
            f"Evaluation(loss={self.loss!r}, shape={self.grad.shape}, dtype={self.grad.dtype}, "
            f"tokens={d['response_tokens']}, masked_frac={d['masked_frac']:.4g})"
        )


def evaluate(
    logp: Any,
    logp_old: Any,
    advantages: Any,
    mask: Any,
    config: ConfigLike = None,
    *,
    topk_logp_old: Any = None,
    topk_logp: Any = None,
    logp_ref: Any = None,
    is_weights: Any = None,
    threads: Optional[int] = None,
) -> Evaluation:
    """The loss, its gradient with respect to ``logp``, every per-token output and the
    diagnostics of one batch.

    Args:
        logp: (B, L) log-probs of the sampled tokens under the current policy, float32
            or float64. Every other float input must have the same dtype.
        logp_old: (B, L) log-probs under the rollout policy.
        advantages: (B,) one per row (broadcast along it), or (B, L) one per token.
        mask: (B, L) response mask: bool, any integer type, float32 or float64; nonzero
            marks a response token. Values elsewhere are never read (NaN is fine there).
        config: a dict or JSON text in the crate's config schema (``{"rule": "dppo"}``,
            ``{"preset": "verl_pr6731", "num_tokens": 4096}``), a preset's name (see
            :func:`presets`), or None for the default (CPPO, the paper's dense setting).
        topk_logp_old, topk_logp: (B, L, K) the rollout's top-K log-probs and the current
            policy's log-probs of the same tokens, for the top-K divergences.
        logp_ref: (B, L) the reference policy's log-probs, for a KL penalty.
        is_weights: (B, L) rollout importance-sampling weights (verl's
            ``rollout_is_weights``).
        threads: None for the global rayon pool, 1 for the calling thread only, N for a
            pool of N threads (built once and kept). Results are bit-identical whatever
            the thread count.

    Numpy arrays are read in place, whatever their strides (a slice or a transpose is
    not copied); only arrays in non-native byte order or misaligned memory are copied
    first. Lists are converted. The GIL is released while the crate computes: do not
    write to the input arrays from another thread meanwhile.

    Returns:
        An :class:`Evaluation`.

    Raises:
        CppoError: a bad value at a response position (``array``, ``row``, ``col``), a
            shape mismatch or a wrong dtype (``array``), a bad config (``field``,
            ``hint``), a count override below the batch's own count (``field``).
    """
    arrays, optional = _inputs(logp, logp_old, advantages, mask, topk_logp_old, topk_logp, logp_ref, is_weights)
    text = _config_text(config)
    try:
        raw = _cppo.evaluate(*arrays, text, *optional, _threads(threads))
    except CppoError as e:
        raise _with_config_path(e, text) from None
    return Evaluation._from_native(raw)


def _inputs(
    logp: Any,
    logp_old: Any,
    advantages: Any,
    mask: Any,
    topk_logp_old: Any = None,
    topk_logp: Any = None,
    logp_ref: Any = None,
    is_weights: Any = None,
) -> tuple:
    """The checked inputs of a call, ``([logp, logp_old, advantages, mask],
    [topk_logp_old, topk_logp, logp_ref, is_weights])``: every float array in logp's
    dtype, the dimensions right, a mask of a type the crate takes."""
    logp = _float_array(logp, "logp", (2,), None)
    dt = logp.dtype
    logp_old = _float_array(logp_old, "logp_old", (2,), dt)
    advantages = _float_array(advantages, "advantages", (1, 2), dt)
    mask = _mask_array(mask)
    if (topk_logp_old is None) != (topk_logp is None):
        missing = "topk_logp" if topk_logp is None else "topk_logp_old"
        raise _error(
            f"{missing} is missing; topk_logp_old and topk_logp come together",
            kind="MissingArray",
            array=missing,
        )
    if topk_logp_old is not None:
        topk_logp_old = _float_array(topk_logp_old, "topk_logp_old", (3,), dt)
        topk_logp = _float_array(topk_logp, "topk_logp", (3,), dt)
    if logp_ref is not None:
        logp_ref = _float_array(logp_ref, "logp_ref", (2,), dt)
    if is_weights is not None:
        is_weights = _float_array(is_weights, "is_weights", (2,), dt)
    return [logp, logp_old, advantages, mask], [topk_logp_old, topk_logp, logp_ref, is_weights]


def counts(mask: Any) -> Counts:
    """Response tokens and sequences of a (B, L) mask (the crate's ``Batch::counts``).

    Under data parallelism or gradient accumulation, all-reduce them over the shards and
    pass the totals as the config's ``num_tokens`` and ``num_seqs``.

    Raises:
        CppoError: a NaN or infinity in a float mask, or a mask that is not 2-D.
    """
    return Counts(*_cppo.counts(_mask_array(mask)))


def presets() -> list:
    """The presets' names, in the crate's order (``"cppo"``, ``"dppo"``, ``"grpo"``, ...)."""
    return [name for name, _ in _cppo.presets()]


def describe_presets() -> dict:
    """Each preset's name and the one line on what it reproduces."""
    return dict(_cppo.presets())


def resolve_config(config: ConfigLike = None) -> dict:
    """The full config ``config`` names, every field filled in, as :func:`evaluate`
    reads it: a preset's settings, the defaults of omitted fields.

    Raises:
        CppoError: a bad or unknown field (``field``, ``hint``) or preset name.
    """
    text = _config_text(config)
    try:
        return json.loads(_cppo.resolve_config(text))
    except CppoError as e:
        raise _with_config_path(e, text) from None


def merge_tallies(tallies: list, config: ConfigLike = None) -> tuple:
    """Merges the ``tally`` of several shards of one batch (in row order) and returns
    ``(diagnostics, tally)`` of the whole, as :attr:`Evaluation.diagnostics` and
    :attr:`Evaluation.tally` would be. ``config`` is the shards' config. The merged
    loss is the sum of the shards' losses: the whole batch's when the shards ran with
    the global ``num_tokens`` / ``num_seqs``.
    """
    texts = [t if isinstance(t, str) else json.dumps(t) for t in tallies]
    diagnostics, tally = _cppo.merge_tallies(texts, _config_text(config))
    return json.loads(diagnostics), json.loads(tally)


# The column-chunk API (context parallelism), ``cppo.chunk``: imported last, it reads
# the helpers above.
from . import chunk  # noqa: E402
