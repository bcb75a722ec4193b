"""``--student hf:DIR``, ``hf:CONFIG.json`` or ``hf:teacher[/SCALE]``: a Hugging Face sequence classifier built from
a local config (nothing is downloaded), randomly initialised unless ``--student-weights`` names local weights.

- ``hf:DIR`` reads ``DIR/config.json`` (a ``save_pretrained`` folder), ``hf:FILE.json`` a config file;
- ``hf:teacher/0.25`` (bare ``hf`` or ``hf:teacher`` = 0.25) copies the teachers' own config, recorded in their
  archive by ``save_ensemble``, with the number of layers, the hidden and intermediate sizes and the attention
  heads each multiplied by SCALE (rounded half up, at least 1; the hidden size stays a multiple of the heads);
  ``hf:teacher/0.25/2`` scales the widths alone and keeps two layers (at most the teachers' own depth).
  Vocabulary, positions and token types are kept, so the student reads exactly the teachers' inputs. Parameters
  shrink by about SCALE (embeddings) to SCALE³ (the encoder).

Either way the classifier gets the ensemble's number of classes. :class:`HFClassifier` is the module every
compressor step sees: named int64 inputs in, logits out (a Hugging Face model returns a ModelOutput).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from compressor.core.errors import CompressorError, first_line
from compressor.students.registry import register_student, scaled

DEFAULT_SCALE = 0.25
TEACHER = "teacher"
SCALED_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")


class HFClassifier(nn.Module):
    """A Hugging Face sequence classifier as a module of named inputs: ``forward(input_ids, attention_mask,
    token_type_ids)`` (those it is given) → ``.logits`` (N, C)."""

    weights_prefix = "model."  # --student-weights: a save_pretrained file names its tensors without it

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        named = {"attention_mask": attention_mask, "token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, **{k: v for k, v in named.items() if v is not None}).logits


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers model (returns a ModelOutput), without importing transformers."""
    return any(cls.__module__.startswith("transformers.") for cls in type(model).__mro__)


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise CompressorError("--student hf: needs the transformers package (pip install transformers)") from exc
    transformers.logging.set_verbosity_error()  # "some weights are newly initialised": expected, always
    return transformers


def scaled_config(config: dict, scale: float, layers: int | None = None) -> dict:
    """``config`` (a config's ``to_dict()``) with the sizes in SCALED_KEYS multiplied by ``scale``; ``layers``, when
    given, sets the depth instead of scaling it (at most the teachers' own)."""
    out = dict(config)
    missing = [key for key in SCALED_KEYS if key not in out]
    if missing:
        raise CompressorError(f"--student hf:teacher/{scale:g}: the teachers' config has no {', '.join(missing)} "
                              f"(a BERT-style encoder has them); give --student hf:CONFIG.json")
    heads = scaled(out["num_attention_heads"], scale)
    hidden = scaled(out["hidden_size"], scale)
    depth = scaled(out["num_hidden_layers"], scale) if layers is None else min(layers, out["num_hidden_layers"])
    out.update(num_hidden_layers=depth, num_attention_heads=heads,
               hidden_size=-(-hidden // heads) * heads, intermediate_size=scaled(out["intermediate_size"], scale))
    if "embedding_size" in out:  # ALBERT-style factorised embeddings
        out["embedding_size"] = scaled(out["embedding_size"], scale)
    return out


def _read_config(spec: str, where: str, teacher_config: dict | None) -> tuple[dict, str | None]:
    """The config dict ``hf:where`` names, and its file (None: the teachers' config)."""
    if where.split("/")[0] == TEACHER:
        if teacher_config is None:
            raise CompressorError(f"--student {spec}: the teachers' archive records no Hugging Face config (save "
                                  f"them with compressor.save_ensemble from transformers models); give --student "
                                  f"hf:DIR or hf:CONFIG.json")
        scale, _, layers = (where.partition("/")[2] or str(DEFAULT_SCALE)).partition("/")
        try:
            value = float(scale)
        except ValueError:
            value = -1.0
        if not 0 < value <= 1:
            raise CompressorError(f"--student {spec}: {scale!r} is not a scale in (0, 1]; e.g. hf:teacher/0.25")
        if layers and not (layers.isdecimal() and int(layers) > 0):
            raise CompressorError(f"--student {spec}: {layers!r} is not a number of layers; e.g. hf:teacher/0.25/2 "
                                  f"(a quarter of the width, two layers)")
        return scaled_config(teacher_config, value, int(layers) if layers else None), None
    path = Path(where)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise CompressorError(f"--student {spec}: no {file}; give a save_pretrained folder, a config.json, or "
                              f"hf:teacher/SCALE")
    try:
        return json.loads(file.read_text(encoding="utf-8")), str(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CompressorError(f"--student {spec}: {file} is not a JSON config ({first_line(exc)})") from exc


def config_from_dict(values: dict, num_classes: int, spec: str):
    """A transformers config object from its dict, for ``num_classes`` labels."""
    transformers = _transformers()
    values = {key: value for key, value in values.items() if key not in ("id2label", "label2id", "num_labels")}
    kind = values.pop("model_type", None)
    if kind is None:
        raise CompressorError(f"--student {spec}: the config has no model_type (e.g. \"bert\"); save it with "
                              f"config.save_pretrained")
    try:
        return transformers.AutoConfig.for_model(kind, num_labels=num_classes, **values)
    except Exception as exc:  # an unknown model_type, or values the config class rejects
        raise CompressorError(f"--student {spec}: transformers cannot build a {kind!r} config "
                              f"({first_line(exc)})") from exc


@register_student("hf")
def hf_student(args: str | None, input_shape: tuple[int, ...], num_classes: int,
               teacher_config: dict | None = None, **context) -> nn.Module:
    """A transformers sequence classifier for ``num_classes`` from a local config (see the module docstring)."""
    where = args or TEACHER
    spec = f"hf:{where}"
    config, _ = _student_config(where, num_classes, teacher_config)
    transformers = _transformers()
    try:
        model = transformers.AutoModelForSequenceClassification.from_config(config)
    except Exception as exc:
        raise CompressorError(f"--student {spec}: no sequence classifier for a {config.model_type!r} config "
                              f"({first_line(exc)})") from exc
    return HFClassifier(model)


def _student_config(where: str, num_classes: int, teacher_config: dict | None):
    """The transformers config ``hf:where`` builds its model from, and its file (None: the teachers' config)."""
    values, source = _read_config(f"hf:{where}", where, teacher_config)
    return config_from_dict(values, num_classes, f"hf:{where}"), source


def student_config(spec: str, num_classes: int, teacher_config: dict | None):
    """``(config, file)`` for an hf: ``--student spec`` (file None: the teachers' config), without building the
    model; None for a spec of another family."""
    family, _, args = spec.strip().partition(":")
    if family.strip().lower() != "hf":
        return None
    return _student_config(args.strip() or TEACHER, num_classes, teacher_config)


# what each named input must stay below in a Hugging Face config: (input, config key, what the data's value is)
_ID_LIMITS = (("input_ids", "vocab_size", "its largest token id"),
              ("token_type_ids", "type_vocab_size", "its largest token type id"))


def check_fits_data(spec: str, config, file: str | None, data: str, largest: dict[str, int], longest: int) -> None:
    """An hf student's config (from :func:`student_config`) against the data it will train on and be timed at:
    its vocabulary, token types and positions. ``largest`` maps each named input to its largest value, ``longest``
    is the longest row in tokens (or --seq-len). One line naming the config and the value to set."""
    source = file or "the teachers' config"
    there = "there" if file else "in a config of your own (--student hf:CONFIG.json)"
    for name, key, what in _ID_LIMITS:
        size = getattr(config, key, None)
        if name in largest and size is not None and largest[name] >= size:
            raise CompressorError(f"--student {spec}: {key} {size} in {source} does not cover {data} ({what} is "
                                  f"{largest[name]}); set {key} to at least {largest[name] + 1} {there}, or "
                                  f"tokenize the data with the student's tokenizer")
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and longest > positions:
        raise CompressorError(f"--student {spec}: max_position_embeddings {positions} in {source} is shorter than "
                              f"{data} (rows of up to {longest} tokens); set max_position_embeddings to at least "
                              f"{longest} {there}, or truncate the rows to {positions} tokens when tokenizing")
