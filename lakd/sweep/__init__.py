"""``lakd sweep``: a spec's configs x overrides x seeds as ``lakd train`` processes, several at a time.

``spec``: parsing a spec, naming runs, the plan (``sweep.json``); ``runner``: the process pool, finished and
interrupted runs, provenance. Above the engine (it reads run folders, never imports the trainer), below
``analysis`` (which reads the plan) and ``cli``.
"""
from .runner import SweepRunner, collect, has_checkpoint, is_finished, pack, write_plan
from .spec import Plan, PlanGroup, PlannedRun, PlanRow, load_plan, merge_plan, read_plan, run_command

__all__ = ["Plan", "PlanGroup", "PlanRow", "PlannedRun", "SweepRunner", "collect", "has_checkpoint",
           "is_finished", "load_plan", "merge_plan", "pack", "read_plan", "run_command", "write_plan"]
