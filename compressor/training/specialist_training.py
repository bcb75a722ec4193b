"""``compress specialists``: build a specialist ensemble from a generalist (Hinton, Vinyals & Dean 2015, §5).

Steps, each resumable:

1. load the generalist (any teacher file ``compress`` accepts) and the data; run it over the transfer set;
2. the subsets: ``--subsets`` by name, or K-means on the covariance of its predictions (:func:`find_subsets`);
3. ``plan.json``: everything a specialist's training depends on, written once; a rerun must match it;
4. one process per specialist (``--jobs`` at a time), each started from the generalist's weights and trained on a
   set that is half its subset and half the rest, with a dustbin class, checkpointing every epoch into its own
   folder; a killed process loses only its own unfinished epochs, and a rerun trains only what is missing;
5. the dustbin correction, then one ensemble archive, ``ensemble.pt``, that ``compress --teacher`` accepts, with
   ``combine="specialists"``, and ``summary.json`` scoring the generalist against the specialist ensemble.

Files in ``--out``: ``ensemble.pt``, ``summary.json``, ``plan.json``, and per specialist ``specialists/<m>/``:
``specialist.pt`` (TorchScript, :class:`ExpandedSpecialist`, written when it finished), ``specialist.json``,
``checkpoints/`` and ``log.txt`` (the process's output).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from compressor.data.loading import load_data, to_tensors
from compressor.config import SpecialistsConfig
from compressor.training.loop import TrainConfig, train_student
from compressor.core.inference import predict_logits
from compressor.core.errors import CompressorError, first_line
from compressor.core.fileio import atomic_path, write_json_atomic
from compressor.training.losses import HardLabelLoss
from compressor.teachers.specialists import (COMBINE, ExpandedSpecialist, Specialist, active_specialists, dustbin_shift,
                                    find_subsets, parse_subsets, subset_masks)
from compressor.teachers.ensemble import Ensemble
from compressor.teachers.formats import load_ensemble, save_ensemble

PLAN = "plan.json"
TRAINED_FRACTION = 0.5   # the share of a specialist's training rows drawn from its subset (the paper's half)


def run_specialists(config: SpecialistsConfig, console: Console | None = None) -> dict:
    """Build (or finish building) the specialist ensemble of ``config`` and return its summary."""

    console = console or Console(stderr=True)
    started = time.perf_counter()
    if config.jobs < 1 or config.epochs < 1 or config.top_n < 1:
        raise CompressorError("--jobs, --epochs and --top-n must be at least 1")
    generalist = load_ensemble(config.teacher, trust_pickle=config.trust_pickle)
    untrainable = [m.name for m in generalist.members if not isinstance(m.forward, torch.nn.Module)]
    if untrainable:
        raise CompressorError(f"--generalist {config.teacher}: members {untrainable} are ONNX files, which cannot "
                              f"be fine-tuned into specialists; pass the generalist as TorchScript")
    if generalist.combine == COMBINE:
        raise CompressorError(f"--generalist {config.teacher} is already a specialist ensemble; pass its generalist")
    dataset, normalisation = load_data(config, generalist)
    tensors = to_tensors(dataset, normalisation)
    generalist.validate(tensors.x_val[:8], f"--data {dataset.source}")
    if not dataset.labelled:
        raise CompressorError(f"--data {dataset.source} has no labels; specialists train on their subset's labels")
    num_classes = generalist.num_classes
    class_names = generalist.class_names or dataset.class_names
    if config.num_specialists >= num_classes or config.num_specialists < 1:
        raise CompressorError(f"--num-specialists {config.num_specialists}: give between 1 and {num_classes - 1} "
                              f"for {num_classes} classes (each specialist covers a few of them)")
    if config.subsets:
        subsets, found = parse_subsets(config.subsets, class_names, num_classes), {"method": "--subsets"}
        if len(subsets) != config.num_specialists:
            raise CompressorError(f"--subsets names {len(subsets)} subsets but --num-specialists is "
                                  f"{config.num_specialists}; make them agree")
    else:
        with console.status("running the generalist over the transfer set"):
            probs = generalist.log_probs(generalist.member_logits(tensors.x_train)).exp()  # (N, C)
        subsets, found = find_subsets(probs, config.num_specialists, config.clusters, config.seed)
    plan = _plan(config, generalist, dataset, subsets, class_names)
    _write_plan(config.out, plan)
    for m, subset in enumerate(subsets, start=1):
        console.print(f"[bold]specialist {m}[/] {', '.join(_names(subset, class_names))}")

    t_train = time.perf_counter()
    trained = _train_all(config, len(subsets), console)
    train_seconds = time.perf_counter() - t_train
    records = [json.loads((_folder(config.out, m) / "specialist.json").read_text())
               for m in range(1, len(subsets) + 1)]
    models = [_generalist_module(generalist)] + [_load_specialist(_folder(config.out, m) / "specialist.pt")
                                                 for m in range(1, len(subsets) + 1)]
    specialists_meta = {"generalist": str(config.teacher), "subsets": [list(s) for s in subsets],
                        "subset_names": [_names(s, class_names) for s in subsets], "top_n": config.top_n,
                        "found": found, "trained_fraction": TRAINED_FRACTION,
                        "natural_fraction": [r["natural_fraction"] for r in records],
                        "dustbin_shift": [r["dustbin_shift"] for r in records]}
    metadata = {"class_names": class_names, "normalisation": generalist.normalisation if config.normalise is None
                else {"mean": list(config.normalise[0]), "std": list(config.normalise[1])},
                "dataset": config.data or generalist.metadata.get("dataset"), "combine": COMBINE,
                "specialists": specialists_meta,
                "member_names": ["generalist"] + [f"specialist-{m}" for m in range(1, len(subsets) + 1)]}
    path = save_ensemble(models, config.out / "ensemble.pt", tensors.x_test[:2], metadata)
    ensemble = load_ensemble(path)
    summary = {"command": config.command, "config": _jsonable(asdict(config)), "ensemble": str(path),
               "subsets": specialists_meta["subset_names"], "specialists": records,
               "trained_now": trained, "training_seconds": round(train_seconds, 2),
               "specialist_seconds_sum": round(sum(r["seconds"] for r in records), 2),
               "test": score_specialists(ensemble, ensemble.member_logits(tensors.x_test), tensors.y_test.numpy(),
                                         config.seed),
               "seconds_total": round(time.perf_counter() - started, 2)}
    write_json_atomic(config.out / "summary.json", summary)
    return summary


def score_specialists(ensemble: Ensemble, member_logits: torch.Tensor, labels: np.ndarray, seed: int = 0) -> dict:
    """The generalist alone against the specialist ensemble on labelled rows: overall, on the specialists' classes,
    and by the number of specialists active per row (the paper's Table 4), with paired bootstrap 95% intervals of
    the accuracy change. ``member_logits`` (1 + M, N, C)."""
    from compressor.core.metrics import paired_bootstrap

    keep = labels >= 0
    logits, y = member_logits[:, keep], labels[keep]
    subsets = ensemble.specialist_subsets
    generalist = logits[0].argmax(1).numpy() == y  # (n,)
    combined = ensemble.log_probs(logits).argmax(1).numpy() == y  # (n,)
    masks = subset_masks(subsets, logits.shape[-1], logits[0])
    active = active_specialists(logits[0], masks, int(ensemble.metadata["specialists"].get("top_n", 1)))
    count = active.sum(1).numpy().astype(int)  # (n,)
    covered = np.isin(y, [c for s in subsets for c in s])

    def compare(rows: np.ndarray) -> dict:
        if not rows.any():
            return {"examples": 0}
        a, b = generalist[rows], combined[rows]
        low, high = paired_bootstrap(b.astype(float) - a.astype(float), seed)
        return {"examples": int(rows.sum()), "generalist_top1": float(a.mean()), "specialists_top1": float(b.mean()),
                "change": float(b.mean() - a.mean()), "change_interval_95": [low, high]}

    return {"all": compare(np.ones_like(y, dtype=bool)), "specialist_classes": compare(covered),
            "by_active": {str(k): compare(count == k) for k in sorted(set(count.tolist()))}}


def _plan(config, generalist: Ensemble, dataset, subsets, class_names) -> dict:
    training = {key: getattr(config, key) for key in ("epochs", "batch_size", "lr", "weight_decay", "seed",
                                                        "max_train", "device")}
    return {"format": "compressor.specialists/1", "generalist": str(Path(config.teacher).resolve()),
            "generalist_sha256": generalist.fingerprint(), "data": config.data, "data_sha256": dataset.fingerprint(),
            "normalise": config.normalise, "trust_pickle": config.trust_pickle, "num_classes": generalist.num_classes,
            "subsets": [list(s) for s in subsets], "subset_names": [_names(s, class_names) for s in subsets],
            "training": training, "trained_fraction": TRAINED_FRACTION}


def _write_plan(out: Path, plan: dict) -> None:
    path = out / PLAN
    if path.exists():
        saved = json.loads(path.read_text())
        if json.loads(json.dumps(plan)) != saved:
            changed = sorted(k for k in set(plan) | set(saved) if json.loads(json.dumps(plan.get(k))) != saved.get(k))
            raise CompressorError(f"{path} was written for other settings ({', '.join(changed)} differ); rerun with "
                                  f"the same options to finish it, or choose another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, plan)


def _folder(out: Path, m: int) -> Path:
    return Path(out) / "specialists" / str(m)


def _train_all(config: SpecialistsConfig, count: int, console: Console) -> list[int]:
    """Train every specialist without a finished ``specialist.pt``, ``--jobs`` processes at a time; the numbers
    trained now. A process that fails costs only its own specialist: the others finish, then one error says which."""
    missing = [m for m in range(1, count + 1) if not (_folder(config.out, m) / "specialist.pt").exists()]
    done = sorted(set(range(1, count + 1)) - set(missing))
    if done:
        console.print(f"[bold]specialists[/] reusing {done} (finished in an earlier run)")
    threads = max(1, (os.cpu_count() or 1) // min(config.jobs, max(len(missing), 1)))
    running: dict[int, tuple[subprocess.Popen, object]] = {}
    failed: dict[int, int] = {}
    pending = list(missing)
    try:
        while pending or running:
            while pending and len(running) < config.jobs:
                m = pending.pop(0)
                folder = _folder(config.out, m)
                folder.mkdir(parents=True, exist_ok=True)
                log = open(folder / "log.txt", "a")
                command = [sys.executable, "-m", "compressor.training.specialist_training", str(config.out), str(m),
                           str(threads)]
                running[m] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log)
                console.print(f"[bold]specialist {m}[/] training (process {running[m][0].pid}, log {folder}/log.txt)")
            for m, (process, log) in list(running.items()):
                if process.poll() is not None:
                    log.close()
                    del running[m]
                    if process.returncode:
                        failed[m] = process.returncode
                        console.print(f"[red]specialist {m}[/] failed (exit {process.returncode})")
                    else:
                        console.print(f"[bold]specialist {m}[/] done")
            time.sleep(0.2)
    finally:
        for process, log in running.values():  # interrupted: stop the children, their checkpoints stay
            process.terminate()
            process.wait()
            log.close()
    if failed:
        details = "; ".join(f"specialist {m} exit {code}: {_last_line(_folder(config.out, m) / 'log.txt')}"
                            for m, code in failed.items())
        raise CompressorError(f"{len(failed)} of {count} specialists did not finish ({details}); the others are "
                              f"kept in {config.out}/specialists and their checkpoints too: rerun the same command "
                              f"to train only what is missing")
    return missing


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()] if path.exists() else []
    return lines[-1][-200:] if lines else "no output"


def train_specialist(out: Path, m: int, threads: int | None = None) -> dict:
    """Train specialist ``m`` of the plan in ``out`` (resuming its checkpoint), apply the dustbin correction and
    write ``specialist.pt`` and ``specialist.json`` atomically. What each worker process runs."""

    plan = json.loads((Path(out) / PLAN).read_text())
    training = plan["training"]
    if threads:
        torch.set_num_threads(threads)
    subset = tuple(plan["subsets"][m - 1])
    source = SpecialistsConfig(teacher=Path(plan["generalist"]), out=Path(out), data=plan["data"],
                               seed=training["seed"], max_train=training["max_train"],
                               normalise=plan["normalise"] and tuple(tuple(v) for v in plan["normalise"]),
                               trust_pickle=plan["trust_pickle"])
    generalist = load_ensemble(source.teacher, trust_pickle=source.trust_pickle)
    if generalist.fingerprint() != plan["generalist_sha256"]:
        raise CompressorError(f"{source.teacher} changed since {out}/{PLAN} was written; choose another --out")
    dataset, normalisation = load_data(source, generalist)
    tensors = to_tensors(dataset, normalisation)
    num_classes = plan["num_classes"]
    seed = training["seed"] + m
    x, y, natural = _half_and_half(tensors.x_train, tensors.y_train, subset, seed)
    x_val, y_val, _ = _half_and_half(tensors.x_val, tensors.y_val, subset, seed)
    torch.manual_seed(seed)
    specialist = Specialist(_generalist_module(generalist), subset, num_classes)
    device = _device(training["device"], m)
    specialist.to(device)
    folder = _folder(out, m)
    config = TrainConfig(epochs=training["epochs"], batch_size=training["batch_size"], lr=training["lr"],
                         weight_decay=training["weight_decay"], seed=seed, progress=False)
    result = train_student(specialist, x, y, None, x_val, y_val, HardLabelLoss(), config, folder / "checkpoints",
                           resume=True, fingerprint={"plan": plan, "specialist": m})
    specialist.cpu()
    shift = dustbin_shift(natural, TRAINED_FRACTION)
    nll_before = _natural_nll(specialist, tensors.x_val, tensors.y_val, subset)
    specialist.shift.fill_(shift)
    nll_after = _natural_nll(specialist, tensors.x_val, tensors.y_val, subset)
    record = {"specialist": m, "subset": list(subset), "natural_fraction": natural, "dustbin_shift": shift,
              "best_epoch": result.best_epoch, "balanced_val_accuracy": result.best_val_accuracy,
              "natural_val_nll_before_shift": nll_before, "natural_val_nll_after_shift": nll_after,
              "seconds": round(result.seconds, 2), "resumed_from_epoch": result.resumed_from_epoch,
              "threads": torch.get_num_threads(), "device": str(device)}
    expanded = ExpandedSpecialist(specialist, num_classes).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript deprecation: still the archive's member format
        scripted = torch.jit.script(expanded)
        with atomic_path(folder / "specialist.pt") as tmp:
            torch.jit.save(scripted, str(tmp))
    write_json_atomic(folder / "specialist.json", record)
    return record


def _half_and_half(x: torch.Tensor, y: torch.Tensor, subset: tuple[int, ...], seed: int):
    """Rows of ``x`` relabelled for a specialist (subset classes 0..S-1, the rest S, the dustbin), drawn so that
    half are from its subset (the smaller side repeated, in a seeded order); and the subset's natural share."""
    labelled = y >= 0
    x, y = x[labelled], y[labelled]
    inside = torch.isin(y, torch.tensor(subset))
    rows_in, rows_out = torch.nonzero(inside).flatten(), torch.nonzero(~inside).flatten()
    if not len(rows_in) or not len(rows_out):
        raise CompressorError(f"the data has no rows {'in' if not len(rows_in) else 'outside'} the subset "
                              f"{list(subset)}; a specialist needs both")
    n = max(len(rows_in), len(rows_out))
    generator = torch.Generator().manual_seed(seed)

    def tile(rows):
        repeats = [rows[torch.randperm(len(rows), generator=generator)] for _ in range(-(-n // len(rows)))]
        return torch.cat(repeats)[:n]

    rows = torch.cat([tile(rows_in), tile(rows_out)])  # (2n,)
    return x[rows], _relabel(y[rows], subset), float(inside.double().mean())


def _relabel(y: torch.Tensor, subset: tuple[int, ...]) -> torch.Tensor:
    """Labels (N,) ≥ 0 as a specialist reads them: subset[j] → j, every other class → len(subset), the dustbin."""
    relabel = torch.full((max(int(y.max()), *subset) + 1,), len(subset), dtype=torch.long)
    relabel[list(subset)] = torch.arange(len(subset))
    return relabel[y]


@torch.no_grad()
def _natural_nll(specialist: Specialist, x: torch.Tensor, y: torch.Tensor, subset: tuple[int, ...]) -> float:
    """The specialist's negative log-likelihood on the natural class mix (labelled rows of ``x``): lower after the
    dustbin correction when the correction calibrates it."""
    labelled = y >= 0
    logits = predict_logits(specialist, x[labelled])  # (n, S + 1)
    return float(torch.nn.functional.cross_entropy(logits, _relabel(y[labelled], subset)))


def _generalist_module(generalist: Ensemble) -> torch.nn.Module:
    """The generalist as one module (N, ...) → (N, C): its member, or its mixture's log-probabilities."""
    return generalist.members[0].forward if len(generalist.members) == 1 else generalist.eager_module()


def _load_specialist(path: Path) -> torch.nn.Module:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:
        raise CompressorError(f"{path} could not be loaded ({first_line(exc)}); delete it and rerun to retrain "
                              f"that specialist") from exc


def _device(choice: str, m: int) -> torch.device:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise CompressorError("--device cuda: no CUDA device is visible; use --device cpu")
    return torch.device("cuda", (m - 1) % torch.cuda.device_count())  # spread the processes over the GPUs


def _names(subset, class_names) -> list[str]:
    return [class_names[c] if class_names else str(c) for c in subset]


def _jsonable(values: dict) -> dict:
    return json.loads(json.dumps(values, default=str))


def _worker(argv: list[str]) -> int:
    """``python -m compressor.training.specialist_training OUT M [THREADS]``: one specialist's process."""
    out, m = Path(argv[0]), int(argv[1])
    threads = int(argv[2]) if len(argv) > 2 else None
    try:
        record = train_specialist(out, m, threads)
    except CompressorError as exc:
        print(f"error: {exc}", flush=True)
        return exc.exit_code
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
