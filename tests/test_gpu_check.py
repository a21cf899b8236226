"""benchmarks/gpu_check.sh proven on the CPU: its dry run (tiny sizes, Triton interpreted) writes gpu_check.json
with the correctness rows of every op, backend and dtype, and its exit status follows their pass/fail."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, PYTHON=sys.executable)
    r = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), str(out), "--dry-run", "--quick"],
                       env=env, capture_output=True, text=True, timeout=1200)
    return r, out


def test_dry_run_passes_and_writes_the_report(dry_run):
    r, out = dry_run
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["passed"] and report["failed_rows"] == 0
    seen = {(row["op"], row["backend"]) for row in report["correctness"]}
    assert seen >= {("latent_feedback", "triton"), ("latent_attention", "triton"), ("latent_feedback", "cpu"),
                    ("soft_embedding", "torch"), ("latent_attention_determinism", "cpu"),
                    ("latent_attention_determinism", "triton")}
    assert all(row["tol"] == 0.0 for row in report["correctness"] if row["op"] == "latent_attention_determinism")
    assert {row["dtype"] for row in report["correctness"]} == {"fp32", "bf16", "fp16"}
    assert all(row["max_err"] is not None and row["max_err"] <= row["tol"] for row in report["correctness"]
               if not row.get("informational"))
    assert "== PASSED" in r.stdout


def test_summary_fails_on_a_correctness_failure(dry_run, tmp_path):
    _, out = dry_run
    for name in ("steps.csv", "gpu_correctness.json", "env.txt"):
        (tmp_path / name).write_text((out / name).read_text())
    rows = json.loads((tmp_path / "gpu_correctness.json").read_text())
    rows[0].update(max_err=1.0, **{"pass": False})
    (tmp_path / "gpu_correctness.json").write_text(json.dumps(rows))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_correctness.py"), "--summarize",
                        str(tmp_path)], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 1 and "== FAILED" in r.stdout
    assert json.loads((tmp_path / "gpu_check.json").read_text())["failed_rows"] == 1
