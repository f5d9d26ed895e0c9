"""Per-sample views in the data layer (lakd/data/views.py): the batched RandAugment gives PIL's pixels, SSKD's
rotated copies and MLKD's strong view are made per sample with crops of their own on both loader paths, the
batch images stay what they are without views, the views are deterministic given the seed and the same with and
without DataLoader workers, a run killed mid-epoch and resumed ends bitwise where the uninterrupted one does, and
two-step ``lakd train`` runs of SSKD and MLKD with their views."""
from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lakd.config import DEFAULTS, load_config
from lakd.data import build_data, denormalize
from lakd.data.views import OPS, RandAugment, parse_views
from lakd.distillers.mlkd import MLKD, STRONG_VIEW
from lakd.distillers.sskd import ROTATED_COPIES, SSKD
from lakd.errors import LakdError
from lakd.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def noise_cifar(tmp_path_factory):
    """A CIFAR-10 folder of 20 random-noise training images (5 files x 4) and 4 test images: every crop and
    flip of a noise image is told apart by its pixels."""
    root = tmp_path_factory.mktemp("noise_cifar")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    train = []
    for i in range(1, 6):
        data = rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)
        train.append(data)
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": data, "labels": [(4 * i + k) % 10 for k in range(4)]}, f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": rng.integers(0, 256, size=(4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}, f)
    return root, torch.from_numpy(np.concatenate(train).reshape(-1, 3, 32, 32))


def _cfg(root, fast=True, batch=8, seed=0, workers=0, **data):
    cfg = copy.deepcopy(DEFAULTS)
    cfg["seed"] = seed
    cfg["solver"]["batch_size"] = batch
    cfg["train"]["eval_batch_size"] = 4
    cfg["data"].update(root=str(root), fast=fast, num_workers=workers, persistent_workers=False, **data)
    return cfg


def _epoch(bundle, epoch=0):
    bundle.train.set_epoch(epoch)
    return list(bundle.train)


def _pixels(x: torch.Tensor, bundle) -> torch.Tensor:
    return torch.round(denormalize(x, bundle.mean, bundle.std) * 255).to(torch.uint8)


def _which_crop(img: torch.Tensor, raw: torch.Tensor, pad: int = 4):
    """``(dy, dx, flip)``: the crop of the zero-padded ``raw`` (then flipped or not) that ``img`` is, or None."""
    padded = F.pad(raw, (pad, pad, pad, pad))
    h, w = raw.shape[-2:]
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy:dy + h, dx:dx + w]
            for flip in (False, True):
                if torch.equal(crop.flip(-1) if flip else crop, img):
                    return dy, dx, flip
    return None


# ----- RandAugment: the batched operations give PIL's pixels ------------------------------------------------------
@pytest.mark.parametrize("shape", [(32, 32), (20, 28)])
def test_batched_randaugment_equals_pil_pixel_for_pixel(shape):
    """Every operation of the authors' list (and the Cutout) on noise and on smooth images, two rounds: the
    tensor implementation (the in-memory loader's, on the device) equals PIL's operations (the workers') exactly."""
    h, w = shape
    n = 160
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)
    smooth = F.interpolate(torch.rand(n // 2, 3, 4, 4, generator=g) * 255, size=(h, w), mode="bilinear")
    x[: n // 2] = smooth.round().to(torch.uint8)  # few grey levels: equalize/autocontrast edge cases
    x[0] = 77  # a flat image: autocontrast and equalize leave it
    ra = RandAugment(2, 0.5)
    params = ra.sample(n, torch.Generator().manual_seed(1), h, w)
    assert set(params["op"].flatten().tolist()) == set(range(len(OPS)))  # every operation drawn
    out = ra.apply(x, params)
    for i in range(n):
        img = Image.fromarray(x[i].permute(1, 2, 0).numpy())
        args = (params["op"][i].tolist(), params["mag"][i].tolist(), params["cut"][i].tolist())
        ref = torch.from_numpy(np.asarray(ra.pil(img, *args)).copy()).permute(2, 0, 1)
        assert torch.equal(out[i], ref.float()), (i, [OPS[k][0] for k in params["op"][i].tolist()])
    assert out.dtype == torch.float32 and not torch.equal(out, x.float())


def test_randaugment_draws_as_the_authors_code():
    """Magnitudes uniform in each operation's range (batched and per-sample draws); the Cutout side up to
    ``cutout * width`` and its corner as the authors' ``CutoutAbs``: ``np.random.uniform(w)`` is numpy's
    ``uniform(low=w, high=1)``, in (1, w]."""
    ra = RandAugment(2, 0.5)
    p = ra.sample(4000, torch.Generator().manual_seed(0), 32, 32)
    g = torch.Generator().manual_seed(0)
    one = [ra.draw(g) for _ in range(2000)]
    assert all(len(o) == 2 and len(m) == 2 and len(c) == 3 for o, m, c in one)
    ops = torch.tensor([o for o, _, _ in one])
    mags = torch.tensor([m for _, m, _ in one], dtype=torch.float64)
    for k, (name, low, high) in enumerate(OPS):
        for m in (p["mag"][p["op"] == k], mags[ops == k]):
            assert m.min() >= low and m.max() <= high and m.max() - m.min() > 0.7 * (high - low), name
    u = np.random.RandomState(0).uniform(32, size=5000)  # the authors' call (numpy's legacy uniform)
    assert 1 < u.min() < 1.1 and 31.9 < u.max() <= 32
    box = p["box"]
    drawn = box[:, 1] >= box[:, 0]
    side = (box[drawn, 3] - box[drawn, 2] + 1).float()
    assert side.max() <= 17 and side.min() >= 1  # at most 0.5 * 32 (+1: PIL's rectangles include their end)
    assert (box[drawn, 2] >= 0).all() and (box[drawn, 3] <= 31).all()


def test_view_specs_are_checked_in_one_line():
    assert parse_views(None) == () and [v.name for v in parse_views(ROTATED_COPIES)] == ["rot90", "rot180", "rot270"]
    (strong,) = parse_views(STRONG_VIEW)
    assert (strong.crop, strong.flip, strong.rotate, strong.randaugment, strong.cutout) == ("own", "own", 0, 2, 0.5)
    for bad, match in [({"v": {"rotate": 4}}, "rotate counts quarter turns"), ({"v": {"crop": "mine"}}, "'own' or"),
                       ({"v": {"zoom": 2}}, r"unknown key\(s\) zoom"), ({"v": {"cutout": 2}}, r"in \[0, 1\]"),
                       ({"v": {"randaugment": -1}}, "number of operations"), ({"1x": {}}, "identifier"),
                       (["strong"], "must be a dict")]:
        with pytest.raises(LakdError, match=match) as info:
            parse_views(bad)
        assert "\n" not in str(info.value)


# ----- SSKD's rotated copies and MLKD's strong view, per sample ---------------------------------------------------
@pytest.mark.parametrize("fast", [True, False])
def test_sskd_copies_are_rotations_of_their_own_crops_with_the_images_flip(noise_cifar, fast):
    root, raw = noise_cifar
    bundle = build_data(_cfg(root, fast), "cpu", views=SSKD.views({}))
    assert bundle.views == ("rot90", "rot180", "rot270")
    plain = build_data(_cfg(root, fast), "cpu")
    differ = 0
    for with_views, without in zip(_epoch(bundle), _epoch(plain)):
        # the batch images are those of a run without views (no draw of theirs changes)
        assert torch.equal(with_views["image"], without["image"]) and "views" not in without
        for i, index in enumerate(with_views["index"].tolist()):
            main = _which_crop(_pixels(with_views["image"][i], bundle), raw[index])
            assert main is not None
            crops = {main[:2]}
            for k, name in enumerate(ROTATED_COPIES, 1):
                copy_k = _pixels(with_views["views"][name][i], bundle)
                found = _which_crop(torch.rot90(copy_k, -k, (1, 2)), raw[index])
                assert found is not None, (index, name)  # a rotation of a crop of this very image
                assert found[2] == main[2]  # the normal image's flip (the authors flip once, then rotate)
                crops.add(found[:2])
            differ += len(crops) > 1
    assert differ >= 15  # own crops: of 20 images, nearly all have copies cropped apart (1 in 81 per copy agrees)


@pytest.mark.parametrize("fast", [True, False])
def test_mlkd_strong_view_has_its_own_crop_and_flip_then_randaugment(noise_cifar, fast, monkeypatch):
    root, raw = noise_cifar
    views = MLKD.views({"mlkd": {"views": 2}})
    assert views == STRONG_VIEW and MLKD.views({}) == {} and SSKD.views({"sskd": {"views": "batch"}}) == {}
    real = _epoch(build_data(_cfg(root, fast), "cpu", views=views))
    # without RandAugment's operations the strong view is a crop and flip of its own
    monkeypatch.setattr(RandAugment, "apply", lambda self, x, params: x.float())
    monkeypatch.setattr(RandAugment, "pil", lambda self, img, *params: img)
    bundle = build_data(_cfg(root, fast), "cpu", views=views)
    own = 0
    for b, r in zip(_epoch(bundle), real):
        assert torch.equal(b["image"], r["image"])
        for i, index in enumerate(b["index"].tolist()):
            weak = _which_crop(_pixels(b["image"][i], bundle), raw[index])
            strong = _which_crop(_pixels(b["views"]["strong"][i], bundle), raw[index])
            assert weak is not None and strong is not None
            own += weak != strong
            assert _which_crop(_pixels(r["views"]["strong"][i], bundle), raw[index]) is None  # RandAugment'ed
    assert own >= 15


def test_views_are_deterministic_per_seed_and_epoch(noise_cifar):
    root, _ = noise_cifar
    views = {**ROTATED_COPIES, **STRONG_VIEW}
    for fast in (True, False):
        a = _epoch(build_data(_cfg(root, fast, seed=3), "cpu", views=views))
        b = _epoch(build_data(_cfg(root, fast, seed=3), "cpu", views=views))
        c = _epoch(build_data(_cfg(root, fast, seed=4), "cpu", views=views))
        d = _epoch(build_data(_cfg(root, fast, seed=3), "cpu", views=views), epoch=1)
        for x, y, z, e in zip(a, b, c, d):
            for name in views:
                assert torch.equal(x["views"][name], y["views"][name]), (fast, name)
                assert not torch.equal(x["views"][name], z["views"][name]), (fast, name)
                assert not torch.equal(x["views"][name], e["views"][name]), (fast, name)


def test_dataloader_workers_give_the_same_views_as_the_main_process(noise_cifar):
    root, _ = noise_cifar
    views = {**ROTATED_COPIES, **STRONG_VIEW}
    one = _epoch(build_data(_cfg(root, False, workers=0), "cpu", views=views), epoch=2)
    two = _epoch(build_data(_cfg(root, False, workers=2), "cpu", views=views), epoch=2)
    assert len(one) == len(two) == 3
    for x, y in zip(one, two):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["index"], y["index"])
        assert x["views"].keys() == y["views"].keys() == views.keys()
        for name in views:
            assert torch.equal(x["views"][name], y["views"][name]), name


def test_ranks_views_concatenate_to_the_single_process_views(noise_cifar):
    """Under torchrun each rank takes its slice of every global batch: its views too (both paths)."""
    root, _ = noise_cifar
    views = {**ROTATED_COPIES, **STRONG_VIEW}
    for fast in (True, False):
        single = _epoch(build_data(_cfg(root, fast), "cpu", views=views))
        ranks = [_epoch(build_data(_cfg(root, fast), "cpu", r, 2, views=views)) for r in (0, 1)]
        for j, (a, b) in enumerate(zip(*ranks)):
            for name in views:
                assert torch.equal(torch.cat([a["views"][name], b["views"][name]]), single[j]["views"][name])


def test_image_folders_make_views_on_both_paths(tmp_path):
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for k in range(3):
                noise = np.random.default_rng(k + 7 * (c == "b")).integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(noise).save(tmp_path / split / c / f"{k}.png")
    views = {**ROTATED_COPIES, **STRONG_VIEW}
    for fast in (True, False):
        cfg = _cfg(tmp_path, fast, batch=4, dataset="imagefolder", image_size=16)
        b = _epoch(build_data(cfg, "cpu", views=views))
        again = _epoch(build_data(cfg, "cpu", views=views))
        assert [x["views"].keys() == views.keys() for x in b] == [True, True]
        for x, y in zip(b, again):
            for name in views:
                assert x["views"][name].shape == x["image"].shape == (x["image"].shape[0], 3, 16, 16)
                assert torch.equal(x["views"][name], y["views"][name])
            # own crops: the copies are not the rotated batch image
            assert not torch.equal(x["views"]["rot180"], torch.rot90(x["image"], 2, (2, 3)))


def test_odd_rotations_need_square_images_and_randaugment_rgb():
    from lakd.data.views import check_views

    with pytest.raises(LakdError, match="needs square images"):
        check_views(parse_views(ROTATED_COPIES), 3, 24, 32)
    check_views(parse_views({"r": {"rotate": 2}}), 3, 24, 32)
    with pytest.raises(LakdError, match="RGB images"):
        check_views(parse_views(STRONG_VIEW), 1, 32, 32)


# ----- through the engine -------------------------------------------------------------------------------------------
def _tiny(tmp_path, method, extra=()):
    teacher = tmp_path / "t.pt"
    if not teacher.exists():
        torch.manual_seed(0)
        torch.save({"model": create_model("resnet8", 10).state_dict(), "arch": "resnet8", "num_classes": 10},
                   teacher)
    return ["data.dataset=digits", "data.train_subset=48", "data.test_subset=16", "train.eval_batch_size=16",
            "solver.batch_size=16", "solver.lr=0.05", "model.name=resnet8", "train.progress=false",
            "train.threads=1", "data.num_workers=0", f"method={method}", "teacher.name=resnet8",
            f"teacher.checkpoint={teacher}", "sskd.pretrain_epochs=1", "mlkd.views=2", f"output_dir={tmp_path}",
            *extra]


def test_build_asks_the_method_for_its_views_and_refuses_data_without_them(tmp_path):
    import lakd

    cfg = load_config(None, _tiny(tmp_path, "mlkd"))
    parts = lakd.build(cfg, device="cpu", warn=False)
    assert parts.data.views == ("strong",)
    assert load_config(None, _tiny(tmp_path, "kd")) and lakd.build(
        load_config(None, _tiny(tmp_path, "kd")), device="cpu", warn=False).data.views == ()
    plain = build_data(cfg, "cpu")
    with pytest.raises(LakdError, match="per-sample views strong that the data given to build does not make"):
        lakd.build(cfg, device="cpu", data=plain, warn=False)


@pytest.mark.parametrize("method,fast", [("sskd", "true"), ("mlkd", "false")])
def test_killed_mid_epoch_and_resumed_ends_bitwise_as_the_uninterrupted_run(method, fast, tmp_path):
    """A run stopped in the middle of its second epoch (its views partly drawn and used) and resumed from the
    first epoch's checkpoint ends where the uninterrupted run does, bit for bit."""
    from lakd.engine.checkpoint import atomic_save
    from lakd.engine.step import training_step
    from lakd.engine.trainer import Trainer

    over = _tiny(tmp_path, method, ["solver.epochs=2", "solver.max_steps_per_epoch=3", f"data.fast={fast}"])
    full = Trainer(load_config(None, [*over, "experiment=full"]), quiet=True)
    full.fit()
    part = Trainer(load_config(None, [*over, "experiment=part"]), quiet=True)
    part.distiller.prepare(part.data.train, part.device)
    part.train_epoch(0)
    atomic_save(part._checkpoint(1), str(tmp_path / "part" / "last.pt"))
    part.data.train.set_epoch(1)
    part.distiller.train()
    batch = next(iter(part.data.train))  # one step of epoch 2, then the process "dies"
    assert set(batch["views"]) == set(SSKD.views({}) if method == "sskd" else STRONG_VIEW)
    training_step(part.distiller, part.optimizer, part.scaler, batch, part.amp_dtype)
    part.close()
    resumed = Trainer(load_config(None, [*over, "experiment=part", f"resume={tmp_path}/part"]), quiet=True)
    assert resumed.start_epoch == 1
    resumed.fit()
    a, b = full.distiller.state_dict(), resumed.distiller.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("fast", ["true", "false"])
def test_two_step_train_of_sskd_and_mlkd_with_views(tmp_path, capsys, fast):
    from lakd.cli.main import main

    for method in ("sskd", "mlkd"):
        args = _tiny(tmp_path, method, ["solver.epochs=1", "solver.max_steps_per_epoch=2", f"data.fast={fast}",
                                        f"experiment=views_{method}"])
        assert main(["train", *args]) == 0, capsys.readouterr().err[-2000:]
        assert (tmp_path / f"views_{method}" / "summary.json").exists()
    capsys.readouterr()
