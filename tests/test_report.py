"""The results report (``lakd report``): numbers reproduced from run folders, incomplete runs, CSV and curves,
variants of one method as separate rows."""
from __future__ import annotations

import csv
import json
import math
import os

import pytest
import yaml

from lakd.analysis.report import load_run, make_report
from lakd.cli.main import main
from lakd.errors import LakdError

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


def _write_run(root, name, method, student, teacher, seed, curve, ek=None, teacher_top1=None, complete=True,
               epochs=None, dataset="cifar100"):
    d = root / name
    d.mkdir(parents=True)
    epochs = epochs or len(curve)
    cfg = {"experiment": name, "seed": seed, "method": method, "data": {"dataset": dataset},
           "model": {"name": student}, "teacher": {"name": teacher}, "solver": {"epochs": epochs}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    with open(d / "metrics.jsonl", "w") as f:
        for e, acc in enumerate(curve, start=1):
            f.write(json.dumps({"epoch": e, "lr": 0.05, "train_loss": 1.0, "train_top1": 50.0, "losses": {},
                                "test_top1": acc, "test_top5": acc + 10, "test_loss": 1.2, "ek": ek,
                                "epoch_time_s": 1.0, "images_per_s": 100.0}) + "\n")
    if complete:
        best = max(range(len(curve)), key=lambda i: curve[i])
        (d / "summary.json").write_text(json.dumps({
            "experiment": name, "method": method, "student": student, "teacher": teacher, "dataset": dataset,
            "seed": seed, "epochs": epochs, "final_top1": curve[-1], "final_top5": curve[-1] + 10,
            "best_top1": curve[best], "best_epoch": best + 1, "final_ek": ek, "teacher_top1": teacher_top1,
            "wall_time_s": 12.5, "run_dir": str(d)}))
    return d


def _mean_std(v):
    m = sum(v) / len(v)
    return m, math.sqrt(sum((a - m) ** 2 for a in v) / (len(v) - 1))


def test_report_reproduces_the_run_numbers(tmp_path, not_blank):
    runs = tmp_path / "runs"
    T = "resnet56"
    _write_run(runs, "kd_s0", "kd", "resnet20", T, 0, [50.0, 70.4, 70.66], ek=20.5, teacher_top1=72.34)
    _write_run(runs, "kd_s1", "kd", "resnet20", T, 1, [51.0, 71.36, 70.9], ek=21.25, teacher_top1=72.34)
    _write_run(runs, "lakd_s0", "lakd", "resnet20", T, 0, [52.0, 71.5, 72.01], ek=30.0, teacher_top1=72.34)
    _write_run(runs, "lakd_s1", "lakd", "resnet20", T, 1, [52.5, 72.8, 72.37], ek=31.5, teacher_top1=72.34)
    _write_run(runs, "scratch_r20", "scratch", "resnet20", None, 0, [40.0, 69.06])
    _write_run(runs, "lakd_s2_killed", "lakd", "resnet20", T, 2, [49.0, 68.125], complete=False, epochs=240)
    out = tmp_path / "report.md"
    res = make_report([str(runs)], out=str(out), csv_path=str(tmp_path / "t.csv"), plot_path=str(tmp_path / "c.png"))
    text = out.read_text()
    assert len(res["runs"]) == 6

    kd_f, kd_fs = _mean_std([70.66, 70.9])
    kd_b = (70.66 + 71.36) / 2
    la_f, la_fs = _mean_std([72.01, 72.37])
    la_b = (72.01 + 72.8) / 2
    kd_cell = f"{kd_f:.2f} ± {kd_fs:.2f} (best {kd_b:.2f})"
    la_cell = f"{la_f:.2f} ± {la_fs:.2f} (best {la_b:.2f})"
    assert kd_cell == "70.78 ± 0.17 (best 71.01)"  # the hand values, as a check on the check
    assert f"| KD | {kd_cell} |" in text
    assert f"| LAKD | **{la_cell}** |" in text  # best in its column, bold
    assert "| Student | 69.06 (best 69.06) |" in text  # one seed: no std; scratch's display name
    assert "| Teacher | 72.34 |" in text
    assert "resnet56 → resnet20" in text
    # EK table
    ek_kd, ek_kd_s = _mean_std([20.5, 21.25])
    assert f"| KD | {ek_kd:.2f} ± {ek_kd_s:.2f} |" in text
    # the killed run is reported, from metrics.jsonl, not dropped (and kept out of the means)
    line = next(lin for lin in text.splitlines() if lin.startswith("| lakd_s2_killed"))
    assert "INCOMPLETE" in line and "68.12" in line and "2/240" in line
    kill = load_run(str(runs / "lakd_s2_killed"))
    assert not kill.complete and kill.final_top1 == 68.125 and kill.best_top1 == 68.125

    with open(tmp_path / "t.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"scratch", "kd", "lakd"}
    assert float(rows["kd"]["final_top1_mean"]) == pytest.approx(kd_f, rel=1e-15)
    assert float(rows["kd"]["final_top1_std"]) == pytest.approx(kd_fs, rel=1e-12)
    assert float(rows["lakd"]["best_top1_mean"]) == pytest.approx(la_b, rel=1e-15)
    assert float(rows["lakd"]["final_ek_mean"]) == 30.75
    assert rows["lakd"]["seeds"] == "0;1" and rows["scratch"]["final_top1_std"] == ""
    assert float(rows["kd"]["teacher_top1"]) == 72.34
    not_blank(tmp_path / "c.png")


def test_report_incomplete_only_cell_and_errors(tmp_path):
    runs = tmp_path / "r"
    _write_run(runs, "at0", "at", "resnet8", "resnet14", 0, [30.0, 41.0, 40.5], complete=False, epochs=10,
               dataset="digits")
    res = make_report([str(runs / "at0")], out=str(tmp_path / "o.md"))
    text = res["markdown"]
    assert "| AT | 40.50 (best 41.00) †" in text and "INCOMPLETE" in text
    with pytest.raises(LakdError, match="does not exist"):
        make_report([str(tmp_path / "empty_does_not_exist")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(LakdError, match="no run folders"):
        make_report([str(tmp_path / "empty")])


def test_report_cli(tmp_path, capsys):
    runs = tmp_path / "runs"
    _write_run(runs, "kd0", "kd", "resnet8", "resnet14", 0, [10.0, 20.0])
    rc = main(["report", str(runs), "--out", str(tmp_path / "r.md"), "--csv", str(tmp_path / "r.csv"),
               "--plot", str(tmp_path / "p.png")])
    assert rc == 0
    assert "| KD | 20.00 (best 20.00) |" in (tmp_path / "r.md").read_text()
    assert os.path.getsize(tmp_path / "r.csv") > 0 and os.path.getsize(tmp_path / "p.png") > 0
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "error:" in capsys.readouterr().err


def test_report_separates_variants_of_one_method(tmp_path):
    """Two LAKD runs of one pair with different split points are two rows; seeds of one setting are one row."""
    from lakd.analysis.report import build_tables, label_variants, load_run

    def fake(name, splits, seed, top1):
        d = tmp_path / name
        d.mkdir()
        cfg = {"experiment": name, "method": "lakd", "seed": seed, "model": {"name": "resnet20"},
               "teacher": {"name": "resnet56"}, "data": {"dataset": "cifar10"}, "solver": {"epochs": 1},
               "sdm": {"splits": splits}}
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
        (d / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_top1": top1}) + "\n")
        (d / "summary.json").write_text(json.dumps({"experiment": name, "method": "lakd", "student": "resnet20",
                                                    "teacher": "resnet56", "dataset": "cifar10", "seed": seed,
                                                    "epochs": 1, "final_top1": top1, "best_top1": top1}))
        return str(d)

    runs = [load_run(fake("a0", [1, 4, 9], 0, 70.0)), load_run(fake("a1", [1, 4, 9], 1, 72.0)),
            load_run(fake("b0", [3, 6, 9], 0, 60.0))]
    label_variants(runs)
    (table,) = build_tables(runs)
    assert table.methods == ["lakd (sdm.splits=[1, 4, 9])", "lakd (sdm.splits=[3, 6, 9])"]
    cell = table.cells[("lakd (sdm.splits=[1, 4, 9])", 0)]
    assert sorted(cell.values("final_top1")) == [70.0, 72.0]


def test_report_averages_one_run_per_seed_and_names_a_malformed_summary(tmp_path, capsys):
    import time

    runs = tmp_path / "runs"
    _write_run(runs, "kd_s0", "kd", "resnet20", "resnet56", 0, [70.0])
    _write_run(runs, "kd_s1", "kd", "resnet20", "resnet56", 1, [72.0])
    time.sleep(0.02)
    _write_run(runs, "kd_s1_again", "kd", "resnet20", "resnet56", 1, [74.0])  # the same seed, run again later
    bad = _write_run(runs, "kd_bad", "kd", "resnet20", "resnet56", 2, [60.0])
    (bad / "summary.json").write_text('{"final_top1": "abc", "seed": [2]')  # cut short
    assert main(["report", str(runs), "--out", str(tmp_path / "r.md")]) == 2  # a lost result is an error ...
    err = capsys.readouterr().err
    assert f"warning: {bad}: unreadable summary.json" in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: 1 run(s) have an unreadable summary.json")
    md = (tmp_path / "r.md").read_text()
    m, s = _mean_std([70.0, 74.0])  # seeds 0 and 1 (the newest run of seed 1), not three samples
    assert f"{m:.2f} ± {s:.2f}" in md and "‡" in md and "kd_s1 (KD" in md.split("left out:")[1]
    (bad / "summary.json").write_text("[1, 2]")
    assert main(["report", str(runs), "--out", str(tmp_path / "r.md")]) == 2
    assert "summary.json holds a list" in capsys.readouterr().err
    (bad / "summary.json").unlink()  # ... a run still going (no summary yet) is not
    with open(bad / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "test_to')  # a line being written
    assert main(["report", str(runs), "--out", str(tmp_path / "r.md")]) == 0
    assert "1 unreadable line(s) in metrics.jsonl" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# Where the report goes, one name per method, numbers on a subset, curves of short runs
# ----------------------------------------------------------------------------------------------------


def test_report_goes_beside_the_runs_and_says_where(tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    runs = tmp_path / "runs"
    a = _write_run(runs, "kd0", "kd", "resnet8", "resnet14", 0, [10.0, 20.0])
    b = _write_run(runs, "at0", "at", "resnet8", "resnet14", 0, [12.0, 22.0])
    _write_run(tmp_path / "other", "x", "kd", "resnet8", "resnet14", 0, [5.0])
    # one folder of runs: report.md, report.csv and curves.png in it (the help's promise), each path printed
    assert main(["report", str(runs)]) == 0
    out = capsys.readouterr().out
    for name in ("report.md", "report.csv", "curves.png"):
        assert os.path.getsize(runs / name) > 0 and f"  {runs / name}\n" in out
    assert os.listdir(work) == []  # never into the current folder
    # one run folder: into it; several: their common parent
    assert main(["report", str(a)]) == 0
    assert (a / "report.md").exists() and f"  {a / 'report.md'}" in capsys.readouterr().out
    assert main(["report", str(a), str(b), str(tmp_path / "other")]) == 0
    assert (tmp_path / "report.md").exists() and (tmp_path / "curves.png").exists()
    # relative folders are printed relative
    monkeypatch.chdir(tmp_path)
    assert main(["report", "runs/kd0", "runs/at0"]) == 0
    assert "  runs/report.md\n" in capsys.readouterr().out
    # naming one output writes exactly that
    assert main(["report", str(runs), "--out", str(tmp_path / "only.md")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == f"  {tmp_path / 'only.md'}" and not (tmp_path / "only.csv").exists()
    # a default plot with nothing to draw is left out (said so); one asked for is an error
    empty = tmp_path / "started"
    d = _write_run(empty, "kd_new", "kd", "resnet8", "resnet14", 0, [1.0], complete=False)
    (d / "metrics.jsonl").write_text("")
    assert main(["report", str(empty)]) == 0
    out = capsys.readouterr().out
    assert "(no curves: no run has test accuracies" in out and not (empty / "curves.png").exists()
    assert (empty / "report.md").exists()
    assert main(["report", str(empty), "--plot", str(tmp_path / "p.png")]) == 2


def test_one_name_per_method_and_subset_numbers_say_so(tmp_path):
    from lakd.analysis.visualize import curves_figure
    from lakd.distillers import display_name

    runs = tmp_path / "runs"
    for name, method, student, teacher, top1 in (("scratch0", "scratch", "resnet20", None, 60.0),
                                                 ("kd0", "kd", "resnet20", "resnet56", 61.5),
                                                 ("lakd0", "lakd", "resnet20", "resnet56", 62.0),
                                                 ("scratch_r8", "scratch", "resnet8", None, 50.0)):
        d = _write_run(runs, name, method, student, teacher, 0, [top1], teacher_top1=85.4 if teacher else None,
                       dataset="cifar10", epochs=1)
        summary = json.loads((d / "summary.json").read_text())
        summary.update(test_images=1000, test_images_total=10000)
        (d / "summary.json").write_text(json.dumps(summary))
    res = make_report([str(runs)], out=str(tmp_path / "r.md"), csv_path=str(tmp_path / "r.csv"))
    text = res["markdown"]
    # the method's display name in the table, the runs list, the CSV and the curves' legend alike
    assert display_name("scratch") == "Student"
    assert "| Method | resnet56 → resnet20 | resnet8 (no teacher) |" in text
    assert "| Student | 60.00 (best 60.00) | 50.00 (best 50.00) |" in text and "| scratch |" not in text
    assert "| scratch0 | cifar10 | Student |" in text
    with open(tmp_path / "r.csv") as f:
        labels = {r["method"]: r["label"] for r in csv.DictReader(f)}
    assert labels == {"scratch": "Student", "kd": "KD", "lakd": "LAKD"}
    fig = curves_figure(res["runs"])
    legend = [t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts()]
    assert sorted(legend) == ["KD seed 0", "LAKD seed 0", "Student seed 0", "Student seed 0"]
    # numbers measured on data.test_subset say so, and on how many of how many images
    assert "## cifar10: top-1 accuracy (%) on 1000 of 10000 test images (data.test_subset)" in text
    assert "| Teacher (on 1000 of 10000 test images) | 85.40 | n/a |" in text
    assert "| 1/1 | 1000 of 10000 | 61.50 |" in text
    with open(tmp_path / "r.csv") as f:
        assert {r["test_images"] for r in csv.DictReader(f)} == {"1000 of 10000"}
    assert "on 1000 of 10000 test images" in fig.axes[0].get_title()
    # runs of one table on different test images: the subset numbers are marked, cell by cell
    d = _write_run(runs, "kd1", "kd", "resnet20", "resnet56", 1, [62.5], teacher_top1=85.71, dataset="cifar10")
    text = make_report([str(runs)], out=None)["markdown"]
    assert "## cifar10: top-1 accuracy (%)\n" in text and "| Teacher | 85.50 § | n/a |" in text
    assert "| KD | **62.00 ± 0.71 (best 62.00)** § | — |" in text and "| all | 62.50 |" in text
    assert "measured on part of the test set (data.test_subset" in text
    # an older run without the counts in summary.json: the config's data.test_subset
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    cfg["data"]["test_subset"] = 500
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert load_run(str(d)).subset == "500"


def test_curves_of_short_runs_have_markers_and_whole_epochs(tmp_path):
    from lakd.analysis.visualize import MARKER_BELOW, curves_figure

    runs = tmp_path / "runs"
    _write_run(runs, "one_epoch", "kd", "resnet8", "resnet14", 0, [61.5], epochs=1)
    _write_run(runs, "three", "lakd", "resnet8", "resnet14", 0, [40.0, 55.0, 60.0])
    _write_run(runs, "long", "at", "resnet8", "resnet14", 0, [float(i) for i in range(1, 41)])
    fig = curves_figure([load_run(str(p)) for p in sorted(runs.iterdir())])
    (ax,) = fig.axes
    lines = {line.get_label().split()[0]: line for line in ax.get_lines()}
    assert lines["KD"].get_marker() == "o" and lines["LAKD"].get_marker() == "o"  # a point is visible
    assert lines["AT"].get_marker() in (None, "None", "")  # 40 epochs: a line
    assert MARKER_BELOW == 20
    assert all(float(t).is_integer() for t in ax.get_xticks())
    # a single 1-epoch run: one tick at epoch 1 and room around it (not a range of 0.95..1.05)
    fig = curves_figure([load_run(str(runs / "one_epoch"))])
    (ax,) = fig.axes
    assert list(ax.get_xticks()) == [1] and ax.get_xlim() == (0.5, 1.5)


def test_report_over_seeds_says_when_measured_on_a_subset(tmp_path):
    from lakd.analysis.report import make_seed_report

    for seed in (0, 1):
        d = _write_run(tmp_path / "runs", f"kd-s{seed}", "kd", "resnet8", "resnet14", seed, [50.0 + seed])
        summary = json.loads((d / "summary.json").read_text())
        (d / "summary.json").write_text(json.dumps(summary | {"test_images": 200, "test_images_total": 1797}))
    md = make_seed_report([str(tmp_path / "runs")], out=None)["markdown"]
    assert "Measured on 200 of 1797 test images (data.test_subset)" in md
    (d / "summary.json").write_text(json.dumps(summary | {"test_images": 1797, "test_images_total": 1797}))
    md = make_seed_report([str(tmp_path / "runs")], out=None)["markdown"]
    assert "Measured on 200 of 1797 / all test images" in md
