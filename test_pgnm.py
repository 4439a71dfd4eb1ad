"""Tests of pgnm.py, evaluate.py and refine_radimagenet.py, CPU only, tiny shapes. Sections, in file order: pure math
against oracles (closed-form Beta density, torchvision's blur, hand computations, scikit-learn metrics) ->
architecture (timm / torchvision) -> checkpoints and weight loading (compile and DDP wrappers) -> data -> bad input
(one line, no traceback) -> training (one step, optimisers and lr schedules by hand, noisy evaluation, clipping,
--compile, --bench) -> phases end to end (variants, what a run prints and writes) -> resume (kills, signals, corrupt
checkpoints, non-finite steps) -> distributed (gloo processes) -> precision and devices (bf16 autocast, device
strings, --compile modes, --bench, GPU tests skipped without CUDA) -> evaluate.py -> refine_radimagenet.py.

    pip install -r requirements-dev.txt && python -m pytest -q test_pgnm.py
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import io
import json
import math
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import pgnm

HERE = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(2)


def tiny(phase="heated", **kw) -> pgnm.Config:
    """A configuration that trains in seconds: 24 classes x 4 images of 32 px, grid 8, one epoch."""
    base = dict(synthetic_per_class=4, synthetic_size=32, train_crop_size=32, val_resize_size=32, val_crop_size=32,
                grid=8, kernel=3, sigma=1.0, epochs=1, batch_size=8, print_freq=1000, workers=0, device="cpu")
    base.update(kw)
    return pgnm.make_config(phase, **base)


@pytest.fixture(autouse=True)
def _remove_tmp_path_when_the_test_ends(request):
    """Each test's tmp_path is removed when the test ends: the suite writes about 9 GB of runs and checkpoints, and
    pytest keeps the folders of the last three runs, which filled this project's disk once."""
    path = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


# =====================================================================================================================
#  Pure math
# =====================================================================================================================


def test_image_mix_and_dataset_ema_after_two_steps():
    """Eq. 10 and eq. 12 applied twice, against values computed by hand."""
    a_d = torch.tensor([[0.5, -1.0]])
    steps = [torch.tensor([[1.0, 2.0], [3.0, 0.0]]), torch.tensor([[-1.0, 1.0], [1.0, 1.0]])]
    img1 = pgnm.mix_image_params(a_d, steps[0], 0.9)
    assert torch.allclose(img1, torch.tensor([[0.9 * 0.5 + 0.1 * 1, 0.9 * -1 + 0.1 * 2],
                                              [0.9 * 0.5 + 0.1 * 3, 0.9 * -1 + 0.1 * 0]]))
    d1 = pgnm.ema_update(a_d, steps[0].mean(0, keepdim=True), 0.99)      # means (2, 1)
    assert torch.allclose(d1, torch.tensor([[0.99 * 0.5 + 0.01 * 2.0, 0.99 * -1.0 + 0.01 * 1.0]]))
    d2 = pgnm.ema_update(d1, steps[1].mean(0, keepdim=True), 0.99)       # means (0, 1)
    expect = [0.99 * (0.99 * 0.5 + 0.02) + 0.0, 0.99 * (0.99 * -1.0 + 0.01) + 0.01]
    assert torch.allclose(d2, torch.tensor([expect]), atol=1e-7)
    assert not d2.requires_grad


def test_make_mask_uses_dataset_params_before_update_and_commits_only_on_a_good_step():
    cfg = tiny()
    policy = pgnm.PolicyNet(cfg.grid)
    model = pgnm.build_model("resnet10t", 24)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    pol_opt = torch.optim.SGD(policy.parameters(), lr=0.0)
    a0, b0 = torch.rand(1, 64), torch.rand(1, 64)
    run = pgnm.Run(cfg, pgnm.DistInfo(), model, opt, policy=policy, pol_optimizer=pol_opt)
    state = pgnm.StepState(a0.clone(), b0.clone())
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 24, (8,))
    policy.train()
    with torch.no_grad():
        a, b = policy(x)
    m_in, logp, (new_a, new_b) = pgnm.make_mask(run, state, x)
    assert m_in.shape == (8, 1, 32, 32) and logp.shape == (8, 64)
    assert torch.allclose(new_a, 0.99 * a0 + 0.01 * a.mean(0, keepdim=True), atol=1e-5)
    assert torch.allclose(new_b, 0.99 * b0 + 0.01 * b.mean(0, keepdim=True), atol=1e-5)
    assert torch.equal(state.alpha_d, a0)                # not committed by make_mask
    fwd, ok, _ = pgnm.train_step(run, state, x, y)
    assert ok and not torch.equal(state.alpha_d, a0)      # committed by a good step
    assert torch.equal(state.alpha_d, fwd.next_d[0]) and torch.equal(state.beta_d, fwd.next_d[1])


def test_beta_log_prob_equals_the_closed_form_density_and_is_float32_under_autocast():
    """logP of eq. 7 against the Beta density written out, in float64:
    log B(m; a, b) = (a-1) log m + (b-1) log(1-m) - lgamma(a) - lgamma(b) + lgamma(a+b), with a = exp(log_alpha)."""
    torch.manual_seed(0)
    la, lb = torch.randn(4, 16), torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m, logp = pgnm.sample_beta_mask(la.bfloat16(), lb.bfloat16())
    assert m.dtype == torch.float32 and logp.dtype == torch.float32
    assert ((m > 0) & (m < 1)).all()
    want = torch.empty(4, 16, dtype=torch.float64)
    for i in range(4):
        for j in range(16):
            a, b = math.exp(float(la[i, j].bfloat16())), math.exp(float(lb[i, j].bfloat16()))   # what the policy gave
            x = float(m[i, j])
            want[i, j] = ((a - 1) * math.log(x) + (b - 1) * math.log1p(-x)
                          - math.lgamma(a) - math.lgamma(b) + math.lgamma(a + b))
    assert torch.allclose(logp.double(), want, rtol=1e-5, atol=1e-4), (logp.double() - want).abs().max()


def test_beta_samples_follow_the_distribution():
    torch.manual_seed(1)
    la = torch.full((20000, 1), math.log(2.0))
    lb = torch.full((20000, 1), math.log(5.0))
    m, _ = pgnm.sample_beta_mask(la, lb)
    assert abs(m.mean().item() - 2 / 7) < 0.005                       # E = a / (a + b)
    assert abs(m.var().item() - 2 * 5 / (49 * 8)) < 0.002              # Var = ab / ((a+b)^2 (a+b+1))


@pytest.mark.parametrize("value", [-1e4, -60.0, -20.0, 0.0, 20.0, 60.0, 1e4])
def test_beta_math_finite_for_extreme_parameters(value):
    la = torch.full((2, 8), value, requires_grad=True)
    lb = torch.full((2, 8), -value, requires_grad=True)
    m, logp = pgnm.sample_beta_mask(la, lb)
    assert torch.isfinite(m).all() and torch.isfinite(logp).all()
    pgnm.paper_objective(logp, torch.tensor(2.3)).backward()
    assert torch.isfinite(la.grad).all() and torch.isfinite(lb.grad).all()


def test_clamp_count_is_what_the_clamp_changed_and_follows_the_beta_tail():
    """The count against the same draws made by hand, and its rate against the Beta tail: for Beta(c, c),
    P(M < eps) + P(M > 1 - eps) = 2 eps^c / (c B(c, c)) to first order in eps."""
    la = torch.full((64, 4096), math.log(0.5))
    torch.manual_seed(3)
    raw = pgnm.beta_distribution(la, la).sample()
    torch.manual_seed(3)
    m, logp, n = pgnm.sample_beta_mask(la, la, return_clamped=True)
    assert n.dtype == torch.int64 and n.ndim == 0
    assert int(n) == int(((raw < pgnm.BETA_EPS) | (raw > 1 - pgnm.BETA_EPS)).sum()) > 0
    assert torch.equal(m, raw.clamp(pgnm.BETA_EPS, 1 - pgnm.BETA_EPS))
    for c in (2.0, 0.5, 0.3):
        la = torch.full((64, 4096), math.log(c))
        _, _, n = pgnm.sample_beta_mask(la, la, return_clamped=True)
        expected = la.numel() * 2 * pgnm.BETA_EPS ** c / (c * math.exp(2 * math.lgamma(c) - math.lgamma(2 * c)))
        assert abs(int(n) - expected) <= 5 * math.sqrt(expected) + 1, (c, int(n), expected)


@pytest.mark.parametrize("grid,lower", [(32, {0.5: (0.015, 0.06), 0.3: (0.24, 0.36)}),
                                        (64, {0.5: (0.025, 0.075), 0.3: (0.30, 0.42)})])
def test_clamp_lowers_eq8_multiplier_by_the_readme_amounts(grid, lower):
    """README, 'Where we differ': the clamp lowers eq. 8's multiplier mean_b(logsumexp_j logP) for concentrations
    below ~0.5. Exact logP from float64 gamma draws (M = g1 / (g1 + g2), so log M and log(1 - M) need no rounding)
    against our float32 clamp + log_prob of the same M; Monte Carlo with a fixed seed."""
    gen = torch.Generator().manual_seed(0)
    for c in (1.0, 0.5, 0.3):
        conc = torch.full((128, grid * grid), c, dtype=torch.float64)
        g1, g2 = torch._standard_gamma(conc, generator=gen), torch._standard_gamma(conc, generator=gen)
        log_total = (g1 + g2).log()
        log_beta_fn = 2 * math.lgamma(c) - math.lgamma(2 * c)
        exact = (c - 1) * (g1.log() - log_total) + (c - 1) * (g2.log() - log_total) - log_beta_fn
        la = torch.full(conc.shape, math.log(c))
        ours = pgnm.beta_distribution(la, la).log_prob((g1 / (g1 + g2)).float().clamp(pgnm.BETA_EPS, 1 - pgnm.BETA_EPS))
        m_exact = torch.logsumexp(exact, 1).mean().item()
        m_ours = torch.logsumexp(ours.double(), 1).mean().item()
        drop = (m_exact - m_ours) / m_exact
        if c == 1.0:
            assert abs(drop) < 1e-4                   # Beta(1, 1) is flat: the clamp changes nothing
        else:
            lo, hi = lower[c]
            assert lo < drop < hi, (grid, c, drop)


@pytest.mark.parametrize("grid,size,kernel,sigma", [(64, 224, 13, 6.0), (16, 64, 5, 2.0), (7, 33, 13, 6.0),
                                                    (5, 31, 3, 0.7), (33, 33, 13, 6.0), (8, 45, 9, 3.5),
                                                    (8, 40, 0, 1.0), (3, 17, 15, 10.0)])
def test_upsample_blur_equals_torchvision(grid, size, kernel, sigma):
    """Our matrix form against F.interpolate(nearest) + torchvision's gaussian_blur (reflect padding)."""
    from torchvision.transforms.functional import gaussian_blur
    m = torch.rand(3, grid * grid)
    ref = F.interpolate(m.view(3, 1, grid, grid), size=(size, size), mode="nearest")
    if kernel:
        ref = gaussian_blur(ref, kernel_size=kernel, sigma=sigma)
    ours = pgnm.upsample_blur(m, (size, size), kernel, sigma)
    assert ours.shape == (3, 1, size, size)
    assert (ours - ref).abs().max().item() < 1e-5


def test_upsample_blur_non_square_and_kernel_from_torchvision():
    from torchvision.transforms._functional_tensor import _get_gaussian_kernel1d
    assert torch.allclose(pgnm.gaussian_kernel1d(13, 6.0), _get_gaussian_kernel1d(13, 6.0, torch.float32, "cpu"))
    from torchvision.transforms.functional import gaussian_blur
    m = torch.rand(2, 36)
    ref = gaussian_blur(F.interpolate(m.view(2, 1, 6, 6), size=(40, 29), mode="nearest"), kernel_size=5, sigma=2.0)
    assert (pgnm.upsample_blur(m, (40, 29), 5, 2.0) - ref).abs().max() < 1e-5


def test_paper_objective_against_hand_computation():
    """Eq. 8 on fixed numbers: L = mean_b(log sum_j exp logP[b, j]) * CE."""
    logp = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, -0.5]])
    ce = torch.tensor(1.7)
    row = [math.log(math.exp(0.5) + math.exp(-1.0) + math.exp(2.0)), math.log(math.exp(1.5) + 1 + math.exp(-0.5))]
    assert pgnm.paper_objective(logp, ce).item() == pytest.approx((row[0] + row[1]) / 2 * 1.7, rel=1e-6)
    # where the authors' log(sum(exp(.))) overflows, logsumexp still gives the number
    big = torch.tensor([[100.0, 100.0], [90.0, 91.0]])
    want = ((100 + math.log(2)) + (91 + math.log(1 + math.exp(-1)))) / 2 * 1.7
    assert torch.isinf(torch.log(torch.sum(big.exp(), 1))).all()
    assert pgnm.paper_objective(big, ce).item() == pytest.approx(want, rel=1e-6)


def test_reinforce_objective_against_hand_computation():
    logp = torch.tensor([[1.0, 2.0], [0.5, -0.5], [0.0, 3.0]], requires_grad=True)
    c = torch.tensor([1.0, 2.0, 3.0])
    loss = pgnm.reinforce_objective(logp, c)
    adv = [-1.0, 0.0, 1.0]
    sums = [3.0, 0.0, 3.0]
    assert loss.item() == pytest.approx(2.0 + sum(a * s for a, s in zip(adv, sums)) / 3)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-1 / 3] * 2, [0.0] * 2, [1 / 3] * 2]))


def test_objective_gradients_reach_both_networks():
    cfg = tiny()
    torch.manual_seed(0)
    policy, model = pgnm.PolicyNet(cfg.grid), pgnm.build_model("resnet10t", 24)
    opt, pol_opt = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(policy.parameters(), lr=0.1)
    run = pgnm.Run(cfg, pgnm.DistInfo(), model, opt, policy=policy, pol_optimizer=pol_opt)
    state = pgnm.StepState(torch.rand(1, 64), torch.rand(1, 64))
    loss = pgnm.compute_loss(run, state, torch.randn(8, 3, 32, 32), torch.randint(0, 24, (8,))).loss
    loss.backward()
    for name, net in (("classifier", model), ("policy.fe", policy.fe), ("policy.alpha", policy.alpha),
                      ("policy.beta", policy.beta)):
        grads = [p.grad.abs().sum().item() for p in net.parameters() if p.grad is not None]
        assert grads and sum(grads) > 0, name


# --- metrics against scikit-learn -----------------------------------------------------------------------------------

def _sk_metrics(probs, target):
    from sklearn import metrics as skm
    pred = probs.argmax(1)
    out = dict(acc=skm.accuracy_score(target, pred), balanced_acc=skm.balanced_accuracy_score(target, pred),
               precision=skm.precision_score(target, pred, average="macro", zero_division=0),
               recall=skm.recall_score(target, pred, average="macro", zero_division=0),
               f1=skm.f1_score(target, pred, average="macro", zero_division=0))
    if probs.shape[1] == 2:                     # binary: the positive column (OvR gives the same for softmax)
        out["auroc"] = skm.roc_auc_score(target, probs[:, 1])
    elif len(np.unique(target)) == probs.shape[1]:
        out["auroc"] = skm.roc_auc_score(target, probs, multi_class="ovr", average="macro")
    return out


@pytest.mark.parametrize("case", ["random", "ties", "never_predicted", "absent_class", "binary", "perfect"])
def test_metrics_equal_sklearn(case):
    rng = np.random.default_rng(3)
    c, n = (2, 60) if case == "binary" else (5, 80)
    logits = rng.normal(size=(n, c))
    target = rng.integers(0, c, n)
    if case == "ties":
        logits = np.round(logits, 0)                       # many tied scores
    if case == "never_predicted":
        logits[:, 2] = -10                                 # class 2 is never predicted
    if case == "absent_class":
        target[target == 4] = 0                            # class 4 never occurs in the labels
    if case == "perfect":
        logits[np.arange(n), target] += 100
    probs = torch.from_numpy(logits).softmax(1)
    ours = pgnm.classification_metrics(probs, torch.from_numpy(target))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = _sk_metrics(probs.numpy(), target)
    for k, v in ref.items():
        assert ours[k] == pytest.approx(v, abs=1e-9), k
    if case == "absent_class":          # scikit-learn refuses; we average over the classes that occur
        from sklearn.metrics import roc_auc_score
        want = np.mean([roc_auc_score(target == k, probs[:, k]) for k in range(4)])
        assert ours["auroc"] == pytest.approx(want, abs=1e-9)


def test_binary_auroc_with_ties_equals_sklearn():
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = rng.integers(0, 5, 50).astype(float)
        y = rng.random(50) < 0.4
        assert pgnm.binary_auroc(torch.from_numpy(s), torch.from_numpy(y)) == pytest.approx(roc_auc_score(y, s))
    assert math.isnan(pgnm.binary_auroc(torch.rand(5), torch.zeros(5, dtype=torch.bool)))


def test_normalised_entropy_by_hand():
    probs = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    m = pgnm.classification_metrics(probs, torch.tensor([0, 0, 1]))
    assert m["entropy"] == pytest.approx((math.log(2) + 0 + math.log(3)) / 3 / math.log(3))


# =====================================================================================================================
#  Architecture: timm and torchvision are the oracles
# =====================================================================================================================

GOLDEN_PARAMS = {"resnet10t": 5_435_488, "resnet18": 11_689_512, "resnet50": 25_557_032}


@pytest.mark.parametrize("name", ["resnet10t", "resnet18", "resnet50"])
def test_models_equal_timm_keys_params_and_logits(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ours, ref = pgnm.build_model(name, 1000).eval(), timm.create_model(name, pretrained=False).eval()
    assert sum(p.numel() for p in ours.parameters()) == GOLDEN_PARAMS[name]
    so, sr = ours.state_dict(), ref.state_dict()
    assert list(so) == list(sr)
    assert all(so[k].shape == sr[k].shape for k in so)
    x = torch.randn(2, 3, 64, 64)
    ours.load_state_dict(sr, strict=True)                       # timm -> ours
    assert torch.equal(ours(x), ref(x))
    ref2 = timm.create_model(name, pretrained=False).eval()
    ref2.load_state_dict(pgnm.build_model(name, 1000).state_dict(), strict=True)  # ours -> timm
    ours.load_state_dict(ref2.state_dict())
    assert torch.equal(ours(x), ref2(x))
    assert ours.num_features == (2048 if name == "resnet50" else 512)
    assert ours.forward_features(x).shape == (2, ours.num_features)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_models_equal_torchvision(name):
    import torchvision
    tv = getattr(torchvision.models, name)().eval()
    ours = pgnm.build_model(name).eval()
    ours.load_state_dict(tv.state_dict(), strict=True)
    tv.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(ours(x), tv(x))


def test_resnet10t_key_layout_golden():
    keys = list(pgnm.resnet10t().state_dict())
    assert len(keys) == 86
    assert keys[:3] == ["conv1.0.weight", "conv1.1.weight", "conv1.1.bias"]
    for k in ("conv1.3.weight", "conv1.6.weight", "layer2.0.downsample.1.weight", "layer4.0.downsample.2.running_var",
              "fc.weight", "fc.bias"):
        assert k in keys


def test_policy_net_keys_as_the_authors():
    timm = pytest.importorskip("timm")
    p = pgnm.PolicyNet(grid=8)
    keys = list(p.state_dict())
    fe = [k[3:] for k in keys if k.startswith("fe.")]
    assert fe == list(timm.create_model("resnet10t", num_classes=0).state_dict())
    head = ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked",
            "3.weight", "3.bias", "4.weight", "4.bias", "4.running_mean", "4.running_var", "4.num_batches_tracked",
            "6.weight", "6.bias"]
    assert [k[6:] for k in keys if k.startswith("alpha.")] == head
    assert [k[5:] for k in keys if k.startswith("beta.")] == head
    assert p.state_dict()["alpha.6.weight"].shape == (64, 512)
    a, b = p(torch.randn(4, 3, 32, 32))
    assert a.shape == b.shape == (4, 64)


def test_guess_architecture():
    for name in ("resnet10t", "resnet18", "resnet50"):
        assert pgnm.guess_architecture(pgnm.build_model(name).state_dict()) == name
    assert pgnm.guess_architecture({"foo": torch.zeros(1)}) is None


# =====================================================================================================================
#  Checkpoints and weight loading
# =====================================================================================================================


@contextlib.contextmanager
def _gloo_world_of_one(tmp_path):
    """A real gloo process group of one process (rank 0, world size 1) on a FileStore in tmp_path, destroyed after."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'gloo_store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_compiled_and_ddp_wrappers_unwrap_to_plain_keys(tmp_path):
    m = pgnm.build_model("resnet10t", 5)
    compiled = torch.compile(m)                    # lazy: nothing is compiled until called
    assert pgnm.unwrap(compiled) is m
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    assert list(pgnm.strip_prefixes(compiled.state_dict())) == list(m.state_dict())
    with _gloo_world_of_one(tmp_path):
        ddp = torch.nn.parallel.DistributedDataParallel(m)
        both = torch.compile(ddp)                  # what wrap_for_training builds with --compile under torchrun
        assert pgnm.unwrap(ddp) is m and pgnm.unwrap(both) is m
        assert all(k.startswith("module.") for k in ddp.state_dict())
        assert all(k.startswith("_orig_mod.module.") for k in both.state_dict())
        assert list(pgnm.strip_prefixes(both.state_dict())) == list(m.state_dict())
        # a run wrapped the way a distributed run is (the process group has one process, which DDP accepts) trains
        # a step through DDP and checkpoints the modules underneath, under their plain keys
        run, state = _tiny_run()
        raw_model, raw_policy, info = run.model, run.policy, run.info
        run.info = dataclasses.replace(info, world=2)
        pgnm.wrap_for_training(run)
        run.info = info
        assert isinstance(run.model, torch.nn.parallel.DistributedDataParallel)
        assert isinstance(run.policy, torch.nn.parallel.DistributedDataParallel)
        assert run.model_raw is raw_model and run.policy_raw is raw_policy
        before = raw_model.fc.weight.detach().clone()
        _, taken, _ = pgnm.train_step(run, state, torch.randn(8, 3, 32, 32), torch.randint(0, 24, (8,)))
        assert taken and not torch.equal(before, raw_model.fc.weight)
        ck = pgnm.make_checkpoint(run, state, 0, 1, 3, {"loss_sum": 0.0, "n_ok": 1})
        assert list(ck["model"]) == list(raw_model.state_dict()) and list(ck["policy_net"]) == list(
            raw_policy.state_dict())
        assert torch.equal(ck["model"]["fc.weight"], raw_model.fc.weight)


def test_strip_prefixes():
    sd = {"module._orig_mod.fc.weight": 1, "_orig_mod.module.conv1.weight": 2, "bn1.bias": 3}
    assert pgnm.strip_prefixes(sd) == {"fc.weight": 1, "conv1.weight": 2, "bn1.bias": 3}


def test_head_reinitialised_when_class_count_differs(capsys):
    src = pgnm.build_model("resnet18", 1000)
    dst = pgnm.build_model("resnet18", 7)
    fc_before = dst.fc.weight.clone()
    msgs = []
    pgnm.load_into_classifier(dst, src.state_dict(), "w.pth", "resnet18", log=msgs.append)
    assert torch.equal(dst.conv1.weight, src.conv1.weight)
    assert torch.equal(dst.fc.weight, fc_before)
    assert msgs and "1000-class head" in msgs[0] and "7 classes" in msgs[0]


def test_wrong_architecture_is_refused_with_the_right_model_named():
    with pytest.raises(pgnm.UserError, match="--model resnet50"):
        pgnm.load_into_classifier(pgnm.build_model("resnet18", 10), pgnm.build_model("resnet50").state_dict(),
                                  "x.pth", "resnet18")


def test_authors_and_timm_and_torchvision_weights_load_as_finetune_source(tmp_path):
    import torchvision
    timm = pytest.importorskip("timm")
    ref = pgnm.build_model("resnet18", 24)
    wrapped = {f"module._orig_mod.{k}": v for k, v in ref.state_dict().items()}
    authors = tmp_path / "authors.pth"        # the authors' layout: {'model': ..., 'args': Namespace}, DDP prefixes
    torch.save({"model": wrapped, "epoch": 3, "args": argparse.Namespace(lr=0.1, model="resnet18")}, authors)
    sd = pgnm.load_classifier_weights(str(authors))
    assert set(sd) == set(ref.state_dict()) and torch.equal(sd["conv1.weight"], ref.conv1.weight)
    for name, weights in (("timm.pth", timm.create_model("resnet18").state_dict()),
                          ("tv.pth", torchvision.models.resnet18().state_dict())):
        torch.save(weights, tmp_path / name)
        m = pgnm.build_model("resnet18", 24)
        pgnm.load_into_classifier(m, pgnm.load_classifier_weights(str(tmp_path / name)), name, "resnet18",
                                  log=lambda *_: None)
        assert torch.equal(m.conv1.weight, weights["conv1.weight"])


def test_checkpoint_refuses_code_execution(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "x": Evil()}, path)
    with pytest.raises(pgnm.UserError, match="cannot load weights"):
        pgnm.load_classifier_weights(str(path))


def test_atomic_save_keeps_previous(tmp_path):
    p, prev = str(tmp_path / "c.pth"), str(tmp_path / "p.pth")
    pgnm.atomic_save({"v": torch.tensor(1)}, p, prev)
    pgnm.atomic_save({"v": torch.tensor(2)}, p, prev)
    assert pgnm.safe_load(p)["v"].item() == 2 and pgnm.safe_load(prev)["v"].item() == 1
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def _three_trained_looking_state_dicts():
    """Three resnet10t state dicts with different weights, BatchNorm statistics and batch counts (int64)."""
    sds = []
    for i, count in enumerate((87 * 5, 88 * 5, 89 * 5 + 2)):
        torch.manual_seed(i)
        m = pgnm.resnet10t(num_classes=7)
        with torch.no_grad():
            for b in m.buffers():
                b.copy_(torch.rand(b.shape) * 3 if b.is_floating_point() else torch.full(b.shape, count))
        sds.append(m.state_dict())
    return sds


def test_average_state_dicts_equals_a_hand_average_and_loads_strictly():
    import functools
    import operator
    sds = _three_trained_looking_state_dicts()
    avg = pgnm.average_state_dicts(sds)
    assert list(avg) == list(sds[0])                                            # keys and their order kept
    for k, v in avg.items():
        assert v.dtype == sds[0][k].dtype and v.shape == sds[0][k].shape, k
        if v.is_floating_point():
            assert torch.equal(v, (sds[0][k] + sds[1][k] + sds[2][k]) / 3), k  # the hand average, bit for bit
        else:
            assert int(v) == (87 * 5 + 88 * 5 + 89 * 5 + 2) // 3 == 440, k     # floor of the mean 440.67
    pgnm.resnet10t(num_classes=7).load_state_dict(avg, strict=True)
    # The authors' rule (sum, then divide every tensor by N) makes the count a float 440.67; loading it into a model
    # truncates to the count ours stores.
    theirs = {k: functools.reduce(operator.add, (sd[k] for sd in sds)) / len(sds) for k in sds[0]}
    loaded = pgnm.resnet10t(num_classes=7)
    loaded.load_state_dict(theirs, strict=True)
    assert all(torch.equal(loaded.state_dict()[k], avg[k]) for k in avg)
    with pytest.raises(pgnm.UserError, match="other keys"):
        pgnm.average_state_dicts([sds[0], {k: v for k, v in sds[1].items() if k != "fc.bias"}])
    with pytest.raises(pgnm.UserError, match="shape or dtype"):
        pgnm.average_state_dicts([sds[0], pgnm.resnet10t(num_classes=5).state_dict()])


def test_average_cli_reads_the_authors_epoch_files(tmp_path):
    """`pgnm.py --average` on files laid out like the authors' model_<epoch>.pth (a 'model' key with torch.compile's
    '_orig_mod.' prefix, argparse args)."""
    sds = _three_trained_looking_state_dicts()
    paths = []
    for epoch, sd in zip((87, 88, 89), sds):
        paths.append(str(tmp_path / f"model_{epoch}.pth"))
        torch.save({"model": {f"_orig_mod.{k}": v for k, v in sd.items()}, "epoch": epoch,
                    "args": argparse.Namespace(lr=0.1)}, paths[-1])
    assert pgnm.cli(["--average", *paths]) == 0
    out = torch.load(tmp_path / "model_avg3.pth", weights_only=True)
    expected = pgnm.average_state_dicts(sds)
    assert list(out) == list(expected) and all(torch.equal(out[k], expected[k]) for k in out)


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_weights_that_are_not_a_torch_file_are_one_line_with_no_weights_only_false_advice(tmp_path, capsys):
    """An empty file once raised IndexError (a traceback) in --average, --finetune, --resume and evaluate.py; a JSON
    file got torch's advice to load with weights_only=False; --resume advised a checkpoint_prev.pth that did not
    exist."""
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "config.json").write_text('{"lr": 0.1}')
    for name, why in (("empty.pth", "the file is empty"), ("config.json", "not a PyTorch file")):
        p = str(tmp_path / name)
        assert pgnm.cli(["--average", p, "--average-output", str(tmp_path / "a.pth")]) == 2
        err = _one_error_line(capsys)
        assert p in err and why in err and "weights_only" not in err, err
        assert pgnm.cli([*TINY_CLI, "--output-dir", str(tmp_path / "o"), "--resume", p]) == 2
        err = _one_error_line(capsys)
        assert why in err and "checkpoint_prev" not in err and "give a checkpoint.pth" in err, err
    import evaluate
    assert evaluate.cli(["--checkpoints", str(tmp_path / "empty.pth"), "--output-dir", str(tmp_path / "e")]) == 2
    assert "the file is empty" in _one_error_line(capsys)


def test_average_refuses_nan_weights_and_names_the_file_that_does_not_fit(tmp_path, capsys):
    sds = _three_trained_looking_state_dicts()
    good, nan, other = (str(tmp_path / n) for n in ("good.pth", "nan.pth", "other.pth"))
    torch.save(sds[0], good)
    torch.save({k: (v.clone().fill_(float("nan")) if k == "fc.bias" else v) for k, v in sds[1].items()}, nan)
    torch.save(pgnm.resnet10t(num_classes=3).state_dict(), other)
    out = tmp_path / "avg.pth"
    assert pgnm.cli(["--average", good, nan, "--average-output", str(out)]) == 2
    err = _one_error_line(capsys)
    assert nan in err and "fc.bias" in err and "NaN" in err and not out.exists(), err
    assert pgnm.cli(["--average", good, other, "--average-output", str(out)]) == 2
    err = _one_error_line(capsys)
    assert other in err and good in err and not out.exists(), err
    torch.save(sds[1], nan)                                                                   # finite now
    assert pgnm.cli(["--average", good, nan, "--average-output", str(tmp_path)]) == 2      # a folder in the way
    err = _one_error_line(capsys)
    assert "--resume" not in err and "run the command again" in err, err


def test_summary_lists_the_epoch_weights_average_last_keeps(tmp_path):
    """--average-last wrote epoch_weights/model_epochNNN.pth, which the end summary's file list left out."""
    import time
    cfg = tiny(output_dir=str(tmp_path), epochs=2, average_last=2)
    started = time.time()
    os.makedirs(tmp_path / "epoch_weights")
    for name in ("model_heated.pth", "model_heated_avg2.pth", "log.jsonl", ".lock", "epoch_weights/model_epoch001.pth",
                 "epoch_weights/model_epoch002.pth"):
        (tmp_path / name).write_bytes(b"x")
    lines = []
    pgnm.log_summary(cfg, {"test_acc": 0.5}, 1.0, pgnm.written_since(str(tmp_path), started), lines.append)
    rows = [ln.split() for ln in lines if ln.startswith("  ")]             # PATH what | FIRST .. LAST (N files) what
    listed = [p for w in rows for p in ([w[0], w[2]] if w[1] == ".." else [w[0]])]
    assert os.path.join(str(tmp_path), "epoch_weights/model_epoch002.pth") in listed, lines
    assert len(listed) == 5 and all(os.path.isfile(p) for p in listed), lines


def test_average_last_survives_a_kill_and_counts_clamps_across_a_resume(tmp_path, monkeypatch, capsys):
    """--average-last 2 on a 2-epoch heated run, straight and killed mid-epoch 2 then resumed: the same averaged
    file, equal to the hand average of the kept epoch files; the epoch's clamp count carried over the resume.
    Concentrations are scaled by 0.3 (so the clamp binds) in both runs."""
    real_beta = pgnm.beta_distribution
    monkeypatch.setattr(pgnm, "beta_distribution", lambda a, b: real_beta(a + math.log(0.3), b + math.log(0.3)))
    kw = dict(epochs=2, average_last=2, save_every_steps=3, synthetic_per_class=2)     # 6 steps per epoch
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    pgnm.main(tiny(output_dir=straight, **kw))
    printed = capsys.readouterr().out               # the summary names the kept epoch files and the average
    assert (f"  {pgnm.epoch_weights_path(straight, 1)} .. {pgnm.epoch_weights_path(straight, 2)}  (2 files) "
            in printed and f"  {os.path.join(straight, 'model_heated_avg2.pth')} " in printed), printed
    kept = [torch.load(pgnm.epoch_weights_path(straight, e), weights_only=True) for e in (1, 2)]
    avg = torch.load(os.path.join(straight, "model_heated_avg2.pth"), weights_only=True)
    final = torch.load(os.path.join(straight, "model_heated.pth"), weights_only=True)
    assert all(torch.equal(final[k], kept[1][k]) for k in final)                # epoch 2's file is the final model
    assert all(torch.equal(avg[k], (kept[0][k] + kept[1][k]) / 2) for k in avg if avg[k].is_floating_point())

    class Killed(Exception):
        pass
    real_save = pgnm.save_checkpoint

    def save_then_die(run, state, epoch, step, *a):
        real_save(run, state, epoch, step, *a)
        if epoch == 1 and step == 3:
            raise Killed
    monkeypatch.setattr(pgnm, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        pgnm.main(tiny(output_dir=killed, **kw))
    assert not os.path.exists(os.path.join(killed, "model_heated_avg2.pth"))
    monkeypatch.setattr(pgnm, "save_checkpoint", real_save)
    pgnm.main(tiny(output_dir=killed, resume="auto", **kw))
    resumed = torch.load(os.path.join(killed, "model_heated_avg2.pth"), weights_only=True)
    assert list(resumed) == list(avg) and all(torch.equal(resumed[k], avg[k]) for k in avg)
    a = [r for r in read_log(straight) if not r.get("final")]
    b = [r for r in read_log(killed) if not r.get("final")]
    assert [r["clamped_elements"] for r in a] == [r["clamped_elements"] for r in b]
    assert all(r["clamped_elements"] > 0 and 0 < r["clamped_fraction"] < 1 for r in a)
    assert a[1]["clamped_fraction"] == a[1]["clamped_elements"] / (6 * 8 * 64)     # 6 steps x 8 images x 8 x 8


# =====================================================================================================================
#  Data
# =====================================================================================================================


def test_to_rgb8_every_mode():
    a16 = np.array([[1000, 2000], [3000, 4095]], dtype=np.uint16)           # 12 bits used of 16
    out = np.asarray(pgnm.to_rgb8(Image.fromarray(a16)))
    assert out.shape == (2, 2, 3) and out[0, 0, 0] == 0 and out[1, 1, 0] == 255   # scaled by range, not clipped
    assert out[0, 1, 0] == round((2000 - 1000) * 255 / 3095)
    rgba = Image.fromarray(np.dstack([np.full((2, 2), 10, np.uint8), np.full((2, 2), 20, np.uint8),
                                      np.full((2, 2), 30, np.uint8), np.zeros((2, 2), np.uint8)]), "RGBA")
    assert np.asarray(pgnm.to_rgb8(rgba))[0, 0].tolist() == [10, 20, 30]
    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    assert np.asarray(pgnm.to_rgb8(pal))[0, 1].tolist() == [0, 0, 255]
    la = Image.fromarray(np.array([[7, 8], [9, 10]], np.uint8)).convert("LA")
    assert np.asarray(pgnm.to_rgb8(la))[1, 1].tolist() == [10, 10, 10]
    f = Image.fromarray(np.array([[-1.0, 1.0], [0.0, 0.5]], np.float32), "F")
    assert np.asarray(pgnm.to_rgb8(f))[:, :, 0].tolist() == [[0, 255], [128, 191]]
    flat = Image.fromarray(np.full((3, 3), 500, np.uint16))
    assert np.asarray(pgnm.to_rgb8(flat)).max() == 0
    assert pgnm.to_rgb8(Image.new("1", (3, 3), 1)).mode == "RGB"


def test_sixteen_bit_is_scaled_where_the_authors_loader_clips(tmp_path):
    """README, 'Where we differ': torchvision's default ImageFolder loader (the authors') clips 16-bit pixels at 255;
    ours scales by the image's range."""
    from torchvision.datasets.folder import default_loader
    path = str(tmp_path / "ct16.png")
    Image.fromarray(np.array([[0, 100, 255, 1000, 4095]], dtype=np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"
    assert np.asarray(default_loader(path))[0, :, 0].tolist() == [0, 100, 255, 255, 255]
    assert pgnm.load_image(path)[0, 0].tolist() == [0, 6, 16, 62, 255]


def _write_imagefolder(root, classes=("a", "b", "c"), per=6, size=40, modes=("L", "RGB", "I;16", "RGBA", "P")):
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for k, c in enumerate(classes):
            d = os.path.join(root, split, c)
            os.makedirs(d, exist_ok=True)
            for i in range(per):
                mode = modes[(i + k) % len(modes)]
                base = (rng.random((size, size)) * 60 + 60 * k).astype(np.uint8)
                if mode == "L":
                    img = Image.fromarray(base)
                elif mode == "RGB":
                    img = Image.fromarray(np.dstack([base] * 3))
                elif mode == "I;16":
                    img = Image.fromarray(base.astype(np.uint16) * 16)
                elif mode == "RGBA":
                    img = Image.fromarray(np.dstack([base] * 3 + [np.full_like(base, 255)]), "RGBA")
                else:
                    img = Image.fromarray(base).convert("P")
                img.save(os.path.join(d, f"{i}.png"))


def test_imagefolder_every_mode_end_to_end(tmp_path):
    root = str(tmp_path / "data")
    _write_imagefolder(root)
    res = pgnm.main(tiny("baseline", data_path=root, batch_size=6, output_dir=str(tmp_path / "out")))
    assert res["val_n"] == 18 and res["test_n"] == 18
    ds = pgnm.ImageFolderDataset(os.path.join(root, "train"))
    assert ds.classes == ["a", "b", "c"] and len(ds) == 18
    assert all(ds.decode(i).shape[0] == 3 and ds.decode(i).dtype == torch.uint8 for i in range(len(ds)))


def _write_npz(path, merged=False, n=60, size=28, rgb=False, multilabel=False, drop=None):
    rng = np.random.default_rng(0)
    shape = (n, size, size, 3) if rgb else (n, size, size)
    imgs = rng.integers(0, 255, shape, dtype=np.uint8)
    labels = rng.integers(0, 2, (n, 14)) if multilabel else (np.arange(n) % 3).reshape(n, 1)
    if merged:
        d = {"images": imgs, "labels": labels}
    else:
        d = {f"{s}_{k}": v for s in ("train", "val", "test") for k, v in (("images", imgs), ("labels", labels))}
    for k in drop or ():
        d.pop(k)
    np.savez(path, **d)


@pytest.mark.parametrize("merged,rgb", [(False, False), (True, True)])
def test_npz_layouts(tmp_path, merged, rgb):
    p = str(tmp_path / "d.npz")
    _write_npz(p, merged=merged, rgb=rgb)
    splits = pgnm.load_npz(p, 0.1, 0)
    if merged:     # seeded stratified split: 20 per class -> 16/2/2
        assert [len(splits[s][0]) for s in ("train", "val", "test")] == [48, 6, 6]
        assert all(np.bincount(splits[s][1].ravel()).tolist() == [n] * 3
                   for s, n in (("train", 16), ("val", 2), ("test", 2)))
        again = pgnm.load_npz(p, 0.1, 0)
        assert np.array_equal(again["val"][0], splits["val"][0])
    res = pgnm.main(tiny("baseline", data_path=p, train_crop_size=28, val_resize_size=28, val_crop_size=28,
                         grid=7, output_dir=str(tmp_path / "o")))
    assert res["val_n"] == (6 if merged else 60)


def test_synthetic_set_is_deterministic_and_heterogeneous():
    a, la, classes = pgnm.synthetic_arrays(2, 64, 0, "train")
    b, lb, _ = pgnm.synthetic_arrays(2, 64, 0, "train")
    assert np.array_equal(a, b) and np.array_equal(la, lb) and len(classes) == 24
    c, _, _ = pgnm.synthetic_arrays(2, 64, 1, "train")
    assert not np.array_equal(a, c)
    unseen = pgnm.synthetic_classes(unseen=True)
    assert not set(unseen) & set(classes) and len(unseen) == 16
    # low-level heterogeneity: each modality has its own histogram (mean and share of black pixels differ)
    stats = {}
    for m in pgnm.SYN_MODALITIES:
        idx = [i for i, t in enumerate(la) if classes[t].startswith(m)]
        px = a[idx].astype(float)
        stats[m] = (px.mean(), (px < 5).mean())
    means = sorted(s[0] for s in stats.values())
    assert min(np.diff(means)) > 3, stats
    assert stats["US"][1] > 0.3 and stats["XR"][1] < 0.2, stats


def test_augmentation_is_a_function_of_seed_epoch_index():
    images, labels, classes = pgnm.synthetic_arrays(1, 32, 0, "train")
    ds = pgnm.ArrayDataset(images, labels, classes, pgnm.build_transform(tiny(), True), seed=5)
    state = torch.get_rng_state()
    x1, _ = ds[(3, 7)]
    assert torch.equal(torch.get_rng_state(), state)       # the caller's random stream is untouched
    torch.manual_seed(123)
    x2, _ = ds[(3, 7)]
    x3, _ = ds[(4, 7)]
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)


def test_seeding_a_sample_or_a_batch_draws_as_manual_seed_on_the_cpu_and_never_reseeds_a_gpu(monkeypatch):
    """cpu_rng draws what torch.manual_seed draws on the CPU (runs from before it augment alike) and restores the
    caller's stream; the loader's per-image seed and the batch's MixUp/CutMix seed never reach a GPU generator
    (torch.manual_seed reseeded them every step, the same on every rank, and cost a third of a worker's time)."""
    torch.manual_seed(11)
    want = torch.rand(5)
    state = torch.get_rng_state()
    with pgnm.cpu_rng(np.int64(11)):                  # numpy seeds too, as torch.manual_seed takes them
        got = torch.rand(5)
    assert torch.equal(got, want) and torch.equal(torch.get_rng_state(), state)

    def reseeded(*a):
        raise AssertionError("a GPU generator was reseeded")
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded)
    monkeypatch.setattr(torch.cuda, "manual_seed", reseeded)
    images, labels, classes = pgnm.synthetic_arrays(1, 32, 0, "train")
    ds = pgnm.ArrayDataset(images, labels, classes, pgnm.build_transform(tiny(), True), seed=5)
    assert not torch.equal(ds[(0, 1)][0], ds[(1, 1)][0])
    cfg = tiny("finetune", mixup_alpha=0.2, cutmix_alpha=1.0)
    model = pgnm.build_model("resnet10t", 4)
    run = pgnm.Run(cfg, pgnm.DistInfo(), model, torch.optim.SGD(model.parameters(), 0.1),
                   mixup=pgnm.build_mixup(cfg, 4))
    x, y = torch.rand(4, 3, 8, 8), torch.arange(4)
    (x1, y1), (x2, _) = pgnm.device_batch(run, x, y, 0, 3), pgnm.device_batch(run, x, y, 0, 3)
    assert torch.equal(x1, x2) and y1.shape == (4, 4) and not torch.equal(x1, x)


def test_train_sampler_splits_ranks_and_resumes():
    full = [list(pgnm.TrainSampler(50, 4, r, 2, seed=1)) for r in range(2)]
    assert len(full[0]) == len(full[1]) == 24                          # 25 per rank -> 6 full batches
    assert not {i for _, i in full[0]} & {i for _, i in full[1]}
    s = pgnm.TrainSampler(50, 4, 0, 2, seed=1)
    s.set_epoch(0, start_batch=2)
    assert list(s) == full[0][8:] and len(s) == 16
    s.set_epoch(1)
    assert list(s) != full[0] and all(e == 1 for e, _ in s)


# =====================================================================================================================
#  Bad input: one clear line, never a traceback
# =====================================================================================================================


def run_cli(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, os.path.join(HERE, "pgnm.py"), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def _assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err


def test_cli_bad_input_is_one_line_in_a_real_process(tmp_path):
    _assert_one_line_error(run_cli("--data-path", str(tmp_path / "nope")), "does not exist")


@pytest.mark.parametrize("args,needles", [
    (["--data-path", "{tmp}/nope"], ["does not exist"]),
    (["--data-path", "{tmp}/empty"], ["train/ and val/"]),
    (["--data-path", "{tmp}/file.txt"], ["must be a MedMNIST .npz"]),
    (["--grid", "80"], ["--grid 80", "crop"]),
    (["--kernel", "4"], ["--kernel 4", "odd"]),
    (["--kernel", "201"], ["--kernel 201", "too large"]),
    (["--model", "vit"], ["--model"]),
    (["--phase", "pretrain"], ["--phase"]),
    (["--batch-size", "0"], ["--batch-size 0"]),
    (["--batch-size", "4096"], ["fewer than one batch"]),
    (["--resume", "{tmp}/nope.pth"], ["--resume", "does not exist"]),
    (["--finetune", "{tmp}/nope.pth"], ["--finetune", "does not exist"]),
])
def test_cli_bad_inputs_are_one_line(tmp_path, capsys, args, needles):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code = pgnm.cli([*args, "--output-dir", str(tmp_path / "o"), "--synthetic-per-class", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    for n in needles:
        assert n in err, err


# Every numeric flag out of its range, NaN/inf, unknown choices and unparsable values: exit 2, one stderr line that
# names the flag, nothing created, before any data is read (the output folder must not even appear).
BAD_FLAGS = [
    (["--val-resize-size", "0"], "--val-resize-size 0"), (["--val-crop-size", "-1"], "--val-crop-size -1"),
    (["--train-crop-size", "0"], "--train-crop-size 0"), (["--lr-step-size", "0"], "--lr-step-size 0"),
    (["--print-freq", "0"], "--print-freq 0"), (["--label-smoothing", "2"], "--label-smoothing 2"),
    (["--label-smoothing", "-0.1"], "--label-smoothing -0.1"), (["--momentum", "-0.5"], "--momentum -0.5"),
    (["--momentum", "1"], "--momentum 1"), (["--wd", "-1"], "--weight-decay -1"),
    (["--policy-lr-ratio", "-1"], "--policy-lr-ratio -1"), (["--lr-warmup-decay", "0"], "--lr-warmup-decay 0"),
    (["--lr-warmup-epochs", "-1"], "--lr-warmup-epochs -1"), (["--std", "0"], "--std 0"),
    (["--mean", "nan"], "--mean nan"), (["--device", "tpu"], "--device 'tpu'"),
    (["--device", "cuda:x"], "--device 'cuda:x'"), (["--clip-grad-norm", "-1"], "--clip-grad-norm -1"),
    (["--clip-grad-norm", "0"], "--clip-grad-norm 0"), (["--lr", "inf"], "--lr inf"), (["--lr", "nan"], "--lr nan"),
    (["--lr", "-0.1"], "--lr -0.1"), (["--lr-gamma", "-0.1"], "--lr-gamma -0.1"), (["--lr-gamma", "0"], "--lr-gamma 0"),
    (["--lr-min", "-1"], "--lr-min -1"), (["--lr-min", "5"], "--lr-min 5"), (["--epochs", "0"], "--epochs 0"),
    (["--seed", "-1"], "--seed -1"), (["--workers", "-1"], "--workers -1"), (["--sigma", "inf"], "--sigma inf"),
    (["--sigma", "0"], "--sigma 0"), (["--tau-image", "1.5"], "--tau-image 1.5"),
    (["--tau-dataset", "nan"], "--tau-dataset nan"), (["--crop-scale-min", "0"], "--crop-scale-min 0"),
    (["--val-split", "0.5"], "--val-split 0.5"), (["--max-bad-steps", "0"], "--max-bad-steps 0"),
    (["--save-every-steps", "-1"], "--save-every-steps -1"), (["--mixup-alpha", "-1"], "--mixup-alpha -1"),
    (["--cutmix-alpha", "inf"], "--cutmix-alpha inf"), (["--num-classes", "1"], "--num-classes 1"),
    (["--policy-size", "8"], "--policy-size 8"), (["--auto-augment", "ra", "--ra-magnitude", "31"], "--ra-magnitude 31"),
    (["--auto-augment", "augmix", "--augmix-severity", "0"], "--augmix-severity 0"), (["--synthetic-size", "8"], "--synthetic-size 8"),
    (["--synthetic-per-class", "0"], "--synthetic-per-class 0"), (["--grid", "0"], "--grid 0"),
    (["--kernel", "-3"], "--kernel -3"), (["--amp-dtype", "float8"], "--amp-dtype"),
    (["--interpolation", "lanczos"], "--interpolation"), (["--lr-warmup-method", "cosine"], "--lr-warmup-method"),
    (["--objective", "x"], "--objective"), (["--noise", "salt"], "--noise"),
    (["--auto-augment", "x"], "--auto-augment"),
    (["--policy-model", "vit"], "--policy-model"), (["--resume", ""], "--resume ''"),
    (["--lr", "abc"], "--lr"), (["--batch-size", "1.5"], "--batch-size"), (["--no-such-flag"], "--no-such-flag"),
    (["--data-path", ""], "--data-path ''"), (["--finetune", ""], "--finetune ''"),   # synthetic data, random init
    (["--average-output", "x.pth"], "--average-output only goes with --average"),    # a training run started
    (["--bench-rounds", "3"], "--bench-rounds only goes with --bench"),
    (["--bench", "--bench-rounds", "0"], "--bench-rounds 0"),                         # IndexError traceback
    (["--bench-e2e", "x", "--bench-steps", "0"], "--bench-steps 0"),
    (["--average", "a.pth", "--epochs", "3"], "--average does not use --epochs"),    # the flags were ignored
    (["--bench", "--phase", "finetune"], "--bench does not use --phase"),            # it timed the heated step
    (["--bench", "--data-path", "x"], "--bench does not use --data-path"),           # it timed random batches
    (["--bench-e2e", "x", "--phase", "baseline"], "--bench-e2e does not use --phase"),
    (["--average", "a.pth", "--phase", "heated"], "--average does not use --phase"),  # these four ran, exit 0
    (["--bench-e2e", "x", "--data-path", "y"], "--bench-e2e does not use --data-path"),
    (["--bench-e2e", "x", "--resume", "auto", "--epochs", "9"], "--bench-e2e does not use --resume, --epochs"),
    (["--bench-data", "x", "--output-dir", "o", "--finetune", "f"], "--bench-data does not use --finetune, --output-dir"),
    (["--bench", "--bench-e2e", "x"], "--bench and --bench-e2e: give one of them"),  # one ran, one was ignored
    (["--average", "a.pth", "--bench"], "--average and --bench: give one of them"),
    (["--bench-e2e", "no_such_dir"], "--bench-e2e no_such_dir does not exist"),          # it said --data-path
    (["--val-crop-size", "48", "--val-resize-size", "32"], "--val-crop-size 48 is larger than --val-resize-size 32"),
    (["--bench-data", "x", "--bench-steps", "3"], "--bench-data does not read it"),
    (["--phase", "baseline", "--noise", "uniform"], "--noise not used by --phase baseline"),   # looked like Table 4
    (["--phase", "finetune", "--grid", "8"], "--grid not used by --phase finetune"),
    (["--noise", "gaussian", "--objective", "reinforce"], "--objective not used by --noise gaussian"),
    (["--amp-dtype", "bfloat16"], "--amp-dtype not used by a run without --amp"),
    (["--compile-mode", "reduce-overhead"], "--compile-mode not used by a run without --compile"),
    (["--auto-augment", "ra", "--augmix-severity", "2"], "--augmix-severity not used by a run without --auto-augment augmix"),
]


@pytest.mark.parametrize("args,needle", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_every_bad_flag_is_one_line_before_any_work(tmp_path, capsys, args, needle):
    out = tmp_path / "o"
    try:
        code = pgnm.cli([*args, "--output-dir", str(out)])
    except SystemExit as e:                     # argparse's own refusals (unparsable value, unknown flag)
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert needle in err and "Traceback" not in err, err
    assert "e.g. -" not in err, err                          # --kernel -3 once suggested "e.g. -2"
    if "crop-size" in needle or "resize-size" in needle:
        assert "--grid" not in err, err                      # a zero crop was blamed on --grid
    assert not out.exists()


def test_output_dir_that_is_a_file_and_a_resume_folder(tmp_path, capsys):
    f = tmp_path / "f"
    f.write_text("x")
    assert pgnm.cli(["--output-dir", str(f)]) == 2
    assert "--output-dir" in capsys.readouterr().err
    assert pgnm.cli(["--resume", str(tmp_path), "--output-dir", str(tmp_path / "o"), "--synthetic-per-class", "2",
                     "--synthetic-size", "32", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a folder" in err and "does not exist" not in err, err


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def _bad_npz_cases():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (12, 28, 28), dtype=np.uint8)
    ok = (np.arange(12) % 3).reshape(12, 1)

    def official(**over):
        d = {f"{s}_{k}": v for s in ("train", "val", "test") for k, v in (("images", imgs), ("labels", ok))}
        d.update(over)
        return d
    nan = ok.astype(float)
    nan[3] = np.nan
    frac = ok.astype(float)
    frac[0] = 0.7
    return {
        "nan_labels": (official(train_labels=nan), ["train_labels", "whole numbers", "nan"]),
        "fractional_labels": (official(val_labels=frac), ["val_labels", "whole numbers", "0.7"]),
        "string_labels": (official(train_labels=np.array(["a"] * 12)), ["train_labels", "integers", "<U1"]),
        "object_labels": (official(test_labels=np.array([1, "x"] * 6, dtype=object)), ["test_labels"]),
        "0d_labels": (official(train_labels=np.array(3)), ["train_labels", "shape ()"]),
        "negative_labels": (official(val_labels=ok - 1), ["val_labels", ">= 0", "-1"]),
        "empty_val": (official(val_images=imgs[:0], val_labels=ok[:0]), ["val split has no images"]),
        "single_class": (official(train_labels=np.zeros((12, 1), int)), ["one class only", "at least two"]),
        "float_images": (official(train_images=imgs.astype(np.float32)), ["train images must be uint8"]),
        "merged_val_empty": ({"images": imgs, "labels": ok}, ["--val-split 0.1", "val/test split", "empty"]),
    }


@pytest.mark.parametrize("case", list(_bad_npz_cases()))
def test_bad_npz_is_one_line_naming_file_and_split(tmp_path, capsys, case):
    arrays, needles = _bad_npz_cases()[case]
    p = _npz(tmp_path / f"{case}.npz", **arrays)
    code = pgnm.cli(["--data-path", p, "--output-dir", str(tmp_path / "o"), "--train-crop-size", "28",
                     "--val-resize-size", "28", "--val-crop-size", "28", "--grid", "7", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert os.path.basename(p) in err and "-9223372036854775808" not in err, err
    for n in needles:
        assert n in err, err


def test_npz_float_labels_holding_whole_numbers_are_accepted(tmp_path):
    labels = (np.arange(12) % 3).astype(np.float64)
    assert pgnm.npz_labels(labels, "x.npz", "train").dtype == np.int64
    assert pgnm.npz_labels(labels, "x.npz", "train").tolist() == (np.arange(12) % 3).tolist()


def test_float_image_with_nan_pixels_keeps_its_contrast():
    a = np.linspace(0.0, 100.0, 64, dtype=np.float32).reshape(8, 8)
    a[0, 1], a[0, 2], a[0, 3] = np.nan, np.inf, -np.inf
    out = np.asarray(pgnm.to_8bit(Image.fromarray(a, mode="F")))
    assert out[7, 7] == 255 and out[4, 4] == round(float(a[4, 4]) * 2.55)     # scaled by the finite range
    assert out[0, 1] == 0 and out[0, 2] == 255 and out[0, 3] == 0              # NaN/-inf -> 0, +inf -> 255
    assert np.asarray(pgnm.to_8bit(Image.fromarray(np.full((3, 3), np.nan, np.float32), "F"))).max() == 0


def _link_tree(root):
    _write_imagefolder(root, classes=("a", "b"), per=2, size=8, modes=("L",))
    return os.path.join(root, "train")


@pytest.mark.parametrize("case", ["parent_loop", "self_loop", "out_of_root", "into_other_split", "file_twice",
                                  "folder_twice"])
def test_symbolic_links_in_the_data_tree_never_loop_leave_or_count_twice(tmp_path, case):
    train = _link_tree(str(tmp_path / "d"))
    a, b = os.path.join(train, "a"), os.path.join(train, "b")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(outside / "x.png")
    if case == "parent_loop":                   # ln -s .. train/a/again: b's images would count as a's
        os.symlink("..", os.path.join(a, "again"))
    elif case == "self_loop":                   # ln -s . train/a/x: a's images counted 40 times
        os.symlink(".", os.path.join(a, "x"))
    elif case == "out_of_root":
        os.symlink(str(outside / "x.png"), os.path.join(a, "x.png"))
    elif case == "into_other_split":
        os.symlink(os.path.join(str(tmp_path / "d"), "val", "a"), os.path.join(a, "val_a"))
    elif case == "file_twice":                  # the same image in two classes
        os.symlink(os.path.join(a, "0.png"), os.path.join(b, "dup.png"))
    else:
        os.makedirs(os.path.join(train, ".shared"))
        os.symlink(os.path.join(train, ".shared"), os.path.join(a, "s1"))
        os.symlink(os.path.join(train, ".shared"), os.path.join(b, "s2"))
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(os.path.join(train, ".shared", "y.png"))
    with pytest.raises(pgnm.UserError, match="symbolic link|again|same file|counted already"):
        pgnm.ImageFolderDataset(train)


def test_symbolic_links_inside_the_split_are_followed_once(tmp_path):
    train = _link_tree(str(tmp_path / "d"))
    store = os.path.join(train, ".store")       # not a class (hidden): a link farm inside the split
    os.makedirs(store)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(os.path.join(store, "z.png"))
    os.symlink(os.path.join(store, "z.png"), os.path.join(train, "a", "z.png"))
    os.symlink(os.path.join(train, "b"), os.path.join(str(tmp_path / "d"), "train_b_link"))   # outside: unused
    ds = pgnm.ImageFolderDataset(train)
    assert ds.classes == ["a", "b"] and len(ds) == 5 and ds.targets.count(0) == 3


def test_split_folders_must_not_overlap(tmp_path, capsys):
    root = str(tmp_path / "d")
    _link_tree(root)
    shutil.rmtree(os.path.join(root, "val"))
    os.symlink(os.path.join(root, "train"), os.path.join(root, "val"))
    code = pgnm.cli(["--data-path", root, "--output-dir", str(tmp_path / "o"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "splits must not share" in err, err


def _authors_checkpoint(path, with_optimizer=True):
    """The authors' train.py layout: DDP-prefixed weights, one SGD over both networks, 'args' an argparse.Namespace."""
    model, policy = pgnm.build_model("resnet10t", 24), pgnm.PolicyNet(8)
    opt = torch.optim.SGD(list(model.parameters()) + list(policy.parameters()), lr=0.1, momentum=0.9)
    ck = {"model": {f"module.{k}": v for k, v in model.state_dict().items()},
          "policy_net": policy.state_dict(), "main_lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 30).state_dict(),
          "base_alpha": torch.rand(1, 64), "base_beta": torch.rand(1, 64), "epoch": 3,
          "args": argparse.Namespace(lr=0.1, grid=8, model="resnet10t", epochs=90)}
    if with_optimizer:
        ck["optimizer"] = opt.state_dict()
    torch.save(ck, path)
    return str(path)


@pytest.mark.parametrize("kind", ["authors", "weights_only", "no_optimizer", "not_a_dict"])
def test_resume_from_a_foreign_checkpoint_is_one_line_suggesting_finetune(tmp_path, capsys, kind):
    p = tmp_path / "c.pth"
    if kind == "authors":
        _authors_checkpoint(p)
    elif kind == "weights_only":
        torch.save(pgnm.build_model("resnet10t", 24).state_dict(), p)
    elif kind == "no_optimizer":
        ck = {"model": pgnm.build_model("resnet10t", 24).state_dict(), "epoch": 0, "step": 1, "args": {},
              "main_lr_scheduler": {}}
        torch.save(ck, p)
    else:
        torch.save([torch.zeros(1)], p)
    code = pgnm.cli(["--resume", str(p), "--output-dir", str(tmp_path / "o"), *TINY_CLI])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"--finetune {p}" in err and ("authors'" in err) == (kind == "authors"), err
    assert not (tmp_path / "o" / "checkpoint.pth").exists()


@pytest.mark.parametrize("damage", [{"model": [1, 2]}, {"model": {7: torch.zeros(1)}}, {"epoch": "3"},
                                    {"optimizer": None}, {"args": "lr=0.1"}, {"epoch": True}, {"epoch": {}},
                                    {"policy_net": [1]}, {"model": {"conv1.weight": "x"}}])
def test_resume_from_a_checkpoint_with_a_damaged_entry_is_one_line(tmp_path, capsys, damage):
    """A checkpoint with every key but one of the wrong kind (written by hand or another program) ended in a bare
    AttributeError traceback half-way through the restore."""
    ck = {"model": pgnm.build_model("resnet10t", 24).state_dict(), "optimizer": {}, "main_lr_scheduler": {},
          "epoch": 0, "step": 1, "args": {}, **damage}
    torch.save(ck, tmp_path / "c.pth")
    code = pgnm.cli(["--resume", str(tmp_path / "c.pth"), "--output-dir", str(tmp_path / "o"), *TINY_CLI])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"c.pth is damaged: its '{next(iter(damage))}' is not what pgnm.py writes" in err, err
    assert not (tmp_path / "o" / "checkpoint.pth").exists()


def test_finetune_from_nan_weights_is_refused(tmp_path, capsys):
    sd = pgnm.build_model("resnet10t", 24).state_dict()
    sd["layer1.0.conv1.weight"][0] = float("nan")
    torch.save(sd, tmp_path / "nan.pth")
    code = pgnm.cli([*TINY_CLI, "--finetune", str(tmp_path / "nan.pth"), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "layer1.0.conv1.weight" in err and "NaN/inf" in err, err


def test_the_authors_checkpoint_can_start_a_run_through_finetune(tmp_path):
    sd = pgnm.load_classifier_weights(_authors_checkpoint(tmp_path / "c.pth", with_optimizer=False))
    m = pgnm.build_model("resnet10t", 24)
    pgnm.load_into_classifier(m, sd, "c.pth", "resnet10t", log=lambda *_: None)


def test_class_folder_without_images(tmp_path):
    root = str(tmp_path / "d")
    _write_imagefolder(root, per=2)
    os.makedirs(os.path.join(root, "train", "zzz"))
    with pytest.raises(pgnm.UserError, match="zzz has no images"):
        pgnm.main(tiny(data_path=root, output_dir=str(tmp_path / "o")))


def test_unreadable_image_stops_with_a_hint_or_is_skipped_and_counted(tmp_path):
    root = str(tmp_path / "d")
    _write_imagefolder(root, per=4)
    with open(os.path.join(root, "train", "a", "0.png"), "wb") as fh:
        fh.write(b"not a png")
    proc = run_cli("--phase", "baseline", "--data-path", root, "--batch-size", "4", "--epochs", "1", "--train-crop-size",
                   "32", "--val-crop-size", "32", "--val-resize-size", "32", "--workers", "0",
                   "--output-dir", str(tmp_path / "o"))
    _assert_one_line_error(proc, "0.png", "--skip-bad-images")
    res = pgnm.main(tiny("baseline", data_path=root, batch_size=4, skip_bad_images=True, output_dir=str(tmp_path / "o2")))
    assert res["val_n"] == 12
    assert read_log(str(tmp_path / "o2"))[0]["skipped_images"] == 1


def test_npz_missing_keys_and_multilabel(tmp_path):
    p = str(tmp_path / "bad.npz")
    np.savez(p, x=np.zeros(3))
    with pytest.raises(pgnm.UserError, match="expected train_images"):
        pgnm.load_npz(p)
    _write_npz(p, drop=["val_labels"])
    with pytest.raises(pgnm.UserError, match="val_images but no val_labels"):
        pgnm.load_npz(p)
    _write_npz(p, multilabel=True)
    with pytest.raises(pgnm.UserError, match="multi-label"):
        pgnm.main(tiny(data_path=p, train_crop_size=28, val_crop_size=28, val_resize_size=28, grid=7,
                       output_dir=str(tmp_path / "o")))


def test_finetune_with_wrong_architecture_checkpoint(tmp_path):
    w = tmp_path / "r50.pth"
    torch.save(pgnm.build_model("resnet50", 24).state_dict(), w)
    with pytest.raises(pgnm.UserError, match="looks like resnet50"):
        pgnm.main(tiny("finetune", finetune=str(w), output_dir=str(tmp_path / "o")))


def test_a_policy_networks_weights_given_as_a_classifier_say_so(tmp_path):
    """--finetune (and evaluate's --checkpoints, --average) with the policy's weights, bare, wrapped or in a
    checkpoint whose 'model' is missing, said "pass the --model it was trained with" or "no state_dict": no --model
    fits a PolicyNet."""
    policy = pgnm.PolicyNet(4).state_dict()
    for name, obj in (("bare.pth", policy), ("ddp.pth", {"module." + k: v for k, v in policy.items()}),
                      ("ckpt.pth", {"model": None, "policy_net": policy})):
        torch.save(obj, tmp_path / name)
        with pytest.raises(pgnm.UserError, match="holds the policy network's weights .PolicyNet., not a classifier"):
            pgnm.main(tiny("finetune", finetune=str(tmp_path / name), output_dir=str(tmp_path / "o")))
    for name, obj in (("empty.pth", {}), ("emptymodel.pth", {"model": {}})):   # said "pass the --model ..."
        torch.save(obj, tmp_path / name)
        with pytest.raises(pgnm.UserError, match=f"{name} holds no weights"):
            pgnm.main(tiny("finetune", finetune=str(tmp_path / name), output_dir=str(tmp_path / "o")))
    with pytest.raises(pgnm.UserError, match="bare.pth holds the policy network's weights .PolicyNet., not a checkpoint"):
        pgnm.main(tiny(resume=str(tmp_path / "bare.pth"), output_dir=str(tmp_path / "r")))   # said "use --finetune"
    for name, obj, says in (("intkeys.pth", {"fc.weight": torch.zeros(1), 7: torch.zeros(1)}, "its key 7 is not a name"),
                            ("lists.pth", {"fc.weight": [0.0]}, "its entry 'fc.weight' is a list, not a tensor"),
                            ("alist.pth", [torch.zeros(1)], "it is a list")):   # no crash; the first odd entry named
        torch.save(obj, tmp_path / name)
        with pytest.raises(pgnm.UserError, match=re.escape(f"{name} holds no state_dict of tensors ({says};")):
            pgnm.main(tiny("finetune", finetune=str(tmp_path / name), output_dir=str(tmp_path / "o")))


def test_finetune_without_a_heated_run_says_what_to_do(tmp_path):
    with pytest.raises(pgnm.UserError, match="--phase heated"):
        pgnm.main(tiny("finetune", output_dir=str(tmp_path / "runs" / "finetune")))


def test_import_has_no_side_effects():
    proc = subprocess.run([sys.executable, "-c", "import pgnm"], capture_output=True, text=True, cwd=HERE)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""


def test_pgnm_reads_top_to_bottom_in_functions_of_a_screen():
    """What the README's "Reading pgnm.py" says: no function of the three tools is over 70 lines, and no section of
    pgnm.py uses a name (function, class, constant) that a later section defines."""
    import ast
    for name in ("pgnm.py", "evaluate.py", "refine_radimagenet.py"):
        tree = ast.parse(open(os.path.join(HERE, name)).read())
        long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 70]
        assert not long, (name, long)
    lines = open(os.path.join(HERE, "pgnm.py")).read().splitlines()
    starts = [i + 1 for i in range(len(lines) - 2) if lines[i].startswith("# ===") and lines[i + 2].startswith("# ===")]
    assert len(starts) == 10, starts
    section = lambda line: sum(s <= line for s in starts)       # noqa: E731
    tree = ast.parse("\n".join(lines))
    defined = {}
    for node in tree.body:
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
            [t.id for t in getattr(node, "targets", [getattr(node, "target", None)]) if isinstance(t, ast.Name)]
        defined.update({n: section(node.lineno) for n in names})
    later = [(getattr(node, "name", node.lineno), use.id) for node in tree.body for use in ast.walk(node)
             if isinstance(use, ast.Name) and defined.get(use.id, 0) > section(node.lineno)]
    assert not later, later


# =====================================================================================================================
#  Training: one step, the optimisers and lr schedules, evaluation, --compile, --bench
# =====================================================================================================================


def _classifier_lr(cfg, epoch):
    """SPEC 2.9 and 3 by hand: lr x the warm-up factor (linear from lr_warmup_decay, or constant) for the first
    lr_warmup_epochs epochs, then StepLR counted from the end of the warm-up (torchvision's SequentialLR)."""
    w = cfg.lr_warmup_epochs
    if epoch < w:
        d = cfg.lr_warmup_decay
        return cfg.lr * (d + (1 - d) * epoch / w if cfg.lr_warmup_method == "linear" else d)
    return cfg.lr * cfg.lr_gamma ** ((epoch - w) // cfg.lr_step_size)


def _policy_lr(cfg, epoch):
    """SPEC 2.9 by hand: lr / 10 (policy_lr_ratio), cosine from there to lr_min over all epochs."""
    top = cfg.lr * cfg.policy_lr_ratio
    return cfg.lr_min + (top - cfg.lr_min) * (1 + math.cos(math.pi * epoch / cfg.epochs)) / 2


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
@pytest.mark.parametrize("phase,kw", [("heated", {}), ("baseline", {}), ("finetune", {}),
                                      ("heated", dict(epochs=9, lr=0.3, lr_step_size=3, lr_gamma=0.5, lr_min=0.002,
                                                      lr_warmup_epochs=2, lr_warmup_decay=0.1)),
                                      ("finetune", dict(epochs=6, lr_warmup_epochs=3, lr_warmup_method="constant",
                                                        lr_step_size=2))])
def test_optimisers_and_lr_of_every_epoch_against_a_hand_computation(phase, kw):
    """The paper's recipes (a --data-path run: no synthetic preset) and two custom schedules: classifier SGD
    (momentum 0.9, wd 1e-4) at the hand-computed lr of each epoch, the policy (heated only) at lr/10 on a cosine,
    the schedulers stepped once per epoch as train_epochs steps them."""
    cfg = pgnm.make_config(phase, data_path="unused.npz", model="resnet10t", **kw)
    if not kw:                     # the recipes themselves: SPEC 2.9 (StepLR(30, 0.1), 90 epochs, lr 0.1) and 3
        want = dict(epochs=90, lr=0.1, lr_step_size=30, lr_gamma=0.1, lr_warmup_epochs=0) if phase != "finetune" else \
            dict(epochs=10, lr=0.001, lr_warmup_epochs=7, lr_warmup_method="linear", lr_warmup_decay=0.01)
        assert {k: getattr(cfg, k) for k in want} == want and cfg.policy_lr_ratio == 0.1 and cfg.lr_min == 0
    run, _ = pgnm.build_run(cfg, pgnm.DistInfo(), 24, True, lambda *a: None)   # resuming: no weights to load
    opts = [(run.optimizer, run.scheduler, _classifier_lr)]
    if phase == "heated":
        opts.append((run.pol_optimizer, run.pol_scheduler, _policy_lr))
        assert {id(p) for p in run.pol_optimizer.param_groups[0]["params"]} == {id(p) for p in run.policy.parameters()}
    else:
        assert run.policy is None and run.pol_optimizer is None and run.pol_scheduler is None
    for opt, _, _ in opts:
        assert isinstance(opt, torch.optim.SGD) and len(opt.param_groups) == 1
        assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["weight_decay"] == 1e-4
    seen = {id(opt): [] for opt, _, _ in opts}
    for epoch in range(cfg.epochs):
        for opt, sched, lr_of in opts:
            got = opt.param_groups[0]["lr"]
            assert got == pytest.approx(lr_of(cfg, epoch), rel=1e-9, abs=1e-15), (epoch, lr_of.__name__)
            seen[id(opt)].append(got)
        for _, sched, _ in opts:
            sched.step()
    assert len(set(seen[id(run.optimizer)])) > 1                                  # the lr does move


def test_step_schedulers_hushes_only_torchs_own_epoch_warning():
    """torch 2.5's SequentialLR passes an epoch to its next scheduler and warns at the warm-up's end; that warning is
    torch's, not the user's, so it is hushed (torch 2.14 no longer warns: the deprecated call is simulated here)."""
    class Warns:
        def __init__(self, text):
            self.text, self.steps = text, 0

        def step(self):
            self.steps += 1
            warnings.warn(self.text, UserWarning)
    torchs = "The epoch parameter in `scheduler.step()` was not necessary and is being deprecated where possible."
    run = types.SimpleNamespace(scheduler=Warns(torchs), pol_scheduler=None)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pgnm.step_schedulers(run)
    assert run.scheduler.steps == 1 and not seen
    run = types.SimpleNamespace(scheduler=Warns(torchs), pol_scheduler=Warns("some other warning"))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pgnm.step_schedulers(run)
    assert run.pol_scheduler.steps == 1 and [str(w.message) for w in seen] == ["some other warning"]


def _fake_step_recording_lr(seen):
    """A train_step that trains nothing and records the lr each step runs at (the schedule alone, in seconds)."""
    def step(run, state, x, y, *a):
        seen.append((run.optimizer.param_groups[0]["lr"],
                     run.pol_optimizer.param_groups[0]["lr"] if run.pol_optimizer is not None else None))
        return pgnm.Forward(torch.tensor(1.0), torch.tensor(1.0)), True, False
    return step


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_a_run_trains_each_epoch_at_its_scheduled_lr(tmp_path, monkeypatch):
    """End to end: every step of epoch e runs at the hand-computed lr of epoch e, classifier and policy."""
    seen = []
    monkeypatch.setattr(pgnm, "train_step", _fake_step_recording_lr(seen))
    cfg = tiny(output_dir=str(tmp_path), synthetic_per_class=1, epochs=4, lr=0.1, lr_step_size=2, lr_gamma=0.5,
               lr_warmup_epochs=1, lr_min=0.001)                      # 3 steps per epoch
    pgnm.main(cfg)
    assert len(seen) == 4 * 3
    for i, (lr, pol_lr) in enumerate(seen):
        epoch = i // 3
        assert lr == pytest.approx(_classifier_lr(cfg, epoch), rel=1e-9), i
        assert pol_lr == pytest.approx(_policy_lr(cfg, epoch), rel=1e-9), i
    assert len({lr for lr, _ in seen}) == 3                            # warm-up, then 0.1, then 0.05
    logged = [r["lr"] for r in read_log(str(tmp_path)) if not r.get("final")]
    assert logged == [seen[3 * e][0] for e in range(4)]                  # log.jsonl: the lr the epoch trained at


def test_each_policy_head_and_the_trunk_run_once_per_step():
    """SPEC 2.2: one forward of the trunk and of each head per training step (the authors ran the heads twice,
    updating their BatchNorm statistics twice), one of the classifier."""
    run, state = _tiny_run()
    calls = {"fe": 0, "alpha": 0, "beta": 0, "classifier": 0}
    for name, mod in (("fe", run.policy_raw.fe), ("alpha", run.policy_raw.alpha), ("beta", run.policy_raw.beta),
                      ("classifier", run.model_raw)):
        mod.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 24, (8,))
    for step in (1, 2):
        _, taken, _ = pgnm.train_step(run, state, x, y)
        assert taken and calls == {"fe": step, "alpha": step, "beta": step, "classifier": step}
        for head in (run.policy_raw.alpha, run.policy_raw.beta):
            assert int(head[1].num_batches_tracked) == step and int(head[4].num_batches_tracked) == step


def test_reinforce_and_paper_objectives_differ_on_the_same_seed_as_the_formulas_say(monkeypatch):
    """The same weights, batch and seed under --objective paper and reinforce: the same mask and logP are drawn, the
    loss is each formula's (SPEC 2.8) and differs; the classifier's gradient is CE's scaled by mean(logsumexp logP)
    under eq. 8 and CE's alone under reinforce; the policy's gradients differ."""
    logps, outs = [], []
    real_sample = pgnm.sample_beta_mask

    def spy(*a, **k):
        res = real_sample(*a, **k)
        logps.append(res[1].detach())
        return res
    monkeypatch.setattr(pgnm, "sample_beta_mask", spy)
    torch.manual_seed(5)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 24, (8,))
    got = {}
    for objective in ("paper", "reinforce"):
        torch.manual_seed(0)
        run, state = _tiny_run(objective=objective)
        run.model_raw.register_forward_hook(lambda m, a, out: outs.append(out.detach()))
        torch.manual_seed(1)
        fwd = pgnm.compute_loss(run, state, x, y)
        fwd.loss.backward()
        got[objective] = (fwd, [p.grad.clone() for p in run.model_raw.parameters()],
                          [p.grad.clone() for p in run.policy_raw.parameters() if p.grad is not None])
    assert torch.equal(logps[0], logps[1]) and torch.equal(outs[0], outs[1])
    assert torch.equal(got["paper"][0].mask, got["reinforce"][0].mask)
    logp, c = logps[0].double(), F.cross_entropy(outs[0].double(), y, reduction="none")
    lse = torch.logsumexp(logp, 1).mean()
    assert got["paper"][0].loss.item() == pytest.approx((lse * c.mean()).item(), rel=1e-4)
    assert got["reinforce"][0].loss.item() == pytest.approx(
        (c.mean() + ((c - c.mean()) * logp.sum(1)).mean()).item(), rel=1e-4, abs=1e-4)
    assert abs(got["paper"][0].loss.item() - got["reinforce"][0].loss.item()) > 1e-3
    for gp, gr in zip(got["paper"][1], got["reinforce"][1]):
        assert torch.allclose(gp, lse.float() * gr, rtol=1e-3, atol=1e-6)
    assert any(not torch.allclose(gp, gr, rtol=1e-2, atol=1e-6)
               for gp, gr in zip(got["paper"][2], got["reinforce"][2]))


def test_noisy_evaluation_draws_one_mask_per_image_from_the_dataset_level_beta(monkeypatch):
    """SPEC 2.10: each validation image gets its own mask from Beta(exp alpha_d, exp beta_d); the clean evaluation
    gets none. Images of ones make the classifier's input the mask itself."""
    run, state = _tiny_run()
    draws, inputs = [], []
    real = pgnm.sample_beta_mask

    def spy(la, lb, *a, **k):
        res = real(la, lb, *a, **k)
        draws.append((la.clone(), lb.clone(), res[0].clone()))
        return res
    monkeypatch.setattr(pgnm, "sample_beta_mask", spy)
    run.model_raw.register_forward_pre_hook(lambda m, args: inputs.append(args[0].clone()))
    loader = [(torch.ones(3, 3, 32, 32), torch.tensor([0, 1, 2])), (torch.ones(2, 3, 32, 32), torch.tensor([3, 4]))]
    clean = pgnm.evaluate(run, state, loader, epoch=0)
    assert draws == [] and all(torch.equal(i, torch.ones_like(i)) for i in inputs) and clean["n"] == 5
    inputs.clear()
    noisy = pgnm.evaluate(run, state, loader, epoch=0, noisy=True)
    assert noisy["n"] == 5 and [d[2].shape for d in draws] == [(3, 64), (2, 64)]       # one G*G draw per image
    for la, lb, _ in draws:                                     # every row: the dataset-level parameters
        assert torch.equal(la, state.alpha_d.expand_as(la)) and torch.equal(lb, state.beta_d.expand_as(lb))
    masks = torch.cat(inputs)                                   # x = 1: the input is the mask, on every channel
    assert masks.shape == (5, 3, 32, 32) and torch.equal(masks[:, :1].expand_as(masks), masks)
    want = torch.cat([pgnm.upsample_blur(m, (32, 32), run.cfg.kernel, run.cfg.sigma) for _, _, m in draws])
    assert torch.allclose(masks[:, :1], want, atol=1e-6)
    flat = masks[:, 0].flatten(1)
    assert all(not torch.equal(flat[i], flat[j]) for i in range(5) for j in range(i + 1, 5))   # no mask shared
    again = pgnm.evaluate(run, state, loader, epoch=0, noisy=True)                   # seeded by (seed, epoch)
    assert json.dumps(again, sort_keys=True) == json.dumps(noisy, sort_keys=True)
    assert torch.equal(torch.cat(inputs[2:]), masks)


def _twin_step(**kw):
    """One heated step from fixed weights and seed: (run, parameters before, gradients the optimisers saw)."""
    torch.manual_seed(0)
    run, state = _tiny_run(lr=0.5, **kw)
    before = [p.detach().clone() for p in run.parameters()]
    grads = []
    for opt in run.optimizers():
        opt.register_step_pre_hook(lambda o, *a: grads.append(
            [p.grad.clone() for g in o.param_groups for p in g["params"] if p.grad is not None]))
    torch.manual_seed(1)
    _, taken, _ = pgnm.train_step(run, state, torch.randn(8, 3, 32, 32), torch.randint(0, 24, (8,)))
    assert taken
    return run, before, grads


def test_clip_grad_norm_clips_each_network_before_its_step():
    """--clip-grad-norm c: the gradients each optimiser steps with are the unclipped ones of the same step scaled by
    c / ||g|| per network (both networks exceed c here), and the weights move by exactly the clipped SGD step."""
    run_u, before_u, (gc_u, gp_u) = _twin_step()
    c = 0.05
    run_c, before_c, (gc_c, gp_c) = _twin_step(clip_grad_norm=c)
    assert all(torch.equal(a, b) for a, b in zip(before_u, before_c))
    for unclipped, clipped in ((gc_u, gc_c), (gp_u, gp_c)):
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in unclipped]))
        assert norm > 10 * c                                               # the bound binds
        for gu, gcl in zip(unclipped, clipped):
            assert torch.allclose(gcl, gu * (c / norm), rtol=1e-4, atol=1e-9)
        clipped_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in clipped]))
        assert clipped_norm <= c * (1 + 1e-4)
    # first SGD step (momentum buffer = d_p): p <- p - lr * (g + wd * p), with the clipped g
    starts = {id(p): b for p, b in zip(run_c.parameters(), before_c)}
    for opt, grads in zip(run_c.optimizers(), (gc_c, gp_c)):
        group = opt.param_groups[0]
        ps = [p for p in group["params"] if p.grad is not None]
        for p, g in zip(ps, grads):
            p0 = starts[id(p)]
            assert torch.allclose(p.detach(), p0 - group["lr"] * (g + group["weight_decay"] * p0), atol=1e-7)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_training_step_equals_the_eager_step(backend, monkeypatch, one_thread):
    """--compile trains the same numbers as eager: one heated step of compiled networks against the same step eager,
    from the same weights and seed (losses, masks, updated weights). aot_eager runs the graphs torch.compile builds
    (dynamo + AOTAutograd) without code generation, in seconds; inductor generates and builds C++ on this CPU."""
    if backend == "inductor" and not os.environ.get("PGNM_SLOW_TESTS"):
        pytest.skip("inductor's C++ build for one heated step takes about a minute on a 2-core CPU (measured 53 s); "
                    "PGNM_SLOW_TESTS=1 runs it")
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode=None, **kw: real(model, backend=backend))
    torch._dynamo.reset()
    out = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        run, state = _tiny_run(compile=compiled)
        pgnm.wrap_for_training(run)
        assert (run.model is not run.model_raw) == compiled
        torch.manual_seed(1)
        fwd, taken, _ = pgnm.train_step(run, state, torch.randn(8, 3, 32, 32), torch.randint(0, 24, (8,)))
        assert taken
        out[compiled] = (fwd, [p.detach().clone() for p in run.parameters()], state.alpha_d.clone())
    (fe, we, ae), (fc, wc, ac) = out[False], out[True]
    assert torch.equal(fe.mask, fc.mask) or torch.allclose(fe.mask, fc.mask, atol=1e-6)
    assert fc.loss.item() == pytest.approx(fe.loss.item(), rel=1e-4)
    assert torch.allclose(ae, ac, atol=1e-6)
    for a, b in zip(we, wc):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5)


def test_bench_ratios_are_the_ratios_of_the_times_it_reports(monkeypatch, one_thread, capsys):
    """One timed round: each reported ratio is the ratio of the reported times (rounded as reported), the printed
    table and JSON line carry the returned numbers, and each variant ran once per round."""
    calls = []
    real = pgnm.train_step
    monkeypatch.setattr(pgnm, "train_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = pgnm.Config(device="cpu", model="resnet10t", batch_size=2, train_crop_size=32, grid=8, kernel=3, sigma=1.0)
    res = pgnm.bench(cfg, rounds=1, warmup=1)
    assert len(calls) == 2                                                 # (b) ran in the warm-up and the round
    ms = {k[:-3]: v for k, v in res.items() if k.endswith("_ms")}
    assert all(v > 0 for v in ms.values())
    approx = lambda v: pytest.approx(v, rel=2e-3, abs=2e-4)               # noqa: E731 - 4-digit rounding
    assert res["heated_over_parts"] == approx(ms["heated"] / (ms["classifier"] + ms["policy"]))
    assert res["heated_over_baseline"] == approx(ms["heated"] / ms["baseline"])
    assert res["mask_share"] == approx(ms["mask"] / ms["heated"])
    assert res["authors_over_heated"] == approx(ms["authors"] / ms["heated"])
    assert res["authors_fp32_over_heated"] == approx(ms["authors_fp32"] / ms["heated"])
    assert res["heated_img_s"] == pytest.approx(2 / ms["heated"] * 1e3, rel=2e-3, abs=0.051)   # 1 decimal
    out = capsys.readouterr().out
    line = json.loads(out.strip().splitlines()[-1])
    assert {k: line[k] for k in res} == res
    table = dict(re.findall(r"^\s+\((\w)\) .*?\s([\d.]+) ms", out, re.M))
    for letter, key in zip("abcdefg", ("baseline", "heated", "classifier", "policy", "mask", "authors",
                                       "authors_fp32")):
        assert float(table[letter]) == pytest.approx(ms[key], abs=0.006), key
    printed = re.search(r"heated / \(classifier \+ policy\) = ([\d.]+)", out)
    assert float(printed.group(1)) == pytest.approx(res["heated_over_parts"], abs=6e-4)
    # the host's time to queue a step is part of the step's time, and on a CPU (synchronous) nearly all of it
    for k in ("baseline", "policy"):
        assert 0.9 * ms[k] <= res[f"{k}_host_ms"] <= ms[k], k
    assert "a CPU runs what it queues: no verdict" in out
    cuda = torch.device("cuda", 0)
    assert pgnm.pace(cuda, 0.95) == "the host's kernel launches set the pace"
    assert pgnm.pace(cuda, 0.3) == "the GPU sets the pace"


# =====================================================================================================================
#  Phases end to end
# =====================================================================================================================


def _watch_training(monkeypatch):
    """Spies on what main builds and trains: the classifier's and the policy trunk's inputs (shape, channels-last or
    not, training mode), the fixed-noise kinds drawn, the objective called (and its value) and every train_step's
    Forward. Returns the dict they fill; 'run' is the Run that build_run made."""
    seen = {"model_in": [], "policy_in": [], "noise": [], "fwd": [], "objectives": []}
    real_build, real_step, real_noise = pgnm.build_run, pgnm.train_step, pgnm.sample_fixed_noise

    def build(*a, **k):
        run, state = real_build(*a, **k)
        seen["run"] = run

        def record(key):
            return lambda mod, args: seen[key].append(
                (tuple(args[0].shape), args[0].is_contiguous(memory_format=torch.channels_last)
                 and not args[0].is_contiguous(), mod.training))
        run.model.register_forward_pre_hook(record("model_in"))
        if run.policy is not None:
            run.policy.fe.register_forward_pre_hook(record("policy_in"))
        return run, state

    def step(*a, **k):
        out = real_step(*a, **k)
        seen["fwd"].append(out[0])
        return out

    def noise(kind, *a, **k):
        seen["noise"].append(kind)
        return real_noise(kind, *a, **k)

    for name in ("paper_objective", "reinforce_objective"):
        real = getattr(pgnm, name)
        monkeypatch.setattr(pgnm, name, lambda *a, real=real, name=name: seen["objectives"].append(
            (name, real(*a))) or seen["objectives"][-1][1])
    monkeypatch.setattr(pgnm, "build_run", build)
    monkeypatch.setattr(pgnm, "train_step", step)
    monkeypatch.setattr(pgnm, "sample_fixed_noise", noise)
    return seen


@pytest.fixture(scope="module")
def heated_run(tmp_path_factory):
    """One tiny two-epoch heated run with --save-masks, shared by the tests of what a run writes and prints:
    (its config with the output directory resolved, the output directory, what it printed, its result)."""
    out = str(tmp_path_factory.mktemp("phases") / "runs" / "heated")
    cfg = tiny(output_dir=out, epochs=2, save_masks=True, print_freq=4)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        res = pgnm.main(cfg)
    return cfg, out, printed.getvalue(), res


def test_save_masks_draws_without_changing_the_run(heated_run, tmp_path):
    """The README's pictures come from a --save-masks run and its table from a plain one: the same numbers."""
    cfg, out = heated_run[0], heated_run[1]
    plain = str(tmp_path / "plain")
    pgnm.main(dataclasses.replace(cfg, output_dir=plain, save_masks=False))
    assert [f for f in os.listdir(out) if f.startswith("masks_epoch")] and \
        not [f for f in os.listdir(plain) if f.startswith("masks_epoch")]
    a, b = (torch.load(os.path.join(d, "model_heated.pth"), weights_only=True) for d in (out, plain))
    assert all(torch.equal(a[k], b[k]) for k in a)
    drop = {"epoch_seconds"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in read_log(out)] == \
        [{k: v for k, v in r.items() if k not in drop} for r in read_log(plain)]


def test_heated_then_finetune_end_to_end(heated_run):
    timm = pytest.importorskip("timm")
    res, runs = heated_run[3], pathlib.Path(heated_run[1]).parent
    for k in ("val_acc", "val_noisy_acc", "test_acc", "test_noisy_acc", "test_auroc"):
        assert k in res
    log = read_log(str(runs / "heated"))
    assert [r["epoch"] for r in log] == [1, 2, 2] and log[-1]["final"]
    for k in ("phase", "epoch", "train_loss", "val_acc", "val_balanced_acc", "val_f1", "val_auroc", "val_entropy",
              "val_noisy_acc", "val_noisy_f1", "alpha_d_mean"):
        assert k in log[0], k
    assert "test_acc" in log[-1]
    ck = torch.load(runs / "heated" / "checkpoint.pth", weights_only=True)
    assert {"model", "policy_net", "base_alpha", "base_beta", "optimizer", "pol_optimizer", "main_lr_scheduler",
            "pol_lr_scheduler", "scaler", "epoch", "step", "args", "rng"} <= set(ck)
    assert ck["base_alpha"].shape == (1, 64) and isinstance(ck["args"], dict)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ck["model"])
    png = Image.open(runs / "heated" / "masks_epoch002.png")
    assert png.size == pgnm.mask_figure_layout(8, 32)["size"]
    weights = torch.load(runs / "heated" / "model_heated.pth", weights_only=True)
    timm.create_model("resnet10t", num_classes=24).load_state_dict(weights, strict=True)
    res2 = pgnm.main(tiny("finetune", output_dir=str(runs / "finetune")))
    assert "test_acc" in res2
    assert read_log(str(runs / "finetune"))[0]["phase"] == "finetune"
    ft = torch.load(runs / "finetune" / "checkpoint.pth", weights_only=True)
    assert ft["policy_net"] is None and ft["base_alpha"] is None


@pytest.mark.parametrize("kw", [dict(noise="uniform"), dict(noise="gaussian", kernel=0),
                                dict(objective="reinforce"), dict(grid=32, kernel=13, sigma=6.0),
                                dict(policy_size=16), dict(channels_last=True)])
def test_heated_variants(tmp_path, kw, monkeypatch):
    """Each variant trains end to end and is seen to take effect in what the networks receive and compute."""
    seen = _watch_training(monkeypatch)
    res = pgnm.main(tiny(output_dir=str(tmp_path), synthetic_per_class=1, **kw))   # 3 steps, 24 val images
    assert 0.0 <= res["val_acc"] <= 1.0 and math.isfinite(res["val_noisy_auroc"])
    ck = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    run, fwds = seen["run"], seen["fwd"]
    steps = len(fwds)
    assert steps == 3
    train_in = [s for s in seen["model_in"] if s[2]]
    assert len(train_in) == steps and all(s[0] == (8, 3, 32, 32) for s in train_in)
    masks = torch.cat([f.mask for f in fwds])                                        # (24, 1, 32, 32)
    assert masks.shape == (24, 1, 32, 32) and masks.min() >= 0 and masks.max() <= 1
    noise = kw.get("noise", "beta")
    if noise != "beta":                  # fixed noise of that kind, no policy: every step and the noisy evaluation
        assert ck["policy_net"] is None and run.policy is None and ck["base_alpha"] is None
        assert seen["noise"][:steps] == [noise] * steps and set(seen["noise"]) == {noise}
        assert len(seen["noise"]) > steps                                            # the noisy evaluations too
        assert seen["objectives"] == []                                              # plain CE: no logP to score
        assert all(f.loss.item() == pytest.approx(f.ce.item(), rel=1e-6) for f in fwds)
        assert abs(masks.mean().item() - 0.5) < 0.1
    else:
        assert seen["noise"] == [] and ck["policy_net"] is not None
    if noise == "gaussian":              # kernel 0: no blur, so the mask is constant on each 4x4 cell of the 8x8 grid
        cells = masks[..., ::4, ::4]                                                 # 24 x 64 draws
        assert torch.equal(masks, cells.repeat_interleave(4, -2).repeat_interleave(4, -1))
        assert abs(cells.mean().item() - 0.5) < 0.03 and 0.17 < cells.std().item() < 0.23   # N(0.5, 0.2), clamped
    elif kw.get("grid", 8) < 32:         # blurred: not constant on the grid's cells
        cells = masks[..., ::4, ::4]
        assert not torch.equal(masks, cells.repeat_interleave(4, -2).repeat_interleave(4, -1))
    if noise == "beta":
        want = "reinforce_objective" if kw.get("objective") == "reinforce" else "paper_objective"
        assert [name for name, _ in seen["objectives"]] == [want] * steps
        assert all(f.loss is value or torch.equal(f.loss, value) for f, (_, value) in zip(fwds, seen["objectives"]))
        grid = kw.get("grid", 8)
        assert ck["base_alpha"].shape == (1, grid * grid) and run.policy_raw.alpha[6].out_features == grid * grid
        size = kw.get("policy_size", 32)
        pol_train = [s for s in seen["policy_in"] if s[2]]
        assert len(pol_train) == steps and all(s[0] == (8, 3, size, size) for s in pol_train)
    if kw.get("channels_last"):          # the classifier's input and weights are NHWC, the policy's weights too
        assert all(s[1] for s in train_in)
        assert run.model_raw.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
        assert not run.model_raw.conv1[0].weight.is_contiguous()
        assert run.policy_raw.fe.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    else:
        assert not any(s[1] for s in train_in) and run.model_raw.conv1[0].weight.is_contiguous()


def test_baseline_with_mixup_cutmix_and_autoaugment(tmp_path, monkeypatch):
    seen = []
    real = pgnm.train_step

    def spy(run, state, x, y, *a):
        seen.append(y)
        return real(run, state, x, y, *a)
    monkeypatch.setattr(pgnm, "train_step", spy)
    res = pgnm.main(tiny("baseline", mixup_alpha=0.2, cutmix_alpha=1.0, auto_augment="ta_wide",
                         output_dir=str(tmp_path)))
    assert "test_f1" in res
    assert seen and all(y.ndim == 2 and y.shape[1] == 24 for y in seen)          # soft labels: mixing happened
    assert any(((y > 0) & (y < 1)).any() for y in seen)


def test_the_same_seed_gives_the_same_run(tmp_path):
    a = pgnm.main(tiny(output_dir=str(tmp_path / "a")))
    b = pgnm.main(tiny(output_dir=str(tmp_path / "b")))
    wa = torch.load(tmp_path / "a" / "model_heated.pth", weights_only=True)
    wb = torch.load(tmp_path / "b" / "model_heated.pth", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["val_acc"] == b["val_acc"]


def _readme_commands():
    """Every pgnm.py / evaluate.py / refine_radimagenet.py command the README shows (code blocks and inline code),
    as (tool, argv); synopses with [optional] parts are left out."""
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as fh:
        text = fh.read()
    lines = [ln for b in re.findall(r"```bash\n(.*?)```", text, re.S) for ln in b.replace("\\\n", " ").splitlines()]
    lines += re.findall(r"`((?:python|torchrun)[^`]*\.py[^`]*)`", text)
    out = []
    for ln in lines:
        ln = ln.split(" #")[0].split("&&")[-1].strip()
        m = re.search(r"(pgnm|evaluate|refine_radimagenet)\.py(.*)$", ln)
        if m and not ln.startswith("#") and "[" not in ln and "..." not in ln and "pytest" not in ln:
            out.append((m.group(1), shlex.split(m.group(2))))
    return out


def test_every_command_the_readme_shows_passes_the_tools_checks(monkeypatch, tmp_path):
    """The refusals of flags a run would not read must never refuse a command the README itself gives: each is
    parsed and checked by its tool's CLI with the work itself replaced by the configuration check."""
    import refine_radimagenet as rr
    seen = []
    monkeypatch.setattr(pgnm, "main", lambda cfg: seen.append(cfg) or pgnm.validate_config(cfg))
    monkeypatch.setattr(pgnm, "bench", lambda cfg, rounds: pgnm.validate_config(dataclasses.replace(cfg, phase="heated")))
    monkeypatch.setattr(pgnm, "average_checkpoints", lambda *a, **k: None)
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: None)
    monkeypatch.setattr(ev, "bench_logreg", lambda *a, **k: None)
    monkeypatch.setattr(ev, "default_checkpoints", lambda runs_dir: ["runs/heated/model_heated.pth"])
    monkeypatch.setattr(rr, "refine", lambda *a, **k: None)
    monkeypatch.setattr(rr, "make_demo", lambda *a, **k: {"images": 0, "classes": 0})
    monkeypatch.setattr(rr, "demo_report", lambda *a, **k: None)
    monkeypatch.setattr(rr, "_check_new_path", lambda *a, **k: None)
    commands = _readme_commands()
    assert len(commands) >= 20 and {tool for tool, _ in commands} == {"pgnm", "evaluate", "refine_radimagenet"}
    monkeypatch.setattr(pgnm, "bench_data", lambda cfg: None)
    monkeypatch.setattr(pgnm, "bench_e2e", lambda cfg, steps: None)
    for tool, argv in commands:
        argv = ["2" if a == "N" else str(tmp_path) if re.fullmatch(r"[A-Z_]+", a) else a for a in argv]  # placeholders
        try:
            code = {"pgnm": pgnm.cli, "evaluate": ev.cli, "refine_radimagenet": rr.cli}[tool](argv)
        except SystemExit as e:                                       # --help
            code = e.code
        assert code == 0, (tool, argv)
    assert len(seen) >= 10


def test_readme_training_loop_example_runs():
    """The README's 'use the pieces in your own loop' example, executed as written."""
    with open(os.path.join(HERE, "README.md")) as fh:
        text = fh.read()
    m = re.search(r"<!-- example: own-loop -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README example block missing"
    namespace: dict = {}
    exec(compile(m.group(1), "README.md", "exec"), namespace)
    assert math.isfinite(namespace["loss"].item())


# --- what a run tells its user: config, ETA, figures, summary, --help -------------------------------------------------


def test_log_and_checkpoint_hold_exactly_the_readme_keys(heated_run):
    """README, 'Outputs' and 'Checkpoints and resuming': the keys of log.jsonl's lines and of checkpoint.pth."""
    cfg, out, _, _ = heated_run
    metrics = ("acc", "balanced_acc", "precision", "recall", "f1", "auroc", "entropy", "loss", "n")
    epoch_keys = {"phase", "epoch", "train_loss", "lr", "bad_steps", "amp_skipped_steps", "epoch_seconds",
                  *(f"val_{m}" for m in metrics), *(f"val_noisy_{m}" for m in metrics), "alpha_d_mean", "beta_d_mean",
                  "clamped_elements", "clamped_fraction", "mask_mean_dataset", "mask_mean_images", "mask_image_spread"}
    *epochs, final = read_log(out)
    assert [set(r) for r in epochs] == [epoch_keys, epoch_keys]
    assert set(final) == {"phase", "epoch", "final", *(f"test_{m}" for m in metrics),
                          *(f"test_noisy_{m}" for m in metrics)} and final["final"] is True
    ck = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)      # plain types only
    assert set(ck) == {"model", "policy_net", "base_alpha", "base_beta", "optimizer", "pol_optimizer",
                       "main_lr_scheduler", "pol_lr_scheduler", "scaler", "epoch", "step", "args", "rng",
                       "steps_per_epoch", "world_size", "counters", "meter", "pgnm_version", "data"}
    assert ck["data"]["classes"] == pgnm.synthetic_classes() and ck["data"]["train_images"] == \
        cfg.synthetic_per_class * len(pgnm.synthetic_classes())
    assert ck["epoch"] == 1 and ck["step"] == ck["steps_per_epoch"]        # the last epoch (from 0), complete
    assert isinstance(ck["args"], dict) and len(ck["rng"]) == ck["world_size"] == 1
    assert ck["pgnm_version"] == pgnm.file_hash()


def test_config_json_is_the_runs_config_and_the_start_line_lists_exactly_what_differs(heated_run):
    cfg, out, printed, _ = heated_run
    with open(os.path.join(out, "config.json")) as fh:
        saved = json.load(fh)
    cfg = dataclasses.replace(cfg, channels_last=pgnm.use_channels_last(cfg, torch.device("cpu")))  # as resolved
    assert saved == dataclasses.asdict(cfg) and pgnm.Config(**saved) == cfg
    line = next(ln for ln in printed.splitlines() if ln.startswith("config (preset: "))
    assert "synthetic CPU demo" in line and line.endswith(f"full config: {os.path.join(out, 'config.json')}")
    listed = dict(kv.split("=", 1) for kv in shlex.split(line.split("differs from the paper's defaults: ")[1]
                                                         .split(") | full config: ")[0]))
    paper = pgnm.Config()
    differ = {f.name for f in dataclasses.fields(pgnm.Config)
              if f.name != "phase" and getattr(cfg, f.name) != getattr(paper, f.name)}
    assert set(listed) == differ and {"epochs", "lr", "model", "workers"} <= differ
    assert all(listed[k] == pgnm.format_value(getattr(cfg, k)) for k in listed)
    spaced = dataclasses.replace(cfg, output_dir="my runs/a (b)", data_path="/data/x y")   # each value one shell word
    assert dict(kv.split("=", 1) for kv in shlex.split(pgnm.differences_text(spaced)))["output_dir"] == "my runs/a (b)"


def test_progress_and_epoch_lines_show_the_runs_eta(heated_run):
    printed = heated_run[2]
    steps = [ln for ln in printed.splitlines() if re.match(r"\[heated\] epoch \d/2 step ", ln)]
    done = [ln for ln in printed.splitlines() if re.match(r"\[heated\] epoch \d/2 done", ln)]
    assert len(steps) == 6 and len(done) == 2                         # 12 steps per epoch, a line every 4
    assert all(re.search(r"epoch eta \d+:\d\d:\d\d  run eta (>=)?\d+:\d\d:\d\d", ln) for ln in steps)
    assert ">=" in steps[0] and ">=" not in steps[-1]                 # a lower bound until an evaluation is timed
    assert all(re.search(r"run eta \d+:\d\d:\d\d$", ln) for ln in done)


def _tile(png, lay, row, col):
    x, y, t = lay["cols"][col], lay["rows"][row], lay["tile"]
    return png[y:y + t, x:x + t]


def test_mask_figure_follows_the_same_images_and_is_labelled(heated_run):
    _, out, printed, _ = heated_run
    lay = pgnm.mask_figure_layout(8, 32)
    figs = [np.array(Image.open(os.path.join(out, f"masks_epoch00{e}.png")).convert("RGB")) for e in (1, 2)]
    assert all(f.shape == (lay["size"][1], lay["size"][0], 3) for f in figs)
    assert f"wrote {os.path.join(out, 'masks_epoch001.png')}" in printed
    for c in range(8):                       # the same validation images in both epochs, their masks changed
        assert np.array_equal(_tile(figs[0], lay, "image", c), _tile(figs[1], lay, "image", c))
        assert not np.array_equal(_tile(figs[0], lay, "mask", c), _tile(figs[1], lay, "mask", c))
    images = [_tile(figs[1], lay, "image", c) for c in range(8)]
    masks = [_tile(figs[1], lay, "mask", c) for c in range(8)]
    assert all(not np.array_equal(images[0], im) for im in images[1:])          # 8 different images
    assert all(not np.array_equal(masks[0], m) for m in masks[1:])              # each with its own mask
    f = figs[1]
    for row, y in lay["rows"].items():                     # a row label at the left of each row
        assert (f[y:y + lay["tile"], :lay["cols"][0]] < 100).any(), row
    for x in lay["cols"]:                                  # a class name above each column, a mean below
        assert (f[lay["names_y"]:lay["rows"]["image"], x:x + lay["tile"]] < 100).any()
        assert (f[lay["caption_y"]:, x:x + lay["tile"]] < 100).any()
    x0, y0, x1, y1 = lay["bar"]                            # the colour bar runs from the ramp's 1 (top) to 0
    assert np.abs(f[y0 + 1, x0 + 8].astype(int) - pgnm.colormap(1.0)).max() <= 3
    assert np.abs(f[y1 - 2, x0 + 8].astype(int) - pgnm.colormap(0.0)).max() <= 3


def test_mask_figure_survives_a_failed_write_and_shows_every_class_in_full(tmp_path, capsys):
    """The figure was drawn after the epoch's checkpoint, so a run stopped in between (a kill, a folder in the way)
    never drew it; a class whose first validation image was unreadable (--skip-bad-images) was left out; with few
    classes the title was cut off at the right edge; --save-masks on a phase without masks did nothing, silently."""
    root, out = str(tmp_path / "data"), str(tmp_path / "o")
    classes = ("a b", "ünï", "x" * 60)
    _write_imagefolder(root, classes=classes, per=3, size=32, modes=("L",))
    (tmp_path / "data" / "val" / "a b" / "0.png").write_bytes(b"not an image")        # the first of its class
    os.makedirs(os.path.join(out, "masks_epoch001.png"))                               # in the way
    args = [*TINY_CLI, "--epochs", "1", "--data-path", root, "--model", "resnet10t", "--batch-size", "3",
            "--skip-bad-images", "--save-masks", "--output-dir", out, "--resume", "auto", "--workers", "0"]
    assert pgnm.cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "masks_epoch001.png" in err, err
    assert not os.path.exists(os.path.join(out, "checkpoint.pth"))      # so the resume trains epoch 1 and draws it
    os.rmdir(os.path.join(out, "masks_epoch001.png"))
    assert pgnm.cli(args) == 0
    assert len(read_log(out)[0]["mask_mean_images"]) == 3                  # every class followed
    png = np.asarray(Image.open(os.path.join(out, "masks_epoch001.png")).convert("L"))
    assert (png[:40, -8:] == 255).all()                                    # the title ends inside the picture
    capsys.readouterr()
    for phase in ("finetune", "baseline"):
        assert pgnm.cli(["--phase", phase, "--save-masks", "--output-dir", str(tmp_path / phase)]) == 2
        err = _one_error_line(capsys)
        assert "--save-masks" in err and phase in err and not (tmp_path / phase).exists(), err


def test_summary_describes_noise_ablation_files_without_a_policy():
    """--noise uniform/gaussian runs have no policy: the summary called their figures "the policy's masks" and
    promised the masks' statistics in curves.png, which draws none for them."""
    for noise in ("uniform", "gaussian"):
        cfg = tiny(noise=noise, save_masks=True)
        assert "policy" not in pgnm.describe_output("masks_epoch001.png", cfg)
        assert f"--noise {noise}" in pgnm.describe_output("masks_epoch001.png", cfg)
        assert "statistics" not in pgnm.describe_output("curves.png", cfg)
    assert "the policy's masks" in pgnm.describe_output("masks_epoch001.png", tiny(save_masks=True))
    assert "statistics" in pgnm.describe_output("curves.png", tiny())


def test_figure_images_are_one_per_class_spread_over_the_classes():
    targets = [i % 24 for i in range(96)]
    assert pgnm.figure_indices(targets) == [0, 3, 6, 9, 12, 15, 18, 21]
    assert pgnm.figure_indices([2, 2, 0, 1, 0]) == [2, 3, 0]


def test_mask_statistics_measure_how_image_specific_the_masks_are(heated_run):
    same = torch.full((4, 9), 0.3)
    stats = pgnm.mask_statistics(same, torch.zeros(1, 9), torch.zeros(1, 9))
    assert stats["mask_image_spread"] == 0.0 and stats["mask_mean_dataset"] == 0.5
    assert stats["mask_mean_images"] == [0.3] * 4
    two = torch.tensor([[0.2, 0.4], [0.6, 0.4]])            # per-cell std over images: 0.2 and 0 -> mean 0.1
    assert pgnm.mask_statistics(two, torch.zeros(1, 2), torch.zeros(1, 2))["mask_image_spread"] == pytest.approx(0.1)
    log = read_log(heated_run[1])
    for rec in log[:2]:
        assert len(rec["mask_mean_images"]) == 8 and rec["mask_image_spread"] >= 0.0
        assert 0.0 < rec["mask_mean_dataset"] < 1.0


def test_summary_names_every_file_the_run_wrote(heated_run):
    _, out, printed, res = heated_run
    lines = printed.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("[heated] finished in "))
    assert f"acc {res['test_acc']:.3f}" in lines[head] and "masked" in lines[head]
    assert lines[head + 1] == "[heated] files written:"
    listed = []
    for ln in lines[head + 2:]:
        if not ln.startswith("  "):
            break
        words = ln.split()                  # PATH  what it is   |   FIRST .. LAST  (N files) what they are
        paths = [words[0]] + ([words[2]] if words[1] == ".." else [])
        assert all(os.path.isfile(p) for p in paths), ln
        listed += [os.path.basename(p) for p in paths]
    assert sorted(listed) == sorted(set(os.listdir(out)) - {".lock"})
    model_line = next(ln for ln in lines if "model_heated.pth" in ln and ln.startswith("  "))
    assert "timm's resnet10t" in model_line and "torchvision" not in model_line
    assert lines[-1].startswith("[heated] next: python pgnm.py --phase finetune")


@pytest.mark.parametrize("data_path", [None, "/data/my scans ü"])
def test_next_command_pastes_into_a_finetune_run_of_the_same_network_and_images(data_path):
    """The printed next step, split as a shell would, gives a finetune config with the heated run's network, sizes
    and data (it dropped --model and the sizes, and broke on paths with spaces)."""
    heated = tiny(model="resnet18", data_path=data_path, output_dir="/runs/my run/heated", val_resize_size=40)
    words = shlex.split(pgnm.next_command(heated, "/runs/my run/heated/model_heated.pth"))
    assert words[:4] == ["python", "pgnm.py", "--phase", "finetune"]
    args = vars(pgnm.build_parser().parse_args(words[2:]))
    ft = pgnm.make_config(args.pop("phase"), **args)
    assert ft.finetune == "/runs/my run/heated/model_heated.pth" and ft.data_path == data_path
    assert all(getattr(ft, k) == getattr(heated, k) for k in pgnm.CARRIED_TO_FINETUNE), \
        {k: (getattr(ft, k), getattr(heated, k)) for k in pgnm.CARRIED_TO_FINETUNE}
    assert pgnm.unread_flags("finetune", args) == {}                  # and no flag the finetune phase refuses


def test_curves_png_with_matplotlib_or_a_line_saying_how_to_get_it(heated_run, tmp_path, monkeypatch):
    _, out, printed, _ = heated_run
    try:
        import matplotlib  # noqa: F401
        assert Image.open(os.path.join(out, "curves.png")).size[0] >= 800
        assert "curves.png skipped" not in printed
    except ImportError:
        assert "curves.png skipped: matplotlib is not installed (pip install matplotlib)" in printed
        assert not os.path.exists(os.path.join(out, "curves.png"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)             # as if not installed
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert pgnm.save_curves(os.path.join(out, "log.jsonl"), str(tmp_path / "c.png")) == \
        "curves.png skipped: matplotlib is not installed (pip install matplotlib)"
    assert not (tmp_path / "c.png").exists()
    monkeypatch.undo()
    if importlib.util.find_spec("matplotlib") is not None:      # installed, but nothing to draw: says that instead
        (tmp_path / "log.jsonl").write_text('{"phase": "heated", "epoch": 1, "final": true}\n')
        assert "has no epoch to draw" in pgnm.save_curves(str(tmp_path / "log.jsonl"), str(tmp_path / "c.png"))
    # A run resumed without matplotlib must not leave the older run's curves.png looking current: it is removed.
    (tmp_path / "c.png").write_bytes(b"an older figure")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert pgnm.save_curves(os.path.join(out, "log.jsonl"), str(tmp_path / "c.png")) == \
        "curves.png skipped (the older one removed): matplotlib is not installed (pip install matplotlib)"
    assert not (tmp_path / "c.png").exists()


def _stated(help_):
    """'(default X; finetune: Y; demo: Z)' at the end of a flag's help -> ('X', {'finetune': 'Y', 'demo': 'Z'})."""
    m = re.search(r"\(default ([^;()]*)((?:; [^;()]*)*)\)$", help_)
    if m is None:
        return None, {}
    return m.group(1), dict(part.split(": ", 1) for part in m.group(2).split("; ")[1:])


def test_help_states_the_default_of_every_preset():
    helps = {a.dest: a.help for a in pgnm.build_parser()._actions}
    assert helps["phase"].endswith("(default heated)")
    assert helps["compile_mode"].endswith("(default 'default')")     # torch's mode named "default", not "default default"
    for f in dataclasses.fields(pgnm.Config):
        if f.name in ("phase", "data_path"):
            continue
        h = helps[f.name]
        assert "(default: None)" not in h and h.count("(default") <= 1, h    # said once
        with_data = {p: pgnm.format_value(getattr(pgnm.make_config(p, data_path="D"), f.name)) for p in pgnm.PHASES}
        demo_run = {p: pgnm.format_value(getattr(pgnm.make_config(p), f.name)) for p in pgnm.PHASES}
        default, stated = _stated(h)
        if f.default is None:               # off, or explained in words ("default runs/<phase>"): no preset sets it
            assert set(with_data.values()) == set(demo_run.values()) == {"none"}, h
            continue
        assert default == pgnm.format_value(f.default), h
        for p in pgnm.PHASES:
            real = stated.get(p, default)
            demo = stated.get("demo", real)
            if " / " in demo:
                demo = dict(reversed(x.rsplit(" ", 1)) for x in demo.split(" / "))[p]
            assert with_data[p] == real and demo_run[p] == demo, (f.name, p, h)
    assert _stated(helps["lr"])[1] == {"finetune": "0.001", "demo": "0.02 heated / 0.01 finetune / 0.1 baseline"}


def test_allocator_line_only_when_a_cpu_run_trains(heated_run, tmp_path, capsys):
    if sys.platform.startswith("linux"):
        assert heated_run[2].count("CPU allocator: ") == 1
    proc = run_cli("--batch-size", "4096", "--synthetic-per-class", "2", "--output-dir", str(tmp_path / "o"))
    assert proc.returncode == 2 and "allocator" not in proc.stdout + proc.stderr
    with pytest.raises(SystemExit):
        pgnm.cli(["--help"])
    help_text = capsys.readouterr().out
    assert "--no-malloc-tuning" in help_text and "CPU allocator:" not in help_text
    assert "demo      no --data-path" in help_text and "config.json" in help_text


# =====================================================================================================================
#  Resume: a run killed at any moment ends exactly where a straight run ends
# =====================================================================================================================

TINY_CLI = ["--synthetic-per-class", "4", "--synthetic-size", "32", "--train-crop-size", "32", "--val-resize-size",
            "32", "--val-crop-size", "32", "--grid", "8", "--kernel", "3", "--sigma", "1", "--epochs", "2",
            "--batch-size", "8", "--deterministic", "--print-freq", "1", "--device", "cpu"]


def _final_state(out_dir):
    ck = torch.load(os.path.join(out_dir, "checkpoint.pth"), weights_only=True)
    return {"model": torch.load(os.path.join(out_dir, "model_heated.pth"), weights_only=True),
            "policy": ck["policy_net"], "alpha": ck["base_alpha"], "beta": ck["base_beta"],
            "momentum": [s["momentum_buffer"] for s in ck["optimizer"]["state"].values()]}


def _assert_same_state(a, b):
    assert torch.equal(a["alpha"], b["alpha"]) and torch.equal(a["beta"], b["beta"])
    for part in ("model", "policy"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert all(torch.equal(x, y) for x, y in zip(a["momentum"], b["momentum"]))


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("straight"))
    proc = run_cli(*TINY_CLI, "--workers", "0", "--output-dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _final_state(out)


def _kill_when(args, out_dir, condition, timeout=240):
    """Start a run, poll its checkpoint, SIGKILL the process as soon as condition(checkpoint) holds."""
    import signal
    import time
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "pgnm.py"), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    path, t0 = os.path.join(out_dir, "checkpoint.pth"), time.time()
    try:
        while time.time() - t0 < timeout:
            if proc.poll() is not None:
                raise AssertionError(f"run ended before the kill point: {proc.stderr.read()[-2000:]}")
            if os.path.exists(path):
                try:
                    ck = torch.load(path, weights_only=True)
                except Exception:         # noqa: BLE001 - replaced while we read it
                    ck = None
                if ck is not None and condition(ck):
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return ck
            time.sleep(0.01)
        raise AssertionError("kill point not reached")
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("workers", ["0", "2"])
@pytest.mark.parametrize("where", ["epoch_boundary", "mid_epoch"])
def test_killed_and_resumed_run_is_bit_identical(tmp_path, straight_run, workers, where):
    out = str(tmp_path)
    args = [*TINY_CLI, "--workers", workers, "--output-dir", out]
    if where == "mid_epoch":
        args += ["--save-every-steps", "2"]
        cond = lambda ck: ck["epoch"] == 1 and 0 < ck["step"] < ck["steps_per_epoch"]  # noqa: E731
    else:
        cond = lambda ck: ck["epoch"] == 0 and ck["step"] == ck["steps_per_epoch"]      # noqa: E731
    ck = _kill_when(args, out, cond)
    assert not os.path.exists(os.path.join(out, "model_heated.pth"))          # it really died part-way
    # the run may have written one more checkpoint between our read and the kill: the resume must use the last one
    left = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    assert cond(left) and left["step"] >= ck["step"]
    proc = run_cli(*args, "--resume", "auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # mid-epoch: epoch 2 goes on from the checkpoint's step (2, 4, ... of 12); at the boundary, epoch 2 starts afresh
    step = left["step"] if where == "mid_epoch" else 0
    assert step % 2 == 0 and (step > 0) == (where == "mid_epoch")
    resumed = re.findall(r"resumed from (.+): epoch (\d+), step (\d+)", proc.stdout)
    assert resumed == [(os.path.join(out, "checkpoint.pth"), "2", str(step))], resumed
    _assert_same_state(_final_state(out), straight_run)
    epochs = [r["epoch"] for r in read_log(out) if not r.get("final")]
    assert epochs == [1, 2], epochs                                              # no epoch logged twice


@pytest.fixture(scope="module")
def first_epoch(tmp_path_factory):
    """TINY_CLI's first epoch alone (checkpoints at steps 5, 10 and 12): the start of several fault tests below.
    Saving more often changes no number, so continuing it must end exactly where straight_run ends."""
    out = str(tmp_path_factory.mktemp("first_epoch"))
    proc = run_cli(*TINY_CLI, "--epochs", "1", "--workers", "0", "--save-every-steps", "5", "--output-dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _copy_run(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return str(dst)


def test_resume_with_more_epochs_rebuilds_the_schedules_and_equals_a_straight_run(tmp_path, first_epoch,
                                                                                 straight_run):
    out = _copy_run(first_epoch, tmp_path / "o")
    proc = run_cli(*TINY_CLI, "--workers", "0", "--output-dir", out, "--resume", "auto")      # --epochs 1 -> 2
    assert proc.returncode == 0, proc.stderr[-3000:]
    note = [ln for ln in proc.stdout.splitlines() if ln.startswith("note: ") and "--epochs 1" in ln]
    assert len(note) == 1 and "this run has --epochs 2" in note[0] and "policy lr 0.001 for epoch 2" in note[0], note
    _assert_same_state(_final_state(out), straight_run)     # the policy's cosine now spans 2 epochs, as straight
    assert [r["epoch"] for r in read_log(out) if not r.get("final")] == [1, 2]


def test_sigterm_to_the_process_group_with_workers_checkpoints_exits_3_and_resumes_identically(
        tmp_path, first_epoch, straight_run):
    import signal
    out = _copy_run(first_epoch, tmp_path / "o")
    args = [*TINY_CLI, "--workers", "2", "--output-dir", out, "--resume", "auto"]
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "pgnm.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)   # its own group, as SLURM's
    for line in proc.stdout:                        # a step in the middle of epoch 2: the workers are running
        if "epoch 2/2 step 5/12" in line:
            os.killpg(proc.pid, signal.SIGTERM)         # what scancel and a time limit do: every process of the group
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err[-3000:]
    assert len(err.strip().splitlines()) == 1 and re.fullmatch(r"stopped: stop requested by signal at epoch \d+, step "
                                                               r"\d+; checkpoint written, continue with --resume auto",
                                                               err.strip()), err[-3000:]
    ck = pgnm.verify_and_load(os.path.join(out, "checkpoint.pth"))
    assert ck["epoch"] == 1 and 5 <= ck["step"] < 12
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr[-2000:]
    _assert_same_state(_final_state(out), straight_run)


def test_sigusr1_checkpoints_and_exits_3_as_sigterm_does(tmp_path):
    """README, 'Signals': SIGUSR1 (SLURM's --signal warning) is handled as SIGTERM is: the current step ends, a
    mid-epoch checkpoint is written, exit code 3."""
    import signal
    out = str(tmp_path / "o")
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "pgnm.py"), *TINY_CLI, "--workers", "0",
                             "--output-dir", out], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "epoch 1/2 step 2/12" in line:
            proc.send_signal(signal.SIGUSR1)
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err[-3000:]
    assert len(err.strip().splitlines()) == 1 and re.fullmatch(r"stopped: stop requested by signal at epoch \d+, step "
                                                               r"\d+; checkpoint written, continue with --resume auto",
                                                               err.strip()), err[-3000:]
    ck = pgnm.verify_and_load(os.path.join(out, "checkpoint.pth"))
    assert ck["epoch"] == 0 and 2 <= ck["step"] < 12


def test_ctrl_c_exits_130_with_one_line(tmp_path):
    """README, 'Exit codes': Ctrl-C (SIGINT to the training process) ends the run with exit code 130 and one line."""
    import signal
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "pgnm.py"), *TINY_CLI, "--workers", "0",
                             "--output-dir", str(tmp_path / "o")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    for line in proc.stdout:
        if "epoch 1/2 step 2/12" in line:
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines() == ["interrupted; resume with --resume auto"], err[-3000:]


def test_sigterm_under_torchrun_checkpoints_on_every_rank(tmp_path):
    """torchrun forwards the signal (and the group's SIGTERM reaches its workers directly): both ranks stop after the
    same step, rank 0 writes a checkpoint. torchrun itself exits 1 (it raises on its own SIGTERM), which is why the
    README's requeue script starts pgnm.py with srun instead."""
    import signal
    out = str(tmp_path / "o")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "pgnm.py"), *TINY_CLI, "--workers", "2", "--output-dir", out]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:
        if "epoch 1/2 step 3/6" in line:
            os.killpg(proc.pid, signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-3000:]
    assert err.count("stopped: stop requested by signal") == 2 and "exited unexpectedly" not in err, err[-3000:]
    ck = pgnm.verify_and_load(os.path.join(out, "checkpoint.pth"))
    assert ck["epoch"] == 0 and 3 <= ck["step"] < 6 and ck["world_size"] == 2 and len(ck["rng"]) == 2


def _corrupt(path, how):
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        if how == "truncate":
            fh.truncate(size // 2)
        elif how == "overwrite_4k":                 # 4 KiB of zeros in the middle: torch.load alone does not notice
            fh.seek(size // 2)
            fh.write(b"\0" * 4096)
        elif how == "flip_bit":                     # one bit of tensor data
            fh.seek(size // 2)
            b = fh.read(1)
            fh.seek(size // 2)
            fh.write(bytes([b[0] ^ 0x10]))
        else:                                       # garbage from the start
            fh.write(b"not a checkpoint" * 64)


def _two_checkpoints(out):
    """checkpoint.pth and checkpoint_prev.pth of an untrained tiny run (no training needed to test loading)."""
    cfg = tiny(output_dir=out)
    run, state = pgnm.build_run(cfg, pgnm.DistInfo(), 24, False, log=lambda *_: None)
    os.makedirs(out, exist_ok=True)
    for step in (1, 2):
        pgnm.save_checkpoint(run, state, 0, step, 12, {"loss_sum": 0.0, "n_ok": step})
    return run, state


@pytest.mark.parametrize("how", ["truncate", "overwrite_4k", "flip_bit", "garbage"])
def test_a_corrupt_checkpoint_is_detected_and_the_previous_one_used(tmp_path, how):
    out = str(tmp_path)
    _two_checkpoints(out)
    path = os.path.join(out, "checkpoint.pth")
    _corrupt(path, how)
    if how in ("overwrite_4k", "flip_bit"):
        torch.load(path, weights_only=True)         # torch.load alone takes the damaged file ...
    msgs = []
    ck, used = pgnm.load_checkpoint_with_fallback(out, log=msgs.append)
    assert used.endswith("checkpoint_prev.pth") and ck["step"] == 1      # ... it is caught before use
    assert len(msgs) == 1 and "checkpoint.pth is unusable" in msgs[0], msgs


def test_both_checkpoints_unusable_stops_with_one_line_and_overwrites_nothing(tmp_path, capsys):
    out = str(tmp_path / "o")
    _two_checkpoints(out)
    _corrupt(os.path.join(out, "checkpoint.pth"), "overwrite_4k")
    _corrupt(os.path.join(out, "checkpoint_prev.pth"), "truncate")
    before = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out) if f.endswith(".pth")}
    code = pgnm.cli([*TINY_CLI, "--output-dir", out, "--resume", "auto"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no usable checkpoint" in err and "CRC" in err, err
    after = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out) if f.endswith(".pth")}
    assert after == before and not os.path.exists(os.path.join(out, "log.jsonl"))


def test_corrupt_checkpoint_end_to_end_resumes_from_the_previous_one_exactly(tmp_path, first_epoch, straight_run):
    out = _copy_run(first_epoch, tmp_path / "o")        # checkpoint.pth: epoch 1 done; prev: step 10 of 12
    _corrupt(os.path.join(out, "checkpoint.pth"), "overwrite_4k")
    with open(os.path.join(out, "checkpoint.pth.tmp.99999"), "wb") as fh:        # as a SIGKILL mid-write leaves
        fh.write(b"half a checkpoint")
    proc = run_cli(*TINY_CLI, "--workers", "0", "--output-dir", out, "--resume", "auto")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "checkpoint.pth.tmp.99999, left by an interrupted write" in proc.stdout
    assert not [f for f in os.listdir(out) if ".tmp." in f]
    assert "checkpoint.pth is unusable (CRC mismatch" in proc.stdout
    assert f"resumed from {os.path.join(out, 'checkpoint_prev.pth')}: epoch 1, step 10" in proc.stdout
    assert os.path.exists(os.path.join(out, "checkpoint.pth.corrupt"))        # kept aside, not rotated over prev
    _assert_same_state(_final_state(out), straight_run)


def test_disk_full_during_a_checkpoint_write_is_one_line_and_keeps_the_previous(tmp_path, first_epoch):
    """A real failing write: the file size limit (RLIMIT_FSIZE) stops the checkpoint write half-way, as a full disk
    would (EFBIG instead of ENOSPC; the ENOSPC path is the same code, checked in-process below)."""
    import resource
    import signal
    out = _copy_run(first_epoch, tmp_path / "o")
    path = os.path.join(out, "checkpoint.pth")
    before = open(path, "rb").read()
    limit = len(before) // 2

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)       # the write then fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "pgnm.py"), *TINY_CLI, "--workers", "0", "--output-dir",
                           out, "--resume", "auto", "--save-every-steps", "1"], capture_output=True, text=True,
                          preexec_fn=small_disk, timeout=300)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "cannot write" in err and "checkpoint.pth is as it was" in err, err
    assert open(path, "rb").read() == before
    assert not [f for f in os.listdir(out) if ".tmp." in f]


def test_enospc_is_one_line_and_leaves_no_temp_file(tmp_path, monkeypatch):
    import errno
    p, prev = str(tmp_path / "checkpoint.pth"), str(tmp_path / "checkpoint_prev.pth")
    pgnm.atomic_save({"v": torch.tensor(1)}, p, prev)
    pgnm.atomic_save({"v": torch.tensor(2)}, p, prev)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(pgnm.UserError, match="No space left on device.*checkpoint.pth is as it was"):
        pgnm.atomic_save({"v": torch.tensor(3)}, p, prev)
    monkeypatch.undo()
    assert pgnm.safe_load(p)["v"].item() == 2 and pgnm.safe_load(prev)["v"].item() == 1
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth", "checkpoint_prev.pth"]


def test_writes_never_follow_a_planted_symbolic_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    out = tmp_path / "o"
    out.mkdir()
    p = str(out / "checkpoint.pth")
    os.symlink(victim, f"{p}.tmp.{os.getpid()}")             # a planted temp file name
    pgnm.atomic_save({"v": torch.tensor(1)}, p)
    os.symlink(victim, str(out / "model_heated.pth"))         # a planted target
    pgnm.atomic_save({"v": torch.tensor(2)}, str(out / "model_heated.pth"))
    os.symlink(victim, str(out / "log.jsonl"))
    with pytest.raises(pgnm.UserError, match="symbolic link"):
        pgnm._append_jsonl(str(out / "log.jsonl"), {"epoch": 1})
    assert victim.read_text() == "precious" and not os.path.islink(out / "model_heated.pth")
    assert pgnm.safe_load(p)["v"].item() == 1


def test_a_linked_log_is_refused_at_start_and_never_trimmed(tmp_path, capsys):
    out = tmp_path / "o"
    _two_checkpoints(str(out))
    victim = tmp_path / "victim.jsonl"
    victim.write_text('{"epoch": 5}\n')
    os.symlink(victim, out / "log.jsonl")
    code = pgnm.cli([*TINY_CLI, "--output-dir", str(out), "--resume", "auto"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "log.jsonl is a symbolic link" in err, err
    assert victim.read_text() == '{"epoch": 5}\n'


def test_leftover_temp_files_are_removed_at_start_and_links_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    out = tmp_path / "o"
    out.mkdir()
    (out / "checkpoint.pth.tmp.4242").write_bytes(b"half a checkpoint")
    os.symlink(victim, out / "model_heated.pth.tmp.77")
    (out / "notes.tmp.1").write_text("not ours")
    pgnm.clean_temp_files(str(out), log=lambda *_: None)
    assert sorted(os.listdir(out)) == ["notes.tmp.1"] and victim.read_text() == "precious"


def test_a_new_run_never_overwrites_an_earlier_runs_checkpoints_or_appends_to_its_log(tmp_path, capsys):
    """Without --resume, a run in a folder holding an earlier run's checkpoint rotated it away (the earlier run lost)
    and appended its log lines to the earlier ones; a run that starts from scratch (no checkpoint) kept the lines of
    epochs no checkpoint held, so log.jsonl counted epoch 1 twice."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "checkpoint.pth").write_bytes(b"an earlier run")
    assert pgnm.cli([*TINY_CLI, "--output-dir", str(out)]) == 2
    err = _one_error_line(capsys)
    assert "holds an earlier run (checkpoint.pth)" in err and "--resume auto" in err, err
    assert (out / "checkpoint.pth").read_bytes() == b"an earlier run"
    (out / "checkpoint.pth").unlink()
    (out / "log.jsonl").write_text('{"phase": "heated", "epoch": 1, "train_loss": 99.0}\n')   # killed before a checkpoint
    assert pgnm.cli([*TINY_CLI, "--epochs", "1", "--synthetic-per-class", "1", "--output-dir", str(out),
                     "--resume", "auto"]) == 0
    log = read_log(str(out))
    assert [r["epoch"] for r in log] == [1, 1] and log[0]["train_loss"] != 99.0 and log[1]["final"], log
    for n in ("checkpoint.pth", "checkpoint_prev.pth"):    # a finished run whose checkpoints were deleted for space
        (out / n).unlink(missing_ok=True)
    model = (out / "model_heated.pth").read_bytes()
    for resume in ([], ["--resume", "auto"], ["--resume", str(tmp_path / "elsewhere.pth")]):
        assert pgnm.cli([*TINY_CLI, "--output-dir", str(out), *resume]) == 2
        err = _one_error_line(capsys)
        assert "holds an earlier run's model_heated.pth and no checkpoint" in err and "another --output-dir" in err, err
        assert (out / "model_heated.pth").read_bytes() == model
    (out / "model_heated.pth").rename(out / "model_heated_avg2.pth")    # --average-last 2 would have replaced it
    assert pgnm.cli([*TINY_CLI, "--output-dir", str(out), "--average-last", "2"]) == 2
    assert "holds an earlier run's model_heated_avg2.pth" in _one_error_line(capsys)
    assert (out / "model_heated_avg2.pth").read_bytes() == model
    (out / "model_heated_avg2.pth").rename(out / "model_finetune.pth")  # another phase's model is not in the way
    assert pgnm.cli([*TINY_CLI, "--epochs", "1", "--output-dir", str(out)]) == 0
    assert (out / "model_finetune.pth").read_bytes() == model


def test_a_lock_file_that_is_a_folder_or_a_link_is_one_line_saying_what_to_do(tmp_path, capsys):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    for kind in ("folder", "link"):
        out = tmp_path / kind
        out.mkdir()
        (out / ".lock").mkdir() if kind == "folder" else os.symlink(victim, out / ".lock")
        assert pgnm.cli([*TINY_CLI, "--output-dir", str(out)]) == 2
        err = _one_error_line(capsys)
        assert str(out / ".lock") in err and "remove a link or folder there" in err, err
    assert victim.read_text() == "precious"


def test_a_second_run_in_the_same_output_dir_is_refused_and_a_killed_one_leaves_no_lock(tmp_path, capsys):
    import signal
    out = str(tmp_path / "o")
    first = subprocess.Popen([sys.executable, os.path.join(HERE, "pgnm.py"), *TINY_CLI, "--epochs", "50",
                              "--workers", "0", "--output-dir", out], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        for line in first.stdout:                     # the header is printed once the folder is claimed
            if line.startswith("config (preset: "):
                break
        code = pgnm.cli([*TINY_CLI, "--output-dir", out])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert f"--output-dir {out} is in use by another run (pid {first.pid} on" in err, err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with pgnm.output_dir_lock(out, log=lambda *_: None):      # the kernel released the dead run's lock
        pass


def test_resume_with_other_flags_is_refused(tmp_path):
    pgnm.main(tiny(output_dir=str(tmp_path)))
    with pytest.raises(pgnm.UserError, match="--grid 8"):
        pgnm.main(tiny(output_dir=str(tmp_path), grid=4, resume="auto"))
    with pytest.raises(pgnm.UserError, match="does not exist"):
        pgnm.main(tiny(output_dir=str(tmp_path), resume=str(tmp_path / "nope.pth")))


def test_resume_restores_alpha_beta_instead_of_rerandomising(tmp_path):
    out = str(tmp_path)
    pgnm.main(tiny(output_dir=out, epochs=1))
    saved = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    seen = {}
    real = pgnm.train_one_epoch

    def spy(run, state, *a, **k):
        seen.setdefault("alpha", state.alpha_d.clone())
        return real(run, state, *a, **k)
    pgnm.train_one_epoch = spy
    try:
        pgnm.main(tiny(output_dir=out, epochs=2, resume="auto"))
    finally:
        pgnm.train_one_epoch = real
    assert torch.equal(seen["alpha"], saved["base_alpha"])


def _nan_objective(calls, bad):
    real = pgnm.paper_objective

    def patched(logp, ce):
        calls.append(1)
        out = real(logp, ce)
        return out * float("nan") if bad(len(calls)) else out
    return patched


def test_nan_loss_is_skipped_and_counted(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(pgnm, "paper_objective", _nan_objective(calls, lambda n: n in (3, 4)))
    before = {}
    real_step = pgnm.train_step

    def spy(run, state, x, y, *a):
        w = run.model_raw.conv1[0].weight.detach().clone()
        alpha = state.alpha_d.clone()
        fwd, ok, stop = real_step(run, state, x, y, *a)
        if not ok:
            before.setdefault("unchanged", []).append(torch.equal(w, run.model_raw.conv1[0].weight)
                                                       and torch.equal(alpha, state.alpha_d))
        return fwd, ok, stop
    monkeypatch.setattr(pgnm, "train_step", spy)
    pgnm.main(tiny(output_dir=str(tmp_path)))
    assert before["unchanged"] == [True, True]                   # weights and alpha_d untouched by skipped steps
    log = read_log(str(tmp_path))
    assert log[0]["bad_steps"] == 2 and math.isfinite(log[0]["train_loss"])


def test_too_many_bad_steps_stop_cleanly_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch):
    out = str(tmp_path)
    pgnm.main(tiny(output_dir=out))
    good = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    monkeypatch.setattr(pgnm, "paper_objective", _nan_objective([], lambda n: True))
    with pytest.raises(pgnm.TrainingStopped, match="3 non-finite steps in a row"):
        pgnm.main(tiny(output_dir=out, epochs=2, resume="auto", max_bad_steps=3))
    kept = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    assert kept["epoch"] == good["epoch"] and torch.equal(kept["base_alpha"], good["base_alpha"])


def _tiny_run(**kw):
    cfg = tiny(**kw)
    return pgnm.build_run(cfg, pgnm.DistInfo(), 24, False, log=lambda *_: None)


def _everything(run, state):
    """Every state a step may change, copied: weights, buffers, optimiser states, scaler, alpha_d/beta_d."""
    import copy
    return {"nets": [{k: v.clone() for k, v in n.state_dict().items()} for n in run.networks()],
            "opts": [copy.deepcopy(o.state_dict()) for o in run.optimizers()],
            "scaler": dict(run.scaler.state_dict()), "alpha": state.alpha_d.clone(), "beta": state.beta_d.clone()}


def _same(a, b):
    def eq(x, y):
        if isinstance(x, torch.Tensor):
            return torch.equal(x, y)
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(eq(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)):
            return len(x) == len(y) and all(eq(u, v) for u, v in zip(x, y))
        return x == y
    return eq(a, b)


def _fused_sgd(monkeypatch, fused: bool):
    """Build runs with fused SGD on the CPU too (CUDA's default), whose kernel skips a bad step by itself."""
    if fused:
        monkeypatch.setattr(pgnm, "sgd_implementation", lambda device: {"fused": True, "foreach": None})


@pytest.mark.parametrize("fused", [False, True], ids=["host-decides", "fused-kernel-skips"])
def test_a_skipped_step_leaves_every_state_as_it_was(monkeypatch, fused):
    """The heated step whose forward ran (BatchNorm statistics updated) but whose loss is NaN: weights, BatchNorm
    buffers, momentum, GradScaler and alpha_d/beta_d are bit for bit as before. A finite loss with overflowing
    gradients is GradScaler's own skip: only its scale changes (halved). Both ways of skipping: the host reads the
    flags before stepping (default SGD), or queues fused steps that the kernel skips (fused SGD, as on CUDA)."""
    _fused_sgd(monkeypatch, fused)
    torch.manual_seed(0)
    run, state = _tiny_run()
    assert pgnm.skips_on_device(run) == fused
    run.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8)
    assert pgnm.train_step(run, state, x, y)[1]                 # a good step: momentum buffers exist
    before = _everything(run, state)
    real = pgnm.paper_objective
    monkeypatch.setattr(pgnm, "paper_objective", lambda logp, ce: real(logp, ce) * float("nan"))
    _, taken, _ = pgnm.train_step(run, state, x * 3 + 1, y)    # other statistics: BatchNorm would move
    assert not taken and state.bad_in_a_row == 1 and state.amp_skipped == 0
    assert _same(_everything(run, state), before)
    assert all(torch.isfinite(v).all() for n in run.networks() for k, v in n.state_dict().items() if "running" in k)
    monkeypatch.setattr(pgnm, "paper_objective", real)
    hook = run.model_raw.fc.weight.register_hook(lambda g: g * float("inf"))
    _, taken, _ = pgnm.train_step(run, state, x, y)
    hook.remove()
    after = _everything(run, state)
    assert not taken and state.amp_skipped == 1 and state.bad_in_a_row == 1
    assert after["scaler"]["scale"] == before["scaler"]["scale"] / 2
    assert _same({k: v for k, v in after.items() if k != "scaler"}, {k: v for k, v in before.items() if k != "scaler"})


@pytest.mark.parametrize("fused", [False, True], ids=["host-decides", "fused-kernel-skips"])
def test_a_bad_first_step_then_a_good_one_equals_a_good_first_step(monkeypatch, fused):
    """The very first step skipped (no momentum yet), then a good one: weights and momentum exactly those of a run
    whose first step was the good one. (A fused kernel that skips its first step would leave the momentum buffer it
    allocated uninitialised; step_unless makes it zero first.)"""
    _fused_sgd(monkeypatch, fused)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8)
    real = pgnm.paper_objective
    ends = []
    for bad_first in (False, True):
        torch.manual_seed(0)
        run, state = _tiny_run()
        run.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        if bad_first:
            monkeypatch.setattr(pgnm, "paper_objective", lambda logp, ce: real(logp, ce) * float("nan"))
            assert not pgnm.train_step(run, state, x, y)[1]
            monkeypatch.setattr(pgnm, "paper_objective", real)
            if fused:     # the skipped first step left zero momentum buffers, which a first step treats as none
                assert all(not s["momentum_buffer"].any() for o in run.optimizers() for s in o.state.values())
                assert sum(len(o.state) for o in run.optimizers()) > 0
        torch.manual_seed(1)
        assert pgnm.train_step(run, state, x, y)[1]
        ends.append(_everything(run, state) | {"scaler": None})
    assert _same(ends[0], ends[1])
    assert all(torch.isfinite(s["momentum_buffer"]).all() for o in ends[1]["opts"] for s in o["state"].values())


def test_a_skipped_step_restores_the_buffers_of_a_network_moved_after_the_first_step(monkeypatch):
    """The buffer copy a skip restores from is made once; a network whose buffers were replaced since (`.to()`,
    `_apply`) gets a new one, so the skip restores the buffers the network holds now."""
    torch.manual_seed(0)
    run, state = _tiny_run()
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8)
    assert pgnm.train_step(run, state, x, y)[1]
    run.model_raw._apply(lambda t: t.clone())                    # every buffer (and parameter data) a new tensor
    before = {k: v.clone() for k, v in run.model_raw.state_dict().items()}
    real = pgnm.paper_objective
    monkeypatch.setattr(pgnm, "paper_objective", lambda logp, ce: real(logp, ce) * float("nan"))
    assert not pgnm.train_step(run, state, x * 3 + 1, y)[1]
    assert _same({k: v for k, v in run.model_raw.state_dict().items()}, before)


def test_fused_sgd_steps_equal_default_sgd_steps_across_a_skipped_step(monkeypatch):
    """Three heated steps, the second one NaN, with fused SGD (the kernel skips) and with default SGD (the host
    skips): the same weights and momentum to float32 rounding."""
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8)
    real = pgnm.paper_objective
    ends = []
    for fused in (False, True):
        _fused_sgd(monkeypatch, fused)
        torch.manual_seed(0)
        run, state = _tiny_run()
        for i in range(3):
            monkeypatch.setattr(pgnm, "paper_objective", (lambda logp, ce: real(logp, ce) * float("nan"))
                                if i == 1 else real)
            torch.manual_seed(10 + i)
            assert pgnm.train_step(run, state, x + i, y)[1] == (i != 1)
        ends.append([p.detach().clone() for p in run.parameters()]
                    + [s["momentum_buffer"] for o in run.optimizers() for s in o.state.values()])
    assert len(ends[0]) == len(ends[1])
    for a, b in zip(*ends):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_holding_nan_is_never_written(tmp_path):
    out = str(tmp_path)
    run, state = _two_checkpoints(out)
    before = {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out)) if f.endswith(".pth")}
    run.model_raw.bn1.running_var[3] = float("nan")
    with pytest.raises(pgnm.Diverged, match="bn1.running_var.*not written"):
        pgnm.save_checkpoint(run, state, 0, 3, 12, {"loss_sum": 0.0, "n_ok": 3})
    after = {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out)) if f.endswith(".pth")}
    assert after == before


def test_divergence_exits_4_with_only_finite_checkpoints_and_the_advised_lr_is_used(tmp_path, capsys):
    """The report's case: lr 1e6, checkpoints every 2 steps, 5 bad steps allowed. Every checkpoint left is finite,
    the exit code (4) is not the requeue code (3), and resuming with a lower --lr uses it."""
    out = str(tmp_path / "o")
    args = [*TINY_CLI, "--batch-size", "24", "--save-every-steps", "2", "--max-bad-steps", "5", "--output-dir", out]
    code = pgnm.cli([*args, "--lr", "1e6"])
    err = capsys.readouterr().err.strip()
    assert code == 4 and len(err.splitlines()) == 1 and "non-finite steps in a row" in err and "--lr" in err, err
    names = [f for f in os.listdir(out) if f.startswith("checkpoint")]
    assert names
    for f in names:
        ck = pgnm.verify_and_load(os.path.join(out, f))
        assert not pgnm.nonfinite_tensors(ck), f
    assert all(json.loads(ln, parse_constant=pytest.fail) for ln in open(os.path.join(out, "log.jsonl")))
    pgnm.cli([*args, "--lr", "0.01", "--resume", "auto"])
    stdout = capsys.readouterr().out
    assert "--lr 1000000.0" in stdout and "this run has --lr 0.01" in stdout
    assert re.search(r"step \d+/4\s+loss \S+\s+lr 0\.01\s", stdout), stdout[-2000:]


def test_a_run_whose_every_step_is_skipped_does_not_exit_0(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pgnm, "paper_objective", _nan_objective([], lambda n: True))
    out = str(tmp_path / "o")
    code = pgnm.cli([*TINY_CLI, "--epochs", "1", "--batch-size", "48", "--max-bad-steps", "50", "--output-dir", out])
    err = capsys.readouterr().err.strip()
    assert code == 4 and "every step of epoch 1 was skipped" in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(os.path.join(out, "checkpoint.pth"))
    assert not os.path.exists(os.path.join(out, "model_heated.pth"))


def _small_tree(root, classes=("a", "b"), n=6):
    for split, k in (("train", n), ("val", 2)):
        for c in classes:
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(k):
                Image.fromarray(np.full((16, 16), 30 * i + (60 if c == classes[0] else 0), np.uint8)).save(
                    root / split / c / f"{i}.png")


@pytest.mark.parametrize("change", ["class_renamed", "image_added", "npz_other_seed"])
def test_resume_on_other_training_data_is_refused(tmp_path, change):
    """A class renamed (the sorted order, hence every label, shifts), an image added, or a merged .npz split by
    another --seed between a stop and its resume: refused in one line, nothing trained or overwritten."""
    if change == "npz_other_seed":
        data = str(tmp_path / "m.npz")
        _write_npz(data, merged=True, n=60, size=16)
    else:
        data = tmp_path / "d"
        _small_tree(data)
        data = str(data)
    kw = dict(data_path=data, output_dir=str(tmp_path / "o"), model="resnet10t", train_crop_size=16,
              val_resize_size=16, val_crop_size=16, batch_size=4, workers=0, device="cpu", print_freq=1000)
    with contextlib.redirect_stdout(io.StringIO()):
        pgnm.main(pgnm.make_config("baseline", epochs=1, **kw))
    before = pathlib.Path(tmp_path / "o" / "checkpoint.pth").read_bytes()
    if change == "class_renamed":
        for split in ("train", "val"):
            os.rename(os.path.join(data, split, "a"), os.path.join(data, split, "zz"))
        needle = "was trained on other classes (class 0 was 'a', now 'b'): the labels would be permuted"
    elif change == "image_added":
        shutil.copy(os.path.join(data, "train", "b", "0.png"), os.path.join(data, "train", "b", "new.png"))
        needle = "was trained on other training data (12 images then, 13 now)"
    else:
        kw["seed"] = 1
        needle = "was trained on other training data (48 images then, 48 now, other images or split)"
    with pytest.raises(pgnm.UserError, match=re.escape(needle)):
        with contextlib.redirect_stdout(io.StringIO()):
            pgnm.main(pgnm.make_config("baseline", epochs=2, resume="auto", **kw))
    assert pathlib.Path(tmp_path / "o" / "checkpoint.pth").read_bytes() == before


def test_bench_data_times_the_loader_after_its_first_batch(tmp_path, capsys):
    """--bench-data counts only the images loaded after the clock starts (the first batch, which pays for the workers'
    start-up, was counted once without its time) and never checks the grid it does not use."""
    _small_tree(tmp_path / "d")                                       # 2 classes x 6 training images
    assert pgnm.cli(["--bench-data", str(tmp_path / "d"), "--batch-size", "4", "--train-crop-size", "16",
                     "--val-crop-size", "16", "--val-resize-size", "16", "--workers", "0"]) == 0   # grid 64 > 16 px
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["images"] == 8 and res["images_per_s"] > 0             # batches 2 and 3 of 3


def test_hidden_files_and_folders_are_not_images(tmp_path):
    """A copy from a Mac leaves ._x.png (AppleDouble metadata, not a PNG) beside each image; a notebook leaves
    .ipynb_checkpoints/. Both used to be read as images and stop the run mid-epoch."""
    _small_tree(tmp_path / "d")
    (tmp_path / "d" / "train" / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    os.makedirs(tmp_path / "d" / "train" / "b" / ".ipynb_checkpoints")
    (tmp_path / "d" / "train" / "b" / ".ipynb_checkpoints" / "0.png").write_bytes(b"")
    ds = pgnm.ImageFolderDataset(str(tmp_path / "d" / "train"))
    assert len(ds) == 12 and not any(os.sep + "." in p for p, _ in ds.samples)
    assert all(ds[i][0].shape == (3, 16, 16) for i in range(len(ds)))


def test_small_unhappy_paths_of_a_run(tmp_path, capsys):
    """/dev/null as --output-dir; a file where --average-last keeps its weights (found only after an epoch's
    training); classes no training image has (.npz labels {0, 2}); a '-0.0000' entropy; a '|' in a table label."""
    assert pgnm.cli(["--output-dir", "/dev/null"]) == 2
    assert "--output-dir /dev/null is a file, not a folder" in _one_error_line(capsys)
    with pytest.raises(SystemExit, match="2"):                                  # the bench modes too
        pgnm.cli(["--bench", "--amp-dtype", "float16"])
    assert "--amp-dtype not used by a run without --amp" in _one_error_line(capsys)
    os.makedirs(tmp_path / "o")
    (tmp_path / "o" / "epoch_weights").write_text("not a folder")
    with pytest.raises(pgnm.UserError, match="epoch_weights is in the way of --average-last's folder"):
        pgnm.main(tiny("baseline", output_dir=str(tmp_path / "o"), average_last=1))
    assert not (tmp_path / "o" / "config.json").exists()
    rng = np.random.default_rng(0)
    labels = np.array([0, 2] * 30)
    np.savez(tmp_path / "gap.npz", images=rng.integers(0, 255, (60, 16, 16), dtype=np.uint8), labels=labels)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        pgnm.main(pgnm.make_config("baseline", data_path=str(tmp_path / "gap.npz"), output_dir=str(tmp_path / "g"),
                                   model="resnet10t", train_crop_size=16, val_resize_size=16, val_crop_size=16,
                                   batch_size=8, workers=0, device="cpu", val_split=0.2))
    assert "warning: 1 of 3 classes have no training image (e.g. '1'): the classifier cannot learn them" \
        in printed.getvalue()
    sure = pgnm.classification_metrics(torch.eye(3)[[0, 1, 2, 0]], torch.tensor([0, 1, 2, 0]))
    assert sure["entropy"] == 0.0 and math.copysign(1.0, sure["entropy"]) == 1.0 and f"{sure['entropy']:.4f}" == "0.0000"
    table = ev.markdown_table({"d": {"mlp": {"a|b": {"f1_mean": 0.5, "f1_ci": 0.1}}, "task": "multiclass",
                                     "n_samples": 3, "trials": 2}}, ["a|b"])
    assert all(row.count("|") - row.count("\\|") == 3 for row in table.splitlines()), table


def test_resume_never_overwrites_another_run_nor_trains_past_epochs(tmp_path):
    """--resume of one run's checkpoint into a folder holding another run, and --epochs below the epochs a checkpoint
    has trained, are refused in one line and leave every file as it was."""
    with contextlib.redirect_stdout(io.StringIO()):
        pgnm.main(tiny("baseline", output_dir=str(tmp_path / "a"), epochs=2))
        pgnm.main(tiny("baseline", output_dir=str(tmp_path / "victim")))
    files = {p: p.read_bytes() for p in (tmp_path / "victim").iterdir() if p.is_file()}
    with pytest.raises(pgnm.UserError, match="holds another run .*continuing it here would overwrite that run"):
        pgnm.main(tiny("baseline", output_dir=str(tmp_path / "victim"), epochs=3,
                       resume=str(tmp_path / "a" / "checkpoint.pth")))
    assert {p: p.read_bytes() for p in (tmp_path / "victim").iterdir() if p.is_file()} == files
    before = (tmp_path / "a" / "checkpoint.pth").read_bytes()
    with pytest.raises(pgnm.UserError, match=r"has trained 2 epochs, more than --epochs 1: give --epochs 2 or more"):
        pgnm.main(tiny("baseline", output_dir=str(tmp_path / "a"), epochs=1, resume="auto"))
    with pytest.raises(pgnm.UserError, match=r"has 24 classifier outputs, this run 30 \(--num-classes"):
        pgnm.main(tiny("baseline", output_dir=str(tmp_path / "a"), epochs=3, resume="auto", num_classes=30))
    # Nothing left to train, continued into a new folder: the folder gets the checkpoint, so --resume auto there
    # continues the run instead of starting afresh over its model file.
    with contextlib.redirect_stdout(io.StringIO()):
        pgnm.main(tiny("baseline", output_dir=str(tmp_path / "new"), epochs=2,
                       resume=str(tmp_path / "a" / "checkpoint.pth")))
    assert (tmp_path / "new" / "checkpoint.pth").read_bytes() == before
    assert (tmp_path / "a" / "checkpoint.pth").read_bytes() == before


def test_output_dir_inside_the_data_and_a_warm_up_as_long_as_the_run(tmp_path):
    _small_tree(tmp_path / "d")
    kw = dict(data_path=str(tmp_path / "d"), model="resnet10t", train_crop_size=16, val_resize_size=16,
              val_crop_size=16, batch_size=4, workers=0, device="cpu", print_freq=1000)
    with pytest.raises(pgnm.UserError, match="lies inside .*train: its figures would be read as images of a class"):
        pgnm.main(pgnm.make_config("baseline", output_dir=str(tmp_path / "d" / "train" / "run1"), **kw))
    assert not (tmp_path / "d" / "train" / "run1").exists()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        pgnm.main(pgnm.make_config("baseline", output_dir=str(tmp_path / "d" / "runs" / "ft"), epochs=2,   # beside
                                   lr_warmup_epochs=2, **kw))                                   # the splits: fine
    assert "warning: --lr-warmup-epochs 2 is not shorter than --epochs 2: the lr never leaves its warm-up" \
        in printed.getvalue()


def test_average_refuses_a_file_listed_twice_and_writing_over_an_input(tmp_path):
    a, b = str(tmp_path / "a.pth"), str(tmp_path / "b.pth")
    for p in (a, b):
        torch.save(pgnm.build_model("resnet10t", 3).state_dict(), p)
    before = pathlib.Path(a).read_bytes()
    with pytest.raises(pgnm.UserError, match="--average lists .*a.pth twice: it would count double"):
        pgnm.average_checkpoints([a, b, str(tmp_path / "." / "a.pth")], str(tmp_path / "avg.pth"))
    with pytest.raises(pgnm.UserError, match="--average-output .*a.pth is one of the files averaged"):
        pgnm.average_checkpoints([a, b], a)
    assert pathlib.Path(a).read_bytes() == before and not (tmp_path / "avg.pth").exists()


def test_resume_with_a_new_lr_rebuilds_the_schedules_and_keeps_momentum(tmp_path):
    torch.manual_seed(0)
    run1, state1 = _tiny_run(lr=0.02, epochs=1)
    pgnm.train_step(run1, state1, torch.randn(8, 3, 32, 32), torch.arange(8))
    ck = pgnm.make_checkpoint(run1, state1, 0, 12, 12, {"loss_sum": 0.0, "n_ok": 12})   # epoch 1 of 1 done
    run2, state2 = _tiny_run(lr=0.01, epochs=3, output_dir=str(tmp_path))
    msgs = []
    start = pgnm.restore_run(run2, state2, ck, "c.pth", 12, msgs.append)
    assert start.epoch == 1
    assert run2.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)                 # StepLR(4): not yet decayed
    assert run2.pol_optimizer.param_groups[0]["lr"] == pytest.approx(0.001 * (1 + math.cos(math.pi / 3)) / 2)
    mom1 = [s["momentum_buffer"] for s in run1.optimizer.state_dict()["state"].values()]
    mom2 = [s["momentum_buffer"] for s in run2.optimizer.state_dict()["state"].values()]
    assert mom1 and all(torch.equal(a, b) for a, b in zip(mom1, mom2))
    note = [m for m in msgs if m.startswith("note:")]
    assert len(note) == 1 and "--epochs 1 --lr 0.02" in note[0] and "this run has --epochs 3 --lr 0.01" in note[0]
    run3, state3 = _tiny_run(lr=0.02, epochs=1, output_dir=str(tmp_path))                # same flags: no note
    msgs.clear()
    pgnm.restore_run(run3, state3, ck, "c.pth", 12, msgs.append)
    assert not [m for m in msgs if m.startswith("note:")]


def test_resume_with_other_flags_than_the_schedules_says_so(tmp_path):
    """--kernel, --sigma, --seed, --tau-image changed on resume were taken without a word, and config.json then
    claimed the new values for the whole run."""
    run1, state1 = _tiny_run(epochs=2)
    ck = pgnm.make_checkpoint(run1, state1, 0, 12, 12, {"loss_sum": 0.0, "n_ok": 12})   # epoch 1 of 2 done
    run2, state2 = _tiny_run(epochs=2, kernel=5, sigma=2.0, seed=3, tau_image=0.5, workers=1, output_dir=str(tmp_path))
    msgs = []
    pgnm.restore_run(run2, state2, ck, "c.pth", 12, msgs.append)
    note = [m for m in msgs if m.startswith("note:")]
    assert len(note) == 1, msgs
    assert "written with --seed 0 --kernel 3 --sigma 1.0 --tau-image 0.9;" in note[0], note
    assert "this run has --seed 3 --kernel 5 --sigma 2.0 --tau-image 0.5" in note[0] and "epoch 2" in note[0], note
    assert "--workers" not in note[0] and "--output-dir" not in note[0], note


def test_log_lines_are_strict_json_with_null_for_nan(tmp_path):
    p = str(tmp_path / "log.jsonl")
    pgnm._append_jsonl(p, {"val_auroc": float("nan"), "x": [float("inf"), 1.0]})
    rec = json.loads(open(p).read(), parse_constant=pytest.fail)
    assert rec == {"val_auroc": None, "x": [None, 1.0]}


# =====================================================================================================================
#  Distributed: two gloo processes on CPU
# =====================================================================================================================


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, cfg_kw, out_dir, env_style):
    """One rank: run pgnm.main and save what that rank holds at the end (every rank builds the checkpoint)."""
    if env_style == "torchrun":
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    else:
        os.environ.update(SLURM_PROCID=str(rank), SLURM_NTASKS=str(world), SLURM_LOCALID=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    captured = {}
    real = pgnm.make_checkpoint

    def spy(run, *a, **k):
        captured["payload"] = real(run, *a, **k)
        return captured["payload"]
    pgnm.make_checkpoint = spy
    res = pgnm.main(pgnm.make_config(**cfg_kw))
    torch.save({"payload": captured["payload"], "res": res}, os.path.join(out_dir, f"rank{rank}.pth"))


def _spawn(cfg_kw, out_dir, env_style="torchrun", world=2):
    import torch.multiprocessing as mp
    mp.spawn(_ddp_worker, args=(world, _free_port(), cfg_kw, out_dir, env_style), nprocs=world, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pth"), weights_only=True) for r in range(world)]


@pytest.mark.parametrize("env_style", ["torchrun", "slurm"])
def test_two_process_heated_run_stays_in_sync_and_counts_every_sample(tmp_path, env_style):
    data = str(tmp_path / "d.npz")
    _write_npz(data, n=61, size=32)                       # 61 val/test samples: not divisible by 2 ranks
    kw = dict(phase="heated", data_path=data, model="resnet10t", train_crop_size=32, val_resize_size=32, val_crop_size=32, grid=8,
              kernel=3, sigma=1.0, epochs=2, batch_size=8, print_freq=1000, workers=0, device="cpu",
              output_dir=str(tmp_path / "out"), sync_bn=True)
    r0, r1 = _spawn(kw, str(tmp_path), env_style)
    p0, p1 = r0["payload"], r1["payload"]
    assert torch.equal(p0["base_alpha"], p1["base_alpha"]) and torch.equal(p0["base_beta"], p1["base_beta"])
    assert not torch.equal(p0["base_alpha"], torch.rand(1, 64, generator=torch.Generator().manual_seed(0)))
    for part in ("model", "policy_net"):
        for k in p0[part]:
            assert torch.equal(p0[part][k], p1[part][k]), (part, k)
    assert len(p0["rng"]) == 2 and not torch.equal(p0["rng"][0]["torch"], p0["rng"][1]["torch"])
    assert r0["res"]["val_n"] == 61 and r0["res"]["test_n"] == 61
    assert r0["res"]["val_acc"] == r1["res"]["val_acc"]
    # the metrics over the gathered predictions equal a single-process evaluation of the saved model
    model = pgnm.build_model("resnet10t", 3)
    model.load_state_dict(torch.load(tmp_path / "out" / "model_heated.pth", weights_only=True))
    cfg = pgnm.make_config(**kw)
    ds = pgnm.build_datasets(cfg)["val"]
    loader = torch.utils.data.DataLoader(ds, batch_size=16)
    probs, target = pgnm.predict(model, loader, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    single = pgnm.classification_metrics(probs, target)
    assert single["acc"] == pytest.approx(r0["res"]["val_acc"], abs=1e-9)
    assert single["auroc"] == pytest.approx(r0["res"]["val_auroc"], abs=1e-6)
    log = read_log(str(tmp_path / "out"))
    assert [r["epoch"] for r in log] == [1, 2, 2]                  # rank 0 alone writes


def test_sync_bn_checkpoint_loads_into_a_plain_model(tmp_path):
    pgnm.main(tiny(output_dir=str(tmp_path), sync_bn=True))      # world size 1: converted, runs as plain BN
    ck = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    plain = pgnm.build_model("resnet10t", 24)
    plain.load_state_dict(ck["model"], strict=True)
    pgnm.PolicyNet(8).load_state_dict(ck["policy_net"], strict=True)
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(pgnm.build_model("resnet10t", 24))
    assert list(converted.state_dict()) == list(plain.state_dict())


def test_eval_sampler_counts_every_sample_once():
    s0, s1 = list(pgnm.EvalSampler(7, 0, 2)), list(pgnm.EvalSampler(7, 1, 2))
    assert sorted(s0 + s1) == list(range(7)) and not set(s0) & set(s1)


def _gather_rows(rank, n):
    """Rank r's n rows: (n, 2) float32 and (n,) int64 values that say which rank and row they came from."""
    rows = torch.arange(n, dtype=torch.float32) + 100 * rank
    return torch.stack([rows, -rows], 1), torch.arange(n, dtype=torch.int64) + 1000 * rank


def _gather_worker(rank, world, store, out_dir, lengths):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        got = [[pgnm.all_gather_cat(t) for t in _gather_rows(rank, ns[rank])] for ns in lengths]
    finally:
        dist.destroy_process_group()
    torch.save(got, os.path.join(out_dir, f"gather{rank}.pth"))


def test_all_gather_cat_concatenates_uneven_ranks_in_rank_order(tmp_path):
    """Two gloo processes holding different numbers of rows (one of them none): every rank gets all rows, in rank
    order, with their dtype, and no padding row."""
    import torch.multiprocessing as mp
    lengths = [(3, 1), (0, 2), (2, 2)]
    # fork: the children need not import torch again (seconds on a busy machine); they run one thread, no OpenMP
    mp.start_processes(_gather_worker, args=(2, str(tmp_path / "store"), str(tmp_path), lengths), nprocs=2,
                       start_method="fork")
    for rank in range(2):
        got = torch.load(tmp_path / f"gather{rank}.pth", weights_only=True)
        for ns, (probs, labels) in zip(lengths, got):
            parts = [_gather_rows(r, n) for r, n in enumerate(ns)]
            assert torch.equal(probs, torch.cat([p for p, _ in parts])) and probs.dtype == torch.float32
            assert torch.equal(labels, torch.cat([lab for _, lab in parts])) and labels.dtype == torch.int64
            assert probs.shape == (sum(ns), 2)
    assert pgnm.all_gather_cat(torch.ones(2, 3)).shape == (2, 3)       # no process group: the tensor itself


# =====================================================================================================================
#  Precision: autocast (bf16 on CPU here; fp16 + GradScaler on GPU when one is present)
# =====================================================================================================================


def _extreme_run(cfg, dtype_amp=True):
    torch.manual_seed(0)
    policy, model = pgnm.PolicyNet(cfg.grid), pgnm.build_model("resnet10t", 24)
    with torch.no_grad():                 # extreme policy outputs: last layers scaled up
        for head in (policy.alpha, policy.beta):
            head[6].weight.mul_(1e3)
            head[6].bias.fill_(30.0)
    opt, pol_opt = torch.optim.SGD(model.parameters(), lr=0.01), torch.optim.SGD(policy.parameters(), lr=0.001)
    return (pgnm.Run(cfg, pgnm.DistInfo(), model, opt, policy=policy, pol_optimizer=pol_opt),
            pgnm.StepState(torch.rand(1, 64), torch.rand(1, 64)))


@pytest.mark.parametrize("objective", ["paper", "reinforce"])
def test_objective_and_gradients_finite_under_bf16_autocast_for_extreme_policy_outputs(objective):
    run, state = _extreme_run(tiny(amp=True, amp_dtype="bfloat16", objective=objective))
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 24, (8,))
    with run.autocast():
        a, _ = run.policy(x)
    assert a.dtype == torch.bfloat16 and a.abs().max() > 100       # autocast is really on, outputs really extreme
    loss = pgnm.compute_loss(run, state, x, y).loss
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    for p in run.parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all()


def test_bf16_training_runs_end_to_end(tmp_path):
    res = pgnm.main(tiny(output_dir=str(tmp_path), amp=True, amp_dtype="bfloat16", synthetic_per_class=1))
    assert math.isfinite(res["val_loss"])
    assert read_log(str(tmp_path))[0]["bad_steps"] == 0


# --- devices: what a --device string becomes, tested without a GPU by pretending one ------------------------------


@pytest.fixture
def fake_gpus(monkeypatch):
    """torch.cuda pretends n GPUs are visible; set_device only records (no CUDA call is ever made)."""
    calls = []

    def install(n=2):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(d))
        monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)   # restored after
        return calls
    return install


def test_device_strings_resolve_to_indexed_cuda_devices(fake_gpus):
    fake_gpus(2)
    cases = {(None, 0, 1): "cuda:0", ("cuda", 0, 1): "cuda:0", ("cuda:1", 0, 1): "cuda:1", (" CUDA:1 ", 0, 1): "cuda:1",
             ("cuda", 1, 2): "cuda:1", (None, 1, 2): "cuda:1", ("cpu", 1, 2): "cpu"}
    for (spec, local, world), want in cases.items():
        dev = pgnm.resolve_device(spec, local, world)
        assert dev == torch.device(want), (spec, local, world)
        assert dev.type == "cpu" or dev.index is not None            # torch.cuda.set_device needs the index
    for spec, local, world, needle in [("cuda:2", 0, 1, "only 2 GPU(s)"), ("cuda:0", 0, 2, "LOCAL_RANK"),
                                       ("cuda", 3, 4, "LOCAL_RANK 3 but only 2"), ("tpu", 0, 1, "cpu, cuda or cuda:N"),
                                       ("cuda:x", 0, 1, "cpu, cuda or cuda:N"), ("gpu", 0, 1, "cpu, cuda or cuda:N")]:
        with pytest.raises(pgnm.UserError, match=re.escape(needle)):
            pgnm.resolve_device(spec, local, world)


def test_device_without_a_gpu(fake_gpus, monkeypatch):
    fake_gpus(0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert pgnm.resolve_device(None) == torch.device("cpu")
    with pytest.raises(pgnm.UserError, match="no CUDA GPU is visible.*CUDA_VISIBLE_DEVICES=''.*--device cpu"):
        pgnm.resolve_device("cuda")
    for spelling in ("CPU", " cpu "):                  # the trainer's flag check and evaluate.py read it alike
        pgnm.validate_config(pgnm.make_config("heated", device=spelling))
        assert pgnm.resolve_device(spelling) == torch.device("cpu")


@pytest.mark.parametrize("spec", [None, "cuda", "cuda:1"])
def test_setup_distributed_and_bench_give_set_device_an_index(fake_gpus, monkeypatch, spec):
    """The crash of issue 11: torch.cuda.set_device(torch.device('cuda')) raises; every entry point passes an index,
    also as a single torchrun process (RANK/WORLD_SIZE/LOCAL_RANK set, world size 1)."""
    calls = fake_gpus(2)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    info = pgnm.setup_distributed(spec)
    monkeypatch.setenv("RANK", "0"), monkeypatch.setenv("WORLD_SIZE", "1"), monkeypatch.setenv("LOCAL_RANK", "0")
    info_torchrun = pgnm.setup_distributed(spec)
    bench_info, _ = pgnm.bench_device(pgnm.Config(device=spec), log=lambda *a: None)
    want = torch.device("cuda", 1 if spec == "cuda:1" else 0)
    assert info.device == info_torchrun.device == bench_info.device == want
    assert calls == [want] * 3 and all(isinstance(c, torch.device) and c.index is not None for c in calls)


def test_channels_last_default_is_on_for_cuda_with_amp_only():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert pgnm.use_channels_last(tiny(amp=True), cuda) is True
    assert pgnm.use_channels_last(tiny(amp=False), cuda) is False
    assert pgnm.use_channels_last(tiny(amp=True), cpu) is False
    assert pgnm.use_channels_last(tiny(amp=True, channels_last=False), cuda) is False
    assert pgnm.use_channels_last(tiny(channels_last=True), cpu) is True
    parse = lambda *a: vars(pgnm.build_parser().parse_args(list(a)))       # noqa: E731
    assert parse("--no-channels-last")["channels_last"] is False and parse("--channels-last")["channels_last"] is True
    assert "channels_last" not in parse()                                   # absent: the automatic rule decides


def test_sgd_is_fused_on_cuda_and_a_restored_gpu_state_runs_on_cpu(tmp_path, one_thread):
    assert pgnm.sgd_implementation(torch.device("cuda", 0)) == {"fused": True, "foreach": None}
    assert pgnm.sgd_implementation(torch.device("cpu")) == {"fused": None, "foreach": None}
    cfg = tiny(output_dir=str(tmp_path))
    run, state = pgnm.build_run(cfg, pgnm.DistInfo(), 24, False, lambda *a: None)
    for opt in run.optimizers():                  # as loaded from a checkpoint written on a GPU
        opt.param_groups[0]["fused"] = True
    pgnm.wrap_for_training(run)
    assert all(g["fused"] is None for opt in run.optimizers() for g in opt.param_groups)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 24, (8,))
    before = [p.detach().clone() for p in run.parameters()]
    _, taken, _ = pgnm.train_step(run, state, x, y)
    assert taken and any(not torch.equal(a, p) for a, p in zip(before, run.parameters()))


def test_fp16_overflow_is_explained_once_then_counted(tmp_path, monkeypatch, capsys, one_thread):
    real = pgnm.train_step
    calls = []

    def overflow_on_steps_1_and_2(run, state, x, y, *a):
        calls.append(1)
        fwd, taken, stop = real(run, state, x, y, *a)
        if len(calls) in (2, 3):                 # what train_step reports for a GradScaler skip
            state.amp_skipped += 1
            return fwd, False, stop
        return fwd, taken, stop
    monkeypatch.setattr(pgnm, "train_step", overflow_on_steps_1_and_2)
    pgnm.main(tiny(output_dir=str(tmp_path), synthetic_per_class=1))       # 24 images, 3 steps
    out = capsys.readouterr().out
    assert out.count("fp16 overflow") == 1 and "fp16 overflow at epoch 1 step 2" in out
    assert "GradScaler skipped 2 fp16-overflow step(s) in epoch 1 (2 in the run)" in out
    assert read_log(str(tmp_path))[0]["amp_skipped_steps"] == 2


def test_compile_modes_reach_torch_compile_and_train(tmp_path, monkeypatch, one_thread):
    """--compile --compile-mode M compiles both networks with mode M. The compiler here is dynamo + AOTAutograd
    without code generation (aot_eager: the graphs torch.compile would hand to inductor, run eagerly), so the test
    takes seconds on a CPU; the inductor build itself runs in tools/gpu_check.sh."""
    seen = []
    real = torch.compile

    def compile_spy(model, mode=None, **kw):
        seen.append(mode)
        return real(model, backend="aot_eager")
    monkeypatch.setattr(torch, "compile", compile_spy)
    torch._dynamo.reset()
    res = pgnm.main(tiny(output_dir=str(tmp_path), compile=True, compile_mode="reduce-overhead",
                         synthetic_per_class=1))
    assert seen == ["reduce-overhead", "reduce-overhead"] and math.isfinite(res["val_loss"])
    ck = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in [*ck["model"], *ck["policy_net"]])
    with pytest.raises(pgnm.UserError, match="--compile-mode 'fast'"):
        pgnm.main(tiny(output_dir=str(tmp_path / "bad"), compile=True, compile_mode="fast"))


@pytest.fixture
def one_thread():
    """Timing code on a shared 2-core machine: one thread, or OpenMP's spinning threads wait for each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


BENCH_KEYS = {"baseline_ms", "heated_ms", "classifier_ms", "policy_ms", "mask_ms", "authors_ms", "authors_fp32_ms",
              "heated_over_parts", "heated_over_baseline", "mask_share", "authors_over_heated",
              "authors_fp32_over_heated", "heated_img_s", "peak_mem_mb", "baseline_host_ms", "policy_host_ms"}


@pytest.mark.parametrize("kw", [dict(), dict(amp=True, policy_size=16, channels_last=True)])
def test_bench_reports_every_time_and_ratio(kw, one_thread, capsys):
    cfg = pgnm.Config(device="cpu", model="resnet10t", batch_size=2, train_crop_size=32, grid=8, kernel=3, sigma=1.0,
                      **kw)
    res = pgnm.bench(cfg, rounds=2, warmup=1)
    assert set(res) == BENCH_KEYS
    assert all(math.isfinite(v) and v > 0 for v in res.values())
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert BENCH_KEYS <= set(line) and line["device"] == "cpu"
    assert line["channels_last"] is bool(kw) and line["policy_size"] == kw.get("policy_size")


def test_bench_e2e_from_png_files(tmp_path, one_thread):
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_png_folder", os.path.join(HERE, "tools", "make_png_folder.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    counts = tool.make_png_folder(str(tmp_path / "pngs"), size=40, per_class=1, copies=2, val_per_class=1)
    assert counts == {"train": 48, "val": 24}
    assert len(os.listdir(tmp_path / "pngs" / "train")) == 24
    cfg = pgnm.make_config("heated", data_path=str(tmp_path / "pngs"), device="cpu", model="resnet10t",
                           batch_size=8, train_crop_size=32, val_resize_size=32, val_crop_size=32, grid=8, kernel=3,
                           sigma=1.0, workers=0, output_dir=str(tmp_path / "out"))
    res = pgnm.bench_e2e(cfg, steps=3)
    assert res["steps"] == 3 and res["epochs_touched"] >= 4      # 20 untimed + 3 timed steps of 6 per epoch
    for k in ("e2e_img_s", "resident_img_s", "e2e_over_resident"):
        assert math.isfinite(res[k]) and res[k] > 0
    assert 0 <= res["data_wait_share"] < 1


# --- GPU: skipped without CUDA; tools/gpu_check.sh runs them ---------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_gradscaler_on_gpu(tmp_path, monkeypatch):
    res = pgnm.main(tiny(output_dir=str(tmp_path), amp=True, device="cuda", epochs=2))
    assert math.isfinite(res["val_loss"])
    ck = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    rec = read_log(str(tmp_path))[-2]
    # a GradScaler skip (overflow in the backward) halves the initial 2^16, and there is no growth within 2000 steps;
    # a bad step (a non-finite loss) leaves the scale as it was (train_step passes new_scale=get_scale())
    assert ck["scaler"]["scale"] == 65536.0 * 0.5 ** rec["amp_skipped_steps"]
    assert rec["amp_skipped_steps"] + rec["bad_steps"] < 24                        # 24 steps: some were taken
    # One step at a time, from a scale so large (2^40) that the first backward must overflow fp16 (max 65504):
    # a skip leaves weights and alpha_d as they were, is counted as a GradScaler skip (not a bad step) and halves
    # the scale; once the scale fits, the step is taken, changes the weights and keeps the scale.
    run, state = pgnm.build_run(tiny(amp=True, device="cuda", output_dir=str(tmp_path / "steps")),
                                pgnm.DistInfo(device=torch.device("cuda", 0)), 24, False, lambda *a: None)
    assert isinstance(run.scaler, torch.amp.GradScaler)                       # fp16 on CUDA: a scaler is built
    run.scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 40)
    x, y = torch.randn(8, 3, 32, 32, device="cuda"), torch.randint(0, 24, (8,), device="cuda")
    oks = []
    for i in range(40):
        scale, skipped, alpha = run.scaler.get_scale(), state.amp_skipped, state.alpha_d.clone()
        before = [p.detach().clone() for p in run.parameters()]
        fwd, ok, _ = pgnm.train_step(run, state, x, y)
        oks.append(ok)
        assert torch.isfinite(fwd.loss) and state.bad_total == 0, i       # fp16 overflow is never a bad step
        changed = any(not torch.equal(a, p) for a, p in zip(before, run.parameters()))
        assert changed == ok and torch.equal(alpha, state.alpha_d) == (not ok), i
        if ok:
            assert run.scaler.get_scale() == scale and state.amp_skipped == skipped, i
            break
        assert run.scaler.get_scale() == scale / 2 and state.amp_skipped == skipped + 1, i
    assert oks[0] is False and oks[-1] is True, oks                 # skipped at 2^40, then taken
    assert all(torch.isfinite(p).all() for p in run.parameters())
    # a non-finite loss under the scaler: a bad step, the scale unchanged, no GradScaler skip counted
    monkeypatch.setattr(pgnm, "paper_objective", _nan_objective([], lambda n: True))
    scale, skipped = run.scaler.get_scale(), state.amp_skipped
    _, ok, _ = pgnm.train_step(run, state, x, y)
    assert not ok and state.bad_total == 1 and state.amp_skipped == skipped and run.scaler.get_scale() == scale


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sigterm_to_the_process_group_on_cuda_with_amp_and_workers_checkpoints_exits_3_and_resumes(tmp_path):
    """What scancel does to a GPU job: SIGTERM to every process of the group, the DataLoader workers included."""
    import signal
    out = str(tmp_path / "o")
    args = [*TINY_CLI[:-2], "--device", "cuda", "--amp", "--workers", "2", "--epochs", "3", "--output-dir", out]
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "pgnm.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in proc.stdout:
        if "epoch 2/3 step 5/12" in line:
            os.killpg(proc.pid, signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err[-3000:]
    ck = pgnm.verify_and_load(os.path.join(out, "checkpoint.pth"))
    assert ck["epoch"] == 1 and 5 <= ck["step"] < 12 and ck["scaler"] is not None
    res = run_cli(*args, "--resume", "auto")
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resumed from {os.path.join(out, 'checkpoint.pth')}" in res.stdout
    assert len([r for r in read_log(out) if not r.get("final")]) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_amp_resume_restores_the_scaler_state_on_gpu(tmp_path, monkeypatch):
    pgnm.main(tiny(output_dir=str(tmp_path), amp=True, device="cuda", epochs=1))
    path = tmp_path / "checkpoint.pth"
    ck = torch.load(path, weights_only=True)
    ck["scaler"]["scale"], ck["scaler"]["_growth_tracker"] = 1024.0, 7      # values no fresh scaler has
    torch.save(ck, path)
    seen = {}
    real = pgnm.restore_checkpoint

    def spy(run, state, *a):
        real(run, state, *a)
        seen.update(scale=run.scaler.get_scale(), tracker=run.scaler.state_dict()["_growth_tracker"])
    monkeypatch.setattr(pgnm, "restore_checkpoint", spy)
    pgnm.main(tiny(output_dir=str(tmp_path), amp=True, device="cuda", epochs=2, resume="auto"))
    assert seen == {"scale": 1024.0, "tracker": 7}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_amp_run_uses_channels_last_and_fused_sgd_on_gpu(tmp_path):
    cfg = tiny(output_dir=str(tmp_path), amp=True, device="cuda")
    info = pgnm.setup_distributed("cuda")
    cfg = dataclasses.replace(cfg, channels_last=pgnm.use_channels_last(cfg, info.device))
    run, state = pgnm.build_run(cfg, info, 24, False, lambda *a: None)
    pgnm.wrap_for_training(run)
    assert cfg.channels_last and info.device.index == 0
    conv = run.model_raw.layer1[0].conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert all(g["fused"] is True for o in run.optimizers() for g in o.param_groups)
    x, y = torch.randn(8, 3, 32, 32, device="cuda"), torch.randint(0, 24, (8,), device="cuda")
    before = [p.detach().clone() for p in run.parameters()]
    for _ in range(10):                  # the first steps may overflow at GradScaler's initial scale
        _, taken, _ = pgnm.train_step(run, state, x.contiguous(memory_format=torch.channels_last), y)
        if taken:
            break
    assert taken and any(not torch.equal(a, p) for a, p in zip(before, run.parameters()))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_fused_sgd_update_equals_the_default_update(device):
    """make_sgd's fused kernel (on CUDA) against torch's default SGD, fed the same gradients: the same update rule.
    (Gradients from a backward pass would differ by cuDNN's TF32 and algorithm choice, not by the optimiser.)"""
    dev = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    torch.manual_seed(0)
    a, b = pgnm.build_model("resnet10t", 24).to(dev), pgnm.build_model("resnet10t", 24).to(dev)
    b.load_state_dict(a.state_dict())
    start = [p.detach().clone() for p in a.parameters()]
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
    fused = pgnm.make_sgd(a.parameters(), dev, **kw) if device == "cuda" else \
        torch.optim.SGD(a.parameters(), **kw, fused=True)
    assert fused.defaults["fused"] is True
    default = torch.optim.SGD(b.parameters(), **kw)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in a.parameters()]
        for net in (a, b):
            for p, g in zip(net.parameters(), grads):
                p.grad = g.clone()
        fused.step()
        default.step()
    for p0, pa, pb in zip(start, a.parameters(), b.parameters()):
        assert not torch.equal(pa, p0) and torch.allclose(pa, pb, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_runs_on_a_bare_cuda_device_on_gpu(capsys):
    cfg = pgnm.Config(device="cuda", model="resnet10t", batch_size=4, train_crop_size=64, grid=16, kernel=5, sigma=2.0,
                      amp=True)
    res = pgnm.bench(cfg, rounds=2, warmup=1)
    assert set(res) == BENCH_KEYS and all(math.isfinite(v) and v > 0 for v in res.values())
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["device"] == "cuda:0" and line["channels_last"] is True and line["sgd"] == "fused"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_deterministic_gpu_runs_are_identical(tmp_path):
    for name in ("a", "b"):
        pgnm.main(tiny(output_dir=str(tmp_path / name), amp=True, device="cuda", deterministic=True))
    wa = torch.load(tmp_path / "a" / "model_heated.pth", weights_only=True)
    wb = torch.load(tmp_path / "b" / "model_heated.pth", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_and_cpu_mask_pipeline_agree():
    m = torch.rand(4, 64 * 64)
    cpu = pgnm.upsample_blur(m, (224, 224), 13, 6.0)
    gpu = pgnm.upsample_blur(m.cuda(), (224, 224), 13, 6.0).cpu()
    assert (cpu - gpu).abs().max() < 1e-5


# =====================================================================================================================
#  evaluate.py: probes, statistics and metrics against scikit-learn / scipy
# =====================================================================================================================

import csv  # noqa: E402

import evaluate as ev  # noqa: E402


def test_t_quantile_and_ci_by_hand():
    # t_{0.975} from printed tables
    for df, want in ((1, 12.706204736), (2, 4.302652730), (6, 2.446911851), (9, 2.262157163), (30, 2.042272456)):
        assert ev.t975(df) == pytest.approx(want, abs=1e-6)
    mean, half = ev.mean_ci([1, 2, 3, 4, 5, 6, 7])
    assert mean == 4.0
    assert half == pytest.approx(2.446911851 * math.sqrt(28 / 6) / math.sqrt(7), rel=1e-6)
    m1, h1 = ev.mean_ci([0.5])
    assert m1 == 0.5 and math.isnan(h1)
    assert ev.mean_ci([0.2, float("nan"), 0.4])[0] == pytest.approx(0.3)          # NaN trials are left out
    assert [ev.trials_for(n) for n in (9_999, 10_000, 30_000, 30_001)] == [7, 3, 3, 1]
    with pytest.raises(ValueError):
        ev.t975(ev.MAX_TRIALS)                 # beyond the table: --trials is validated so this never happens


def test_t_distribution_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    assert len(ev.T975) == ev.MAX_TRIALS - 1   # every df that --trials / --lowshot-trials can produce
    for df in range(1, ev.MAX_TRIALS):
        assert ev.t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-6)


@pytest.mark.parametrize("case", ["random", "label_never_positive", "always_predicted"])
def test_multilabel_metrics_equal_sklearn(case):
    from sklearn import metrics as skm
    rng = np.random.default_rng(1)
    y = (rng.random((100, 6)) < 0.3).astype(int)
    p = np.clip(y * 0.3 + rng.random((100, 6)) * 0.7, 0, 1)
    if case == "label_never_positive":
        y[:, 2] = 0
    if case == "always_predicted":
        p[:, 4] = 0.9
    ours = ev.multilabel_metrics(torch.from_numpy(p), torch.from_numpy(y))
    pred = (p > 0.5).astype(int)
    keep = [k for k in range(6) if 0 < y[:, k].sum() < 100]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ours["auroc"] == pytest.approx(np.mean([skm.roc_auc_score(y[:, k], p[:, k]) for k in keep]))
        assert ours["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))
        assert ours["precision"] == pytest.approx(skm.precision_score(y, pred, average="macro", zero_division=0))
        assert ours["recall"] == pytest.approx(skm.recall_score(y, pred, average="macro", zero_division=0))
    assert ours["acc"] == pytest.approx((pred == y).mean())
    if case == "random":
        assert ours["auroc"] == pytest.approx(skm.roc_auc_score(y, p, average="macro"))


@pytest.mark.parametrize("kind,n_out", [("multiclass", 5), ("binary", 2), ("multilabel", 6)])
def test_stopping_accuracy_is_the_reported_accuracy(kind, n_out):
    """The probes stop on Task.accuracy: plain accuracy, label-wise for multi-label (the README says so)."""
    from sklearn.metrics import accuracy_score
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, n_out, generator=g)
    y = (torch.rand(50, n_out, generator=g) < 0.4).long() if kind == "multilabel" else torch.arange(50) % n_out
    task = ev.Task(kind, n_out)
    acc = task.accuracy(logits, y)
    assert acc == pytest.approx(task.metrics(logits, y)["acc"])
    want = ((logits > 0).long() == y).float().mean() if kind == "multilabel" \
        else accuracy_score(y.numpy(), logits.argmax(1).numpy())
    assert acc == pytest.approx(float(want))


def test_lbfgs_logistic_regression_matches_sklearn():
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression
    x, y = make_classification(n_samples=900, n_features=40, n_informative=12, n_classes=5, n_clusters_per_class=2,
                               class_sep=0.8, random_state=0)
    xtr, xte = ev.standardize(torch.tensor(x[:600], dtype=torch.float32), torch.tensor(x[600:], dtype=torch.float32))
    lin = ev.fit_logreg_lbfgs(xtr, torch.tensor(y[:600]), ev.Task("multiclass", 5))
    ours = (lin(xte).argmax(1).numpy() == y[600:]).mean()
    sk = LogisticRegression(C=1.0, max_iter=2000).fit(xtr.numpy(), y[:600])
    ref = (sk.predict(xte.numpy()) == y[600:]).mean()
    assert abs(ours - ref) <= 0.01, (ours, ref)
    assert np.allclose(lin.weight.detach().numpy(), sk.coef_, atol=2e-2)   # the same optimum


def _blobs(spread, n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 16, generator=g) * 3
    y = torch.arange(n) % 4
    return centers[y] + torch.randn(n, 16, generator=g) * spread, y


def _fit(probe, *args, **kw):
    return (ev.train_mlp if probe == "mlp" else ev.fit_logreg_adamw)(*args, **kw)


@pytest.mark.parametrize("probe", ["mlp", "logreg"])
def test_adamw_probe_stops_5_epochs_after_its_best_and_returns_the_best_weights(probe):
    x, y = _blobs(spread=3.0)                       # overlapping classes: validation accuracy rises, then wobbles
    task = ev.Task("multiclass", 4)
    seen = []
    model, best, history = _fit(probe, x[:200], y[:200], x[200:], y[200:], task, seed=0, on_epoch=lambda e, m, a:
                                seen.append((a, {k: v.detach().clone() for k, v in m.state_dict().items()})))
    assert [a for a, _ in seen] == history
    assert len(history) == best + ev.PATIENCE < ev.MAX_EPOCHS              # exactly 5 epochs without a gain
    assert all(h < history[best - 1] for h in history[:best - 1])           # the first epoch with the top accuracy
    assert all(h <= history[best - 1] for h in history[best:])
    best_state, last_state = seen[best - 1][1], seen[-1][1]
    assert all(torch.equal(v, best_state[k]) for k, v in model.state_dict().items())
    assert not all(torch.equal(v, last_state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert task.accuracy(model(x[200:]), y[200:]) == history[best - 1]
        assert not model.training


@pytest.mark.parametrize("probe", ["mlp", "logreg"])
@pytest.mark.parametrize("kind", ["multiclass", "multilabel"])
def test_adamw_probe_with_flat_validation_accuracy_stops_after_six_epochs(probe, kind):
    # every validation image is the same vector, so every epoch's model predicts the same for all of them, and the
    # validation targets make every such prediction equally right: accuracy 1/4 (multi-label: 1/2 for every label)
    x, y = _blobs(spread=1.0, n=120)
    task = ev.Task(kind, 4)
    yva = torch.arange(8) % 4
    if kind == "multilabel":
        y, yva = F.one_hot(y, 4), (torch.arange(8) < 4).long()[:, None].expand(8, 4)
    xva = torch.zeros(8, 16)
    seen = []
    model, best, history = _fit(probe, x, y, xva, yva, task, seed=1,
                                on_epoch=lambda e, m, a: seen.append({k: v.clone() for k, v in m.state_dict().items()}))
    assert best == 1 and len(history) == 1 + ev.PATIENCE and len(set(history)) == 1
    assert all(torch.equal(v, seen[0][k]) for k, v in model.state_dict().items())


def test_adamw_probe_epochs_batches_and_hyper_parameters(monkeypatch):
    """An epoch is one pass over the training samples in batches of 16 (low-shot) or 256 (MLP), with AdamW's
    defaults; a run that reaches the epoch cap says so."""
    sizes, opts = [], []

    class Counting(ev.Task):
        def loss(self, logits, y):
            sizes.append(len(y))
            return super().loss(logits, y)

    real_adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, **kw: opts.append(kw) or real_adamw(params, **kw))
    x, y = _blobs(spread=1.0, n=300)
    task = Counting("multiclass", 4)
    _, _, history = ev.fit_logreg_adamw(x[:40], y[:40], x[40:60], y[40:60], task, seed=0)
    assert sizes == [16, 16, 8] * len(history)
    sizes.clear()
    _, _, history = ev.train_mlp(x, y, x[:20], y[:20], task, seed=0)
    assert sizes == [256, 44] * len(history)
    assert opts == [{}, {}]                                # lr 1e-3, betas (0.9, 0.999), weight decay 0.01
    assert real_adamw([torch.zeros(1, requires_grad=True)]).defaults["weight_decay"] == 0.01
    lines = []
    monkeypatch.setattr(ev, "MAX_EPOCHS", 3)             # shorter than the patience: every run hits the cap
    feats = {"train": x[:40], "val": x[40:60], "test": x[60:80]}
    lab = {s_: y[a:b].numpy() for s_, a, b in (("train", 0, 40), ("val", 40, 60), ("test", 60, 80))}
    ev.run_lowshot(feats, lab, ev.Task("multiclass", 4), [4], 1, torch.device("cpu"), log=lines.append, tag="[t]")
    assert any("warning: stopped at the 3-epoch cap" in line for line in lines), lines


def test_adamw_probes_learn():
    x, y = _blobs(spread=1.0)
    task = ev.Task("multiclass", 4)
    for probe in ("mlp", "logreg"):
        model, best, _ = _fit(probe, x[:300], y[:300], x[300:350], y[300:350], task, seed=0)
        with torch.no_grad():
            assert task.metrics(model(x[350:]), y[350:])["f1"] > 0.9, probe


def test_lowshot_sampling_val_split_and_a_test_split_missing_a_class(monkeypatch):
    labels = np.repeat(np.arange(3), [20, 5, 20])
    idx = ev.sample_shots(labels, 8, np.random.default_rng(0), ev.Task("multiclass", 3))
    assert np.bincount(labels[idx]).tolist() == [8, 5, 8]
    feats = {"train": torch.randn(45, 8), "val": torch.randn(9, 8), "test": torch.randn(10, 8)}
    lab = {"train": labels, "val": np.arange(9) % 3, "test": np.array([0] * 5 + [1] * 5)}   # class 2 absent from test
    real, val_sizes = ev.fit_logreg_adamw, []
    monkeypatch.setattr(ev, "fit_logreg_adamw", lambda xs, ys, xv, yv, *a, **k: val_sizes.append(len(xv)) or
                        real(xs, ys, xv, yv, *a, **k))
    res = ev.run_lowshot(feats, lab, ev.Task("multiclass", 3), [4, 30], 2, torch.device("cpu"), log=lambda *_: None)
    assert math.isfinite(res[4]["auroc_mean"]) and len(res[4]["best_epoch"]) == 2
    assert 30 not in res                                    # no class has 30 samples: skipped
    assert val_sizes == [9, 9]                              # the AdamW probe stops on the whole val split
    res = ev.run_lowshot(feats, lab, ev.Task("multiclass", 3), [4], 2, torch.device("cpu"), log=lambda *_: None,
                         solver="lbfgs")
    assert val_sizes == [9, 9] and res[4]["best_epoch"] == [None, None]


def _tiny_backbone(tmp_path, arch="resnet10t", name=None):
    path = str(tmp_path / (name or f"{arch}.pth"))
    torch.manual_seed(0)
    torch.save({"model": pgnm.build_model(arch, 7).state_dict()}, path)
    return path


EVAL_KW = dict(trials=2, shots=[2, 4], lowshot_trials=2, image_size=32, device="cpu", log=lambda *_: None)


@pytest.mark.parametrize("fmt", ["npz", "npz_merged", "imagefolder", "multilabel"])
def test_evaluate_every_input_format(tmp_path, fmt):
    ck = _tiny_backbone(tmp_path)
    if fmt == "imagefolder":
        spec = str(tmp_path / "folder")
        _write_imagefolder(spec, per=6, size=32)
    else:
        spec = str(tmp_path / f"{fmt}.npz")
        _write_npz(spec, merged=fmt == "npz_merged", n=60, multilabel=fmt == "multilabel", rgb=fmt == "npz")
    out = str(tmp_path / "out")
    solver = "lbfgs" if fmt == "npz" else "adamw"
    kw = {**EVAL_KW, "shots": [2] if fmt == "multilabel" else [2, 4]}     # multi-label draws 2 x 14 images
    res = ev.evaluate([ck, ck], ["A", "B"], [spec], out, lowshot_solver=solver, **kw)
    (name, r), = res["datasets"].items()
    assert r["task"] == ("multilabel" if fmt == "multilabel" else "multiclass")
    assert r["mlp"]["A"]["trials"] == 2 and len(r["mlp"]["A"]["f1"]) == 2
    assert r["mlp"]["A"]["f1"] == r["mlp"]["B"]["f1"]                       # same weights, same seeds
    assert set(r["lowshot"]["A"]) == set(kw["shots"])
    assert all(isinstance(e, int) for e in r["lowshot"]["A"][2]["best_epoch"]) == (solver == "adamw")
    assert len(r["mlp"]["A"]["best_epoch"]) == 2 and all(e >= 1 for e in r["mlp"]["A"]["best_epoch"])
    saved = json.loads(open(os.path.join(out, "results.json")).read(), parse_constant=lambda c: pytest.fail(c))
    assert name in saved["datasets"] and saved["settings"]["lowshot_solver"] == solver
    assert saved["backbones"]["A"] == {"path": ck, "sha256": ev.sha256_file(ck), "arch": "resnet10t"}
    rows = list(csv.DictReader(open(os.path.join(out, "results.csv"))))
    assert {r_["probe"] for r_ in rows} == {"mlp", f"logreg-{solver}"}
    assert {r_["metric"] for r_ in rows} == set(ev.METRICS) and rows[0]["sha256"] == ev.sha256_file(ck)
    f1 = [r_ for r_ in rows if r_["backbone"] == "A" and r_["probe"] == "mlp" and r_["metric"] == "f1"]
    assert float(f1[0]["mean"]) == pytest.approx(r["mlp"]["A"]["f1_mean"])


def test_feature_cache_second_run_extracts_nothing(tmp_path, monkeypatch):
    ck = _tiny_backbone(tmp_path)
    spec = str(tmp_path / "d.npz")
    _write_npz(spec, n=30)
    calls, lines = [], []
    real = ev.extract_features
    monkeypatch.setattr(ev, "extract_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = {**EVAL_KW, "log": lines.append}
    ev.evaluate([ck], None, [spec], str(tmp_path / "o"), **kw)
    assert len(calls) == 3                                                    # train, val, test
    ev.evaluate([ck], None, [spec], str(tmp_path / "o"), **kw)
    assert len(calls) == 3
    assert any(line.startswith("[d] resnet10t: features read from " + str(tmp_path / "o" / "cache")) for line in lines)
    assert any(line.startswith(f"[d] {spec}: multiclass, 3 classes") for line in lines)      # the file read, named
    assert any(line.startswith(f"backbone resnet10t: {ck} (resnet10t, written ") for line in lines)
    torch.save({"model": pgnm.build_model("resnet10t", 7).state_dict()}, ck)  # other weights: a new cache entry
    ev.evaluate([ck], None, [spec], str(tmp_path / "o"), **kw)
    assert len(calls) == 6
    # A damaged entry (4 KiB zeroed inside a tensor record; torch.load alone reads it as features) is extracted again.
    entry = max((tmp_path / "o" / "cache").glob("*.pt"), key=os.path.getmtime)
    raw = bytearray(entry.read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 4096] = bytes(4096)
    entry.write_bytes(bytes(raw))
    ev.evaluate([ck], None, [spec], str(tmp_path / "o"), **kw)
    assert len(calls) == 9 and any(f"cache entry {entry} is unreadable" in line for line in lines)


def test_feature_cache_key_holds_the_seed_that_splits_the_data(tmp_path):
    """A merged .npz and an ImageFolder tree without test/ are split here by --seed: cached features of one seed's
    split must never be paired with another seed's labels."""
    merged = str(tmp_path / "m.npz")
    _write_npz(merged, merged=True, n=60)
    tree = tmp_path / "tree"
    for split, n in (("train", 10), ("val", 3)):
        for c in "ab":
            (tree / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((8, 8), 20 * i, np.uint8)).save(tree / split / c / f"{i}.png")
    for spec in (merged, str(tree)):
        d0, d1 = ev.load_probe_data(spec, 32, seed=0), ev.load_probe_data(spec, 32, seed=1)
        assert d0.key != d1.key and ev.load_probe_data(spec, 32, seed=0).key == d0.key, spec
    # the seed's split differs (same labels, other images: the test compares which images went where)
    m0, m1 = ev.load_probe_data(merged, 32, seed=0), ev.load_probe_data(merged, 32, seed=1)
    first = lambda d: d.images["val"][0][0]     # noqa: E731
    assert not torch.equal(first(m0), first(m1))


# --- bad input: exit code 2, one stderr line naming the flag or file, never a traceback -----------------------------


def _eval_npz(path, **over):
    """A valid 3-class MedMNIST file (train/val/test of 12 28x28 images), with arrays replaced or removed (None)."""
    imgs = np.random.default_rng(0).integers(0, 255, (12, 28, 28), dtype=np.uint8)
    d = {f"{s}_{k}": v for s in ("train", "val", "test") for k, v in (("images", imgs),
                                                                        ("labels", (np.arange(12) % 3)[:, None]))}
    for k, v in over.items():
        d.pop(k) if v is None else d.__setitem__(k, v)
    np.savez(path, **d)
    return path


def _bad_case_files(tmp):
    """The files that the bad-input cases name, keyed by the {placeholder} they replace."""
    f = {"tmp": str(tmp), "ck": _tiny_backbone(tmp), "good": _eval_npz(str(tmp / "good.npz"))}
    nan_sd = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
              for k, v in pgnm.build_model("resnet10t", 7).state_dict().items()}
    torch.save(nan_sd, str(tmp / "nan.pth"))
    one_inf = pgnm.build_model("resnet10t", 7).state_dict()
    one_inf["layer2.0.conv1.weight"][0, 0, 0, 0] = float("inf")
    torch.save(one_inf, str(tmp / "inf.pth"))
    neg_var = pgnm.build_model("resnet10t", 7).state_dict()
    neg_var["bn1.running_var"].fill_(-1.0)               # finite weights, NaN features (sqrt of a negative variance)
    torch.save(neg_var, str(tmp / "negvar.pth"))
    torch.save([1, 2, 3], str(tmp / "list.pth"))
    torch.save(pgnm.PolicyNet(4).state_dict(), str(tmp / "policy.pth"))
    (tmp / "garbage.pth").write_bytes(b"not a checkpoint")
    (tmp / "garbage.npz").write_bytes(b"PK\x03\x04 not a zip")
    (tmp / "file.txt").write_text("x")
    (tmp / "ckdir").mkdir()
    lab = (np.arange(12) % 3)[:, None]
    for name, over in {
        "objlabels": {"train_labels": np.array([[1], [2]] * 6, dtype=object)},
        "objimages": {"train_images": np.array([None] * 12, dtype=object)},
        "nanlabels": {"val_labels": np.where(lab == 1, np.nan, lab).astype(float)},
        "strlabels": {"test_labels": lab.astype(str)},
        "zerod": {"train_labels": np.array(3)},
        "fraction": {"train_labels": np.where(lab == 1, 0.7, lab).astype(float)},
        "negative": {"val_labels": lab - 1},
        "outofrange": {"test_labels": lab + 5},
        "huge": {"train_labels": lab * 10**9},
        "onelabel": {f"{s}_labels": np.zeros((12, 1), np.int64) for s in ("train", "val", "test")},
        "notest": {"test_images": None, "test_labels": None},
        "nolabels": {"test_labels": None},
        "emptysplit": {"val_images": np.zeros((0, 28, 28), np.uint8), "val_labels": np.zeros((0, 1), np.int64)},
        "floatimages": {"train_images": np.zeros((12, 28, 28), np.float32)},
        "count": {"train_labels": lab[:10]},
        "mlnot01": {f"{s}_labels": np.full((12, 4), 2) for s in ("train", "val", "test")},
        "mlcolumns": {"train_labels": np.ones((12, 4), np.int64), "val_labels": np.ones((12, 3), np.int64),
                      "test_labels": np.ones((12, 4), np.int64)},
    }.items():
        f[name] = _eval_npz(str(tmp / f"{name}.npz"), **over)
    np.savez(str(tmp / "merged1.npz"), images=np.zeros((12, 28, 28), np.uint8), labels=np.zeros(12, np.int64))
    np.savez(str(tmp / "wrongkeys.npz"), pictures=np.zeros((2, 4, 4), np.uint8))
    _write_imagefolder(str(tmp / "oneclass"), classes=("a",), per=2, size=16)
    _write_imagefolder(str(tmp / "hollow"), classes=("a", "b"), per=2, size=16)
    os.makedirs(str(tmp / "hollow" / "val" / "c"))                   # a val class that train lacks
    _write_imagefolder(str(tmp / "badimage"), classes=("a", "b"), per=2, size=16)
    (tmp / "badimage" / "val" / "b" / "0.png").write_bytes(b"")           # zero bytes, named .png
    (tmp / "novals").mkdir()
    (tmp / "novals" / "train").mkdir()
    os.makedirs(str(tmp / "blocked" / "results.json"))
    (tmp / "dup").mkdir()
    _eval_npz(str(tmp / "dup" / "good.npz"))
    return f


BAD_EVALUATE_INPUTS = [   # (extra arguments, strings the one error line must contain)
    (["--lowshot-trials", "0"], ["--lowshot-trials 0"]),
    (["--trials", "0"], ["--trials 0"]),
    (["--trials", "51"], ["--trials 51", "1 to 50"]),
    (["--trials", "x"], ["--trials", "invalid int"]),
    (["--workers", "-1"], ["--workers -1"]),
    (["--shots", "8", "0"], ["--shots 8 0"]),
    (["--image-size", "0"], ["--image-size 0"]),
    (["--batch-size", "0"], ["--batch-size 0"]),
    (["--seed", "-1"], ["--seed -1"]),
    (["--device", "tpu"], ["--device 'tpu'"]),
    (["--device", "cuda"], ["--device cuda", "--device cpu"]),
    (["--lowshot-solver", "sgd"], ["--lowshot-solver", "adamw"]),
    (["--model", "vit"], ["--model", "resnet50"]),
    (["--no-such-flag"], ["--no-such-flag"]),
    (["--output-dir", "{tmp}/file.txt"], ["--output-dir", "file.txt", "is a file"]),
    (["--output-dir", "{tmp}/file.txt/sub"], ["--output-dir", "file.txt/sub"]),
    (["--labels", "one", "two"], ["--labels has 2 names for 1"]),
    (["--labels", " "], ["--labels must be distinct, non-empty"]),
    (["--output-dir", "{tmp}/blocked"], ["cannot write", "blocked/results.json"]),     # a folder named results.json
    (["--checkpoints", "{tmp}/none.pth"], ["--checkpoints", "none.pth", "does not exist"]),
    (["--checkpoints", "{tmp}/ckdir"], ["--checkpoints", "ckdir", "is a folder"]),
    (["--checkpoints", "{tmp}/list.pth"], ["list.pth", "no state_dict"]),
    (["--checkpoints", "{tmp}/policy.pth"], ["policy.pth", "the policy network's weights"]),
    (["--checkpoints", "{tmp}/garbage.pth"], ["garbage.pth", "cannot load"]),
    (["--checkpoints", "{tmp}/nan.pth"], ["nan.pth", "NaN/inf"]),
    (["--checkpoints", "{tmp}/inf.pth"], ["inf.pth", "layer2.0.conv1.weight has 1 NaN/inf"]),
    (["--checkpoints", "{tmp}/negvar.pth"], ["negvar.pth", "NaN/inf features"]),
    (["--checkpoints", "{ck}", "--model", "resnet50"], ["does not fit --model resnet50", "looks like resnet10t"]),
    (["--data", "{tmp}/nope.npz"], ["--data", "nope.npz", "does not exist"]),
    (["--data", "{tmp}/file.txt"], ["file.txt", "must be a MedMNIST .npz"]),
    (["--data", "{tmp}/garbage.npz"], ["garbage.npz", "not a readable .npz"]),
    (["--data", "{tmp}/wrongkeys.npz"], ["wrongkeys.npz", "expected train_images"]),
    (["--data", "{objlabels}"], ["objlabels.npz", "train_labels must hold numbers", "object"]),
    (["--data", "{objimages}"], ["objimages.npz", "train_images must be uint8"]),
    (["--data", "{nanlabels}"], ["nanlabels.npz", "val_labels has NaN"]),
    (["--data", "{strlabels}"], ["strlabels.npz", "test_labels must hold numbers"]),
    (["--data", "{zerod}"], ["zerod.npz", "train_labels", "shape ()"]),
    (["--data", "{fraction}"], ["fraction.npz", "fractional labels (e.g. 0.7)"]),
    (["--data", "{negative}"], ["negative.npz", "val_labels has labels from -1"]),
    (["--data", "{outofrange}"], ["outofrange.npz", "test_labels has label 7", "out of range"]),
    (["--data", "{huge}"], ["huge.npz", "train_labels has labels from 0 to 2000000000"]),
    (["--data", "{onelabel}"], ["onelabel.npz", "one class only"]),
    (["--data", "{notest}"], ["notest.npz", "no test_images"]),
    (["--data", "{nolabels}"], ["nolabels.npz", "only one of test_images and test_labels"]),
    (["--data", "{emptysplit}"], ["emptysplit.npz", "val_labels is empty"]),
    (["--data", "{floatimages}"], ["floatimages.npz", "must be uint8", "float32"]),
    (["--data", "{count}"], ["count.npz", "12 images but train_labels has 10"]),
    (["--data", "{mlnot01}"], ["mlnot01.npz", "must be 0/1"]),
    (["--data", "{mlcolumns}"], ["mlcolumns.npz", "val_labels has shape (12, 3)"]),
    (["--data", "{tmp}/merged1.npz"], ["merged1.npz", "one class only"]),
    (["--data", "{tmp}/oneclass"], ["oneclass", "train has one class only"]),
    (["--data", "{tmp}/hollow"], ["hollow", "'c'", "train/ does not have"]),
    (["--data", "{tmp}/badimage"], ["cannot read image", "0.png", "fix or delete it"]),   # no --skip-bad-images here
    (["--checkpoints", "{ck}", "{ck}"], ["--checkpoints lists", "twice: list each backbone once"]),
    (["--data", "{tmp}/novals"], ["novals", "train/ and val/"]),
    (["--data", "{good}", "{tmp}/dup/good.npz"], ["--data", "share a name"]),
    (["--runs-dir", "{tmp}"], ["--runs-dir not read with --checkpoints"]),             # it was silently ignored
    (["--bench-logreg"], ["--lowshot-trials, --shots, --trials not read with --bench-logreg", "drop them"]),
]


@pytest.fixture(scope="module")
def bad_case_files(tmp_path_factory):
    return _bad_case_files(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("args,needles", BAD_EVALUATE_INPUTS, ids=[" ".join(a) for a, _ in BAD_EVALUATE_INPUTS])
def test_evaluate_bad_inputs(bad_case_files, tmp_path, capsys, args, needles):
    if args[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    f = bad_case_files
    base = ["--checkpoints", f["ck"], "--data", f["good"], "--output-dir", str(tmp_path / "o"), "--image-size", "32",
            "--trials", "1", "--lowshot-trials", "1", "--shots", "2"]
    code = ev.cli(base + [a.format(**f) for a in args])     # argparse keeps a repeated flag's last value
    out, err = capsys.readouterr()
    err = err.strip()
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("error: "), err
    for n in needles:
        assert n.format(**f) in err, err
    assert "--skip-bad-images" not in err, err                     # a flag evaluate.py does not have
    assert "wrote" not in out and not os.path.exists(tmp_path / "o" / "results.json")
    assert not [p for p in os.listdir(f["tmp"] + "/blocked") if p.endswith(".tmp")]         # no temp file left


def test_failure_line_is_one_line_for_every_kind_of_failure():
    worker = pgnm.UserError("Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                            "last):\n  File ...\npgnm.UserError: cannot read image a.png (OSError: truncated)")
    assert pgnm.failure_line(worker) == "cannot read image a.png (OSError: truncated)"
    assert pgnm.failure_line(pgnm.UserError("")) == "UserError"
    assert pgnm.failure_line(OSError(28, "No space left on device", "/out/x.pth")) == \
        "No space left on device: /out/x.pth"
    assert pgnm.failure_line(pgnm.Diverged("loss is NaN")) == "loss is NaN"


@pytest.mark.parametrize("tool", ["evaluate", "pgnm"])
def test_an_environment_failure_is_one_line_and_exit_code_2(tool, tmp_path, capsys, monkeypatch):
    """An OSError the checks could not foresee (a disk failing mid-run) is the environment: one line, exit 2."""
    def fail(*a, **k):
        raise OSError(5, "Input/output error", str(tmp_path / "x"))
    if tool == "evaluate":
        monkeypatch.setattr(ev, "evaluate", fail)
        code = ev.cli(["--checkpoints", __file__, "--output-dir", str(tmp_path / "o")])
    else:
        monkeypatch.setattr(pgnm, "main", fail)
        code = pgnm.cli(["--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"error: Input/output error: {tmp_path / 'x'}"


def test_evaluate_bad_input_in_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(HERE, "evaluate.py"), "--lowshot-trials", "0",
                           "--output-dir", str(tmp_path / "o")], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    _assert_one_line_error(proc, "--lowshot-trials 0")


def test_evaluate_help_states_every_default_once_and_truly():
    p = ev.build_parser()
    defaults = vars(p.parse_args([]))
    for a in p._actions:
        if a.dest in ("help", "bench_logreg"):
            continue
        assert a.help.count("(default") == 1, a.option_strings
        d = defaults[a.dest]
        if d not in (None, []):
            shown = " ".join(map(str, d)) if isinstance(d, list) else str(d)
            assert f"(default: {shown})" in a.help, (a.option_strings, a.help)
    assert "(default: 8 16 32 64 128 256)" in " ".join(p.format_help().split())


def test_atomic_write_replaces_a_link_and_fails_in_one_line(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    os.symlink(victim, tmp_path / "out.txt")
    pgnm.write_atomic(str(tmp_path / "out.txt"), b"new")
    assert victim.read_text() == "keep me" and not os.path.islink(tmp_path / "out.txt")
    assert (tmp_path / "out.txt").read_text() == "new"
    os.makedirs(tmp_path / "dir.txt")
    with pytest.raises(pgnm.UserError, match="cannot write .*dir.txt.*then run again"):    # replace onto a folder
        pgnm.write_atomic(str(tmp_path / "dir.txt"), b"x", then="run again")
    with pytest.raises(pgnm.UserError, match="cannot write .*missing/x.txt"):              # in a missing folder
        pgnm.write_atomic(str(tmp_path / "missing" / "x.txt"), b"x")
    assert sorted(os.listdir(tmp_path)) == ["dir.txt", "out.txt", "victim.txt"]   # no temp file left behind


@pytest.mark.parametrize("with_matplotlib", [False, True])
def test_outputs_name_every_file_and_lowshot_png_needs_matplotlib(tmp_path, monkeypatch, with_matplotlib):
    if with_matplotlib:
        pytest.importorskip("matplotlib")
    else:
        monkeypatch.setitem(sys.modules, "matplotlib", None)    # import matplotlib -> ImportError
    curve = {**{f"{k}_{s}": 0.5 for k in ev.METRICS for s in ("mean", "ci")}, "f1_ci": float("nan"), "trials": 1}
    results = {"backbones": {"A": {"path": "a.pth", "sha256": "0" * 64, "arch": "resnet10t"}},
               "settings": {"lowshot_solver": "adamw"},
               "datasets": {"d": {"mlp": {"A": curve}, "lowshot": {"A": {8: curve, 16: curve}}}}}
    lines = []
    written = ev.write_outputs(results, str(tmp_path), log=lines.append)
    names = ["results.json", "results.csv"] + (["lowshot.png"] if with_matplotlib else [])
    assert written == [str(tmp_path / n) for n in names] and all(os.path.isfile(p) for p in written)
    assert lines[-len(names):] == [f"wrote {p}" for p in written]
    assert os.path.exists(tmp_path / "lowshot.png") == with_matplotlib
    assert with_matplotlib or any("lowshot.png not written" in ln and "pip install matplotlib" in ln for ln in lines)
    assert json.load(open(tmp_path / "results.json"))["datasets"]["d"]["mlp"]["A"]["f1_ci"] is None   # NaN -> null


def test_evaluate_without_arguments_refuses_a_phase_model_that_is_not_a_file(tmp_path, capsys):
    """A folder or a broken link at runs/<phase>/model_<phase>.pth was skipped without a word: the table silently
    compared fewer backbones."""
    runs = tmp_path / "runs"
    os.makedirs(runs / "baseline")
    torch.save(pgnm.build_model("resnet10t", 24).state_dict(), str(runs / "baseline" / "model_baseline.pth"))
    os.makedirs(runs / "heated" / "model_heated.pth")
    os.makedirs(runs / "finetune")
    os.symlink(tmp_path / "gone.pth", runs / "finetune" / "model_finetune.pth")
    for phase, what in (("heated", "a folder"), ("finetune", "a broken link")):
        assert ev.cli(["--runs-dir", str(runs), "--output-dir", str(tmp_path / "ev")]) == 2
        err = _one_error_line(capsys)
        assert f"model_{phase}.pth is {what}" in err, err
        shutil.rmtree(runs / phase)
    assert not (tmp_path / "ev").exists()


def test_evaluate_without_arguments_uses_every_phase_model_in_order(tmp_path, capsys):
    import time
    runs = tmp_path / "runs"
    assert ev.cli(["--runs-dir", str(runs), "--output-dir", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert "python pgnm.py --phase heated" in err and "model_heated.pth" in err and len(err.splitlines()) == 1
    paths = {}
    for phase in ("baseline", "heated"):                 # no finetune run; written out of order on purpose
        os.makedirs(runs / phase)
        paths[phase] = str(runs / phase / f"model_{phase}.pth")
        torch.manual_seed(0)                             # the same weights: the second backbone's features are cached
        torch.save(pgnm.build_model("resnet10t", 24).state_dict(), paths[phase])
    os.utime(paths["heated"], (time.time() - 200, time.time() - 200))
    os.makedirs(runs / "masks")                           # a newer model elsewhere must not be picked up
    torch.save(pgnm.build_model("resnet10t", 24).state_dict(), str(runs / "masks" / "model_heated.pth"))
    (tmp_path / "ev").mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    os.symlink(victim, tmp_path / "ev" / "results.json")  # a planted link: replaced, never written through
    code = ev.cli(["--runs-dir", str(runs), "--output-dir", str(tmp_path / "ev"), "--trials", "1", "--lowshot-trials",
                   "1", "--shots", "2", "--image-size", "32"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"backbone heated: {paths['heated']} (resnet10t, written 3 min ago, sha256 " in out
    assert f"backbone baseline: {paths['baseline']} (resnet10t, written " in out
    assert out.index("backbone heated") < out.index("backbone baseline") and "masks" not in out
    assert "| Dataset | heated | baseline |" in out and "| synthetic-unseen (multiclass" in out
    assert victim.read_text() == "keep me" and not os.path.islink(tmp_path / "ev" / "results.json")
    res = json.load(open(tmp_path / "ev" / "results.json"))
    assert res["backbones"] == {p: {"path": paths[p], "sha256": ev.sha256_file(paths[p]), "arch": "resnet10t"}
                                for p in ("heated", "baseline")}
    assert list(res["backbones"]) == ["heated", "baseline"]
    assert res["datasets"]["synthetic-unseen"]["mlp"]["baseline"]["trials"] == 1
    written = [line[len("wrote "):] for line in out.splitlines() if line.startswith("wrote ")]
    assert written[:2] == [str(tmp_path / "ev" / "results.json"), str(tmp_path / "ev" / "results.csv")]
    try:
        import matplotlib  # noqa: F401
        assert written[2:] == [str(tmp_path / "ev" / "lowshot.png")] and out.rstrip().endswith("lowshot.png")
    except ImportError:
        assert len(written) == 2 and "pip install matplotlib" in out


# =====================================================================================================================
#  refine_radimagenet.py: splits, artifact removal, manifest, resume
# =====================================================================================================================

import refine_radimagenet as rr  # noqa: E402


@pytest.fixture(scope="module")
def raw_tree(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("raw"))
    rr.make_demo(root, per_class=10, seed=0)
    return root


def _tree_bytes(root):
    out = {}
    for dp, _, fns in os.walk(root):
        for f in fns:
            if f.endswith(".png"):
                p = os.path.join(dp, f)
                out[os.path.relpath(p, root)] = pathlib.Path(p).read_bytes()
    return out


@pytest.fixture(scope="module")
def refined(raw_tree, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("refined"))
    manifest = rr.refine(raw_tree, out, seed=0, workers=0, log=lambda *_: None)
    return out, manifest


def _us_triples(raw_tree, out):
    """(raw RGB, clean truth, refined) for every demo ultrasound frame."""
    triples = []
    for rel in sorted(p for p in _tree_bytes(os.path.join(raw_tree, "radiology_ai", "US"))):
        label, name = rel.split("/")
        raw = np.asarray(Image.open(os.path.join(raw_tree, "radiology_ai", "US", rel)).convert("RGB"))
        clean = np.asarray(Image.open(os.path.join(raw_tree, "_clean", label, name)))
        (dst,) = [p for p in _tree_bytes(out) if p.endswith(f"US__{label}/{name}")]
        triples.append((raw, clean, np.asarray(Image.open(os.path.join(out, dst)))))
    return triples


def _figures(triples):
    total = {}
    for raw, clean, refined in triples:
        for k, v in rr.frame_metrics(raw, clean, refined).items():
            total[k] = total.get(k, 0.0) + v
    return rr.summarise(total)


def test_refine_removes_ultrasound_artifacts_and_leaves_the_rest(raw_tree, refined):
    out, manifest = refined
    triples = _us_triples(raw_tree, out)
    assert len(triples) == 30
    for raw, clean, res in triples:
        assert res.ndim == 2                                                  # greyscale: no colour pixel remains
        assert (np.abs(raw.astype(int) - clean[..., None]).max(2) > 0).sum() > 500   # the demo burned artifacts in
    fig = _figures(triples)
    assert fig["stroke_removed_pct"] >= 91.7, fig                            # measured 91.77; the issue's target is 90
    assert fig["changed_beyond_2px"] <= 3, fig                                # measured 2 of 1.5 M; the target is 0
    assert fig["fill_mae"] < 25.0, fig                                       # textured fill: above a smooth fill's
    assert 0.75 < fig["fill_std"] / fig["truth_std"] < 1.35, fig            # speckle like the truth's, no blob
    assert fig["fill_lag1"] > 0.15 and fig["truth_lag1"] > 0.15, fig        # grain: neighbours correlate
    assert manifest["cleaning"]["images"] == 30 and manifest["cleaning"]["images_changed"] == 30


def test_a_smooth_fill_fails_the_texture_check(raw_tree, refined):
    smooth = []
    for raw, clean, res in _us_triples(raw_tree, refined[0])[:10]:
        grey = np.asarray(Image.fromarray(raw).convert("L"))
        changed = res != grey
        blob = res.copy()
        blob[changed] = np.round(rr.local_base(grey, ~changed & (clean > 0), changed)[changed]).astype(np.uint8)
        smooth.append((raw, clean, blob))
    fig = _figures(smooth)
    assert fig["fill_std"] < 0.6 * fig["truth_std"], fig                    # the check above tells a blob apart


def test_clean_frames_keep_every_pixel():
    """Speckle, specular reflections, anechoic regions, skin lines and the fan's border are not annotation."""
    rng = np.random.default_rng(5)
    for k in range(6):
        clean, _ = rr.clean_frame(rng, *rr.SCANNER_SIZE)
        frame = np.asarray(Image.fromarray(clean).resize((224, 224), rr.RESIZE_FILTERS[k % 3]))
        out, changed = rr.clean_ultrasound(Image.fromarray(frame))
        assert changed == 0 and np.array_equal(np.asarray(out), frame)


def test_the_fan_is_found_and_margin_annotation_is_not_in_it():
    rng = np.random.default_rng(3)
    for _ in range(4):
        raw, clean, kinds = rr.stored_frame(rng)
        fan, _ = rr.estimate_fan(np.asarray(Image.fromarray(raw).convert("L"), np.float64))
        tissue = clean > rr.CleanParams().black_level                        # would be removed if outside the fan
        assert (tissue & ~fan).sum() <= 0.001 * tissue.sum()
        image_area = rr.grow_mask(rr.fill_holes(clean > 0), 3)
        assert (fan & ~image_area).sum() <= 0.02 * fan.sum()                 # only marks touching the fan get in
        text = kinds["text"] > 128
        assert (text & ~image_area).any() and not (text & ~image_area & fan).any()


def test_the_tip_of_a_sharp_fan_corner_is_fan_not_margin_annotation():
    """estimate_fan: the resize cuts the tip of a sharp corner of the fan's top off it (2-3 faint px on top of the
    fan): it is fan, not margin annotation that "continues" along the skin line (demo seed 5 #57: 26 px of tissue
    changed at the corner); a stub of ink brighter than the tissue it touches, a stroke of 4 px, a faint stub beside
    a bump of the fan's top (not on it: a stroke's end beside ink taken for fan) or below the fan's top rows stays
    outside."""
    (raw, clean), = _demo_frames(5, {57}).values()
    fig = rr.summarise(rr.frame_metrics(raw, clean, np.asarray(rr.clean_ultrasound(Image.fromarray(raw))[0])))
    assert fig["changed_beyond_2px"] == 0 and fig["stroke_removed_pct"] >= 95.6, fig   # removed as before
    grey, fan = np.zeros((40, 40)), np.zeros((40, 40), bool)
    grey[20:, :30], fan[20:, :30] = 120.0, True
    grey[17:20, 10:12], fan[17:20, 10:12] = 150.0, True                    # a bump
    grey[19, 5], grey[18, 6] = 90.0, 40.0                                  # a corner's faint tip
    grey[17:19, 9] = 50.0                                                  # a faint stub beside the bump
    grey[19, 15], grey[18, 15] = 200.0, 180.0                              # a stub of ink
    grey[16:20, 25] = 100.0                                                # a stroke
    grey[22:24, 30] = 60.0                                                 # a faint stub beside the fan's side
    nubs = rr.fan_nubs(grey, fan, (grey > 14) & ~fan)
    assert nubs[19, 5] and nubs[18, 6] and nubs.sum() == 2


def test_demo_text_is_anti_aliased_grey_even_without_sized_fonts(monkeypatch):
    from PIL import ImageFont
    sized = Image.new("RGBA", (120, 40), (0, 0, 0, 0))
    rr.draw_text(sized, (2, 2), "LYMPH NODE", 16, 200)
    real = ImageFont.load_default

    def old_pillow(size=None):
        if size is not None:
            raise TypeError("load_default() got an unexpected keyword argument 'size'")
        return real()
    monkeypatch.setattr(ImageFont, "load_default", old_pillow)
    scaled = Image.new("RGBA", (160, 40), (0, 0, 0, 0))
    rr.draw_text(scaled, (2, 2), "LYMPH NODE", 16, 200)
    for layer in (sized, scaled):
        a = np.asarray(layer)[..., 3]
        rows = np.flatnonzero(a.max(1) > 0)
        assert 8 <= rows[-1] - rows[0] + 1 <= 24                             # about 16 px high
        assert ((a > 0) & (a < 255)).sum() > 20                              # grey edges: anti-aliased


def test_demo_report_prints_the_figures_and_writes_a_small_png(tmp_path, capsys):
    png = str(tmp_path / "docs" / "refine_demo.png")
    os.makedirs(os.path.dirname(png))
    assert rr.cli(["--demo-report", png, "--demo-frames", "3"]) == 0
    out = capsys.readouterr().out
    assert "stroke pixels removed" in out and "images/s" in out and png in out
    im = Image.open(png)
    assert im.size == (3 * 224, 3 * 224) and os.path.getsize(png) < 200_000


def test_refine_copies_ct_and_mr_byte_for_byte(raw_tree, refined):
    out, _ = refined
    src = _tree_bytes(os.path.join(raw_tree, "radiology_ai"))
    dst = _tree_bytes(out)
    by_name = {os.path.basename(k): v for k, v in dst.items()}
    ctmr = [k for k in src if not k.startswith("US/")]
    assert len(ctmr) == 60
    assert all(by_name[os.path.basename(k)] == src[k] for k in ctmr)


def test_refine_split_is_stratified_and_seeded(raw_tree, refined, tmp_path):
    out, manifest = refined
    assert manifest["classes"] == 9 and {"CT__abd__cyst", "MR__knee__normal", "US__ovary"} <= set(manifest["counts"])
    for c, counts in manifest["counts"].items():
        for s, want in zip(rr.SPLITS, (8, 1, 1)):
            assert abs(counts[s] - want) <= 1, (c, counts)
        for s in rr.SPLITS:
            assert len(os.listdir(os.path.join(out, s, c))) == counts[s]
    again = rr.refine(raw_tree, str(tmp_path / "again"), seed=0, dry_run=True, log=lambda *_: None)
    assert again["counts"] == manifest["counts"]
    a = set(p for p in _tree_bytes(out) if p.startswith("val/"))
    other = rr.refine(raw_tree, str(tmp_path / "seed1"), seed=1, workers=0, no_clean=True, log=lambda *_: None)
    b = set(p for p in _tree_bytes(str(tmp_path / "seed1")) if p.startswith("val/"))
    assert a != b and other["totals"] == manifest["totals"]
    assert not os.path.exists(tmp_path / "again")                              # --dry-run writes nothing


def test_erode_and_dilate_equal_pils_min_and_max_filters():
    from PIL import ImageFilter
    a = np.random.default_rng(0).integers(0, 256, (37, 53)).astype(np.uint8)
    for r in (1, 2, 4):
        pil = Image.fromarray(a)
        assert np.array_equal(rr.erode(a, r), np.asarray(pil.filter(ImageFilter.MinFilter(2 * r + 1))))
        assert np.array_equal(rr.dilate(a, r), np.asarray(pil.filter(ImageFilter.MaxFilter(2 * r + 1))))


def test_row_nanmean_is_numpys_without_the_warning_for_an_empty_row():
    a = np.array([[1.0, np.nan, 3.0], [np.nan] * 3, [2.0, 2.0, 5.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # np.nanmean warned "Mean of empty slice" (a 1600 px frame)
        got = rr.row_nanmean(a)
        assert rr.row_nanmean(np.zeros((0, 40))).shape == (0,)
    assert got[0] == 2.0 and np.isnan(got[1]) and got[2] == 3.0


def test_target_counts():
    assert rr.target_counts(10, (0.8, 0.1, 0.1)) == [8, 1, 1]
    assert rr.target_counts(12, (0.8, 0.1, 0.1)) == [10, 1, 1]
    assert rr.target_counts(3, (0.8, 0.1, 0.1)) == [1, 1, 1]
    assert rr.target_counts(2, (0.8, 0.1, 0.1)) == [2, 0, 0]
    assert sum(rr.target_counts(1001, (0.7, 0.2, 0.1))) == 1001


def test_refine_duplicates_blanks_and_unreadable(tmp_path):
    import shutil
    root = str(tmp_path / "raw")
    rr.make_demo(root, per_class=6, seed=1)
    ct = os.path.join(root, "radiology_ai", "CT", "abd", "normal")
    first = sorted(os.listdir(ct))[0]
    for k in range(3):                                                       # duplicates, one in another class
        shutil.copy(os.path.join(ct, first), os.path.join(ct, f"dup{k}.png"))
    shutil.copy(os.path.join(ct, first), os.path.join(root, "radiology_ai", "CT", "abd", "cyst", "dupx.png"))
    Image.fromarray(np.full((224, 224), 17, np.uint8)).save(os.path.join(ct, "blank.png"))
    with open(os.path.join(ct, "broken.png"), "wb") as fh:
        fh.write(b"\x89PNG garbage")
    out = str(tmp_path / "out")
    m = rr.refine(root, out, workers=0, no_clean=True, log=lambda *_: None)
    (group,) = m["duplicates"]
    assert len(group) == 5 and m["straddling_duplicates"] == []
    files = _tree_bytes(out)
    splits = {p.split("/")[0] for p in files if os.path.basename(p) in {first, "dup0.png", "dup1.png", "dup2.png",
                                                                        "dupx.png"}}
    assert len(splits) == 1                                                  # never straddle two splits
    assert m["blank"] == ["radiology_ai/CT/abd/normal/blank.png"]
    assert [u["file"] for u in m["unreadable"]] == ["radiology_ai/CT/abd/normal/broken.png"]
    assert not any(p.endswith(("blank.png", "broken.png")) for p in files)


def _write_csvs(folder, assignment):
    os.makedirs(folder, exist_ok=True)
    for split in rr.SPLITS:
        with open(os.path.join(folder, rr.CSV_NAMES[split]), "w") as fh:
            fh.write("filename,label\n")
            for rel, s in assignment.items():
                if s == split:
                    fh.write(f"{rel},x\n")


def test_refine_follows_the_split_csvs(raw_tree, tmp_path):
    rels = rr.scan_tree(raw_tree)[0]
    assignment = {rel: rr.SPLITS[i % 3] for i, rel in enumerate(rels[:-5])}   # 5 files left unlisted
    _write_csvs(str(tmp_path / "csv"), assignment)
    m = rr.refine(raw_tree, str(tmp_path / "out"), split_csv_dir=str(tmp_path / "csv"), no_clean=True, workers=0,
                  log=lambda *_: None)
    assert m["mode"] == "csv" and len(m["on_disk_but_unlisted"]) == 5
    for rel, split in assignment.items():
        assert os.path.exists(os.path.join(tmp_path, "out", split, rr.class_of(rel), os.path.basename(rel)))
    src = open(os.path.join(raw_tree, rels[-6]), "rb").read()                 # --no-clean: US copied as is
    assert rels[-6].startswith("radiology_ai/US/")
    assert open(os.path.join(tmp_path, "out", assignment[rels[-6]], rr.class_of(rels[-6]),
                             os.path.basename(rels[-6])), "rb").read() == src


@pytest.mark.parametrize("bad", ["../outside.png", "/etc/passwd", "radiology_ai/../../x.png", "C:/x.png"])
def test_refine_refuses_csv_paths_that_escape_the_root(raw_tree, tmp_path, capsys, bad):
    _write_csvs(str(tmp_path / "csv"), {bad: "train"})
    code = rr.cli(["--data-path", raw_tree, "--output-dir", str(tmp_path / "o"), "--split-csv-dir",
                   str(tmp_path / "csv"), "--workers", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "escapes the data root" in err and len(err.strip().splitlines()) == 1


def _bad_input_cases(raw_tree, tmp):
    """(argv, what the one error line must name) for every kind of bad input refine_radimagenet.py is given."""
    rels = rr.scan_tree(raw_tree)[0]
    us = [r for r in rels if r.startswith("radiology_ai/US/")]
    run = ["--data-path", raw_tree, "--output-dir", str(tmp / "out"), "--workers", "0"]

    def csvs(name, rows, encoding="utf-8"):
        folder = tmp / name
        folder.mkdir()
        for split in rr.SPLITS:
            (folder / rr.CSV_NAMES[split]).write_bytes(("\n".join(rows if split == "train" else ["filename"]) + "\n")
                                                       .encode(encoding))
        return str(folder)

    def masks(name, array):
        folder = tmp / name
        folder.mkdir()
        for rel in us:
            np.save(folder / (os.path.splitext(os.path.basename(rel))[0] + ".npy"), np.zeros((224, 224, 3), np.int16))
        np.save(folder / (os.path.splitext(os.path.basename(us[0]))[0] + ".npy"), array, allow_pickle=True)
        return str(folder)
    (tmp / "a_file").write_text("x")
    (tmp / "out_link_target").mkdir()
    (tmp / "planted").mkdir()
    os.symlink(str(tmp / "out_link_target"), str(tmp / "planted" / "train"))
    return [
        (run + ["--split-csv-dir", csvs("latin1", ["filename", f"{rels[0]}", "radiology_ai/US/ovary/caf\xe9.png"],
                                        "latin-1")], "RadiologyAI_train.csv"),
        (run + ["--split-csv-dir", csvs("short", ["label,filename", f"x,{rels[0]}", "y"])], "line 3"),
        (run + ["--split-csv-dir", csvs("missing", ["filename", rels[0], "radiology_ai/US/ovary/gone.png"])],
         "--allow-missing"),
        (run + ["--split-csv-dir", str(tmp / "a_file")], "--split-csv-dir"),
        (run + ["--correction-masks", masks("shape", np.zeros((100, 100), np.int16))], "shape (100, 100)"),
        (run + ["--correction-masks", masks("pickle", np.array([{"a": 1}] * 4, dtype=object))], "pickled"),
        (run + ["--correction-masks", str(tmp / "a_file")], "--correction-masks"),
        (["--data-path", raw_tree, "--output-dir", str(tmp / "a_file")], "--output-dir"),
        (["--data-path", raw_tree, "--output-dir", os.path.join(raw_tree, "radiology_ai", "out")], "--output-dir"),
        (["--data-path", raw_tree, "--output-dir", str(tmp / "planted")], "symbolic link"),
        (["--data-path", str(tmp / "nowhere"), "--output-dir", str(tmp / "o")], "--data-path"),
        (["--data-path", str(tmp / "a_file"), "--output-dir", str(tmp / "o")], "--data-path"),
        (["--make-demo", str(tmp / "a_file")], "--make-demo"),
        (["--demo-report", str(tmp / "nowhere" / "x.png")], "--demo-report"),
        (["--demo-report", str(tmp)], "--demo-report"),
        (run + ["--colour-threshold", "-1"], "--colour-threshold"),
        (run + ["--black-level", "300"], "--black-level"),
        (run + ["--halo", "9"], "--halo"),
        (["--data-path", raw_tree, "--output-dir", raw_tree], "is the data root"),       # wrote next to radiology_ai/
        (run + ["--allow-missing"], "--allow-missing only goes with --split-csv-dir"),      # flags that were ignored
        (run + ["--split-csv-dir", str(tmp), "--seed", "3"], "--seed is not read with --split-csv-dir"),
        (run + ["--no-clean", "--halo", "2"], "--halo is not read with --no-clean"),
        (run + ["--demo-frames", "5"], "--demo-frames only goes with --demo-report"),
        (["--make-demo", str(tmp / "d1"), "--workers", "3"], "--workers is not read by --make-demo"),
        (["--make-demo", str(tmp / "d2"), "--demo-report", str(tmp / "r.png")], "give one of them per command"),
        (run + ["--seed", "-1"], "--seed"),
        (run + ["--seed", "abc"], "--seed"),
        (run[:-1] + ["-2"], "--workers"),
        (run + ["--ratios", "0.5", "0.5", "0.5"], "--ratios"),
        (run + ["--ratios", "0.5", "0.5", "0"], "--ratios"),            # a 0 would still get one image per class
        (run + ["--ratios", "nan", "0.5", "0.5"], "--ratios"),
        (["--make-demo", str(tmp / "d"), "--demo-per-class", "0"], "--demo-per-class"),
        (["--demo-report", str(tmp / "r.png"), "--demo-frames", "0"], "--demo-frames"),
        (["--output-dir", str(tmp / "o")], "--data-path"),
    ]


def test_refine_bad_input_is_one_line_and_exit_code_2(raw_tree, tmp_path, capsys):
    cases = _bad_input_cases(raw_tree, tmp_path)
    for argv, names in cases:
        try:
            code = rr.cli(argv)
        except SystemExit as e:                                              # argparse's own errors
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, (argv, err)
        assert names in err and "Traceback" not in err, (argv, err)
    assert os.listdir(tmp_path / "out_link_target") == []                    # nothing written through the link


@pytest.mark.parametrize("fault,code,line", [
    (KeyboardInterrupt(), 130, "interrupted: the finished outputs are kept; run the same command again to go on"),
    (OSError(5, "Input/output error", "/raw/x.png"), 2, "error: Input/output error: /raw/x.png")])
def test_refine_ctrl_c_and_a_failing_disk_are_one_line(raw_tree, tmp_path, capsys, monkeypatch, fault, code, line):
    def fail(*a, **k):
        raise fault
    monkeypatch.setattr(rr, "refine", fail)
    assert rr.cli(["--data-path", raw_tree, "--output-dir", str(tmp_path / "o")]) == code
    assert capsys.readouterr().err.strip() == line


def test_refine_allow_missing_goes_on_and_lists_them(raw_tree, tmp_path, capsys):
    rels = rr.scan_tree(raw_tree)[0]
    _write_csvs(str(tmp_path / "csv"), {**{r: "train" for r in rels[:6]}, "radiology_ai/CT/abd/cyst/gone.png": "val"})
    code = rr.cli(["--data-path", raw_tree, "--output-dir", str(tmp_path / "o"), "--split-csv-dir",
                   str(tmp_path / "csv"), "--allow-missing", "--workers", "0", "--no-clean"])
    out = capsys.readouterr().out
    assert code == 0 and "1 listed files are missing (first: radiology_ai/CT/abd/cyst/gone.png)" in out
    m = json.load(open(tmp_path / "o" / "manifest.json"))
    assert m["listed_but_missing"] == ["radiology_ai/CT/abd/cyst/gone.png"] and m["images_written"] == 6
    for path in ("manifest.json", "manifest_images.csv", "train"):                # every path written is printed
        assert os.path.join(str(tmp_path / "o"), path) in out


def test_refine_follows_links_inside_the_root_only_once_and_never_writes_through_one(tmp_path):
    import shutil
    root = tmp_path / "raw"
    rr.make_demo(str(root), per_class=3, seed=2)
    ct = root / "radiology_ai" / "CT" / "abd" / "normal"
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.fromarray(np.full((8, 8), 9, np.uint8)).save(outside / "secret.png")
    os.symlink(str(outside), str(ct / "away"))                               # out of the root
    os.symlink(str(root / "radiology_ai" / "CT"), str(ct / "loop"))          # round a loop
    os.symlink(str(outside / "secret.png"), str(ct / "secret.png"))          # a file out of the root
    first = sorted(f for f in os.listdir(ct) if f.startswith("ct_"))[0]
    os.symlink(str(ct / first), str(ct / "again.png"))                       # the same file twice
    os.symlink(str(root / "radiology_ai" / "MR"), str(root / "radiology_ai" / "CT" / "mr"))   # a second view
    store = root / "store"                                                   # inside --data-path, outside the tree:
    shutil.move(str(root / "radiology_ai" / "US" / "ovary"), str(store))    # followed
    os.symlink(str(store), str(root / "radiology_ai" / "US" / "ovary"))
    files, skipped = rr.scan_tree(str(root))
    assert not any("secret" in f or "/away/" in f or "/loop/" in f or "again" in f for f in files)
    assert skipped["links_out_of_root"] == ["radiology_ai/CT/abd/normal/away", "radiology_ai/CT/abd/normal/secret.png"]
    assert skipped["link_loops"] == ["radiology_ai/CT/abd/normal/loop"]
    assert skipped["same_file_twice"] == [f"radiology_ai/CT/abd/normal/again.png = radiology_ai/CT/abd/normal/{first}",
                                          "radiology_ai/CT/mr = radiology_ai/MR"]
    assert len(files) == 27 and sum(f.startswith("radiology_ai/US/ovary/") for f in files) == 3   # each file once
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    os.symlink(str(victim), str(out / ".progress.jsonl"))                    # a planted link among refine's files
    assert rr.cli(["--data-path", str(root), "--output-dir", str(out), "--workers", "0"]) == 2
    assert victim.read_text() == "keep me"


def test_refine_disk_full_is_one_line_and_leaves_no_temporary_file(raw_tree, tmp_path, capsys, monkeypatch):
    import errno

    def full(fd):                                   # the data does not fit: the flush to disk fails
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    code = rr.cli(["--data-path", raw_tree, "--output-dir", str(tmp_path / "o"), "--workers", "0", "--no-clean"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "No space left on device" in err, err
    assert "re-run the same command" in err
    assert not [f for _, _, fs in os.walk(tmp_path / "o") for f in fs if ".tmp." in f]
    monkeypatch.undo()
    pgnm.write_atomic(str(tmp_path / "plain.bin"), b"x")                       # files get the usual mode, not 0600
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "plain.bin").st_mode & 0o777 == 0o666 & ~umask


def test_refine_help_explains_every_flag_and_shows_each_default_once():
    for action in rr.build_parser()._actions:
        if action.dest == "help":
            continue
        assert action.help and len(action.help) > 20, action.dest
        shown = action.help.count("(default:")
        assert shown == (action.default is not None and action.default is not False), action.dest  # once


def test_refine_resumed_after_interruption_equals_a_straight_run(raw_tree, refined, tmp_path, monkeypatch):
    out_ref, manifest_ref = refined
    out = str(tmp_path / "out")
    real, calls = rr.process, []

    def dying(job, params=rr.CleanParams()):
        if len(calls) == 40:
            raise KeyboardInterrupt
        calls.append(job.rel)
        return real(job, params)
    monkeypatch.setattr(rr, "process", dying)
    with pytest.raises(KeyboardInterrupt):
        rr.refine(raw_tree, out, seed=0, workers=0, log=lambda *_: None)
    assert 0 < len(_tree_bytes(out)) < 90 and not os.path.exists(os.path.join(out, "manifest.json"))
    monkeypatch.setattr(rr, "process", real)
    lines = []
    m = rr.refine(raw_tree, out, seed=0, workers=0, log=lines.append)
    assert any("resuming: 40 outputs already done, 50 to go" in ln for ln in lines)
    assert _tree_bytes(out) == _tree_bytes(out_ref)
    assert m["checksum"] == manifest_ref["checksum"] and m["counts"] == manifest_ref["counts"]


def test_refine_with_workers_equals_in_process(raw_tree, refined, tmp_path):
    m = rr.refine(raw_tree, str(tmp_path / "o"), seed=0, workers=2, log=lambda *_: None)
    assert m["checksum"] == refined[1]["checksum"]


def test_correction_mask_is_added_without_wraparound_in_rgb_order():
    img = Image.fromarray(np.dstack([np.full((224, 224), v, np.uint8) for v in (250, 100, 5)]), "RGB")
    bgr = np.zeros((224, 224, 3), np.int16)
    bgr[..., 0], bgr[..., 2] = -10, 20                                     # B -10, R +20 in OpenCV's order
    out = np.asarray(rr.apply_correction_mask(img, bgr))
    assert out[0, 0].tolist() == [255, 100, 0]                             # 250+20 clipped, 5-10 clipped
    small = Image.fromarray(np.full((100, 100), 60, np.uint8))
    grey = rr.apply_correction_mask(small, np.full((224, 224), 7, np.int16))
    assert grey.mode == "L" and grey.size == (224, 224) and np.asarray(grey)[5, 5] == 67


def test_refine_applies_the_authors_masks(raw_tree, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    us = [r for r in rr.scan_tree(raw_tree)[0] if r.startswith("radiology_ai/US/")]
    for rel in us[:-1]:
        np.save(masks / (os.path.splitext(os.path.basename(rel))[0] + ".npy"), np.full((224, 224, 3), 3, np.int16))
    m = rr.refine(raw_tree, str(tmp_path / "o"), correction_masks=str(masks), workers=0, log=lambda *_: None)
    assert m["actions"]["correct"] == len(us) - 1 and m["missing_correction_masks"] == [us[-1]]


def test_sixteen_bit_ct_is_scaled_to_eight_bits(tmp_path):
    root = tmp_path / "raw" / "radiology_ai" / "CT" / "abd" / "normal"
    root.mkdir(parents=True)
    for i in range(3):
        Image.fromarray((np.arange(224 * 224).reshape(224, 224) % 4096 + i).astype(np.uint16)).save(root / f"{i}.png")
    rr.refine(str(tmp_path / "raw"), str(tmp_path / "o"), workers=0, log=lambda *_: None)
    outs = [os.path.join(dp, f) for dp, _, fs in os.walk(tmp_path / "o") for f in fs if f.endswith(".png")]
    assert len(outs) == 3
    a = np.asarray(Image.open(outs[0]))
    assert a.dtype == np.uint8 and a.min() == 0 and a.max() == 255


def _frame_with(rng, k, draw):
    """A clean scanner frame, `draw(ImageDraw, clean, inside)` on an RGBA layer over it, both resized to 224 px with
    one of the resize filters: (raw RGB, clean L)."""
    from PIL import ImageDraw
    clean, inside = rr.clean_frame(rng, *rr.SCANNER_SIZE)
    layer = Image.new("RGBA", rr.SCANNER_SIZE, (0, 0, 0, 0))
    draw(ImageDraw.Draw(layer), clean, inside)
    raw = Image.fromarray(clean).convert("RGBA")
    raw.alpha_composite(layer)
    f = rr.RESIZE_FILTERS[k % 3]
    return (np.asarray(raw.convert("RGB").resize((224, 224), f)),
            np.asarray(Image.fromarray(clean).resize((224, 224), f)))


def test_clean_removes_thin_cross_marks_over_tissue():
    """+ and x marks with 2 px arms over tissue (the cross test compares the arms with the directions between them
    2-3 px out: a 2 px arm lights the pixels next to the centre)."""
    rng = np.random.default_rng(11)
    removed = []
    for k in range(24):
        def cross(d, clean, inside, k=k):
            m = rr.box_mean(clean.astype(float), 20) * rr.erode(inside.astype(np.uint8), 40)
            ys, xs = np.nonzero(m > 0)
            i = np.argsort(m[ys, xs])[len(ys) // 2]                      # tissue of middling brightness
            y, x, a = int(ys[i]), int(xs[i]), 7
            arms = ([(x - a, y - a), (x + a, y + a)], [(x - a, y + a), (x + a, y - a)]) if k % 2 else \
                ([(x - a, y), (x + a, y)], [(x, y - a), (x, y + a)])
            for arm in arms:
                d.line(arm, fill=(230, 230, 230, 255), width=2)
        raw, clean = _frame_with(rng, k, cross)
        grey = np.asarray(Image.fromarray(raw).convert("L"))
        out = np.asarray(rr.clean_ultrasound(Image.fromarray(raw))[0])
        strokes = rr.stroke_pixels(grey) & (grey != clean)
        assert strokes.sum() >= 5
        removed.append((strokes & (out != grey)).sum() / strokes.sum())
    assert sum(r >= 0.9 for r in removed) >= 20, removed                  # measured 21 of 24


def test_clean_removes_arrows_with_solid_heads_over_tissue():
    """Arrows as the demo draws them (a 1-2 px shaft, a solid 12 px triangle at its tip) in 24 directions over tissue:
    the head's few solid pixels fit in a 2 px square (a specular reflection's make a longer row), so it is a glyph.
    Solid heads were refused as reflections: 14 of 24 arrows removed; and no tissue beside them changes."""
    rng = np.random.default_rng(13)
    removed = []
    for k in range(24):
        def arrow(d, clean, inside, k=k):
            m = rr.box_mean(clean.astype(float), 20) * rr.erode(inside.astype(np.uint8), 40)
            ys, xs = np.nonzero(m > 0)
            i = np.argsort(m[ys, xs])[len(ys) // 2]                      # tissue of middling brightness
            y, x, t = int(ys[i]), int(xs[i]), np.pi * k / 12 + 0.1
            d.line([(x, y), (x + 30 * np.cos(t), y + 30 * np.sin(t))], fill=(220, 220, 220, 255), width=1 + k % 2)
            d.polygon([(x, y)] + [(x - 12 * np.cos(t + s), y - 12 * np.sin(t + s)) for s in (2.6, -2.6)],
                      fill=(220, 220, 220, 255))
        raw, clean = _frame_with(rng, k, arrow)
        grey = np.asarray(Image.fromarray(raw).convert("L"))
        out = np.asarray(rr.clean_ultrasound(Image.fromarray(raw))[0])
        strokes = rr.stroke_pixels(grey) & (grey != clean)
        assert strokes.sum() >= 10 and not ((out != grey) & ~rr.grow_mask(grey != clean, 2)).any(), k
        removed.append((strokes & (out != grey)).sum() / strokes.sum())
    assert sum(r >= 0.9 for r in removed) >= 19, removed                  # measured 21 of 24


def test_a_glyph_with_a_solid_head_is_an_arrow_and_a_solid_row_is_not():
    """glyphs(): an arrowhead (5 px, its solid core 2 px: more than glyph_solid of the piece) on a shaft is
    found; streaks as big and as bright (reflections) are not: solid pixels in a 4 px row, or a tilted streak whose
    2 solid pixels fit the 2 px square but which runs out of them both ways (a clean demo frame had one)."""
    every = np.ones((40, 40), bool)
    z = np.zeros((40, 40))
    for r, (x0, x1) in enumerate(((10, 11), (9, 12), (8, 13), (8, 13), (9, 12))):
        z[10 + r, x0:x1] = 4.0                                            # the head, tip up: solid at (12-13, 10)
    z[15:22, 10] = 3.0                                                    # shaft
    assert rr.glyphs(z, every)[10:22, 10].all()
    z = np.zeros((40, 40))
    z[10:13, 8:14] = 4.0                                                  # 3 x 6 streak: solid row of 4
    z[13, 9:13] = z[9, 9:13] = 3.0
    assert not rr.glyphs(z, every).any()
    z = np.zeros((40, 40))
    for i in range(-4, 6):                                                # a tilted streak, thicker in its middle:
        w = 2 if i in (-1, 0, 1, 2) else 1                                # solid at (20, 20), (21, 21) only, but it
        z[20 + i, 20 + i - w:21 + i + w] = 3.5                            # runs out of them both ways
    assert not rr.glyphs(z, every).any()


def test_a_box_line_stops_at_the_corner_not_in_the_speckle_past_it():
    """An ROI box's side ends at the perpendicular side; dimmer ridge pixels (speckle) that continue it past the corner
    are not the line (they were, painting 3-4 px of tissue past the box on the demo)."""
    z = np.zeros((224, 224))
    z[100, 60:121], z[101:161, 120], z[100, 121:127] = 2.6, 2.0, 0.6    # top side, right side, speckle past the corner
    every, none = np.ones(z.shape, bool), np.zeros(z.shape, bool)
    found = rr.axis_lines(z, every, every, none)
    assert found[100, 60:121].all() and found[100:161, 120].all()       # both sides, to their ends
    assert not found[100, 121:].any() and found.sum() == 61 + 60
    z[100, 121:127] = 2.6                                                # a side that goes on past it is followed
    assert rr.axis_lines(z, every, every, none)[100, 60:127].all()


def test_a_skin_line_stops_at_its_last_pixel_not_in_flat_skin_past_it():
    """skin_lines: an ROI line along the fan's top edge (one grey) is found to its ends; skin just past its end that
    is as flat by chance for 5 px, then brighter, is not taken with it (demo seeds 8 #2 and 11 #13: the line's
    runs reached 6-10 px past its end, 29 and 11 px of tissue changed)."""
    rng = np.random.default_rng(3)
    grey = np.zeros((60, 120))
    grey[10:] = rng.uniform(70, 170, (50, 120))                            # speckle under the fan's top edge (row 10)
    grey[11, 40:81] = 120.0                                                # the line
    grey[11, 35:40], grey[11, 34] = (118, 124, 121, 119, 123), 150.0       # skin as flat as ink, then brighter
    found = rr.skin_lines(grey, grey > 0)
    assert found[11, 40:81].all() and not found[11, :34].any() and not found[11, 85:].any()


def test_a_specular_streak_in_a_faint_ridge_is_no_box_line():
    """axis_lines: a run whose thirds pass only because a specular streak (bright on both sides: 3 px wide) fills one
    of them is no line (demo seeds 4 and 10: 42 and 45 px of tissue painted along such streaks); the same run with a
    1 px bright part is one."""
    every, none = np.ones((224, 224), bool), np.zeros((224, 224), bool)
    z = np.zeros((224, 224))
    z[100, 50:86] = 1.2                                                  # a faint ridge (speckle) ...
    z[100, 50:63], z[[99, 101], 50:63] = 4.0, 2.5                        # ... ending in a streak
    assert not rr.axis_lines(z, every, every, none).any()
    z[[99, 101], 50:63], z[100, 50:63] = 0.0, 1.5                        # a thin line
    assert rr.axis_lines(z, every, every, none)[100, 50:86].all()


def test_a_specular_streak_between_two_peaks_is_no_caliper():
    """caliper_lines: a solid segment between two peaks whose pixels 1 px to both sides are bright too is a specular
    streak, not a caliper (demo seeds 4, 6, 10: 218 px of tissue painted along them); a 1 px one still is."""
    every, none = np.ones((224, 224), bool), np.zeros((224, 224), bool)
    z = np.zeros((224, 224))
    z[100, 60:85], z[[99, 101], 60:85], z[[98, 102], 60:85] = 3.6, 2.8, 0.4
    z[100, [60, 84]] = 4.5
    assert not rr.caliper_lines(z, every, none).any()
    z[[98, 99, 101, 102], 60:85] = 0.0
    assert rr.caliper_lines(z, every, none)[100, 60:85].sum() >= 20


def test_a_dotted_caliper_is_painted_on_its_dots_not_across_the_gaps():
    """Two + marks joined by 2 px dots with 3 px gaps: every dot is found, no pixel more than 1 px from the ink is
    (the gaps were bridged; on the demo the path ran beside the dots, and the halo and rim of a gap reached 3 px
    into the tissue)."""
    z = np.zeros((224, 224))
    for x in (60, 100):
        z[100, x - 3:x + 4] = z[97:104, x] = 4.0                         # + marks
    for x in range(65, 100, 5):
        z[100:102, x:x + 2] = 3.0                                          # dots
    every, none = np.ones(z.shape, bool), np.zeros(z.shape, bool)
    found = rr.caliper_lines(z, every, none)
    assert not (found & ~rr.grow_mask(z > 0, 1)).any()
    assert all(found[100:102, x:x + 2].any() for x in range(65, 100, 5))


def test_a_bright_speck_in_line_past_a_calipers_end_is_not_one_of_its_dots():
    """joined_dots: of a segment's dot samples (px along it), a speck (samples within 3 px) at either end more than
    9 px from the others is not painted (demo seed 3 #5: a thin specular reflection in line with the dots, past the
    end mark); longer stretches at the ends, sparse dots, and gaps inside the line (faint dots), are kept."""
    assert rr.joined_dots(np.array([0., 1, 11, 12, 13, 16, 20])).tolist() == [False, False] + [True] * 5
    assert rr.joined_dots(np.array([0., 1, 2, 3, 20])).tolist() == [True] * 4 + [False]
    assert rr.joined_dots(np.array([0., 2, 20, 24, 28, 29])).tolist() == [False] * 2 + [True] * 4
    assert rr.joined_dots(np.array([0., 1, 2, 3, 4, 20, 21, 22, 23])).all()          # two dotted stretches
    assert rr.joined_dots(np.array([0., 4, 8, 30, 34, 38, 42])).all()                # a gap inside: faint dots
    assert rr.joined_dots(np.array([0., 9, 18])).all()                                # 9 px apart: dots


def _demo_frames(seed, picks):
    """{index: (raw, clean)} of the demo report's frames of `seed` (rendered in order, as --demo-report does)."""
    rng, out = np.random.default_rng(seed), {}
    for k in range(max(picks) + 1):
        raw, clean, _ = rr.stored_frame(rng)
        if k in picks:
            out[k] = (raw, clean)
    return out


def test_demo_frames_that_were_damaged_keep_the_tissue_beside_their_annotation():
    """Demo frames where the cleaning changed tissue more than 2 px from any annotation: seed 2 #38 (an ROI side run
    on past the box's corner), #48 (a lone dim pixel on the fan's resampled top edge, taken for annotation with its
    halo); seed 3 #24 (a dim ruler joined to the fan by its resampled rim, "continued" into a bright speckle); seed 0
    #1, #9 (a caliper's gaps painted beside its dots, then their rim); seed 0 #25, seed 1 #16 (bright speckle touching
    a word's last letter, taken with the word: 10 and 6 px); seed 3 #5 (a thin specular reflection in line with a
    caliper's dots, 9 px past its end mark, painted as a dot: 10 px). Each is clean of that damage, and its stroke
    pixels are removed as much as when it was fixed (in %)."""
    for seed, removed in ((0, {1: 99.2, 9: 97.2, 25: 86.7}), (1, {16: 100.0}), (2, {38: 93.7, 48: 96.7}),
                          (3, {5: 95.1, 24: 84.9})):
        for k, (raw, clean) in _demo_frames(seed, set(removed)).items():
            refined = np.asarray(rr.clean_ultrasound(Image.fromarray(raw))[0])
            fig = rr.summarise(rr.frame_metrics(raw, clean, refined))
            assert fig["changed_beyond_2px"] == 0 and fig["stroke_removed_pct"] >= removed[k], (seed, k, fig)


def test_clean_keeps_every_pixel_of_frames_crowded_with_specular_reflections():
    """Frames crowded with the demo's bright specular reflections (solid blobs: anatomy, though a cross's centre is as
    bright) and no annotation: no pixel changes."""
    rng = np.random.default_rng(12)
    w, h = rr.SCANNER_SIZE
    for k in range(6):
        inside, depth, ang = rr._probe(rng, w, h)
        s = rr._speckle(rng, (h, w))
        spec = np.maximum.reduce([rr._speculars(rng, inside, depth, ang) for _ in range(3)])
        img = rr._echogenicity(rng, inside, depth) * s * 0.85 + spec * (0.8 + 0.2 * np.minimum(s, 1.5))
        clean = np.clip(img * inside * 255, 0, 255).round().astype(np.uint8)
        frame = np.asarray(Image.fromarray(clean).resize((224, 224), rr.RESIZE_FILTERS[k % 3]))
        out, changed = rr.clean_ultrasound(Image.fromarray(frame))
        assert changed == 0 and np.array_equal(np.asarray(out), frame)


def test_a_specular_reflection_with_a_cross_shaped_peak_is_not_a_mark():
    """small_marks: an elongated reflection passes the cross test with its length and width as arms (uneven ones), on
    a piece with a soft skirt and a single peak; it is kept (demo seed 7 #14: 22 px changed around one; seed 108's
    second annotation-free frame, rendered as the crowded frames above: 22 px), and the frame's marks still go."""
    (raw, clean), = _demo_frames(7, {14}).values()
    fig = rr.summarise(rr.frame_metrics(raw, clean, np.asarray(rr.clean_ultrasound(Image.fromarray(raw))[0])))
    assert fig["changed_beyond_2px"] == 0 and fig["stroke_removed_pct"] >= 61.9, fig     # removed as before
    rng = np.random.default_rng(108)
    w, h = rr.SCANNER_SIZE
    rr._probe(rng, w, h), rr.clean_frame(rng, w, h)                        # the first frame: plain
    inside, depth, ang = rr._probe(rng, w, h)
    s = rr._speckle(rng, (h, w))
    spec = np.maximum.reduce([rr._speculars(rng, inside, depth, ang) for _ in range(3)])
    img = rr._echogenicity(rng, inside, depth) * s * 0.85 + spec * (0.8 + 0.2 * np.minimum(s, 1.5))
    frame = np.clip(img * inside * 255, 0, 255).round().astype(np.uint8)
    frame = np.asarray(Image.fromarray(frame).resize((224, 224), rr.RESIZE_FILTERS[1]))
    assert rr.clean_ultrasound(Image.fromarray(frame))[1] == 0


def test_a_cross_found_on_the_flank_of_a_blob_in_a_wide_skirt_is_a_reflection():
    """small_marks: an elongated reflection with a broad top (4+ px near its brightest grey, so not soft_peaks) still
    passes the cross test with uneven arms at a pixel on its flank, below 80% of the peak beside it; in a ring as
    bright as a reflection's skirt (above MARK_FLANK[1]) that is no cross (demo seed 30 #8, seed 33 #33: 26 px
    changed around each). An arrowhead's flank in a fainter ring stays a mark (seed 22 #11, removed as before)."""
    for seed, k, removed in ((30, 8, 100.0), (33, 33, 96.5), (22, 11, 92.2)):
        (raw, clean), = _demo_frames(seed, {k}).values()
        fig = rr.summarise(rr.frame_metrics(raw, clean, np.asarray(rr.clean_ultrasound(Image.fromarray(raw))[0])))
        assert fig["changed_beyond_2px"] == 0 and fig["stroke_removed_pct"] >= removed, (seed, k, fig)


def test_a_convex_glyph_with_one_peak_in_a_faint_halo_is_a_reflection():
    """glyphs() given grey: a piece with a faint bright ring (under glyph_ring), a single peak and its convex hull
    nearly filled is a specular reflection (an elliptical blob or a straight streak), not a glyph: demo seed 6 #0 (a
    small blob, 32 px changed) and seed 8 #28 (one cut by the fan's edge, 28 px) keep their tissue and lose no
    annotation; a cross and a letter as big and in the same halo bend, and stay glyphs."""
    for seed, k, removed in ((6, 0, 65.6), (8, 28, 96.8)):
        (raw, clean), = _demo_frames(seed, {k}).values()
        fig = rr.summarise(rr.frame_metrics(raw, clean, np.asarray(rr.clean_ultrasound(Image.fromarray(raw))[0])))
        assert fig["changed_beyond_2px"] == 0 and fig["stroke_removed_pct"] >= removed, (seed, k, fig)
    every = np.ones((40, 40), bool)
    z = np.zeros((40, 40))
    z[20, 14:27] = 2.4 + 2.6 * np.exp(-0.5 * ((np.arange(14, 27) - 20) / 1.5) ** 2)    # a streak, 2 px wide,
    z[21] = 0.9 * z[20]                                                           # peaked in the middle of its top row
    z = np.where(z > 0, z, np.where(rr.grow_mask(z > 0, 1), 0.15, 0.0))          # its ring 0.15 (a soft skirt)
    grey = 60 + 30 * z
    assert rr.glyphs(z, every).any() and not rr.glyphs(z, every, grey=grey).any()
    x = np.zeros((40, 40))
    for i in range(-4, 5):
        x[20 + i, 20 + i] = x[20 + i, 20 - i] = 4.0                               # an x: 17 px, bent
    x = np.where(x > 0, x, np.where(rr.grow_mask(x > 0, 1), 0.15, 0.0))
    assert rr.glyphs(x, every, grey=60 + 30 * x)[20, 20]


def test_a_flat_grey_ruler_joined_to_the_fan_by_its_halo_is_found():
    """flat_lines: a depth ruler 1 px off a rectangular image, joined to it by the resize's dim halo and by its focus
    mark (so estimate_fan takes it for tissue, inside the hull: axis_lines sees the fan's own border there), is one
    flat grey from px to px; it goes (demo seed 8 #9: 144 ruler px were left, 22 now). The speckle stays."""
    rng = np.random.default_rng(0)
    grey = np.zeros((112, 112))
    grey[8:104, 8:80] = np.clip(100 * rng.gamma(4, 0.25, (96, 72)), 0, 255)    # tissue: speckle
    grey[8:104, 80] = 16                                                      # the resize's dim halo
    grey[8:104, 81] = 143                                                     # the ruler, 1 px off the image
    for y in range(8, 104, 22):
        grey[y, 82:86] = 143                                                  # its ticks
    for i in range(5):
        grey[50 - i:51 + i, 79 - 2 * i:81 - 2 * i] = 200                      # its focus mark, a triangle
    rgb = np.repeat(grey.round().astype(np.uint8)[..., None], 3, 2)
    fan, hull = rr.estimate_fan(grey)
    assert fan[8:104, 81].all() and hull[8:104, 81].mean() > 0.9              # taken for tissue
    mask, _ = rr.detect_artifacts(rgb)
    assert mask[8:104, 81].mean() > 0.85                                     # the ruler goes
    assert not rr.flat_lines(grey)[:, :79].any()                              # no speckle is flat


def test_a_time_stamp_just_above_the_fan_is_text():
    """edge_text: a time stamp drawn just above a rectangular image, its letters joined to the tissue's first row by
    the resize, is taken for tissue by estimate_fan (a piece near the hull, like a corner the opening rounded off);
    its grey jumps to and fro along the rows, between letters and gaps, and it goes (demo seed 8 #2, #6, #24). The
    tissue stays."""
    rng = np.random.default_rng(1)
    big = np.zeros((300, 300))
    big[60:290, 20:280] = np.clip(110 * rng.gamma(4, 0.25, (230, 260)), 0, 255)    # tissue from row 60
    scan = Image.fromarray(big.round().astype(np.uint8)).convert("RGBA")
    layer = Image.new("RGBA", scan.size, (0, 0, 0, 0))
    rr.draw_text(layer, (40, 40), "2010/05/26 20:33:32", 18, 200)                 # rows 45-58
    scan.alpha_composite(layer)
    raw = np.asarray(scan.convert("RGB").resize((112, 112), Image.BILINEAR))
    ink = np.asarray(Image.fromarray(np.asarray(layer)[..., 3]).resize((112, 112), Image.BILINEAR)) > 40
    fan, _ = rr.estimate_fan(np.asarray(Image.fromarray(raw).convert("L"), np.float64))
    assert fan[ink].all()                                                    # taken for tissue
    mask, _ = rr.detect_artifacts(raw)
    assert mask[ink].all() and not (mask & ~rr.grow_mask(ink, 2)).any()


def test_edge_text_keeps_a_piece_taller_than_a_line_of_letters():
    """edge_text: pixels outside the hull whose grey jumps x2 to and fro along the rows are text only in pieces of
    fewer than EDGE_TALL rows; a taller one is anatomy (a bright bone surface over its black shadow, which ends the
    fan there: a hostile check's frames lost 94 px of bone to it)."""
    grey = np.zeros((60, 60))
    grey[:, ::2] = 200.0                                   # columns of ink and black gaps, as between letters
    fan = np.zeros((60, 60), bool)
    fan[:, 5:55] = True
    rows = np.arange(60)[:, None]
    short = rr.edge_text(grey, fan, fan & (rows < 50))     # outside the hull: the last 10 rows
    assert short[50:, 8:52].any() and not short[:50].any()
    assert not rr.edge_text(grey, fan, fan & (rows < 40)).any()      # the last 20 rows: not a line of letters


def test_a_one_pixel_frame_is_cleaned_not_a_crash():
    """convex_hull of one pixel (PIL draws no polygon of one point): a 1 x 1 colour PNG went to the manifest as
    'unreadable' with a TypeError from the cleaning."""
    assert rr.convex_hull(np.pad(np.ones((1, 1), bool), 2)).sum() == 1
    for shape in ((1, 1), (1, 2), (2, 1)):
        rgb = np.zeros(shape + (3,), np.uint8)
        rgb[..., 0] = 200                                  # colour: replaced, with the margin's black
        out, changed = rr.clean_ultrasound(Image.fromarray(rgb))
        assert changed == rgb.shape[0] * rgb.shape[1] and not np.asarray(out).any()


def test_a_dark_frame_keeps_its_tissue_with_a_lower_black_level():
    """A frame far darker than the demo's (grey x 0.3): dim tissue under --black-level splits the image and the
    pieces cut off are replaced as margin annotation; with --black-level 4 (the README's advice) no pixel changes."""
    clean, _ = rr.clean_frame(np.random.default_rng(200), *rr.SCANNER_SIZE)
    dark = Image.fromarray(np.clip(clean * 0.3, 0, 255).astype(np.uint8)).resize((224, 224), Image.BILINEAR)
    assert rr.clean_ultrasound(dark)[1] > 100
    assert rr.clean_ultrasound(dark, rr.CleanParams(black_level=4))[1] == 0
