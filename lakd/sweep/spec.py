"""A sweep's spec: parsing, run naming, the expanded plan (``Plan``, written to ``sweep.json``) and run commands.

A sweep spec is a YAML file (example: ``configs/sweeps/cifar10_seeds.yaml``)::

    name: my_sweep
    runs_dir: runs/my_sweep          # one run folder per run (checkpoints; not committed)
    results_dir: results/my_sweep    # each finished run's summary.json, metrics.jsonl, config.yaml (committed)
    seeds: [0, 1, 2]
    processes: 2                     # CPU: runs at a time ...
    threads: 1                       # ... with this many threads each
    runs_per_gpu: 1                  # CUDA: runs at a time per visible GPU
    overrides: [solver.epochs=3]     # for every run
    groups:                          # run in this order
      - name: main
        order: seed-major            # all rows at seed 0, then seed 1, ... (or run-major)
        reference: kd                # the row `lakd report` compares the others with (paired over seeds)
        overrides: []                # for every run of the group
        grid: {solver.lr: [0.05, 0.1]}   # optional: every row x every combination of these values
        runs:
          - {name: kd, config: configs/cifar10/kd/resnet56_resnet20.yaml, overrides: [kd.T=4]}

Report metadata: keys that change nothing about the runs, only how ``lakd report`` shows them: a group's
``title``, ``reference``, ``compare`` and ``paper_note`` (whose published numbers the rows' ``paper`` values
are), a row's ``label`` and ``paper`` (a published top-1 shown beside the row). They travel in the plan's
groups (``PlanGroup``, ``PlanRow``) and never enter a run's config or name.

A run is named ``<row>[_<key><value>...]-s<seed>``, the same on every machine and every day. Two rows of any
group that resolve to the same config (apart from their names) are one run: the later row points at the earlier
one (``same_as`` in the plan) and is not run twice. A row with ``skip: REASON`` is planned and listed, but not
run and not expected: for a row kept so that a table keeps its shape although its runs are known to add nothing
(the reason is shown wherever the row is). Runs of it that finished earlier still count in the report.

A sweep never drops a finished run from its results folder's plan: when a spec plans fewer runs than the folder's
``sweep.json`` holds (a row removed, a seed dropped), the runs that had finished stay in the plan and the report,
marked ``outside`` (the current spec no longer plans them; nothing runs them) (``merge_plan``). A run whose config is
refused (``load_config``: a key, a value or a check added since it ran) is planned with the reason (``refused``):
reading the plan (``--status``, the report) still works; a finished one is kept and never run again, an unfinished
one stops ``lakd sweep`` before anything starts, naming it (``Plan.refused_left``).

``Plan.to_json`` / ``Plan.from_json`` are the one format of ``sweep.json``: the sweep writes it, the report
reads it (``lakd.analysis.runs``).
"""
from __future__ import annotations

import copy
import itertools
import json
import os
import re
import shlex
import sys
from dataclasses import asdict, dataclass, field

from ..config import load_config, load_yaml
from ..engine import rundir
from ..errors import LakdError

SPEC_KEYS = {"name", "runs_dir", "results_dir", "seeds", "processes", "threads", "runs_per_gpu", "overrides",
             "groups", "description"}
#: ``title``, ``reference``, ``compare``, ``paper_note``: report metadata (see the module's docstring)
GROUP_KEYS = {"name", "title", "order", "reference", "compare", "overrides", "grid", "runs", "seeds", "paper_note"}
#: ``label``, ``paper``: report metadata; ``skip``: a reason not to run the row (listed and reported, not run)
ROW_KEYS = {"name", "config", "overrides", "label", "paper", "skip"}
#: config keys that do not make two runs different (where the run lives, how many threads it uses, which checks
#: it waives)
NOT_IDENTITY = ("experiment", "output_dir", "resume", "waive")
NOT_IDENTITY_NESTED = (("train", "threads"), ("train", "progress"), ("train", "log_every"))


@dataclass
class PlannedRun:
    name: str  # the run folder's name: <variant>-s<seed>
    variant: str  # the row (and grid values) without the seed
    group: str
    seed: int
    config: str | None
    overrides: list[str]  # everything but seed/experiment/threads, which the runner adds
    same_as: str | None = None  # an earlier run with the same resolved config: this one is not run
    skip: str | None = None  # the row's reason not to run it (``skip:`` in the spec)
    outside: bool = False  # a finished run of an earlier plan that the current spec no longer plans (kept, not run)
    refused: str | None = None  # why its config is refused (load_config's error): never run


@dataclass
class PlanRow:
    """A row of a group as the report shows it: ``variant`` is the runs it reads (another row's, when merged)."""
    name: str
    label: str
    variant: str
    paper: float | None = None  # report metadata: a published top-1
    skip: str | None = None
    outside: bool = False  # a row of an earlier plan, kept for its finished runs (``merge_plan``)

    def to_json(self) -> dict:
        return {"name": self.name, "label": self.label, "variant": self.variant,
                **({"paper": self.paper} if self.paper is not None else {}),
                **({"skip": self.skip} if self.skip is not None else {}),
                **({"outside": True} if self.outside else {})}


@dataclass
class PlanGroup:
    name: str
    title: str
    seeds: list[int]
    reference: str | None
    compare: list[list[str]]
    rows: list[PlanRow]
    paper_note: str = ""  # report metadata: whose numbers the rows' ``paper`` values are

    def to_json(self) -> dict:
        return {"name": self.name, "title": self.title, "seeds": self.seeds, "reference": self.reference,
                "compare": self.compare, "rows": [r.to_json() for r in self.rows],
                **({"paper_note": self.paper_note} if self.paper_note else {})}

    @classmethod
    def from_json(cls, d: dict) -> PlanGroup:
        rows = [PlanRow(r["name"], r.get("label") or r["name"], r.get("variant") or r["name"], r.get("paper"),
                        r.get("skip"), bool(r.get("outside"))) for r in d.get("rows", [])]
        return cls(d["name"], d.get("title") or d["name"], list(d.get("seeds") or []), d.get("reference"),
                   [list(c) for c in d.get("compare") or []], rows, d.get("paper_note") or "")


@dataclass
class Plan:
    name: str
    spec_path: str
    runs_dir: str
    results_dir: str
    processes: int
    threads: int
    runs_per_gpu: int
    runs: list[PlannedRun]  # in run order, duplicates included (with same_as set)
    groups: list[PlanGroup] = field(default_factory=list)
    #: every run of the spec when ``runs`` is a selection (``lakd sweep --only``); sweep.json keeps the whole plan
    all_runs: list[PlannedRun] | None = None
    spec: dict = field(default_factory=dict)  # the spec as read (provenance)
    invocations: list[dict] = field(default_factory=list)  # one entry per ``lakd sweep`` (host, commit, slots)

    def unique(self) -> list[PlannedRun]:
        """The runs to run: neither a duplicate of an earlier run, nor of a row marked ``skip``, nor kept from an
        earlier plan (``outside``)."""
        return [r for r in self.runs if r.same_as is None and r.skip is None and not r.outside]

    def refused_left(self, finished) -> LakdError | None:
        """The one-line error for the runs to run whose config is refused and that have not finished
        (``finished(run)``), naming the first; None when there are none."""
        left = [r for r in self.unique() if r.refused and not finished(r)]
        if not left:
            return None
        r = left[0]
        more = f" ({len(left) - 1} more run(s) refused: `lakd sweep SPEC --status` lists them)" if len(left) > 1 else ""
        return LakdError(f"group {r.group}, row {r.variant}, seed {r.seed}: {r.refused}{more}")

    def select(self, names: list[str]) -> None:
        """Keep the runs named (or of the groups named) for this invocation, in the order named (a group's runs
        in plan order at its place): the priority in which free slots take them. The whole plan is remembered."""
        self.all_runs = self.all_runs or list(self.runs)
        chosen: dict[str, PlannedRun] = {}
        for name in names:
            for r in self.runs:
                if name in (r.name, r.group):
                    chosen.setdefault(r.name, r)
        self.runs = list(chosen.values())

    def run_dir(self, run: PlannedRun) -> str:
        return os.path.join(self.runs_dir, run.name)

    def result_dir(self, run: PlannedRun) -> str:
        return os.path.join(self.results_dir, run.name)

    def to_json(self) -> dict:
        """``sweep.json``: the spec, the expanded plan (every run, with its command) and the invocations."""
        return {"name": self.name, "spec_path": self.spec_path, "spec": self.spec, "runs_dir": self.runs_dir,
                "results_dir": self.results_dir, "processes": self.processes, "threads": self.threads,
                "runs_per_gpu": self.runs_per_gpu, "groups": [g.to_json() for g in self.groups],
                "runs": [{**asdict(r), "command": shlex.join(run_command(self, r, python="python"))}
                         for r in (self.all_runs or self.runs)],
                "invocations": self.invocations}

    @classmethod
    def from_json(cls, d: dict, results_dir: str | None = None) -> Plan:
        """A plan read back from ``sweep.json`` (``results_dir``: where it was found, when it has moved)."""
        fields = set(PlannedRun.__dataclass_fields__)
        runs = [PlannedRun(**{k: v for k, v in r.items() if k in fields}) for r in d.get("runs", [])]
        return cls(name=d.get("name", ""), spec_path=d.get("spec_path", ""), runs_dir=d.get("runs_dir", ""),
                   results_dir=results_dir or d.get("results_dir", ""), processes=int(d.get("processes", 1)),
                   threads=int(d.get("threads", 0)), runs_per_gpu=int(d.get("runs_per_gpu", 1)), runs=runs,
                   groups=[PlanGroup.from_json(g) for g in d.get("groups", [])], spec=d.get("spec") or {},
                   invocations=list(d.get("invocations") or []))


def read_plan(results_dir: str) -> Plan | None:
    """The plan in a results folder's ``sweep.json``; None when there is none. A damaged file is an error."""
    path = os.path.join(results_dir, rundir.SWEEP_PLAN)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return Plan.from_json(json.load(f), results_dir)
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise LakdError(f"cannot read the sweep plan {path!r} ({e}); run the sweep again to "
                        f"rewrite it, or remove it to report the run folders without the sweep's layout") from None


# ----------------------------------------------------------------------------------------------------------------
def _as_list(value, what: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise LakdError(f"{what} must be a list, got {value!r}")
    return value


def _check_keys(d: dict, allowed: set, where: str) -> None:
    if not isinstance(d, dict):
        raise LakdError(f"{where} must be a mapping of keys, got {d!r}")
    extra = sorted(set(d) - allowed)
    if extra:
        raise LakdError(f"unknown key(s) {', '.join(extra)} in {where}; known: {', '.join(sorted(allowed))}")


def _slug(key: str, value) -> str:
    """``sdm.splits``, [1, 4, 9] -> ``splits1-4-9``: a file-name-safe, deterministic name part."""
    text = json.dumps(value) if not isinstance(value, str) else value
    text = re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")
    return f"{key.split('.')[-1]}{text}"


def _override_text(key: str, value) -> str:
    if isinstance(value, (list, dict, bool)) or value is None:
        return f"{key}={json.dumps(value)}"
    return f"{key}={value}"


def _identity(cfg: dict) -> str:
    cfg = copy.deepcopy(cfg)
    for k in NOT_IDENTITY:
        cfg.pop(k, None)
    for sec, k in NOT_IDENTITY_NESTED:
        cfg.get(sec, {}).pop(k, None)
    return json.dumps(cfg, sort_keys=True, default=str)


def load_plan(spec_path: str, runs_dir: str | None = None, results_dir: str | None = None,
              processes: int | None = None, threads: int | None = None, runs_per_gpu: int | None = None) -> Plan:
    """Read and expand a sweep spec; every run's config is resolved (so a bad key fails now, not in an hour: a run
    whose config is refused carries the reason, ``PlannedRun.refused``, and the sweep stops on it before it starts
    anything)."""
    spec = load_yaml(spec_path)
    spec_as_read = copy.deepcopy(spec)
    _check_keys(spec, SPEC_KEYS, f"sweep spec {spec_path!r}")
    name = str(spec.get("name") or os.path.splitext(os.path.basename(spec_path))[0])
    results = results_dir or str(spec.get("results_dir") or os.path.join("results", name))
    seeds_all = _as_list(spec.get("seeds", [0]), "seeds")
    common = [str(x) for x in _as_list(spec.get("overrides"), "overrides")]
    groups = _as_list(spec.get("groups"), "groups")
    if not groups:
        raise LakdError(f"sweep spec {spec_path!r} has no groups; add `groups:` with at least one `runs:` list")
    runs: list[PlannedRun] = []
    by_identity: dict[str, str] = {}  # resolved config (with seed) -> run name
    variant_of: dict[str, str] = {}  # run name -> its variant (for rows that point at another row)
    seen_names: set[str] = set()
    group_info = []
    for gi, g in enumerate(groups):
        _check_keys(g, GROUP_KEYS, f"group {gi + 1} of {spec_path!r}")
        gname = str(g.get("name") or f"group{gi + 1}")
        seeds = _as_list(g.get("seeds", seeds_all), f"group {gname}: seeds")
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or not seeds:
            raise LakdError(f"group {gname}: seeds must be a non-empty list of integers, got {seeds!r}")
        order = g.get("order", "seed-major")
        if order not in ("seed-major", "run-major"):
            raise LakdError(f"group {gname}: order must be seed-major or run-major, got {order!r}")
        grid = g.get("grid") or {}
        if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
            raise LakdError(f"group {gname}: grid must map config keys to non-empty lists of values")
        combos = list(itertools.product(*grid.values())) if grid else [()]
        rows = []
        for ri, r in enumerate(_as_list(g.get("runs"), f"group {gname}: runs")):
            _check_keys(r, ROW_KEYS, f"row {ri + 1} of group {gname}")
            if not r.get("name"):
                raise LakdError(f"row {ri + 1} of group {gname} has no name; every row needs `name:`")
            paper = r.get("paper")
            if paper is not None and (isinstance(paper, bool) or not isinstance(paper, (int, float))):
                raise LakdError(f"group {gname}, row {r['name']}: paper must be a number (a published top-1), got "
                                f"{paper!r}")
            skip = r.get("skip")
            if skip is not None and (not isinstance(skip, str) or not skip.strip()):
                raise LakdError(f"group {gname}, row {r['name']}: skip must be the reason not to run the row (text), "
                                f"got {skip!r}")
            config = r.get("config")
            if config is not None and not os.path.exists(config):
                raise LakdError(f"group {gname}, row {r['name']}: config {config!r} does not exist (paths are "
                                f"relative to the folder you run `lakd sweep` in)")
            for combo in combos:
                grid_over = [_override_text(k, v) for k, v in zip(grid, combo)]
                variant = "_".join([str(r["name"])] + [_slug(k, v) for k, v in zip(grid, combo)])
                label = str(r.get("label") or variant)
                overrides = common + [str(x) for x in _as_list(g.get("overrides"), f"group {gname}: overrides")] \
                    + [str(x) for x in _as_list(r.get("overrides"), f"row {r['name']}: overrides")] + grid_over
                rows.append({"label": label, "variant": variant, "config": config, "overrides": overrides,
                             "paper": paper, "skip": skip})
        items = [(row, s) for s in seeds for row in rows] if order == "seed-major" else \
            [(row, s) for row in rows for s in seeds]
        for row, seed in items:
            run_name = f"{row['variant']}-s{seed}"
            refused = None
            try:
                ident = _identity(load_config(row["config"], row["overrides"] + [f"seed={seed}"]))
            except LakdError as e:  # planned with the reason: never run (an unfinished one stops the sweep)
                refused = str(e)
                ident = json.dumps(["refused", row["config"], row["overrides"], seed])
            same = by_identity.get(ident)
            if same is None and run_name in seen_names:
                raise LakdError(f"two different runs are both named {run_name!r}; give the rows distinct names")
            runs.append(PlannedRun(name=run_name, variant=row["variant"], group=gname, seed=seed,
                                   config=row["config"], overrides=row["overrides"], same_as=same, skip=row["skip"],
                                   refused=refused))
            if row["skip"] is not None:  # not run: a later row with this config must run it, not point here
                continue
            if same is None:
                by_identity[ident] = run_name
                seen_names.add(run_name)
                variant_of[run_name] = row["variant"]
            else:
                row["variant_run"] = variant_of[same]
        group_info.append(PlanGroup(
            name=gname, title=str(g.get("title") or gname), seeds=seeds, reference=g.get("reference"),
            compare=_as_list(g.get("compare"), f"group {gname}: compare"),
            # a row that duplicates an earlier group's row reads that row's runs
            rows=[PlanRow(row["variant"], row["label"], row.get("variant_run", row["variant"]), row["paper"],
                          row["skip"]) for row in rows],
            paper_note=str(g.get("paper_note") or "")))
    procs = int(processes if processes is not None else spec.get("processes", 1))
    thr = int(threads if threads is not None else spec.get("threads", 0))
    per_gpu = int(runs_per_gpu if runs_per_gpu is not None else spec.get("runs_per_gpu", 1))
    if procs < 1 or per_gpu < 1 or thr < 0:
        raise LakdError("processes and runs_per_gpu must be at least 1, threads at least 0 (0: PyTorch's default)")
    return Plan(name=name, spec_path=spec_path,
                runs_dir=runs_dir or str(spec.get("runs_dir") or os.path.join("runs", name)),
                results_dir=results,
                processes=procs, threads=thr, runs_per_gpu=per_gpu, runs=runs, groups=group_info, spec=spec_as_read)


def merge_plan(plan: Plan, old: Plan | None, finished) -> list[str]:
    """Keep in ``plan`` what ``old`` (the results folder's earlier plan) holds and ``plan`` no longer plans, as far
    as it had finished (``finished(run)``): those runs, marked ``outside`` (never run), and the rows and groups that
    read them, marked ``outside`` too. Returns the kept runs' names."""
    if old is None:
        return []
    every = plan.all_runs if plan.all_runs is not None else plan.runs
    names = {r.name for r in every}
    old_runs = old.all_runs or old.runs
    kept = [r for r in old_runs if r.name not in names and (r.outside or r.same_as is None) and finished(r)]
    kept_names = {r.name for r in kept}
    # a duplicate row of a kept run reads it: keep it too (its report row points at the same runs)
    kept += [r for r in old_runs if r.name not in names and r.same_as in kept_names and r.name not in kept_names]
    for r in kept:
        r.outside = True
    every.extend(kept)
    variants = {r.variant for r in kept} | {r.variant for r in every if r.name in names}
    groups = {g.name: g for g in plan.groups}
    for og in old.groups:
        rows = [PlanRow(r.name, r.label, r.variant, r.paper, r.skip, True) for r in og.rows
                if r.variant in {k.variant for k in kept} and r.variant in variants]
        g = groups.get(og.name)
        if g is None:
            if rows:
                plan.groups.append(PlanGroup(og.name, og.title, og.seeds, og.reference, og.compare, rows,
                                             og.paper_note))
            continue
        have = {r.name for r in g.rows}
        g.rows.extend(r for r in rows if r.name not in have)
    return [r.name for r in kept]


def run_command(plan: Plan, run: PlannedRun, python: str = sys.executable, resume: bool = False) -> list[str]:
    """The ``lakd train`` command of one run (``resume=`` its own folder when it has a ``last.pt``)."""
    run_dir = plan.run_dir(run)
    cmd = [python, "-m", "lakd", "train"] + ([run.config] if run.config else [])
    cmd += list(run.overrides) + [f"seed={run.seed}", f"experiment={run.name}", "train.progress=false"]
    if plan.threads:
        cmd.append(f"train.threads={plan.threads}")
    if resume:
        cmd.append(f"resume={run_dir}")
    return cmd + ["--run-dir", run_dir]
