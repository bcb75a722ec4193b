"""A teacher ensemble in memory: K classifiers with the same input shape and the same C classes (Hinton et al.
2015, §2-3), validated on a batch, run member by member, and combined into the soft targets at temperature T.
Its files are read and written by :mod:`compressor.teachers.formats`.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from compressor.core.errors import CompressorError, TeacherError, first_line
from compressor.core.inference import bf16_autocast
from compressor.core.inputs import NamedInputs, call, trace_args
from compressor.kernels import ensemble_log_probs
from compressor.teachers.specialists import COMBINE as COMBINE_SPECIALISTS
from compressor.teachers.specialists import specialist_log_probs



class _MixtureModule(nn.Module):
    """The ensemble's prediction as a module, for tracing: members' logits, then the weighted mixture at T = 1."""

    def __init__(self, ensemble: "Ensemble"):
        super().__init__()
        self.members = nn.ModuleList(member.forward for member in ensemble.members)  # registered, so traceable
        self.temperatures = [member.temperature for member in ensemble.members]
        self.ensemble = ensemble

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:  # one input tensor, or named inputs in order
        member_logits = torch.stack([module(*inputs).float() / temperature
                                     for module, temperature in zip(self.members, self.temperatures)])  # (K, N, C)
        return self.ensemble.log_probs(member_logits)  # (N, C)


@dataclass
class Member:
    """One teacher: a name, where it came from, and a callable from inputs (N, ...) to logits (N, C); a member with
    named inputs (a text classifier) takes them positionally, in the ensemble's ``inputs`` order."""

    name: str
    kind: str                      # "torchscript", "torch.export", "onnx", "pickle"
    source: str                    # the file it was loaded from
    forward: Callable[[torch.Tensor], torch.Tensor]
    parameters: int
    architecture: list[dict] | None = None
    temperature: float = 1.0       # the member's own calibration temperature (manifest), applied to its logits

    def __call__(self, *inputs) -> torch.Tensor:  # a tensor or NamedInputs, or named inputs' tensors in order
        logits = call(self.forward, inputs[0]) if len(inputs) == 1 else self.forward(*inputs)
        return logits / self.temperature if self.temperature != 1.0 else logits


@dataclass
class Ensemble:
    """A validated teacher ensemble. ``member_logits`` is what distillation and the benchmark run."""

    path: Path
    source_format: str
    members: list[Member]
    weights: list[float] | None
    combine: str
    metadata: dict
    _digest: str | None = field(default=None, init=False, repr=False, compare=False)  # fingerprint(), once read

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        shape = self.metadata.get("input_shape")
        return tuple(shape) if shape else None

    @property
    def input_names(self) -> list[str] | None:
        """The named inputs of a text ensemble (``input_ids``, ``attention_mask``, ...), None for one input tensor."""
        inputs = self.metadata.get("inputs")
        return [spec["name"] for spec in inputs] if inputs else None

    @property
    def num_classes(self) -> int | None:
        return self.metadata.get("num_classes")

    @property
    def class_names(self) -> list[str] | None:
        return self.metadata.get("class_names")

    @property
    def normalisation(self) -> dict | None:
        return self.metadata.get("normalisation")

    @property
    def parameters(self) -> int:
        return sum(member.parameters for member in self.members)

    @torch.no_grad()
    def member_logits(self, x: torch.Tensor, batch_size: int = 1024, on_batch: Callable[[int], None] | None = None,
                      device: str = "cpu", precision: str = "fp32") -> torch.Tensor:
        """Run every member on ``x`` (N, ...) in batches; returns (K, N, C) float32 logits on the CPU, checked finite
        (:meth:`iter_member_logits`, gathered)."""
        chunks = [logits for _, logits in self.iter_member_logits(x, batch_size, on_batch, device, precision)]
        return torch.cat(chunks, dim=1)  # (K, N, C)

    def iter_member_logits(self, x, batch_size: int = 1024, on_batch: Callable[[int], None] | None = None,
                           device: str = "cpu", precision: str = "fp32") -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, (K, B, C) float32 logits on the CPU) for each batch of ``x`` (N, ...), so a caller can write
        them to disk as they come (the teacher cache) instead of holding (K, N, C) in RAM.

        Each batch is read once (a streamed split decodes it once) and every member runs on it, on ``device``: a
        PyTorch member is moved there for the pass and back after it (an ONNX member keeps its own provider), and
        with ``precision="bf16"`` runs under bfloat16 autocast (``--teacher-precision bf16``; logits come back
        float32).
        ``on_batch(rows)`` is called after each member's batch (for a progress bar over K × N rows). NaN or Inf
        logits stop the pass with the member named.
        """
        modules = [member.forward for member in self.members if isinstance(member.forward, torch.nn.Module)]
        try:
            for module in modules:
                module.to(device)
            with torch.no_grad():  # not inference_mode: a TorchScript member that ran outside it fails inside it
                for i in range(0, len(x), batch_size):
                    xb = x[i:i + batch_size]  # (B, ...)
                    outputs = []
                    for member in self.members:
                        on_module = isinstance(member.forward, torch.nn.Module)
                        with bf16_autocast(device, on_module and precision == "bf16"):
                            logits = self._run_member(member, xb.to(device) if on_module else xb).cpu()  # (B, C)
                        if not torch.isfinite(logits).all():
                            bad = int((~torch.isfinite(logits)).any(dim=1).sum())
                            raise TeacherError(
                                f"teacher member '{member.name}' ({member.source}) produced NaN/Inf logits on {bad} "
                                f"of the {len(xb)} inputs at rows {i}-{i + len(xb) - 1}; check that member (its "
                                f"weights, or the input normalisation it expects)")
                        outputs.append(logits)
                        if on_batch is not None:
                            on_batch(len(xb))
                    yield i, torch.stack(outputs)  # (K, B, C)
        finally:
            for module in modules:
                module.to("cpu")

    @property
    def specialist_subsets(self) -> list[tuple[int, ...]] | None:
        """Each specialist's classes when this is a specialist ensemble (member 0 the generalist), else None."""
        spec = self.metadata.get("specialists")
        return None if self.combine != COMBINE_SPECIALISTS else [tuple(s) for s in spec["subsets"]]

    def log_probs(self, member_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """The ensemble's prediction (N, C) log-probabilities from its members' (K, N, C) logits.

        A specialist ensemble combines its members as paper §5 does (:func:`specialist_log_probs`) and softens the
        result q at temperature T as ``softmax(log q / T)``.
        """
        if self.combine == COMBINE_SPECIALISTS:
            combined = specialist_log_probs(member_logits, self.specialist_subsets,
                                            int(self.metadata["specialists"].get("top_n", 1)))
            return combined if temperature == 1.0 else torch.log_softmax(combined / temperature, dim=-1)
        weights = torch.tensor(self.weights, dtype=member_logits.dtype) if self.weights else None
        return ensemble_log_probs(member_logits, temperature, weights, self.combine)

    def as_module(self, example: torch.Tensor) -> torch.jit.ScriptModule:
        """The whole ensemble as one traced module: inputs (N, ...) → mixture log-probabilities (N, C) at T = 1.

        This is what an ensemble deployed as is would run, so exporting it to a target separates what distillation
        buys from what the target buys. ONNX members cannot be traced: CompressorError names them.
        """
        untraceable = [m.name for m in self.members if m.kind == "onnx"]
        if untraceable:
            raise TeacherError(f"members {untraceable} are ONNX files run by onnxruntime, not PyTorch modules, so "
                                  f"the ensemble cannot be exported as one graph")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings from constant weights, TorchScript deprecation
            try:
                return torch.jit.trace(self.eager_module(), trace_args(example), check_trace=False)
            except Exception as exc:  # a member's own code (data-dependent control flow, a dict output, ...)
                raise TeacherError(f"the members cannot be traced as one graph ({first_line(exc)}), so the "
                                      f"ensemble cannot be exported as one") from exc

    def eager_module(self) -> nn.Module:
        """The ensemble as one untraced PyTorch module (N, ...) → (N, C) log-probabilities at T = 1, in eval mode.

        Movable to a GPU with ``.to("cuda")`` when every member is a PyTorch module (not an ONNX file).
        """
        return _MixtureModule(self).eval()

    def validate(self, example: torch.Tensor, what: str) -> None:
        """Run every member on ``example`` (N, ...); check 2-D outputs, one class count, finite values.

        ``what`` says where the example came from, for the error message (e.g. "--data digits").
        """
        shapes = {}
        for member in self.members:
            out = self._run_member(member, example, what)
            if out.ndim != 2 or out.shape[0] != example.shape[0]:
                raise TeacherError(
                    f"teacher member '{member.name}' ({member.source}) returned shape {tuple(out.shape)} for a batch of "
                    f"{example.shape[0]}; a teacher must return logits of shape (N, C)")
            if not torch.isfinite(out).all():
                raise TeacherError(
                    f"teacher member '{member.name}' ({member.source}) produced NaN/Inf logits on {what}; "
                    f"check that member's weights and the input normalisation it expects")
            shapes[member.name] = out.shape[1]
        if len(set(shapes.values())) > 1:
            listing = ", ".join(f"'{name}' {c}" for name, c in shapes.items())
            raise TeacherError(f"{self.path}: members disagree on the number of classes ({listing}); "
                                  f"every member must classify the same C classes")
        num_classes = next(iter(shapes.values()))
        declared = self.metadata.get("num_classes")
        if declared is not None and declared != num_classes:
            raise TeacherError(f"{self.path}: metadata says {declared} classes but the members output {num_classes}")
        self.metadata["num_classes"] = num_classes
        if self.metadata.get("input_shape") is None and not isinstance(example, NamedInputs):
            self.metadata["input_shape"] = list(example.shape[1:])
        names = self.class_names
        if names is not None and len(names) != num_classes:
            raise TeacherError(f"{self.path}: {len(names)} class names for {num_classes} classes; fix class_names")

    @torch.no_grad()
    def probe(self, shape: tuple[int, ...]) -> int | None:
        """Member 0's class count C on zeros (2, *shape), None when it fails on them: what the data step asks of
        teachers that record no input shape (a manifest), e.g. whether they take 1 or 3 channels."""
        try:
            out = self.members[0](torch.zeros(2, *shape))
        except Exception:  # a member fails in many ways on a shape it does not take; each means "not this one"
            return None
        return int(out.shape[1]) if out.ndim == 2 and out.shape[0] == 2 else None

    def _run_member(self, member: Member, x: torch.Tensor, what: str = "its inputs") -> torch.Tensor:
        try:
            return member(x).float()
        except CompressorError:
            raise
        except Exception as exc:
            expected = f" (the ensemble declares input shape {list(self.input_shape)})" if self.input_shape else ""
            given = (f"named inputs {', '.join(x.names)} of length {x.shape[1]}" if isinstance(x, NamedInputs)
                     else f"inputs of shape {list(x.shape[1:])}")
            raise TeacherError(
                f"teacher member '{member.name}' ({member.source}) failed on {given} from {what}{expected}: "
                f"{first_line(exc)}; the data must have the shape the teachers were trained on") from exc

    def fingerprint(self) -> str:
        """sha256 over the teacher file and every member file: identifies the teachers a checkpoint used.

        Read once per run (the teacher cache and the checkpoints both ask), in 1 MiB blocks, so a teacher file of
        several GB is never held in memory whole.
        """
        if self._digest is None:
            digest = hashlib.sha256()
            files = [self.path] + sorted({Path(m.source) for m in self.members} - {self.path})
            for file in files:
                if file.is_file():
                    with open(file, "rb") as handle:
                        for block in iter(lambda: handle.read(1 << 20), b""):
                            digest.update(block)
            self._digest = digest.hexdigest()
        return self._digest

    def describe(self) -> dict:
        """JSON-safe summary for reports and ``compress inspect``."""
        return {
            "path": str(self.path),
            "format": self.source_format,
            "members": [{"name": m.name, "kind": m.kind, "source": m.source, "parameters": m.parameters,
                         "temperature": m.temperature} for m in self.members],
            "parameters": self.parameters,
            "weights": self.weights,
            "combine": self.combine,
            "input_shape": self.metadata.get("input_shape"),
            "inputs": self.metadata.get("inputs"),
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "normalisation": self.normalisation,
            "dataset": self.metadata.get("dataset"),
            "specialists": self.metadata.get("specialists"),
        }
