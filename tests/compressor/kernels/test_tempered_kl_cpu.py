"""Tests for compressor/kernels/tempered_kl_cpu.py against the reference evaluated in float64.

The oracle is ``tempered_kl_reference`` on ``.double()`` copies of the inputs, its gradient from autograd.
Inputs are fresh random draws each run (no fixed seed); ``chunk_rows`` is forced small so that several
chunks, a short last chunk and both worker threads run.
"""

from __future__ import annotations

import pytest
import torch

from compressor.kernels.tempered_kl_cpu import tempered_kl_cpu, tempered_kl_cpu_from_log_probs
from compressor.kernels.tempered_kl_reference import ensemble_log_probs, tempered_kl_reference

# dtype -> (rtol, atol) for the loss and for the gradient (gradient atol relative to its largest entry)
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 1e-2),
    torch.float16: (5e-3, 5e-3),
}


def random_case(n, c, k, dtype, scale=1.0, labels="mixed"):
    s = (torch.randn(n, c, dtype=torch.float64) * scale).to(dtype)  # (N, C)
    t = (torch.randn(k, n, c, dtype=torch.float64) * scale).to(dtype)  # (K, N, C)
    if labels is None:
        return s, t, None
    y = torch.randint(-1, c, (n,))  # (N,)
    y[0], y[-1] = -1, c - 1  # at least one unlabeled and one labeled row
    return s, t, y


def oracle(s, t, y, temperature, alpha, weights, combine, grad_output):
    s64 = s.detach().double().requires_grad_()
    loss = tempered_kl_reference(s64, t.double(), y, temperature, alpha, weights, combine)
    loss.backward(torch.tensor(grad_output, dtype=torch.float64))
    return loss.detach(), s64.grad


def check(got_loss, got_grad, want_loss, want_grad, dtype):
    rtol, atol = TOLERANCES[dtype]
    assert got_loss.ndim == 0 and torch.isfinite(got_loss)
    torch.testing.assert_close(got_loss.double(), want_loss, rtol=rtol, atol=atol * max(1.0, float(want_loss.abs())))
    assert got_grad.dtype == dtype and torch.isfinite(got_grad).all()
    scale = float(want_grad.abs().max()) or 1.0
    floor = 1e-14 if dtype == torch.float64 else 1e-7  # entries that cancel to ~0 keep rounding noise
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=rtol, atol=atol * scale + floor)


@pytest.mark.parametrize("combine", ["arithmetic", "geometric"])
@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("temperature", [1.0, 4.0, 20.0])
def test_matches_float64_reference(combine, k, temperature):
    # (N, C, logit scale, alpha, labels); N = 41, 33, 50 are not multiples of the 7-row chunk
    cases = [(41, 1271, 1.0, 0.7, "mixed"), (41, 1271, 100.0, 1.0, "mixed"), (33, 10, 100.0, 0.0, "mixed"),
             (50, 37, 1.0, 0.5, None), (50, 37, 100.0, 0.7, "mixed"), (1, 3, 1.0, 0.7, "mixed")]
    for n, c, scale, alpha, labels in cases:
        weights = torch.rand(k, dtype=torch.float64) + 0.1 if alpha == 0.7 else None
        s, t, y = random_case(n, c, k, torch.float64, scale, labels)
        x = s.clone().requires_grad_()
        loss = tempered_kl_cpu(x, t, y, temperature, alpha, weights, combine, chunk_rows=7)
        loss.backward(torch.tensor(-2.5, dtype=torch.float64))
        want_loss, want_grad = oracle(s, t, y, temperature, alpha, weights, combine, -2.5)
        check(loss.detach(), x.grad, want_loss, want_grad, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("combine", ["arithmetic", "geometric"])
def test_low_precision_inputs_accumulate_in_float32(dtype, combine):
    for chunk_rows in (None, 5):
        s, t, y = random_case(41, 1271, 3, dtype, scale=4.0)
        weights = [0.2, 0.5, 0.3]
        x = s.clone().requires_grad_()
        loss = tempered_kl_cpu(x, t, y, 4.0, 0.6, weights, combine, chunk_rows=chunk_rows)
        loss.backward(torch.tensor(3.0))
        assert loss.dtype == torch.float32
        want_loss, want_grad = oracle(s, t, y, 4.0, 0.6, weights, combine, 3.0)
        check(loss.detach(), x.grad, want_loss, want_grad, dtype)


@pytest.mark.parametrize("temperature", [1.0, 4.0, 20.0])
def test_from_log_probs_matches_reference_on_the_mixture(temperature):
    for n, c, k in [(41, 1271, 3), (29, 10, 1), (50, 37, 5)]:
        for scale in (1.0, 100.0):
            s, t, y = random_case(n, c, k, torch.float64, scale)
            log_p = ensemble_log_probs(t, temperature)  # (N, C)
            x = s.clone().requires_grad_()
            loss = tempered_kl_cpu_from_log_probs(x, log_p, y, temperature, 0.8, chunk_rows=6)
            loss.backward(torch.tensor(0.5, dtype=torch.float64))
            want_loss, want_grad = oracle(s, t, y, temperature, 0.8, None, "arithmetic", 0.5)
            check(loss.detach(), x.grad, want_loss, want_grad, torch.float64)


def test_zero_probability_classes_follow_zero_log_zero():
    s, t, y = random_case(12, 9, 2, torch.float64)
    t[:, :, 3] = float("-inf")  # p = 0 for class 3 in every row
    x = s.clone().requires_grad_()
    loss = tempered_kl_cpu(x, t, y, 2.0, 0.9, chunk_rows=5)
    loss.backward()
    want_loss, want_grad = oracle(s, t, y, 2.0, 0.9, None, "arithmetic", 1.0)
    check(loss.detach(), x.grad, want_loss, want_grad, torch.float64)
    log_p = ensemble_log_probs(t, 2.0)
    assert torch.isinf(log_p).any()
    x2 = s.clone().requires_grad_()
    tempered_kl_cpu_from_log_probs(x2, log_p, y, 2.0, 0.9).backward()
    check(loss.detach(), x2.grad, want_loss, want_grad, torch.float64)


def test_every_gradient_entry_is_written_and_teacher_gets_none():
    s, t, y = random_case(23, 37, 2, torch.float32)
    x = s.clone().requires_grad_()
    x.grad = torch.ones_like(s)  # an existing gradient: the new one must be added to it
    teacher = t.clone().requires_grad_()
    poison = torch.full_like(s, float("nan"))  # freed just before, so the (N, C) gradient buffer likely reuses it
    del poison
    tempered_kl_cpu(x, teacher, y, 3.0, 0.5, chunk_rows=4).backward()
    _, want_grad = oracle(s, t, y, 3.0, 0.5, None, "arithmetic", 1.0)
    torch.testing.assert_close(x.grad.double(), want_grad + 1.0, rtol=1e-5, atol=1e-6)
    assert teacher.grad is None


def test_no_grad_forward_returns_the_loss():
    s, t, y = random_case(17, 10, 2, torch.float32)
    with torch.no_grad():
        loss = tempered_kl_cpu(s, t, y, 4.0, 0.5, combine="geometric", chunk_rows=3)
    want_loss, _ = oracle(s, t, y, 4.0, 0.5, None, "geometric", 1.0)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5)
    assert not loss.requires_grad


def test_second_backward_raises_a_clear_error():
    s, t, y = random_case(5, 4, 1, torch.float32)
    loss = tempered_kl_cpu(s.requires_grad_(), t, y, 2.0, 0.5)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize("bad, match", [
    (dict(temperature=0.0), "temperature"),
    (dict(alpha=1.5), "alpha"),
    (dict(combine="median"), "combine"),
    (dict(weights=[1.0]), "weights"),
    (dict(labels=torch.tensor([0, 9, 1])), "labels range"),
    (dict(teacher=torch.zeros(2, 3, 5)), "shapes do not fit"),
])
def test_invalid_inputs_raise_value_errors(bad, match):
    args = dict(student=torch.zeros(3, 4), teacher=torch.zeros(2, 3, 4), labels=torch.tensor([0, 1, -1]),
                temperature=2.0, alpha=0.5, weights=None, combine="arithmetic")
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        tempered_kl_cpu(args["student"], args["teacher"], args["labels"], args["temperature"], args["alpha"],
                        args["weights"], args["combine"])


def test_from_log_probs_rejects_member_logits():
    with pytest.raises(ValueError, match=r"expected \(N, C\)"):
        tempered_kl_cpu_from_log_probs(torch.zeros(3, 4), torch.zeros(2, 3, 4), None, 2.0, 0.5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("combine", ["arithmetic", "geometric"])
def test_large_class_count_with_one_and_two_row_chunks(dtype, combine):
    # C = 40,000 > CHUNK_ELEMENTS / 4: the default gives a few rows per chunk; 1 and 2 rows force many chunks
    s, t, y = random_case(5, 40_000, 3, dtype, scale=3.0)
    for chunk_rows in (1, 2, None):
        x = s.clone().requires_grad_()
        loss = tempered_kl_cpu(x, t, y, 4.0, 0.7, [0.5, 0.2, 0.3], combine, chunk_rows=chunk_rows)
        loss.backward(torch.tensor(1.5, dtype=dtype))
        want_loss, want_grad = oracle(s, t, y, 4.0, 0.7, [0.5, 0.2, 0.3], combine, 1.5)
        check(loss.detach(), x.grad, want_loss, want_grad, dtype)


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_every_label_unlabeled(alpha):
    s, t, _ = random_case(30, 50, 2, torch.float64)
    y = torch.full((30,), -1)
    for labels in (y, None):
        x = s.clone().requires_grad_()
        loss = tempered_kl_cpu(x, t, labels, 2.0, alpha, chunk_rows=4)
        loss.backward(torch.tensor(-0.7, dtype=torch.float64))
        want_loss, want_grad = oracle(s, t, labels, 2.0, alpha, None, "arithmetic", -0.7)
        check(loss.detach(), x.grad, want_loss, want_grad, torch.float64)
        if alpha == 0.0:  # no soft term and no labeled row: the loss and its gradient are exactly 0
            assert float(loss.detach()) == 0.0 and not x.grad.any()


def test_gradient_becomes_dot_grad_without_a_copy(monkeypatch):
    # The (N, C) gradient written in the forward must be the tensor autograd stores as .grad: a copy would
    # cost a second (N, C) buffer. Any reference kept to it (e.g. by an idle worker) forces that copy.
    from compressor.kernels import tempered_kl_cpu as module
    written = []
    real = module._loss_and_grad

    def spy(*args):
        loss, grad = real(*args)
        written.append(grad.data_ptr())
        return loss, grad
    monkeypatch.setattr(module, "_loss_and_grad", spy)
    s, t, y = random_case(64, 300, 2, torch.float32)
    x = s.clone().requires_grad_()
    tempered_kl_cpu(x, t, y, 3.0, 0.5, chunk_rows=8).backward()
    assert x.grad.data_ptr() == written[0]


def test_workers_leave_thread_settings_and_concurrent_calls_alone():
    import threading

    threads = torch.get_num_threads()
    s, t, y = random_case(40, 257, 3, torch.float64)
    want_loss, want_grad = oracle(s, t, y, 4.0, 0.7, None, "arithmetic", 1.0)
    results = []

    def call():
        x = s.clone().requires_grad_()
        loss = tempered_kl_cpu(x, t, y, 4.0, 0.7, chunk_rows=3)
        loss.backward()
        results.append((loss.detach(), x.grad))
    callers = [threading.Thread(target=call) for _ in range(3)]
    for caller in callers:
        caller.start()
    call()
    for caller in callers:
        caller.join()
    assert len(results) == 4
    for loss, grad in results:
        check(loss, grad, want_loss, want_grad, torch.float64)
    assert torch.get_num_threads() == threads  # the caller's intra-op thread count is unchanged
    seen = []
    fresh = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    fresh.start()
    fresh.join()
    assert seen == [threads]  # and so is the default a thread started later gets


def test_without_workers_the_calling_thread_computes_the_same(monkeypatch):
    # One intra-op thread, or a parallel backend other than OpenMP: no worker pool, everything inline.
    from compressor.kernels import tempered_kl_cpu as module
    monkeypatch.setattr(module, "_workers", lambda: None)
    for chunk_rows in (None, 6):
        s, t, y = random_case(41, 300, 3, torch.float64, scale=10.0)
        x = s.clone().requires_grad_()
        loss = tempered_kl_cpu(x, t, y, 4.0, 0.7, chunk_rows=chunk_rows)
        loss.backward(torch.tensor(2.0, dtype=torch.float64))
        want_loss, want_grad = oracle(s, t, y, 4.0, 0.7, None, "arithmetic", 2.0)
        check(loss.detach(), x.grad, want_loss, want_grad, torch.float64)


def test_an_error_in_a_worker_reaches_the_caller_and_the_pool_keeps_working(monkeypatch):
    from compressor.kernels import tempered_kl_cpu as module
    s, t, y = random_case(20, 30, 2, torch.float64)

    def broken(*args):
        raise RuntimeError("chunk failed")
    with monkeypatch.context() as patch:
        patch.setattr(module, "_soft_target", broken)
        with pytest.raises(RuntimeError, match="chunk failed"):
            tempered_kl_cpu(s, t, y, 2.0, 0.5, chunk_rows=3)
    x = s.clone().requires_grad_()
    loss = tempered_kl_cpu(x, t, y, 2.0, 0.5, chunk_rows=3)
    loss.backward()
    want_loss, want_grad = oracle(s, t, y, 2.0, 0.5, None, "arithmetic", 1.0)
    check(loss.detach(), x.grad, want_loss, want_grad, torch.float64)
