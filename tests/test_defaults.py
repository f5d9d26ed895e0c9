"""CPU defaults (issue 14): train.channels_last / amp / malloc resolution, and LAKD's extra ops keeping
channels_last."""
from __future__ import annotations

import copy

import pytest
import torch

from lakd.config import load_config
from lakd.distillers import build_distiller
from lakd.distillers.lakd import Connector, weighted_mse
from lakd.distillers.losses import ndam_map
from lakd.errors import LakdError
from lakd.models import create_model
from lakd.models.base import FeatureShape
from lakd.runtime import device as devmod

CPU = torch.device("cpu")
CL = torch.channels_last


def test_channels_last_auto_follows_the_model_families(monkeypatch):
    s, t = create_model("resnet8", 10), create_model("resnet14", 10)
    assert devmod.resolve_channels_last(True, CPU, [s]) and not devmod.resolve_channels_last(False, CPU, [s])
    monkeypatch.setattr(type(s), "CHANNELS_LAST_CPU", True)
    assert devmod.resolve_channels_last("auto", CPU, [s, t, None])
    assert not devmod.resolve_channels_last("auto", torch.device("cuda", 0), [s, t])  # not measured on GPUs
    monkeypatch.setattr(type(s), "CHANNELS_LAST_CPU", False)
    assert not devmod.resolve_channels_last("auto", CPU, [s, t])


def test_channels_last_defaults_are_the_measured_ones():
    """bench_layout.py (results/performance/w1/layout.json): faster in channels_last on this CPU for the CIFAR
    ResNets, WRN, MobileNetV2 and ShuffleNetV1; not for VGG (1.04x, within noise) or ShuffleNetV2 (0.91x); the
    torchvision ResNets were not measured. A pair is channels_last only when both families are."""
    on = {n: devmod.resolve_channels_last("auto", CPU, [create_model(n, 10)])
          for n in ("resnet20", "resnet8x4", "wrn_16_2", "mobilenetv2", "shufflev1", "vgg8", "shufflev2")}
    assert on == {"resnet20": True, "resnet8x4": True, "wrn_16_2": True, "mobilenetv2": True, "shufflev1": True,
                  "vgg8": False, "shufflev2": False}
    assert not devmod.resolve_channels_last("auto", CPU, [create_model("vgg8", 10), create_model("resnet56", 10)])
    assert devmod.resolve_channels_last("auto", CPU, [create_model("resnet8x4", 10),
                                                      create_model("resnet32x4", 10)])


def test_amp_auto_is_bf16_only_where_native_and_measured_faster(monkeypatch):
    """auto = bf16 only where the device computes it natively and every model's family was measured faster
    with it on that device kind (BF16_FASTER; layout.json on a bf16 CPU, results/performance/gpu_h200)."""
    pair = [create_model("resnet20", 10), create_model("resnet56", 10)]
    monkeypatch.setattr(devmod, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert devmod.resolve_amp("auto", CPU, pair) == "none"  # no native bf16
    for flags in ({"avx512f", "avx512_bf16"}, {"amx_bf16"}):
        monkeypatch.setattr(devmod, "cpu_flags", lambda flags=flags: flags)
        assert devmod.resolve_amp("auto", CPU, pair) == "bf16"
        assert devmod.resolve_amp("auto", CPU, [pair[0], None]) == "bf16"  # scratch: no teacher
        # one family measured slower with bf16 (ShuffleNetV2, MobileNetV2) or unmeasured: fp32
        assert devmod.resolve_amp("auto", CPU, [create_model("shufflev2", 10), pair[1]]) == "none"
        assert devmod.resolve_amp("auto", CPU, [create_model("mobilenetv2", 10)]) == "none"
        assert devmod.resolve_amp("auto", CPU, []) == "none"
    on = {n for n in ("resnet20", "resnet8x4", "wrn_16_2", "vgg8", "mobilenetv2", "shufflev1", "shufflev2")
          if devmod.resolve_amp("auto", CPU, [create_model(n, 10)]) == "bf16"}
    assert on == {"resnet20", "resnet8x4", "wrn_16_2", "vgg8"}
    # CUDA: the CIFAR ResNets were no faster in bf16 on an H200, and no other family was measured there
    monkeypatch.setattr(devmod, "native_bf16", lambda device: True)
    assert devmod.resolve_amp("auto", torch.device("cuda", 0), pair) == "none"
    assert devmod.resolve_amp("fp16", CPU, pair) == "fp16" and devmod.resolve_amp("none", CPU, pair) == "none"
    assert load_config(None, [])["train"]["amp"] == "none"  # fp32 stays the default (bf16 cost KD 0.23 points)


def test_train_switch_values():
    for text, want in (("true", True), ("false", False), ("auto", "auto")):
        assert load_config(None, [f"train.channels_last={text}"])["train"]["channels_last"] == want
        assert load_config(None, [f"train.malloc={text}"])["train"]["malloc"] == want
    assert load_config(None, [])["train"]["channels_last"] == "auto"
    with pytest.raises(LakdError, match="train.channels_last"):
        load_config(None, ["train.channels_last=sometimes"])
    with pytest.raises(LakdError, match="train.amp"):
        load_config(None, ["train.amp=fp8"])


def test_malloc_auto_leaves_small_batches_and_other_devices_alone():
    assert not devmod.tune_cpu_allocator("auto", CPU, 64)
    assert not devmod.tune_cpu_allocator(False, CPU, 4096)
    assert not devmod.tune_cpu_allocator("auto", torch.device("cuda", 0), 4096)


def test_lakd_extra_ops_keep_channels_last():
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=CL).requires_grad_(True)
    t = torch.randn(2, 32, 4, 4).contiguous(memory_format=CL)
    conn = Connector(FeatureShape(16, 8, 8), FeatureShape(32, 4, 4)).to(memory_format=CL)  # 1x1 conv + BN + pool
    s = conn(x, t.shape[-2:])
    assert s.is_contiguous(memory_format=CL)
    up = Connector(FeatureShape(16, 8, 8), FeatureShape(16, 16, 16))(x, (16, 16))  # bilinear upsampling
    assert up.is_contiguous(memory_format=CL)
    w = ndam_map(t)
    assert w.shape == (2, 1, 4, 4)
    loss = weighted_mse(s, t, w)
    g, gx = torch.autograd.grad(loss, [s, x])
    assert g.is_contiguous(memory_format=CL) and gx.is_contiguous(memory_format=CL)


def test_lakd_step_in_channels_last_equals_contiguous():
    """One LAKD training step (local backward, connectors with 1x1 conv + BN, NDAM) in channels_last gives the
    contiguous run's losses and gradients."""
    cfg = load_config(None, ["method=lakd", "model.name=resnet8", "teacher.name=resnet8x4", "model.num_classes=10"])
    torch.manual_seed(0)
    d = build_distiller(cfg, create_model("resnet8", 10), create_model("resnet8x4", 10))
    d_cl = copy.deepcopy(d).to(memory_format=CL)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(4, 3, 32, 32, generator=g), "target": torch.tensor([0, 1, 2, 3])}
    out = []
    for model, image in ((d, batch["image"]), (d_cl, batch["image"].contiguous(memory_format=CL))):
        model.train()
        model.zero_grad(set_to_none=True)
        _, losses = model.train_step({**batch, "image": image}, lambda loss: loss.backward())
        out.append((losses, {n: p.grad for n, p in model.named_trainable_parameters()}))
    (la, ga), (lb, gb) = out
    for k in la:
        torch.testing.assert_close(lb[k], la[k], rtol=1e-4, atol=1e-5)
    for n in ga:
        assert (ga[n] is None) == (gb[n] is None), n
        if ga[n] is not None:
            torch.testing.assert_close(gb[n], ga[n], rtol=1e-3, atol=1e-4)


def test_openmp_wait_policy_is_passive_only_on_a_busy_machine():
    """lakd/runtime/threads.py: PASSIVE (idle threads sleep) when other work shares the cores (measured 1.6x to
    32x faster there, 0.77x on an idle machine); a user's own policy, or torch already loaded, is left alone."""
    from lakd.runtime.threads import BUSY_LOAD, choose_wait_policy

    assert choose_wait_policy({}, False, BUSY_LOAD) == "PASSIVE"
    assert choose_wait_policy({}, False, BUSY_LOAD - 0.01) is None  # idle: libgomp's default (spin) is faster
    assert choose_wait_policy({"OMP_WAIT_POLICY": "ACTIVE"}, False, 99.0) is None
    assert choose_wait_policy({}, True, 99.0) is None  # too late: libgomp read its settings with torch
    assert choose_wait_policy({}, False, None) is None  # no load average on this platform


@pytest.mark.parametrize("case", ["busy", "user_set", "torch_first"])
def test_the_command_sets_the_policy_before_torch_loads(case):
    """The lakd command's entry module chooses before torch loads, in a fresh process (os.getloadavg patched
    to a busy machine), and the choice reaches the process environment (and so DataLoader workers)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if case == "user_set":
        env["OMP_WAIT_POLICY"] = "ACTIVE"
    code = ("import torch; " if case == "torch_first" else "") + \
        "import os; os.getloadavg = lambda: (5.0, 5.0, 5.0); import lakd.cli.main; " \
        "print(os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [{"busy": "PASSIVE", "user_set": "ACTIVE", "torch_first": "None"}[case]]


def test_sweep_runs_that_fill_the_cores_sleep_and_the_header_says_so(monkeypatch):
    """lakd sweep: N runs x T threads that fill the cores get OMP_WAIT_POLICY=PASSIVE (one thread per run has no
    barriers to wait at); the run header names a policy in effect and whether lakd chose it."""
    from lakd.runtime import threads

    assert threads.shared_cores(2, 2, 4) and threads.shared_cores(4, 2, 4)
    assert not threads.shared_cores(1, 2, 4) and not threads.shared_cores(2, 1, 2)
    assert not threads.shared_cores(2, 2, None)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert threads.describe() == ""
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setattr(threads, "chosen", "PASSIVE")
    assert threads.describe() == ", OpenMP wait passive (the machine was busy)"
    monkeypatch.setattr(threads, "chosen", None)
    assert threads.describe() == ", OpenMP wait passive"
