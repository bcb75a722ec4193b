"""What the Triton kernels' tests share: the device a kernel runs on in this run."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request) -> str:
    """"cpu" under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without an NVIDIA device), "cuda"
    with ``-m gpu`` on a GPU; each skips where it cannot run."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if request.param == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter was not chosen (a GPU machine); the cuda case runs the kernel")
    return request.param
