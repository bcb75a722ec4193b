"""The main job's data step: ``--data`` (or the ensemble's dataset hint) loaded, checked against the teachers'
input shape and classes, an image source's channels chosen from the evidence, the normalisation decided, and every
split normalised by the bundle's own preprocessing function into tensors."""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from compressor.config import RunConfig
from compressor.core.errors import CompressorError, DataError, DataShapeError, LabelError
from compressor.core.inputs import NamedInputs
from compressor.core.preprocessing import ImageSpec, apply_normalisation
from compressor.data.datasets import Dataset, ReadOptions, load_dataset
from compressor.data.lazy import LazyInputs
from compressor.data.torch_data import Data, read_torch_data

if TYPE_CHECKING:  # the data layer reads an ensemble's metadata, never runs it (the caller may hand a probe)
    from compressor.teachers.ensemble import Ensemble

# Pillow modes of one channel: what `--channels` from the images' evidence counts as grayscale
GRAYSCALE_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
MODE_SAMPLE = 1000  # image headers read to decide the channels: every image up to this many, else evenly spaced
Probe = Callable[[tuple[int, ...]], "int | None"]  # input shape (no batch) -> the teachers' class count, or None


@dataclass
class Tensors:
    """The dataset's splits as torch tensors, normalised exactly as the bundle will normalise them."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_data(config: RunConfig, ensemble: Ensemble, probe: Probe | None = None,
              data: Data | None = None) -> tuple[Dataset, dict | None]:
    """Load ``--data`` (or the ensemble's dataset hint), or ``data``'s torch Datasets when given (read once into
    the data cache, :mod:`compressor.data.torch_data`), and decide the normalisation; check it fits the teachers,
    labels included, before any of them runs on it.

    ``probe(shape)`` (the caller's, e.g. :meth:`Ensemble.probe`) runs one teacher on zeros of ``shape`` and returns
    its class count, None when it fails: how this step learns the input and classes of teachers that record
    neither (a manifest). Without it, such teachers are checked when they first run."""
    if data is not None:
        dataset = read_torch_data(data, config, ensemble)
        what = data.label()
    else:
        spec = config.data or ensemble.metadata.get("dataset") or "digits"
        read = ReadOptions(image_spec(config, ensemble), config.teacher_cache, config.on_bad_image,
                           config.input_columns, config.label_column, channel_chooser(config, ensemble, probe))
        dataset = load_dataset(spec, seed=config.seed, max_train=config.max_train, read=read)
        what = f"--data {spec}"
    if dataset.named_inputs and ensemble.metadata.get("takes_data_inputs") and not ensemble.input_names:
        ensemble.metadata["inputs"] = dataset.train.x.describe()  # modules in memory: the data's names, in order
    if dataset.named_inputs or ensemble.input_names:
        check_named_inputs(dataset, ensemble, what, config.teacher)
        if config.normalise is not None:
            raise CompressorError(f"--normalise applies to float inputs; {what} holds token ids")
        align_classes(dataset, ensemble.class_names)
        check_labels(dataset, ensemble.num_classes, what, config.teacher)
        return dataset, None
    if ensemble.input_shape and tuple(dataset.input_shape) != tuple(ensemble.input_shape):
        raise DataShapeError(
            f"{what} gives inputs of shape {list(dataset.input_shape)} but the teachers in {config.teacher} "
            f"expect {list(ensemble.input_shape)}; pass the data the teachers were trained on")
    align_classes(dataset, ensemble.class_names)
    check_labels(dataset, teacher_classes(ensemble, probe, tuple(dataset.input_shape), config.teacher), what,
                 config.teacher)
    normalisation = ensemble.normalisation
    if config.normalise is not None:
        normalisation = {"mean": list(config.normalise[0]), "std": list(config.normalise[1]), "source": "--normalise"}
    elif normalisation is not None:
        normalisation = {**normalisation, "source": f"ensemble metadata of {config.teacher}"}
    if normalisation is not None:
        check_normalisation(normalisation, dataset.input_shape, what)
    return dataset, normalisation


def check_named_inputs(dataset: Dataset, ensemble: Ensemble, what: str, teacher) -> None:
    """Token data against text teachers: the same input names (put in the teachers' order), ids inside the
    teachers' vocabulary, no row longer than their maximum length. One line for each way it fails."""
    wanted = ensemble.input_names
    if not dataset.named_inputs or not wanted:
        have = "token columns" if dataset.named_inputs else "one input tensor"
        need = f"named inputs {', '.join(wanted)}" if wanted else "one input tensor"
        raise DataShapeError(f"{what} gives {have} but the teachers in {teacher} take {need}; pass the data "
                              f"the teachers were trained on (--input-columns names its token columns)")
    names = dataset.train.x.names
    if sorted(names) != sorted(wanted):
        raise DataShapeError(f"{what} has the token columns {', '.join(names)} but the teachers in {teacher} "
                              f"take {', '.join(wanted)}; name the matching columns with --input-columns")
    vocab, longest = ensemble.metadata.get("vocab_size"), ensemble.metadata.get("max_length")
    for split_name in ("train", "val", "test"):
        split = getattr(dataset, split_name)
        split.x = NamedInputs({name: split.x.tensors[name] for name in wanted}, split.x.lengths)
        ids = split.x.tensors.get("input_ids")
        if ids is not None and vocab is not None and (int(ids.max()) >= vocab or int(ids.min()) < 0):
            bad = int(((ids >= vocab) | (ids < 0)).any(dim=1).nonzero()[0, 0])
            raise DataError(f"{what}: the {split_name} split's input_ids (row {bad}) hold ids outside "
                                  f"the teachers' vocabulary of {vocab} in {teacher}; tokenize with the teachers' "
                                  f"tokenizer")
        if longest is not None and split.x.shape[1] > longest:
            bad = int(split.x.lengths.argmax())
            raise DataShapeError(f"{what}: the {split_name} split has a row of {split.x.shape[1]} tokens (row "
                                  f"{bad}) but the teachers in {teacher} take at most {longest}; truncate the "
                                  f"sequences to {longest} when tokenizing")


def teacher_classes(ensemble: Ensemble, probe: Probe | None, input_shape: tuple[int, ...], teacher) -> int | None:
    """How many classes the teachers predict: what a probe of member 0 on the data's shape returns, checked against
    what the ensemble declares (``num_classes``, ``class_names``), so that a header contradicting its members is
    named as such rather than blamed on the data's labels; the declared count where there is no probe."""
    declared = ensemble.num_classes or len(ensemble.class_names or []) or None
    probed = probe(input_shape) if probe is not None else None
    if declared is not None and probed is not None and probed != declared:
        field = "num_classes" if ensemble.num_classes else "class_names"
        raise CompressorError(f"{teacher}: its {field} says {declared} classes but its member outputs {probed} on "
                              f"inputs of shape {list(input_shape)}; fix {field} to match the members")
    return probed or declared


def check_normalisation(normalisation: dict, input_shape: tuple[int, ...], what: str) -> None:
    """One mean and std per input channel (or one for all), every std positive; the line names where they came
    from (``--normalise`` or the ensemble's metadata)."""
    channels = input_shape[0] if len(input_shape) > 1 else 1
    where = normalisation["source"]
    for key in ("mean", "std"):
        if len(normalisation[key]) not in (1, channels):
            raise CompressorError(f"normalisation from {where}: {key} has {len(normalisation[key])} values but "
                                  f"{what} has {channels} input channel(s); give one value per channel")
    if any(not s > 0 for s in normalisation["std"]):
        raise CompressorError(f"normalisation from {where}: std {normalisation['std']} must be positive")


def check_labels(dataset: Dataset, classes: int | None, what: str, teacher) -> None:
    """Every split's labels are class indices the teachers predict (0 to ``classes`` - 1) or -1 (unlabeled): one
    line naming the data, the labels and the fix otherwise. Any kind of data, before any teacher runs on it."""
    for name in ("train", "val", "test"):
        y = np.asarray(getattr(dataset, name).y)
        negative = y < -1
        if negative.any():
            raise LabelError(f"{what}: {int(negative.sum())} row(s) of the {name} split have the negative "
                                  f"label(s) {_listing(np.unique(y[negative]))}; labels are class indices from 0, "
                                  f"with -1 for an unlabeled row: fix them in {what}")
        if classes is None:  # teachers that record no class count and no probe: checked when they first run
            continue
        beyond = y >= classes
        if beyond.any():
            values = np.unique(y[beyond])
            names = dataset.class_names or []
            named = (f" (the classes {', '.join(repr(names[v]) for v in values[:5] if v < len(names))})"
                     if names and values[0] < len(names) else "")
            raise LabelError(f"{what}: {int(beyond.sum())} row(s) of the {name} split have the label(s) "
                                  f"{_listing(values)}{named} but the teachers in {teacher} predict {classes} "
                                  f"classes (0 to {classes - 1}); drop or relabel those rows, or pass the data the "
                                  f"teachers were trained on")


def _listing(values: np.ndarray, most: int = 5) -> str:
    shown = ", ".join(str(int(v)) for v in values[:most])
    return shown + (f" and {len(values) - most} more" if len(values) > most else "")


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


def channel_chooser(config: RunConfig, ensemble: Ensemble, probe: Probe | None):
    """How an image source's channels are chosen, with the reason the report gives (``split_info["channels"]``):
    ``--channels``; else the teachers' recorded input shape; else the evidence (:func:`channels_from_images`)."""
    def choose(sources: dict) -> tuple[int, str]:
        if config.channels is not None:
            return config.channels, f"{config.channels}: --channels {config.channels}"
        shape = ensemble.input_shape
        if shape and len(shape) == 3 and shape[0] in (1, 3):
            return shape[0], f"{shape[0]}: the teachers' recorded input shape {list(shape)}"
        return channels_from_images(sources, ImageSpec(3, config.resize, config.crop), probe)
    return choose


def channels_from_images(sources: dict, spec: ImageSpec, probe: Probe | None) -> tuple[int, str]:
    """1 or 3 channels for teachers that record no input shape, and why. The images' own modes come first: every
    header read grayscale (:data:`GRAYSCALE_MODES`) prefers 1, any colour 3. With a ``probe``, the teachers then
    settle it: the preferred count if a teacher runs on it at the images' decoded size, else the other if one runs
    on that (grayscale JPEGs for RGB teachers), else the preferred one (validating the teachers names the problem)."""
    modes, rows = _sample_modes(sources)
    gray = bool(modes) and set(modes) <= GRAYSCALE_MODES
    seen = ", ".join(f"{mode} {count}" for mode, count in modes.most_common())
    evidence = (f"every one of the {sum(modes.values())} image headers read is grayscale ({seen})" if gray else
                f"the image headers read show colour ({seen})" if modes else "no image header could be read")
    first, other = (1, 3) if gray else (3, 1)
    size = _decoded_size(sources, rows, spec) if probe is not None else None
    if size is None:
        return first, f"{first}: {evidence}"
    if probe((first, *size)) is not None:
        return first, f"{first}: {evidence}, and the teachers run on {[first, *size]}"
    if probe((other, *size)) is not None:
        return other, f"{other}: {evidence}, but the teachers run on {[other, *size]} only"
    return first, f"{first}: {evidence} (the teachers ran on neither {[first, *size]} nor {[other, *size]})"


def _sample_modes(sources: dict) -> tuple[Counter, list[tuple[str, int]]]:
    """The Pillow modes of up to :data:`MODE_SAMPLE` images spread evenly over every split (headers only, so a
    thousand files take well under a second), and the rows whose header could be read."""
    sizes = np.array([len(source) for source in sources.values()])
    total = int(sizes.sum())
    picks = np.unique(np.linspace(0, total - 1, min(total, MODE_SAMPLE)).round().astype(np.int64))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    names, modes, rows = list(sources), Counter(), []
    with warnings.catch_warnings():  # e.g. Pillow's DecompressionBombWarning: decoding the image deals with it
        warnings.simplefilter("ignore")
        for pick in picks:
            k = int(np.searchsorted(starts, pick, side="right") - 1)  # the split holding flat position ``pick``
            split, i = names[k], int(pick - starts[k])
            mode = sources[split].mode(i)
            if mode is not None:
                modes[mode] += 1
                rows.append((split, i))
    return modes, rows


def _decoded_size(sources: dict, rows: list[tuple[str, int]], spec: ImageSpec) -> tuple[int, int] | None:
    """(H, W) of the first of ``rows`` (up to five tried) that decodes as ``spec`` says: what a probe runs on."""
    for split, i in rows[:5]:
        try:
            return tuple(sources[split].decode(i, spec).shape[1:])  # type: ignore[return-value]
        except Exception:  # an unreadable image is named when the images are decoded; try the next
            continue
    return None


def image_spec(config: RunConfig, ensemble: Ensemble) -> ImageSpec:
    """How an image folder is decoded: --channels (default: the teachers' input channels, else RGB, until
    :func:`channel_chooser` decides from the images), --resize, --crop."""
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
