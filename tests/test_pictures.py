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
