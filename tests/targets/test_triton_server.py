"""A bundle served by a real ``tritonserver`` on loopback: the binary PyPI's ``nvidia-pytriton`` wheel carries
(python backend only) loads the bundle's python-backend model, and the bundle's own ``client.py`` sends the test
split over HTTP and gRPC, one request at a time and eight at once (dynamic batching); the accuracy must be the
report's. The server is stopped on every exit path."""

from __future__ import annotations

import importlib.util
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from compressor.cli import main
from compressor.core.errors import MissingCapabilityError
from targets.triton_local import local_tritonserver, server_root

for _protocol in ("http", "grpc"):  # tritonclient raises RuntimeError, not ImportError, for a missing extra
    try:
        importlib.import_module(f"tritonclient.{_protocol}")
    except (ImportError, RuntimeError) as _missing:
        pytest.skip(f"the client needs tritonclient[{_protocol}] (in the dev extra): {_missing}",
                    allow_module_level=True)

try:
    server_root()
    SERVER_MISSING = None
except MissingCapabilityError as missing:
    SERVER_MISSING = str(missing)
pytestmark = pytest.mark.skipif(SERVER_MISSING is not None, reason=SERVER_MISSING or "")

RUN = ["--data", "digits", "--student", "mlp:32x32", "--epochs", "2", "--batch-size", "32", "--warmup", "0.02",
       "--duration", "0.05", "--rounds", "1", "--batch-sizes", "1,8,64", "--no-progress"]


@pytest.fixture(scope="module")
def served(digits_ensemble, tmp_path_factory):
    """A real compress run's bundle, its report, and the server serving its python-backend model."""
    root = tmp_path_factory.mktemp("served")
    assert main(["--teacher", str(digits_ensemble), "--out", str(root / "run"), *RUN]) == 0
    bundle = root / "run" / "bundle"
    report = json.loads((root / "run" / "report.json").read_text())
    with local_tritonserver(bundle / "triton", "student_python", root / "server") as urls:
        yield bundle, report, urls


def client_module(bundle: Path):
    spec = importlib.util.spec_from_file_location("bundle_client", bundle / "client.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_served_bundle_reproduces_the_reports_accuracy_over_http_and_grpc(served, digits_data):
    bundle, report, (http, grpc) = served
    student = next(r for r in report["rows"] if r["kind"] == "student" and r["backend"] == "onnxruntime")
    client = client_module(bundle)
    x, y = digits_data.test.x, digits_data.test.y
    for protocol, url in (("http", http), ("grpc", grpc)):
        logits = client.ServedBundle(bundle, url, protocol).logits(x)
        assert logits.shape == (len(y), 10)
        assert float((logits.argmax(1) == y).mean()) == pytest.approx(student["accuracy"]["top1"], abs=1e-9)


def test_eight_concurrent_requests_are_batched_and_answered_as_one_at_a_time(served, digits_data):
    bundle, _, (http, _) = served
    client = client_module(bundle)
    x = digits_data.test.x[:64]
    alone = client.ServedBundle(bundle, http).logits(x)
    with ThreadPoolExecutor(8) as pool:  # eight requests of eight rows, at once
        parts = list(pool.map(lambda start: client.ServedBundle(bundle, http).logits(x[start:start + 8]),
                              range(0, 64, 8)))
    np.testing.assert_allclose(np.concatenate(parts), alone, rtol=1e-5, atol=1e-6)


def test_the_client_prints_top_k_class_names(served, digits_data, tmp_path, capsys):
    bundle, _, (http, _) = served
    np.save(tmp_path / "x.npy", digits_data.test.x[:3])
    assert client_module(bundle).main([str(tmp_path / "x.npy"), "--url", http, "--top-k", "2",
                                       "--bundle", str(bundle)]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = json.loads((bundle / "metadata.json").read_text())["class_names"]
    assert len(lines) == 3 and all(line.split(": ")[1].split(" (")[0] in names for line in lines)


@pytest.fixture(scope="module")
def served_text(text_run):
    """The text run's bundle (two int64 inputs) and report, and the server serving its python-backend model."""
    bundle = text_run / "bundle"
    report = json.loads((text_run / "report.json").read_text())
    with local_tritonserver(bundle / "triton", "student_python", text_run.parent / "server") as urls:
        yield bundle, report, urls


def test_a_text_bundle_served_with_both_int64_inputs_reproduces_the_reports_accuracy(served_text, token_data):
    from compressor.data.datasets import load_dataset

    bundle, report, (http, grpc) = served_text
    student = next(r for r in report["rows"] if r["kind"] == "student" and r["backend"] == "onnxruntime")
    test = load_dataset(f"hf:{token_data}", seed=0).test
    client = client_module(bundle)
    for protocol, url in (("http", http), ("grpc", grpc)):
        logits = client.ServedBundle(bundle, url, protocol).logits(test.x.numpy())
        assert float((logits.argmax(1) == test.y).mean()) == pytest.approx(student["accuracy"]["top1"], abs=1e-9)


def test_concurrent_text_requests_of_one_length_are_batched_and_the_client_reads_npz(served_text, token_data,
                                                                                     tmp_path, capsys):
    from compressor.data.datasets import load_dataset

    bundle, _, (http, grpc) = served_text
    client = client_module(bundle)
    x = load_dataset(f"hf:{token_data}", seed=0).test.x[:64].at_length(12).numpy()
    alone = client.ServedBundle(bundle, grpc, "grpc").logits(x)
    with ThreadPoolExecutor(8) as pool:
        parts = list(pool.map(lambda s: client.ServedBundle(bundle, grpc, "grpc").logits(
            {name: a[s:s + 8] for name, a in x.items()}), range(0, 64, 8)))
    np.testing.assert_allclose(np.concatenate(parts), alone, rtol=1e-5, atol=1e-6)
    np.savez(tmp_path / "tokens.npz", **{name: a[:3] for name, a in x.items()})
    assert client.main([str(tmp_path / "tokens.npz"), "--url", http, "--bundle", str(bundle)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
