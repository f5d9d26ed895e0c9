"""``lakd`` command line: one sub-command per module of ``lakd.cli``.

Each sub-command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
Errors caused by the user's input (``LakdError``) print one line and exit with code 2.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import re
import sys

from ..errors import LakdError
from ..runtime.threads import set_openmp_wait_policy

set_openmp_wait_policy()  # PASSIVE on a busy machine, before anything imports torch (runtime/threads.py)

#: sub-command -> module (in the order `lakd --help` lists them)
COMMANDS = {
    "demo": "lakd.cli.demo",
    "train": "lakd.cli.train",
    "eval": "lakd.cli.evaluate",
    "models": "lakd.cli.listing",
    "methods": "lakd.cli.listing",
    "configs": "lakd.cli.listing",
    "bench": "lakd.cli.bench",
    "analyze": "lakd.cli.analyze",
    "visualize": "lakd.cli.visualize",
    "report": "lakd.cli.report",
    "sweep": "lakd.cli.sweep",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lakd",
        description="Knowledge distillation of image classifiers: LAKD and the baselines it is compared with.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"lakd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, modname in COMMANDS.items():
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name == modname:
                continue  # a command not shipped in this build
            raise
        help_text = getattr(mod, "HELPS", {}).get(name, getattr(mod, "HELP", ""))
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        adder = getattr(mod, f"add_arguments_{name}", None) or mod.add_arguments
        adder(p)
        p.set_defaults(_run=getattr(mod, f"run_{name}", None) or mod.run)
    return parser


class ConsoleHandler(logging.Handler):
    """The library's log records as the CLI prints them: info lines on stdout, warnings on stderr prefixed
    with ``warning:``. The streams are looked up at each record (so redirected or captured streams work).
    Commands whose standard output is for programs (``--json``, ``--dry-run``) send info lines to stderr too."""

    def __init__(self, info_to_stderr: bool = False):
        super().__init__()
        self.info_to_stderr = info_to_stderr

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            if record.levelno >= logging.WARNING:
                print(f"warning: {msg}", file=sys.stderr, flush=True)
            else:
                print(msg, file=sys.stderr if self.info_to_stderr else sys.stdout, flush=True)
        except Exception:  # a closed stream: never let logging break a run
            self.handleError(record)


def setup_logging() -> ConsoleHandler:
    """Show the library's messages (``logging.getLogger("lakd")``) on the console, once per process; returns
    the console handler (one per process, so that commands run one after another in a process share it)."""
    logger = logging.getLogger("lakd")
    handler = next((h for h in logger.handlers if isinstance(h, ConsoleHandler)), None)
    if handler is None:
        handler = ConsoleHandler()
        logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    return handler


def main(argv: list[str] | None = None) -> int:
    console = setup_logging()
    parser = build_parser()
    # key=value overrides may come after options (`lakd train CONFIG --quiet solver.epochs=1`)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all(re.match(r"^[A-Za-z_][\w.]*=", x) for x in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    console.info_to_stderr = bool(getattr(args, "json", False) or getattr(args, "dry_run", False))
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except LakdError as e:
        # under torchrun every rank fails alike: say it once (a rank that names a stuck rank 0 says it too)
        if os.environ.get("RANK", "0") == "0" or "stopped answering" in str(e):
            print(f"error: {e}", file=sys.stderr)
        if e.exit_now and os.environ.get("WORLD_SIZE", "1") not in ("", "1"):  # a rank lost: exit within the timeout
            with contextlib.suppress(OSError, ValueError):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(e.exit_code)
        return e.exit_code
    except KeyboardInterrupt as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`lakd sweep --status | head`): stop quietly, as `ls` does
        with contextlib.suppress(OSError, ValueError):  # and let the interpreter's final flush go nowhere
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a command killed by a closed pipe
    except OSError as e:  # a write to a path the user named (--out, --csv, --plot) failed: one line, exit 2
        from .common import output_error

        err = output_error(args, e)
        if err is None:
            raise
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
