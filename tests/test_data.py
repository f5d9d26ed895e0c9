"""The data layer: loaders of the real CIFAR-10 copy, fake CIFAR-10/100 pickles, an ImageFolder tree, digits;
fast-path augmentation against hand computations; epoch determinism; DDP slicing; error messages."""
from __future__ import annotations

import copy
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lakd.config import DEFAULTS
from lakd.data import build_data, dataset_info, denormalize
from lakd.data.sampling import subset_indices
from lakd.data.transforms import CropFlip, ResizedCropFlip
from lakd.errors import LakdError

# this machine's copy of the data (not part of the product): $LAKD_SHARED/data, set by .ci/run when present
SHARED = Path(os.environ.get("LAKD_SHARED") or "LAKD_SHARED-is-not-set") / "data"
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def data_cfg(root=None, batch=8, seed=0, eval_batch=5, max_steps=0, **data):
    cfg = copy.deepcopy(DEFAULTS)
    cfg["seed"] = seed
    cfg["solver"]["batch_size"] = batch
    cfg["solver"]["max_steps_per_epoch"] = max_steps
    cfg["train"]["eval_batch_size"] = eval_batch
    cfg["data"]["num_workers"] = 0
    if root is not None:
        cfg["data"]["root"] = str(root)
    cfg["data"].update(data)
    return cfg


def batches(loader, epoch=None):
    if epoch is not None:
        loader.set_epoch(epoch)
    return list(loader)


def raw_from(batch, mean, std):
    """Recover the uint8 pixels of a normalised batch."""
    return torch.round(denormalize(batch["image"], mean, std) * 255).to(torch.uint8)


# --------------------------------------------------------------------------- fake datasets

def _rand_images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory):
    """Tiny cifar-10-batches-py (str keys, 5 x 6 train, 10 test) and cifar-100-python (bytes keys)."""
    root = tmp_path_factory.mktemp("cifar")
    c10 = root / "cifar-10-batches-py"
    c10.mkdir()
    labels_all, data_all = [], []
    for i in range(1, 6):
        data = _rand_images(6, i)
        labels = [(6 * (i - 1) + k) % 10 for k in range(6)]
        data_all.append(data)
        labels_all += labels
        with open(c10 / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": data, "labels": labels, "batch_label": f"b{i}"}, f, protocol=2)
    test = _rand_images(10, 99)
    with open(c10 / "test_batch", "wb") as f:
        pickle.dump({"data": test, "labels": list(range(10))}, f, protocol=2)
    with open(c10 / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{k}" for k in range(10)]}, f)

    c100 = root / "cifar-100-python"
    c100.mkdir()
    tr100 = _rand_images(12, 7)
    with open(c100 / "train", "wb") as f:
        pickle.dump({b"data": tr100, b"fine_labels": [k * 8 for k in range(12)], b"coarse_labels": [0] * 12}, f)
    with open(c100 / "test", "wb") as f:
        pickle.dump({b"data": _rand_images(4, 8), b"fine_labels": [99, 0, 5, 50]}, f)
    with open(c100 / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"n{k}".encode() for k in range(100)]}, f)
    return {"root": root, "train": np.concatenate(data_all).reshape(-1, 3, 32, 32), "labels": labels_all,
            "test": test.reshape(-1, 3, 32, 32), "c100_train": tr100.reshape(-1, 3, 32, 32)}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("folder")
    colours = {"ant": (255, 0, 0), "bee": (0, 255, 0), "cat": (0, 0, 255)}
    for split, count in (("train", 4), ("val", 2)):
        for c, rgb in colours.items():
            (root / split / c).mkdir(parents=True)
            for k in range(count):
                size = (20 + 4 * k, 24)  # mixed sizes: the transforms make them uniform
                Image.new("RGB", size, rgb).save(root / split / c / f"{k}.png")
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
    return root


# --------------------------------------------------------------------------- real CIFAR-10

@pytest.fixture(scope="module")
def real_cifar():
    if not (SHARED / "cifar-10-batches-py").is_dir():
        pytest.skip(f"no CIFAR-10 copy at {SHARED}/cifar-10-batches-py (set LAKD_SHARED to the folder holding data/)")
    return build_data(data_cfg(SHARED, batch=128, eval_batch=1000, augment=False), "cpu")


def test_real_cifar10_shapes_counts_and_normalisation(real_cifar):
    b = real_cifar
    assert (b.num_classes, b.num_train, b.num_test, b.image_size) == (10, 50000, 10000, 32)
    assert b.class_names[:3] == ["airplane", "automobile", "bird"] and b.fast
    assert b.mean == CIFAR10_MEAN and b.std == CIFAR10_STD
    assert len(b.train) == 391 and len(b.test) == 10  # the last train batch (80 images) is kept
    assert torch.equal(b.train.targets.bincount(), torch.full((10,), 5000))
    assert torch.equal(b.test.targets.bincount(), torch.full((10,), 1000))
    # the shared copy's training statistics (README: mean 0.4913, 0.4821, 0.4465), exact integer sums
    raw_sum = b.train.images.sum(dim=(0, 2, 3), dtype=torch.int64).double()
    assert torch.allclose(raw_sum / (50000 * 1024 * 255), torch.tensor([0.4913, 0.4821, 0.4465],
                                                                        dtype=torch.float64), atol=2e-4)
    # the test loader yields (x/255 - mean)/std of the whole test set, in order
    s1 = s2 = torch.zeros(3, dtype=torch.float64)
    targets, idx = [], []
    for batch in b.test:
        assert batch["image"].shape[1:] == (3, 32, 32) and batch["image"].dtype == torch.float32
        x = batch["image"].double()
        s1, s2 = s1 + x.sum((0, 2, 3)), s2 + (x * x).sum((0, 2, 3))
        targets.append(batch["target"])
        idx.append(batch["index"])
    assert torch.equal(torch.cat(idx), torch.arange(10000))
    assert torch.equal(torch.cat(targets), b.test.targets)
    n = 10000 * 1024
    mean, std = s1 / n, (s2 / n - (s1 / n) ** 2).sqrt()
    t = b.test.images.transpose(0, 1).reshape(3, -1).double() / 255
    m, s = torch.tensor(CIFAR10_MEAN, dtype=torch.float64), torch.tensor(CIFAR10_STD, dtype=torch.float64)
    assert torch.allclose(mean, (t.mean(1) - m) / s, atol=1e-5)
    assert torch.allclose(std, t.std(1, unbiased=False) / s, atol=1e-5)
    assert (mean.abs() < 0.05).all() and ((std > 0.9) & (std < 1.1)).all()


def test_real_cifar10_train_batches_and_dataloader_path_agree(real_cifar):
    b = real_cifar
    first = next(iter(b.train))
    assert first["image"].shape == (128, 3, 32, 32) and first["target"].dtype == torch.int64
    # augment is off: the batch is exactly the normalised originals of the indexed images
    assert torch.equal(raw_from(first, b.mean, b.std), b.train.images[first["index"]])
    assert torch.equal(first["target"], b.train.targets[first["index"]])
    # the DataLoader path walks the same (seed, epoch) order
    slow = build_data(data_cfg(SHARED, batch=128, augment=False, fast=False, train_subset=0), "cpu")
    assert not slow.fast and len(slow.train) == 391
    sb = next(iter(slow.train))
    assert torch.equal(sb["index"], first["index"])
    assert torch.allclose(sb["image"], first["image"], atol=1e-6)


# --------------------------------------------------------------------------- fake CIFAR files

def test_fake_cifar10_and_cifar100_load_exact_pixels(fake_cifar):
    root = fake_cifar["root"]
    b = build_data(data_cfg(root, batch=30, eval_batch=4, augment=False), "cpu")
    assert (b.num_train, b.num_test, b.num_classes) == (30, 10, 10)
    assert b.class_names == [f"c{k}" for k in range(10)]
    (batch,) = batches(b.train, 0)
    order = batch["index"].argsort()
    assert torch.equal(batch["index"][order], torch.arange(30))
    assert torch.equal(raw_from(batch, b.mean, b.std)[order], torch.from_numpy(fake_cifar["train"]))
    assert batch["target"][order].tolist() == fake_cifar["labels"]
    test = batches(b.test)
    assert [len(t["target"]) for t in test] == [4, 4, 2]
    assert torch.equal(torch.cat([raw_from(t, b.mean, b.std) for t in test]), torch.from_numpy(fake_cifar["test"]))

    b100 = build_data(data_cfg(root, dataset="cifar100", batch=12, augment=False), "cpu")
    assert (b100.num_train, b100.num_test, b100.num_classes) == (12, 4, 100)
    assert b100.class_names[:2] == ["n0", "n1"] and b100.mean == (0.5071, 0.4865, 0.4409)
    (batch,) = batches(b100.train, 0)
    order = batch["index"].argsort()
    assert batch["target"][order].tolist() == [k * 8 for k in range(12)]
    assert torch.equal(raw_from(batch, b100.mean, b100.std)[order], torch.from_numpy(fake_cifar["c100_train"]))
    assert [t.tolist() for t in (next(iter(b100.test))["target"],)] == [[99, 0, 5, 50]]


def test_mean_std_override_and_channels_last(fake_cifar):
    cfg = data_cfg(fake_cifar["root"], augment=False, mean=[0.5, 0.5, 0.5], std=[0.25, 0.5, 1.0])
    cfg["train"]["channels_last"] = True
    b = build_data(cfg, "cpu")
    assert b.mean == (0.5, 0.5, 0.5) and b.std == (0.25, 0.5, 1.0)
    batch = next(iter(b.test))
    assert batch["image"].is_contiguous(memory_format=torch.channels_last)
    x = torch.from_numpy(fake_cifar["test"][:5]).double() / 255
    want = (x - 0.5) / torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64).view(1, 3, 1, 1)
    assert torch.allclose(batch["image"].double(), want, atol=1e-6)
    with pytest.raises(LakdError, match="data.std"):
        build_data(data_cfg(fake_cifar["root"], std=[0.2, 0.2]), "cpu")


def test_image_size_and_md5_check(fake_cifar):
    b = build_data(data_cfg(fake_cifar["root"], image_size=40, batch=8), "cpu")
    assert b.image_size == 40 and next(iter(b.train))["image"].shape == (8, 3, 40, 40)
    assert next(iter(b.test))["image"].shape == (5, 3, 40, 40)
    with pytest.raises(LakdError, match="does not match the official md5.*data.verify_md5=false"):
        build_data(data_cfg(fake_cifar["root"], verify_md5=True), "cpu")


def test_corrupt_and_malicious_pickles_are_refused(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(b"\x80\x02}q\x00(X\x04\x00")  # truncated
    (folder / "test").write_bytes(b"")
    with pytest.raises(LakdError, match="not a readable CIFAR pickle"):
        build_data(data_cfg(tmp_path, dataset="cifar100"), "cpu")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(folder / "train", "wb") as f:
        pickle.dump({"data": Evil(), "fine_labels": []}, f)
    with pytest.raises(LakdError, match="refusing to load"):
        build_data(data_cfg(tmp_path, dataset="cifar100"), "cpu")


def test_missing_dataset_and_bad_names(tmp_path):
    with pytest.raises(LakdError) as e:
        build_data(data_cfg(tmp_path / "nowhere"), "cpu")
    msg = str(e.value)
    want = os.path.join(str(tmp_path / "nowhere"), "cifar-10-batches-py")
    assert want in msg and "data.root=" in msg and "data.download=true" in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in msg and "\n" not in msg
    with pytest.raises(LakdError, match="cifar10, cifar100, digits, imagenet, imagefolder"):
        build_data(data_cfg(tmp_path, dataset="svhn"), "cpu")
    with pytest.raises(LakdError, match="did you mean: cifar100"):
        dataset_info("cifar1000")
    with pytest.raises(LakdError, match="data.fast"):
        build_data(data_cfg(tmp_path, fast="sometimes"), "cpu")


def test_download_fetches_and_unpacks_the_archive_through_torchvision(fake_cifar, tmp_path, monkeypatch):
    """data.download=true: torchvision's download_url (replaced here by a fake that writes a tiny archive in the
    official layout) then extraction; the second build finds the folder and downloads nothing."""
    import tarfile

    from torchvision.datasets import utils as tv_utils

    calls = []

    def fake_download_url(url, root, filename=None, md5=None, **kw):
        calls.append((url, filename, md5))
        with tarfile.open(os.path.join(root, filename), "w:gz") as tar:
            tar.add(fake_cifar["root"] / "cifar-10-batches-py", arcname="cifar-10-batches-py")

    monkeypatch.setattr(tv_utils, "download_url", fake_download_url)
    root = tmp_path / "fresh" / "data"  # does not exist yet
    b = build_data(data_cfg(root, download=True, augment=False), "cpu")
    assert calls == [("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz",
                      "c58f30108f718f92721af3b95e74349a")]
    assert (b.num_train, b.num_test, b.class_names[0]) == (30, 10, "c0")
    assert torch.equal(b.train.images.cpu(), torch.from_numpy(fake_cifar["train"]))
    build_data(data_cfg(root, download=True), "cpu")
    assert len(calls) == 1

    def offline(url, root, filename=None, md5=None, **kw):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(tv_utils, "download_url", offline)
    with pytest.raises(LakdError) as e:
        build_data(data_cfg(tmp_path / "other", download=True, dataset="cifar100"), "cpu")
    assert "Network is unreachable" in str(e.value) and "cifar-100-python.tar.gz" in str(e.value)


def test_default_data_root_is_a_user_folder_or_lakd_data(monkeypatch):
    from lakd.config import load_config

    monkeypatch.delenv("LAKD_DATA", raising=False)
    assert load_config(None, [])["data"]["root"] == "data"
    monkeypatch.setenv("LAKD_DATA", "/somewhere/datasets")
    assert load_config(None, [])["data"]["root"] == "/somewhere/datasets"
    assert load_config(None, ["data.root=/x"])["data"]["root"] == "/x"


def test_batch_not_divisible_by_world_size(fake_cifar):
    with pytest.raises(LakdError, match="not divisible by the 3 processes"):
        build_data(data_cfg(fake_cifar["root"], batch=8), "cpu", rank=0, world_size=3)
    with pytest.raises(LakdError, match="rank 2"):
        build_data(data_cfg(fake_cifar["root"], batch=8), "cpu", rank=2, world_size=2)


# --------------------------------------------------------------------------- fast-path augmentation

def test_crop_flip_hand_example():
    x = torch.arange(1, 10, dtype=torch.uint8).view(1, 1, 3, 3)  # [[1,2,3],[4,5,6],[7,8,9]]
    aug = CropFlip(pad=1)
    out = aug.apply(x, {"dy": torch.tensor([0]), "dx": torch.tensor([2]), "flip": torch.tensor([False])})
    assert out[0, 0].tolist() == [[0, 0, 0], [2, 3, 0], [5, 6, 0]]
    out = aug.apply(x, {"dy": torch.tensor([2]), "dx": torch.tensor([0]), "flip": torch.tensor([True])})
    # window rows 2..4, cols 0..2 of the padded image = [[0,4,5],[0,7,8],[0,0,0]], then flipped
    assert out[0, 0].tolist() == [[5, 4, 0], [8, 7, 0], [0, 0, 0]]
    out = aug.apply(x, {"dy": torch.tensor([1]), "dx": torch.tensor([1]), "flip": torch.tensor([False])})
    assert torch.equal(out, x)


def test_crop_flip_matches_reference_windows():
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (16, 3, 32, 32), generator=g, dtype=torch.uint8)
    aug = CropFlip(pad=4)
    p = aug.sample(16, g, 32, 32)
    assert p["dy"].min() >= 0 and p["dy"].max() <= 8 and 0 < int(p["flip"].sum()) < 16
    out = aug.apply(x, p)
    padded = F.pad(x, (4, 4, 4, 4))
    for i in range(16):
        dy, dx = int(p["dy"][i]), int(p["dx"][i])
        want = padded[i, :, dy:dy + 32, dx:dx + 32]
        if p["flip"][i]:
            want = want.flip(-1)
        assert torch.equal(out[i], want)


def test_loader_batches_are_shifted_windows_of_padded_images(fake_cifar):
    b = build_data(data_cfg(fake_cifar["root"], batch=8), "cpu")
    loader = b.train
    loader.set_epoch(2)
    perm, params = loader.plan()
    orig = F.pad(torch.from_numpy(fake_cifar["train"]), (4, 4, 4, 4))
    for j, batch in enumerate(loader):
        assert torch.equal(batch["index"], perm[8 * j:8 * j + 8])
        got = raw_from(batch, b.mean, b.std)
        for k, i in enumerate(batch["index"].tolist()):
            p = 8 * j + k
            dy, dx = int(params["dy"][p]), int(params["dx"][p])
            want = orig[i, :, dy:dy + 32, dx:dx + 32]
            if params["flip"][p]:
                want = want.flip(-1)
            assert torch.equal(got[k], want)
    assert len(loader) == 4 and [len(x["index"]) for x in batches(loader)] == [8, 8, 8, 6]


def test_resized_crop_flip_hand_checks():
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    aug = ResizedCropFlip(size=4)
    whole = {"box": torch.tensor([[0.0, 0.0, 4.0, 4.0]]), "flip": torch.tensor([False])}
    assert torch.allclose(aug.apply(x, whole), x, atol=1e-5)
    flipped = {"box": torch.tensor([[0.0, 0.0, 4.0, 4.0]]), "flip": torch.tensor([True])}
    assert torch.allclose(aug.apply(x, flipped), x.flip(-1), atol=1e-5)
    # a 4x4 box resampled to 2x2 reads the centre of each 2x2 block = its average
    half = ResizedCropFlip(size=2).apply(x, whole)
    assert torch.allclose(half[0, 0], torch.tensor([[2.5, 4.5], [10.5, 12.5]]), atol=1e-5)
    # the bottom-right 2x2 box at output size 2 is exactly those pixels
    corner = ResizedCropFlip(size=2).apply(x, {"box": torch.tensor([[2.0, 2.0, 2.0, 2.0]]),
                                               "flip": torch.tensor([False])})
    assert torch.allclose(corner[0, 0], torch.tensor([[10.0, 11.0], [14.0, 15.0]]), atol=1e-5)
    p = aug.sample(2000, torch.Generator().manual_seed(0), 40, 30)
    top, left, h, w = p["box"].unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 40).all() and (left + w <= 30).all()
    area = h * w / 1200
    assert area.min() >= 0.08 - 0.02 and area.max() <= 1.0
    assert 0.4 < float(p["flip"].float().mean()) < 0.6


# --------------------------------------------------------------------------- determinism and DDP

def test_epoch_determinism(fake_cifar):
    root = fake_cifar["root"]
    a = build_data(data_cfg(root, batch=8, seed=5), "cpu").train
    b = build_data(data_cfg(root, batch=8, seed=5), "cpu").train
    e3a, e3b = batches(a, 3), batches(b, 3)
    for x, y in zip(e3a, e3b):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["image"], y["image"])
    e4 = batches(a, 4)
    assert not torch.equal(torch.cat([x["index"] for x in e4]), torch.cat([x["index"] for x in e3a]))
    again = batches(a, 3)  # going back to an epoch reproduces it (exact resume)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(again, e3a))
    other = batches(build_data(data_cfg(root, batch=8, seed=6), "cpu").train, 3)
    assert not torch.equal(torch.cat([x["index"] for x in other]), torch.cat([x["index"] for x in e3a]))
    # the global RNG is neither used nor disturbed
    torch.manual_seed(123)
    state = torch.get_rng_state()
    batches(a, 3)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("fast", [True, False])
def test_world_size_2_slices_concatenate_to_single_process_batches(fake_cifar, fast):
    root = fake_cifar["root"]
    single = build_data(data_cfg(root, batch=8, seed=1, fast=fast), "cpu")
    ranks = [build_data(data_cfg(root, batch=8, seed=1, fast=fast), "cpu", rank=r, world_size=2) for r in (0, 1)]
    assert len(single.train) == 4 and all(len(r.train) == 3 for r in ranks)  # W>1 drops the last 6 images
    s = batches(single.train, 7)
    r0, r1 = batches(ranks[0].train, 7), batches(ranks[1].train, 7)
    for j in range(3):
        assert r0[j]["image"].shape[0] == 4
        for key in ("image", "target", "index"):
            assert torch.equal(torch.cat([r0[j][key], r1[j][key]]), s[j][key])
    # test shards: contiguous, disjoint, covering the test set once
    idx = [torch.cat([x["index"] for x in r.test]) for r in ranks]
    assert idx[0].tolist() == [0, 1, 2, 3, 4] and idx[1].tolist() == [5, 6, 7, 8, 9]


def test_dataloader_path_is_worker_independent(fake_cifar):
    root = fake_cifar["root"]
    b0 = build_data(data_cfg(root, batch=8, seed=2, fast=False), "cpu")
    cfg = data_cfg(root, batch=8, seed=2, fast=False, num_workers=2, persistent_workers=True, prefetch_factor=2)
    b2 = build_data(cfg, "cpu")
    for e in (0, 1):
        for x, y in zip(batches(b0.train, e), batches(b2.train, e)):
            assert torch.equal(x["index"], y["index"]) and torch.equal(x["image"], y["image"])
    # the DataLoader path's augmentation is the same kind: a shifted window of the padded image, maybe flipped
    batch = batches(b0.train, 0)[0]
    got = raw_from(batch, b0.mean, b0.std)
    padded = F.pad(torch.from_numpy(fake_cifar["train"]), (4, 4, 4, 4))
    for k, i in enumerate(batch["index"].tolist()):
        windows = padded[i].unfold(1, 32, 1).unfold(2, 32, 1).permute(1, 2, 0, 3, 4).reshape(-1, 3, 32, 32)
        hit = (windows == got[k]).flatten(1).all(1).any() or (windows.flip(-1) == got[k]).flatten(1).all(1).any()
        assert hit


def test_max_steps_and_subsets(fake_cifar):
    b = build_data(data_cfg(fake_cifar["root"], batch=4, max_steps=2, train_subset=10, test_subset=5), "cpu")
    assert b.num_train == 10 and b.num_test == 5 and len(b.train) == 2 and len(batches(b.train)) == 2
    assert subset_indices(10, 3).tolist() == [0, 3, 6] and subset_indices(10, 0) is None
    # the test subset is evenly spaced (the shared test set is class-sorted): labels 0, 2, 4, 6, 8
    assert torch.cat([x["target"] for x in b.test]).tolist() == [0, 2, 4, 6, 8]
    assert b.test.targets.tolist() == [0, 2, 4, 6, 8]


# --------------------------------------------------------------------------- image folders and digits

def test_image_folder_dataloader_path(image_folder):
    b = build_data(data_cfg(image_folder, dataset="imagefolder", image_size=16, batch=6, eval_batch=4), "cpu")
    assert not b.fast and b.class_names == ["ant", "bee", "cat"] and b.num_classes == 3
    assert (b.num_train, b.num_test, b.image_size) == (12, 6, 16)
    train = batches(b.train, 0)
    assert [x["image"].shape for x in train] == [(6, 3, 16, 16)] * 2
    test = batches(b.test)
    assert torch.cat([x["target"] for x in test]).tolist() == [0, 0, 1, 1, 2, 2]
    # solid colours survive resize/crop exactly: red -> ((1-m)/s, (0-m)/s, (0-m)/s)
    m, s = torch.tensor(b.mean), torch.tensor(b.std)
    red = test[0]["image"][0]
    assert torch.allclose(red[:, 5, 5], (torch.tensor([1.0, 0.0, 0.0]) - m) / s, atol=1e-5)
    for x in train:
        colour = denormalize(x["image"], b.mean, b.std)[:, :, 8, 8].argmax(1)
        assert torch.equal(colour, x["target"])
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(train, batches(b.train, 0)))


def test_image_folder_fast_path(image_folder):
    b = build_data(data_cfg(image_folder, dataset="imagefolder", image_size=16, batch=6, fast=True), "cpu")
    assert b.fast and b.train.images.shape == (12, 3, 18, 18)  # stored at 16*256/224 = 18
    train = batches(b.train, 1)
    assert [x["image"].shape for x in train] == [(6, 3, 16, 16)] * 2
    for x in train:
        assert torch.equal(denormalize(x["image"], b.mean, b.std)[:, :, 8, 8].argmax(1), x["target"])
    test = batches(b.test)
    assert test[0]["image"].shape == (5, 3, 16, 16)


def test_image_folder_errors(tmp_path, image_folder):
    with pytest.raises(LakdError, match="no class sub-folders"):
        (tmp_path / "train").mkdir()
        (tmp_path / "val").mkdir()
        build_data(data_cfg(tmp_path, dataset="imagefolder"), "cpu")
    (tmp_path / "train" / "a").mkdir()
    (tmp_path / "val" / "a").mkdir()
    with pytest.raises(LakdError, match="no images found under"):
        build_data(data_cfg(tmp_path, dataset="imagefolder"), "cpu")
    with pytest.raises(LakdError, match="ILSVRC2012"):
        build_data(data_cfg(tmp_path / "none", dataset="imagenet"), "cpu")


def test_digits_loads_with_10_classes():
    from lakd.data.digits import DIGITS_MEAN, DIGITS_STD, digits_stats, load_digits

    b = build_data(data_cfg(dataset="digits", batch=64, eval_batch=100, augment=False), "cpu")
    assert (b.num_classes, b.num_train, b.num_test, b.image_size) == (10, 1437, 360, 32)
    assert b.class_names == [str(k) for k in range(10)]
    counts = b.train.targets.bincount()
    assert counts.numel() == 10 and counts.min() >= 139 and counts.max() <= 146  # stratified
    assert b.test.targets.bincount().min() >= 35
    batch = next(iter(b.train))
    assert batch["image"].shape == (64, 3, 32, 32)
    raw = raw_from(batch, b.mean, b.std)
    assert torch.equal(raw[:, 0], raw[:, 2]) and raw.max() == 255 and raw.min() == 0
    train, _, _ = load_digits()
    assert digits_stats(train) == (DIGITS_MEAN, DIGITS_STD)
    # every training image is one of sklearn's digits, scaled 0..16 -> 0..255 and upsampled bilinearly
    from sklearn.datasets import load_digits as sk

    src = torch.from_numpy(sk().images).float()[:, None] * (255 / 16)
    up = F.interpolate(src, size=32, mode="bilinear", align_corners=False).round().clamp(0, 255).to(torch.uint8)
    known = {bytes(u.numpy().tobytes()) for u in up[:, 0]}
    assert all(bytes(t.numpy().tobytes()) in known for t in train.images[:, 0])


@pytest.mark.parametrize("fast", [True, False])
def test_oversized_image_is_named_not_a_traceback(image_folder, tmp_path, monkeypatch, fast):
    """PIL refuses images over twice MAX_IMAGE_PIXELS (DecompressionBombError); the error names the file.
    The limit is lowered here so that the fixture's small images count as oversized."""
    import shutil

    from PIL import Image

    root = tmp_path / "tree"
    shutil.copytree(image_folder, root)
    Image.new("RGB", (64, 64), (9, 9, 9)).save(root / "val" / "bee" / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 = 4096 > 2 x 1000; the others are <= 960
    cfg = data_cfg(root, dataset="imagefolder", image_size=16, fast=fast, augment=False)
    with pytest.raises(LakdError) as e:
        b = build_data(cfg, "cpu")
        list(b.test)
    assert str(root / "val" / "bee" / "huge.png") in str(e.value) and "too large" in str(e.value)
