"""The README's and docs' quick commands work as written (on tiny settings)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# this machine's teacher and data (not part of the product): $LAKD_SHARED, set by .ci/run when present
SHARED = Path(os.environ.get("LAKD_SHARED") or "LAKD_SHARED-is-not-set")


def lakd(*args, timeout=600):
    res = subprocess.run([sys.executable, "-m", "lakd", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return res.stdout


def test_readme_names_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert "pip install -e . && lakd demo" in text
    assert "pip install -e '.[test]' && pytest" in text
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -e . && lakd demo" in ci and "pip install -e '.[test]' && pytest" in ci


def test_demo_on_tiny_settings(tmp_path):
    out = lakd("demo", "--out", str(tmp_path), "--epochs", "1", "--teacher-epochs", "1",
               "data.train_subset=192", "data.test_subset=90", "train.threads=1")
    for name in ("teacher", "scratch", "kd", "lakd"):
        assert f"| {name} |" in out
        assert (tmp_path / name / "summary.json").exists()
    rows = json.loads((tmp_path / "demo.json").read_text())["rows"]
    assert [r["run"] for r in rows] == ["teacher", "scratch", "kd", "lakd"]
    assert rows[2]["ek"] is not None and rows[3]["ek"] is not None


@pytest.mark.skipif(not (SHARED / "data" / "cifar-10-batches-py").exists()
                    or not (SHARED / "teachers" / "cifar10_resnet56.pth").exists(),
                    reason="needs $LAKD_SHARED/data and $LAKD_SHARED/teachers")
def test_readme_first_distilled_student(tmp_path):
    tiny = ["data.train_subset=128", "data.test_subset=100", "train.threads=1", f"output_dir={tmp_path}",
            "solver.max_steps_per_epoch=2"]
    lakd("train", "configs/cifar10/lakd/resnet56_resnet20_149.yaml", "solver.epochs=1", *tiny)
    run = tmp_path / "cifar10_lakd_149"
    out = lakd("eval", "--checkpoint", str(run / "best.pt"), "--teacher", str(SHARED / "teachers" /
                                                                             "cifar10_resnet56.pth"),
               "data.test_subset=100")
    assert "EK" in out and "top-1" in out
    out = lakd("report", str(run), "--out", str(tmp_path / "report.md"))
    assert (tmp_path / "report.md").read_text().count("lakd") >= 1
