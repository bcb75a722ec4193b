"""``bundle/``: what an inference service embeds, and ``load_bundle`` to serve it from Python without torch.

Layout (``bundle_format`` 1)::

    bundle/
      model.onnx                         the exported student, copied
      metadata.json                      input/output spec, normalisation, class names, precision, sha256, versions
      client.py                          calls the served model with tritonclient, prints top-k class names
      triton/<model_name>/config.pbtxt   a Triton Inference Server model repository: tritonserver
      triton/<model_name>/labels.txt       --model-repository bundle/triton (labels: the class names)
      triton/<model_name>/1/model.onnx
      triton/<model_name>_python/...     the same ONNX model behind the python backend (onnxruntime on the CPU),
                                         for a tritonserver without the onnxruntime backend

``compressor.core.preprocessing.apply_normalisation`` is THE preprocessing definition: the training pipeline
normalises with this same function, so a service calling it (or ``Bundle.predict``) feeds the model exactly the floats the student was trained and
checked on. Triton does not normalise: a client must send ``apply_normalisation(x, metadata["normalisation"])``.
A text model's inputs (``metadata["inputs"]``: ``input_ids``, ``attention_mask``, ... int64) are token ids, sent as
the tokenizer wrote them: ``Bundle.predict`` and ``client.py`` take them as a dict of arrays by name.

Imports only the standard library, numpy, onnxruntime and ``compressor.core`` (errors, files, preprocessing).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from compressor.core.errors import CompressorError, MissingCapabilityError, first_line
from compressor.core.fileio import directory_mode, sha256_file
from compressor.core.preprocessing import ImageSpec, apply_normalisation, load_image

BUNDLE_FORMAT = 1
METADATA_FILE = "metadata.json"
REQUIRED_KEYS = ("input", "output", "normalisation", "class_names", "precision", "versions")
TENSOR_KEYS = ("name", "shape", "dtype")
TRITON_MAX_BATCH = 64          # max_batch_size when the metadata names no serving batch sizes
TRITON_QUEUE_DELAY_US = 100    # how long dynamic batching waits to fill a preferred batch
LABELS_FILE = "labels.txt"
SERVING = Path(__file__).parent / "serving"  # the python-backend model and the client, copied into each bundle
# numpy dtype name (metadata "dtype") -> Triton's DataType enum name (model_config.proto)
TRITON_DATA_TYPES = {"bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "uint16": "TYPE_UINT16", "uint32": "TYPE_UINT32",
                     "uint64": "TYPE_UINT64", "int8": "TYPE_INT8", "int16": "TYPE_INT16", "int32": "TYPE_INT32",
                     "int64": "TYPE_INT64", "float16": "TYPE_FP16", "float32": "TYPE_FP32", "float64": "TYPE_FP64",
                     "bfloat16": "TYPE_BF16"}
# model file suffix -> Triton platform; Triton's default file name for each is model<suffix>, which we write
TRITON_PLATFORMS = {".onnx": "onnxruntime_onnx", ".plan": "tensorrt_plan"}
# model files bundled without a Triton repository, and why (metadata.json's "triton" says so too)
UNSERVED = {".pt2": "Triton's PyTorch backend serves TorchScript, not a torch.export program: embed model.pt2 "
                    "with torch.export.load (after import torch_tensorrt), or use --target tensorrt for a "
                    "tensorrt_plan model"}


def write_bundle(model_file: Path, metadata: dict, bundle_dir: Path) -> Path:
    """Write ``bundle_dir`` (replacing an old one) from ``model_file`` and the caller's ``metadata``; return it.

    ``metadata`` needs ``input`` and ``output`` ({name, shape without the batch axis, dtype}), ``normalisation``
    (dict or None), ``class_names``, ``precision`` and ``versions``; a ``preprocessing`` note and anything else
    JSON-safe is kept. The bundle is built in a temporary folder beside ``bundle_dir`` and renamed into place,
    so a crash leaves the old bundle or the new one, never a mixture.
    """
    model_file, bundle_dir = Path(model_file), Path(bundle_dir)
    _validate(metadata)
    if not model_file.is_file():
        raise CompressorError(f"{model_file}: the model file to bundle does not exist; export the model first")
    model_name = "model" + model_file.suffix  # model.onnx (model.plan for TensorRT)
    triton_name = str(metadata.get("model_name", "student"))
    served = model_file.suffix not in UNSERVED
    triton_config = _triton_config(metadata, triton_name, model_file) if served else None  # it may refuse: first
    python_model = model_file.suffix == ".onnx"  # the python backend runs ONNX files with onnxruntime
    try:
        bundle_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{bundle_dir.name}.", suffix=".tmp", dir=bundle_dir.parent))
    except OSError as exc:
        raise CompressorError(f"cannot write the bundle beside {bundle_dir} ({exc.strerror or exc}); "
                              "choose another --out") from exc
    try:
        shutil.copyfile(model_file, staging / model_name)
        models = [triton_name] * served + [f"{triton_name}_python"] * python_model
        full = {**metadata, "model_file": model_name, "sha256": sha256_file(staging / model_name),
                "bundle_format": BUNDLE_FORMAT,
                "triton": {"models": models} if served else {"models": [], "why": UNSERVED[model_file.suffix]}}
        if served:
            _write_triton_model(staging / "triton" / triton_name, triton_config, model_file, model_name, metadata)
        if python_model:
            _write_triton_model(staging / "triton" / f"{triton_name}_python",
                                _triton_config(metadata, f"{triton_name}_python", model_file, backend="python"),
                                model_file, model_name, metadata, SERVING / "triton_python_model.py")
        shutil.copyfile(SERVING / "client.py", staging / "client.py")
        (staging / METADATA_FILE).write_text(json.dumps(full, indent=2) + "\n", encoding="utf-8")
        os.chmod(staging, directory_mode())
        _swap_in(staging, bundle_dir)
    except OSError as exc:
        raise CompressorError(f"cannot write the bundle {bundle_dir} ({exc.strerror or exc}); "
                              "free disk space or choose another --out") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when the swap succeeded
    return bundle_dir


class Bundle:
    """A loaded bundle: ``predict`` raw inputs to (N, C) logits exactly as the pipeline evaluated the export."""

    def __init__(self, path: Path, metadata: dict, session):
        self.path = path
        self.metadata = metadata
        self.session = session
        self.input_shape = tuple(metadata["input"]["shape"])  # without the batch axis, e.g. (1, 8, 8)
        self.input_dtype = np.dtype(metadata["input"]["dtype"])
        self.inputs = model_inputs(metadata)  # a text model's input_ids, attention_mask, ... in call order
        self.tokens = takes_tokens(metadata)

    @property
    def class_names(self) -> list[str] | None:
        return self.metadata.get("class_names")

    def predict(self, x, normalised: bool = False) -> np.ndarray:
        """(N, *input_shape) or one (*input_shape) example of raw values -> (N, C) float32 logits (N = 1 for one).

        ``apply_normalisation`` with the bundle's normalisation is applied first unless ``normalised=True``. A
        text model takes a dict of (N, L) integer arrays (or (L,) for one example) by input name instead: token ids
        and attention mask as the tokenizer wrote them, right-padded with 0s.
        """
        if isinstance(x, dict) or self.tokens:
            return self._run(self._named(x))
        x = np.asarray(x)
        if x.shape == self.input_shape:
            x = x[None]  # one example -> a batch of one
        if x.ndim != len(self.input_shape) + 1 or x.shape[1:] != self.input_shape:
            want = ", ".join(str(d) for d in self.input_shape)
            raise CompressorError(f"{self.path}: expected input of shape (N, {want}) or ({want}), got {x.shape}")
        x = apply_normalisation(x, None if normalised else self.metadata.get("normalisation"))
        return self._run({self.metadata["input"]["name"]: np.ascontiguousarray(x, dtype=self.input_dtype)})

    def _named(self, x) -> dict[str, np.ndarray]:
        """A text model's inputs by name as (N, L) arrays of each input's dtype, or CompressorError naming the fix."""
        names = [spec["name"] for spec in self.inputs]
        if not isinstance(x, dict) or sorted(x) != sorted(names):
            given = ", ".join(sorted(x)) if isinstance(x, dict) else f"one {type(x).__name__}"
            raise CompressorError(f"{self.path}: the model takes {', '.join(names)} (a dict of integer arrays by "
                                  f"those names), got {given}")
        arrays = {spec["name"]: np.asarray(x[spec["name"]]) for spec in self.inputs}
        arrays = {name: a[None] if a.ndim == 1 else a for name, a in arrays.items()}  # one example -> a batch of one
        if any(a.ndim != 2 or a.dtype.kind not in "iu" for a in arrays.values()) or \
                len({a.shape for a in arrays.values()}) != 1:
            shapes = ", ".join(f"{n}: {a.dtype.name} {a.shape}" for n, a in arrays.items())
            raise CompressorError(f"{self.path}: expected integer arrays of one shape (N, L) by input name, got "
                                  f"{shapes}")
        longest = self.metadata.get("max_length")
        if longest is not None and next(iter(arrays.values())).shape[1] > longest:
            raise CompressorError(f"{self.path}: sequences of {next(iter(arrays.values())).shape[1]} tokens are "
                                  f"longer than the {longest} the model was trained on; cut them to {longest}")
        return {spec["name"]: np.ascontiguousarray(arrays[spec["name"]], dtype=spec["dtype"]) for spec in self.inputs}

    def _run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        (logits,) = self.session.run([self.metadata["output"]["name"]], feed)
        return logits.astype(np.float32, copy=False)

    def predict_images(self, files: list[str | os.PathLike]) -> np.ndarray:
        """Image files -> (N, C) float32 logits: each decoded, resized and cropped as the training images were
        (``metadata["image"]``, :func:`compressor.core.preprocessing.load_image`), then normalised and run."""
        spec = self.metadata.get("image")
        if spec is None:
            raise CompressorError(f"{self.path}: this bundle was not trained on an image folder, so it has no image "
                                  f"decoding to apply; call predict() with arrays")
        image = ImageSpec(spec["channels"], spec.get("resize"), spec.get("crop"))
        return self.predict(np.stack([load_image(f, image) for f in files]))

    def predict_classes(self, x: np.ndarray, normalised: bool = False) -> list[str]:
        """The top-1 class name per example (the class index as a string when the bundle has no names)."""
        top1 = self.predict(x, normalised).argmax(1)
        names = self.class_names
        return [names[i] if names else str(i) for i in top1.tolist()]


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Open the bundle folder ``path``: check its files and the model's sha256, then start an ONNX Runtime session."""
    import onnxruntime as ort

    path = Path(path)
    metadata_file = path / METADATA_FILE
    if not metadata_file.is_file():
        what = "folder" if not path.is_dir() else METADATA_FILE
        raise CompressorError(f"{metadata_file if path.is_dir() else path}: no bundle here (missing {what}); "
                              "re-export it with compress")
    try:
        metadata = json.loads(metadata_file.read_text(encoding="utf-8"))
        _validate(metadata)
        model_file = path / metadata["model_file"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CompressorError(f"{metadata_file} is not a valid bundle description ({exc}); "
                              "re-export the bundle with compress") from exc
    if metadata.get("bundle_format") != BUNDLE_FORMAT:
        raise CompressorError(f"{metadata_file}: bundle_format {metadata.get('bundle_format')!r}, this compressor "
                              f"reads format {BUNDLE_FORMAT}; re-export the bundle with this version")
    if not model_file.is_file():
        raise CompressorError(f"{model_file}: the bundle's model file is missing; re-export the bundle")
    digest = sha256_file(model_file)
    if digest != metadata.get("sha256"):
        raise CompressorError(f"{model_file}: sha256 {digest[:12]}... does not match {metadata_file} "
                              f"({str(metadata.get('sha256'))[:12]}...); the file changed after export, "
                              "re-export the bundle")
    if model_file.suffix != ".onnx":
        raise MissingCapabilityError(f"{model_file}: load_bundle serves .onnx bundles with onnxruntime; "
                                     "serve this one with TensorRT or Triton")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    available = ort.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    try:
        session = ort.InferenceSession(str(model_file), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime's own exception types
        raise CompressorError(f"ONNX Runtime cannot load {model_file} ({first_line(exc)}); "
                              "re-export the bundle") from exc
    return Bundle(path, metadata, session)


def model_inputs(metadata: dict) -> list[dict]:
    """Every model input's {name, shape, dtype} in call order: ``inputs`` (a text model's input_ids,
    attention_mask, ...), or the one ``input``."""
    return list(metadata.get("inputs") or [metadata["input"]])


def takes_tokens(metadata: dict) -> bool:
    """Whether the model reads integer token ids (a text model, fed by name and never normalised)."""
    return any(np.dtype(spec["dtype"]).kind in "iu" for spec in model_inputs(metadata))


def _validate(metadata: dict) -> None:
    """ValueError naming every missing key: a bundle without them cannot be served correctly."""
    if not isinstance(metadata, dict):
        raise ValueError(f"bundle metadata must be a dict, got {type(metadata).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in metadata]
    sides = [("input", metadata.get("input")), ("output", metadata.get("output"))]
    if "inputs" in metadata:
        if not isinstance(metadata["inputs"], list) or not metadata["inputs"]:
            missing.append("inputs (a non-empty list)")
        else:
            sides += [(f"inputs[{i}]", spec) for i, spec in enumerate(metadata["inputs"])]
    for side, spec in sides:
        if isinstance(spec, dict):
            missing += [f"{side}.{key}" for key in TENSOR_KEYS if key not in spec]
        elif side in metadata or side.startswith("inputs["):
            missing.append(f"{side} (a dict of {', '.join(TENSOR_KEYS)})")
    norm = metadata.get("normalisation")
    if norm is not None and not (isinstance(norm, dict) and "mean" in norm and "std" in norm):
        missing.append("normalisation.mean/std (or normalisation None)")
    if missing:
        raise ValueError(f"bundle metadata lacks {', '.join(missing)}")



def _swap_in(staging: Path, bundle_dir: Path) -> None:
    """Rename ``staging`` onto ``bundle_dir``; an old bundle is moved aside first, then deleted."""
    if not bundle_dir.exists():
        os.replace(staging, bundle_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{bundle_dir.name}.old.", suffix=".tmp", dir=bundle_dir.parent))
    os.replace(bundle_dir, old / bundle_dir.name)
    try:
        os.replace(staging, bundle_dir)
    except OSError:
        os.replace(old / bundle_dir.name, bundle_dir)  # put the old bundle back
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _write_triton_model(folder: Path, config: str, model_file: Path, model_name: str, metadata: dict,
                        python_model: Path | None = None) -> None:
    """One model of the Triton repository: ``config.pbtxt``, ``labels.txt``, and ``1/`` with the model file (and
    the python backend's ``model.py``)."""
    (folder / "1").mkdir(parents=True)
    shutil.copyfile(model_file, folder / "1" / model_name)
    if python_model is not None:
        shutil.copyfile(python_model, folder / "1" / "model.py")
    (folder / "config.pbtxt").write_text(config, encoding="utf-8")
    if metadata.get("class_names"):
        (folder / LABELS_FILE).write_text("".join(f"{name}\n" for name in metadata["class_names"]), encoding="utf-8")


def _triton_config(metadata: dict, name: str, model_file: Path, backend: str | None = None) -> str:
    """``config.pbtxt`` (a Triton ``ModelConfig`` in protobuf text format).

    ``max_batch_size`` is the largest of ``metadata["serving"]["batch_sizes"]`` (the run's --batch-sizes, what the
    report timed), and dynamic batching prefers those above 1 and waits at most TRITON_QUEUE_DELAY_US to fill one;
    one instance (on the GPU for a TensorRT engine, on the CPU for the python backend, where Triton finds one
    otherwise); the newest version only;
    the output's ``label_filename`` names labels.txt (the class names) for Triton's classification extension. The
    model file is Triton's default ``model.onnx`` / ``model.plan``, which ``write_bundle`` writes. A dtype or model
    file Triton cannot be told about raises CompressorError rather than writing a config that declares something
    else.
    """
    platform = TRITON_PLATFORMS.get(model_file.suffix)
    if platform is None:
        raise CompressorError(f"{model_file}: a bundle's Triton repository takes {' or '.join(TRITON_PLATFORMS)} "
                              f"model files, not {model_file.suffix or 'a file without a suffix'}; bundle an "
                              "ONNX export or a TensorRT engine")

    def tensor(side: str, spec: dict) -> str:
        data_type = TRITON_DATA_TYPES.get(spec["dtype"])
        if data_type is None:
            raise CompressorError(f"{model_file}: the model's {side} {spec['name']!r} has dtype {spec['dtype']}, "
                                  "which Triton has no data type for; export with float32 input and output")
        dims = ", ".join(str(d) if isinstance(d, int) else "-1" for d in spec["shape"])  # -1: variable
        labels = f"\n    label_filename: {_quoted(LABELS_FILE)}" if side == "output" and metadata.get("class_names") \
            else ""
        return (f"  {{\n    name: {_quoted(spec['name'])}\n    data_type: {data_type}\n    dims: [ {dims} ]{labels}"
                f"\n  }}")

    inputs = ",\n".join(tensor("input", spec) for spec in model_inputs(metadata))
    sizes = sorted({int(b) for b in metadata.get("serving", {}).get("batch_sizes", [TRITON_MAX_BATCH]) if b >= 1})
    preferred = ", ".join(str(b) for b in sizes if b > 1)
    kind = {"tensorrt_plan": "KIND_GPU"}.get(platform, "KIND_AUTO") if backend is None else "KIND_CPU"
    served_by = f"platform: \"{platform}\"" if backend is None else f"backend: \"{backend}\""
    note = ("# token ids and attention masks go in as the tokenizer wrote them (int64, right-padded with 0s): see\n"
            "# ../../metadata.json's inputs\n" if takes_tokens(metadata) else
            "# inputs must be preprocessed with targets.bundle.apply_normalisation(x, normalisation) using the\n"
            "# normalisation in ../../metadata.json: Triton feeds the model as it receives it\n")
    return (f"{note}"
            f"name: {_quoted(name)}\n{served_by}\n"
            f"max_batch_size: {sizes[-1]}\n"
            f"input [\n{inputs}\n]\noutput [\n{tensor('output', metadata['output'])}\n]\n"
            f"dynamic_batching {{\n" + (f"  preferred_batch_size: [ {preferred} ]\n" if preferred else "")
            + f"  max_queue_delay_microseconds: {TRITON_QUEUE_DELAY_US}\n}}\n"
            f"instance_group [ {{ count: 1 kind: {kind} }} ]\n"
            f"version_policy: {{ latest {{ num_versions: 1 }} }}\n")


def _quoted(text: str) -> str:
    """``text`` as a protobuf text-format string literal: a quote or backslash in a name must not end it early."""
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
