"""Running the Triton tests: in this process on CUDA, else in a child pytest under the interpreter.

Under the interpreter the flag must be set before triton is first imported (triton.language's own
helpers are decorated at import), so on a CPU machine the Triton tests of a file run in a child pytest
process that starts with TRITON_INTERPRET=1; on a CUDA machine, or in a run started with the flag,
they run in-process.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

TRITON_HERE = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    not TRITON_HERE, reason="needs CUDA or TRITON_INTERPRET=1; the file's in_interpreter test runs it"
)


def run_triton_tests_in_interpreter(path: str) -> None:
    """Run the ``test_triton_`` tests of the file at ``path`` in a child pytest under the interpreter;
    fail with its output if any fails or is skipped."""
    if TRITON_HERE:
        pytest.skip("the Triton tests run in this process")
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path]
    result = subprocess.run(
        [*command, "-k", "test_triton_ and not in_interpreter"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    last = result.stdout.splitlines()[-1]
    assert " passed" in result.stdout and "skipped" not in last, result.stdout[-2000:]


@pytest.fixture
def bf16_dots_in_interpreter(monkeypatch):
    """Let the interpreter compute ``tl.dot`` of bf16 tiles by value, as the GPU does.

    The interpreter keeps bf16 as its uint16 bit pattern and multiplies those integers in ``tl.dot``
    (triton-lang/triton#11584; bf16 is unsupported there upstream). Widening the operands to fp32
    before the product is exact, so everything else the kernels do in bf16 (loads, casts, stores)
    still runs as written. Nothing to do on a GPU.
    """
    if DEVICE == "cuda":
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    create_dot = interpreter.InterpreterBuilder.create_dot

    def widened(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        return interpreter.TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def dot_by_value(self, a, b, *rest):
        return create_dot(self, widened(a), widened(b), *rest)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", dot_by_value)
