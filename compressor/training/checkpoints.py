"""The training loop's checkpoints: ``last.pt`` after every epoch (enough alone to resume) and ``best.pt`` when an
epoch beats every earlier one, written atomically, read with ``torch.load(..., weights_only=True)`` (plain
containers and tensors only), and refused with the fix when they were written under other settings.

``last.pt``: ``format``, ``epoch``, ``model_state``, ``optimizer_state``, ``scheduler_state``, ``best_epoch``,
``best_val_accuracy``, ``best_model_state``, ``history``, ``rng_state`` (and ``cuda_rng_state``), ``config``
(``asdict``) and ``fingerprint``. ``best.pt``: ``format``, ``epoch``, ``val_accuracy``, ``model_state``,
``fingerprint``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from compressor.core.errors import CompressorError
from compressor.core.fileio import atomic_path

CHECKPOINT_FORMAT = "compressor.distill/1"  # the name the loop had when the format was fixed
LAST_NAME = "last.pt"
BEST_NAME = "best.pt"

# Config fields that do not change what is computed, so a resumed run may differ in them.
_COSMETIC_CONFIG_KEYS = frozenset({"progress"})
# What resuming reads from last.pt besides the settings.
_RESUME_KEYS = ("epoch", "model_state", "optimizer_state", "scheduler_state", "best_epoch", "best_val_accuracy",
                "best_model_state", "history", "rng_state")


def json_safe(obj: dict | None) -> dict:
    """A deep copy of ``obj`` made only of dicts, lists, str, numbers, bool and None."""
    try:
        return json.loads(json.dumps(obj or {}))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"fingerprint must be JSON-safe: {exc}") from exc


def _diff_keys(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (a whole non-dict value counts as one key)."""
    if not (isinstance(saved, dict) and isinstance(current, dict)):
        return [] if saved == current else [prefix or "<root>"]
    out: list[str] = []
    for key in sorted(set(saved) | set(current), key=str):
        name = f"{prefix}.{key}" if prefix else str(key)
        if key not in saved or key not in current:
            out.append(name)
        else:
            out.extend(_diff_keys(saved[key], current[key], name))
    return out


def cpu_state(model: nn.Module) -> dict[str, Tensor]:
    """A CPU copy of ``model``'s state dict (kept as the best epoch's weights)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def save_checkpoint(obj: dict, path: Path) -> None:
    """Write ``obj`` to ``path`` atomically: a killed run leaves the previous checkpoint, never half of one."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def remove_partial_writes(checkpoint_dir: Path) -> None:
    """Delete temporary files a killed run left mid-write (never read: checkpoints are renamed into place whole)."""
    for name in (LAST_NAME, BEST_NAME):
        for partial in checkpoint_dir.glob(f".{name}.*.tmp"):
            partial.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict:
    """Read a training checkpoint without unpickling code; refuse an unreadable or foreign file in one line."""
    try:
        with warnings.catch_warnings():  # torch warns of a foreign pickle protocol: the error below says it all
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types; any of them means the same to the user
        raise CompressorError(
            f"checkpoint {path} cannot be read ({type(exc).__name__}: truncated, or not a training checkpoint); "
            f"delete it, use a new --out or drop --resume") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CompressorError(
            f"checkpoint {path} is not a {CHECKPOINT_FORMAT} training checkpoint; use a new --out or drop --resume"
        )
    return ckpt


def _known(saved: Any, current: Any) -> Any:
    """``saved`` cut to the keys ``current`` holds, at every depth (a partial fingerprint's share)."""
    if not (isinstance(saved, dict) and isinstance(current, dict)):
        return saved
    return {key: _known(saved[key], current[key]) for key in current if key in saved}


def check_compatible(path: Path, ckpt: dict, config: dict | None, fingerprint: dict, defaults: dict,
                     partial: bool = False) -> None:
    """Refuse to resume from ``ckpt`` when its training settings or fingerprint differ from this run's; a setting
    added after the checkpoint was written took its value in ``defaults`` then. ``partial``: ``fingerprint`` holds
    only what is known yet (before the teachers run), and only that is compared; ``config`` None skips the
    settings (a tuning trial's own)."""
    saved_cfg = {**defaults, **ckpt.get("config", {})}
    saved_cfg = {k: v for k, v in saved_cfg.items() if k not in _COSMETIC_CONFIG_KEYS}
    cur_cfg = saved_cfg if config is None else {k: v for k, v in config.items() if k not in _COSMETIC_CONFIG_KEYS}
    saved_fingerprint = ckpt.get("fingerprint", {})
    if partial:
        saved_fingerprint = _known(saved_fingerprint, fingerprint)
    differing = _diff_keys(saved_cfg, cur_cfg) + [f"fingerprint.{k}"
                                                  for k in _diff_keys(saved_fingerprint, fingerprint)]
    if differing:
        raise CompressorError(
            f"checkpoint {path} was written with different settings ({', '.join(differing)}); "
            "use a new --out or drop --resume"
        )


def check_fits(path: Path, ckpt: dict, student: nn.Module) -> None:
    """Refuse, before any work, a ``last.pt`` that lacks what resuming reads or whose weights do not fit
    ``student`` (the same names and shapes); the student itself is left untouched."""
    missing = [key for key in _RESUME_KEYS if key not in ckpt]
    state = ckpt.get("model_state") if isinstance(ckpt.get("model_state"), dict) else {}
    expected = {name: tuple(t.shape) for name, t in student.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in state.items() if isinstance(t, Tensor)}
    wrong = sorted(name for name in set(expected) | set(found) if expected.get(name) != found.get(name))
    if missing or wrong:
        what = f"has no {', '.join(missing)}" if missing else f"holds other weights ({', '.join(wrong[:3])})"
        raise CompressorError(f"checkpoint {path} {what}, so this student cannot resume from it; use a new --out "
                              f"or drop --resume")
