"""Fixtures shared by the test files: one CPU thread, small distillers and batches, tiny digits runs.

Helpers are handed out as fixtures that return a function (``make_distiller("kd")``), so a test names what it
uses in its signature and no file redefines them.
"""
from __future__ import annotations

from lakd.runtime.threads import set_openmp_wait_policy

set_openmp_wait_policy(always=True)  # before torch loads: on a shared CI machine idle threads must not spin

import copy  # noqa: E402
import os  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from lakd.config import load_config  # noqa: E402
from lakd.distillers import DISTILLERS, build_distiller  # noqa: E402
from lakd.models import create_model  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the tests of a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    the machine is shared, and one thread makes CPU timings and reductions steady."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _make_distiller(method, student="resnet8", teacher="resnet14", extra=(), seed=0, num_classes=10):
    torch.manual_seed(seed)
    needs_teacher = DISTILLERS.get(method).needs_teacher
    over = [f"method={method}", f"model.name={student}", *extra]
    if needs_teacher:
        over.append(f"teacher.name={teacher}")
    cfg = load_config(None, over)
    s = create_model(student, num_classes)
    t = create_model(teacher, num_classes) if needs_teacher else None
    return build_distiller(cfg, s, t, num_data=64).train()


@pytest.fixture
def make_distiller():
    """``make_distiller(method, student="resnet8", teacher="resnet14", extra=(), seed=0, num_classes=10)``: a
    distiller in train mode on random weights (seeded), with the config's defaults plus ``extra`` overrides."""
    return _make_distiller


def _image_batch(n=8, size=32, num_classes=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, size, size, generator=g),
            "target": torch.randint(0, num_classes, (n,), generator=g), "index": torch.arange(n)}


@pytest.fixture
def image_batch():
    """``image_batch(n=8, size=32, num_classes=10, seed=1)``: a random training batch (image, target, index)."""
    return _image_batch


@pytest.fixture
def flat():
    """``flat(tensors)``: one float vector of a list of tensors (to compare gradients as a whole)."""
    return lambda tensors: torch.cat([t.reshape(-1).float() for t in tensors])


@pytest.fixture
def digits_overrides(tmp_path):
    """``digits_overrides(method="lakd", extra=())``: overrides of a two-step, one-epoch run on the bundled digits
    (resnet8 student, resnet8 teacher for methods that need one), written under ``tmp_path``."""

    def make(method="lakd", extra=()):
        over = ["data.dataset=digits", "data.test_subset=32", "train.eval_batch_size=32", "solver.batch_size=16",
                "solver.max_steps_per_epoch=2", "solver.epochs=1", "solver.lr=0.05", "train.progress=false",
                "train.threads=1", f"output_dir={tmp_path}", f"method={method}", "model.name=resnet8"]
        if DISTILLERS.get(method).needs_teacher:
            over.append("teacher.name=resnet8")
        return over + list(extra)

    return make


def _tiny_model(arch="resnet8", seed=0):
    torch.manual_seed(seed)
    return create_model(arch, 10).eval()


@pytest.fixture
def tiny_model():
    """``tiny_model(arch="resnet8", seed=0)``: a 10-class zoo model on seeded random weights, in eval mode."""
    return _tiny_model


@pytest.fixture
def digits_ckpts(tmp_path):
    """Checkpoints of tiny random models on the digits data: a resnet14 teacher, kd and lakd resnet8 students
    (lakd format: arch, classes, dataset, normalisation, run config) and a bare mdistiller-style file."""
    from lakd.data import build_data

    bundle = build_data(load_config(None, ["data.dataset=digits"]), "cpu")
    paths = {}
    for i, (name, arch) in enumerate([("teacher", "resnet14"), ("kd_run", "resnet8"), ("lakd_run", "resnet8")]):
        m = _tiny_model(arch, seed=i)
        p = tmp_path / f"{name}.pt"
        cfg = {"experiment": name, "method": name.split("_")[0], "sdm": {"splits": [1, 3]}}
        torch.save({"model": m.state_dict(), "arch": arch, "num_classes": 10, "dataset": "digits",
                    "mean": list(bundle.mean), "std": list(bundle.std), "config": cfg}, p)
        paths[name] = str(p)
    bare = tmp_path / "bare.pth"  # mdistiller style: weights only, no architecture recorded
    torch.save({"model": _tiny_model("resnet8", 1).state_dict()}, bare)
    paths["bare"] = str(bare)
    return paths



_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_shipped_configs(dirs, pairs, dataset="cifar100", num_data=64):
    """For each pair (teacher, student) and config folder ``d``, ``configs/<dataset>/<d>/<teacher>_<student>.yaml``
    builds on its real architectures (seeded random weights) and one training forward on a batch of 2 (with the
    method's extra views and the samples' indices) gives logits over the data's classes and a finite total loss,
    through which backward runs. A config whose teacher is its student's architecture (Tf-KD self) gets a copy of
    the student."""
    num_classes = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}[dataset]
    torch.manual_seed(0)
    x, y, index = torch.randn(2, 3, 32, 32), torch.tensor([3, 7]), torch.tensor([0, 1])
    for teacher, student in pairs:
        te, s = create_model(teacher, num_classes), create_model(student, num_classes)
        for d in dirs:
            cfg = load_config(os.path.join(_ROOT, "configs", dataset, d, f"{teacher}_{student}.yaml"))
            assert cfg["model"]["name"] == student, (d, teacher, student)
            t_model = copy.deepcopy(s) if cfg["teacher"]["name"] == student else te
            dist = build_distiller(cfg, s, t_model, num_data=num_data)
            dist.train()
            views = dist.random_views(x)
            logits, losses = dist.forward_train(x, y, index=index, **({"views": views} if views else {}))
            total = sum(losses.values())
            assert logits.shape == (2, num_classes) and torch.isfinite(total), (teacher, student, d, losses)
            total.backward()
            s.zero_grad()


@pytest.fixture
def run_shipped_configs():
    """``run_shipped_configs(dirs, pairs, dataset="cifar100", num_data=64)``: every shipped config of those method
    folders and pairs builds on its real architectures, and one training forward and backward gives finite
    losses (``num_data``: the training set's size, for methods with a memory bank over it)."""
    return _run_shipped_configs


@pytest.fixture
def not_blank():
    """``not_blank(path, min_var=1e-3)``: asserts a PNG was written with real content (not one flat colour)."""

    def check(path, min_var=1e-3):
        from matplotlib.image import imread

        img = imread(path)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert float(img[..., :3].var()) > min_var, f"{path} looks blank"

    return check


def _block_parameters(model, start: int, end: int, stem: bool = False, head: bool = False) -> list:
    """Parameters of blocks ``start .. end-1`` (0-based; ``block_modules``), with the stem's and the head's on
    request: the parameters of the modules that ``stem_forward`` / ``head_forward`` call, found by forward hooks
    on a zero image (so nothing in the models exists only for tests)."""
    called: list = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: called.append(mod))
             for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    p = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            h = model.stem_forward(torch.zeros(1, 3, model.input_size, model.input_size, dtype=p.dtype,
                                               device=p.device))
            stem_mods = list(called)
            h = model.run_blocks(h, 0, model.num_blocks)
            called.clear()
            model.head_forward(h)
            head_mods = list(called)
    finally:
        for hk in hooks:
            hk.remove()
        model.train(was_training)
    groups = [(m, False) for m in stem_mods] if stem else []
    groups += [(m, True) for i in range(start, end) for m in model.block_modules(i)]
    groups += [(m, False) for m in head_mods] if head else []
    seen, params = set(), []
    for m, recurse in groups:
        for q in m.parameters(recurse=recurse):
            if id(q) not in seen:
                seen.add(id(q))
                params.append(q)
    return params


@pytest.fixture
def block_parameters():
    """``block_parameters(model, start, end, stem=False, head=False)``: the parameters of a model's blocks
    ``start .. end-1`` (0-based), optionally with the stem's and the head's (e.g. one of LAKD's local modules)."""
    return _block_parameters
