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


def interpreter_clash(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's interpreter cannot run the kernels with these versions, or None.

    Triton 3.6 and older hand a kernel's scalar arguments to the interpreter as 1-element numpy arrays,
    and a loop ``range(0, n, BLOCK)`` over one needs ``int()`` of it, which numpy 2.4 refuses (checked:
    triton 3.6.0 with numpy 2.4.6 fails every kernel with a runtime loop bound; 3.6.0 with numpy 2.3.5
    and 3.7.0 with 2.4.6 run them). torch 2.11 pins triton 3.6.0.
    """
    from packaging.version import Version

    if Version(triton_version) < Version("3.7") and Version(numpy_version) >= Version("2.4"):
        return (
            f"Triton {triton_version}'s interpreter cannot run kernels under numpy {numpy_version} "
            '(it fails with "only 0-dimensional arrays can be converted to Python scalars"): '
            "pip install 'numpy<2.4', or a triton >= 3.7 where your torch allows it"
        )
    return None


def run_triton_tests_in_interpreter(path: str) -> None:
    """Run the ``test_triton_`` tests of the file at ``path`` in a child pytest under the interpreter;
    fail with its output if any fails or is skipped, and up front where the interpreter cannot run."""
    if TRITON_HERE:
        pytest.skip("the Triton tests run in this process")
    triton = pytest.importorskip("triton")
    import numpy as np

    clash = interpreter_clash(triton.__version__, np.__version__)
    if clash:
        pytest.fail(clash)
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
