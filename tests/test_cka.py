"""Linear CKA: the full and minibatch estimators against numpy references from the definitions, ``run_cka`` on
tiny models, and the ``lakd analyze cka`` command on digits checkpoints."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

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
from lakd.cli.main import main
from lakd.errors import LakdError

pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_run_cka_model_against_itself_and_another(tiny_model):
    t, s = tiny_model("resnet14", 0), tiny_model("resnet8", 1)
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


def test_run_cka_passes_and_minibatch(tiny_model):
    t, s = tiny_model("resnet14", 0), tiny_model("resnet8", 1)
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


def test_cka_cli(tmp_path, digits_ckpts, not_blank):
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
        not_blank(s["figure"])
    assert data["students"][2]["diagonal"] == pytest.approx([1, 1, 1], abs=1e-5)  # teacher vs itself
    not_blank(out / "cka_stages.png")

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


def test_analyze_and_visualize_check_out_first_and_use_the_recorded_data_root(tmp_path, digits_ckpts, capsys):
    taken = tmp_path / "a_file"
    taken.write_text("keep me")
    assert main(["analyze", "cka", "--teacher", digits_ckpts["teacher"], "--students", digits_ckpts["kd_run"],
                 "--images", "8", "--out", str(taken)]) == 2
    err = capsys.readouterr().err
    assert "existing file" in err and "Traceback" not in err and taken.read_text() == "keep me"
    (tmp_path / "dir.png").mkdir()
    assert main(["visualize", "--checkpoints", digits_ckpts["teacher"], "--out", str(tmp_path / "dir.png")]) == 2
    assert "is a folder" in capsys.readouterr().err
    # a checkpoint trained on CIFAR-10 from another folder: analyze and visualize look there, as eval does
    sd = torch.load(digits_ckpts["kd_run"], weights_only=True)
    sd.update(dataset="cifar10", config={"data": {"dataset": "cifar10", "root": str(tmp_path / "their_data")}})
    ck = tmp_path / "c10.pt"
    torch.save(sd, ck)
    for argv in (["analyze", "cka", "--teacher", str(ck), "--students", str(ck), "--out", str(tmp_path / "o")],
                 ["visualize", "--checkpoints", str(ck), "--out", str(tmp_path / "v.png")]):
        assert main(argv) == 2
        assert str(tmp_path / "their_data") in capsys.readouterr().err
