"""The verdict of a run: the share of the ensemble's gain over the hard-label baseline the student keeps, with a
paired-bootstrap 95% interval over the test rows, and the headline a person reads first."""

from __future__ import annotations

import math

import numpy as np

from compressor.core.metrics import BOOTSTRAP_RESAMPLES, bootstrap_means
from compressor.deployment.rows import EAGER, Row
from compressor.training.loop import TrainResult


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
             gain: dict | None = None, causes: list[str] | None = None, evidence: dict | None = None) -> str:
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
    if ensemble_acc > 0:
        text += (f" It keeps {student_acc / ensemble_acc:.1%} of the ensemble's test accuracy "
                 f"({student_acc:.2%} vs {ensemble_acc:.2%})")
    else:  # no share of nothing: teachers that get every test row wrong (untrained, or another task's labels)
        text += (f" The ensemble gets no test row right, so these teachers teach nothing about this data (check that "
                 f"--data is what they were trained on); the student scores {student_acc:.2%}")
    text += _baseline_clause(baseline, student_acc, ensemble_acc, gain, causes) if baseline else "."
    member = next((row for row in rows if row["kind"] == "member" and row["backend"] == target), None)
    if member is not None and member["accuracy"]["top1"] is not None:
        text += _member_clause(member, student_acc, median(member) / median(student), target, batch)
    drop = 100 * (ensemble_acc - student_acc)
    if drop > 1.0:
        cause = diagnose_loss(training, epochs, student, eager, baseline, evidence or {})
        text += f" The student loses {drop:.1f} points: {cause}."
    return text


def diagnose_loss(training: TrainResult, epochs: int, student: dict, ensemble: dict, baseline: dict | None,
                  evidence: dict) -> str:
    """Why the student loses to the ensemble, said only where a measurement in the report supports it, quoted
    beside it: undertrained (validation still rising at the end, and a longer screen helped), the teachers teach
    their errors (the labels alone do better, and the teachers disagree with the labels), too small (it cannot fit
    its own training rows as well as the ensemble scores on unseen ones); otherwise what was measured, and that it
    names no cause. ``evidence``: ``val_examples``, ``transfer_error`` (the teachers' disagreement with the labels
    on the transfer set), ``spec`` and ``selection`` (the student and the screen's record)."""
    history = training.history
    error = math.sqrt(0.25 / max(1, evidence.get("val_examples", 1)))  # one standard error at worst (p = 0.5)
    if history and training.best_epoch == epochs and len(history) >= 2:
        middle = history[len(history) // 2 - 1]
        rise = history[-1]["val_accuracy"] - middle["val_accuracy"]
        longer = _longer_screen_gain(evidence.get("selection"), evidence.get("spec"))
        if rise > error and (longer is None or longer > 0):
            helped = "" if longer is None else f", and the screen's longer schedule gained {100 * longer:.1f} points"
            return (f"validation accuracy still rose from {middle['val_accuracy']:.2%} at epoch {middle['epoch']} to "
                    f"{history[-1]['val_accuracy']:.2%} at its last epoch ({epochs}){helped}, so it is likely "
                    f"undertrained: give it more --epochs or a larger --budget")
    baseline_acc = None if baseline is None else baseline["accuracy"]["top1"]
    student_acc = student["accuracy"]["top1"]
    wrong = evidence.get("transfer_error")
    if baseline_acc is not None and baseline_acc > student_acc and wrong is not None and wrong > 0.05:
        return (f"the same network trained on labels alone reaches {baseline_acc:.2%}, and the teachers disagree with "
                f"the labels on {wrong:.1%} of the transfer set, so the soft targets teach it their errors: weigh the "
                f"labels more (a lower --alpha) or improve the teachers")
    fit = history[training.best_epoch - 1].get("train_accuracy") if history else None
    if fit is not None and fit < ensemble["accuracy"]["top1"] - error:
        return (f"it fits only {fit:.2%} of its own training rows at its best epoch, below the {ensemble['accuracy']['top1']:.2%} "
                f"the ensemble scores on unseen test rows, so capacity limits it: try a larger --student (or a "
                f"smaller --min-speedup)")
    return (f"its validation accuracy peaked at epoch {training.best_epoch} of {epochs}"
            + ("" if fit is None else f" and it fits {fit:.2%} of its training rows")
            + "; these measurements name no single cause")


def _longer_screen_gain(selection: dict | None, spec: str | None) -> float | None:
    """How much the chosen spec's screen gained from its second-to-last to its last rung (None: not screened so)."""
    trials = [t for t in ((selection or {}).get("screen") or {}).get("trials", []) if t["spec"] == spec]
    reached = sorted(((int(e), a) for t in trials[:1] for e, a in t["val_accuracy"].items()))
    return None if len(reached) < 2 else reached[-1][1] - reached[-2][1]

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


def _member_clause(member: dict, student_acc: float, speed_up: float, target: str, batch: str) -> str:
    """The deployer's alternative: ship the best single member instead of the student. ``speed_up`` is the member's
    batch latency over the student's on the same backend."""
    points = 100 * (student_acc - member["accuracy"]["top1"])
    faster = f"{speed_up:.1f}× faster than" if speed_up >= 1 else f"{1 / speed_up:.1f}× SLOWER than"
    text = (f" Against shipping the best single {member['model']} on {target} instead: the student is {faster} it "
            f"at batch {batch} and {abs(points):.2f} points {'more' if points >= 0 else 'LESS'} accurate "
            f"({student_acc:.2%} vs {member['accuracy']['top1']:.2%})")
    if points < 0 or speed_up < 1:
        return text + ", so shipping that member alone is worth weighing."
    return text + "."
