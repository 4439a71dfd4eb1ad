"""Tests of pgnm.py, CPU only, tiny shapes. Sections mirror the file: pure math against oracles (torch's Beta,
torchvision's blur, hand computations, scikit-learn) -> architecture (timm / torchvision) -> checkpoints -> data ->
phases end to end -> distributed -> resume -> GPU/AMP (skipped without CUDA).

    pip install -r requirements-dev.txt && python -m pytest -q test_pgnm.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys

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


def test_beta_mask_matches_torch_beta_and_is_float32_under_autocast():
    torch.manual_seed(0)
    la, lb = torch.randn(4, 16), torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m, logp = pgnm.sample_beta_mask(la.bfloat16(), lb.bfloat16())
    assert m.dtype == torch.float32 and logp.dtype == torch.float32
    assert ((m > 0) & (m < 1)).all()
    ref = torch.distributions.Beta(la.bfloat16().float().exp(), lb.bfloat16().float().exp()).log_prob(m)
    assert torch.allclose(logp, ref, atol=1e-5)


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
    import warnings
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


def test_compiled_and_ddp_wrappers_unwrap_to_plain_keys():
    m = pgnm.build_model("resnet10t", 5)
    compiled = torch.compile(m)                    # lazy: nothing is compiled until called
    assert pgnm.unwrap(compiled) is m
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    assert list(pgnm.strip_prefixes(compiled.state_dict())) == list(m.state_dict())


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
                   "32", "--val-crop-size", "32", "--val-resize-size", "32", "--grid", "8", "--workers", "0",
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


def test_finetune_without_a_heated_run_says_what_to_do(tmp_path):
    with pytest.raises(pgnm.UserError, match="--phase heated"):
        pgnm.main(tiny("finetune", output_dir=str(tmp_path / "runs" / "finetune")))


def test_import_has_no_side_effects():
    proc = subprocess.run([sys.executable, "-c", "import pgnm"], capture_output=True, text=True, cwd=HERE)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""


# =====================================================================================================================
#  Phases end to end
# =====================================================================================================================


def test_heated_then_finetune_end_to_end(tmp_path):
    timm = pytest.importorskip("timm")
    runs = tmp_path / "runs"
    res = pgnm.main(tiny(output_dir=str(runs / "heated"), epochs=2, save_masks=True))
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
    assert png.size == (8 * 34 + 2, 3 * 34 + 2)
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
def test_heated_variants(tmp_path, kw):
    res = pgnm.main(tiny(output_dir=str(tmp_path), **kw))
    assert 0.0 <= res["val_acc"] <= 1.0 and math.isfinite(res["val_noisy_auroc"])
    ck = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert (ck["policy_net"] is None) == (kw.get("noise", "beta") != "beta")


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


def test_readme_training_loop_example_runs():
    """The README's 'use the pieces in your own loop' example, executed as written."""
    with open(os.path.join(HERE, "README.md")) as fh:
        text = fh.read()
    m = re.search(r"<!-- example: own-loop -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README example block missing"
    namespace: dict = {}
    exec(compile(m.group(1), "README.md", "exec"), namespace)
    assert math.isfinite(namespace["loss"].item())


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
    proc = run_cli(*args, "--resume", "auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {os.path.join(out, 'checkpoint.pth')}" in proc.stdout
    _assert_same_state(_final_state(out), straight_run)
    epochs = [r["epoch"] for r in read_log(out) if not r.get("final")]
    assert epochs == [1, 2], epochs                                              # no epoch logged twice
    if where == "mid_epoch":
        assert f"epoch 2, step {ck['step']}" in proc.stdout or "epoch 2, step" in proc.stdout


def test_sigterm_checkpoints_mid_epoch_and_the_resumed_run_is_identical(tmp_path, straight_run):
    import signal
    import time
    out = str(tmp_path)
    args = [*TINY_CLI, "--workers", "0", "--output-dir", out]
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "pgnm.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:                       # wait for a step in the middle of epoch 2
        if "epoch 2/2 step 5/12" in line:
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3 and "stopped: stop requested by signal" in err, err[-2000:]
    ck = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    assert ck["epoch"] == 1 and 5 <= ck["step"] < 12
    res = run_cli(*args, "--resume", "auto")
    assert res.returncode == 0, res.stderr[-2000:]
    _assert_same_state(_final_state(out), straight_run)


def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path):
    out = str(tmp_path)
    pgnm.main(tiny(output_dir=out, epochs=2))
    path = os.path.join(out, "checkpoint.pth")
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)
    proc = run_cli(*TINY_CLI, "--epochs", "3", "--workers", "0", "--output-dir", out, "--resume", "auto")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "checkpoint.pth is unreadable" in proc.stdout and "trying the previous checkpoint" in proc.stdout
    assert f"resumed from {os.path.join(out, 'checkpoint_prev.pth')}: epoch 2, step 0" in proc.stdout
    assert [r["epoch"] for r in read_log(out) if not r.get("final")] == [1, 2, 3]


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_gradscaler_on_gpu(tmp_path):
    res = pgnm.main(tiny(output_dir=str(tmp_path), amp=True, device="cuda", epochs=2))
    ck = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert ck["scaler"] is not None and ck["scaler"]["scale"] > 0
    assert math.isfinite(res["val_loss"])
    run, state = _extreme_run(tiny(amp=True, device="cuda"))
    run.info = pgnm.DistInfo(device=torch.device("cuda"))
    run.model.cuda(), run.policy.cuda()
    state.alpha_d, state.beta_d = state.alpha_d.cuda(), state.beta_d.cuda()
    run.scaler = torch.amp.GradScaler("cuda")
    fwd, ok, _ = pgnm.train_step(run, state, torch.randn(8, 3, 32, 32, device="cuda"),
                                 torch.randint(0, 24, (8,), device="cuda"))
    assert torch.isfinite(fwd.loss)
    assert all(torch.isfinite(p).all() for p in run.parameters())


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
    import warnings
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


# --- bad input: exit code 2, one stderr line naming the flag or file, never a traceback -----------------------------


def _npz(path, **over):
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
    f = {"tmp": str(tmp), "ck": _tiny_backbone(tmp), "good": _npz(str(tmp / "good.npz"))}
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
        f[name] = _npz(str(tmp / f"{name}.npz"), **over)
    np.savez(str(tmp / "merged1.npz"), images=np.zeros((12, 28, 28), np.uint8), labels=np.zeros(12, np.int64))
    np.savez(str(tmp / "wrongkeys.npz"), pictures=np.zeros((2, 4, 4), np.uint8))
    _write_imagefolder(str(tmp / "oneclass"), classes=("a",), per=2, size=16)
    _write_imagefolder(str(tmp / "hollow"), classes=("a", "b"), per=2, size=16)
    os.makedirs(str(tmp / "hollow" / "val" / "c"))                   # a val class that train lacks
    (tmp / "novals").mkdir()
    (tmp / "novals" / "train").mkdir()
    os.makedirs(str(tmp / "blocked" / "results.json"))
    (tmp / "dup").mkdir()
    _npz(str(tmp / "dup" / "good.npz"))
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
    (["--data", "{tmp}/novals"], ["novals", "train/ and val/"]),
    (["--data", "{good}", "{tmp}/dup/good.npz"], ["--data", "share a name"]),
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
    assert "wrote" not in out and not os.path.exists(tmp_path / "o" / "results.json")
    assert not [p for p in os.listdir(f["tmp"] + "/blocked") if p.endswith(".tmp")]         # no temp file left


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
    ev.atomic_write(str(tmp_path / "out.txt"), lambda fh: fh.write(b"new"))
    assert victim.read_text() == "keep me" and not os.path.islink(tmp_path / "out.txt")
    assert (tmp_path / "out.txt").read_text() == "new"
    os.makedirs(tmp_path / "dir.txt")
    with pytest.raises(ev.UserError, match="cannot write .*dir.txt"):              # os.replace onto a folder
        ev.atomic_write(str(tmp_path / "dir.txt"), lambda fh: fh.write(b"x"))
    with pytest.raises(ev.UserError, match="cannot write .*missing/x.txt"):        # mkstemp in a missing folder
        ev.atomic_write(str(tmp_path / "missing" / "x.txt"), lambda fh: fh.write(b"x"))
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
                out[os.path.relpath(p, root)] = open(p, "rb").read()
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
    assert fig["stroke_removed_pct"] >= 88.0, fig                            # measured 88.9; the issue's target is 90
    assert fig["changed_beyond_2px"] <= 40, fig                               # measured 14 of 1.5 M; the target is 0
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
        (run + ["--seed", "-1"], "--seed"),
        (run + ["--seed", "abc"], "--seed"),
        (run[:-1] + ["-2"], "--workers"),
        (run + ["--ratios", "0.5", "0.5", "0.5"], "--ratios"),
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

    def full(fh, data):
        fh.write(data[:10])
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(rr, "_write_bytes", full)
    code = rr.cli(["--data-path", raw_tree, "--output-dir", str(tmp_path / "o"), "--workers", "0", "--no-clean"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "No space left on device" in err, err
    assert "re-run the same command" in err
    assert not [f for _, _, fs in os.walk(tmp_path / "o") for f in fs if f.endswith(".part")]
    monkeypatch.undo()
    rr._write_atomic(b"x", str(tmp_path / "plain.bin"))                       # files get the usual mode, not 0600
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
