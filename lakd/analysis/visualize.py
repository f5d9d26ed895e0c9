"""Pictures of the analyses: CKA heatmaps and stage-by-stage comparisons (the paper's Figure 1), grids of
class activation maps and NDAM attention maps (Figures 4, 6 and 7), and the report's accuracy curves.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas, so nothing here touches the
global ``pyplot`` state or needs a display.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.ticker import MaxNLocator

from ..distillers.losses import ndam_map
from ..errors import LakdError
from .runs import Run
from .tables import Table, build_tables, column_runs, column_title, display_label, method_key, subset_phrase


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=fig.dpi, bbox_inches="tight")
    return path


# ----------------------------------------------------------------------------------------------------
# CKA figures
# ----------------------------------------------------------------------------------------------------


def plot_cka_heatmap(matrix, row_labels: Sequence[str], col_labels: Sequence[str], path: str,
                     title: str = "", row_title: str = "teacher", col_title: str = "student") -> str:
    """Heatmap of a CKA matrix (rows: teacher representations, columns: student's), values in the cells."""
    m = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    if m.ndim != 2 or m.shape != (len(row_labels), len(col_labels)):
        raise ValueError(f"matrix of shape {m.shape} does not match {len(row_labels)} x {len(col_labels)} "
                         f"labels")
    rows, cols = m.shape
    fig = _new_figure(max(4.0, 1.0 + 0.8 * cols), max(3.2, 1.2 + 0.6 * rows))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(m, cmap="magma", vmin=0.0, vmax=1.0, aspect="auto", origin="lower")
    ax.set_xticks(range(cols))
    tilt = cols > 4 or max(len(c) for c in col_labels) * cols > 36
    ax.set_xticklabels(col_labels, rotation=35 if tilt else 0, ha="right" if tilt else "center")
    ax.set_yticks(range(rows))
    ax.set_yticklabels(row_labels)
    ax.set_xlabel(col_title)
    ax.set_ylabel(row_title)
    if rows * cols <= 200:
        for r in range(rows):
            for c in range(cols):
                v = m[r, c]
                txt = "n/a" if math.isnan(v) else f"{v:.2f}"
                ax.text(c, r, txt, ha="center", va="center", fontsize=8,
                        color="black" if (not math.isnan(v) and v > 0.6) else "white")
    cb = fig.colorbar(im, ax=ax)
    cb.set_label("linear CKA")
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_cka_diagonal(students: Sequence[dict], path: str, title: str = "") -> str:
    """Grouped bars: CKA of teacher stage i vs student stage i, one bar colour per student (Figure 1)."""
    if not students:
        raise ValueError("no students to plot")
    k = max(len(s["diagonal"]) for s in students)
    fig = _new_figure(max(5.0, 1.5 + 1.2 * k * max(1, len(students)) / 2), 3.8)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(students)
    cmap = colormaps["tab10"]
    for i, s in enumerate(students):
        vals = [np.nan if v is None else v for v in s["diagonal"]]
        xs = np.arange(len(vals)) + (i - (len(students) - 1) / 2) * width
        top1 = s.get("top1")
        label = s["label"] if top1 is None else f"{s['label']} (top-1 {top1:.2f}%)"
        bars = ax.bar(xs, np.nan_to_num(vals), width=width * 0.95, color=cmap(i % 10), label=label)
        for b, v in zip(bars, vals):
            if not math.isnan(v):
                ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.2f}", ha="center", va="bottom",
                        fontsize=7)
    labels = max((s["diagonal_labels"] for s in students), key=len)
    ax.set_xticks(range(k))
    ax.set_xticklabels([f"{lab}" for lab in labels])
    ax.set_xlabel("teacher stage i vs student stage i")
    ax.set_ylabel("linear CKA")
    ax.set_ylim(0, 1.08)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=min(3, len(students)),
              frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------------
# Attention maps
# ----------------------------------------------------------------------------------------------------


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Per-sample min-max normalisation of B x H x W maps to [0, 1] (a constant map becomes 0)."""
    flat = maps.flatten(1)
    lo = flat.min(1).values[:, None, None]
    hi = flat.max(1).values[:, None, None]
    return (maps - lo) / (hi - lo).clamp_min(1e-12)


@torch.no_grad()
def attention_maps(model, images: torch.Tensor, targets: torch.Tensor, stage: int = -1, ndam_avg: float = 1.0,
                   ndam_max: float = 2.0, use_abs: bool = True, preact: bool = False) -> dict:
    """The maps ``lakd visualize`` draws, upsampled bilinearly to the image size and min-max normalised.

    Returns ``cam`` (the class activation map of the TRUE class, B x H x W), ``ndam`` (the NDAM map of the
    output of stage ``stage``, 1-based or negative from the end, B x H x W; of its pre-activation with
    ``preact``, the map ``ndam.source: teacher_preact`` trains with), ``pred`` (B) and ``prob`` (B, the softmax
    probability of the prediction).
    """
    model.eval()
    logits, feats = model(images, features=True, preact=preact)
    stages = feats["stages_preact"] if preact else feats["stages"]
    n = len(stages)
    if stage == 0 or not -n <= stage <= n:
        raise LakdError(f"--stage {stage} does not exist: this model has stages 1..{n} (or -1 for the last)")
    sidx = stage - 1 if stage > 0 else n + stage
    size = images.shape[-2:]
    cams = model.class_maps(feats["last"])
    cam = cams[torch.arange(len(targets), device=cams.device), targets.to(cams.device)]
    cam = F.interpolate(cam[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    nd = ndam_map(stages[sidx].float(), ndam_avg, ndam_max, use_abs)
    nd = F.interpolate(nd.float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    prob = torch.softmax(logits.float(), 1)
    p, pred = prob.max(1)
    return {"cam": minmax(cam).cpu(), "ndam": minmax(nd).cpu(), "pred": pred.cpu(), "prob": p.cpu(),
            "stage": sidx + 1}


def spread_classes(count: int, num_classes: int) -> dict[int, int]:
    """How many images of each class ``lakd visualize`` shows by default: ``count`` images over ``num_classes``
    classes, one per class on classes evenly spaced over the label range while ``count <= num_classes`` (6 of
    10: classes 0, 1, 3, 5, 6, 8), else every class ``count // num_classes`` times and evenly spaced classes
    once more. Returns {class: number of images}, in class order."""
    if count < 1 or num_classes < 1:
        return {}
    each, extra = divmod(count, num_classes)
    quota = dict.fromkeys(range(num_classes), each) if each else {}
    for i in range(extra):
        c = i * num_classes // extra
        quota[c] = quota.get(c, 0) + 1
    return dict(sorted((c, k) for c, k in quota.items() if k))


def pick_images(loader, num_classes: int, count: int = 6, start: int = 0, positions: Sequence[int] | None = None,
                spread: bool = True) -> list[dict]:
    """The test images a picture shows, read from ``loader`` (batches with ``image``, ``target``, ``index``)
    in one pass that stops as soon as it has them: the given ``positions`` (in that order); else ``count``
    images from position ``start`` on, spread over the classes (``spread_classes``: the first images of each
    chosen class, rows in class order; on a class-sorted test set too) or, with ``spread=False``, consecutive.
    When the test set lacks a chosen class, the first other images from ``start`` on fill the rows.
    Returns dicts {"position", "image" (C x H x W tensor), "target", "index" (the dataset's index)}."""
    if positions is not None:
        want = list(positions)
        need = None
    elif spread:
        need = spread_classes(count, num_classes)
        want = []
    else:
        want = list(range(start, start + count))
        need = None
    wanted = set(want)
    picked: dict[int, dict] = {}
    spare: list[dict] = []  # unpicked images from ``start`` on, to fill rows of classes the test set lacks
    seen = 0
    for batch in loader:
        targets = batch["target"].tolist()
        index = batch["index"].tolist()
        for j, t in enumerate(targets):
            pos = seen + j
            item = {"position": pos, "target": int(t), "index": int(index[j])}
            if need is None:
                if pos in wanted:
                    picked[pos] = item | {"image": batch["image"][j].detach().cpu()}
            elif pos >= start:
                if need.get(int(t), 0) > 0:
                    need[int(t)] -= 1
                    picked[pos] = item | {"image": batch["image"][j].detach().cpu()}
                elif len(spare) < count:
                    spare.append(item | {"image": batch["image"][j].detach().cpu()})
        seen += len(targets)
        if (need is None and len(picked) == len(wanted)) or (need is not None and not any(need.values())):
            break
    if need is None:
        missing = [p for p in want if p not in picked]
        if missing:
            raise LakdError(f"the test set has {seen} images; positions {missing[:5]} do not exist")
        return [picked[p] for p in want]
    out = sorted(picked.values(), key=lambda d: (d["target"], d["position"]))
    out += sorted(spare, key=lambda d: d["position"])[:count - len(out)]
    if not out:
        raise LakdError(f"the test set has {seen} images, none from --start {start} on; use a smaller --start")
    return out


def _wrap_title(text: str, fits, max_lines: int = 3) -> str:
    """A column title in lines that each ``fits(line)`` (True when the line is narrow enough), broken after
    ``_ - / . :`` or spaces where it can and inside a name where it must; when it needs more than ``max_lines``
    lines its middle is cut ("…"), its start and its end (a run's seed, say) kept."""

    def wrap(t: str) -> list[str]:
        lines: list[str] = []
        line = token = ""
        for ch in t + "\0":
            if ch != "\0":
                token += ch
            if ch not in " _-/.:\0":
                continue
            if line and not fits(line + token.rstrip()):
                lines.append(line.rstrip())
                line = ""
            while len(token) > 1 and not fits(token.rstrip()):  # a piece wider than a line: break it inside
                k = max(k for k in range(1, len(token) + 1) if k == 1 or fits(token[:k]))
                lines.append(token[:k])
                token = token[k:]
            line += token
            token = ""
        if line.strip():
            lines.append(line.rstrip())
        return lines

    lines = wrap(text)
    cut = 1
    while len(lines) > max_lines and cut < len(text):
        half = (len(text) - cut) // 2
        lines = wrap(text[:half + (len(text) - cut) % 2] + "…" + text[len(text) - half:])
        cut += 1
    return "\n".join(lines)


def attention_grid_figure(images: np.ndarray, rows: Sequence[dict], models: Sequence[dict], alpha: float = 0.5,
                          title: str = "") -> Figure:
    """The figure ``plot_attention_grid`` saves (arguments as there)."""
    n = len(images)
    cols = 1 + 2 * len(models)
    cell = 2.0
    fig = _new_figure(cell * cols, cell * n + 0.9)
    axes = fig.subplots(n, cols, squeeze=False)
    fig.subplots_adjust(left=0.04, right=0.99, wspace=0.08, hspace=0.35, bottom=0.9 / (cell * n + 0.9) + 0.02)
    cmap = colormaps["jet"]
    for r in range(n):
        img = np.clip(images[r], 0, 1)
        ax = axes[r, 0]
        ax.imshow(img, interpolation="nearest")
        ax.set_ylabel(f"#{rows[r]['index']}\ntrue: {rows[r]['true']}", fontsize=8)
        for j, m in enumerate(models):
            for k, key in enumerate(("cam", "ndam")):
                a = axes[r, 1 + 2 * j + k]
                a.imshow(img, interpolation="nearest")
                a.imshow(m[key][r], cmap=cmap, vmin=0, vmax=1, alpha=alpha, interpolation="bilinear")
                if key == "cam":
                    ok = bool(m["correct"][r])
                    a.set_xlabel(f"pred: {m['pred'][r]} ({100 * float(m['prob'][r]):.0f}%)"
                                 + (" ✓" if ok else " ✗"), fontsize=8, color="green" if ok else "red")
        for a in axes[r]:
            a.set_xticks([])
            a.set_yticks([])
            for sp in a.spines.values():
                sp.set_visible(False)
    axes[0, 0].set_title("input", fontsize=9)
    # long run names wrap onto up to 3 lines, each no wider than a column (its axes and the gap beside it),
    # measured in the font the title is drawn in
    renderer = fig.canvas.get_renderer()
    font = FontProperties(size=TITLE_POINTS)
    box = axes[0, 0].get_window_extent(renderer)
    room = 0.95 * box.width * (1 + 0.08)

    def fits(line: str) -> bool:
        return renderer.get_text_width_height_descent(line, font, ismath=False)[0] <= room

    for j, m in enumerate(models):
        name = _wrap_title(str(m["label"]), fits)
        axes[0, 1 + 2 * j].set_title(f"{name}\nCAM (true class)", fontsize=TITLE_POINTS)
        axes[0, 2 + 2 * j].set_title(f"{name}\nNDAM stage {m['stage']}", fontsize=TITLE_POINTS)
    cax = fig.add_axes((0.3, 0.25 / (cell * n + 0.9), 0.4, 0.15 / (cell * n + 0.9)))
    cb = fig.colorbar(ScalarMappable(Normalize(0, 1), cmap=cmap), cax=cax, orientation="horizontal")
    cb.set_label("map value (min-max normalised per map)", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    if title:  # above the tallest column title (the saved picture's tight box grows to hold it)
        height = fig.dpi * fig.get_figheight()
        top = max(a.title.get_window_extent(renderer).y1 for a in axes[0])
        fig.suptitle(title, fontsize=10, y=(top + 8) / height, va="bottom")
    return fig


#: font size of the attention grid's column titles
TITLE_POINTS = 8


def plot_attention_grid(images: np.ndarray, rows: Sequence[dict], models: Sequence[dict], path: str,
                        alpha: float = 0.5, title: str = "") -> str:
    """The attention grid: one row per image; columns: the input, then per model its CAM and NDAM overlays.

    ``images``: N x H x W x 3 in [0, 1]. ``rows[i]``: {"index", "true"} (dataset index, true label name).
    ``models[j]``: {"label", "stage", "cam" (N x H x W in [0,1]), "ndam" (same), "pred" (names), "prob",
    "correct" (bools)}. Long model labels wrap (``_wrap_title``) so that column titles never overlap.
    """
    return _save(attention_grid_figure(images, rows, models, alpha, title), path)


# ----------------------------------------------------------------------------------------------------
# Accuracy curves (lakd report --plot)
# ----------------------------------------------------------------------------------------------------


def _panel_grid(n: int, ncols: int, width: float, height: float):
    """A figure with ``n`` panels, ``ncols`` to a row; returns the figure and the ``n`` axes (spares hidden)."""
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig = _new_figure(width * ncols, height * nrows)
    grid = fig.subplots(nrows, ncols, squeeze=False)
    axes = [grid[i // ncols, i % ncols] for i in range(nrows * ncols)]
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


#: curves with fewer points than this get a marker on every point (a 1-epoch run is one point: no line at all)
MARKER_BELOW = 20


def _accuracy_axes(ax, title: str) -> None:
    """Titles, labels, legend; an x-axis of whole epochs. A short run's axis spans its epochs with half an epoch
    of room on each side and a tick per epoch (a single epoch is a tick at 1, not a range of 0.95..1.05)."""
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("epoch")
    xs = [float(x) for line in ax.get_lines() for x in line.get_xdata()]
    if xs and max(xs) - min(xs) <= 10:
        lo, hi = int(min(xs)), int(max(xs))
        ax.set_xlim(lo - 0.5, hi + 0.5)
        ax.set_xticks(range(lo, hi + 1))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("test top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_curves(runs: Sequence[Run], path: str, tables: Sequence[Table] | None = None) -> str:
    """Test top-1 vs epoch, one line per run, one panel per table column (dataset, teacher -> student; runs
    without a teacher appear in the panels of their model). Colour: method (named as the tables name it,
    ``display_label``); line style: seed; dashed: incomplete; a marker on every point of a short curve."""
    return _save(curves_figure(runs, tables), path)


def curves_figure(runs: Sequence[Run], tables: Sequence[Table] | None = None) -> Figure:
    """The figure ``plot_curves`` saves."""
    with_curve = [r for r in runs if r.curve]
    if not with_curve:
        raise LakdError("no run has test accuracies in metrics.jsonl to plot; nothing to draw for --plot")
    tables = build_tables(with_curve) if tables is None else tables
    panels = [(t, ci) for t in tables for ci in range(len(t.columns))]
    panels = [(t, ci) for t, ci in panels if any(r.curve for r in column_runs(t, ci, with_curve))]
    methods = sorted({r.method for r in with_curve}, key=method_key)
    colours = {m: colormaps["tab10"](i % 10) for i, m in enumerate(methods)}
    styles = ["-", "-.", ":"]
    fig, axes = _panel_grid(len(panels), 3, 5.2, 3.8)
    for ax, (t, ci) in zip(axes, panels):
        members = sorted(column_runs(t, ci, with_curve), key=lambda r: (method_key(r.method), str(r.seed)))
        for m in methods:
            for k, r in enumerate(x for x in members if x.method == m):
                xs, ys = zip(*r.curve)
                style = styles[k % len(styles)] if r.complete else "--"
                ax.plot(xs, ys, style, color=colours[r.method], lw=1.4 if r.complete else 1.0, alpha=0.9,
                        marker="o" if len(xs) < MARKER_BELOW else None, ms=4,
                        label=f"{display_label(r.method)} seed {r.seed}" + ("" if r.complete else " (incomplete)"))
        subset = subset_phrase(members)
        _accuracy_axes(ax, f"{t.dataset}: {column_title(t.columns[ci])}"
                       + (f"\non {subset} test images (data.test_subset)" if subset else ""))
    fig.tight_layout()
    return fig


def plot_seed_curves(panels: Sequence[tuple[str, Sequence[tuple[str, Sequence[dict[int, float]]]]]],
                     path: str) -> str:
    """Test top-1 vs epoch over seeds (``lakd report`` of a sweep): one panel per ``(title, rows)``, each row a
    ``(label, curves)`` with one ``{epoch: top-1}`` per seed, drawn as the mean over seeds with a band from the
    lowest to the highest seed."""
    panels = [(title, [(label, curves) for label, curves in rows if curves]) for title, rows in panels]
    panels = [p for p in panels if p[1]]
    if not panels:
        raise LakdError("no finished run has test accuracies in metrics.jsonl; nothing to draw for --plot")
    fig, axes = _panel_grid(len(panels), 2, 6.0, 4.0)
    for ax, (title, rows) in zip(axes, panels):
        palette = colormaps["tab10" if len(rows) <= 10 else "tab20"]  # a colour per row up to 20 rows
        for k, (label, curves) in enumerate(rows):
            epochs = sorted(set.intersection(*(set(c) for c in curves)))
            colour = palette(k % palette.N)
            ax.plot(epochs, [sum(c[e] for c in curves) / len(curves) for e in epochs], "-o", ms=3, color=colour,
                    label=f"{label} (n={len(curves)})")
            if len(curves) > 1:
                ax.fill_between(epochs, [min(c[e] for c in curves) for e in epochs],
                                [max(c[e] for c in curves) for e in epochs], color=colour, alpha=0.15)
        _accuracy_axes(ax, title)
    fig.tight_layout()
    return _save(fig, path)
