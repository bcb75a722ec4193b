"""PyTorch eager behind the same Runner interface as every exported backend, so the report's eager rows (the
ensemble, each member, the baseline and the student in PyTorch) are timed by the same harness as the rows on the
target. Not a target itself: nothing is exported.

On the CPU a timed call is the forward pass on a CPU tensor made from the numpy batch. On CUDA it is a
pinned-host → device copy, the forward and the copy back, timed by ``targets.cuda_timing`` with CUDA events for
each stage beside the host latency.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from targets.benchmark import LatencyStats, measure_latency
from targets.feeds import Feed, feed_arrays

BACKEND = "PyTorch eager"


class EagerRunner:
    """``forward`` (a module or a callable on tensors, already on ``device``) as a Runner: ``infer`` on numpy
    (N, ...) inputs returns (N, C) float32 outputs, and ``measure`` times one batch size. Arrays by name (a text
    model's inputs) are passed to ``forward`` positionally, in their order."""

    def __init__(self, forward: Callable[..., torch.Tensor], device: str = "cpu"):
        self.forward, self.device = forward, device
        self.name = f"{BACKEND} ({device})"
        self.info = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads()}
        if device == "cuda":
            self.timed = ("PyTorch eager on CUDA: host wall time of pinned-host → device copy, forward and copy back "
                          "(device stages from CUDA events)")
        else:
            self.timed = "PyTorch eager on the CPU: host wall time of the forward pass on a CPU tensor"

    @torch.no_grad()  # not inference_mode: a TorchScript member that already ran outside it fails inside it
    def infer(self, x: Feed) -> np.ndarray:
        """(N, ...) inputs (or arrays by name) -> (N, C) float32 outputs, computed on the runner's device."""
        tensors = [torch.from_numpy(np.ascontiguousarray(a)).to(self.device) for a in feed_arrays(x)]
        return self.forward(*tensors).float().cpu().numpy()

    def measure(self, pool: Feed, batch_size: int, warmup_s: float, duration_s: float) -> LatencyStats:
        """Latency of (batch_size, ...) batches cut from ``pool``: see the module docstring for what is timed."""
        if self.device == "cuda":
            from targets.cuda_timing import measure_cuda_latency  # needs a CUDA build of torch only here

            return measure_cuda_latency(self.forward, pool, batch_size, warmup_s, duration_s)
        return measure_latency(self._call, pool, batch_size, warmup_s, duration_s)

    @torch.no_grad()
    def _call(self, x: Feed):
        return self.forward(*(torch.from_numpy(a) for a in feed_arrays(x)))
