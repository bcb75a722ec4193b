"""``targets.pareto``: the non-dominated set, and the accuracy-against-latency PNG written atomically."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from compressor.core.errors import CompressorError
from targets.pareto import DEFAULT_TITLE, pareto_front, plot_pareto

REPO = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _latency(median: float) -> dict:
    return {"batch_size": 1, "iterations": 2000, "min_ms": 0.85 * median, "mean_ms": 1.05 * median,
            "median_ms": median, "p90_ms": 1.2 * median, "p95_ms": 1.3 * median, "p99_ms": 1.6 * median,
            "max_ms": 4 * median, "std_ms": 0.1 * median, "cv": 0.02, "throughput_per_s": 1000 / median}


def _row(model: str, kind: str, backend: str, precision: str, top1: float | None, medians: dict) -> dict:
    return {"model": model, "kind": kind, "backend": backend, "precision": precision, "parameters": 85_000,
            "accuracy": {"top1": top1, "nll": 0.1, "ece": 0.01, "agreement": 0.98, "kl_to_ensemble": 0.02,
                         "per_class": [top1] * 10},
            "latency": {batch: _latency(median) for batch, median in medians.items()}}


@pytest.fixture
def rows() -> list[dict]:
    """Five rows like a digits run's report: ensemble in eager and ORT, a member, the baseline, the student."""
    return [
        _row("ensemble", "ensemble", "PyTorch eager", "fp32", 0.9833, {"1": 0.92, "64": 3.1}),
        _row("ensemble", "ensemble", "onnxruntime", "fp32", 0.9833, {"1": 0.21, "64": 1.2}),
        _row("member mlp", "member", "PyTorch eager", "fp32", 0.9694, {"1": 0.085, "64": 0.3}),
        _row("baseline", "baseline", "PyTorch eager", "fp32", 0.9639, {"1": 0.061, "64": 0.2}),
        _row("student", "student", "onnxruntime", "fp32", 0.9749, {"1": 0.0126, "64": 0.09}),
    ]


@pytest.fixture
def captured(monkeypatch) -> list:
    """The figures ``plot_pareto`` saves, kept for inspection; the real ``savefig`` still runs."""
    from matplotlib.figure import Figure

    figures, original = [], Figure.savefig

    def savefig(self, *args, **kwargs):
        figures.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return figures


# --- pareto_front -------------------------------------------------------------------------------------------------


def test_front_excludes_dominated_points_and_sorts_by_latency():
    points = [(2.0, 95.0), (3.0, 93.0), (0.5, 80.0), (1.0, 90.0), (4.0, 99.0)]
    # (3.0, 93.0) is slower and less accurate than (2.0, 95.0)
    assert pareto_front(points) == [2, 3, 0, 4]


def test_front_of_one_point_and_of_none():
    assert pareto_front([(0.3, 97.0)]) == [0]
    assert pareto_front([]) == []


def test_front_ties():
    # identical points dominate neither each other: both stay, in input order
    assert pareto_front([(1.0, 90.0), (1.0, 90.0)]) == [0, 1]
    # same latency, lower accuracy: dominated (latency equal, accuracy strictly worse)
    assert pareto_front([(1.0, 90.0), (1.0, 95.0)]) == [1]
    # same accuracy, higher latency: dominated
    assert pareto_front([(2.0, 90.0), (1.0, 90.0)]) == [1]
    # a tie at the front's faster end does not knock out a slower, more accurate point
    assert pareto_front([(1.0, 90.0), (1.0, 90.0), (2.0, 91.0), (2.0, 90.5)]) == [0, 1, 2]


def test_front_matches_the_definition_on_random_points_with_ties():
    rng = random.Random(0)
    for _ in range(200):
        points = [(float(rng.randint(1, 6)), float(rng.randint(90, 96))) for _ in range(rng.randint(1, 12))]

        def dominated(i, points=points):
            li, ai = points[i]
            return any(lj <= li and aj >= ai and (lj < li or aj > ai) for lj, aj in points)

        expected = sorted((i for i in range(len(points)) if not dominated(i)),
                          key=lambda i: (points[i][0], -points[i][1], i))
        assert pareto_front(points) == expected, points


# --- plot_pareto --------------------------------------------------------------------------------------------------


def test_writes_a_png_of_the_expected_size(tmp_path, rows):
    from matplotlib.image import imread

    out = tmp_path / "report" / "pareto.png"  # the folder does not exist yet
    assert plot_pareto(rows, out) == out
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    height, width = imread(out).shape[:2]
    assert width > height > 300
    assert abs(width - 8 * 150) <= 40 and abs(height - 5.5 * 150) <= 40  # 8 x 5.5 in at 150 dpi
    assert sorted(p.name for p in out.parent.iterdir()) == ["pareto.png"]  # no temporary file left


def test_figure_contents(tmp_path, rows, captured):
    plot_pareto(rows, tmp_path / "pareto.png", title="digits, 5 rows")
    (fig,) = captured
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert ax.get_xlabel() == "batch-1 median latency, ms (log scale)"
    assert ax.get_ylabel() == "test top-1 accuracy, %"
    assert ax.get_title() == "digits, 5 rows"

    labels = {text.get_text() for text in ax.texts}
    assert labels == {"ensemble (PyTorch eager, fp32)", "ensemble (onnxruntime, fp32)",
                      "member mlp (PyTorch eager, fp32)", "baseline (PyTorch eager, fp32)",
                      "student (onnxruntime, fp32)"}
    renderer = fig.canvas.get_renderer()
    box = ax.get_window_extent(renderer)
    for text in ax.texts:  # no label runs off the axes
        extent = text.get_window_extent(renderer)
        assert box.x0 <= extent.x0 and extent.x1 <= box.x1 and box.y0 <= extent.y0 and extent.y1 <= box.y1

    # the front: student (fastest) then the ensemble on ORT; the others are dominated
    (front,) = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    xs, ys = front.get_data()
    assert {float(x) for x in xs} == {0.0126, 0.21}
    assert {round(float(y), 2) for y in ys} == {97.49, 98.33}

    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert {"student", "ensemble member", "Pareto front"} <= set(legend)
    assert len([label for label in legend if "baseline" in label]) == 1


def test_default_title_and_another_batch(tmp_path, rows, captured):
    assert plot_pareto(rows, tmp_path / "pareto.png", batch="64") is not None
    ax = captured[0].axes[0]
    assert ax.get_title() == DEFAULT_TITLE
    assert ax.get_xlabel() == "batch-64 median latency, ms (log scale)"
    from matplotlib.collections import PathCollection

    markers = [collection for collection in ax.collections if isinstance(collection, PathCollection)]
    assert sorted(float(x) for collection in markers for x, _ in collection.get_offsets()) == [0.09, 0.2, 0.3, 1.2, 3.1]


def test_rows_without_accuracy_or_batch_are_skipped(tmp_path, rows, captured):
    rows[0]["accuracy"]["top1"] = None  # unlabelled data
    del rows[1]["latency"]["1"]  # not measured at batch 1
    assert plot_pareto(rows, tmp_path / "pareto.png") == tmp_path / "pareto.png"
    labels = {text.get_text() for text in captured[0].axes[0].texts}
    assert labels == {"member mlp (PyTorch eager, fp32)", "baseline (PyTorch eager, fp32)",
                      "student (onnxruntime, fp32)"}


def test_nothing_to_plot_returns_none_and_writes_nothing(tmp_path, rows):
    for row in rows[:3]:
        row["accuracy"]["top1"] = None
    for row in rows[3:]:
        row["latency"] = {"64": row["latency"]["64"]}
    out = tmp_path / "out" / "pareto.png"
    assert plot_pareto(rows, out) is None
    assert plot_pareto([], out) is None
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_a_single_row_is_plotted(tmp_path, rows):
    out = tmp_path / "pareto.png"
    assert plot_pareto(rows[-1:], out) == out
    assert out.read_bytes()[:8] == PNG_SIGNATURE


def test_replaces_an_existing_file(tmp_path, rows):
    out = tmp_path / "pareto.png"
    out.write_bytes(b"old")
    plot_pareto(rows, out)
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    assert [p.name for p in tmp_path.iterdir()] == ["pareto.png"]


def test_failed_save_leaves_no_file_and_raises(tmp_path, rows, monkeypatch):
    from matplotlib.figure import Figure

    def fail(self, *args, **kwargs):
        Path(args[0]).write_bytes(b"half a png")  # a partial write before the failure
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", fail)
    out = tmp_path / "pareto.png"
    # compressor.core.fileio.atomic_path turns the OSError into a CompressorError a user can act on, chained to it
    with pytest.raises(CompressorError, match="No space left on device") as info:
        plot_pareto(rows, out)
    assert isinstance(info.value.__cause__, OSError)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_the_old_file(tmp_path, rows, monkeypatch):
    from matplotlib.figure import Figure

    def fail(self, *args, **kwargs):
        raise OSError(5, "Input/output error")

    out = tmp_path / "pareto.png"
    out.write_bytes(b"old")
    monkeypatch.setattr(Figure, "savefig", fail)
    with pytest.raises(CompressorError):
        plot_pareto(rows, out)
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["pareto.png"]


def test_import_does_not_import_matplotlib():
    result = subprocess.run([sys.executable, "-c", "import targets.pareto, sys; print('matplotlib' in sys.modules)"],
                            cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
