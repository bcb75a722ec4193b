"""The main job's data step: ``--data`` (or the ensemble's dataset hint) loaded, checked against the teachers'
input shape and classes, the normalisation decided, and every split normalised by the bundle's own preprocessing
function into tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from compressor.config import RunConfig
from compressor.core.errors import CompressorError
from compressor.core.inputs import NamedInputs
from compressor.core.preprocessing import ImageSpec, apply_normalisation
from compressor.data.datasets import Dataset, ReadOptions, load_dataset
from compressor.data.lazy import LazyInputs

if TYPE_CHECKING:  # the data layer reads an ensemble's metadata, never runs it
    from compressor.teachers.ensemble import Ensemble


@dataclass
class Tensors:
    """The dataset's splits as torch tensors, normalised exactly as the bundle will normalise them."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_data(config: RunConfig, ensemble: Ensemble) -> tuple[Dataset, dict | None]:
    """Load ``--data`` (or the ensemble's dataset hint) and decide the normalisation; check it fits the teachers."""
    spec = config.data or ensemble.metadata.get("dataset") or "digits"
    read = ReadOptions(image_spec(config, ensemble), config.teacher_cache, config.on_bad_image, config.input_columns,
                       config.label_column)
    dataset = load_dataset(spec, seed=config.seed, max_train=config.max_train, read=read)
    if dataset.named_inputs or ensemble.input_names:
        check_named_inputs(dataset, ensemble, spec, config.teacher)
        if config.normalise is not None:
            raise CompressorError(f"--normalise applies to float inputs; --data {spec} holds token ids")
        align_classes(dataset, ensemble.class_names)
        return dataset, None
    if ensemble.input_shape and tuple(dataset.input_shape) != tuple(ensemble.input_shape):
        raise CompressorError(
            f"--data {spec} gives inputs of shape {list(dataset.input_shape)} but the teachers in {config.teacher} "
            f"expect {list(ensemble.input_shape)}; pass the data the teachers were trained on")
    align_classes(dataset, ensemble.class_names)
    classes = dataset.num_classes
    if classes is not None and ensemble.num_classes is not None and classes > ensemble.num_classes:
        raise CompressorError(
            f"--data {spec} has {classes} classes but the teachers in {config.teacher} predict "
            f"{ensemble.num_classes}; pass the data the teachers were trained on")
    normalisation = ensemble.normalisation
    if config.normalise is not None:
        normalisation = {"mean": list(config.normalise[0]), "std": list(config.normalise[1]), "source": "--normalise"}
    elif normalisation is not None:
        normalisation = {**normalisation, "source": f"ensemble metadata of {config.teacher}"}
    if normalisation is not None:
        channels = dataset.input_shape[0] if len(dataset.input_shape) > 1 else 1
        for key in ("mean", "std"):
            if len(normalisation[key]) not in (1, channels):
                raise CompressorError(f"normalisation {key} has {len(normalisation[key])} values for "
                                      f"{channels} input channels; give one value per channel")
        if any(s <= 0 for s in normalisation["std"]):
            raise CompressorError("normalisation std must be positive")
    return dataset, normalisation


def check_named_inputs(dataset: Dataset, ensemble: Ensemble, spec: str, teacher) -> None:
    """Token data against text teachers: the same input names (put in the teachers' order), ids inside the
    teachers' vocabulary, no row longer than their maximum length. One line for each way it fails."""
    wanted = ensemble.input_names
    if not dataset.named_inputs or not wanted:
        have = "token columns" if dataset.named_inputs else "one input tensor"
        need = f"named inputs {', '.join(wanted)}" if wanted else "one input tensor"
        raise CompressorError(f"--data {spec} gives {have} but the teachers in {teacher} take {need}; pass the data "
                              f"the teachers were trained on (--input-columns names its token columns)")
    names = dataset.train.x.names
    if sorted(names) != sorted(wanted):
        raise CompressorError(f"--data {spec} has the token columns {', '.join(names)} but the teachers in {teacher} "
                              f"take {', '.join(wanted)}; name the matching columns with --input-columns")
    vocab, longest = ensemble.metadata.get("vocab_size"), ensemble.metadata.get("max_length")
    for split_name in ("train", "val", "test"):
        split = getattr(dataset, split_name)
        split.x = NamedInputs({name: split.x.tensors[name] for name in wanted}, split.x.lengths)
        ids = split.x.tensors.get("input_ids")
        if ids is not None and vocab is not None and (int(ids.max()) >= vocab or int(ids.min()) < 0):
            bad = int(((ids >= vocab) | (ids < 0)).any(dim=1).nonzero()[0, 0])
            raise CompressorError(f"--data {spec}: the {split_name} split's input_ids (row {bad}) hold ids outside "
                                  f"the teachers' vocabulary of {vocab} in {teacher}; tokenize with the teachers' "
                                  f"tokenizer")
        if longest is not None and split.x.shape[1] > longest:
            bad = int(split.x.lengths.argmax())
            raise CompressorError(f"--data {spec}: the {split_name} split has a row of {split.x.shape[1]} tokens (row "
                                  f"{bad}) but the teachers in {teacher} take at most {longest}; truncate the "
                                  f"sequences to {longest} when tokenizing")


def check_seq_len(seq_len: int | None, dataset: Dataset, ensemble: Ensemble, teacher) -> None:
    """``--seq-len`` (the length the benchmark times text rows at): 1 to the teachers' longest input, and only for
    data of token columns; one line otherwise."""
    if seq_len is None:
        return
    if not dataset.named_inputs:
        raise CompressorError(f"--seq-len applies to text data (token columns); --data {dataset.source} holds one "
                              "input tensor")
    longest = ensemble.metadata.get("max_length")
    if not 1 <= seq_len <= (longest or seq_len):
        raise CompressorError(f"--seq-len {seq_len}: give a length from 1 to the teachers' longest input "
                              f"({longest} tokens in {teacher})")


def _name_key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def align_classes(dataset: Dataset, teacher_names: list[str] | None) -> None:
    """Put the data's labels in the teachers' class order when both name the same classes in another order.

    An image folder's classes are its sorted sub-folder names (as torchvision's ImageFolder orders them), while the
    teachers' ``class_names`` follow whatever order they were trained with ("t-shirt/top" saved as the folder
    "t-shirt-top", say). Names are matched ignoring case and punctuation. When they are the same set, every
    split's labels are renumbered to the teachers' order and the data takes the teachers' names; when they are not
    (synset ids against words), labels stay by position and ``split_info["class_order"]`` says so."""
    names = dataset.class_names
    if not names or not teacher_names or list(names) == list(teacher_names):
        return
    position = {_name_key(name): k for k, name in enumerate(teacher_names)}
    if len(position) != len(teacher_names) or sorted(position) != sorted(map(_name_key, names)):
        dataset.split_info["class_order"] = (f"the data's classes ({', '.join(names[:5])}, ...) are not the "
                                             f"teachers' class_names; labels are taken by position")
        return
    renumber = np.array([position[_name_key(name)] for name in names], dtype=np.int64)
    for split in (dataset.train, dataset.val, dataset.test):
        split.y = np.where(split.y >= 0, renumber[np.maximum(split.y, 0)], split.y)
    dataset.class_names = list(teacher_names)
    dataset.split_info["class_order"] = "the data's classes renumbered to the teachers' class_names order"


def image_spec(config: RunConfig, ensemble: Ensemble) -> ImageSpec:
    """How an image folder is decoded: --channels (default: the teachers' input channels, else RGB), --resize, --crop."""
    for flag, value in (("--resize", config.resize), ("--crop", config.crop)):
        if value is not None and value < 1:
            raise CompressorError(f"{flag} {value}: give a size in pixels, at least 1")
    channels = config.channels
    if channels is None:
        shape = ensemble.input_shape
        channels = shape[0] if shape and len(shape) == 3 and shape[0] in (1, 3) else 3
    if channels not in (1, 3):
        raise CompressorError(f"--channels {channels}: choose 1 (grayscale) or 3 (RGB)")
    return ImageSpec(channels, config.resize, config.crop)


def to_tensors(dataset: Dataset, normalisation: dict | None) -> Tensors:
    """Normalise every split with the bundle's own preprocessing function, then wrap them as tensors; a streamed
    split (an image folder) stays on disk and is normalised batch by batch as it is read (:class:`LazyInputs`)."""
    def prepare(split):
        if isinstance(split.x, NamedInputs):  # token ids: nothing to normalise
            return split.x, torch.from_numpy(split.y)
        if split.streamed:
            return LazyInputs(split.x, normalisation, split.scale), torch.from_numpy(split.y)
        return torch.from_numpy(apply_normalisation(split.x, normalisation)), torch.from_numpy(split.y)
    return Tensors(*prepare(dataset.train), *prepare(dataset.val), *prepare(dataset.test))
