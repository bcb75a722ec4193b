"""Teacher ensemble files: save them, and load them safely into an :class:`~compressor.teachers.ensemble.Ensemble`.

Accepted files, safest first:
1. a TorchScript archive written by :func:`save_ensemble`: one scripted module whose ``members`` ModuleList holds
   the K members, and ``compressor.json`` in its extra files (input shape, classes, normalisation, weights, ...);
2. a manifest ``ensemble.toml`` listing member files (TorchScript ``.pt``, ``.onnx``, and ``torch.export`` ``.pt2``
   with ``trust_pickle=True`` only, since ``torch.export.load`` unpickles the archive's weights), each with an
   optional ``weight`` and ``temperature``;
3. a pickled ``nn.Module`` or list of modules, only with ``trust_pickle=True`` (unpickling runs arbitrary code).
"""

from __future__ import annotations

import json
import tomllib
import warnings
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from compressor.core.errors import CompressorError, first_line
from compressor.core.fileio import atomic_path
from compressor.core.inference import parameter_count
from compressor.core.inputs import trace_args
from compressor.kernels import COMBINES
from compressor.students import describe_architecture
from compressor.students.hf import HFClassifier, is_hf_model
from compressor.teachers.ensemble import Ensemble, Member
from compressor.teachers.named_inputs import check_member_inputs, named_inputs_meta, random_named_inputs
from compressor.teachers.specialists import COMBINE as COMBINE_SPECIALISTS
from compressor.teachers.specialists import check_metadata as check_specialists

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


class _MemberArchive(nn.Module):
    """What :func:`save_ensemble` scripts for members with named inputs: the members, traced with those inputs as
    positional arguments, and no forward of its own (TorchScript cannot spread a dict into a call)."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)


def save_ensemble(models: Sequence[nn.Module], path: str | Path, example_input,
                  metadata: dict | None = None) -> Path:
    """Write ``models`` as one TorchScript ensemble archive that ``compress --teacher`` accepts.

    ``example_input`` is a batch (N, ...) the members accept (N ≥ 2 so a fixed batch size is caught), or for text
    classifiers a dict of named int64 inputs ``{"input_ids": (N, L), "attention_mask": (N, L)}`` in the order the
    members' forward takes them. A transformers model is wrapped to return its ``.logits`` and traced; its config is
    recorded (``hf_config``, which ``--student hf:teacher/SCALE`` copies), with its ``vocab_size`` and
    ``max_position_embeddings`` as the inputs' limits (``vocab_size`` and ``max_length`` in ``metadata`` override).
    ``metadata`` may hold ``class_names``, ``normalisation`` ({"mean": [...], "std": [...]} per input channel,
    applied as (x - mean) / std), ``dataset`` (a ``--data`` hint), ``weights`` (one per member) and
    ``member_names``; a specialist ensemble (:mod:`compressor.training.specialist_training` writes them) also gives
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
                               "specialists", "vocab_size", "max_length"}
    if unknown:
        raise CompressorError(f"save_ensemble: unknown metadata keys {sorted(unknown)}")
    names = metadata.pop("member_names", None) or [f"member-{k}" for k in range(len(models))]
    if len(names) != len(models):
        raise CompressorError(f"save_ensemble: {len(names)} member_names for {len(models)} models")
    weights = metadata.get("weights")
    if weights is not None and len(weights) != len(models):
        raise CompressorError(f"save_ensemble: {len(weights)} weights for {len(models)} models")
    named = isinstance(example_input, dict)
    hf_config = next((m.config.to_dict() for m in models if is_hf_model(m)), None)
    models = [HFClassifier(m) if is_hf_model(m) else m for m in models]
    scripted, descriptions = [], []
    for model in models:
        model.eval()
        descriptions.append({"architecture": describe_architecture(model),
                             "parameters": parameter_count(model)})
        scripted.append(_to_torchscript(model, example_input))
    with torch.no_grad():
        outputs = [m(*trace_args(example_input)) for m in scripted]
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
        **(named_inputs_meta(example_input, hf_config, metadata) if named else
           {"input_shape": list(example_input.shape[1:]), "input_dtype": str(example_input.dtype).replace("torch.", "")}),
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
    archive = _script(_MemberArchive(scripted) if named else _EnsembleArchive(scripted))
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
    if ensemble.input_names:
        check_member_inputs(ensemble)
        length = min(8, ensemble.metadata.get("max_length") or 8)
        example = random_named_inputs(ensemble.metadata["inputs"], ensemble.metadata.get("vocab_size"), length=length)
        ensemble.validate(example, "random token ids inside the declared vocabulary")
    elif ensemble.input_shape:
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


def _to_torchscript(model: nn.Module, example_input) -> torch.jit.ScriptModule:
    if isinstance(model, torch.jit.ScriptModule):
        return model
    if not isinstance(example_input, dict):
        try:
            return _script(model)
        except Exception:  # scripting rejects some Python; tracing handles any static graph
            pass
    # named inputs are traced (scripting a transformers model fails), so the members' forward takes them positionally
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(model, trace_args(example_input))


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
        raise CompressorError(f"{path}: the TorchScript archive could not be loaded ({first_line(exc)}); "
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
                          parameter_count(child), info.get("architecture"))
                   for info, child in zip(member_meta, children)]
        combine = meta.get("combine", "arithmetic")
        if combine == COMBINE_SPECIALISTS:
            check_specialists(meta.get("specialists") or {}, len(members), meta.get("num_classes"), str(path))
        return Ensemble(path, "torchscript archive", members, meta.get("weights"), combine, meta)
    # a plain TorchScript model (no compressor.json): a one-member ensemble
    member = Member(path.stem, "torchscript", str(path), module, parameter_count(module))
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
            return Member(name, "torchscript", str(path), module, parameter_count(module),
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
        raise CompressorError(f"member '{name}': {path} could not be loaded ({first_line(exc)}); "
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
    # the CUDA provider where this onnxruntime has it (onnxruntime-gpu on a GPU machine), falling back to the CPU
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                 if p in onnxruntime.get_available_providers()]
    session = onnxruntime.InferenceSession(str(path), providers=providers)
    inputs = session.get_inputs()
    dtypes = {spec.name: np.int64 if spec.type == "tensor(int64)" else np.float32 for spec in inputs}

    def forward(*tensors: torch.Tensor) -> torch.Tensor:  # one input, or the named inputs in the graph's order
        feed = {spec.name: t.detach().cpu().numpy().astype(dtypes[spec.name]) for spec, t in zip(inputs, tensors)}
        return torch.from_numpy(session.run(None, feed)[0])

    forward.input_names = [spec.name for spec in inputs]
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
    meta = {key: header.get(key) for key in ("input_shape", "num_classes", "class_names", "normalisation", "dataset",
                                             "vocab_size", "max_length")}
    if header.get("inputs"):  # text members: [ensemble] inputs = ["input_ids", "attention_mask"]
        meta["inputs"] = [{"name": str(name), "dtype": "int64"} for name in header["inputs"]]
    combine = header.get("combine", "arithmetic")
    if combine not in COMBINES:
        raise CompressorError(f"{path}: combine = {combine!r} is not one of {', '.join(COMBINES)}; a specialist "
                              f"ensemble is the archive that compress specialists writes, not a manifest")
    return Ensemble(path, "manifest", members, weights, combine, meta)


def _load_pickle(path: Path) -> Ensemble:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CompressorError(f"{path}: the pickle could not be loaded ({first_line(exc)}); the file is corrupt") from exc
    modules = list(obj) if isinstance(obj, (list, tuple, nn.ModuleList)) else [obj]
    if not all(isinstance(m, nn.Module) for m in modules):
        raise CompressorError(f"{path}: the pickle holds {type(obj).__name__}, not an nn.Module or a list of them")
    members = []
    for k, module in enumerate(modules):
        module.eval()
        members.append(Member(f"member-{k}", "pickle", str(path), module,
                              parameter_count(module), describe_architecture(module)))
    return Ensemble(path, "pickle (trusted)", members, None, "arithmetic", {})


