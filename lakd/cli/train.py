"""``lakd train CONFIG [key=value ...]``."""
from __future__ import annotations

import argparse
import json

HELP = "train a student (or a teacher: method scratch) from a YAML config, with key=value overrides"

EPILOG = """examples:
  lakd train configs/cifar10/lakd/resnet56_resnet20_149.yaml
  lakd train configs/cifar10/teachers/resnet56.yaml solver.epochs=30 data.root=/data
  lakd train CONFIG resume=runs/my_run          # continue an interrupted run from its last.pt
  lakd train CONFIG --run-dir runs/x --overwrite   # replace the run in runs/x (a live one is never touched)
  torchrun --nproc_per_node=4 -m lakd train CONFIG   # several GPUs (DDP)

CONFIG is a YAML file or a shipped config's name as `lakd configs` lists it (cifar10/kd/resnet56_resnet20), which
works from any folder.

quick runs (any config; minutes on a CPU instead of hours):
  data.train_subset=N           train on N evenly spaced training images (0: all)
  data.test_subset=N            evaluate on N evenly spaced test images (0: all)
  solver.max_steps_per_epoch=N  cut every epoch after N steps (0: full epochs)
  solver.epochs=N               fewer epochs (the schedule follows)
  e.g. lakd train cifar10/lakd/resnet56_resnet20_149 solver.epochs=1 data.train_subset=2000 data.test_subset=1000

--show-config prints the run's resolved config (its method's sections only); --show-config all prints every key
of every method.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = EPILOG
    p.add_argument("config", nargs="?", help="YAML config file (see `lakd configs`)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. solver.epochs=10 sdm.splits=[1,4,9]")
    p.add_argument("--run-dir", help="write the run here instead of output_dir/experiment")
    p.add_argument("--show-config", nargs="?", const="run", default=None, metavar="all",
                   help="print the resolved config and exit: the run's own sections, or every key with `all`")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (same as train.progress=false; there is none when stderr is not a terminal)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the finished or killed run in the run folder (never a live one)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with resume=: continue although the config differs from the checkpoint's (the change is "
                        "recorded in the run folder's config_changes.jsonl)")
    p.add_argument("--from-best", action="store_true",
                   help="with resume=: continue from the run's best.pt when its last.pt cannot be read (truncated, "
                        "corrupt); the epochs after the best one are trained again")


def run(args) -> int:
    from ..config import dump_config, load_config, run_sections
    from .common import config_and_overrides

    overrides = list(args.overrides)
    config = args.config
    show = args.show_config
    if show not in (None, "run", "all"):  # `lakd train --show-config CONFIG ...`: the value is the config
        if config is not None:
            overrides.insert(0, config)
        config, show = show, "run"
    config, overrides = config_and_overrides(config, overrides)  # `lakd train key=value ...` with no file
    if args.no_progress:
        overrides.append("train.progress=false")
    cfg = load_config(config, overrides)
    if show:
        print(dump_config(cfg if show == "all" else run_sections(cfg)), end="")
        return 0
    from ..engine.trainer import Trainer
    from ..runtime import distributed as dist

    try:
        trainer = Trainer(cfg, run_dir=args.run_dir, quiet=args.quiet, overwrite=args.overwrite,
                          allow_config_change=args.allow_config_change, from_best=args.from_best)
        summary = trainer.fit()
    finally:
        dist.cleanup()
    if trainer.dist.is_main:
        print(json.dumps({k: summary[k] for k in ("run_dir", "final_top1", "best_top1", "final_ek", "wall_time_s")}))
    return 0
