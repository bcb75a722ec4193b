"""Hinton, Vinyals & Dean (2015) §3, transfer sets that omit classes, rerun on Fashion-MNIST with compressor's parts.

The paper (MNIST): a 2×800 net distilled at T = 20 from the 2×1200 teacher on a transfer set with no 3s at all
made 206 test errors, 133 of them on the 1,010 test 3s. The soft targets had taught it what a 3 looks like; what
it lacked was the 3's prior, since a 3 was never the answer in training: raising the 3's output bias by 3.5 (a
value the paper chose to optimise test performance) left 109 errors, 14 on 3s. With only 7s and 8s in the
transfer set the distilled net had 47.3% test error; reducing the biases of 7 and 8 by 7.6 (equivalently, raising
the eight omitted classes' biases by 7.6) brought it to 13.2%.

Here: the teacher ensemble of ``paper_table.py`` (3 × 2×1200, reused from ``--work-dir`` when its settings are
unchanged), its soft targets at ``--temperature`` (default 4, compressor's default; the paper's 2×800 used 20),
the student ``mlp:800x800`` trained by ``compressor.training.loop.train_student`` with ``DistillationLoss`` (α = 0.9)
and paper_table's student settings (AdamW lr 1e-3, batch 128, 40 epochs, cosine schedule, no weight decay, scored
at its last epoch), on three transfer sets drawn from the 55,000 training images:

- all classes: the reference, the very run ``paper_table.py`` made (reused, not retrained, when its folder
  ``distilled_2×800_T=4`` is in ``--work-dir``);
- ``--omit`` (default 3, dress): every image of those classes removed;
- ``--keep`` (default 7,8: sneaker, bag): only those classes left, so the other eight are omitted.

For each: test errors overall and on the omitted classes, before and after the bias fix of
``compressor.training.omitted_classes``: one scalar added to the omitted classes' output biases, fitted on the validation
split (5,000 held-out training images, which has every class) rather than on test as the paper did; the errors at
the shift that is best on test are shown beside, as the optimistic bound the paper reports. The reference gets
the same fit for each class set, as a control: a model that saw every class should need ~0.

    python benchmarks/paper_omitted_class.py --work-dir /tmp/paper-work   # ~5 min when the teachers are reused
    python benchmarks/paper_omitted_class.py --quick                      # a few minutes from scratch

Prints the table and writes ``benchmarks/results/paper_omitted_class[-quick].json``. Needs
``apt-get install -y dataset-fashion-mnist``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/...` finds benchmarks/
from benchmarks.paper_common import (
    STUDENT_EPOCHS,
    Runs,
    add_run_arguments,
    add_teacher_arguments,
    load_fashion,
    mlp_student,
    record,
    resolve_defaults,
    train_teacher_ensemble,
    write_result,
)
from compressor.data.datasets import FASHION_MNIST_CLASSES
from compressor.core.inference import predict_logits
from compressor.core.errors import CompressorError
from compressor.training.losses import DistillationLoss
from compressor.training.omitted_classes import (
    apply_bias_shift,
    fit_bias_shift,
    keep_rows,
    parse_class_list,
)

NUM_CLASSES = 10
# The paper's MNIST figures (10,000 test digits): errors overall and on the omitted classes, before → after.
PAPER = {
    "omit": {"omitted": "3", "test_errors": 206, "errors_on_omitted": 133, "omitted_test_rows": 1010,
             "shift": 3.5, "test_errors_after": 109, "errors_on_omitted_after": 14},
    "keep": {"kept": "7, 8", "test_error_rate": 0.473, "shift": 7.6, "test_error_rate_after": 0.132},
    "distilled on all classes (T = 20)": {"test_errors": 74},
}


def complement(kept: tuple[int, ...], num_classes: int = NUM_CLASSES) -> tuple[int, ...]:
    """The classes a transfer set that keeps only ``kept`` omits."""
    return tuple(c for c in range(num_classes) if c not in kept)


def class_names(classes: tuple[int, ...]) -> str:
    """``dress`` or, for most of the classes, ``all but sneaker, bag``."""
    if len(classes) > NUM_CLASSES // 2:
        return "all but " + class_names(complement(classes))
    return ", ".join(FASHION_MNIST_CLASSES[c] for c in classes)


def score(logits: Tensor, y: Tensor, classes: tuple[int, ...]) -> dict:
    """Errors of ``logits`` (N, C) against ``y`` (N,): overall, and on the rows whose label is in ``classes``."""
    wrong = logits.argmax(1) != y  # (N,)
    on = ~keep_rows(y, classes)  # (N,) rows of the omitted classes
    return {"test_errors": int(wrong.sum()), "errors_on_omitted": int((wrong & on).sum()),
            "omitted_test_rows": int(on.sum()), "test_rows": len(y)}


def bias_fix_row(transfer: str, model: nn.Module, classes: tuple[int, ...], xv: Tensor, yv: Tensor, xt: Tensor,
                 yt: Tensor, max_shift: float, step: float) -> dict:
    """Fit the shift for ``classes`` on validation, apply it to ``model`` in place, and score test before/after.

    Also the shift that is best on test itself, the paper's choice ("which optimizes overall performance on the test
    set"): an optimistic bound, reported beside ours so the two protocols can be told apart."""
    test_logits = predict_logits(model, xt)  # (N, C)
    before = score(test_logits, yt, classes)
    fix = fit_bias_shift(predict_logits(model, xv), yv, classes, max_shift, step)
    apply_bias_shift(model, classes, fix.shift)
    after = score(predict_logits(model, xt), yt, classes)
    apply_bias_shift(model, classes, -fix.shift)  # leave the model as trained: the next control starts from it
    on_test = fit_bias_shift(test_logits, yt, classes, max_shift, step)
    return {"transfer": transfer, "omitted": list(classes), "omitted_names": class_names(classes), **before,
            "bias_fix": fix.to_dict(), "test_errors_after": after["test_errors"],
            "errors_on_omitted_after": after["errors_on_omitted"],
            "shift_at_search_limit": fix.shift >= max_shift - step / 2,
            "test_optimal_shift": on_test.shift,
            "test_errors_at_test_optimal_shift": round((1 - on_test.val_accuracy_after) * len(yt))}


def main(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    started = time.perf_counter()
    torch.set_num_threads(args.threads or torch.get_num_threads())
    data = load_fashion(args.max_train)
    runs = Runs(data, args, console, prefix="paper-omitted-class-")
    _, teacher_logits = train_teacher_ensemble(runs)  # (K, N, 10) on the whole training split
    loss = DistillationLoss(args.temperature, args.alpha)
    # paper_table's name for the reference; a non-default α is named too, or its α = 0.9 run would be reused
    base = f"distilled 2×800 T={args.temperature:g}" + ("" if args.alpha == 0.9 else f" α={args.alpha:g}")
    scenarios = [("omit", args.omitted), ("keep", complement(args.kept))]
    fixes: list[dict] = []

    # the reference: paper_table's own run, same name and settings, so a finished one in --work-dir is reused
    reference = mlp_student(800, args.seed)
    ref_row = runs.train(base, reference, loss, teacher_logits)
    ref_row["reused"] = ref_row["resumed_from_epoch"] == args.epochs
    for kind, classes in scenarios:
        fixes.append(bias_fix_row(f"all classes (control, --{kind})", reference, classes, data.xv, data.yv,
                                  data.xt, data.yt, args.max_shift, args.shift_step))
        mask = keep_rows(data.y, classes)  # (N,) the transfer set's rows
        spec = ",".join(map(str, args.omitted if kind == "omit" else args.kept))
        fingerprint = {"transfer_set": f"{kind} {spec}", "transfer_rows": int(mask.sum()),
                       "temperature": args.temperature, "alpha": args.alpha}
        student = mlp_student(800, args.seed)
        row = runs.train(f"{base} {kind} {spec}", student, loss, teacher_logits[:, mask], x=data.x[mask],
                         y=data.y[mask], fingerprint=fingerprint)
        row["transfer_rows"] = int(mask.sum())
        label = f"without {class_names(classes)}" if kind == "omit" else f"only {class_names(args.kept)}"
        fixes.append({**bias_fix_row(label, student, classes, data.xv, data.yv, data.xt, data.yt, args.max_shift,
                                     args.shift_step), "scenario": kind, "transfer_rows": int(mask.sum())})

    result = {**record(args, data), "rows": runs.rows, "bias_fixes": fixes, "paper_mnist": PAPER,
              "reference_reused": ref_row["reused"], "wall_seconds": round(time.perf_counter() - started, 1)}
    return write_result(result, args, "paper_omitted_class", print_table, console)


def paper_cells(fix: dict) -> tuple[str, str]:
    """The paper's before and after for this row's scenario, in the form our row is given."""
    scenario = fix.get("scenario")
    if scenario == "omit":
        p = PAPER["omit"]
        return (f"{p['test_errors']} ({p['errors_on_omitted']} / {p['omitted_test_rows']:,})",
                f"{p['test_errors_after']} ({p['errors_on_omitted_after']}), shift {p['shift']}")
    if scenario == "keep":
        p = PAPER["keep"]
        return f"{p['test_error_rate']:.1%} error", f"{p['test_error_rate_after']:.1%}, shift {p['shift']}"
    return "", ""


def print_table(result: dict) -> None:
    """Ours beside the paper's: test errors overall (omitted classes in brackets), before and after the fix."""
    table = Table(title="Hinton et al. 2015 §3, omitted classes, on Fashion-MNIST "
                        f"(T = {result['settings']['temperature']:g}; test errors, on the omitted classes in brackets)")
    for column in ("transfer set", "rows", "shifted classes", "before", "fitted shift", "val acc before → after",
                   "after", "best on test (shift)", "paper (MNIST) before", "paper after"):
        table.add_column(column, justify="left" if column in ("transfer set", "shifted classes") else "right")
    for fix in result["bias_fixes"]:
        n = fix["test_rows"]
        shift = fix["bias_fix"]["shift"]
        paper_before, paper_after = paper_cells(fix)
        table.add_row(
            fix["transfer"], f"{fix.get('transfer_rows', '')}", fix["omitted_names"],
            f"{fix['test_errors']} ({fix['errors_on_omitted']} / {fix['omitted_test_rows']:,}) "
            f"{fix['test_errors'] / n:.1%}",
            f"{shift:g}" + (" (limit)" if fix["shift_at_search_limit"] else ""),
            f"{fix['bias_fix']['val_accuracy_before']:.2%} → {fix['bias_fix']['val_accuracy_after']:.2%}",
            f"{fix['test_errors_after']} ({fix['errors_on_omitted_after']}) {fix['test_errors_after'] / n:.1%}",
            f"{fix['test_errors_at_test_optimal_shift']} ({fix['test_optimal_shift']:g})", paper_before, paper_after)
    Console(width=240).print(table)
    reused = "reused from --work-dir" if result["reference_reused"] else "TRAINED HERE (not reused)"
    print(f"reference (all classes): {reused}; the paper's 2×800 distilled on all classes at T = 20 made 74 errors")
    print("fitted shift: on the validation split; 'best on test': the shift chosen on test itself, as the paper did "
          "(optimistic)")
    print(f"wall time {result['wall_seconds'] / 60:.1f} min on {result['machine']['processor']}, "
          f"{result['machine']['threads']} threads")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10,000 training images and fewer epochs")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per student (full 40, quick 6)")
    parser.add_argument("--temperature", type=float, default=4.0, help="soft-target temperature (paper's 2×800: 20)")
    parser.add_argument("--alpha", type=float, default=0.9, help="weight of the soft-target term")
    parser.add_argument("--omit", default="3", help="classes removed from the first transfer set, by index or "
                                                    "name (default 3: dress)")
    parser.add_argument("--keep", default="7,8", help="the only classes of the second transfer set "
                                                      "(default 7,8: sneaker, bag)")
    parser.add_argument("--max-shift", type=float, default=20.0, help="bias shifts searched: 0 to this")
    parser.add_argument("--shift-step", type=float, default=0.05, help="grid step of the bias shift search")
    add_teacher_arguments(parser)
    add_run_arguments(parser)
    args = resolve_defaults(parser.parse_args(argv))
    args.epochs = args.epochs or STUDENT_EPOCHS["quick" if args.quick else "full"]
    for flag in ("omit", "keep"):
        try:
            classes = parse_class_list(getattr(args, flag), FASHION_MNIST_CLASSES, NUM_CLASSES)
        except CompressorError as exc:
            parser.error(f"--{flag}: {exc}")
        setattr(args, "omitted" if flag == "omit" else "kept", classes)
    return args


if __name__ == "__main__":
    sys.exit(main(parse_args()))
