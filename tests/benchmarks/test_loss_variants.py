"""The benchmark's eager formulas of dkd, ls and dist compute the reference's loss and gradient, so its speed-ups
compare like with like; and ``bench_tempered_kl.py --variant`` runs end to end and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.loss_variants import EAGER, floor
from compressor.kernels.tempered_kl_reference import tempered_kl_reference

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("variant", sorted(EAGER))
def test_the_eager_formula_is_the_reference(variant):
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(33, 17, generator=g, dtype=torch.float64) * 3).requires_grad_()
    t = torch.randn(3, 33, 17, generator=g, dtype=torch.float64) * 4
    y = torch.randint(0, 17, (33,), generator=g)
    y[::4] = -1
    eager = EAGER[variant](s, t, y, 4.0, 0.7)
    eager.backward()
    eager_grad, s.grad = s.grad.clone(), None
    reference = tempered_kl_reference(s, t, y, 4.0, 0.7, variant=variant)
    reference.backward()
    assert eager.item() == pytest.approx(reference.item(), rel=1e-6)
    torch.testing.assert_close(eager_grad, s.grad, rtol=1e-5, atol=1e-9)


def test_the_floor_reads_every_input_and_has_a_gradient():
    s = torch.ones(2, 3, requires_grad=True)
    floor(s, torch.ones(4, 2, 3), None).backward()
    assert s.grad.shape == (2, 3)


def test_the_benchmark_runs_a_variant_and_writes_json(tmp_path):
    out = tmp_path / "dkd.json"
    subprocess.run([sys.executable, "benchmarks/bench_tempered_kl.py", "--device", "cpu", "--variant", "dkd",
                    "--shapes", "64,50,2", "--rounds", "2", "--quick", "--json", str(out)], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    record = json.loads(out.read_text())
    providers = {row["provider"] for row in record["results"]}
    assert record["variant"] == "dkd" and providers == {"eager_formula", "reference", "cpu", "floor"}
    assert all(row["fraction_of_floor"] > 0 for row in record["results"])
