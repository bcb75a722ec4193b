"""What a tuned run says about its search: why the chosen configuration was chosen, and the ``compress`` line that
reruns a trial (:mod:`compressor.training.halving`)."""

from __future__ import annotations

import shlex
from pathlib import Path

# what a trial changes on the command line; dropped from the original command when the rerun command is built
_TRIAL_OPTIONS = {"--recipe": True, "--temperature": True, "-T": True, "--alpha": True, "--lr": True,
                  "--epochs": True, "--tune": True, "--tune-trials": True, "--baseline": False, "--resume": False}


def explain(tuning) -> str:
    """Why a search (a :class:`compressor.training.halving.Tuning`) chose its configuration, in one or two sentences."""
    best = tuning.winners["distilled"]
    labels = tuning.winners.get("labels")
    screened = (f" (screened on {tuning.screened[0].rows:.0%} of the rows; the best {tuning.trials_per_family} "
                f"trained on every row)" if tuning.screened else "")
    text = (f"Tuning tried {tuning.configurations_per_family} configuration(s) per family{screened} in "
            f"{tuning.seconds / 60:.1f} min (budget {tuning.budget_seconds / 60:.1f} min). ")
    if labels is None:
        return text + (f"The transfer set has no labels, so only distillation was searched; the best on validation "
                       f"was {best.trial.name} ({best.val_accuracy:.2%}).")
    if tuning.chosen is labels:
        return text + (f"Training on the labels alone ({labels.trial.name}, {labels.val_accuracy:.2%} on "
                       f"validation) did at least as well as the best distillation setting ({best.trial.name}, "
                       f"{best.val_accuracy:.2%}), so the student is the tuned hard-label network: distillation did "
                       f"not pay for this student at this budget.")
    return text + (f"Distillation ({best.trial.name}) reached {best.val_accuracy:.2%} on validation against "
                   f"{labels.val_accuracy:.2%} for the best labels-only setting ({labels.trial.name}), "
                   f"+{100 * (best.val_accuracy - labels.val_accuracy):.2f} points, so it was chosen.")


def rerun_command(command: str, trial, out: Path | None = None) -> str:
    """``command`` (the original ``compress`` line) with the tuning options replaced by ``trial``'s settings; with
    ``out`` (the tuned run's folder), writing to ``out/reruns/<trial>`` so the rerun keeps the search's report."""
    words, kept, skip = shlex.split(command), [], False
    options = dict(_TRIAL_OPTIONS, **({"--out": True} if out is not None else {}))
    for word in words:
        if skip:
            skip = False
            continue
        option = word.split("=", 1)[0]
        if option in options:
            skip = options[option] and "=" not in word
            continue
        kept.append(word)
    place = [] if out is None else ["--out", str(Path(out) / "reruns" / trial.name)]
    return shlex.join(kept + place + trial.flags())
