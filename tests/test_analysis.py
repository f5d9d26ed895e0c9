"""Analyses: linear CKA (full and minibatch estimators), attention-map pictures, the results report, and the
``lakd analyze cka`` / ``lakd visualize`` / ``lakd report`` commands on tiny models and the digits data."""
from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest
import torch
import yaml
from matplotlib.image import imread

from lakd.analysis.cka import (
    MinibatchCKA,
    cka_from_grams,
    full_cka_matrix,
    gram_linear,
    hsic_unbiased,
    linear_cka,
    minibatch_cka,
    parse_points,
    run_cka,
)
from lakd.analysis.report import load_run, make_report
from lakd.cli.main import main
from lakd.errors import LakdError
from lakd.models import create_model

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------------
# Independent numpy reference, straight from the definitions
# ----------------------------------------------------------------------------------------------------


def np_hsic(K: np.ndarray, L: np.ndarray) -> float:
    """Biased HSIC: tr(K H L H) / (n-1)^2 with the centring matrix H = I - 11'/n."""
    n = K.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(K @ H @ L @ H)) / (n - 1) ** 2


def np_cka(X: np.ndarray, Y: np.ndarray) -> float:
    X = X.reshape(X.shape[0], -1)
    Y = Y.reshape(Y.shape[0], -1)
    K, L = X @ X.T, Y @ Y.T
    return np_hsic(K, L) / math.sqrt(np_hsic(K, K) * np_hsic(L, L))


def np_hsic_unbiased(K: np.ndarray, L: np.ndarray) -> float:
    """Song et al. (2012), eq. (5), written with explicit loops over the tilde matrices' sums."""
    n = K.shape[0]
    Kt, Lt = K.copy(), L.copy()
    np.fill_diagonal(Kt, 0.0)
    np.fill_diagonal(Lt, 0.0)
    term1 = sum(Kt[i, j] * Lt[j, i] for i in range(n) for j in range(n))
    term2 = Kt.sum() * Lt.sum() / ((n - 1) * (n - 2))
    ones = np.ones(n)
    term3 = 2.0 / (n - 2) * float(ones @ Kt @ Lt @ ones)
    return (term1 + term2 - term3) / (n * (n - 3))


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------
# CKA estimators
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(40, 7), (12, 3, 4, 4)])  # feature form (d < n) and Gram form (d > n)
def test_cka_with_itself_is_one(shape):
    x = rand(*shape)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert cka_from_grams(gram_linear(x), gram_linear(x)) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("dim", [6, 80])  # both code paths of linear_cka
def test_cka_invariant_to_orthogonal_transform_and_isotropic_scaling(dim):
    x, y = rand(30, dim, seed=1), rand(30, 5, seed=2)
    y = y + x[:, :5]  # related to x, so the CKA is not tiny
    q, _ = torch.linalg.qr(rand(dim, dim, seed=3))
    base = linear_cka(x, y)
    assert 0.05 < base < 0.99
    assert linear_cka(x @ q, y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(3.7 * x, 0.01 * y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(2.0 * (x @ q), y) == pytest.approx(base, abs=1e-10)
    # but not to a non-isotropic scaling
    assert abs(linear_cka(x * torch.linspace(0.1, 10, dim, dtype=torch.float64), y) - base) > 1e-3


@pytest.mark.parametrize("xshape,ydim", [((5,), 3), ((50,), 70), ((2, 3, 3), 4)])
def test_cka_matches_numpy_hsic_formula(xshape, ydim):
    n = 25
    x = rand(n, *xshape, seed=4)
    y = rand(n, ydim, seed=6) + x.flatten(1)[:, :1]
    ref = np_cka(x.numpy(), y.numpy())
    assert linear_cka(x, y) == pytest.approx(ref, abs=1e-12)
    assert linear_cka(y, x) == pytest.approx(ref, abs=1e-12)
    m = full_cka_matrix([gram_linear(x), gram_linear(y)])
    assert m[0, 1] == pytest.approx(ref, abs=1e-12) and m[1, 0] == pytest.approx(ref, abs=1e-12)
    assert m[0, 0] == pytest.approx(1.0) and m[1, 1] == pytest.approx(1.0)


def test_cka_of_one_dimensional_features_is_squared_correlation():
    # hand check: for 1-D features, CKA = <xc, yc>^4 / (|xc|^4 |yc|^4) = Pearson r^2
    x = torch.tensor([[1.0], [2.0], [3.0], [4.0]], dtype=torch.float64)
    y = torch.tensor([[1.0], [2.0], [3.0], [5.0]], dtype=torch.float64)
    # xc = [-1.5,-.5,.5,1.5], yc = [-1.75,-.75,.25,2.25]: <xc,yc> = 6.5, |xc|^2 = 5, |yc|^2 = 8.75
    assert linear_cka(x, y) == pytest.approx(6.5**2 / (5 * 8.75), abs=1e-12)
    assert linear_cka(x, -y) == pytest.approx(6.5**2 / (5 * 8.75), abs=1e-12)


def test_unbiased_hsic_matches_numpy_definition():
    x, y = rand(9, 4, seed=7), rand(9, 3, seed=8)
    K, L = gram_linear(x), gram_linear(y)
    ref = np_hsic_unbiased(K.numpy(), L.numpy())
    assert hsic_unbiased(K, L) == pytest.approx(ref, rel=1e-10)
    with pytest.raises(LakdError, match="at least 4"):
        hsic_unbiased(K[:3, :3], L[:3, :3])


def test_minibatch_estimator_approaches_the_full_one():
    n, d = 4096, 48
    x = rand(n, d, seed=9)
    y = torch.tanh(x @ rand(d, 32, seed=10)) + 0.8 * rand(n, 32, seed=11)
    full = linear_cka(x, y)
    mb = minibatch_cka(x, y, batch_size=256)
    assert 0.1 < full < 0.9
    assert mb == pytest.approx(full, abs=0.05)
    # and it is exactly the ratio of summed unbiased HSICs
    sums = np.zeros(3)
    for i in range(0, n, 256):
        K, L = gram_linear(x[i:i + 256]), gram_linear(y[i:i + 256])
        sums += [hsic_unbiased(K, L), hsic_unbiased(K, K), hsic_unbiased(L, L)]
    assert mb == pytest.approx(sums[0] / math.sqrt(sums[1] * sums[2]), rel=1e-9)


def test_minibatch_accumulator_matrix():
    acc = MinibatchCKA()
    for s in range(4):
        a = rand(16, 2, 3, 3, seed=20 + s)
        acc.update([a, 2 * a, rand(16, 5, seed=40 + s)])
    m = acc.compute()
    assert m.shape == (3, 3) and acc.examples == 64 and acc.batches == 4
    assert torch.allclose(m, m.T)
    assert torch.allclose(torch.diagonal(m), torch.ones(3, dtype=torch.float64))
    assert m[0, 1] == pytest.approx(1.0)
    assert abs(m[0, 2]) < 0.3  # independent noise


# ----------------------------------------------------------------------------------------------------
# run_cka on tiny models
# ----------------------------------------------------------------------------------------------------


def _fake_loader(n=40, batch=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return [{"image": x[i:i + batch], "target": y[i:i + batch], "index": torch.arange(i, min(n, i + batch))}
            for i in range(0, n, batch)]


def _tiny(arch="resnet8", seed=0):
    torch.manual_seed(seed)
    return create_model(arch, 10).eval()


def test_run_cka_model_against_itself_and_another():
    t, s = _tiny("resnet14", 0), _tiny("resnet8", 1)
    loader = _fake_loader()
    res = run_cka(t, [("self", t), ("other", s)], loader, num_images=36)
    assert res.estimator == "full" and res.num_images == 36
    me, other = res.students
    assert me["diagonal"] == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)
    assert [me["matrix"][i][i] for i in range(3)] == pytest.approx([1.0] * 3, abs=1e-6)
    assert len(other["matrix"]) == 3 and len(other["matrix"][0]) == 3
    assert all(0.0 <= v <= 1.0 + 1e-9 for row in other["matrix"] for v in row)
    # the numbers are the CKA of the actual stage outputs on those 36 images
    x = torch.cat([b["image"] for b in loader])[:36]
    with torch.no_grad():
        ft = t(x, features=True)[1]["stages"]
        fs = s(x, features=True)[1]["stages"]
    assert other["matrix"][2][1] == pytest.approx(np_cka(ft[2].double().numpy(), fs[1].double().numpy()),
                                                  abs=1e-5)
    # block points of the student (LAKD's local modules), and the stage diagonal still there
    res_b = run_cka(t, [("other", s)], loader, num_images=36, student_points="blocks")
    assert res_b.students[0]["points"] == ["block1 (stage1)", "block2 (stage2)", "block3 (stage3)"]
    assert res_b.students[0]["diagonal"] == pytest.approx(other["diagonal"], abs=1e-9)


def test_run_cka_passes_and_minibatch():
    t, s = _tiny("resnet14", 0), _tiny("resnet8", 1)
    loader = _fake_loader(n=64)
    one = run_cka(t, [("s", s)], loader, num_images=64)
    # a tiny memory budget forces one pass over the data per representation: same numbers
    many = run_cka(t, [("s", s)], loader, num_images=64, max_memory_gb=1.0e-3)
    assert np.allclose(one.students[0]["matrix"], many.students[0]["matrix"], atol=1e-9)
    mb = run_cka(t, [("s", s)], loader, num_images=64, batch_size=32)
    assert mb.estimator == "minibatch" and mb.num_images == 64
    # (with 64 images of 1000s of features the biased full estimator is inflated, the unbiased one is not,
    # so the two are not compared here; one minibatch holding all images is the unbiased CKA of the set)
    one_mb = run_cka(t, [("s", s)], loader, num_images=64, batch_size=64)
    x = torch.cat([b["image"] for b in loader])
    with torch.no_grad():
        kt = gram_linear(t(x, features=True)[1]["stages"][0].double()).numpy()
        ks = gram_linear(s(x, features=True)[1]["stages"][2].double()).numpy()
    want = np_hsic_unbiased(kt, ks) / math.sqrt(np_hsic_unbiased(kt, kt) * np_hsic_unbiased(ks, ks))
    assert one_mb.students[0]["matrix"][0][2] == pytest.approx(want, abs=1e-5)
    # last minibatch of 2 images is left out (needs >= 4)
    mb2 = run_cka(t, [("s", s)], loader, num_images=62, batch_size=20)
    assert mb2.num_images == 60 and mb2.dropped_images == 2
    with pytest.raises(LakdError, match="block indices"):
        parse_points("1,99", s)
    with pytest.raises(LakdError, match="batch-size"):
        run_cka(t, [("s", s)], loader, num_images=64, batch_size=2)


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


def test_attention_maps_pick_the_true_class():
    from lakd.analysis.visualize import attention_maps, minmax
    from lakd.distillers.losses import class_activation_maps

    model = _tiny("resnet8", 3)
    x = rand(3, 3, 32, 32, seed=5).float()
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


def _not_blank(path, min_var=1e-3):
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert float(img[..., :3].var()) > min_var, f"{path} looks blank"


def test_pictures_are_written_and_not_blank(tmp_path):
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
        _not_blank(p)


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


def test_report_reproduces_the_run_numbers(tmp_path):
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
    assert f"| kd | {kd_cell} |" in text
    assert f"| lakd | **{la_cell}** |" in text  # best in its column, bold
    assert "| scratch | 69.06 (best 69.06) |" in text  # one seed: no std
    assert "| Teacher | 72.34 |" in text
    assert "resnet56 → resnet20" in text
    # EK table
    ek_kd, ek_kd_s = _mean_std([20.5, 21.25])
    assert f"| kd | {ek_kd:.2f} ± {ek_kd_s:.2f} |" in text
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
    _not_blank(tmp_path / "c.png")


def test_report_incomplete_only_cell_and_errors(tmp_path):
    runs = tmp_path / "r"
    _write_run(runs, "at0", "at", "resnet8", "resnet14", 0, [30.0, 41.0, 40.5], complete=False, epochs=10,
               dataset="digits")
    res = make_report([str(runs / "at0")], out=str(tmp_path / "o.md"))
    text = res["markdown"]
    assert "| at | 40.50 (best 41.00) †" in text and "INCOMPLETE" in text
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
    assert "| kd | 20.00 (best 20.00) |" in (tmp_path / "r.md").read_text()
    assert os.path.getsize(tmp_path / "r.csv") > 0 and os.path.getsize(tmp_path / "p.png") > 0
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "error:" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# CLI on real checkpoints and the digits data
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def digits_ckpts(tmp_path):
    data = pytest.importorskip("lakd.data")
    if not hasattr(data, "build_data"):
        pytest.skip("lakd.data.build_data not available yet")
    from lakd.config import load_config

    bundle = data.build_data(load_config(None, ["data.dataset=digits"]), "cpu")
    paths = {}
    for i, (name, arch) in enumerate([("teacher", "resnet14"), ("kd_run", "resnet8"), ("lakd_run", "resnet8")]):
        m = _tiny(arch, seed=i)
        p = tmp_path / f"{name}.pt"
        cfg = {"experiment": name, "method": name.split("_")[0], "sdm": {"splits": [1, 3]}}
        torch.save({"model": m.state_dict(), "arch": arch, "num_classes": 10, "dataset": "digits",
                    "mean": list(bundle.mean), "std": list(bundle.std), "config": cfg}, p)
        paths[name] = str(p)
    bare = tmp_path / "bare.pth"  # mdistiller style: weights only, no architecture recorded
    torch.save({"model": _tiny("resnet8", 1).state_dict()}, bare)
    paths["bare"] = str(bare)
    return paths


def test_cka_cli(tmp_path, digits_ckpts):
    out = tmp_path / "cka"
    rc = main(["analyze", "cka", "--teacher", digits_ckpts["teacher"], "--students", digits_ckpts["kd_run"],
               digits_ckpts["lakd_run"], digits_ckpts["teacher"], "--images", "48", "--out", str(out),
               "data.dataset=digits"])
    assert rc == 0
    data = json.loads((out / "cka.json").read_text())
    assert data["estimator"] == "full" and data["num_images"] == 48 and data["dataset"] == "digits"
    assert data["teacher"]["points"] == ["stage1", "stage2", "stage3"]
    labels = [s["label"] for s in data["students"]]
    assert labels == ["kd_run", "lakd_run", "teacher"]
    for s in data["students"]:
        assert len(s["matrix"]) == 3 and all(len(r) == 3 for r in s["matrix"])
        assert all(0 <= v <= 1 + 1e-9 for r in s["matrix"] for v in r)
        _not_blank(s["figure"])
    assert data["students"][2]["diagonal"] == pytest.approx([1, 1, 1], abs=1e-5)  # teacher vs itself
    _not_blank(out / "cka_stages.png")

    # minibatch estimator, block points, and a checkpoint without its architecture
    out2 = tmp_path / "cka2"
    rc = main(["analyze", "cka", "--teacher", digits_ckpts["teacher"], "--students", digits_ckpts["bare"],
               "--student-arch", "resnet8", "--images", "40", "--batch-size", "16", "--student-points", "blocks",
               "--out", str(out2)])
    assert rc == 0
    d2 = json.loads((out2 / "cka.json").read_text())
    assert d2["estimator"] == "minibatch" and d2["num_images"] == 40 and d2["students"][0]["label"] == "bare"
    assert len(d2["students"][0]["points"]) == 3  # resnet8 has 3 blocks
    # the same student weights as kd_run (seed 1): the full estimator gave close numbers
    assert np.allclose(d2["students"][0]["diagonal"], data["students"][0]["diagonal"], atol=0.3)
    # LAKD's local modules (sdm.splits of the run config) as the student's points; KD's run has none
    out3 = tmp_path / "cka3"
    assert main(["analyze", "cka", "--teacher", digits_ckpts["teacher"], "--students", digits_ckpts["lakd_run"],
                 digits_ckpts["kd_run"], "--images", "12", "--student-points", "local", "--out", str(out3)]) == 0
    d3 = json.loads((out3 / "cka.json").read_text())
    assert d3["students"][0]["points"] == ["block1 (stage1)", "block3 (stage3)"]
    assert d3["students"][1]["points"] == ["stage1", "stage2", "stage3"]
    # no architecture recorded and none given: a one-line error
    assert main(["analyze", "cka", "--teacher", digits_ckpts["teacher"], "--students", digits_ckpts["bare"],
                 "--images", "8", "--out", str(tmp_path / "x")]) == 2


def test_visualize_cli(tmp_path, digits_ckpts, capsys):
    out = tmp_path / "maps.png"
    rc = main(["visualize", "--checkpoints", digits_ckpts["teacher"], digits_ckpts["lakd_run"], "--images", "3",
               "--stage", "2", "--out", str(out)])
    assert rc == 0
    _not_blank(out)
    img = imread(out)
    assert img.shape[0] > img.shape[1] * 0.5  # 3 rows of 5 columns plus titles
    assert "wrote" in capsys.readouterr().out
    assert main(["visualize", "--checkpoints", digits_ckpts["teacher"], "--stage", "7",
                 "--out", str(tmp_path / "bad.png")]) == 2
    assert main(["visualize", "--checkpoints", digits_ckpts["teacher"], "--indices", "0,99999",
                 "--out", str(tmp_path / "bad.png")]) == 2


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
