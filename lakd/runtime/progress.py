"""Progress on the console for the long commands (``lakd eval``, ``analyze cka``, ``visualize``, ``bench``): a tqdm
bar on standard error, shown only when the switch is on (``train.progress``, ``--no-progress``) AND standard error
is a terminal, as training's bar. In a log file, a pipe or a test there is no progress output at all; what the
library has to say goes through ``logging`` as before.

    bar = progress_bar(total=len(loader), desc="student", enabled=on)   # a no-op object when off
    for batch in tracked(loader, "student", enabled=on):                 # each pass over the loader: a new bar
        ...
"""
from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any


def shown(enabled: bool = True, stream=None) -> bool:
    """Whether a bar would be drawn: the switch is on and ``stream`` (default: standard error) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(enabled) and bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class _NoBar:
    """What ``progress_bar`` hands out when nothing is drawn: every tqdm call used here, doing nothing."""

    disable = True
    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_description(self, *args, **kwargs) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(total: int | None = None, desc: str = "", enabled: bool = True, unit: str = "it"):
    """A tqdm bar on standard error (cleared when closed), or a do-nothing stand-in when ``shown`` is false.
    Use it as a context manager or close it."""
    if not shown(enabled):
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, file=sys.stderr)


class tracked:  # noqa: N801  (used like a function: ``for batch in tracked(loader, ...)``)
    """``iterable`` with a bar per pass (``len(iterable)`` steps when it has a length); any other attribute is
    the iterable's own, so a wrapped data loader still works where a loader is expected."""

    def __init__(self, iterable: Iterable, desc: str = "", enabled: bool = True, unit: str = "batch",
                 total: int | None = None):
        self.iterable, self.desc, self.enabled, self.unit, self.total = iterable, desc, enabled, unit, total

    def __len__(self) -> int:
        return len(self.iterable)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name == "iterable":  # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.iterable, name)

    def __iter__(self) -> Iterator:
        total = self.total
        if total is None:
            try:
                total = len(self.iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        with progress_bar(total, self.desc, self.enabled, self.unit) as bar:
            for item in self.iterable:
                yield item
                bar.update(1)
