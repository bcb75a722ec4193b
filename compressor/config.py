"""Every knob of a run, with its default, in one frozen dataclass. The CLI fills it; the pipeline reads it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

PRECISIONS = ("fp32", "fp16", "int8")  # each target offers a subset (targets.base.TARGETS)
LOSSES = ("kd", "dkd", "ls", "dist")  # --loss: compressor.kernels.VARIANTS (tests/test_cli.py holds them equal)


@dataclass(frozen=True)
class RunConfig:
    """One ``compress`` run. Paths are as the user gave them; ``out=None`` means ./compressed/<stem>-<target>."""

    teacher: Path
    target: str = "onnxruntime"
    data: str | None = None               # None: the ensemble's dataset hint, else "digits"
    student: str = "auto"                 # auto: measured on the data (training/selection.py); cnn | mlp: sized
    student_budget: float = 0.25          # bare cnn / mlp: at most this share of the median member's multiply-adds
    min_speedup: float = 2.0              # auto: at least this many times faster than the best member at batch 1
    max_params: int | None = None         # auto, cnn, mlp: at most this many parameters
    max_latency_ms: float | None = None   # auto, cnn, mlp: at most this many ms per batch-1 call on the target
    screen_trials: int | None = None      # auto: screen this many candidates instead of as many as the budget fits
    budget: float = 10.0                  # minutes of training (choosing, distilling, tuning): training/budget.py
    student_weights: Path | None = None   # a .safetensors file to initialise the student from (matching tensors)
    out: Path | None = None
    temperature: float = 4.0              # Hinton et al. use 1-20; 2-4 suits small students
    alpha: float = 0.9                    # weight of the soft (T²-scaled KL) term
    loss: str = "kd"                      # the soft term: kd (Hinton's), dkd, ls, dist (compressor/kernels)
    beta: float = 8.0                     # dkd's weight on the non-target classes
    epochs: int | None = None             # None: as many as --budget buys (training/budget.py: epoch_cap)
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    precision: str = "fp32"
    max_accuracy_drop: float = 1.0        # int8 parity gate, in percentage points of test accuracy
    seed: int = 0
    normalise: tuple[tuple[float, ...], tuple[float, ...]] | None = None   # (mean, std) per channel
    max_train: int | None = None          # cap on each split, for quick runs
    channels: int | None = None           # image folders: 1 or 3; None = from the evidence (loading.channel_chooser)
    resize: int | None = None             # image folders: the shorter side resized to this many pixels
    crop: int | None = None               # image folders: then a centred square of this many pixels
    on_bad_image: str = "stop"            # image folders: stop | skip an image that cannot be read
    input_columns: str | None = None      # hf: / parquet: data: the image column, or the token columns (text)
    label_column: str | None = None       # hf: / parquet: data: the label column (default: label)
    seq_len: int | None = None            # text: the benchmark's sequence length; None = the data's median length
    trust_pickle: bool = False
    resume: bool = False
    batch_sizes: tuple[int, ...] = (1, 64)
    warmup_s: float = 0.2                 # benchmark warm-up per row and batch size
    duration_s: float = 1.0               # benchmark measurement per row and batch size, over all rounds
    rounds: int = 2                       # interleaved benchmark rounds; their medians must agree within 10%
    baseline: bool = False                # also train the student's architecture on hard labels alone
    teachers_saw_val: bool = False        # the teachers trained on the validation rows: diagnose on half of test
    teacher_cache: Path | None = None     # teacher-logit cache folder; None = $COMPRESSOR_CACHE_DIR or ~/.cache/...
    no_cache: bool = False                # run the teachers on every training batch instead of reading the cache
    refresh_teacher_cache: bool = False   # recompute and replace this run's cache entry
    teacher_precision: str = "fp32"       # fp32 | bf16: autocast the PyTorch teachers' forward passes
    cache_top_k: int | None = None        # cache only each member's K largest transfer-set logits (large C)
    unlabeled: bool = False               # ignore the transfer set's labels: soft targets only (alpha 1)
    omit_classes: str | None = None       # classes left out of the transfer set, e.g. "3" or "dress,coat"
    bias_fix: str = "auto"                # auto | none | FLOAT: raise the omitted classes' output biases
    amp: str = "none"                     # none | bf16: autocast the student's forward pass while training
    device: str = "auto"                  # auto | cpu | cuda: where the student trains
    ort_provider: str = "auto"            # auto | cpu | cuda | tensorrt: ONNX Runtime's execution provider
    recipe: str = "hinton"                # hinton | consistent | function-matching (compressor/recipes.py) | auto
    tune: float | None = None             # minutes of successive halving on validation (compressor/tuning.py)
    tune_trials: int | None = None        # trials per family, instead of as many as the budget fits
    threads: int | None = None            # intra-op threads for ORT and PyTorch; None = library default
    progress: bool = True
    command: str = ""                     # the exact command line, recorded in the report
    extra: dict = field(default_factory=dict)

    def output_dir(self) -> Path:
        """Where artifacts land: ``out`` or ./compressed/<teacher-stem>-<target>."""
        return Path(self.out) if self.out else Path("compressed") / f"{Path(self.teacher).stem}-{self.target}"

    @property
    def tuned(self) -> bool:
        """Whether the run searches its settings on validation: --tune MINUTES or --recipe auto."""
        return self.tune is not None or self.recipe == "auto"

    def to_dict(self) -> dict:
        """JSON-safe form for the report."""
        values = asdict(self)
        values["teacher"] = str(self.teacher)
        values["teacher_cache"] = None if self.teacher_cache is None else str(self.teacher_cache)
        values["student_weights"] = None if self.student_weights is None else str(self.student_weights)
        values["out"] = str(self.output_dir())
        return values


@dataclass(frozen=True)
class SpecialistsConfig:
    """One ``compress specialists`` run. ``teacher`` is the generalist file (the name ``load_data`` reads)."""

    teacher: Path
    out: Path
    num_specialists: int = 2
    data: str | None = None
    subsets: str | None = None        # "shirt,t-shirt;sandal,sneaker": overrides the clustering
    clusters: int | None = None       # K-means clusters; None = num_specialists + 1
    top_n: int = 1                    # the generalist's top-n classes select the active specialists
    jobs: int = 1                     # specialists trained at once, one process each
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3                  # fine-tuning from the generalist's weights
    weight_decay: float = 1e-4
    seed: int = 0
    max_train: int | None = None
    normalise: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    trust_pickle: bool = False
    device: str = "auto"
    progress: bool = True
    command: str = ""
    # image folders, as for the main job (compressor.data.loading reads these)
    channels: int | None = None
    resize: int | None = None
    crop: int | None = None
    on_bad_image: str = "stop"
    input_columns: str | None = None
    label_column: str | None = None
    teacher_cache: Path | None = None
