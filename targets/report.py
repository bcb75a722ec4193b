"""The run's report: ``report.json`` (schema-versioned, every figure) and ``report.md`` (what a person reads).

This module only formats; the pipeline measures. It imports nothing from the training code.
"""

from __future__ import annotations

from pathlib import Path

from compressor.fileio import write_json_atomic, write_text_atomic


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir`` atomically; return both paths."""
    json_path = write_json_atomic(Path(out_dir) / "report.json", report)
    md_path = write_text_atomic(Path(out_dir) / "report.md", render_markdown(report))
    return json_path, md_path


def render_markdown(report: dict) -> str:
    """A one-page summary: the headline, the comparison table, parity, training, and the provenance."""
    lines = ["# compressor report", "", f"**{report['headline']}**", ""]
    for warning in report.get("warnings", []):
        lines.append(f"> ⚠ {warning}")
    if report.get("warnings"):
        lines.append("")
    batches = list(report["rows"][0]["latency"]) if report["rows"] else []
    header = ["model", "backend", "precision", "parameters", "top-1", "NLL", "ECE", "agreement"]
    for batch in batches:
        header += [f"b{batch} p50 ms", f"b{batch} p90 ms", f"b{batch} p99 ms", f"b{batch} /s"]
    lines += ["## Student against ensemble (test split)", "", _row(header), _row(["---"] * len(header))]
    for row in report["rows"]:
        acc = row["accuracy"]
        cells = [row["model"], row["backend"], row["precision"], f"{row['parameters']:,}", _pct(acc["top1"]),
                 _num(acc["nll"]), _num(acc["ece"]), _pct(acc["agreement"])]
        for batch in batches:
            stats = row["latency"][batch]
            cells += [f"{stats['median_ms']:.3f}", f"{stats['p90_ms']:.3f}", f"{stats['p99_ms']:.3f}",
                      f"{stats['throughput_per_s']:,.0f}"]
        lines.append(_row(cells))
    lines += ["", "Agreement is the share of test inputs where the row's top-1 class equals the ensemble's. "
              "Latency is host wall time per batch after a timed warm-up; /s is examples per second.", ""]

    parity = report["parity"]
    verdict = "passed" if parity["passed"] else "FAILED: " + "; ".join(parity["failures"])
    metrics = parity["metrics"]
    lines += ["## Parity of the export with PyTorch", "",
              f"{parity['precision']} gate {verdict}. max |diff| {metrics.get('max_abs_diff', float('nan')):.2e} "
              f"(tolerance {metrics.get('tolerance', float('nan')):.2e}), top-1 agreement "
              f"{_pct(metrics.get('top1_agreement'))}.", ""]

    diagnostics = report.get("diagnostics") or {}
    if diagnostics.get("members"):
        lines += ["## Teachers on the validation split", "", _row(["member", "accuracy", "NLL"]), _row(["---"] * 3)]
        for member in diagnostics["members"]:
            lines.append(_row([member["name"], _pct(member["accuracy"]), _num(member["nll"])]))
        mixture = diagnostics["mixture"]
        lines += [_row(["**ensemble**", _pct(mixture["accuracy"]), _num(mixture["nll"])]), ""]

    training = report["student"]["training"]
    lines += ["## Training", "",
              f"Student `{report['student']['spec']}` ({report['student']['parameters']:,} parameters), "
              f"best validation accuracy {_pct(training['best_val_accuracy'])} at epoch {training['best_epoch']} "
              f"of {len(training['history'])}, {training['seconds']:.1f} s.", ""]

    env = report["environment"]
    data = report["data"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    lines += ["## Provenance", "",
              f"- command: `{report['command']}`",
              f"- data: {data['source']} ({data['preprocessing']}); split {data['sizes']} with seed {report['seed']}",
              f"- normalisation: {data['normalisation'] or 'none'}",
              f"- device: {env['device']}, {env['cpu_count']} CPUs, torch threads {env['torch_threads']}; "
              f"runner: {report['runner']['name']}",
              f"- versions: {versions}",
              f"- created {report['created']}, schema version {report['schema_version']}", ""]
    return "\n".join(lines)


def _row(cells: list) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"
