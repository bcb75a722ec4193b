"""Teacher ensembles: save them, load them safely, validate them, and run them.

An ensemble is K classifiers with the same input shape and the same C classes (Hinton et al. 2015, §2-3).
Accepted files, safest first:
1. a TorchScript archive written by :func:`save_ensemble`: one scripted module whose ``members`` ModuleList holds
   the K members, and ``compressor.json`` in its extra files (input shape, classes, normalisation, weights, ...);
2. a manifest ``ensemble.toml`` listing member files (TorchScript ``.pt``, ``.onnx``, and ``torch.export`` ``.pt2``
   with ``trust_pickle=True`` only, since ``torch.export.load`` unpickles the archive's weights), each with an
   optional ``weight`` and ``temperature``;
3. a pickled ``nn.Module`` or list of modules, only with ``trust_pickle=True`` (unpickling runs arbitrary code).
"""

from __future__ import annotations

import hashlib
import json
import tomllib
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from compressor.errors import CompressorError
from compressor.fileio import atomic_path
from compressor.kernels import COMBINES, ensemble_log_probs
from compressor.specialists import COMBINE as COMBINE_SPECIALISTS
from compressor.specialists import check_metadata as check_specialists
from compressor.specialists import specialist_log_probs
from compressor.students import describe_architecture

META_FILE = "compressor.json"
FORMAT = "compressor.ensemble"
FORMAT_VERSION = 1


class _EnsembleArchive(nn.Module):
    """What :func:`save_ensemble` scripts: runs every member and stacks the logits (K, N, C)."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(x) for member in self.members])  # (K, N, C)


class _MixtureModule(nn.Module):
    """The ensemble's prediction as a module, for tracing: members' logits, then the weighted mixture at T = 1."""

    def __init__(self, ensemble: "Ensemble"):
        super().__init__()
        self.members = nn.ModuleList(member.forward for member in ensemble.members)  # registered, so traceable
        self.temperatures = [member.temperature for member in ensemble.members]
        self.ensemble = ensemble

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        member_logits = torch.stack([module(x).float() / temperature
                                     for module, temperature in zip(self.members, self.temperatures)])  # (K, N, C)
        return self.ensemble.log_probs(member_logits)  # (N, C)


@dataclass
class Member:
    """One teacher: a name, where it came from, and a callable from inputs (N, ...) to logits (N, C)."""

    name: str
    kind: str                      # "torchscript", "torch.export", "onnx", "pickle"
    source: str                    # the file it was loaded from
    forward: Callable[[torch.Tensor], torch.Tensor]
    parameters: int
    architecture: list[dict] | None = None
    temperature: float = 1.0       # the member's own calibration temperature (manifest), applied to its logits

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.forward(x)
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
    def member_logits(self, x: torch.Tensor, batch_size: int = 1024,
                      on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
        """Run every member on ``x`` (N, ...) in batches; returns (K, N, C) float32 logits, checked finite.

        ``on_batch(rows)`` is called after each member's batch (for a progress bar over K × N rows).
        """
        outputs = []
        for member in self.members:
            chunks = []
            for i in range(0, len(x), batch_size):
                chunks.append(self._run_member(member, x[i:i + batch_size]))
                if on_batch is not None:
                    on_batch(len(chunks[-1]))
            logits = torch.cat(chunks)
            if not torch.isfinite(logits).all():
                bad = int((~torch.isfinite(logits)).any(dim=1).sum())
                raise CompressorError(
                    f"teacher member '{member.name}' ({member.source}) produced NaN/Inf logits on {bad} of {len(x)} "
                    f"inputs; check that member (its weights, or the input normalisation it expects)")
            outputs.append(logits)
        return torch.stack(outputs)  # (K, N, C)

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
            raise CompressorError(f"members {untraceable} are ONNX files run by onnxruntime, not PyTorch modules, so "
                                  f"the ensemble cannot be exported as one graph")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings from constant weights, TorchScript deprecation
            return torch.jit.trace(self.eager_module(), example, check_trace=False)

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
                raise CompressorError(
                    f"teacher member '{member.name}' ({member.source}) returned shape {tuple(out.shape)} for a batch of "
                    f"{example.shape[0]}; a teacher must return logits of shape (N, C)")
            if not torch.isfinite(out).all():
                raise CompressorError(
                    f"teacher member '{member.name}' ({member.source}) produced NaN/Inf logits on {what}; "
                    f"check that member's weights and the input normalisation it expects")
            shapes[member.name] = out.shape[1]
        if len(set(shapes.values())) > 1:
            listing = ", ".join(f"'{name}' {c}" for name, c in shapes.items())
            raise CompressorError(f"{self.path}: members disagree on the number of classes ({listing}); "
                                  f"every member must classify the same C classes")
        num_classes = next(iter(shapes.values()))
        declared = self.metadata.get("num_classes")
        if declared is not None and declared != num_classes:
            raise CompressorError(f"{self.path}: metadata says {declared} classes but the members output {num_classes}")
        self.metadata["num_classes"] = num_classes
        if self.metadata.get("input_shape") is None:
            self.metadata["input_shape"] = list(example.shape[1:])
        names = self.class_names
        if names is not None and len(names) != num_classes:
            raise CompressorError(f"{self.path}: {len(names)} class names for {num_classes} classes; fix class_names")

    def _run_member(self, member: Member, x: torch.Tensor, what: str = "its inputs") -> torch.Tensor:
        try:
            return member(x).float()
        except CompressorError:
            raise
        except Exception as exc:
            expected = f" (the ensemble declares input shape {list(self.input_shape)})" if self.input_shape else ""
            first_line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise CompressorError(
                f"teacher member '{member.name}' ({member.source}) failed on inputs of shape {list(x.shape[1:])} "
                f"from {what}{expected}: {first_line}; the data must have the shape the teachers were trained on"
            ) from exc

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
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "normalisation": self.normalisation,
            "dataset": self.metadata.get("dataset"),
            "specialists": self.metadata.get("specialists"),
        }


def save_ensemble(models: Sequence[nn.Module], path: str | Path, example_input: torch.Tensor,
                  metadata: dict | None = None) -> Path:
    """Write ``models`` as one TorchScript ensemble archive that ``compress --teacher`` accepts.

    ``example_input`` is a batch (N, ...) the members accept (N ≥ 2 so a fixed batch size is caught).
    ``metadata`` may hold ``class_names``, ``normalisation`` ({"mean": [...], "std": [...]} per input channel,
    applied as (x - mean) / std), ``dataset`` (a ``--data`` hint), ``weights`` (one per member) and
    ``member_names``; a specialist ensemble (:mod:`compressor.specialist_training` writes them) also gives
    ``combine="specialists"`` and ``specialists`` (its subsets, one per member after the generalist, and how they
    were found). Each member is scripted, or traced when scripting fails. Written atomically.

    Example::

        save_ensemble([net_a, net_b], "ensemble.pt", torch.zeros(2, 1, 28, 28),
                      {"class_names": names, "dataset": "/usr/share/datasets/fashion-mnist"})
    """
    metadata = dict(metadata or {})
    models = list(models)
    if not models:
        raise CompressorError("save_ensemble needs at least one model")
    unknown = set(metadata) - {"class_names", "normalisation", "dataset", "weights", "member_names", "combine",
                               "specialists"}
    if unknown:
        raise CompressorError(f"save_ensemble: unknown metadata keys {sorted(unknown)}")
    names = metadata.pop("member_names", None) or [f"member-{k}" for k in range(len(models))]
    if len(names) != len(models):
        raise CompressorError(f"save_ensemble: {len(names)} member_names for {len(models)} models")
    weights = metadata.get("weights")
    if weights is not None and len(weights) != len(models):
        raise CompressorError(f"save_ensemble: {len(weights)} weights for {len(models)} models")
    scripted, descriptions = [], []
    for model in models:
        model.eval()
        descriptions.append({"architecture": describe_architecture(model),
                             "parameters": sum(p.numel() for p in model.parameters())})
        scripted.append(_to_torchscript(model, example_input))
    with torch.no_grad():
        outputs = [m(example_input) for m in scripted]
    classes = {tuple(o.shape) for o in outputs}
    if len(classes) != 1 or len(next(iter(classes))) != 2:
        raise CompressorError(f"save_ensemble: members return different or non-(N, C) shapes {sorted(classes)}")
    num_classes = outputs[0].shape[1]
    combine = metadata.get("combine", "arithmetic")
    if combine == COMBINE_SPECIALISTS:
        check_specialists(metadata.get("specialists") or {}, len(models), num_classes, "save_ensemble")
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "input_shape": list(example_input.shape[1:]),
        "input_dtype": str(example_input.dtype).replace("torch.", ""),
        "num_classes": num_classes,
        "class_names": metadata.get("class_names"),
        "normalisation": metadata.get("normalisation"),
        "dataset": metadata.get("dataset"),
        "weights": weights,
        "combine": combine,
        "specialists": metadata.get("specialists"),
        "members": [{"name": n, **d} for n, d in zip(names, descriptions)],
        "torch_version": torch.__version__,
    }
    archive = _script(_EnsembleArchive(scripted))
    with atomic_path(path) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(archive, str(tmp), _extra_files={META_FILE: json.dumps(meta)})
    return Path(path)


def load_ensemble(path: str | Path, trust_pickle: bool = False) -> Ensemble:
    """Load and validate a teacher file: archive, ``.toml`` manifest, or (with ``trust_pickle``) a pickle.

    Members are validated on a batch of the declared input shape when the file declares one; call
    :meth:`Ensemble.validate` with real data otherwise (the pipeline always does).
    """
    path = Path(path)
    if not path.is_file():
        raise CompressorError(f"--teacher {path}: no such file; pass an ensemble saved with compressor.save_ensemble "
                              f"or an ensemble.toml manifest")
    if path.suffix == ".toml":
        ensemble = _load_manifest(path, trust_pickle)
    else:
        kind = sniff_format(path)
        if kind == "torchscript":
            ensemble = _load_archive(path)
        elif kind == "torch.export":
            member = _load_member(path, path.stem, trust_pickle=trust_pickle)
            ensemble = Ensemble(path, "torch.export program", [member], None, "arithmetic", {})
        elif kind == "onnx":
            member = _load_member(path, path.stem)
            ensemble = Ensemble(path, "onnx", [member], None, "arithmetic", {})
        elif kind == "pickle":
            if not trust_pickle:
                raise CompressorError(
                    f"{path} is a pickled Python object; unpickling can run arbitrary code, so compressor refuses it. "
                    f"Re-save it with compressor.save_ensemble, or pass --trust-pickle if you trust this file")
            ensemble = _load_pickle(path)
        else:
            raise CompressorError(
                f"{path}: not a teacher file compressor can read (corrupt, truncated, or another format); expected a "
                f"TorchScript archive from compressor.save_ensemble, an ensemble.toml manifest, .pt2 or .onnx")
    if ensemble.input_shape:
        generator = torch.Generator().manual_seed(0)
        example = torch.rand((3, *ensemble.input_shape), generator=generator)
        ensemble.validate(example, "a random batch of the declared input shape")
    return ensemble


def sniff_format(path: Path) -> str:
    """Tell a file's format from its bytes, never by unpickling: torchscript, torch.export, onnx, pickle, unknown."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError):
            return "unknown"
        if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
            return "torchscript"
        if any(n.endswith("archive_format") for n in names) or any("/models/" in n for n in names):
            return "torch.export"
        if any(n.endswith("data.pkl") for n in names):
            return "pickle"
        return "unknown"
    if head[:1] == b"\x80":  # pickle protocol 2+ opcode
        return "pickle"
    if path.suffix == ".onnx":
        return "onnx"
    return "unknown"


def _to_torchscript(model: nn.Module, example_input: torch.Tensor) -> torch.jit.ScriptModule:
    if isinstance(model, torch.jit.ScriptModule):
        return model
    try:
        return _script(model)
    except Exception:  # scripting rejects some Python; tracing handles any static graph
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.trace(model, example_input)


def _script(module: nn.Module) -> torch.jit.ScriptModule:
    # TorchScript is deprecated in PyTorch 2.9+ but remains the one single-file format that holds K modules,
    # code included, without pickle; DESIGN.md keeps it as the archive format.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(module)


def _load_archive(path: Path) -> Ensemble:
    extra = {META_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as exc:
        raise CompressorError(f"{path}: the TorchScript archive could not be loaded ({_first_line(exc)}); "
                              f"the file is corrupt or truncated, save it again with compressor.save_ensemble") from exc
    module.eval()
    if extra[META_FILE]:
        try:
            meta = json.loads(extra[META_FILE])
        except json.JSONDecodeError as exc:
            raise CompressorError(f"{path}: its {META_FILE} is not valid JSON; save it again") from exc
        if meta.get("format") != FORMAT or meta.get("format_version", 0) > FORMAT_VERSION:
            raise CompressorError(f"{path}: unsupported ensemble format {meta.get('format')} "
                                  f"v{meta.get('format_version')}; upgrade compressor")
        if not hasattr(module, "members"):
            raise CompressorError(f"{path}: archive has metadata but no 'members'; save it with save_ensemble")
        member_meta = meta.get("members", [])
        children = [getattr(module.members, str(k)) for k in range(len(member_meta))]
        members = [Member(info["name"], "torchscript", str(path), child,
                          sum(p.numel() for p in child.parameters()), info.get("architecture"))
                   for info, child in zip(member_meta, children)]
        combine = meta.get("combine", "arithmetic")
        if combine == COMBINE_SPECIALISTS:
            check_specialists(meta.get("specialists") or {}, len(members), meta.get("num_classes"), str(path))
        return Ensemble(path, "torchscript archive", members, meta.get("weights"), combine, meta)
    # a plain TorchScript model (no compressor.json): a one-member ensemble
    member = Member(path.stem, "torchscript", str(path), module, sum(p.numel() for p in module.parameters()))
    return Ensemble(path, "torchscript module", [member], None, "arithmetic", {})


def _load_member(path: Path, name: str, temperature: float = 1.0, trust_pickle: bool = False) -> Member:
    """Load one manifest member: TorchScript .pt, torch.export .pt2 (only with ``trust_pickle``), or .onnx."""
    if not path.is_file():
        raise CompressorError(f"member '{name}': {path} does not exist; fix its path in the manifest")
    kind = sniff_format(path)
    try:
        if kind == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                module = torch.jit.load(str(path), map_location="cpu").eval()
            return Member(name, "torchscript", str(path), module, sum(p.numel() for p in module.parameters()),
                          temperature=temperature)
        if kind == "torch.export":
            if not trust_pickle:  # torch.export.load unpickles a .pt2's weights and constants (weights_only=False)
                raise CompressorError(
                    f"member '{name}': {path} is a torch.export program, and torch.export.load unpickles parts of it, "
                    f"which can run arbitrary code; pass --trust-pickle if you trust this file, or save the member "
                    f"as TorchScript (.pt) or ONNX (.onnx)")
            program = torch.export.load(str(path))
            params = sum(t.numel() for t in program.state_dict.values())
            return Member(name, "torch.export", str(path), program.module(), params, temperature=temperature)
        if kind == "onnx" or path.suffix == ".onnx":
            return _onnx_member(path, name, temperature)
    except CompressorError:
        raise
    except Exception as exc:
        raise CompressorError(f"member '{name}': {path} could not be loaded ({_first_line(exc)}); "
                              f"the file is corrupt or not a {path.suffix} model") from exc
    if kind == "pickle":
        raise CompressorError(f"member '{name}': {path} is a pickle; manifests accept only TorchScript .pt, "
                              f"torch.export .pt2 and .onnx members, which load without running code")
    raise CompressorError(f"member '{name}': {path} is not a TorchScript, torch.export or ONNX file")


def _onnx_member(path: Path, name: str, temperature: float) -> Member:
    import onnx
    import onnxruntime

    model = onnx.load(str(path))
    params = sum(int(np.prod(init.dims)) for init in model.graph.initializer)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {input_name: x.detach().cpu().numpy().astype(np.float32)})[0])

    return Member(name, "onnx", str(path), forward, params, temperature=temperature)


def _load_manifest(path: Path, trust_pickle: bool) -> Ensemble:
    try:
        manifest = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise CompressorError(f"{path}: not valid TOML ({exc}); see the README for the manifest format") from exc
    entries = manifest.get("members")
    if not entries:
        raise CompressorError(f"{path}: the manifest lists no [[members]]; add one table per member with a 'path'")
    members, weights = [], []
    for k, entry in enumerate(entries):
        if "path" not in entry:
            raise CompressorError(f"{path}: member {k} has no 'path'")
        member_path = (path.parent / entry["path"]).resolve()
        name = entry.get("name", Path(entry["path"]).stem)
        members.append(_load_member(member_path, name, float(entry.get("temperature", 1.0)), trust_pickle))
        weights.append(float(entry.get("weight", 1.0)))
    header = manifest.get("ensemble", {})
    meta = {key: header.get(key) for key in ("input_shape", "num_classes", "class_names", "normalisation", "dataset")}
    combine = header.get("combine", "arithmetic")
    if combine not in COMBINES:
        raise CompressorError(f"{path}: combine = {combine!r} is not one of {', '.join(COMBINES)}; a specialist "
                              f"ensemble is the archive that compress specialists writes, not a manifest")
    return Ensemble(path, "manifest", members, weights, combine, meta)


def _load_pickle(path: Path) -> Ensemble:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CompressorError(f"{path}: the pickle could not be loaded ({_first_line(exc)}); the file is corrupt") from exc
    modules = list(obj) if isinstance(obj, (list, tuple, nn.ModuleList)) else [obj]
    if not all(isinstance(m, nn.Module) for m in modules):
        raise CompressorError(f"{path}: the pickle holds {type(obj).__name__}, not an nn.Module or a list of them")
    members = []
    for k, module in enumerate(modules):
        module.eval()
        members.append(Member(f"member-{k}", "pickle", str(path), module,
                              sum(p.numel() for p in module.parameters()), describe_architecture(module)))
    return Ensemble(path, "pickle (trusted)", members, None, "arithmetic", {})


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__

