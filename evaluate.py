"""Frozen-feature probes for unseen medical concepts: the paper's Table 3 (MLP) and Figure 5 (low-shot), in plain torch.

The protocol is Sariyildiz et al., "Concept generalization in visual representation learning" (ICCV 2021), as the
PGNM paper (section 3) uses it: pooled pre-fc features of a frozen backbone are extracted once, then
  * MLP probe: a randomly initialised 2-layer MLP, AdamW with default hyper-parameters, trained on the full training
    split until 5 epochs pass without a validation gain; macro F1 (and the other metrics) on the test split, over 7
    trials for data sets under 10k samples, 3 for 10k-30k, 1 above; mean +- t-distribution 95% confidence interval;
  * low-shot: an L2-regularised logistic regression (scikit-learn's objective, C = 1, solved with L-BFGS) on N in
    {8, 16, 32, 64, 128, 256} training samples per class, 10 trials each, same statistics.

    # compare backbones on MedMNIST files and an ImageFolder tree
    python evaluate.py --checkpoints runs/heated/model_heated.pth radimagenet_r50.pth --labels "Grad.P. RadIN" RadIN \\
        --data breastmnist_224.npz pneumoniamnist_224.npz /data/brain_mr --device cuda
    # no argument: the built-in synthetic "unseen concepts" (classes disjoint from pgnm.py's synthetic set)
    # against the newest pgnm.py run under runs/
    python evaluate.py

Features are cached in <output-dir>/cache, keyed by the hashes of the checkpoint, the data and the preprocessing, so
a second run extracts nothing. Outputs: a Markdown table like Table 3 on stdout, results.json, results.csv, and
lowshot.png (like Figure 5) when matplotlib is installed. Runtime dependencies are pgnm.py's: torch, torchvision,
numpy, pillow.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import pgnm
from pgnm import UserError

DEFAULT_SHOTS = (8, 16, 32, 64, 128, 256)
FEATURE_VERSION = 1  # bump when feature extraction changes, so old cache entries are not reused

# =====================================================================================================================
#  Statistics: Student-t confidence intervals
# =====================================================================================================================


def t_two_sided_mass(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer df >= 1, in closed form (Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 1:
        total, term = 0.0, math.cos(theta)
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        return 2 / math.pi * (theta + s * total) if df > 1 else 2 * theta / math.pi
    total, term = 0.0, 1.0
    for k in range(1, df // 2 + 1):
        total += term
        term *= c2 * (2 * k - 1) / (2 * k)
    return s * total


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with integer df, by bisection on the closed-form CDF."""
    target = 2 * p - 1
    lo, hi = 0.0, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided_mass(mid, df) < target else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width t_{(1+level)/2, n-1} * s / sqrt(n) of its confidence interval (NaN for one value)."""
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    if len(v) == 1:
        return float(v[0]), float("nan")
    return float(v.mean()), t_quantile((1 + level) / 2, len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v))


def trials_for(n_samples: int) -> int:
    """The paper's Table 3: 7 trials under 10k samples, 3 from 10k to 30k, 1 above."""
    return 7 if n_samples < 10_000 else 3 if n_samples <= 30_000 else 1


# =====================================================================================================================
#  Metrics per task type (MedMNIST: multi-class, binary, multi-label; ordinal is scored as multi-class)
# =====================================================================================================================


def multilabel_metrics(probs: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Sigmoid scores (N, L) and 0/1 targets (N, L): mean per-label AUC (labels with positives and negatives),
    label-wise accuracy at 0.5, and per-label precision / recall / F1 / balanced accuracy averaged over labels."""
    probs, target = probs.detach().double().cpu(), target.detach().bool().cpu()
    pred = probs > 0.5
    tp = (pred & target).sum(0).double()
    fp = (pred & ~target).sum(0).double()
    fn = (~pred & target).sum(0).double()
    tn = (~pred & ~target).sum(0).double()
    prec = torch.where(tp + fp > 0, tp / (tp + fp).clamp(min=1), torch.zeros_like(tp))
    rec = torch.where(tp + fn > 0, tp / (tp + fn).clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn).clamp(min=1), torch.zeros_like(tp))
    spec = torch.where(tn + fp > 0, tn / (tn + fp).clamp(min=1), torch.zeros_like(tp))
    aucs = [pgnm.binary_auroc(probs[:, k], target[:, k]) for k in range(target.shape[1])]
    aucs = [a for a in aucs if not math.isnan(a)]
    return {"acc": float((pred == target).double().mean()), "balanced_acc": float(((rec + spec) / 2).mean()),
            "precision": float(prec.mean()), "recall": float(rec.mean()), "f1": float(f1.mean()),
            "auroc": float(np.mean(aucs)) if aucs else float("nan")}


@dataclass
class Task:
    kind: str          # "multiclass" | "binary" | "multilabel"
    n_out: int         # classes, or labels for multi-label

    def loss(self, logits, y):
        return F.binary_cross_entropy_with_logits(logits, y.float()) if self.kind == "multilabel" \
            else F.cross_entropy(logits, y)

    def metrics(self, logits, y) -> dict[str, float]:
        if self.kind == "multilabel":
            return multilabel_metrics(torch.sigmoid(logits.float()), y)
        return pgnm.classification_metrics(logits.float().softmax(1), y)


def task_of(labels: np.ndarray) -> Task:
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] > 1:
        return Task("multilabel", labels.shape[1])
    n = int(labels.max()) + 1
    return Task("binary" if n == 2 else "multiclass", max(n, 2))


# =====================================================================================================================
#  Probes
# =====================================================================================================================


def standardize(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """z-score every feature with the training split's mean and std."""
    mu, sd = train.mean(0, keepdim=True), train.std(0, keepdim=True).clamp_min(1e-6)
    return [(t - mu) / sd for t in (train, *others)]


def train_mlp(xtr, ytr, xva, yva, task: Task, seed: int, hidden: int = 1024, batch_size: int = 256,
              patience: int = 5, max_epochs: int = 200) -> tuple[nn.Module, int]:
    """A randomly initialised MLP (Linear-BN-ReLU-Linear) trained with AdamW's defaults; stops once `patience` epochs
    pass without a gain in validation macro F1 (mean AUC for multi-label) and returns the best epoch's weights."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(xtr.shape[1], hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                        nn.Linear(hidden, task.n_out)).to(xtr.device)
    opt = torch.optim.AdamW(mlp.parameters())
    key = "auroc" if task.kind == "multilabel" else "f1"
    best, best_state, best_epoch, waited = -math.inf, None, 0, 0
    n = len(xtr)
    for epoch in range(max_epochs):
        mlp.train()
        perm = torch.randperm(n, generator=g).to(xtr.device)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            if len(idx) < 2:          # BatchNorm needs two samples
                continue
            loss = task.loss(mlp(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        mlp.eval()
        with torch.no_grad():
            score = task.metrics(mlp(xva), yva)[key]
        if score > best + 1e-9:
            best, best_epoch, waited = score, epoch + 1, 0
            best_state = {k: v.detach().clone() for k, v in mlp.state_dict().items()}
        else:
            waited += 1
            if waited >= patience:
                break
    if best_state is not None:
        mlp.load_state_dict(best_state)
    mlp.eval()
    return mlp, best_epoch


def fit_logreg(x: torch.Tensor, y: torch.Tensor, task: Task, C: float = 1.0, max_iter: int = 500) -> nn.Linear:
    """L2-regularised logistic regression with scikit-learn's objective, sum_i loss_i + ||W||^2 / (2C) (no penalty on
    the bias): multinomial for multi-class and binary, one sigmoid per label for multi-label. Solved with L-BFGS."""
    lin = nn.Linear(x.shape[1], task.n_out).to(x.device, torch.float64)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    xd = x.double()
    yd = y.double() if task.kind == "multilabel" else y
    opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-7,
                            tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = lin(xd)
        data = (F.binary_cross_entropy_with_logits(logits, yd, reduction="sum") if task.kind == "multilabel"
                else F.cross_entropy(logits, yd, reduction="sum"))
        loss = data + 0.5 / C * lin.weight.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return lin.float()


def sample_shots(labels: np.ndarray, shots: int, rng: np.random.Generator, task: Task) -> np.ndarray:
    """Indices of `shots` random training samples per class (all of a smaller class); for multi-label,
    shots x labels random samples."""
    if task.kind == "multilabel":
        return np.sort(rng.choice(len(labels), size=min(len(labels), shots * task.n_out), replace=False))
    out = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        out.append(rng.choice(idx, size=min(shots, len(idx)), replace=False))
    return np.sort(np.concatenate(out))


# =====================================================================================================================
#  Backbones, data sets, features (cached)
# =====================================================================================================================


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def load_backbone(path: str, model: str | None = None) -> tuple[pgnm.ResNet, str]:
    """A frozen feature extractor (pooled pre-fc features) from our, the authors', timm or torchvision weights."""
    sd = pgnm.load_classifier_weights(path, flag="--checkpoints")
    arch = model or pgnm.guess_architecture(sd)
    if arch is None:
        raise UserError(f"cannot tell the architecture of {path} from its keys: pass --model resnet10t|resnet18|resnet50")
    net = pgnm.build_model(arch, num_classes=0)
    pgnm.load_into_classifier(net, sd, path, arch)
    return net.eval(), arch


def default_labels(checkpoints: Sequence[str]) -> list[str]:
    """Column names: the phase for pgnm.py outputs (runs/heated/model_heated.pth -> heated), else the file name;
    the parent folder is prepended where names would collide."""
    def name(p):
        stem = os.path.splitext(os.path.basename(p))[0]
        parent = os.path.basename(os.path.dirname(os.path.abspath(p)))
        return parent if stem in (f"model_{parent}", "checkpoint") else stem
    names = [name(p) for p in checkpoints]
    if len(set(names)) < len(names):
        names = [f"{os.path.basename(os.path.dirname(os.path.abspath(p)))}/{n}" for p, n in zip(checkpoints, names)]
    return names


def find_latest_run(root: str = "runs") -> str:
    """The newest classifier that pgnm.py wrote under root: model_<phase>.pth, else checkpoint.pth."""
    found = []
    if os.path.isdir(root):
        for d in os.scandir(root):
            if d.is_dir():
                for f in os.scandir(d.path):
                    if f.name.startswith("model_") and f.name.endswith(".pth") or f.name == "checkpoint.pth":
                        found.append((f.name.startswith("model_"), f.stat().st_mtime, f.path))
    if not found:
        raise UserError(f"no pgnm.py run under {root}/: run `python pgnm.py --phase heated` first, or pass --checkpoints")
    return max(found)[2]


@dataclass
class ProbeData:
    """A data set's splits as decodable images plus their labels (numpy: (N,) ints or (N, L) 0/1)."""
    name: str
    key: str                                   # hash of the content, for the feature cache
    images: dict                               # split -> torch Dataset yielding (image tensor, _)
    labels: dict                               # split -> np.ndarray


def _array_split(images, name, transform):
    return pgnm.ArrayDataset(images, np.zeros(len(images), np.int64), ["-"], transform, name=name)


def load_probe_data(spec: str, image_size: int, seed: int = 0, synthetic_per_class: int = 48) -> ProbeData:
    """`spec` is a MedMNIST .npz (official or merged layout), an ImageFolder root (train/ val/ [test/]), or
    'synthetic-unseen' (pgnm's synthetic classes that its training set does not have)."""
    cfg = pgnm.Config(val_resize_size=image_size, val_crop_size=image_size)
    tf = pgnm.build_transform(cfg, train=False)
    if spec == "synthetic-unseen":
        images, labels = {}, {}
        for split, n in (("train", synthetic_per_class), ("val", max(2, synthetic_per_class // 4)),
                         ("test", max(2, synthetic_per_class // 4))):
            arr, lab, _ = pgnm.synthetic_arrays(n, 64, seed, split, unseen=True)
            images[split], labels[split] = _array_split(arr, f"synthetic-unseen:{split}", tf), lab
        key = hashlib.sha256(f"synthetic-unseen/{seed}/{synthetic_per_class}".encode()).hexdigest()[:16]
        return _checked(ProbeData("synthetic-unseen", key, images, labels))
    if not os.path.exists(spec):
        raise UserError(f"--data {spec} does not exist")
    if os.path.isfile(spec):
        if not spec.endswith(".npz"):
            raise UserError(f"--data {spec}: a file must be a MedMNIST .npz")
        splits = pgnm.load_npz(spec, 0.1, seed)
        if "test" not in splits:
            raise UserError(f"{spec} has no test_images/test_labels")
        name = os.path.splitext(os.path.basename(spec))[0]
        images = {s: _array_split(a, f"{name}:{s}", tf) for s, (a, _) in splits.items()}
        labels = {s: (lab.reshape(len(lab)) if lab.ndim == 2 and lab.shape[1] == 1 else lab).astype(np.int64)
                  for s, (_, lab) in splits.items()}
        return _checked(ProbeData(name, file_digest(spec), images, labels))
    train_dir, val_dir = os.path.join(spec, "train"), os.path.join(spec, "val")
    if not (os.path.isdir(train_dir) and os.path.isdir(val_dir)):
        raise UserError(f"--data {spec} must contain train/ and val/ [and test/] class folders")
    train = pgnm.ImageFolderDataset(train_dir, tf)
    images, labels = {"train": train}, {"train": np.asarray(train.targets)}
    for split in ("val", "test"):
        d = os.path.join(spec, split)
        if os.path.isdir(d):
            ds = pgnm.ImageFolderDataset(d, tf, classes=train.classes)
            images[split], labels[split] = ds, np.asarray(ds.targets)
    if "test" not in images:     # no test/: report on val, stop early on a stratified 10% of train
        images["test"], labels["test"] = images["val"], labels["val"]
        tr, va = pgnm.stratified_split(labels["train"], (0.9, 0.1), seed)
        images["val"] = torch.utils.data.Subset(train, va.tolist())
        images["train"] = torch.utils.data.Subset(train, tr.tolist())
        labels["val"], labels["train"] = labels["train"][va], labels["train"][tr]
    h = hashlib.sha256()
    for ds in (train,) + tuple(x for x in images.values() if isinstance(x, pgnm.ImageFolderDataset)):
        for p, t in ds.samples:
            st = os.stat(p)
            h.update(f"{os.path.relpath(p, spec)}|{st.st_size}|{int(st.st_mtime)}|{t}\n".encode())
    return _checked(ProbeData(os.path.basename(os.path.normpath(spec)), h.hexdigest()[:16], images, labels))


def _checked(d: ProbeData) -> ProbeData:
    """Labels must be usable: >= 0, multi-label 0/1, and no val/test class the training split lacks."""
    tr = d.labels["train"]
    for split, lab in d.labels.items():
        if lab.size and lab.min() < 0:
            raise UserError(f"{d.name}: {split} labels must be >= 0, found {lab.min()}")
        if lab.ndim == 2 and lab.shape[1] > 1:
            if not np.isin(lab, (0, 1)).all():
                raise UserError(f"{d.name}: multi-label {split} labels must be 0/1")
        elif lab.size and tr.ndim == 1 and lab.max() > tr.max():
            raise UserError(f"{d.name}: {split} has label {lab.max()} but train's labels go to {tr.max()}: "
                            f"labels out of range")
    for split in ("train", "val", "test"):
        if split not in d.labels or len(d.labels[split]) == 0:
            raise UserError(f"{d.name}: the {split} split is empty")
    return d


@torch.no_grad()
def extract_features(net: nn.Module, dataset, device: torch.device, batch_size: int = 128,
                     workers: int = 0) -> torch.Tensor:
    """Pooled pre-fc features of every image, in data set order.   -> (N, num_features) float32 on the CPU"""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    net = net.to(device).eval()
    out = []
    for x, _ in loader:
        out.append(net(x.to(device, non_blocking=True)).float().cpu())
    return torch.cat(out)


def cached_features(net, ckpt_key: str, data: ProbeData, image_size: int, cache_dir: str, device, log=print,
                    workers: int = 0) -> dict[str, torch.Tensor]:
    """Features of each split, from <cache_dir> when the same checkpoint, data and preprocessing were seen before."""
    key = f"{ckpt_key}_{data.key}_{image_size}_v{FEATURE_VERSION}"
    path = os.path.join(cache_dir, f"{key}.pt")
    if os.path.exists(path):
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed
            log(f"warning: cache entry {path} is unreadable; extracting again")
    t0 = time.perf_counter()
    feats = {s: extract_features(net, ds, device, workers=workers) for s, ds in data.images.items()}
    log(f"[{data.name}] extracted {sum(len(f) for f in feats.values())} feature vectors in "
        f"{time.perf_counter() - t0:.1f}s")
    os.makedirs(cache_dir, exist_ok=True)
    pgnm.atomic_save(feats, path)
    return feats


# =====================================================================================================================
#  The protocol
# =====================================================================================================================


def run_mlp_probe(feats, labels, task: Task, trials: int, device, log=print, tag="") -> dict:
    xtr, xva, xte = standardize(*(feats[s].to(device) for s in ("train", "val", "test")))
    ytr, yva, yte = (torch.as_tensor(labels[s]).to(device) for s in ("train", "val", "test"))
    per_trial: dict[str, list[float]] = {}
    for t in range(trials):
        mlp, epochs = train_mlp(xtr, ytr, xva, yva, task, seed=t)
        with torch.no_grad():
            m = task.metrics(mlp(xte), yte)
        for k, v in m.items():
            per_trial.setdefault(k, []).append(v)
        log(f"{tag} MLP trial {t + 1}/{trials}: f1 {m['f1']:.4f} acc {m['acc']:.4f} auroc {m['auroc']:.4f} "
            f"(best epoch {epochs})")
    return summarize(per_trial)


def run_lowshot(feats, labels, task: Task, shots: Sequence[int], trials: int, device, log=print, tag="") -> dict:
    xtr_all, xte = feats["train"], feats["test"]
    ytr_all, yte = labels["train"], torch.as_tensor(labels["test"])
    out = {}
    largest = max(np.bincount(ytr_all).max(), 1) if task.kind != "multilabel" else len(ytr_all)
    for n in shots:
        if task.kind != "multilabel" and n > largest:
            log(f"{tag} low-shot {n}/class skipped: no class has {n} training samples (largest {largest})")
            continue
        per_trial: dict[str, list[float]] = {}
        for t in range(trials):
            idx = sample_shots(ytr_all, n, np.random.default_rng([n, t]), task)
            xs, xt = standardize(xtr_all[idx].to(device), xte.to(device))
            lin = fit_logreg(xs, torch.as_tensor(ytr_all[idx]).to(device), task)
            with torch.no_grad():
                m = task.metrics(lin(xt).cpu(), yte)
            for k, v in m.items():
                per_trial.setdefault(k, []).append(v)
        out[n] = summarize(per_trial)
        log(f"{tag} low-shot {n}/class, {trials} trials: f1 {out[n]['f1_mean']:.4f} +- {out[n]['f1_ci']:.4f}")
    return out


def summarize(per_trial: dict[str, list[float]]) -> dict:
    out = {"trials": len(next(iter(per_trial.values()), []))}
    for k, v in per_trial.items():
        mean, ci = mean_ci(v)
        out[f"{k}_mean"], out[f"{k}_ci"], out[k] = mean, ci, v
    return out


def _fmt(mean, ci):
    if math.isnan(mean):
        return "—"
    return f"{mean:.4f}" if math.isnan(ci) else f"{mean:.4f} ± {ci:.4f}"


def markdown_table(results: dict, labels: list[str], metric: str = "f1") -> str:
    """Table 3: rows are data sets, columns backbones, cells the MLP probe's mean ± 95% CI; the best in bold."""
    lines = [f"| Dataset | {' | '.join(labels)} |", "|---" * (len(labels) + 1) + "|"]
    for name, r in results.items():
        means = [r["mlp"][lab][f"{metric}_mean"] for lab in labels]
        best = max((m for m in means if not math.isnan(m)), default=float("nan"))
        cells = []
        for lab, m in zip(labels, means):
            c = _fmt(m, r["mlp"][lab][f"{metric}_ci"])
            cells.append(f"**{c}**" if len(labels) > 1 and m == best else c)
        lines.append(f"| {name} ({r['task']}, {r['n_samples']} samples, {r['trials']} trials) | {' | '.join(cells)} |")
    return "\n".join(lines)


def write_outputs(results: dict, labels: list[str], out_dir: str, log=print) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["dataset", "backbone", "probe", "shots", "metric", "mean", "ci95", "trials"])
        for name, r in results.items():
            for lab in labels:
                mlp = r["mlp"][lab]
                for k in ("f1", "acc", "balanced_acc", "precision", "recall", "auroc"):
                    w.writerow([name, lab, "mlp", "", k, mlp[f"{k}_mean"], mlp[f"{k}_ci"], mlp["trials"]])
                for n, s in r["lowshot"][lab].items():
                    for k in ("f1", "acc", "auroc"):
                        w.writerow([name, lab, "logreg", n, k, s[f"{k}_mean"], s[f"{k}_ci"], s["trials"]])
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("note: lowshot.png needs matplotlib (pip install matplotlib); the curves are in results.json/csv")
        return
    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        for lab in labels:
            curve = results[name]["lowshot"][lab]
            xs = [int(n) for n in curve]
            ys = [curve[n]["f1_mean"] for n in curve]
            es = [0 if math.isnan(curve[n]["f1_ci"]) else curve[n]["f1_ci"] for n in curve]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=lab)
        ax.set_xscale("log", base=2)
        ax.set_title(name)
        ax.set_xlabel("samples per class")
        ax.set_ylabel("macro F1")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "lowshot.png"), dpi=120)
    plt.close(fig)


def evaluate(checkpoints: Sequence[str], labels: Sequence[str] | None = None, data: Sequence[str] = (),
             output_dir: str = "runs/evaluate", trials: int | None = None, shots: Sequence[int] = DEFAULT_SHOTS,
             lowshot_trials: int = 10, device: str | None = None, model: str | None = None,
             image_size: int | None = None, workers: int = 0, seed: int = 0, log=print) -> dict:
    """Run both probes for every (backbone, data set) pair; returns {dataset: {...}} and writes the outputs."""
    if not checkpoints:
        raise UserError("no backbone: pass --checkpoints A.pth [B.pth ...]")
    labels = list(labels) if labels else default_labels(checkpoints)
    if len(labels) != len(checkpoints):
        raise UserError(f"--labels has {len(labels)} names for {len(checkpoints)} --checkpoints")
    if len(set(labels)) != len(labels):
        raise UserError("--labels must be distinct (default: the checkpoint file names)")
    if any(n < 1 for n in shots):
        raise UserError("--shots must be positive")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    specs = list(data) or ["synthetic-unseen"]
    size = image_size or (64 if specs == ["synthetic-unseen"] else 224)
    backbones = [(lab, path, *load_backbone(path, model)) for lab, path in zip(labels, checkpoints)]
    keys = {path: file_digest(path) for path in checkpoints}
    results: dict = {}
    for spec in specs:
        d = load_probe_data(spec, size, seed)
        task = task_of(d.labels["train"])
        n_samples = sum(len(v) for v in d.labels.values())
        k = trials or trials_for(n_samples)
        log(f"[{d.name}] {task.kind}, {task.n_out} {'labels' if task.kind == 'multilabel' else 'classes'}, "
            f"train {len(d.labels['train'])} val {len(d.labels['val'])} test {len(d.labels['test'])}; "
            f"MLP {k} trials, low-shot {lowshot_trials} trials")
        r = {"task": task.kind, "n_samples": n_samples, "trials": k, "mlp": {}, "lowshot": {}}
        for lab, path, net, arch in backbones:
            feats = cached_features(net, f"{keys[path]}_{arch}", d, size, os.path.join(output_dir, "cache"), dev, log,
                                    workers)
            tag = f"[{d.name}] {lab}:"
            r["mlp"][lab] = run_mlp_probe(feats, d.labels, task, k, dev, log, tag)
            r["lowshot"][lab] = run_lowshot(feats, d.labels, task, shots, lowshot_trials, dev, log, tag)
        results[d.name] = r
    log("")
    log("MLP probe on frozen features, test macro F1 (mean ± t 95% CI over trials):")
    log(markdown_table(results, labels))
    write_outputs(results, labels, output_dir, log)
    log(f"\nwrote {os.path.join(output_dir, 'results.json')} and results.csv")
    return results


# =====================================================================================================================
#  Logistic regression against scikit-learn (the README's measured comparison)
# =====================================================================================================================


def bench_logreg(spec: str, checkpoint: str, image_size: int | None, output_dir: str, device, log=print) -> dict:
    """Our L-BFGS logistic regression vs scikit-learn's LogisticRegression on the same standardized features."""
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise UserError("--bench-logreg compares against scikit-learn: pip install scikit-learn") from None
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net, arch = load_backbone(checkpoint)
    size = image_size or (64 if spec == "synthetic-unseen" else 224)
    d = load_probe_data(spec, size)
    feats = cached_features(net, f"{file_digest(checkpoint)}_{arch}", d, size, os.path.join(output_dir, "cache"), dev,
                            log)
    task = task_of(d.labels["train"])
    if task.kind == "multilabel":
        raise UserError("--bench-logreg needs a single-label data set")
    xtr, xte = standardize(feats["train"], feats["test"])
    ytr, yte = d.labels["train"], d.labels["test"]
    t0 = time.perf_counter()
    lin = fit_logreg(xtr.to(dev), torch.as_tensor(ytr).to(dev), task)
    ours_s = time.perf_counter() - t0
    with torch.no_grad():
        ours_acc = float((lin(xte.to(dev)).argmax(1).cpu().numpy() == yte).mean())
    t0 = time.perf_counter()
    sk = LogisticRegression(C=1.0, max_iter=1000).fit(xtr.numpy(), ytr)
    sk_s = time.perf_counter() - t0
    sk_acc = float((sk.predict(xte.numpy()) == yte).mean())
    res = {"data": d.name, "train": len(ytr), "features": xtr.shape[1], "classes": task.n_out,
           "ours_seconds": round(ours_s, 3), "ours_test_acc": round(ours_acc, 4),
           "sklearn_seconds": round(sk_s, 3), "sklearn_test_acc": round(sk_acc, 4), "device": str(dev)}
    log(json.dumps(res))
    return res


# =====================================================================================================================
#  CLI
# =====================================================================================================================


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", nargs="+", metavar="PTH",
                   help="backbones to compare: ours, the authors', timm or torchvision weights (default: the newest "
                        "model under runs/)")
    p.add_argument("--labels", nargs="+", metavar="NAME", help="a column name per checkpoint (default: file names)")
    p.add_argument("--data", nargs="+", metavar="NPZ_OR_DIR", default=[],
                   help="MedMNIST .npz files and/or ImageFolder roots (default: the synthetic unseen-concept set)")
    p.add_argument("--output-dir", default="runs/evaluate", help="results and the feature cache (default runs/evaluate)")
    p.add_argument("--trials", type=int, help="MLP trials per data set (default 7 / 3 / 1 by size, as the paper)")
    p.add_argument("--lowshot-trials", type=int, default=10, help="trials per low-shot size (default 10)")
    p.add_argument("--shots", type=int, nargs="+", default=list(DEFAULT_SHOTS), help="samples per class, low-shot")
    p.add_argument("--device", help="cuda | cpu (default: cuda when available)")
    p.add_argument("--model", help="backbone architecture when it cannot be told from the keys")
    p.add_argument("--image-size", type=int, help="input size in px (default 224; 64 for the synthetic set)")
    p.add_argument("--workers", type=int, default=0, help="data-loader processes for feature extraction")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic set and merged-npz splits")
    p.add_argument("--runs-dir", default="runs", help="where to look for the newest pgnm.py run (default runs)")
    p.add_argument("--bench-logreg", action="store_true",
                   help="time our logistic regression against scikit-learn's on the first data set's features")
    return p


def cli(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        ckpts = a.checkpoints or [find_latest_run(a.runs_dir)]
        if a.bench_logreg:
            bench_logreg((a.data or ["synthetic-unseen"])[0], ckpts[0], a.image_size, a.output_dir, a.device)
            return 0
        if a.trials is not None and a.trials < 1:
            raise UserError("--trials must be at least 1")
        evaluate(ckpts, a.labels, a.data, a.output_dir, a.trials, a.shots, a.lowshot_trials, a.device, a.model,
                 a.image_size, a.workers, a.seed, log=lambda *x: print(*x, flush=True))
        return 0
    except UserError as e:
        line = str(e).strip().splitlines()[-1].split("UserError: ", 1)[-1]
        print(f"error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
