"""The report's comparison: every model it compares, scored on the same test split and timed by the same harness.

This is the pipeline's benchmark step, split out of ``pipeline.py`` to keep that file a table of contents; like
the pipeline it joins the training package (``Ensemble``, students) to ``targets`` (the harness and runners).

Rows, in the order the report prints them (DESIGN.md, Benchmark and report):

- the ensemble in PyTorch eager, and exported to the target (the same members through the same backend, so the
  report can separate what distillation buys from what the backend buys);
- each member in PyTorch eager;
- the hard-label baseline (the student's architecture trained on the labels alone, same budget), when asked;
- for a specialist ensemble (paper §5), its generalist as the one member row, and the same student distilled from
  the generalist alone (same budget), so the report shows what the specialists add;
- the distilled student in PyTorch eager and on the target.

Each row says what its timing covers (``timed``). PyTorch rows run on CUDA when a GPU is visible (host latency
plus H2D / compute / D2H device times from CUDA events) and on the CPU otherwise; runner rows time the runner's
``infer`` on a numpy batch, copies included. All rows go through :func:`targets.benchmark.sweep` in interleaved
rounds, so a busy spell of the machine cannot favour one row.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from compressor.distill import TrainResult
from compressor.teachers import Ensemble
from targets.benchmark import Measure, classification_metrics, measure_latency

EAGER = "PyTorch eager"


@dataclass
class Row:
    """One model on one backend: its test-split scores (N, C) and how to time it."""

    model: str         # what a person reads: "ensemble", "member cnn", "baseline", "student"
    kind: str          # "ensemble" | "member" | "baseline" | "student"
    backend: str       # "PyTorch eager" or the target's name
    device: str        # "cpu" | "cuda"
    precision: str
    parameters: int
    timed: str         # what one timed call covers
    scores: np.ndarray  # (N, C) logits or log-probabilities on the test split
    measure: Measure

    def describe(self, labels: np.ndarray, reference: np.ndarray) -> dict:
        """The row's report entry without latency: identity, what was timed, and accuracy against the ensemble."""
        accuracy = classification_metrics(self.scores, labels, reference)
        accuracy["kl_to_ensemble"] = accuracy.pop("kl_to_reference")
        return {"model": self.model, "kind": self.kind, "backend": self.backend, "device": self.device,
                "precision": self.precision, "parameters": self.parameters, "timed": self.timed,
                "accuracy": accuracy}


def eager_device(ensemble: Ensemble) -> str:
    """Where the PyTorch rows run: CUDA when visible and every member is a PyTorch module, else the CPU."""
    return "cuda" if torch.cuda.is_available() and _all_modules(ensemble) else "cpu"


def _all_modules(ensemble: Ensemble) -> bool:
    """Whether every member is a PyTorch module (not an ONNX file run by onnxruntime)."""
    return all(isinstance(member.forward, torch.nn.Module) for member in ensemble.members)


def eager_measure(forward: Callable[[torch.Tensor], torch.Tensor], pool: np.ndarray,
                  device: str) -> tuple[Measure, str]:
    """A Measure for a PyTorch callable on ``device`` and the sentence saying what it times."""
    if device == "cuda":
        from targets.cuda_timing import measure_cuda_latency

        def measure(batch, warmup_s, duration_s):
            return measure_cuda_latency(forward, pool, batch, warmup_s, duration_s)
        return measure, ("PyTorch eager on CUDA: host wall time of pinned-host → device copy, forward and copy back "
                         "(device stages from CUDA events)")

    @torch.no_grad()  # not inference_mode: a TorchScript member that already ran outside it fails inside it
    def call(x: np.ndarray):
        return forward(torch.from_numpy(x))

    def measure(batch, warmup_s, duration_s):
        return measure_latency(call, pool, batch, warmup_s, duration_s)
    return measure, "PyTorch eager on the CPU: host wall time of the forward pass on a CPU tensor"


def runner_measure(runner, pool: np.ndarray) -> tuple[Measure, str]:
    """A Measure for an exported model's runner: host wall time of ``infer`` on a numpy batch."""
    def measure(batch, warmup_s, duration_s):
        return measure_latency(runner.infer, pool, batch, warmup_s, duration_s)
    return measure, f"{runner.name}: host wall time of infer() on a numpy batch, the backend's own copies included"


def on_device(module: torch.nn.Module, device: str) -> torch.nn.Module:
    """``module`` itself on the CPU, an eval-mode copy on CUDA (the trained student stays where it is)."""
    return module.eval() if device == "cpu" else copy.deepcopy(module).to(device).eval()


def ensemble_rows(ensemble: Ensemble, member_logits: torch.Tensor, pool: np.ndarray, device: str,
                  target: str, runner=None, x_test: np.ndarray | None = None) -> list[Row]:
    """The ensemble in PyTorch, on the target (when exported), and each member in PyTorch.

    ``member_logits`` (K, N, C) are the members' test-split logits, already computed once by the pipeline.
    """
    scores = ensemble.log_probs(member_logits).numpy()  # (N, C)
    if _all_modules(ensemble):
        forward = on_device(ensemble.eager_module(), device)
    else:  # ONNX members run by onnxruntime: the same mixture, without member_logits' chunking and NaN checks
        def forward(x):
            return ensemble.log_probs(torch.stack([member(x).float() for member in ensemble.members]))
    measure, timed = eager_measure(forward, pool, device)
    rows = [Row("ensemble", "ensemble", EAGER, device, "fp32", ensemble.parameters,
                f"{timed}; all {len(ensemble.members)} members and the mixture", scores, measure)]
    if runner is not None:
        measure, timed = runner_measure(runner, pool)
        rows.append(Row("ensemble", "ensemble", target, runner.info.get("device", "cpu"), "fp32",
                        ensemble.parameters, timed, runner.infer(x_test), measure))
    # a specialist's (N, C) output spreads its dustbin over the other classes, so only the generalist is a row
    members = ensemble.members[:1] if ensemble.specialist_subsets is not None else ensemble.members
    for k, member in enumerate(members):
        forward = on_device(member.forward, device) if device == "cuda" else member
        measure, timed = eager_measure(forward, pool, device)
        rows.append(Row(f"member {member.name}", "member", EAGER, device, "fp32", member.parameters, timed,
                        member_logits[k].numpy(), measure))
    return rows


def student_rows(kind: str, student: torch.nn.Module, scores: np.ndarray, pool: np.ndarray, device: str,
                 target: str | None = None, runners: list[tuple[object, str]] = (),
                 x_test: np.ndarray | None = None, label: str | None = None) -> list[Row]:
    """A student (``kind`` "student", "baseline" or "generalist-student") in PyTorch eager, then on the target per
    (runner, precision); ``label`` is what the report calls it (default: ``kind``)."""
    parameters = sum(p.numel() for p in student.parameters())
    label = label or kind
    measure, timed = eager_measure(on_device(student, device), pool, device)
    rows = [Row(label, kind, EAGER, device, "fp32", parameters, timed, scores, measure)]
    for runner, precision in runners:
        measure, timed = runner_measure(runner, pool)
        rows.append(Row(label, kind, target, runner.info.get("device", "cpu"), precision, parameters, timed,
                        runner.infer(x_test), measure))
    return rows


BOOTSTRAP_RESAMPLES = 2000  # paired resamples of the test rows for the interval of the gain kept
BOOTSTRAP_CHUNK = 250       # resamples drawn at a time, so memory stays at CHUNK x N indices


def bootstrap_means(values: np.ndarray, seed: int = 0) -> np.ndarray:
    """Means of ``values`` (V, n) over BOOTSTRAP_RESAMPLES paired resamples of the n columns: (V, R). Paired: every
    row of ``values`` is resampled with the same column indices, so differences between rows keep their pairing."""
    rng = np.random.default_rng(seed)
    n = values.shape[1]
    means = []
    for start in range(0, BOOTSTRAP_RESAMPLES, BOOTSTRAP_CHUNK):
        idx = rng.integers(0, n, (min(BOOTSTRAP_CHUNK, BOOTSTRAP_RESAMPLES - start), n))  # (R, n)
        means.append(values[:, idx].mean(axis=2))  # (V, R)
    return np.concatenate(means, axis=1)  # (V, R)


def paired_bootstrap(differences: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """The 95% interval of the mean of per-row ``differences`` (n,), e.g. one model's correctness minus another's
    on the same test rows, from BOOTSTRAP_RESAMPLES resamples."""
    resampled = bootstrap_means(np.asarray(differences, dtype=np.float64)[None], seed)[0]  # (R,)
    return float(np.percentile(resampled, 2.5)), float(np.percentile(resampled, 97.5))


def verdict(rows: list[Row], labels: np.ndarray, seed: int = 0) -> dict | None:
    """:func:`gain_kept` for the student, the hard-label baseline and the ensemble rows (all in PyTorch eager) on
    the labelled test rows. None without a baseline row or labels."""
    by_kind = {row.kind: row for row in rows if row.backend == EAGER}
    if not {"student", "baseline", "ensemble"} <= set(by_kind):
        return None
    labelled = labels >= 0
    if not labelled.any():
        return None
    y = labels[labelled]
    correct = np.stack([by_kind[kind].scores[labelled].argmax(1) == y
                        for kind in ("student", "baseline", "ensemble")])  # (3, n)
    return gain_kept(correct, seed)


def gain_kept(correct: np.ndarray, seed: int = 0) -> dict:
    """Gain kept = (student − baseline) / (ensemble − baseline) in top-1, with a paired bootstrap 95% interval.

    ``correct`` (3, n) says, for the student, the baseline and the ensemble in that order, which of the same n
    labelled rows each gets right; each resample draws those rows with replacement and recomputes the three
    accuracies together. When more than 2.5% of resamples find the ensemble no better than the baseline, the
    ensemble's gain is within the noise of the rows and the share kept is "not measurable".
    """
    correct = np.asarray(correct, dtype=np.float64)  # (3, n)
    student, baseline, ensemble = correct.mean(1)
    resampled = bootstrap_means(correct, seed)  # (3, R)
    gains = resampled[2] - resampled[1]  # (R,) ensemble − baseline
    measurable = bool(ensemble > baseline and (gains <= 0).mean() <= 0.025)
    kept = (student - baseline) / (ensemble - baseline) if ensemble > baseline else None
    interval = None
    if measurable:
        shares = (resampled[0] - resampled[1])[gains > 0] / gains[gains > 0]
        interval = [float(np.percentile(shares, 2.5)), float(np.percentile(shares, 97.5))]
    return {"student_top1": float(student), "baseline_top1": float(baseline), "ensemble_top1": float(ensemble),
            "gain_kept": None if kept is None else float(kept), "interval_95": interval, "measurable": measurable,
            "resamples": BOOTSTRAP_RESAMPLES, "examples": int(correct.shape[1]), "seed": seed}


def headline(rows: list[dict], target: str, training: TrainResult, epochs: int, precision: str = "fp32",
             gain: dict | None = None, causes: list[str] | None = None) -> str:
    """What a person reads first: the student's batch-1 speed-up over the ensemble on the same backend (and in
    PyTorch eager), the accuracy it keeps, the share of the ensemble's gain over the hard-label baseline it keeps,
    and, when it loses more than a point or loses to the baseline, the likely cause. ``gain`` is :func:`verdict`'s
    result: with it the share kept carries its bootstrap interval, or is called not measurable. ``causes`` are the
    ensemble diagnostics' warnings: when distillation loses to the baseline, the first is named as the likely cause."""
    find = {(row["kind"], row["backend"]): row for row in rows if row["kind"] != "student"}
    eager = find[("ensemble", EAGER)]
    student = next(row for row in rows
                   if (row["kind"], row["backend"], row["precision"]) == ("student", target, precision))
    same_backend = find.get(("ensemble", target))
    baseline = find.get(("baseline", EAGER))
    batch = "1" if "1" in eager["latency"] else next(iter(eager["latency"]))

    def median(row):
        return row["latency"][batch]["median_ms"]

    def speed(reference):
        ratio = median(reference) / median(student)
        return f"{ratio:.1f}× faster than" if ratio >= 1 else f"{1 / ratio:.1f}× SLOWER than"

    student_acc, ensemble_acc = student["accuracy"]["top1"], eager["accuracy"]["top1"]
    if same_backend is not None:
        text = (f"On {target} ({precision}) the student is {speed(same_backend)} the ensemble on {target} "
                f"({speed(eager)} the ensemble in PyTorch eager) at batch {batch}: median {median(student):.3f} ms vs "
                f"{median(same_backend):.3f} ms vs {median(eager):.3f} ms.")
    else:
        text = (f"On {target} ({precision}) the student is {speed(eager)} the ensemble in PyTorch eager at batch "
                f"{batch} (median {median(student):.3f} ms vs {median(eager):.3f} ms); the ensemble was not run on "
                f"{target}, so "
                f"this mixes what distillation buys with what {target} buys.")
    if student_acc is None or ensemble_acc is None:
        return text + " The test split has no labels, so accuracy is not known; see agreement with the ensemble."
    text += (f" It keeps {student_acc / ensemble_acc:.1%} of the ensemble's test accuracy "
             f"({student_acc:.2%} vs {ensemble_acc:.2%})")
    text += _baseline_clause(baseline, student_acc, ensemble_acc, gain, causes) if baseline else "."
    drop = 100 * (ensemble_acc - student_acc)
    if drop > 1.0:
        if training.best_epoch == epochs:
            cause = (f"its validation accuracy was still rising at its last epoch ({epochs}), so it is likely "
                     f"undertrained: try more --epochs")
        else:
            cause = (f"its validation accuracy peaked at epoch {training.best_epoch} of {epochs}, so more epochs "
                     f"will not help; with {student['parameters']:,} parameters against the ensemble's "
                     f"{eager['parameters']:,} it is likely too small: try a wider --student")
        text += f" The student loses {drop:.1f} points: {cause}."
    return text


def _baseline_clause(baseline: dict, student_acc: float, ensemble_acc: float, verdict_: dict | None = None,
                     causes: list[str] | None = None) -> str:
    """How much of the ensemble's gain over the hard-label baseline the student keeps, in words."""
    baseline_acc = baseline["accuracy"]["top1"]
    gain = ensemble_acc - baseline_acc
    if gain <= 0:
        return (f"; the same network trained on labels alone reaches {baseline_acc:.2%}: the ensemble has no "
                f"gain over it to pass on, so distillation cannot pay here.")
    kept = (student_acc - baseline_acc) / gain
    if verdict_ is not None and not verdict_["measurable"]:
        clause = (f"; the ensemble's gain over the hard-label baseline ({baseline_acc:.2%}) is "
                  f"{100 * gain:.2f} points, within the noise of {verdict_['examples']:,} test rows, so the share "
                  f"of it the student keeps ({kept:.0%}) is not measurable.")
    elif verdict_ is not None:
        low, high = verdict_["interval_95"]
        clause = (f" and {kept:.0%} (95% interval {low:.0%} to {high:.0%}) of its gain over the hard-label "
                  f"baseline ({baseline_acc:.2%}).")
    else:
        clause = f" and {kept:.0%} of its gain over the hard-label baseline ({baseline_acc:.2%})."
    if student_acc < baseline_acc:
        clause += (f" Distillation did NOT pay: the same network trained on labels alone is "
                   f"{100 * (baseline_acc - student_acc):.2f} points better. ")
        if causes:
            clause += f"Likely cause, from the ensemble diagnostics: {causes[0]}."
        else:
            clause += ("Likely causes: a schedule too short for soft targets (try more --epochs or --recipe auto), "
                       "a temperature or alpha that does not suit this student (--tune searches them), or an "
                       "ensemble with little to teach beyond the labels.")
    return clause
