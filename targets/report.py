"""The run's report: ``report.json`` (schema-versioned, every figure) and ``report.md`` (what a person reads).

This module only formats; the pipeline measures. It imports nothing from the training code.
"""

from __future__ import annotations

from pathlib import Path

from compressor.core.fileio import write_json_atomic, write_text_atomic

MAX_CLASS_ROWS = 20  # per-class rows shown in report.md; report.json keeps every class


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir`` atomically; return both paths."""
    json_path = write_json_atomic(Path(out_dir) / "report.json", report)
    md_path = write_text_atomic(Path(out_dir) / "report.md", render_markdown(report))
    return json_path, md_path


def render_markdown(report: dict) -> str:
    """One page a person reads at a glance: headline, warnings, accuracy, latency, per class, then the details."""
    lines = ["# compressor report", "", f"**{report['headline']}**", ""]
    lines += [f"> ⚠ {warning}" for warning in report.get("warnings", [])]
    if report.get("warnings"):
        lines.append("")
    if report.get("pareto"):
        lines += [f"![test accuracy against batch-1 latency]({report['pareto']})", ""]
    lines += _accuracy_table(report) + _specialists(report) + _latency_table(report) + _per_class_table(report)
    lines += _parity(report) + _teachers(report) + _tuning(report) + _training(report) + _provenance(report)
    return "\n".join(lines)


def _accuracy_table(report: dict) -> list[str]:
    bench = report.get("benchmark", {})
    header = ["model", "backend", "precision", "parameters", "top-1", "NLL", "ECE", "agreement", "KL to ensemble"]
    lines = [f"## Accuracy ({bench.get('split', 'test')} split, {bench.get('examples', '?'):,} examples)", "",
             _row(header), _row(["---"] * len(header))]
    for row in report["rows"]:
        acc = row["accuracy"]
        lines.append(_row([row["model"], row["backend"], row["precision"], f"{row['parameters']:,}", _pct(acc["top1"]),
                           _num(acc["nll"]), _num(acc["ece"]), _pct(acc["agreement"]),
                           _num(acc.get("kl_to_ensemble"))]))
    lines += ["", "Agreement: the share of inputs where the row's top-1 class is the ensemble's. KL to ensemble: "
              "mean KL(ensemble ‖ row) in nats. ECE: expected calibration error over 15 confidence bins.", ""]
    return lines


SPECIALIST_COLUMNS = ("test rows", "examples", "generalist", "+ specialists", "change", "95% interval")


def specialist_rows(test: dict) -> list[list[str]]:
    """The cells, under SPECIALIST_COLUMNS, of the table comparing a generalist with its specialist ensemble, from
    the ``test`` dict of a specialist run's summary or report: all rows, the specialists' classes, then by the number
    of specialists active (rows of no examples left out). Shared by report.md, ``compress specialists`` and the
    paper benchmark."""
    named = [("all", test["all"]), ("the specialists' classes", test["specialist_classes"])]
    named += [(f"{k} specialist(s) active", entry) for k, entry in test["by_active"].items()]
    rows = []
    for name, entry in named:
        if entry["examples"]:
            low, high = entry["change_interval_95"]
            rows.append([name, f"{entry['examples']:,}", _pct(entry["generalist_top1"]),
                         _pct(entry["specialists_top1"]), f"{100 * entry['change']:+.2f} pt",
                         f"{100 * low:+.2f} to {100 * high:+.2f} pt"])
    return rows


def _specialists(report: dict) -> list[str]:
    """A specialist ensemble's section: the generalist against generalist + specialists (paper §5), and the two
    students distilled with the same budget."""
    section = report.get("specialists")
    if not section:
        return []
    lines = ["## Specialists (Hinton et al. 2015, §5)", "",
             "Subsets: " + "; ".join(", ".join(subset) for subset in section["subsets"] or []) + ".", "",
             _row(list(SPECIALIST_COLUMNS)), _row(["---"] * len(SPECIALIST_COLUMNS))]
    lines += [_row(cells) for cells in specialist_rows(section["test"])]
    ours, theirs = section["student_from_specialists_top1"], section["student_from_generalist_top1"]
    low, high = section["student_difference_interval_95"]
    lines += ["", f"The student distilled from the specialist ensemble reaches {_pct(ours)}; the same student "
                  f"distilled from the generalist alone, with the same budget, reaches {_pct(theirs)} (difference "
                  f"{100 * section['student_difference']:+.2f} pt, 95% interval {100 * low:+.2f} to "
                  f"{100 * high:+.2f} pt).", ""]
    return lines


def _latency_table(report: dict) -> list[str]:
    bench = report.get("benchmark", {})
    cuda = any(stats.get("stages") for row in report["rows"] for stats in row["latency"].values())
    header = ["model", "backend", "device", "batch", "p50 ms", "p90 ms", "p99 ms", "min ms", "max ms", "CV",
              "rounds", "examples/s"] + (["H2D ms", "compute ms", "D2H ms"] if cuda else [])
    lines = [f"## Latency ({bench.get('rounds', 1)} interleaved rounds, {bench.get('warmup_s', 0):g} s warm-up "
             f"and {bench.get('duration_s', 0):g} s of timed calls per row and batch size)", "",
             _row(header), _row(["---"] * len(header))]
    for row in report["rows"]:
        for batch, stats in row["latency"].items():
            rounds = " / ".join(f"{m:.3f}" for m in stats.get("round_medians", []))
            flag = " ⚠" if stats.get("unstable") else ""
            cells = [row["model"], row["backend"], row["device"], batch, f"{stats['median_ms']:.3f}",
                     f"{stats['p90_ms']:.3f}", f"{stats['p99_ms']:.3f}", f"{stats['min_ms']:.3f}",
                     f"{stats['max_ms']:.3f}", f"{stats['cv']:.1%}", rounds + flag,
                     f"{stats['throughput_per_s']:,.0f}"]
            if cuda:
                stages = stats.get("stages") or {}
                cells += [_num(stages.get(key), ".3f") for key in ("h2d_ms", "compute_ms", "d2h_ms")]
            lines.append(_row(cells))
    timed = {f"{row['model']} on {row['backend']}": row["timed"] for row in report["rows"]}
    lines += ["", "Each figure is the host wall time of one call, from the pooled samples of all rounds; *rounds* "
              "lists each round's median (⚠: they differ by more than 10%). What one call covers:", ""]
    lines += [f"- {name}: {what}" for name, what in timed.items()] + [""]
    return lines


def _per_class_table(report: dict) -> list[str]:
    shown = [row for row in report["rows"] if row["accuracy"].get("per_class")
             and (row["kind"] != "member") and not (row["kind"] == "ensemble" and row["backend"] != "PyTorch eager")]
    if not shown:
        return []
    names = report.get("data", {}).get("class_names") or []
    header = ["class"] + [f"{row['model']} ({row['backend']})" for row in shown]
    classes = list(range(len(shown[0]["accuracy"]["per_class"])))
    title = "## Per-class accuracy"
    if len(classes) > MAX_CLASS_ROWS:  # a 1000-class table is unreadable: show where the student loses most
        ensemble, student = shown[0]["accuracy"]["per_class"], shown[-1]["accuracy"]["per_class"]
        drops = {c: ensemble[c] - student[c] for c in classes if ensemble[c] is not None and student[c] is not None}
        classes = sorted(drops, key=lambda c: -drops[c])[:MAX_CLASS_ROWS]
        title += f" (the {len(classes)} classes where the student loses most to the ensemble; all in report.json)"
    lines = [title, "", _row(header), _row(["---"] * len(header))]
    for c in classes:
        label = f"{c} {names[c]}" if c < len(names) and str(names[c]) != str(c) else str(c)
        lines.append(_row([label] + [_pct(row["accuracy"]["per_class"][c]) for row in shown]))
    return lines + [""]


def _parity(report: dict) -> list[str]:
    parity = report["parity"]
    verdict = "passed" if parity["passed"] else "FAILED: " + "; ".join(parity["failures"])
    metrics = parity["metrics"]
    return ["## Parity of the export with PyTorch", "",
            f"{parity['precision']} gate {verdict}. max |diff| {metrics.get('max_abs_diff', float('nan')):.2e} "
            f"(tolerance {metrics.get('tolerance', float('nan')):.2e}), top-1 agreement "
            f"{_pct(metrics.get('top1_agreement'))}.", *_build(report), ""]


def _build(report: dict) -> list[str]:
    """The engine build of a GPU target (TensorRT version, build time, profile), when the export made one."""
    export = report.get("export") or {}
    meta = export.get("metadata") or {}
    seconds = meta.get("build_seconds", meta.get("compile_seconds"))
    if seconds is None:
        return []
    versions = meta.get("versions") or {}
    profile = meta.get("profile") or {}
    batch = f", batch profile {profile['min']}..{profile['max']} (opt {profile['opt']})" if profile else ""
    return ["", f"Engine built in {seconds:.1f} s with TensorRT {versions.get('tensorrt', '?')} on "
                f"{meta.get('gpu', 'the GPU')}{batch}."]


def _teachers(report: dict) -> list[str]:
    diagnostics = report.get("diagnostics") or {}
    if not diagnostics.get("members"):
        return []
    lines = ["## Teachers on the validation split", "", _row(["member", "accuracy", "NLL", "ECE"]),
             _row(["---"] * 4)]
    for member in diagnostics["members"]:
        lines.append(_row([member["name"], _pct(member["accuracy"]), _num(member["nll"]), _num(member.get("ece"))]))
    mixture = diagnostics["mixture"]
    lines += [_row(["**ensemble**", _pct(mixture["accuracy"]), _num(mixture["nll"]), _num(mixture.get("ece"))]), ""]
    if diagnostics.get("disagreement") and len(diagnostics["members"]) > 1:
        lines.append(f"- Members disagree on {_pct(diagnostics['disagreement']['mean'])} of validation rows "
                     f"(mean over pairs).")
    fit = diagnostics.get("fit")
    if fit:
        weights = ", ".join(f"{w:.2f}" for w in fit["weights"])
        lines.append(f"- Fitted on validation (recorded, not applied): weights [{weights}], temperature "
                     f"{fit['temperature']:.2f}; NLL {_num(fit['nll_before'])} → {_num(fit['nll_after'])}, ECE "
                     f"{_num(fit['ece_before'])} → {_num(fit['ece_after'])}.")
    transfer = diagnostics.get("transfer") or {}
    if transfer.get("examples"):
        lines.append(f"- On the transfer set ({transfer['examples']:,} rows): accuracy {_pct(transfer['accuracy'])} "
                     f"(validation {_pct(transfer['heldout_accuracy'])}), soft-target entropy "
                     f"{transfer['entropy']:.3f} nats (validation {transfer['heldout_entropy']:.3f}).")
    return lines + [""]


def _tuning(report: dict) -> list[str]:
    """--tune / --recipe auto: why the student's settings were chosen, the commands that rerun them, every trial."""
    tuning = report.get("tuning")
    if not tuning:
        return []
    lines = ["## Tuning", "", tuning["explanation"], "",
             f"- Method: {tuning['method']}; {tuning['trials_per_family']} configuration(s) per family; "
             f"budget {tuning['budget_minutes']:g} min, spent {tuning['seconds'] / 60:.1f} min "
             f"(estimated {tuning['estimated_seconds'] / 60:.1f} min).",
             f"- The student reruns with: `{tuning['rerun']}`"]
    if tuning.get("baseline_rerun"):
        lines.append(f"- The tuned baseline reruns with: `{tuning['baseline_rerun']}`")
    header = ["trial", "family", "recipe", "T", "α", "lr", "epochs", "rung", "epochs trained", "best val acc", "s"]
    lines += ["", _row(header), _row(["---"] * len(header))]
    trials = sorted(tuning["trials"], key=lambda t: (t["family"], -t["rung"], -t["val_accuracy"]))
    chosen = {tuning["chosen"]["name"], (tuning.get("baseline") or {}).get("name")}
    for t in trials:
        name = f"**{t['name']}**" if t["name"] in chosen else t["name"]
        lines.append(_row([name, t["family"], t["recipe"], "" if t["alpha"] == 0 else f"{t['temperature']:g}",
                           f"{t['alpha']:g}", f"{t['lr']:.3g}", t["epochs"], t["rung"], t["epochs_trained"],
                           _pct(t["val_accuracy"]), f"{t['seconds']:.1f}"]))
    return lines + ["", "Bold: the chosen student and the tuned baseline (the best labels-only trial).", ""]


def _training(report: dict) -> list[str]:
    lines = ["## Training", ""]
    runs = [("Student", report["student"])]
    if report.get("baseline"):
        runs.append(("Hard-label baseline", report["baseline"]))
    for name, run in runs:
        training = run["training"]
        lines.append(f"- {name} `{run['spec']}`: best validation accuracy {_pct(training['best_val_accuracy'])} "
                     f"at epoch {training['best_epoch']} of {len(training['history'])}, {training['seconds']:.1f} s.")
        fit = run.get("transfer_fit")
        if fit:
            lines.append(f"  On {fit['rows']:,} rows of its own transfer set it agrees with the ensemble on "
                         f"{_pct(fit['agreement'])} (KL {_num(fit['kl_to_ensemble'], '.3f')} nats): how well it can "
                         f"imitate the teachers where it was taught.")
    transfer = report.get("transfer_set") or {}
    if transfer:
        omitted = (f"; classes {transfer['omitted_classes']} left out ({transfer['rows_dropped']} rows)"
                   if transfer.get("omitted_classes") else "")
        labels = "labels ignored (soft targets only)" if transfer.get("unlabeled") else f"α = {transfer['alpha']:g}"
        lines.append(f"- Transfer set: {transfer['rows']} rows, {labels}{omitted}; best epoch by "
                     f"{transfer['best_epoch_by']}.")
        if transfer.get("recipe"):
            lines.append(f"- Recipe `{transfer['recipe']}`: augmentation {transfer['augmentation']}; teacher logits "
                         f"{transfer['teachers']}.")
        views = transfer.get("view_cache")
        if views:
            pairs = ""
            if "pairs_total" in views:
                pairs = (f" ({views['pairs_computed']:,} (row, view) pairs computed; {views['pairs_stored']:,} of the "
                         f"{views['pairs_total']:,} that exist now stored)")
            lines.append(f"- View cache `{views['path']}`: {len(views['epochs_computed'])} epoch(s) of teacher "
                         f"logits computed, {len(views['epochs_reused'])} reused{pairs}.")
    fix = report["student"].get("bias_fix")
    if fix:
        lines.append(f"- Bias fix: the output biases of classes {fix['classes']} raised by {fix['shift']:g}; "
                     f"validation accuracy {_pct(fix['val_accuracy_before'])} → {_pct(fix['val_accuracy_after'])}.")
    cache = report.get("teacher_cache") or {}
    if cache:
        lines.append("- Teacher logits: " + (("read from the cache " if cache["hit"] else "computed once and cached ")
                                             + f"(`{cache['path']}`)" if cache["enabled"]
                                             else "recomputed on every training batch (--no-cache)") + ".")
    distributed = (report.get("environment") or {}).get("distributed") or {}
    if distributed.get("world_size", 1) > 1:
        lines.append(f"- Trained on {distributed['world_size']} processes ({distributed['backend']}, "
                     f"DistributedDataParallel).")
    return lines + [""]


def _provenance(report: dict) -> list[str]:
    env, data = report["environment"], report["data"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    return ["## Provenance", "",
            f"- command: `{report['command']}`",
            f"- data: {data['source']} ({data['preprocessing']}); split {data['sizes']} with seed {report['seed']}",
            f"- normalisation: {data['normalisation'] or 'none'}",
            f"- device: {env['device']}, {env['cpu_count']} CPUs, torch threads {env['torch_threads']}; "
            f"runner: {report['runner']['name']}",
            f"- versions: {versions}",
            f"- created {report['created']}, schema version {report['schema_version']}", ""]


def _row(cells: list) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def _num(value, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)
