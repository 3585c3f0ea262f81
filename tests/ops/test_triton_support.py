"""The interpreter runner's up-front check for Triton/numpy versions that cannot run the kernels."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ..triton_support import interpreter_clash

# A kernel whose loop bound is a runtime scalar, the construct every kernel of ops/ uses.
RUNTIME_LOOP_BOUND = """
import torch, triton, triton.language as tl

@triton.jit
def count_blocks(OUT, n, BLOCK: tl.constexpr):
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n, BLOCK):
        acc += 1.0
    tl.store(OUT + tl.arange(0, BLOCK), acc)

out = torch.zeros(16)
count_blocks[(1,)](out, 40, BLOCK=16)
assert out.tolist() == [3.0] * 16, out
"""


@pytest.mark.parametrize(
    "triton_version, numpy_version, clashes",
    [
        ("3.6.0", "2.4.6", True),  # torch 2.11's triton with today's numpy: fails (checked)
        ("3.6.0", "2.3.5", False),  # checked: runs
        ("3.7.0", "2.4.6", False),  # checked: runs
        ("3.9.0", "2.4.6", False),  # the development machine
        ("3.5.1", "2.4.0", True),
        ("3.6.0", "2.4.0rc1", False),  # a pre-release sorts before 2.4
    ],
)
def test_interpreter_clash_by_version(triton_version, numpy_version, clashes):
    message = interpreter_clash(triton_version, numpy_version)
    assert (message is not None) == clashes
    if clashes:
        assert "pip install 'numpy<2.4'" in message and triton_version in message


def test_interpreter_clash_agrees_with_the_installed_interpreter():
    """The check says a clash exactly when the installed Triton's interpreter fails on a runtime loop
    bound: run such a kernel in a child process under TRITON_INTERPRET=1."""
    triton = pytest.importorskip("triton")
    import numpy as np

    child = subprocess.run(
        [sys.executable, "-c", RUNTIME_LOOP_BOUND],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    clash = interpreter_clash(triton.__version__, np.__version__)
    assert (child.returncode != 0) == (clash is not None), child.stderr[-3000:]
    if clash:
        assert "only 0-dimensional arrays can be converted to Python scalars" in child.stderr
