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


def _nav_pages(nav) -> list[str]:
    """Every page file named in an mkdocs ``nav`` (nested lists of strings and one-key mappings)."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [p for v in nav.values() for p in _nav_pages(v)]
    return [p for item in nav for p in _nav_pages(item)]


def test_mkdocs_nav_lists_every_docs_page():
    """Every Markdown page under docs/ is in mkdocs.yml's nav, and every nav entry exists (no site build)."""
    import yaml

    cfg = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = set(_nav_pages(cfg["nav"]))
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert pages - nav == set(), "pages missing from mkdocs.yml's nav"
    assert nav - pages == set(), "nav entries without a page"
    assert cfg.get("strict") is True


@pytest.mark.slow
def test_demo_on_tiny_settings(tmp_path):
    out = lakd("demo", "--out", str(tmp_path), "--epochs", "1", "--teacher-epochs", "1",
               "data.train_subset=192", "data.test_subset=90", "train.threads=1")
    for name in ("teacher", "scratch", "kd", "lakd"):
        assert f"| {name} |" in out
        assert (tmp_path / name / "summary.json").exists()
    rows = json.loads((tmp_path / "demo.json").read_text())["rows"]
    assert [r["run"] for r in rows] == ["teacher", "scratch", "kd", "lakd"]
    assert rows[2]["ek"] is not None and rows[3]["ek"] is not None
    # EK with its counts (k of the n images the teacher gets wrong), and LAKD's step memory against scratch
    k, n = rows[3]["ek_of"]
    assert 0 <= k <= n and (n == 0 or abs(100.0 * k / n - rows[3]["ek"]) < 1e-6)
    assert rows[0]["memory_vs_scratch"] is None and rows[1]["memory_vs_scratch"] == 1.0
    assert 0 < rows[3]["memory_vs_scratch"] < 1.0  # LAKD's local backward frees each module's activations
    assert "step memory vs scratch" in out and "points" in out


def _readme_block(title: str) -> list[str]:
    """The ``lakd ...`` command lines of the first bash block after the heading ``title`` (comments removed)."""
    text = (ROOT / "README.md").read_text()
    block = text.split(title, 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip().startswith("lakd ")]


def _tiny_cifar10_archive(path: Path) -> None:
    """A CIFAR-10 archive in the official layout, 5 x 16 training and 20 test images."""
    import io
    import pickle
    import tarfile

    import numpy as np

    rng = np.random.default_rng(0)
    files = {f"data_batch_{i}": 16 for i in range(1, 6)} | {"test_batch": 20}
    with tarfile.open(path, "w:gz") as tar:
        for name, n in files.items():
            blob = pickle.dumps({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                                 "labels": [k % 10 for k in range(n)]}, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def test_readme_first_distilled_student_from_a_fresh_clone(tmp_path, monkeypatch, capsys):
    """README's first-student commands, as written, in a folder with nothing but the configs (no ../shared, no
    data): data.download=true goes through torchvision's download_url, replaced here by a fake that writes a
    tiny archive; then the teacher config, the LAKD config (which names the teacher's run folder), eval, report.
    Only the budget is overridden (appended, so the README's own overrides are still parsed)."""
    import shutil

    from torchvision.datasets import utils as tv_utils

    from lakd.cli.main import main

    commands = _readme_block("## Your first distilled student on CIFAR-10")
    assert [c.split()[1] for c in commands] == ["train", "train", "eval", "report"]
    assert "data.download=true" in commands[0] and "../shared" not in " ".join(commands)
    clone = tmp_path / "clone"
    shutil.copytree(ROOT / "configs", clone / "configs")
    monkeypatch.chdir(clone)
    monkeypatch.delenv("LAKD_DATA", raising=False)
    fetched = []

    def fake_download_url(url, root, filename=None, md5=None, **kw):
        fetched.append(url)
        _tiny_cifar10_archive(Path(root) / filename)

    monkeypatch.setattr(tv_utils, "download_url", fake_download_url)
    tiny = ["solver.epochs=1", "solver.max_steps_per_epoch=1", "solver.batch_size=16", "train.threads=1",
            "train.progress=false"]
    for cmd in commands:
        argv = cmd.split()[1:]
        if argv[0] == "train":
            argv += tiny
        assert main(argv) == 0, (cmd, capsys.readouterr().err)
    assert fetched == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
    assert (clone / "data" / "cifar-10-batches-py" / "test_batch").exists()
    out = capsys.readouterr().out
    assert "EK" in out and "top-1" in out
    assert (clone / "runs" / "cifar10_teacher_resnet56" / "best.pt").exists()
    # the report goes beside the runs (runs/report.md, report.csv, curves.png), nothing into the current folder
    assert "LAKD" in (clone / "runs" / "report.md").read_text() and (clone / "runs" / "curves.png").exists()
    assert not (clone / "report.md").exists()


@pytest.mark.skipif(not (SHARED / "data" / "cifar-10-batches-py").exists()
                    or not (SHARED / "teachers" / "cifar10_resnet56.pth").exists(),
                    reason="needs $LAKD_SHARED/data and $LAKD_SHARED/teachers")
def test_first_distilled_student_with_this_machines_teacher(tmp_path):
    """The same path with a teacher in mdistiller's layout (this machine's copy, found through LAKD_SHARED)."""
    teacher = str(SHARED / "teachers" / "cifar10_resnet56.pth")
    tiny = ["data.train_subset=128", "data.test_subset=100", "train.threads=1", f"output_dir={tmp_path}",
            "solver.max_steps_per_epoch=2", f"data.root={SHARED / 'data'}", f"teacher.checkpoint={teacher}"]
    lakd("train", "configs/cifar10/lakd/resnet56_resnet20_149.yaml", "solver.epochs=1", *tiny)
    run = tmp_path / "cifar10_lakd_149"
    out = lakd("eval", "--checkpoint", str(run / "best.pt"), "--teacher", teacher, "data.test_subset=100")
    assert "EK" in out and "top-1" in out
    out = lakd("report", str(run), "--out", str(tmp_path / "report.md"))
    assert (tmp_path / "report.md").read_text().count("LAKD") >= 1


def test_allocator_meter_prints_no_profiler_noise(capfd):
    """torch.profiler's C++ side writes `USDT:... profiler_start` lines to fd 2; the meter silences them."""
    import torch

    from lakd.analysis.cost import AllocatorMeter

    with AllocatorMeter("cpu") as meter:
        x = torch.randn(256, 256)
        del x
    out, err = capfd.readouterr()
    assert "profiler_start" not in out + err and "USDT" not in out + err
    assert meter.peak >= 256 * 256 * 4
    print("still printed")  # the descriptors are restored afterwards
    assert "still printed" in capfd.readouterr().out


def test_lakd_methods_prints_whole_sentences(capsys):
    from lakd.cli.listing import first_sentences, run_methods

    doc = "FitNet (Romero et al., 2015): the student's hint feature\n    regresses the teacher's. More text.\n\nRest."
    assert first_sentences(doc) == "FitNet (Romero et al., 2015): the student's hint feature regresses the teacher's."
    assert run_methods(None) == 0
    printed = " ".join(capsys.readouterr().out.split())
    from lakd.distillers import DISTILLERS

    for name in DISTILLERS.names():  # each method's first sentence printed whole (wrapped, never cut)
        cls = DISTILLERS.get(name)
        doc = cls.__doc__ or __import__(cls.__module__, fromlist=["x"]).__doc__ or ""
        sentence = first_sentences(doc)
        assert sentence.endswith((".", "!", "?")), (name, sentence)
        assert f"{name} {sentence}" in printed


def test_every_method_is_named_wherever_methods_are_listed():
    """The lists of methods in README.md, docs/index.md, docs/api.md and docs/methods.md name every registered
    method (the registry is the source: a method added without its docs fails here)."""
    from lakd.distillers import DISTILLERS

    readme_intro = (ROOT / "README.md").read_text().split("## Quick start")[0]
    index_intro = (ROOT / "docs" / "index.md").read_text().split("```")[0]
    api_row = next(line for line in (ROOT / "docs" / "api.md").read_text().splitlines()
                   if line.startswith("| `method` |"))
    methods_page = (ROOT / "docs" / "methods.md").read_text()
    for name in DISTILLERS.names():
        cls = DISTILLERS.get(name)
        if name == "scratch":
            continue
        shown = cls.display_name or name
        assert shown in readme_intro, f"README.md's introduction does not name {shown}"
        assert shown in index_intro, f"docs/index.md's introduction does not name {shown}"
        assert f"`{name}`" in api_row, f"docs/api.md's method row does not name `{name}`"
        assert f"`{name}`" in methods_page or shown in methods_page, f"docs/methods.md does not describe {name}"
