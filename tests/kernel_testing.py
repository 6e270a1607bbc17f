"""Shared set-up for the Triton kernel tests (test_kernels_*.py).

Without CUDA the kernels run on CPU tensors under the Triton interpreter, which triton 3.9 only honours if
TRITON_INTERPRET=1 is set before ``triton.language`` is first imported (its library functions are decorated
then). When something imported triton earlier in this pytest process (transformers does, via conftest), a
kernel test module runs itself once more in a fresh process with the variable set, and skips in this one.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
# Decided before this module touches the environment: can kernels run in this process?
IN_PROCESS = ON_GPU or os.environ.get("TRITON_INTERPRET") == "1" or "triton" not in sys.modules
if not ON_GPU and IN_PROCESS:
    os.environ["TRITON_INTERPRET"] = "1"

TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def err_ratio(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-12) -> float:
    """||a - b|| / ||b||; ``floor`` bounds the denominator where the reference is (nearly) zero."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(floor)).item()


def skip_unless_in_process(request) -> None:
    if not IN_PROCESS and request.node.originalname != "test_kernels_in_fresh_process":
        pytest.skip("triton was imported before TRITON_INTERPRET was set; runs in test_kernels_in_fresh_process")


def run_module_in_fresh_process(path: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", path, "-q", "-p", "no:cacheprovider", "--noconftest"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(path)))
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
