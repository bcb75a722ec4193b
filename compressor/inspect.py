"""``compress inspect``: what is in a teacher file, and how well it does on data when given some."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from compressor.config import RunConfig
from compressor.data.loading import load_data, to_tensors
from compressor.teachers.diagnostics import diagnose
from compressor.teachers.formats import load_ensemble


def inspect_ensemble(path: Path, data: str | None, trust_pickle: bool, max_train: int | None,
                     console: Console) -> dict:
    """Print members, parameter counts, input shape and classes; with ``data``, the diagnostics on its test split
    (accuracy, NLL, ECE, disagreement, fitted weights and temperature).

    Normalisation from the ensemble's metadata is applied to the data exactly as the main job applies it.
    Returns what it printed, as a dict.
    """
    ensemble = load_ensemble(path, trust_pickle=trust_pickle)
    info = ensemble.describe()
    console.print(f"[bold]{path}[/]: {info['format']}, {len(ensemble.members)} members, combine={info['combine']}",
                  highlight=False, soft_wrap=True)
    table = Table()
    for column in ("member", "kind", "parameters", "weight"):
        table.add_column(column, justify="right" if column in ("parameters", "weight") else "left")
    weights = ensemble.weights or [1.0] * len(ensemble.members)
    for member, weight in zip(ensemble.members, weights):
        table.add_row(member.name, member.kind, f"{member.parameters:,}", f"{weight:g}")
    table.add_row("[bold]total[/]", "", f"{ensemble.parameters:,}", "")
    console.print(table)
    if info["inputs"]:
        meta = ensemble.metadata
        names = ", ".join(f"{spec['name']} ({spec['dtype']})" for spec in info["inputs"])
        console.print(f"inputs: {names}  vocabulary: "
                      f"{meta.get('vocab_size') or '?'}  longest sequence: {meta.get('max_length') or '?'}  "
                      f"classes: {info['num_classes']}", highlight=False, soft_wrap=True)
    else:
        console.print(f"input shape: {info['input_shape']}  classes: {info['num_classes']}  "
                      f"normalisation: {info['normalisation'] or 'none'}")
    if info["class_names"]:
        console.print("class names: " + ", ".join(info["class_names"]))
    if info["specialists"]:
        subsets = info["specialists"].get("subset_names") or info["specialists"]["subsets"]
        console.print(f"specialists (paper §5, top-{info['specialists'].get('top_n', 1)} of the generalist selects "
                      f"them): " + "; ".join(f"{m}: {', '.join(map(str, s))}" for m, s in enumerate(subsets, 1)),
                      highlight=False, soft_wrap=True)
    spec = data or info.get("dataset")
    if spec:
        # read, checked and preprocessed as the main job does it (an image folder's channels from the evidence)
        dataset, normalisation = load_data(RunConfig(Path(path), data=spec, max_train=max_train), ensemble,
                                           probe=ensemble.probe)
        x = to_tensors(dataset, normalisation).x_test
        ensemble.validate(x[:8], f"--data {spec}")
        scores = diagnose(ensemble, ensemble.member_logits(x), torch.from_numpy(dataset.test.y), split="test")
        console.print(f"accuracy on the test split of {spec} ({len(dataset.test)} examples):", highlight=False,
                      soft_wrap=True)
        accuracy = Table()
        accuracy.add_column("model")
        accuracy.add_column("top-1", justify="right")
        accuracy.add_column("NLL", justify="right")
        accuracy.add_column("ECE", justify="right")
        for member in scores["members"]:
            accuracy.add_row(member["name"], f"{member['accuracy']:.2%}", f"{member['nll']:.4f}",
                             f"{member['ece']:.4f}")
        if scores["mixture"]:
            mixture = scores["mixture"]
            accuracy.add_row("[bold]ensemble[/]", f"{mixture['accuracy']:.2%}", f"{mixture['nll']:.4f}",
                             f"{mixture['ece']:.4f}")
        console.print(accuracy)
        if scores.get("fit"):
            fit = scores["fit"]
            console.print(f"members disagree on {scores['disagreement']['mean']:.2%} of rows; weights and "
                          f"temperature fitted on these rows: {[round(w, 2) for w in fit['weights']]}, "
                          f"T {fit['temperature']:.2f}, NLL {fit['nll_before']:.4f} -> {fit['nll_after']:.4f}",
                          highlight=False, soft_wrap=True)
        for line in scores["warnings"]:
            console.print(f"[yellow]warning:[/] {line}")
        info["scores"] = scores
    return info
