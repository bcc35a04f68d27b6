"""The docs run: the docstrings' examples and python/README.md's numpy examples."""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import pytest

import cppo

README = Path(__file__).resolve().parents[1] / "README.md"


def test_docstring_examples():
    """The examples in cppo's docstrings run and hold."""
    assert doctest.testmod(cppo, raise_on_error=True).attempted > 0


def test_torch_docstring_examples():
    """The example in cppo.torch's docstring runs and holds."""
    pytest.importorskip("torch")
    import cppo.torch

    assert doctest.testmod(cppo.torch, raise_on_error=True).attempted > 0


def test_verl_docstring_examples():
    """The example in cppo.verl's docstring runs and holds; its functions are documented."""
    pytest.importorskip("torch")
    import inspect

    import cppo.verl

    assert doctest.testmod(cppo.verl, raise_on_error=True).attempted > 0
    for name in ["policy_loss", "register"]:
        assert inspect.getdoc(getattr(cppo.verl, name)), name


def test_every_public_function_has_a_docstring():
    """Every name in cppo.__all__ is documented."""
    import inspect

    for name in cppo.__all__:
        obj = getattr(cppo, name)
        assert inspect.getdoc(obj), name


@pytest.mark.skipif(not README.is_file(), reason="no README beside the tests")
def test_readme_numpy_examples(capsys):
    """The README's Python blocks that need no torch and no trainer, in order, in one
    namespace (the errors block reuses the example's arrays)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    runnable = [b for b in blocks if "cppo.torch" not in b and "cppo.verl" not in b and "log_prob" not in b]
    assert len(runnable) >= 2
    ns: dict = {}
    for block in runnable:
        exec(compile(block, str(README), "exec"), ns)
    out = capsys.readouterr().out
    assert "rule.detla delta" in out and "logp 1 2" in out
