"""`lakd sweep` (plan, names, merging, dry run, kill + resume) and `lakd report` over seeds (statistics checked
against hand computations, paired differences, repeated seeds)."""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lakd.analysis.report import make_seed_report
from lakd.analysis.runs import load_study
from lakd.analysis.stats import paired_difference, summarize, t_quantile
from lakd.cli.main import main
from lakd.errors import LakdError
from lakd.sweep import load_plan, run_command

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.dataset=digits", "data.train_subset=192", "data.test_subset=64", "solver.batch_size=32",
        "model.name=resnet8", "data.num_workers=0", "solver.schedule=linear", "method=scratch"]


def write_spec(path: Path, epochs: int = 2, seeds=(0, 1), extra_groups: str = "") -> Path:
    path.write_text(f"""
name: tiny
seeds: {list(seeds)}
processes: 1
threads: 1
overrides: {json.dumps(TINY + [f"solver.epochs={epochs}"])}
groups:
  - name: main
    order: seed-major
    reference: a
    compare: [[b, a]]
    runs:
      - {{name: a, label: "row A"}}
      - {{name: b, label: "row B", overrides: [solver.lr=0.1]}}
{extra_groups}""")
    return path


# ----- statistics against hand computations -----------------------------------------------------------------------
def test_t_quantile_matches_the_table():
    # printed t tables: t(0.975; 1) = 12.706, t(0.975; 2) = 4.303, t(0.975; 4) = 2.776
    assert t_quantile(1) == pytest.approx(12.706, abs=1e-3)
    assert t_quantile(2) == pytest.approx(4.303, abs=1e-3)
    assert t_quantile(4) == pytest.approx(2.776, abs=1e-3)


def test_summary_by_hand():
    s = summarize([80.0, 81.0, 82.5])
    # mean 243.5 / 3; deviations -7/6, -1/6, 8/6; sum of squares 114/36 = 19/6; variance (19/6) / 2 = 19/12
    assert s.n == 3 and s.mean == pytest.approx(81.1666667, abs=1e-6)
    assert s.std == pytest.approx(math.sqrt(19 / 12), abs=1e-9) and s.std == pytest.approx(1.2583, abs=1e-4)
    # half width t(0.975; 2) * std / sqrt(3) = 4.3027 * 1.2583 / 1.7321 = 3.1258
    assert s.half_width == pytest.approx(3.1258, abs=1e-3)
    assert s.ci[0] == pytest.approx(78.0409, abs=1e-3) and s.ci[1] == pytest.approx(84.2925, abs=1e-3)
    one = summarize([75.5])
    assert (one.n, one.mean, one.std, one.ci) == (1, 75.5, None, None)
    assert summarize([]).n == 0


def test_paired_difference_by_hand():
    a = {0: 80.0, 1: 81.0, 2: 82.5, 5: 99.0}  # seed 5 has no partner: left out
    b = {0: 79.0, 1: 80.5, 2: 81.0, 3: 90.0}
    p = paired_difference(a, b, "A", "B")
    assert p.seeds == [0, 1, 2] and p.diffs == [1.0, 0.5, 1.5]
    # mean 1.0, std 0.5, half width 4.3027 * 0.5 / sqrt(3) = 1.2421: [-0.2421, 2.2421] holds 0
    assert p.summary.mean == pytest.approx(1.0) and p.summary.std == pytest.approx(0.5)
    assert p.summary.ci[0] == pytest.approx(-0.2421, abs=1e-3) and p.summary.ci[1] == pytest.approx(2.2421, abs=1e-3)
    assert p.verdict.startswith("cannot tell")
    # the same means, but a consistent per-seed gain: diffs 1.0, 1.1, 0.9 -> std 0.1, half width 0.2484
    q = paired_difference({0: 81.0, 1: 81.1, 2: 80.9}, {0: 80.0, 1: 80.0, 2: 80.0}, "A", "B")
    assert q.summary.ci[0] == pytest.approx(0.7516, abs=1e-3) and q.verdict == "A > B"
    assert paired_difference({0: 1.0}, {0: 2.0}).verdict.startswith("cannot tell")


def test_paired_p_value_and_holm_by_hand():
    from scipy.stats import ttest_rel

    from lakd.analysis.stats import holm

    a, b = {0: 80.0, 1: 81.0, 2: 82.5}, {0: 79.0, 1: 80.5, 2: 81.0}
    p = paired_difference(a, b)
    assert p.p_value == pytest.approx(ttest_rel(list(a.values()), list(b.values())).pvalue, rel=1e-9)
    assert p.p_value > 0.05  # the interval holds 0, so the test does not reject (the same t-distribution)
    q = paired_difference({0: 81.0, 1: 81.1, 2: 80.9}, {0: 80.0, 1: 80.0, 2: 80.0})
    assert q.p_value < 0.05 and q.verdict == "A > B"
    assert paired_difference({0: 1.0}, {0: 2.0}).p_value is None
    assert paired_difference({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0}).p_value == 0.0  # the same gain at every seed
    # Holm at family-wise 5% over 4 tests (None: not in the family): 0.01 <= 0.05/4 holds; 0.03 > 0.05/3 stops
    assert holm([0.01, 0.04, 0.03, None, 0.2]) == [True, False, False, None, False]
    assert holm([0.001, 0.012, 0.02]) == [True, True, True]  # 0.001 <= .0167, 0.012 <= .025, 0.02 <= .05
    assert holm([]) == [] and holm([None]) == [None]


def _fake_run(folder: Path, name: str, seed: int, top1: float, epochs: int = 2) -> None:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"experiment: {name}\nmethod: scratch\nseed: {seed}\n")
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e + 1, "test_top1": top1 - (epochs - e - 1)})
                                                  + "\n" for e in range(epochs)))
    (folder / "summary.json").write_text(json.dumps({
        "experiment": name, "method": "scratch", "student": "resnet8", "teacher": None, "dataset": "digits",
        "seed": seed, "epochs": epochs, "final_top1": top1, "best_top1": top1, "final_ek": None,
        "wall_time_s": 60.0}))


def test_report_over_seeds_flags_repeated_seeds(tmp_path):
    for seed, a, b, c in ((0, 80.0, 79.0, 81.0), (1, 81.0, 80.5, 81.6), (2, 82.5, 81.0, 82.1)):
        _fake_run(tmp_path / "r1" / f"a-s{seed}", f"a-s{seed}", seed, a)
        _fake_run(tmp_path / "r1" / f"b-s{seed}", f"b-s{seed}", seed, b)
        _fake_run(tmp_path / "r1" / f"c-s{seed}", f"c-s{seed}", seed, c)
    _fake_run(tmp_path / "r2" / "a-s0", "a-s0", 0, 90.0)  # a second copy of seed 0, with another result
    groups, runs, _ = load_study([str(tmp_path / "r1"), str(tmp_path / "r2")], reference="b")
    rows = {r.name: r for r in groups[0].rows}
    assert rows["a"].values() == {0: 80.0, 1: 81.0, 2: 82.5}  # the repeat is not averaged in
    assert [r.final_top1 for r in rows["a"].repeats[0]] == [90.0]
    res = make_seed_report([str(tmp_path / "r1"), str(tmp_path / "r2")], out=str(tmp_path / "rep.md"),
                           reference="b")
    md = res["markdown"]
    assert "seed 0 run 2× (different results; counted once)" in md
    assert "| 3 | 81.17 ± 1.26 | [78.04, 84.29] |" in md  # row a: the hand-computed cell
    assert "+1.00 [-0.24, 2.24] (n=3)" in md  # a vs the reference b, paired
    # row c is ahead of b at every seed (+2.0, +1.1, +1.1: [0.11, 2.69], p 0.043), but with a and c both compared
    # with b, Holm asks p <= 0.025 of the smaller p: the difference does not hold for the family of two
    c = paired_difference({0: 81.0, 1: 81.6, 2: 82.1}, {0: 79.0, 1: 80.5, 2: 81.0})
    assert c.summary.ci[0] > 0 and 0.025 < c.p_value < 0.05
    assert "Against b, Holm over the 2 rows with 2 or more matched seeds: c +1.40 (p = 0.043) does not hold." in md
    with pytest.raises(LakdError, match="--reference 'zz' is not a row"):
        load_study([str(tmp_path / "r1")], reference="zz")


# ----- the plan ----------------------------------------------------------------------------------------------------
def test_plan_names_order_grid_and_merged_rows(tmp_path):
    spec = write_spec(tmp_path / "s.yaml", extra_groups="""
  - name: grid
    order: run-major
    seeds: [3]
    grid: {solver.lr: [0.05, 0.2]}
    runs:
      - {name: g}
  - name: again
    paper_note: "the paper's Table 9 (300 epochs)"
    runs:
      - {name: a_copy, paper: 93.2}
""")
    plan = load_plan(str(spec), runs_dir=str(tmp_path / "runs"), results_dir=str(tmp_path / "res"))
    names = [r.name for r in plan.runs]
    assert names == ["a-s0", "b-s0", "a-s1", "b-s1", "g_lr0.05-s3", "g_lr0.2-s3", "a_copy-s0", "a_copy-s1"]
    # g at lr 0.05 is row a's config (0.05 is the default lr) at another seed: a run of its own
    same = {r.name: r.same_as for r in plan.runs}
    assert same["a_copy-s0"] == "a-s0" and same["a_copy-s1"] == "a-s1" and same["g_lr0.05-s3"] is None
    assert [r.name for r in plan.unique()] == names[:6]
    assert [r.to_json() for r in plan.groups[2].rows] == [{"name": "a_copy", "label": "a_copy", "variant": "a",
                                                           "paper": 93.2}]
    assert plan.groups[2].paper_note == "the paper's Table 9 (300 epochs)" and not plan.groups[0].paper_note
    assert "paper_note" not in plan.groups[0].to_json()
    cmd = run_command(plan, plan.runs[1], python="python")
    assert cmd[:4] == ["python", "-m", "lakd", "train"] and "solver.lr=0.1" in cmd and "seed=0" in cmd
    assert cmd[-2:] == ["--run-dir", str(tmp_path / "runs" / "b-s0")] and "experiment=b-s0" in cmd
    # the same spec gives the same plan (names do not depend on the machine or the day)
    assert [r.name for r in load_plan(str(spec)).runs] == names


@pytest.mark.parametrize("text, message", [
    ("groups: []", "has no groups"),
    ("groups: [{name: x, runs: [{config: c.yaml}]}]", "has no name"),
    ("groups: [{name: x, runs: [{name: a, config: nope.yaml}]}]", "config 'nope.yaml' does not exist"),
    ("groups: [{name: x, runs: [{name: a, overrides: [solver.epoch=3]}]}]", "unknown config key 'solver.epoch'"),
    ("groupz: []", "unknown key(s) groupz"),
    ("groups: [{name: x, order: random, runs: [{name: a}]}]", "order must be seed-major or run-major"),
    ("groups: [{name: x, runs: [{name: a, paper: high}]}]", "row a: paper must be a number"),
    ("groups: [{name: x, runs: [{name: a, skip: true}]}]", "row a: skip must be the reason not to run the row"),
])
def test_bad_specs_are_one_line_errors(tmp_path, capsys, text, message):
    (tmp_path / "s.yaml").write_text(text)
    assert main(["sweep", str(tmp_path / "s.yaml"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


# ----- running: killed once, then resumed --------------------------------------------------------------------------
def _sweep(spec, runs, res, *extra, **kw):
    return subprocess.Popen([sys.executable, "-m", "lakd", "sweep", str(spec), "--runs-dir", str(runs),
                             "--results", str(res), "--device", "cpu", *extra], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


@pytest.mark.slow
def test_sweep_killed_then_resumed_exactly(tmp_path, capsys):
    spec = write_spec(tmp_path / "s.yaml", epochs=4, seeds=[0])
    runs, res = tmp_path / "runs", tmp_path / "res"
    where = ["--runs-dir", str(runs), "--results", str(res)]
    # dry run: one `lakd train` command per run, nothing started
    assert main(["sweep", str(spec), *where, "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(x.startswith("python -m lakd train ") for x in lines)
    assert not runs.exists()

    # the sweep (one run at a time) is killed with its runs (SIGKILL to the process group) while b trains
    proc = _sweep(spec, runs, res, start_new_session=True)
    deadline = time.time() + 240
    while not (runs / "b-s0" / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(runs / "b-s0" / "last.pt", weights_only=True)["epoch"]
    assert killed_at < 4, "b finished before it could be killed; make it longer"
    assert (res / "a-s0" / "summary.json").exists() and not (res / "b-s0").exists()
    a_mtime = (res / "a-s0" / "summary.json").stat().st_mtime_ns
    assert main(["sweep", str(spec), *where, "--status"]) == 0
    status = capsys.readouterr().out
    assert "a-s0" in status and "finished" in status and "interrupted (resumes from last.pt)" in status
    # the dry run now lists only b, resuming
    assert main(["sweep", str(spec), *where, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and f"resume={runs / 'b-s0'}" in out

    # the same command again: a is skipped, b resumes from its last.pt
    again = _sweep(spec, runs, res)
    log, _ = again.communicate(timeout=300)
    assert again.returncode == 0, log
    assert "1 finished, 1 to resume" in log and "resume b-s0" in log and "start  a-s0" not in log
    assert (res / "a-s0" / "summary.json").stat().st_mtime_ns == a_mtime
    blog = (runs / "_logs" / "b-s0.log").read_text()
    assert f"resumed {runs / 'b-s0'} at epoch {killed_at}" in blog
    assert sorted(os.listdir(res / "b-s0")) == ["config.yaml", "metrics.jsonl", "summary.json"]
    assert [json.loads(x)["epoch"] for x in (res / "b-s0" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    events = [json.loads(x) for x in (res / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events if e["run"] == "b-s0"] == ["start", "resume", "end"]
    plan = json.loads((res / "sweep.json").read_text())
    assert len(plan["invocations"]) == 2 and [r["name"] for r in plan["runs"]] == ["a-s0", "b-s0"]

    # b, interrupted and resumed, is bitwise the uninterrupted run of the same command
    ref_dir = tmp_path / "uninterrupted"
    cmd = run_command(load_plan(str(spec), runs_dir=str(runs)), load_plan(str(spec)).runs[1])
    cmd[-1] = str(ref_dir)
    assert cmd[1:4] == ["-m", "lakd", "train"] and main(cmd[3:]) == 0  # in this process: same code, same numbers
    wa = torch.load(ref_dir / "last.pt", weights_only=True)["model"]
    wb = torch.load(runs / "b-s0" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ra, rb = json.loads((ref_dir / "summary.json").read_text()), json.loads((res / "b-s0" / "summary.json").read_text())
    assert ra["final_top1"] == rb["final_top1"] and ra["best_top1"] == rb["best_top1"]

    # and the report reads the results folder: the plan's groups, rows and comparison
    assert main(["report", str(res), "--out", str(tmp_path / "r.md")]) == 0
    md = (tmp_path / "r.md").read_text()
    assert "| row A | 1 |" in md and "| row B − row A | s0 |" in md and "2 of the 2 runs the sweep plans have finished." in md


@pytest.mark.slow
def test_only_runs_a_selection_and_keeps_the_whole_plan(tmp_path):
    """`--only` (e.g. to run one group first) starts only the runs named; sweep.json still lists every run of the
    spec, records the selection, and a later full sweep skips what the selection finished."""
    spec = write_spec(tmp_path / "s.yaml", epochs=1, seeds=[0])
    runs, res = tmp_path / "runs", tmp_path / "res"
    log, _ = _sweep(spec, runs, res, "--only", "b-s0").communicate(timeout=300)
    assert "start  b-s0" in log and "a-s0" not in log, log
    assert (res / "b-s0" / "summary.json").exists() and not (res / "a-s0").exists()
    plan = json.loads((res / "sweep.json").read_text())
    assert [r["name"] for r in plan["runs"]] == ["a-s0", "b-s0"] and plan["invocations"][-1]["only"] == ["b-s0"]
    log, _ = _sweep(spec, runs, res).communicate(timeout=300)
    assert "start  a-s0" in log and "b-s0" not in log.split("runs in")[1], log
    plan = json.loads((res / "sweep.json").read_text())
    assert len(plan["invocations"]) == 2 and "only" not in plan["invocations"][-1]


def test_only_runs_in_the_order_named(tmp_path, capsys):
    """`--only` is a priority list: runs in the order named, a group's runs in plan order at its place."""
    spec = write_spec(tmp_path / "s.yaml", seeds=[0, 1], extra_groups="""
  - name: other
    runs:
      - {name: c, overrides: [solver.lr=0.2]}
      - {name: a, label: "row A again"}""")
    where = ["--runs-dir", str(tmp_path / "runs"), "--results", str(tmp_path / "res")]

    def order(only):
        assert main(["sweep", str(spec), *where, "--dry-run", "--only", only]) == 0
        return [line.split("experiment=")[1].split()[0] for line in capsys.readouterr().out.strip().splitlines()]

    assert order("b-s1,a-s0,b-s0") == ["b-s1", "a-s0", "b-s0"]
    # a group at its place (its row merged with main's a runs as a's: not twice), a run named again: once
    assert order("c-s1,main,c-s1") == ["c-s1", "a-s0", "b-s0", "a-s1", "b-s1"]
    assert order("other") == ["c-s0", "c-s1"]


def test_eta_of_a_selection_counts_the_runs_finished_before_it(tmp_path):
    """A `--only` invocation estimates its time from every finished run of the spec (here one of 60 s), not only
    from its own (none yet): "ETA 1m00s" for one run left on one slot, where it printed "ETA ?"."""
    from lakd.sweep import SweepRunner

    spec = write_spec(tmp_path / "s.yaml", seeds=[0])
    _fake_run(tmp_path / "res" / "b-s0", "b-s0", 0, 70.0)
    plan = load_plan(str(spec), runs_dir=str(tmp_path / "runs"), results_dir=str(tmp_path / "res"))
    plan.select(["a-s0"])
    runner = SweepRunner(plan, device="cpu", say=lambda s: None)
    assert runner.progress(list(plan.unique())).endswith("ETA 1m00s")


def test_update_rewrites_only_between_markers(tmp_path, capsys):
    for seed, v in ((0, 70.0), (1, 71.0)):
        _fake_run(tmp_path / "res" / f"x-s{seed}", f"x-s{seed}", seed, v)
    doc = tmp_path / "doc.md"
    doc.write_text("# Doc\n\ntext before\n<!-- lakd report: begin -->\nold table\n<!-- lakd report: end -->\nafter\n")
    assert main(["report", str(tmp_path / "res"), "--seeds", "--out", str(tmp_path / "r.md"),
                 "--update", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# Doc\n\ntext before\n<!-- lakd report: begin -->\n### Results over seeds")
    assert "old table" not in text and text.endswith("<!-- lakd report: end -->\nafter\n")
    assert "| x | 2 | 70.50 ± 0.71 |" in text  # std of (70, 71) = sqrt(0.5) = 0.7071
    from lakd.analysis.runs import curve_panels

    groups, _, _ = load_study([str(tmp_path / "res")])
    assert curve_panels(groups) == [("Runs by setting", [("x", [{1: 69.0, 2: 70.0}, {1: 70.0, 2: 71.0}])])]
    assert main(["report", str(tmp_path / "res"), "--seeds", "--out", str(tmp_path / "r.md"), "--plot",
                 str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "res" / "x-s1" / "summary.json").write_text('{"final_top1": 7')  # damaged: a lost result
    assert main(["report", str(tmp_path / "res"), "--seeds", "--out", str(tmp_path / "r.md")]) == 2
    err = capsys.readouterr().err
    assert "x-s1: unreadable summary.json" in err and "error: 1 run(s) have an unreadable summary.json" in err
    # the report is still written from the rest, and says what is missing
    assert "| x ‡ (1 run(s) with an unreadable summary.json left out) | 1 | 70.00 |" in (tmp_path / "r.md").read_text()
    doc.write_text("no markers\n")
    assert main(["report", str(tmp_path / "res"), "--seeds", "--out", str(tmp_path / "r.md"),
                 "--update", str(doc)]) == 2
    assert "must hold the line <!-- lakd report: begin -->" in capsys.readouterr().err


def test_published_numbers_sit_beside_the_rows_and_comparisons_use_the_group_labels(tmp_path):
    spec = write_spec(tmp_path / "s.yaml", extra_groups="""
  - name: ablation
    paper_note: "published, 300 epochs"
    compare: [[b2, a2]]
    runs:
      - {name: a2, label: "A again", paper: 93.08}
      - {name: b2, label: "B again", overrides: [solver.lr=0.1], paper: 93.27}
""")
    from lakd.sweep import write_plan

    write_plan(load_plan(str(spec), results_dir=str(tmp_path / "res")))
    for seed, a, b in ((0, 80.0, 81.0), (1, 80.5, 81.0)):
        _fake_run(tmp_path / "res" / f"a-s{seed}", f"a-s{seed}", seed, a)
        _fake_run(tmp_path / "res" / f"b-s{seed}", f"b-s{seed}", seed, b)
    res = make_seed_report([str(tmp_path / "res")], csv_path=str(tmp_path / "r.csv"))
    md = res["markdown"]
    main_part, ablation = md.split("## ablation")
    assert "paper" not in main_part.split("| A − B")[0]  # no published numbers: no column
    assert "Paper column: published, 300 epochs" in ablation
    assert "| A again (= runs of a) | 2 | 80.25 ± 0.35 |" in ablation and "| 93.08 |" in ablation
    # the merged rows' comparison is labelled as in this group, not as in the group the runs come from
    assert "| B again − A again | s0, s1 | +0.75 |" in ablation
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert [r["paper"] for r in rows if r["group"] == "ablation"] == ["93.08", "93.27"]


def test_groups_reports_only_the_named_groups_and_counts_their_runs(tmp_path, capsys):
    spec = write_spec(tmp_path / "s.yaml", extra_groups="""
  - name: extra
    reference: a
    runs:
      - {name: a, label: "A here"}
      - {name: c, label: "row C", overrides: [solver.lr=0.2]}
""")
    from lakd.sweep import write_plan

    write_plan(load_plan(str(spec), results_dir=str(tmp_path / "res")))
    for seed, a, c in ((0, 80.0, 82.0), (1, 80.5, 83.0)):
        _fake_run(tmp_path / "res" / f"a-s{seed}", f"a-s{seed}", seed, a)
        _fake_run(tmp_path / "res" / f"c-s{seed}", f"c-s{seed}", seed, c)
    md = make_seed_report([str(tmp_path / "res")], groups=["extra"])["markdown"]
    # a-s* belong to main (merged into extra), so the extra group plans only c-s0 and c-s1: both finished
    assert "2 of the 2 runs the sweep plans for these groups have finished." in md
    assert "## extra" in md and "## main" not in md and "row B" not in md
    assert "| row C | 2 | 82.50 ± 0.71 |" in md and "| +2.25 [" in md  # paired vs A: (2.0, 2.5)
    whole = make_seed_report([str(tmp_path / "res")])["markdown"]
    assert "4 of the 6 runs the sweep plans have finished (**partial**" in whole  # b-s0, b-s1 missing
    assert main(["report", str(tmp_path / "res"), "--groups", "extra,nope", "--out", str(tmp_path / "r.md")]) == 2
    assert "error: --groups: no sweep group 'nope'; the plan's groups: main, extra" in capsys.readouterr().err
    assert not (tmp_path / "r.md").exists()
    _fake_run(tmp_path / "plain" / "x-s0", "x-s0", 0, 70.0)
    assert main(["report", str(tmp_path / "plain"), "--groups", "main", "--out", str(tmp_path / "r.md")]) == 2
    assert "--groups needs a sweep's results folder" in capsys.readouterr().err


def test_a_sweep_with_nothing_finished_reports_empty_rows(tmp_path):
    spec = write_spec(tmp_path / "s.yaml")
    from lakd.sweep import write_plan

    write_plan(load_plan(str(spec), results_dir=str(tmp_path / "res")))
    md = make_seed_report([str(tmp_path / "res")])["markdown"]
    assert "0 of the 4 runs the sweep plans have finished (**partial**" in md and "| row A | 0 | — |" in md


def test_a_row_marked_skip_is_listed_and_reported_but_not_run_or_expected(tmp_path, capsys):
    """``skip: REASON``: the row keeps its place in the plan and the tables (with its reason and any runs that
    finished before), but nothing runs it, --dry-run prints no command for it, and the report does not call the
    sweep partial for its missing seeds. A later row with the same config as a skipped one still runs."""
    spec = write_spec(tmp_path / "s.yaml", extra_groups="""
  - name: t5
    runs:
      - {name: c, overrides: [solver.lr=0.2], skip: "repeats row d bitwise"}
      - {name: d, overrides: [solver.lr=0.2]}
""")
    from lakd.sweep import write_plan

    plan = load_plan(str(spec), runs_dir=str(tmp_path / "runs"), results_dir=str(tmp_path / "res"))
    skip = {r.name: r.skip for r in plan.runs}
    assert skip["c-s0"] == skip["c-s1"] == "repeats row d bitwise" and skip["d-s0"] is None
    assert {r.name: r.same_as for r in plan.runs}["d-s0"] is None  # d runs: it does not point at skipped c
    assert [r.name for r in plan.unique()] == ["a-s0", "b-s0", "a-s1", "b-s1", "d-s0", "d-s1"]
    assert plan.groups[1].rows[0].skip == "repeats row d bitwise"
    assert main(["sweep", str(spec), "--dry-run", "--runs-dir", str(tmp_path / "runs"),
                 "--results", str(tmp_path / "res")]) == 0
    out, err = capsys.readouterr()
    assert "experiment=c-s" not in out and "experiment=d-s0" in out and "6 of 6 runs left" in err
    assert main(["sweep", str(spec), "--status", "--results", str(tmp_path / "res")]) == 0
    assert "c-s0" in (status := capsys.readouterr().out) and "skipped (repeats row d bitwise)" in status
    write_plan(plan)
    for name, seed, top1 in (("a", 0, 80.0), ("b", 0, 81.0), ("a", 1, 80.5), ("b", 1, 81.2), ("d", 0, 82.0),
                             ("d", 1, 82.1), ("c", 0, 82.0)):  # c-s0 finished before the row was marked skip
        _fake_run(tmp_path / "res" / f"{name}-s{seed}", f"{name}-s{seed}", seed, top1)
    md = make_seed_report([str(tmp_path / "res")])["markdown"]
    assert ("6 of the 6 runs the sweep plans have finished (2 more, of rows marked skip, are not run; 1 of them "
            "had finished before).") in md and "partial" not in md
    assert "| c (not run further: repeats row d bitwise) | 1 | 82.00 |" in md


# ----- packed sweeps (--per-device) --------------------------------------------------------------------------------
FAKE_RUN = r"""
import json, os, sys, time
args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
run_dir = sys.argv[sys.argv.index("--run-dir") + 1]
start = time.time()
time.sleep(1.0)
os.makedirs(run_dir, exist_ok=True)
with open(os.path.join(run_dir, "trace.json"), "w") as f:
    json.dump({"start": start, "end": time.time(), "threads": args.get("train.threads"),
               "omp": os.environ.get("OMP_NUM_THREADS")}, f)
with open(os.path.join(run_dir, "summary.json"), "w") as f:
    json.dump({"final_top1": 50.0, "wall_time_s": 1.0}, f)
"""


def test_per_device_2_runs_two_at_once_with_the_cores_split(tmp_path, monkeypatch):
    """`--per-device 2` on a CPU: two runs at a time, each with train.threads = cores // 2 (here 4 cores -> 2).
    The runs are a stand-in program (sleep 1 s, write summary.json): what is checked is the scheduling."""
    import lakd.sweep.runner as runner_mod
    from lakd.sweep import SweepRunner

    spec = write_spec(tmp_path / "s.yaml", seeds=[0, 1])  # 4 runs
    plan = load_plan(str(spec), runs_dir=str(tmp_path / "runs"), results_dir=str(tmp_path / "res"))
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_RUN)
    real = runner_mod.run_command
    monkeypatch.setattr(runner_mod, "run_command", lambda p, r, resume=False: [sys.executable, str(fake)]
                        + real(p, r, resume=resume)[4:])  # `python -m lakd train` -> the stand-in
    monkeypatch.setattr(runner_mod, "cpu_cores", lambda: 4)
    said: list[str] = []
    runner = SweepRunner(plan, device="cpu", say=said.append, poll_s=0.05, per_device=2)
    assert runner.slots == 2 and plan.processes == 2 and plan.threads == 2
    assert runner.run() == 0
    assert "2 at a time, 2 thread(s) each" in said[0]
    assert said[-1].startswith("throughput: 4 run(s) in ") and "runs/h, 2 at a time" in said[-1]
    traces = [json.loads((tmp_path / "runs" / r.name / "trace.json").read_text()) for r in plan.unique()]
    assert len(traces) == 4 and all(t["threads"] == "2" and t["omp"] == "2" for t in traces)
    events = sorted((t["start"], +1) for t in traces) + sorted((t["end"], -1) for t in traces)
    live, most = 0, 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):
        live += step
        most = max(most, live)
    assert most == 2  # two at once, never more
    assert all((tmp_path / "res" / r.name / "summary.json").exists() for r in plan.unique())


def test_per_device_on_cuda_shares_each_gpu_and_rejects_nonsense():
    from lakd.sweep import Plan, pack

    plan = Plan("p", "s.yaml", "runs", "res", processes=1, threads=0, runs_per_gpu=1, runs=[])
    pack(plan, 3, gpu=True)
    assert plan.runs_per_gpu == 3 and plan.processes == 1 and plan.threads == 0
    pack(plan, 3, gpu=False, cores=2)
    assert plan.processes == 3 and plan.threads == 1  # never 0 threads (0 would mean PyTorch's default)
    with pytest.raises(LakdError, match="--per-device must be a positive number"):
        pack(plan, 0, gpu=False)


# ----- a results folder's finished runs are never dropped; one sweep at a time (issue 34) ---------------------------
def test_a_smaller_spec_keeps_the_finished_runs_in_the_plan_and_the_report(tmp_path, capsys):
    from lakd.sweep import SweepRunner, write_plan

    res, runs = tmp_path / "res", tmp_path / "runs"
    full = load_plan(str(write_spec(tmp_path / "full.yaml", seeds=[0, 1])), runs_dir=str(runs), results_dir=str(res))
    write_plan(full)
    for name, seed, top1 in (("a", 0, 80.0), ("b", 0, 81.0), ("a", 1, 80.5), ("b", 1, 81.5)):
        _fake_run(res / f"{name}-s{seed}", f"{name}-s{seed}", seed, top1)
    # the spec with row b removed and seed 1 dropped: nothing to run, b's and a-s1's results are kept
    small = tmp_path / "small.yaml"
    small.write_text(write_spec(tmp_path / "tmp.yaml", seeds=[0]).read_text().replace(
        '      - {name: b, label: "row B", overrides: [solver.lr=0.1]}\n', "").replace("compare: [[b, a]]", ""))
    plan = load_plan(str(small), runs_dir=str(runs), results_dir=str(res))
    assert [r.name for r in plan.runs] == ["a-s0"]
    said: list[str] = []
    assert SweepRunner(plan, device="cpu", say=said.append, poll_s=0.01).run() == 0
    assert said[0].startswith("kept 3 finished run(s) of the results folder's earlier plan") and "b-s0" in said[0]
    saved = json.loads((res / "sweep.json").read_text())
    outside = {r["name"] for r in saved["runs"] if r.get("outside")}
    assert outside == {"b-s0", "a-s1", "b-s1"} and len(saved["runs"]) == 4
    assert [(r["name"], r.get("outside", False)) for r in saved["groups"][0]["rows"]] == [("a", False), ("b", True)]
    md = make_seed_report([str(res)])["markdown"]
    assert "| row B (outside the current spec) | 2 | 81.25" in md, md
    assert "1 of the 1 runs the sweep plans have finished (3 more finished earlier, outside the current spec" in md
    assert "| row A | 2 |" in md  # a's seed 1 still counts in its row
    assert main(["sweep", str(small), "--status", "--runs-dir", str(runs), "--results", str(res)]) == 0
    assert capsys.readouterr().out.count("outside the current spec (finished earlier)") == 3
    # the full spec again: the runs are its own again (not outside), nothing dropped, nothing run
    plan = load_plan(str(tmp_path / "full.yaml"), runs_dir=str(runs), results_dir=str(res))
    assert SweepRunner(plan, device="cpu", say=said.append, poll_s=0.01).run() == 0
    saved = json.loads((res / "sweep.json").read_text())
    assert len(saved["runs"]) == 4 and not any(r.get("outside") for r in saved["runs"])


def test_a_second_sweep_on_a_results_folder_is_refused_naming_the_running_one(tmp_path, capsys):
    from lakd.engine import rundir

    spec = write_spec(tmp_path / "s.yaml", seeds=[0])
    res = tmp_path / "res"
    res.mkdir()
    owner = json.dumps({"pid": 4242, "host": "node7", "argv": ["lakd", "sweep", "s.yaml"],
                        "started": "2024-01-02 03:04:05"})
    fd = rundir.hold_lock(str(res), rundir.SWEEP_LOCK, owner)  # the running sweep (here: this process)
    try:
        capsys.readouterr()
        code = main(["sweep", str(spec), "--runs-dir", str(tmp_path / "runs"), "--results", str(res),
                     "--device", "cpu"])
        err = capsys.readouterr().err
    finally:
        os.close(fd)
    assert code == 2 and err.count("\n") == 1, err
    assert (f"error: the results folder {str(res)!r} is in use by another sweep (process 4242 on node7, started "
            f"2024-01-02 03:04:05: lakd sweep s.yaml); wait for it to finish") in err, err
    assert not (tmp_path / "runs").exists() and not (res / "sweep.json").exists()  # nothing started or rewritten


def test_a_run_folder_in_use_by_another_process_waits_and_is_not_a_failure(tmp_path, monkeypatch):
    """Two sweeps that share a runs folder: a run whose folder another process trains is neither started nor
    counted failed (before its start, or when its process stopped on the folder's lock); it is collected when
    the other process has finished it."""
    import threading

    import lakd.sweep.runner as runner_mod
    from lakd.engine import rundir
    from lakd.sweep import SweepRunner

    spec = write_spec(tmp_path / "s.yaml", seeds=[0])
    runs, res = tmp_path / "runs", tmp_path / "res"
    plan = load_plan(str(spec), runs_dir=str(runs), results_dir=str(res))
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_RUN)
    real = runner_mod.run_command
    monkeypatch.setattr(runner_mod, "run_command", lambda p, r, resume=False: [sys.executable, str(fake)]
                        + real(p, r, resume=resume)[4:])
    (runs / "a-s0").mkdir(parents=True)
    other = rundir.RunDir(str(runs / "a-s0"), created=False)
    other.lock()  # "another sweep's run process" trains a-s0

    def finish_it():  # ... and finishes it a little later
        time.sleep(1.5)
        _fake_run(runs / "a-s0" / "out", "a-s0", 0, 70.0)
        for f in os.listdir(runs / "a-s0" / "out"):
            os.replace(runs / "a-s0" / "out" / f, runs / "a-s0" / f)
        other.release()

    said: list[str] = []
    runner = SweepRunner(plan, device="cpu", say=said.append, poll_s=0.05)
    t = threading.Thread(target=finish_it)
    t.start()
    try:
        assert runner.run() == 0, said
    finally:
        t.join()
    assert "1 running elsewhere" in said[0] and "collected a-s0" in said, said
    assert "start  a-s0" not in said and not runner.failed
    assert (res / "a-s0" / "summary.json").exists() and (res / "b-s0" / "summary.json").exists()

    # taken between the sweep's look and the run's start: not started (its folder is not touched), waits
    held = rundir.RunDir(str(runs / "b-s0"), created=False)
    held.lock()
    try:
        runner2 = SweepRunner(plan, device="cpu", say=said.append, poll_s=0.05)
        runner2._start(plan.runs[1], None)
        assert not runner2.active and [r.name for r in runner2.waiting] == ["b-s0"]
        assert said[-1].startswith("wait   b-s0: its run folder is in use by process")
        assert (runs / "b-s0" / "summary.json").exists()  # the other process's folder, untouched
        # and when the run's own process stopped on the lock: exit code 2 while another process holds the
        # folder is a wait, not a failure
        runner2.waiting.clear()
        proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(2)"])
        proc.wait()
        runner2.active["b-s0"] = runner_mod._Active(proc, time.time(), None, plan.runs[1], 2, open(os.devnull, "w"))
        assert runner2._reap() and runner2.failed == [] and [r.name for r in runner2.waiting] == ["b-s0"]
    finally:
        held.release()


def test_a_finished_run_whose_config_is_refused_now_is_kept_not_an_error(tmp_path, capsys):
    """A check added after a run finished (e.g. a warm-up longer than the run) does not stop the sweep of its spec:
    the finished run is kept (and reported); an unfinished run of such a row is a one-line error naming it."""
    from lakd.sweep import SweepRunner

    spec = write_spec(tmp_path / "s.yaml", seeds=[0], extra_groups="""
  - name: old
    runs:
      - {name: c, overrides: ["solver.milestones=[3,2]"]}
""")
    runs, res = tmp_path / "runs", tmp_path / "res"
    where = ["--runs-dir", str(runs), "--results", str(res)]
    plan = load_plan(str(spec), runs_dir=str(runs), results_dir=str(res))  # reading the plan still works
    assert plan.runs[-1].refused.startswith("solver.milestones must be increasing")
    assert main(["sweep", str(spec), *where, "--status"]) == 0
    assert "refused: solver.milestones must be increasing" in capsys.readouterr().out
    for argv in (["--device", "cpu"], ["--dry-run"]):  # nothing starts: one line naming the run
        capsys.readouterr()
        assert main(["sweep", str(spec), *where, *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: group old, row c, seed 0: solver.milestones must be increasing") and \
            err.count("\n") == 1, err
    assert not runs.exists() and not res.exists()
    for name, top1 in (("a", 80.0), ("b", 81.0), ("c", 79.0)):
        _fake_run(res / f"{name}-s0", f"{name}-s0", 0, top1)
    plan = load_plan(str(spec), runs_dir=str(runs), results_dir=str(res))
    assert {r.name: bool(r.refused) for r in plan.runs} == {"a-s0": False, "b-s0": False, "c-s0": True}
    said: list[str] = []
    assert SweepRunner(plan, device="cpu", say=said.append, poll_s=0.01).run() == 0
    assert any(s.startswith("kept   c-s0: finished before its config was refused (solver.milestones") for s in said)
    assert "| c | 1 | 79.00" in make_seed_report([str(res)])["markdown"]
    assert main(["sweep", str(spec), "--status", "--runs-dir", str(runs), "--results", str(res)]) == 0
    assert "finished; its config is refused now (solver.milestones" in capsys.readouterr().out
