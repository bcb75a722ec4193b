"""Tests for compressor/distill.py: learning, determinism, exact resume, checkpoint safety, best-epoch keeping."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compressor.training.loop import TrainConfig, TrainResult, train_student
from compressor.core.inference import evaluate_accuracy, predict_logits
from compressor.data.augment import uniform
from compressor.core.errors import CompressorError

D, C, H = 8, 3, 32  # features, classes, hidden units


def make_problem(n_train: int = 384, n_val: int = 192, seed: int = 123):
    """Three linearly separable classes in D dimensions, plus two noisy teachers' logits (K=2, N, C)."""
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(D, C, generator=g)  # (D, C)

    def sample(n):
        x = torch.randn(n, D, generator=g)  # (n, D)
        return x, (x @ w_true).argmax(dim=1)

    x_train, y_train = sample(n_train)
    x_val, y_val = sample(n_val)
    clean = 3.0 * (x_train @ w_true)  # (N, C)
    teachers = torch.stack([clean + 0.3 * torch.randn(n_train, C, generator=g) for _ in range(2)])  # (2, N, C)
    return x_train, y_train, teachers, x_val, y_val


def make_student(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)  # same weights for the same seed
    return nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Dropout(0.1), nn.Linear(H, C))


def hard_label_loss(s, t, y):
    return F.cross_entropy(s, y, ignore_index=-1)


def teacher_kl_loss(s, t, y, T: float = 2.0):
    """T^2 * KL(mean teacher softmax || student softmax at T); ignores labels."""
    p_t = F.softmax(t / T, dim=-1).mean(dim=0)  # (B, C)
    return T * T * F.kl_div(F.log_softmax(s / T, dim=-1), p_t, reduction="batchmean")


def cfg(**kw) -> TrainConfig:
    base = dict(epochs=6, batch_size=64, lr=1e-2, weight_decay=1e-4, seed=7, progress=False)
    base.update(kw)
    return TrainConfig(**base)


class Interrupted(Exception):
    pass


def interrupt_at(step: int, inner=hard_label_loss):
    """A loss that raises on its ``step``-th call (0-based), as if the process were killed there."""
    calls = {"n": 0}

    def loss(s, t, y):
        if calls["n"] == step:
            raise Interrupted
        calls["n"] += 1
        return inner(s, t, y)

    return loss


def switch_after(calls_before: int, normal, changed):
    """A loss that is ``normal`` for its first ``calls_before`` calls and ``changed`` from then on."""
    calls = {"n": 0}

    def loss(s, t, y):
        calls["n"] += 1
        return (changed if calls["n"] > calls_before else normal)(s, t, y)

    return loss


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def problem():
    return make_problem()


def test_learns_from_hard_labels(problem, tmp_path):
    x, y, _, xv, yv = problem
    student = make_student()
    res = train_student(student, x, y, None, xv, yv, hard_label_loss, cfg(epochs=10), tmp_path)
    assert isinstance(res, TrainResult)
    assert res.best_val_accuracy > 0.9
    assert not student.training  # returned in eval mode
    assert [h["epoch"] for h in res.history] == list(range(1, 11))
    assert set(res.history[0]) == {"epoch", "train_loss", "train_accuracy", "val_accuracy", "lr", "seconds",
                                   "view_seconds"}
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    # cosine schedule: starts at lr and decays
    assert res.history[0]["lr"] == pytest.approx(1e-2)
    assert res.history[-1]["lr"] < res.history[0]["lr"] / 10
    assert res.resumed_from_epoch == 0
    assert res.to_dict()["best_epoch"] == res.best_epoch


def test_learns_from_teacher_logits_without_labels(problem, tmp_path):
    x, _, t, xv, yv = problem
    unlabeled = torch.full((len(x),), -1, dtype=torch.int64)
    student = make_student()
    res = train_student(student, x, unlabeled, t, xv, yv, teacher_kl_loss, cfg(epochs=10), tmp_path)
    assert res.best_val_accuracy > 0.9
    assert res.history[0]["train_accuracy"] is None  # no labeled rows to score


def test_teacher_logits_batch_matches_rows(problem, tmp_path):
    """The loss sees teacher_logits[:, idx] for the same idx as the inputs and labels."""
    x, y, t, xv, yv = problem
    # encode the row index in the inputs and in the teacher logits, then check they agree per batch
    rows = torch.arange(len(x), dtype=torch.float32)
    x_tagged = torch.cat([x, rows[:, None]], dim=1)  # (N, D+1)
    t_tagged = t.clone()
    t_tagged[..., 0] = rows  # (K, N, C)
    seen = []

    class Tagged(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(D, C)

        def forward(self, xb):
            self.last_rows = xb[:, -1].clone()
            return self.lin(xb[:, :-1])

    model = Tagged()

    def loss(s, tb, yb):
        assert tb.shape == (2, len(yb), C)
        assert torch.equal(tb[0, :, 0], model.last_rows) and torch.equal(tb[1, :, 0], model.last_rows)
        assert torch.equal(yb, y[model.last_rows.long()])
        seen.append(model.last_rows.long())
        return F.cross_entropy(s, yb)

    xv_tagged = torch.cat([xv, torch.zeros(len(xv), 1)], dim=1)
    train_student(model, x_tagged, y, t_tagged, xv_tagged, yv, loss, cfg(epochs=2), tmp_path)
    per_epoch = len(seen) // 2
    for e in range(2):  # every row exactly once per epoch, and the two epochs shuffle differently
        assert torch.equal(torch.cat(seen[e * per_epoch : (e + 1) * per_epoch]).sort().values, torch.arange(len(x)))
    assert not torch.equal(torch.cat(seen[:per_epoch]), torch.cat(seen[per_epoch:]))


def test_same_seed_same_weights(problem, tmp_path):
    x, y, _, xv, yv = problem
    a, b = make_student(), make_student()
    ra = train_student(a, x, y, None, xv, yv, hard_label_loss, cfg(epochs=3), tmp_path / "a")
    rb = train_student(b, x, y, None, xv, yv, hard_label_loss, cfg(epochs=3), tmp_path / "b")
    assert_same_weights(a, b)
    assert [h["train_loss"] for h in ra.history] == [h["train_loss"] for h in rb.history]
    # and a different seed gives a different run (the seed is actually used)
    c = make_student()
    train_student(c, x, y, None, xv, yv, hard_label_loss, cfg(epochs=3, seed=8), tmp_path / "c")
    assert any(not torch.equal(p, q) for p, q in zip(a.state_dict().values(), c.state_dict().values()))


@pytest.mark.parametrize("interrupt_epoch", [3, 4])
def test_resume_equals_uninterrupted(problem, tmp_path, interrupt_epoch):
    x, y, t, xv, yv = problem
    config = cfg(epochs=4)
    full = make_student()
    r_full = train_student(full, x, y, t, xv, yv, hard_label_loss, config, tmp_path / "full")

    steps_per_epoch = -(-len(x) // config.batch_size)
    broken = make_student()
    # die in the middle of epoch `interrupt_epoch`: its partial updates must not leak into the resumed run
    with pytest.raises(Interrupted):
        train_student(broken, x, y, t, xv, yv, interrupt_at((interrupt_epoch - 1) * steps_per_epoch + 2),
                      config, tmp_path / "resumed")
    ckpt = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == interrupt_epoch - 1

    resumed = make_student(seed=99)  # different initial weights: everything must come from last.pt
    r_res = train_student(resumed, x, y, t, xv, yv, hard_label_loss, config, tmp_path / "resumed", resume=True)
    assert r_res.resumed_from_epoch == interrupt_epoch - 1
    assert_same_weights(full, resumed)
    assert r_res.best_epoch == r_full.best_epoch
    assert r_res.best_val_accuracy == r_full.best_val_accuracy
    strip = lambda h: [{k: v for k, v in e.items() if k not in ("seconds", "view_seconds")} for e in h]  # noqa: E731
    assert strip(r_res.history) == strip(r_full.history)

    # last.pt after both runs holds identical final training state
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    for k in a["model_state"]:
        assert torch.equal(a["model_state"][k], b["model_state"][k])
    assert torch.equal(a["rng_state"], b["rng_state"])


def test_resume_when_all_epochs_done_just_returns_best(problem, tmp_path):
    x, y, _, xv, yv = problem
    first = make_student()
    r1 = train_student(first, x, y, None, xv, yv, hard_label_loss, cfg(epochs=2), tmp_path)

    def never(s, t, y):
        raise AssertionError("no training expected")

    again = make_student(seed=5)
    r2 = train_student(again, x, y, None, xv, yv, never, cfg(epochs=2, progress=True), tmp_path, resume=True)
    assert_same_weights(first, again)
    assert (r2.best_epoch, r2.best_val_accuracy, r2.resumed_from_epoch) == (r1.best_epoch, r1.best_val_accuracy, 2)


def test_resume_without_checkpoint_starts_fresh(problem, tmp_path):
    x, y, _, xv, yv = problem
    a, b = make_student(), make_student()
    train_student(a, x, y, None, xv, yv, hard_label_loss, cfg(epochs=2), tmp_path / "a")
    r = train_student(b, x, y, None, xv, yv, hard_label_loss, cfg(epochs=2), tmp_path / "b", resume=True)
    assert r.resumed_from_epoch == 0
    assert_same_weights(a, b)


def test_no_resume_overwrites_existing_checkpoint(problem, tmp_path):
    x, y, _, xv, yv = problem
    train_student(make_student(), x, y, None, xv, yv, hard_label_loss, cfg(epochs=2, lr=1e-3), tmp_path,
                  fingerprint={"teacher": "old"})
    r = train_student(make_student(), x, y, None, xv, yv, hard_label_loss, cfg(epochs=3), tmp_path,
                      fingerprint={"teacher": "new"})
    assert r.resumed_from_epoch == 0 and len(r.history) == 3
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["fingerprint"] == {"teacher": "new"} and ckpt["config"]["lr"] == 1e-2


def test_resume_with_different_fingerprint_or_config_raises(problem, tmp_path):
    x, y, _, xv, yv = problem
    fp = {"teacher_sha256": "abc", "student": {"name": "mlp", "hidden": 32}, "loss": {"T": 4.0}}
    train_student(make_student(), x, y, None, xv, yv, hard_label_loss, cfg(epochs=2), tmp_path, fingerprint=fp)

    other = {**fp, "student": {"name": "mlp", "hidden": 64}}
    with pytest.raises(CompressorError) as err:
        train_student(make_student(), x, y, None, xv, yv, hard_label_loss, cfg(epochs=2), tmp_path,
                      resume=True, fingerprint=other)
    msg = str(err.value)
    assert "last.pt" in msg and "student.hidden" in msg and "--resume" in msg and "--out" in msg
    assert "teacher_sha256" not in msg

    with pytest.raises(CompressorError, match=r"lr"):
        train_student(make_student(), x, y, None, xv, yv, hard_label_loss, cfg(epochs=2, lr=1e-3), tmp_path,
                      resume=True, fingerprint=fp)
    # the progress flag is cosmetic and may change between runs
    r = train_student(make_student(), x, y, None, xv, yv, hard_label_loss, cfg(epochs=2, progress=True), tmp_path,
                      resume=True, fingerprint=fp)
    assert r.resumed_from_epoch == 2


@pytest.mark.parametrize("content", [b"", bytes(range(256)) * 8])
def test_corrupt_checkpoint_raises_naming_file(problem, tmp_path, content):
    x, y, _, xv, yv = problem
    (tmp_path / "last.pt").write_bytes(content)
    with pytest.raises(CompressorError) as err:
        train_student(make_student(), x, y, None, xv, yv, hard_label_loss, cfg(epochs=1), tmp_path, resume=True)
    assert str(tmp_path / "last.pt") in str(err.value)


def test_checkpoint_of_another_kind_raises(problem, tmp_path):
    x, y, _, xv, yv = problem
    torch.save({"weights": torch.zeros(3)}, tmp_path / "last.pt")
    with pytest.raises(CompressorError, match="last.pt"):
        train_student(make_student(), x, y, None, xv, yv, hard_label_loss, cfg(epochs=1), tmp_path, resume=True)


def test_nan_loss_raises_and_keeps_earlier_checkpoints(problem, tmp_path):
    x, y, _, xv, yv = problem
    steps_per_epoch = -(-len(x) // 64)
    loss = switch_after(2 * steps_per_epoch + 1, hard_label_loss,
                        lambda s, t, yb: hard_label_loss(s, t, yb) * float("nan"))

    with pytest.raises(CompressorError) as err:
        train_student(make_student(), x, y, None, xv, yv, loss, cfg(epochs=4), tmp_path)
    assert "epoch 3" in str(err.value) and "--lr" in str(err.value)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 2
    assert not list(tmp_path.glob("*.tmp"))


def test_no_temp_files_left_and_checkpoints_load_weights_only(problem, tmp_path):
    x, y, _, xv, yv = problem
    with pytest.raises(Interrupted):
        train_student(make_student(), x, y, None, xv, yv, interrupt_at(8), cfg(epochs=3), tmp_path)
    train_student(make_student(), x, y, None, xv, yv, hard_label_loss, cfg(epochs=3), tmp_path, resume=True,
                  fingerprint=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert {"model_state", "optimizer_state", "scheduler_state", "epoch", "best_epoch", "best_val_accuracy",
            "history", "rng_state", "config", "fingerprint"} <= set(last)
    assert last["config"] == {"epochs": 3, "batch_size": 64, "lr": 1e-2, "weight_decay": 1e-4, "seed": 7,
                              "amp": "none", "progress": False}


def test_best_epoch_weights_are_returned(problem, tmp_path):
    """Train well for 2 epochs, then on shuffled-wrong labels: the best epoch is early and its weights come back."""
    x, y, _, xv, yv = problem
    steps_per_epoch = -(-len(x) // 64)
    sabotage = switch_after(2 * steps_per_epoch, lambda s, t, yb: F.cross_entropy(s, yb),
                            lambda s, t, yb: F.cross_entropy(s, (yb + 1) % C))

    student = make_student()
    res = train_student(student, x, y, None, xv, yv, sabotage, cfg(epochs=5, lr=3e-2), tmp_path)
    accs = [h["val_accuracy"] for h in res.history]
    assert res.best_epoch <= 2 and accs[-1] < res.best_val_accuracy  # the sabotage worked
    assert res.best_val_accuracy == max(accs) == accs[res.best_epoch - 1]
    assert evaluate_accuracy(student, xv, yv) == res.best_val_accuracy
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["epoch"] == res.best_epoch and best["val_accuracy"] == res.best_val_accuracy
    for k, v in student.state_dict().items():
        assert torch.equal(best["model_state"][k], v)


def test_evaluate_accuracy_skips_unlabeled_and_predict_logits_batches():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x = torch.randn(10, 4)
    logits = predict_logits(model, x, batch_size=3)  # uneven batches
    assert logits.shape == (10, 3)
    torch.testing.assert_close(logits, model(x).detach())
    preds = logits.argmax(1)
    y = preds.clone()
    y[:4] = (preds[:4] + 1) % 3  # 4 wrong
    y[4:6] = -1  # 2 unlabeled: 4 right of 8 labeled
    assert evaluate_accuracy(model, x, y, batch_size=3) == pytest.approx(0.5)
    assert evaluate_accuracy(model, x, torch.full((10,), -1)) != evaluate_accuracy(model, x, torch.full((10,), -1))  # nan
    model.train()
    predict_logits(model, x)
    assert model.training  # mode restored


def test_bad_shapes_raise(problem, tmp_path):
    x, y, t, xv, yv = problem
    with pytest.raises(CompressorError, match="teacher logits"):
        train_student(make_student(), x, y, t[:, :10], xv, yv, teacher_kl_loss, cfg(epochs=1), tmp_path)
    with pytest.raises(CompressorError, match="no labeled"):
        train_student(make_student(), x, y, None, xv, torch.full_like(yv, -1), hard_label_loss, cfg(epochs=1), tmp_path)


def test_a_view_sees_every_training_batch_and_is_reproducible(tmp_path):
    """The hook transforms training batches only, as a function of (row, epoch), and reruns identically."""
    x, y, _, xv, yv = make_problem()
    seen: list[int] = []

    def noisy(xb: torch.Tensor, rows: torch.Tensor, epoch: int) -> torch.Tensor:
        seen.append(len(xb))
        return xb + 0.1 * (uniform(rows, epoch, 0, 9).float()[:, None] - 0.5)

    a = make_student()
    train_student(a, x, y, None, xv, yv, hard_label_loss, cfg(epochs=2), tmp_path / "a", view=noisy)
    assert sum(seen) == 2 * len(x)  # every training row, every epoch; validation never goes through it
    b = make_student()
    train_student(b, x, y, None, xv, yv, hard_label_loss, cfg(epochs=2), tmp_path / "b", view=noisy)
    plain = make_student()
    train_student(plain, x, y, None, xv, yv, hard_label_loss, cfg(epochs=2), tmp_path / "c")
    for p, q, r in zip(a.parameters(), b.parameters(), plain.parameters()):
        assert torch.equal(p, q)  # same seed, same noise
    assert any(not torch.equal(p, r) for p, r in zip(a.parameters(), plain.parameters()))  # the noise mattered


def test_partial_writes_left_by_a_killed_run_are_removed_on_the_next_start(problem, tmp_path):
    """A SIGKILL during torch.save leaves `.last.pt.<random>.tmp` beside the checkpoints; the next run deletes it
    and never reads it (tests/compressor/test_kill_resume.py kills real processes)."""
    x, y, _, xv, yv = problem
    with pytest.raises(Interrupted):
        train_student(make_student(), x, y, None, xv, yv, interrupt_at(len(x) // 64 + 2), cfg(epochs=2), tmp_path)
    for name in (".last.pt.abc123.tmp", ".best.pt.def456.tmp"):
        (tmp_path / name).write_bytes(b"half a checkpoint")
    (tmp_path / "notes.txt").write_text("the user's own file stays")
    result = train_student(make_student(), x, y, None, xv, yv, hard_label_loss, cfg(epochs=2), tmp_path, resume=True)
    assert result.resumed_from_epoch == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt", "notes.txt"]


def test_a_checkpoint_from_before_a_new_setting_resumes_as_its_default(problem, tmp_path):
    """Checkpoints written before TrainConfig gained `amp` hold no such key; they were trained with its default."""
    x, y, _, xv, yv = problem
    train_student(make_student(), x, y, None, xv, yv, hard_label_loss, cfg(epochs=2), tmp_path)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    del last["config"]["amp"]
    torch.save(last, tmp_path / "last.pt")
    result = train_student(make_student(), x, y, None, xv, yv, hard_label_loss, cfg(epochs=2), tmp_path, resume=True)
    assert result.resumed_from_epoch == 2
    with pytest.raises(CompressorError, match="amp"):
        train_student(make_student(), x, y, None, xv, yv, hard_label_loss, cfg(epochs=2, amp="bf16"), tmp_path,
                      resume=True)
