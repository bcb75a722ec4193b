"""`compress --resume` after a real SIGKILL: the killed-and-resumed run ends exactly where an uninterrupted one does.

Real `python -m compressor` processes, no mocks. Run A trains uninterrupted. Run B is killed with SIGKILL twice, at
different points (once in the middle of an epoch's training steps, once aimed at the moment a checkpoint is being
written), and resumed with ``--resume`` each time until it finishes. Training is deterministic on the CPU with one
thread, so B must end with A's exact weights, optimizer state, RNG state and history.

Checkpoints are written to a temporary file beside the target and renamed (compressor/fileio.atomic_path), so after
every kill each checkpoint on disk must load with ``weights_only=True`` and be whole. A kill inside a write can leave
the temporary file behind; such a file must never stand in for a checkpoint nor change what the resumed run does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from compressor.training.checkpoints import LAST_NAME
from compressor.training.checkpoints import BEST_NAME, CHECKPOINT_FORMAT

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]
EPOCHS = 16             # 162 steps of batch 8 per epoch on digits: ~0.2 s an epoch, so a kill lands inside training
TIMEOUT_S = 120.0       # for every wait on a child: generous for a slow, shared CI machine; never asserted as timing
LAST_KEYS = {"format", "epoch", "model_state", "optimizer_state", "scheduler_state", "best_epoch", "best_val_accuracy",
             "best_model_state", "history", "rng_state", "config", "fingerprint"}
BEST_KEYS = {"format", "epoch", "val_accuracy", "model_state", "fingerprint"}


def compress_command(teacher: Path, out: Path, *extra: str) -> list[str]:
    """The same job for every run; only --out and --resume change."""
    return [sys.executable, "-m", "compressor", "--teacher", str(teacher), "--data", "digits",
            "--student", "mlp:64x64", "--epochs", str(EPOCHS), "--batch-size", "8", "--out", str(out),
            # the CPU, one thread: bit-reproducible arithmetic, and room for the other run on a 2-core machine
            "--device", "cpu", "--threads", "1",
            "--no-progress",
            # the benchmark after training is not under test: a few milliseconds of it
            "--batch-sizes", "1", "--warmup", "0", "--duration", "0.01", "--rounds", "1", *extra]


class Child:
    """One `compress` process; its output goes to a log file, which a full pipe could never block."""

    def __init__(self, args: list[str], log: Path):
        self.log = log
        # os.environ as is (the conftest's TRITON_INTERPRET included); PYTHONHASHSEED is deliberately left random,
        # so a resume that depended on set or dict-of-str ordering would show up here as a mismatch.
        with open(log, "wb") as sink:
            self.proc = subprocess.Popen(args, cwd=REPO, env=dict(os.environ), stdout=sink, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def wait_success(self) -> None:
        try:
            code = self.proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.log.stem} did not finish within {TIMEOUT_S:.0f} s:\n{self.output()}")
        assert code == 0, f"{self.log.stem} exited with code {code}:\n{self.output()}"

    def sigkill(self) -> None:
        """SIGKILL the process and check that the kill, not the program, ended it."""
        os.kill(self.proc.pid, signal.SIGKILL)
        code = self.proc.wait(timeout=TIMEOUT_S)
        assert code == -signal.SIGKILL, (
            f"{self.log.stem} ended by itself (code {code}) before it could be killed, so nothing was interrupted; "
            f"lengthen training (EPOCHS) or kill earlier:\n{self.output()}")


@pytest.fixture
def start(tmp_path):
    """``start(name, args) -> Child``; whatever is still running at the end of the test is killed."""
    children: list[Child] = []

    def _start(name: str, args: list[str]) -> Child:
        children.append(Child(args, tmp_path / f"{name}.log"))
        return children[-1]

    yield _start
    for child in children:
        if child.proc.poll() is None:
            child.proc.kill()
            child.proc.wait()


def signature(path: Path) -> tuple[int, int, int] | None:
    """Changes whenever a new file is renamed onto ``path`` (new inode, new mtime); None while there is none."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def poll_checkpoint(path: Path, read_errors: list[str]) -> dict | None:
    """``path`` loaded, or None while it does not exist yet.

    The writer replaces the file with os.replace, so a read sees the old file or the new one, whole. A read that
    fails anyway is recorded (the test fails on it after the kill) and reported as not there, so polling goes on.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - any unpickling error means a half-written file was visible
        read_errors.append(f"{path.name}: {type(exc).__name__}: {exc}")
        return None


def wait_for_epoch(child: Child, ckpt_dir: Path, epoch: int, floor: int, read_errors: list[str]) -> dict:
    """Poll last.pt until it records ``epoch`` or later and return it; it must never go below ``floor``."""
    last, seen, ckpt = ckpt_dir / LAST_NAME, None, None
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        if child.proc.poll() is not None:
            pytest.fail(f"{child.log.stem} exited (code {child.proc.returncode}) before last.pt reached epoch "
                        f"{epoch} of {EPOCHS}:\n{child.output()}")
        now = signature(last)
        if now != seen:  # a new last.pt (or a failed read to retry): load it, else a stat per poll is enough
            ckpt = poll_checkpoint(last, read_errors)
            seen = now if ckpt is not None else None
        if ckpt is not None:
            assert ckpt["epoch"] >= floor, (
                f"last.pt went back from epoch {floor} to {ckpt['epoch']}: --resume started over instead of continuing")
            if ckpt["epoch"] >= epoch:
                return ckpt
        if time.monotonic() > deadline:
            pytest.fail(f"last.pt did not reach epoch {epoch} within {TIMEOUT_S:.0f} s (last seen: "
                        f"{None if ckpt is None else ckpt['epoch']}):\n{child.output()}")
        time.sleep(0.02)


def temp_files(ckpt_dir: Path) -> set[str]:
    """Names of atomic_path's temporary files (``.<target>.<random>.tmp``) in the checkpoint folder."""
    return {name for name in os.listdir(ckpt_dir) if name.startswith(".") and name.endswith(".tmp")}


def kill_mid_write(child: Child, ckpt_dir: Path, max_writes: int = 3) -> bool:
    """SIGKILL ``child`` the moment a new checkpoint temp file appears, i.e. inside ``torch.save``.

    Busy-polls the folder; if ``max_writes`` more writes of last.pt go by without the poll catching a temp file
    (a loaded machine), kills right after the last one instead. Returns whether a temp file was caught.
    """
    last = ckpt_dir / LAST_NAME
    before = temp_files(ckpt_dir)
    seen, writes, caught = signature(last), 0, False
    deadline = time.monotonic() + TIMEOUT_S
    while writes < max_writes and not caught:
        caught = bool(temp_files(ckpt_dir) - before)
        now = signature(last)
        writes, seen = writes + (now != seen), now
        if child.proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{child.log.stem} ended or stalled while waiting for a checkpoint write:\n{child.output()}")
    child.sigkill()
    return caught


def assert_whole_checkpoints(ckpt_dir: Path, read_errors: list[str], when: str) -> dict:
    """Both checkpoints load with ``weights_only=True``, have their format and keys, and agree; returns last.pt."""
    assert not read_errors, f"{when}: a reader saw a half-written checkpoint: {read_errors}"
    try:
        last = torch.load(ckpt_dir / LAST_NAME, map_location="cpu", weights_only=True)
        best = torch.load(ckpt_dir / BEST_NAME, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"{when}: a checkpoint in {ckpt_dir} does not load ({type(exc).__name__}: {exc}); "
                    f"files: {sorted(os.listdir(ckpt_dir))}")
    assert last["format"] == best["format"] == CHECKPOINT_FORMAT, when
    assert LAST_KEYS <= last.keys() and BEST_KEYS <= best.keys(), f"{when}: {sorted(last)}, {sorted(best)}"
    assert [h["epoch"] for h in last["history"]] == list(range(1, last["epoch"] + 1)), when
    assert last["model_state"].keys() == best["model_state"].keys() == last["best_model_state"].keys(), when
    # best.pt is written before last.pt, so a kill between the two leaves best.pt one epoch ahead (that epoch reruns)
    if best["epoch"] == last["best_epoch"]:
        assert_identical(best["model_state"], last["best_model_state"], f"{when}: best.pt vs last.pt best_model_state")
    else:
        assert best["epoch"] == last["epoch"] + 1, f"{when}: best.pt epoch {best['epoch']}, last.pt {last['epoch']}"
    return last


def assert_identical(a, b, where: str) -> None:
    """Nested dicts, lists and tensors are equal exactly: same keys and lengths, same dtypes, bit-equal values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: a tensor against {type(b).__name__}"
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{where}: {a.dtype}{list(a.shape)}, {b.dtype}{list(b.shape)}"
        if not torch.equal(a, b):
            pytest.fail(f"{where} differs: max |difference| {(a.double() - b.double()).abs().max().item():.3g}")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {list(a)} vs {list(b)}"
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def without_seconds(history: list[dict]) -> list[dict]:
    timings = ("seconds", "view_seconds")  # wall time differs run to run
    return [{k: v for k, v in entry.items() if k not in timings} for entry in history]


def test_sigkill_twice_then_resume_equals_uninterrupted_run(digits_ensemble, tmp_path, start):
    a_out, b_out = tmp_path / "A", tmp_path / "B"
    b_ckpt = b_out / "checkpoints"
    read_errors: list[str] = []
    # A runs beside B's kill cycles (one thread each on a 2-core machine); it is only read at the end
    run_a = start("A", compress_command(digits_ensemble, a_out))

    # kill 1: in the middle of an epoch's training steps, half an epoch after last.pt recorded epoch 2
    run_b = start("B-fresh", compress_command(digits_ensemble, b_out))
    seen = wait_for_epoch(run_b, b_ckpt, epoch=2, floor=0, read_errors=read_errors)
    time.sleep(seen["history"][-1]["seconds"] / 2)
    run_b.sigkill()
    first = assert_whole_checkpoints(b_ckpt, read_errors, "after kill 1")
    assert seen["epoch"] <= first["epoch"] < EPOCHS, f"kill 1 did not interrupt training (epoch {first['epoch']})"
    leftovers = {"kill 1": sorted(temp_files(b_ckpt))}

    # What a kill inside torch.save leaves behind, planted for certain: half of last.pt, and an empty file (a kill
    # right after mkstemp). Neither may ever become a checkpoint nor change the resumed run.
    planted = {b_ckpt / ".last.pt.planted.tmp": (b_ckpt / LAST_NAME).read_bytes()[:40_000],
               b_ckpt / ".best.pt.planted.tmp": b""}
    for path, content in planted.items():
        path.write_bytes(content)

    # kill 2: resumed, at a later epoch, aimed at the instant a checkpoint is being written
    run_b = start("B-resume-1", compress_command(digits_ensemble, b_out, "--resume"))
    wait_for_epoch(run_b, b_ckpt, epoch=first["epoch"] + 2, floor=first["epoch"], read_errors=read_errors)
    caught_mid_write = kill_mid_write(run_b, b_ckpt)
    second = assert_whole_checkpoints(b_ckpt, read_errors, "after kill 2")
    assert first["epoch"] < second["epoch"] < EPOCHS, (
        f"kill 2 did not land later in training (epochs {first['epoch']} -> {second['epoch']} of {EPOCHS})")
    leftovers["kill 2"] = sorted(temp_files(b_ckpt))

    # resume to the end
    run_b = start("B-resume-2", compress_command(digits_ensemble, b_out, "--resume"))
    run_b.wait_success()
    run_a.wait_success()
    final = assert_whole_checkpoints(b_ckpt, read_errors, "after the final resume")
    assert final["epoch"] == EPOCHS
    for path, content in planted.items():  # left alone or cleaned up, never renamed onto a checkpoint
        assert not path.exists() or path.read_bytes() == content, f"{path.name} was modified"
    leftovers["end"] = sorted(temp_files(b_ckpt))
    assert not leftovers["end"], f"partial writes survived the resume: {leftovers}"  # train_student removes them

    # B ends with A's exact training state: weights, best weights, optimizer, schedule, RNG, history
    last_a = torch.load(a_out / "checkpoints" / LAST_NAME, map_location="cpu", weights_only=True)
    best_a = torch.load(a_out / "checkpoints" / BEST_NAME, map_location="cpu", weights_only=True)
    best_b = torch.load(b_ckpt / BEST_NAME, map_location="cpu", weights_only=True)
    assert_identical(last_a["model_state"], final["model_state"], "last.pt model_state")
    assert_identical(last_a["best_model_state"], final["best_model_state"], "last.pt best_model_state")
    assert_identical(best_a["model_state"], best_b["model_state"], "best.pt model_state")
    assert_identical({k: v for k, v in last_a.items() if k != "history"},
                     {k: v for k, v in final.items() if k != "history"}, "last.pt")
    assert_identical(without_seconds(last_a["history"]), without_seconds(final["history"]), "last.pt history")
    assert_identical(torch.jit.load(a_out / "student.pt").state_dict(),
                     torch.jit.load(b_out / "student.pt").state_dict(), "student.pt")

    # the report says B resumed, from where kill 2 left it, and otherwise tells A's story
    report_a, report_b = (json.loads((out / "report.json").read_text()) for out in (a_out, b_out))
    training_a, training_b = report_a["student"]["training"], report_b["student"]["training"]
    assert not report_a["config"]["resume"] and report_b["config"]["resume"]
    assert "--resume" in report_b["command"]
    assert training_a["resumed_from_epoch"] == 0
    assert training_b["resumed_from_epoch"] == second["epoch"]
    assert (training_b["best_epoch"], training_b["best_val_accuracy"]) == (
        training_a["best_epoch"], training_a["best_val_accuracy"])
    assert without_seconds(training_b["history"]) == without_seconds(training_a["history"])

    print(f"killed after epochs {first['epoch']} and {second['epoch']} of {EPOCHS} (kill 2 inside a checkpoint "
          f"write: {caught_mid_write}); temp files in B/checkpoints: {leftovers}")
