#!/usr/bin/env bash
# Builds the cppo Python package into a fresh virtual environment and runs its tests.
#
#   bash python/run_tests.sh            # numpy only; the torch tests are skipped
#   CPPO_TORCH=1 bash python/run_tests.sh   # also installs torch from PyPI (~4 GB with its CUDA libraries)
#
# Environment:
#   CPPO_TORCH=1     install torch too, so that tests/test_torch.py (and the distributed test) run
#   CPPO_VENV=DIR    use (or create) the venv at DIR and keep it; default: a temporary one, removed after
#   PYTHON=python3   the interpreter that creates the venv (Python >= 3.9)
# Extra arguments go to pytest (e.g. -k golden, -x).
#
# `pip install ./python` builds the extension with maturin (fetched by pip from PyPI as the
# build backend) in release mode, into python/target: a second run rebuilds incrementally.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}

venv=${CPPO_VENV:-}
if [ -z "$venv" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  venv=$tmp/venv
fi
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi

packages=("$here" pytest numpy)
if [ "${CPPO_TORCH:-0}" = 1 ]; then
  packages+=(torch)
fi
echo "=== pip install ${packages[*]} (into $venv)"
start=$(date +%s)
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${packages[@]}"
echo "installed in $(( $(date +%s) - start )) s"

echo "=== pytest"
# Run from the tests' own directory with the venv's pytest: `python -m pytest` inside
# python/ would import the source tree's cppo/, which has no native module.
# Not `exec`: the EXIT trap above must still run to remove a temporary venv (about
# 5 GB with torch).
cd "$here/tests"
"$venv/bin/pytest" -q "$@"
