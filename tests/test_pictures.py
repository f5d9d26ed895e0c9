"""Attention-map pictures: NDAM by hand, class activation maps of the true class, the figures (not blank), and
the ``lakd visualize`` command on digits checkpoints."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from lakd.cli.main import main
from lakd.errors import LakdError

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------
# Attention maps and pictures
# ----------------------------------------------------------------------------------------------------


def test_ndam_map_by_hand():
    from lakd.analysis.visualize import ndam_map

    f = torch.tensor([[[[1.0, -3.0]], [[2.0, 1.0]]]])  # B=1, C=2, H=1, W=2
    # |F|: channel mean [1.5, 2], channel max [2, 3] -> A = [1.5 + 4, 2 + 6] = [5.5, 8], mean 6.75
    want = torch.tensor([[[[5.5 / 6.75, 8 / 6.75]]]])
    for fn in (ndam_map,):  # the one implementation (lakd.distillers.losses), as the analyses import it
        out = fn(f, 1.0, 2.0, True)
        assert out.shape == (1, 1, 1, 2)
        assert torch.allclose(out, want, atol=1e-6)
        assert out.mean().item() == pytest.approx(1.0, abs=1e-6)


def test_attention_maps_pick_the_true_class(tiny_model):
    from lakd.analysis.visualize import attention_maps, minmax
    from lakd.distillers.losses import class_activation_maps

    model = tiny_model("resnet8", 3)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64).float()
    y = torch.tensor([4, 0, 9])
    out = attention_maps(model, x, y, stage=2)
    assert out["cam"].shape == (3, 32, 32) and out["ndam"].shape == (3, 32, 32) and out["stage"] == 2
    for k in ("cam", "ndam"):
        assert out[k].min() >= 0 and out[k].max() <= 1 + 1e-6
        assert torch.allclose(out[k].flatten(1).max(1).values, torch.ones(3))
    with torch.no_grad():
        logits, feats = model(x, features=True)
        cam = class_activation_maps(feats["last"], model.classifier)[torch.arange(3), y]
    want = minmax(torch.nn.functional.interpolate(cam[:, None], size=(32, 32), mode="bilinear",
                                                  align_corners=False)[:, 0])
    assert torch.allclose(out["cam"], want, atol=1e-5)
    assert out["pred"].tolist() == logits.argmax(1).tolist()
    with pytest.raises(LakdError, match="stage"):
        attention_maps(model, x, y, stage=4)
    # a stage output follows a ReLU: abs off draws the same map; its pre-activation is signed, so there it differs
    assert torch.equal(attention_maps(model, x, y, stage=2, use_abs=False)["ndam"], out["ndam"])
    pre_on = attention_maps(model, x, y, stage=2, preact=True)["ndam"]
    pre_off = attention_maps(model, x, y, stage=2, preact=True, use_abs=False)["ndam"]
    assert not torch.allclose(pre_on, out["ndam"]) and not torch.allclose(pre_on, pre_off)


def test_pictures_are_written_and_not_blank(tmp_path, not_blank):
    from lakd.analysis.visualize import plot_attention_grid, plot_cka_diagonal, plot_cka_heatmap

    m = [[0.9, 0.5, 0.2], [0.4, 0.8, 0.3]]
    p1 = plot_cka_heatmap(m, ["stage1", "stage2"], ["b1", "b2", "b3"], str(tmp_path / "h.png"), title="t")
    students = [{"label": "kd", "diagonal": [0.9, 0.7, 0.5], "diagonal_labels": ["stage1", "stage2", "stage3"],
                 "top1": 70.0},
                {"label": "lakd", "diagonal": [0.95, 0.85, None], "diagonal_labels": ["stage1", "stage2", "stage3"]}]
    p2 = plot_cka_diagonal(students, str(tmp_path / "sub" / "d.png"))
    g = np.random.default_rng(0)
    imgs = g.random((2, 16, 16, 3))
    maps = g.random((2, 16, 16))
    cols = [{"label": "m", "stage": 3, "cam": maps, "ndam": maps[::-1], "pred": ["a", "b"], "prob": [0.9, 0.4],
             "correct": [True, False]}]
    p3 = plot_attention_grid(imgs, [{"index": 0, "true": "a"}, {"index": 1, "true": "a"}], cols,
                             str(tmp_path / "g.png"))
    for p in (p1, p2, p3):
        not_blank(p)


def test_visualize_cli(tmp_path, digits_ckpts, capsys, not_blank):
    out = tmp_path / "maps.png"
    rc = main(["visualize", "--checkpoints", digits_ckpts["teacher"], digits_ckpts["lakd_run"], "--images", "3",
               "--stage", "2", "--out", str(out)])
    assert rc == 0
    not_blank(out)
    img = imread(out)
    assert img.shape[0] > img.shape[1] * 0.5  # 3 rows of 5 columns plus titles
    assert "wrote" in capsys.readouterr().out
    assert main(["visualize", "--checkpoints", digits_ckpts["teacher"], "--stage", "7",
                 "--out", str(tmp_path / "bad.png")]) == 2
    assert main(["visualize", "--checkpoints", digits_ckpts["teacher"], "--indices", "0,99999",
                 "--out", str(tmp_path / "bad.png")]) == 2


# ----------------------------------------------------------------------------------------------------
# lakd visualize: readable titles, images spread over the classes, outputs in a named folder
# ----------------------------------------------------------------------------------------------------


def _title_boxes(fig):
    """Window extents of the attention grid's column titles of the first row (left to right)."""
    renderer = fig.canvas.get_renderer()
    axes = sorted((a for a in fig.axes if a.get_title()), key=lambda a: a.get_position().x0)
    return [a.title.get_window_extent(renderer) for a in axes]


def test_long_run_names_do_not_overlap_in_column_titles(monkeypatch):
    import lakd.analysis.visualize as vis

    g = np.random.default_rng(0)
    imgs = g.random((2, 16, 16, 3))
    maps = g.random((2, 16, 16))
    names = ["cifar100_lakd_resnet32x4_resnet8x4_splits_1_4_9_ndam_abs_on-s0",
             "cifar100_catkd_wrn_40_2_wrn_16_2_beta_50-s0",
             "averyveryverylongrunnamewithoutanyseparatorsatallreallylongindeedyes",
             "MMMMWWWWMMMMWWWWMMMMWWWWMMMMWWWWMMMMWWWWMMMMWWWWMMMMWWWWMMMMWWWW_s1"]
    cols = [{"label": n, "stage": 3, "cam": maps, "ndam": maps, "pred": ["a", "b"], "prob": [0.9, 0.4],
             "correct": [True, False]} for n in names]
    rows = [{"index": 0, "true": "a"}, {"index": 1, "true": "b"}]

    def overlaps(fig):
        fig.canvas.draw()
        boxes = _title_boxes(fig)
        assert len(boxes) == 1 + 2 * len(names)
        above = fig._suptitle.get_window_extent(fig.canvas.get_renderer())
        return [i for i in range(len(boxes) - 1) if boxes[i].x1 > boxes[i + 1].x0] + \
            (["suptitle"] if above.y0 < max(b.y1 for b in boxes) else [])

    assert overlaps(vis.attention_grid_figure(imgs, rows, cols, title="cifar10 test images: maps")) == []
    fig = vis.attention_grid_figure(imgs, rows, cols)
    titles = sorted((a for a in fig.axes if a.get_title()), key=lambda a: a.get_position().x0)
    titles = [a.get_title().rsplit("\n", 1)[0] for a in titles[1::2]]  # the CAM columns' names
    assert all(t.count("\n") <= 2 for t in titles)  # at most 3 lines
    assert titles[0].replace("\n", "") == names[0] and titles[1].replace("\n", "") == names[1]  # whole names
    assert titles[3].startswith("MMMM") and titles[3].endswith("WWWW_s1") and "…" in titles[3]  # start and end
    # the check sees the problem: titles unwrapped, as before, overlap
    monkeypatch.setattr(vis, "_wrap_title", lambda text, fits, max_lines=3: text)
    assert overlaps(vis.attention_grid_figure(imgs, rows, cols, title="cifar10 test images: maps")) != []


class _SortedLoader:
    """A class-sorted test set (every image of class 0 first, then class 1, ...) in batches; counts the batches
    read."""

    def __init__(self, per_class=20, classes=10, batch=16, missing=()):
        targets = [c for c in range(classes) if c not in missing for _ in range(per_class)]
        self.targets = torch.tensor(targets)
        self.batch = batch
        self.read = 0

    def __iter__(self):
        for i in range(0, len(self.targets), self.batch):
            self.read += 1
            t = self.targets[i:i + self.batch]
            yield {"image": t[:, None, None, None].float().expand(-1, 3, 2, 2), "target": t,
                   "index": torch.arange(i, i + len(t)) + 1000}


def test_default_images_spread_over_the_classes_of_a_class_sorted_test_set():
    from lakd.analysis.visualize import pick_images, spread_classes

    assert spread_classes(6, 10) == {0: 1, 1: 1, 3: 1, 5: 1, 6: 1, 8: 1}
    assert spread_classes(3, 100) == {0: 1, 33: 1, 66: 1}
    assert spread_classes(12, 10) == {c: 2 if c in (0, 5) else 1 for c in range(10)}
    loader = _SortedLoader()
    picks = pick_images(loader, num_classes=10, count=6)
    assert [p["target"] for p in picks] == [0, 1, 3, 5, 6, 8]  # not six airplanes
    assert [p["position"] for p in picks] == [0, 20, 60, 100, 120, 160]  # the first image of each class
    assert [p["index"] for p in picks] == [1000, 1020, 1060, 1100, 1120, 1160]
    assert all(int(p["image"][0, 0, 0]) == p["target"] for p in picks)
    assert loader.read == 11  # stopped after class 8's first image (position 160, batch 11 of 13)
    # from --start on; --consecutive: test-set order; --indices: those, in that order
    assert [p["position"] for p in pick_images(_SortedLoader(), 10, 2, start=10)] == [10, 100]
    assert [p["target"] for p in pick_images(_SortedLoader(), 10, 4, spread=False)] == [0, 0, 0, 0]
    assert [p["position"] for p in pick_images(_SortedLoader(), 10, positions=[41, 3])] == [41, 3]
    with pytest.raises(LakdError, match="do not exist"):
        pick_images(_SortedLoader(), 10, positions=[5, 500])
    # a class the test set lacks (a subset): its row is filled by the first other image
    picks = pick_images(_SortedLoader(missing=(3,)), num_classes=10, count=6)
    assert [p["target"] for p in picks] == [0, 1, 5, 6, 8, 0] and picks[-1]["position"] == 1


def test_visualize_and_cka_write_beside_the_run_and_say_where(tmp_path, digits_ckpts, capsys, monkeypatch,
                                                             not_blank):
    import os
    import shutil

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    # checkpoints outside any run folder: a named folder of the current one, never loose files
    assert main(["visualize", "--checkpoints", digits_ckpts["teacher"], "--images", "2"]) == 0
    out = capsys.readouterr().out
    assert "wrote lakd-visualize/attention.png (2 images of 2 classes x 1 models)" in out
    not_blank(work / "lakd-visualize" / "attention.png")
    assert main(["analyze", "cka", "--teacher", digits_ckpts["teacher"], "--students", digits_ckpts["kd_run"],
                 "--images", "8"]) == 0
    out = capsys.readouterr().out
    assert "in lakd-cka:" in out and "lakd-cka/cka_stages.png" in out
    assert sorted(os.listdir(work)) == ["lakd-cka", "lakd-visualize"]
    # checkpoints in run folders (lakd train's config.yaml beside them): into the first one
    run = tmp_path / "runs" / "kd_run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("experiment: kd_run\n")
    shutil.copy(digits_ckpts["kd_run"], run / "best.pt")
    ck = str(run / "best.pt")
    assert main(["visualize", "--checkpoints", ck, digits_ckpts["teacher"], "--images", "3"]) == 0
    assert f"wrote {run / 'visualize' / 'attention.png'} (3 images of 3 classes" in capsys.readouterr().out
    not_blank(run / "visualize" / "attention.png")
    assert main(["analyze", "cka", "--teacher", digits_ckpts["teacher"], "--students", ck, "--images", "8"]) == 0
    assert (run / "cka" / "cka.json").exists() and f"in {run / 'cka'}:" in capsys.readouterr().out
    # --out DIR and --out FILE.png
    assert main(["visualize", "--checkpoints", ck, "--images", "2", "--out", str(tmp_path / "maps")]) == 0
    assert (tmp_path / "maps" / "attention.png").exists()
    assert main(["visualize", "--checkpoints", ck, "--images", "2", "--out", str(tmp_path / "m.png")]) == 0
    assert (tmp_path / "m.png").exists()
    assert main(["visualize", "--checkpoints", ck, "--out", str(tmp_path / "m.jpg")]) == 2
    assert "give a .png file name or a folder" in capsys.readouterr().err


def test_overrides_after_arch_options_are_overrides(tmp_path, digits_ckpts, capsys):
    """`--arch NAME key=value`: the key=value items after a model-name list go to the overrides (they were taken
    for more model names: "--arch takes one model name ... got 2")."""
    assert main(["visualize", "--checkpoints", digits_ckpts["bare"], "--arch", "resnet8", "data.dataset=digits",
                 "--images", "2", "--out", str(tmp_path / "v")]) == 0
    assert main(["analyze", "cka", "--teacher", digits_ckpts["teacher"], "--students", digits_ckpts["bare"],
                 "--student-arch", "resnet8", "data.test_subset=40", "--images", "8", "--out", str(tmp_path / "c")]) == 0
    assert "on 8 test images" in capsys.readouterr().out
