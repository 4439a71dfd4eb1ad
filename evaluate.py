"""Frozen-feature probes for unseen medical concepts: the paper's Table 3 (MLP) and Figure 5 (low-shot), in plain torch.

The protocol is Sariyildiz et al., "Concept generalization in visual representation learning" (ICCV 2021), as the
PGNM paper (section 3) uses it: pooled pre-fc features of a frozen backbone are extracted once, then both probes train
"with AdamW with default hyper-parameters until convergence (no accuracy increment for 5 epochs)", keeping the best
epoch (validation accuracy; label-wise for multi-label):
  * MLP probe (Table 3): a randomly initialised Linear-BN-ReLU-Linear on the full training split, batch 256; test
    macro F1 (and the other metrics) over 7 trials for data sets under 10k samples, 3 for 10k-30k, 1 above;
    mean +- t-distribution 95% confidence interval;
  * low-shot (Figure 5): a logistic regression on N in {8, 16, 32, 64, 128, 256} training samples per class, batch
    16, stopped on the val split; 10 trials each, same statistics. `--lowshot-solver lbfgs` fits scikit-learn's
    objective (C = 1) with L-BFGS instead, as Sariyildiz et al. do, and uses no val split.

    # compare backbones on MedMNIST files and an ImageFolder tree
    python evaluate.py --checkpoints runs/heated/model_heated.pth radimagenet_r50.pth --labels "Grad.P. RadIN" RadIN \\
        --data breastmnist_224.npz pneumoniamnist_224.npz /data/brain_mr --device cuda
    # no argument: every runs/<phase>/model_<phase>.pth that exists (heated, finetune, baseline) on the built-in
    # synthetic "unseen concepts" (classes disjoint from pgnm.py's synthetic set)
    python evaluate.py

Features are cached in <output-dir>/cache, keyed by the hashes of the checkpoint, the data, the preprocessing and
the seed where it splits the data, so a second run extracts nothing; a damaged entry is extracted again. Outputs: a Markdown table like Table 3 on stdout, results.json, results.csv, and
lowshot.png (like Figure 5) when matplotlib is installed; every path read or written is printed. Runtime dependencies
are pgnm.py's: torch, torchvision, numpy, pillow.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import sys
import time
import zipfile
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import pgnm
from pgnm import UserError, resolve_device, sha256_file, write_atomic

DEFAULT_SHOTS = (8, 16, 32, 64, 128, 256)
DEFAULT_PHASES = ("heated", "finetune", "baseline")   # the no-argument run's checkpoints, in this order
SYNTHETIC = "synthetic-unseen"
FEATURE_VERSION = 1      # bump when feature extraction changes, so old cache entries are not reused
PATIENCE = 5             # the paper: "until convergence (no accuracy increment for 5 epochs)"
MAX_EPOCHS = 200         # a safety cap; the stopping rule ends every run we have seen long before (a hit is logged)
MLP_BATCH = 256          # MLP probe mini-batch (samples)
LOWSHOT_BATCH = 16       # low-shot mini-batch: 8 shots x 2 classes is one step per epoch, 256 x 16 is 256 steps
MAX_TRIALS = 50          # --trials / --lowshot-trials; the t table below covers their n - 1 degrees of freedom
MAX_CLASSES = 10_000     # class indices above this are taken for a wrong labels array, not a classification task

# =====================================================================================================================
#  Statistics: Student-t confidence intervals
# =====================================================================================================================

# t_{0.975, df} for df = 1..49 (the two-sided 95% quantile), from scipy.stats.t.ppf to 6 decimals; the tests check
# every entry against scipy.
T975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
        2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
        2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272,
        2.039513, 2.036933, 2.034515, 2.032245, 2.030108, 2.028094, 2.026192, 2.024394, 2.022691, 2.021075,
        2.019541, 2.018082, 2.016692, 2.015368, 2.014103, 2.012896, 2.011741, 2.010635, 2.009575)


def t975(df: int) -> float:
    """The two-sided 95% quantile of Student's t with df = 1..49 degrees of freedom (up to MAX_TRIALS - 1)."""
    if not 1 <= df <= len(T975):
        raise ValueError(f"t975: df {df} outside 1..{len(T975)}")
    return T975[df - 1]


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width t_{0.975, n-1} * s / sqrt(n) of its 95% confidence interval, over the non-NaN
    values (NaN half-width for one value)."""
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    if len(v) == 1:
        return float(v[0]), float("nan")
    return float(v.mean()), t975(len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v))


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

    def accuracy(self, logits, y) -> float:
        """The probes' stopping criterion: accuracy, or label-wise accuracy at sigmoid 0.5 for multi-label (both
        equal metrics()['acc'])."""
        if self.kind == "multilabel":
            return float((torch.sigmoid(logits.float()) > 0.5).eq(y.bool()).double().mean())
        return float(logits.argmax(1).eq(y).double().mean())


def task_of(labels: np.ndarray) -> Task:
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] > 1:
        return Task("multilabel", labels.shape[1])
    n = int(labels.max()) + 1
    return Task("binary" if n == 2 else "multiclass", max(n, 2))


# =====================================================================================================================
#  Probes: one AdamW loop with the paper's stopping rule, the MLP and the low-shot logistic regression on it
# =====================================================================================================================


def standardize(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """z-score every feature with the training split's mean and std."""
    mu, sd = train.mean(0, keepdim=True), train.std(0, keepdim=True).clamp_min(1e-6)
    return [(t - mu) / sd for t in (train, *others)]


def train_probe(model: nn.Module, xtr, ytr, xva, yva, task: Task, seed: int, batch_size: int,
                patience: int = PATIENCE, max_epochs: int | None = None, on_epoch=None):
    """AdamW with its defaults (lr 1e-3, betas (0.9, 0.999), weight decay 0.01) on the task's mean loss. An epoch is
    one pass over the training set in a seeded random order, in mini-batches of batch_size; after each, the
    validation accuracy (label-wise for multi-label) is measured. Stops once `patience` epochs in a row bring no
    gain (a strictly higher accuracy) and restores the best epoch's weights. on_epoch(epoch, model, acc) sees
    every epoch.   -> (model in eval mode, best epoch counted from 1, validation accuracy of every epoch run)"""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters())
    needs_pairs = any(isinstance(m, nn.BatchNorm1d) for m in model.modules())
    best, best_epoch, best_state, history = -1.0, 0, None, []
    for epoch in range(1, (max_epochs or MAX_EPOCHS) + 1):
        model.train()
        for idx in torch.randperm(len(xtr), generator=g).to(xtr.device).split(batch_size):
            if needs_pairs and len(idx) < 2:      # BatchNorm cannot train on a batch of one
                continue
            loss = task.loss(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = task.accuracy(model(xva), yva)
        history.append(acc)
        if on_epoch is not None:
            on_epoch(epoch, model, acc)
        if acc > best:
            best, best_epoch = acc, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif epoch - best_epoch >= patience:
            break
    model.load_state_dict(best_state)
    return model.eval(), best_epoch, history


def train_mlp(xtr, ytr, xva, yva, task: Task, seed: int, hidden: int = 1024, batch_size: int = MLP_BATCH, **kw):
    """The MLP probe: a randomly initialised Linear(d, hidden)-BN-ReLU-Linear trained by train_probe."""
    with pgnm.cpu_rng(seed):
        mlp = nn.Sequential(nn.Linear(xtr.shape[1], hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                            nn.Linear(hidden, task.n_out))
    return train_probe(mlp.to(xtr.device), xtr, ytr, xva, yva, task, seed, batch_size, **kw)


def fit_logreg_adamw(xtr, ytr, xva, yva, task: Task, seed: int, batch_size: int = LOWSHOT_BATCH, **kw):
    """The paper's low-shot probe: a zero-initialised linear layer (softmax, or one sigmoid per label for
    multi-label) trained by train_probe; AdamW's weight decay is its only regularisation."""
    lin = nn.Linear(xtr.shape[1], task.n_out).to(xtr.device)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    return train_probe(lin, xtr, ytr, xva, yva, task, seed, batch_size, **kw)


def fit_logreg_lbfgs(x: torch.Tensor, y: torch.Tensor, task: Task, C: float = 1.0, max_iter: int = 500) -> nn.Linear:
    """`--lowshot-solver lbfgs`: L2-regularised logistic regression with scikit-learn's objective,
    sum_i loss_i + ||W||^2 / (2C) (no penalty on the bias), multinomial for multi-class and binary, one sigmoid per
    label for multi-label; solved with L-BFGS in float64."""
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
#  Files: ages (hashing and atomic writes are pgnm.sha256_file and pgnm.write_atomic)
# =====================================================================================================================


def age_text(path: str, now: float | None = None) -> str:
    """'written 3 min ago' from the file's modification time."""
    s = max(0.0, (time.time() if now is None else now) - os.path.getmtime(path))
    for unit, size in (("day", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            n = int(s // size)
            return f"written {n} {unit}{'s' if unit == 'day' and n > 1 else ''} ago"
    return f"written {int(s)} s ago"


# =====================================================================================================================
#  Backbones
# =====================================================================================================================


@dataclass
class Backbone:
    label: str
    path: str
    sha256: str
    arch: str
    net: nn.Module


def load_backbone(path: str, model: str | None = None) -> tuple[pgnm.ResNet, str]:
    """A frozen feature extractor (pooled pre-fc features) from our, the authors', timm or torchvision weights.
    Refuses a directory, a file without a state_dict, and weights with a NaN or inf anywhere."""
    if os.path.isdir(path):
        raise UserError(f"--checkpoints {path} is a folder: pass the .pth file (e.g. {path}/model_heated.pth)")
    sd = pgnm.load_classifier_weights(path, flag="--checkpoints")
    for k, v in sd.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise UserError(f"--checkpoints {path}: {k} has {bad} NaN/inf of {v.numel()} values (training diverged "
                            f"or the file is damaged): use an earlier checkpoint")
    arch = model or pgnm.guess_architecture(sd)
    if arch is None:
        raise UserError(f"cannot tell the architecture of {path} from its keys: pass --model "
                        f"{'|'.join(pgnm.MODEL_NAMES)}")
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


def default_checkpoints(runs_dir: str = "runs") -> list[str]:
    """Every <runs_dir>/<phase>/model_<phase>.pth that exists, phases heated, finetune, baseline in that order."""
    paths = [os.path.join(runs_dir, p, f"model_{p}.pth") for p in DEFAULT_PHASES]
    for p in paths:               # something there that is not a weights file is not silently left out
        if os.path.lexists(p) and not os.path.isfile(p):
            what = "a folder" if os.path.isdir(p) else "a broken link" if os.path.islink(p) else "not a file"
            raise UserError(f"{p} is {what}: remove it, or pass --checkpoints with the files to compare")
    found = [p for p in paths if os.path.isfile(p)]
    if not found:
        raise UserError(f"none of {', '.join(paths)} exists: run `python pgnm.py --phase heated` (then --phase "
                        f"finetune, --phase baseline) first, or pass --checkpoints")
    return found


# =====================================================================================================================
#  Data sets: MedMNIST .npz, ImageFolder trees, the synthetic unseen concepts; checked before any work
# =====================================================================================================================


@dataclass
class ProbeData:
    """A data set's splits as decodable images plus their labels (numpy: (N,) ints or (N, L) 0/1)."""
    name: str
    key: str                                   # hash of the content, for the feature cache
    images: dict                               # split -> torch Dataset yielding (image tensor, _)
    labels: dict                               # split -> np.ndarray


def data_name(spec: str) -> str:
    """A data set's name in tables and results: the .npz file's name without .npz, or the folder's name."""
    name = os.path.basename(os.path.normpath(spec))
    return name[:-4] if name.endswith(".npz") else name


def check_labels(where: str, labels: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Labels as int64 arrays, (N,) or (N, L) 0/1 for multi-label, after refusing (with a message naming `where` and
    the array) anything that is not whole, finite, non-negative class indices: strings, objects, NaN, 0.7, 0-d,
    empty splits, one class only, and val/test classes or label counts that the first array (train) lacks."""
    out = {}
    for key, lab in labels.items():
        lab = np.asarray(lab)
        if lab.dtype.kind not in "biuf":
            raise UserError(f"{where}: {key} must hold numbers (class indices), found dtype {lab.dtype}")
        if lab.ndim not in (1, 2) or (lab.ndim == 2 and lab.shape[1] == 0):
            raise UserError(f"{where}: {key} must be N labels or N*L 0/1 labels, found shape {lab.shape}")
        if len(lab) == 0:
            raise UserError(f"{where}: {key} is empty: every split needs samples")
        if lab.dtype.kind == "f":
            if not np.isfinite(lab).all():
                raise UserError(f"{where}: {key} has NaN/inf labels")
            if (lab != np.round(lab)).any():
                raise UserError(f"{where}: {key} has fractional labels (e.g. {lab[lab != np.round(lab)].flat[0]}): "
                                f"labels must be whole class indices")
        if lab.min() < 0 or lab.max() >= MAX_CLASSES:
            raise UserError(f"{where}: {key} has labels from {lab.min()} to {lab.max()}: expected class indices "
                            f"0..C-1 with C <= {MAX_CLASSES}")
        lab = lab.astype(np.int64)
        out[key] = lab.reshape(len(lab)) if lab.ndim == 2 and lab.shape[1] == 1 else lab
    train_key, tr = next(iter(out.items()))
    multilabel = tr.ndim == 2
    for key, lab in out.items():
        if lab.ndim != tr.ndim or lab.shape[1:] != tr.shape[1:]:
            raise UserError(f"{where}: {key} has shape {lab.shape} but {train_key} has {tr.shape}")
        if multilabel and not np.isin(lab, (0, 1)).all():
            raise UserError(f"{where}: {key} is multi-label ({lab.shape[1]} labels per image) and must be 0/1")
        if not multilabel and lab.max() > tr.max():
            raise UserError(f"{where}: {key} has label {lab.max()} but {train_key} goes to {tr.max()}: labels out of "
                            f"range")
    if not multilabel and len(np.unique(tr)) < 2:
        raise UserError(f"{where}: {train_key} has one class only ({tr[0]}): a probe needs at least two")
    return out


def npz_arrays(path: str) -> dict[str, tuple[tuple, np.dtype]]:
    """Shape and dtype of every array in an .npz, read from the headers: no image data is loaded."""
    out = {}
    try:
        with zipfile.ZipFile(path) as z:
            for member in z.namelist():
                if member.endswith(".npy"):
                    with z.open(member) as fh:
                        version = np.lib.format.read_magic(fh)
                        read = {(1, 0): np.lib.format.read_array_header_1_0,
                                (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                        if read is None:
                            raise ValueError(f"npy format {version}")
                        shape, _, dtype = read(fh)
                    out[member[:-4]] = (shape, dtype)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"--data {path} is not a readable .npz ({type(e).__name__}): pass a MedMNIST .npz") from None
    return out


def check_npz(path: str) -> None:
    """A MedMNIST .npz, official (train_/val_/test_ images and labels) or merged (images, labels) layout: uint8
    images N*H*W or N*H*W*3, and labels that check_labels accepts."""
    arrays = npz_arrays(path)
    if {"train_images", "train_labels", "val_images", "val_labels"} <= set(arrays):
        prefixes = [p for p in ("train_", "val_", "test_") if f"{p}images" in arrays or f"{p}labels" in arrays]
        if "test_" not in prefixes:
            raise UserError(f"{path} has no test_images/test_labels: the probes report on the test split")
    elif {"images", "labels"} <= set(arrays):
        prefixes = [""]
    else:
        raise UserError(f"{path} has keys {sorted(arrays)}; expected train_images/train_labels/val_images/val_labels/"
                        f"test_images/test_labels (MedMNIST) or images/labels (merged)")
    for p in prefixes:
        if f"{p}images" not in arrays or f"{p}labels" not in arrays:
            raise UserError(f"{path} has only one of {p}images and {p}labels")
        (shape, dtype), (lshape, ldtype) = arrays[f"{p}images"], arrays[f"{p}labels"]
        if ldtype.kind not in "biuf":
            raise UserError(f"{path}: {p}labels must hold numbers (class indices), found dtype {ldtype}")
        if dtype != np.uint8 or len(shape) not in (3, 4) or (len(shape) == 4 and shape[-1] != 3):
            raise UserError(f"{path}: {p}images must be uint8 N*H*W or N*H*W*3, found {dtype} {shape}")
        if len(lshape) >= 1 and lshape[0] != shape[0]:
            raise UserError(f"{path}: {p}images has {shape[0]} images but {p}labels has {lshape[0]} labels")
    try:
        with np.load(path, allow_pickle=False) as z:
            labels = {f"{p}labels": z[f"{p}labels"] for p in prefixes}
    except ValueError as e:           # object arrays (pickles) are refused by allow_pickle=False
        raise UserError(f"{path}: cannot read its labels without unpickling ({e}); save them as a numeric array") \
            from None
    check_labels(path, labels)


def check_data_spec(spec: str) -> None:
    """Before any work: --data names the synthetic set, a valid .npz, or a folder with train/ and val/ [and test/]
    class folders of images whose labels check_labels accepts (two classes at least, no split empty)."""
    if spec == SYNTHETIC:
        return
    if not os.path.exists(spec):
        raise UserError(f"--data {spec} does not exist")
    if os.path.isfile(spec):
        if not spec.endswith(".npz"):
            raise UserError(f"--data {spec}: a file must be a MedMNIST .npz; a folder must hold train/ and val/")
        return check_npz(spec)
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(spec, split)):
            raise UserError(f"--data {spec} must contain train/ and val/ [and test/] class folders")
    train = pgnm.ImageFolderDataset(os.path.join(spec, "train"))
    labels = {"train": np.asarray(train.targets)}
    for split in ("val", "test"):
        folder = os.path.join(spec, split)
        if os.path.isdir(folder):
            labels[split] = np.asarray(pgnm.ImageFolderDataset(folder, classes=train.classes).targets)
    check_labels(spec, labels)


def _array_split(images, name, transform):
    return pgnm.ArrayDataset(images, np.zeros(len(images), np.int64), ["-"], transform, name=name)


def _synthetic(seed: int, per_class: int, tf) -> ProbeData:
    images, labels = {}, {}
    # val/test: a quarter of train per class, at least one (pgnm.build_datasets' rule)
    for split, n in (("train", per_class), ("val", max(1, per_class // 4)), ("test", max(1, per_class // 4))):
        arr, lab, _ = pgnm.synthetic_arrays(n, 64, seed, split, unseen=True)
        images[split], labels[split] = _array_split(arr, f"{SYNTHETIC}:{split}", tf), lab
    key = hashlib.sha256(f"{SYNTHETIC}/{seed}/{per_class}".encode()).hexdigest()[:16]
    return ProbeData(SYNTHETIC, key, images, labels)


class _ProbeFolder(pgnm.ImageFolderDataset):
    skip_hint = ""                 # evaluate.py has no --skip-bad-images: a probe needs every image


def _imagefolder(spec: str, seed: int, tf) -> ProbeData:
    train = _ProbeFolder(os.path.join(spec, "train"), tf)
    images, labels = {"train": train}, {"train": np.asarray(train.targets)}
    for split in ("val", "test"):
        d = os.path.join(spec, split)
        if os.path.isdir(d):
            ds = _ProbeFolder(d, tf, classes=train.classes)
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
    h.update(f"seed {seed}".encode())          # a tree without test/ is split here, by the seed
    return ProbeData(data_name(spec), h.hexdigest()[:16], images, labels)


def load_probe_data(spec: str, image_size: int, seed: int = 0, synthetic_per_class: int = 48) -> ProbeData:
    """`spec` is a MedMNIST .npz (official or merged layout), an ImageFolder root (train/ val/ [test/]), or
    'synthetic-unseen' (pgnm's synthetic classes that its training set does not have)."""
    check_data_spec(spec)
    cfg = pgnm.Config(val_resize_size=image_size, val_crop_size=image_size)
    tf = pgnm.build_transform(cfg, train=False)
    if spec == SYNTHETIC:
        d = _synthetic(seed, synthetic_per_class, tf)
    elif os.path.isfile(spec):
        try:
            splits = pgnm.load_npz(spec, 0.1, seed)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise UserError(f"--data {spec} cannot be read ({type(e).__name__}): pass a MedMNIST .npz") from None
        images = {s: _array_split(a, f"{data_name(spec)}:{s}", tf) for s, (a, _) in splits.items()}
        key = hashlib.sha256(f"{sha256_file(spec)} seed {seed}".encode()).hexdigest()[:16]  # a merged .npz: seeded split
        d = ProbeData(data_name(spec), key, images, {s: lab for s, (_, lab) in splits.items()})
    else:
        d = _imagefolder(spec, seed, tf)
    d.labels = check_labels(spec, d.labels)     # also catches a merged .npz split into an empty val/test
    return d


# =====================================================================================================================
#  Features (cached)
# =====================================================================================================================


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


def _usable(feats, data: ProbeData) -> bool:
    return isinstance(feats, dict) and set(feats) == set(data.images) and all(
        isinstance(feats[s], torch.Tensor) and feats[s].ndim == 2 and len(feats[s]) == len(data.labels[s])
        for s in feats)


def cached_features(bb: Backbone, data: ProbeData, image_size: int, cache_dir: str, device, log=print,
                    workers: int = 0, batch_size: int = 128) -> dict[str, torch.Tensor]:
    """Features of each split, from <cache_dir> when the same checkpoint, data and preprocessing were seen before.
    Non-finite features stop the run: a probe on them would report numbers that mean nothing."""
    key = f"{bb.sha256[:16]}_{bb.arch}_{data.key}_{image_size}_v{FEATURE_VERSION}"
    path = os.path.join(cache_dir, f"{key}.pt")
    feats = None
    if os.path.exists(path):
        try:                                    # zip CRCs checked: torch.load alone reads flipped bits as features
            feats = pgnm.verify_and_load(path)
        except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed
            feats = None
        if _usable(feats, data):
            log(f"[{data.name}] {bb.label}: features read from {path}")
        else:
            log(f"warning: cache entry {path} is unreadable or does not fit; extracting again")
            feats = None
    fresh, t0 = feats is None, time.perf_counter()
    if fresh:
        try:
            feats = {s: extract_features(bb.net, ds, device, batch_size, workers) for s, ds in data.images.items()}
        except torch.cuda.OutOfMemoryError:
            raise UserError(f"--batch-size {batch_size}: out of memory extracting {data.name} features on {device}; "
                            f"pass a smaller --batch-size") from None
    for split, f in feats.items():
        if not bool(torch.isfinite(f).all()):
            raise UserError(f"--checkpoints {bb.path} gives NaN/inf features on {data.name} ({split} split): check "
                            f"the checkpoint (and --image-size); no probe was fitted")
    if fresh:
        n, seconds = sum(len(f) for f in feats.values()), time.perf_counter() - t0
        try:
            buf = io.BytesIO()
            torch.save(feats, buf)
            write_atomic(path, buf.getvalue(), then="run again")
            log(f"[{data.name}] {bb.label}: extracted {n} feature vectors in {seconds:.1f}s, cached in {path}")
        except UserError as e:                  # the probes can go on without a cache entry
            log(f"[{data.name}] {bb.label}: extracted {n} feature vectors in {seconds:.1f}s; warning: {e}")
    return feats


# =====================================================================================================================
#  The protocol
# =====================================================================================================================


def summarize(per_trial: dict[str, list[float]]) -> dict:
    out = {"trials": len(next(iter(per_trial.values()), []))}
    for k, v in per_trial.items():
        mean, ci = mean_ci(v)
        out[f"{k}_mean"], out[f"{k}_ci"], out[k] = mean, ci, v
    return out


def _capped(history: list[float], best_epoch: int, tag: str, log) -> None:
    if len(history) >= MAX_EPOCHS and best_epoch > MAX_EPOCHS - PATIENCE:
        log(f"{tag} warning: stopped at the {MAX_EPOCHS}-epoch cap while validation accuracy was still rising")


def run_mlp_probe(feats, labels, task: Task, trials: int, device, log=print, tag="") -> dict:
    xtr, xva, xte = standardize(*(feats[s].to(device) for s in ("train", "val", "test")))
    ytr, yva, yte = (torch.as_tensor(labels[s]).to(device) for s in ("train", "val", "test"))
    per_trial: dict[str, list[float]] = {}
    epochs = []
    for t in range(trials):
        mlp, best_epoch, history = train_mlp(xtr, ytr, xva, yva, task, seed=t)
        _capped(history, best_epoch, tag, log)
        with torch.no_grad():
            m = task.metrics(mlp(xte), yte)
        for k, v in m.items():
            per_trial.setdefault(k, []).append(v)
        epochs.append(best_epoch)
        log(f"{tag} MLP trial {t + 1}/{trials}: f1 {m['f1']:.4f} acc {m['acc']:.4f} auroc {m['auroc']:.4f} "
            f"(best epoch {best_epoch} of {len(history)})")
    return {**summarize(per_trial), "best_epoch": epochs}


def run_lowshot(feats, labels, task: Task, shots: Sequence[int], trials: int, device, log=print, tag="",
                solver: str = "adamw") -> dict:
    """Low-shot curves: for each N, `trials` random draws of N training samples per class; AdamW probes stop on the
    whole val split (standardised with the draw's statistics), L-BFGS ones use no val split."""
    xtr_all, xva, xte = feats["train"], feats["val"], feats["test"]
    ytr_all, yva, yte = labels["train"], torch.as_tensor(labels["val"]).to(device), torch.as_tensor(labels["test"])
    out = {}
    largest = max(np.bincount(ytr_all).max(), 1) if task.kind != "multilabel" else len(ytr_all)
    for n in shots:
        if task.kind != "multilabel" and n > largest:
            log(f"{tag} low-shot {n}/class skipped: no class has {n} training samples (largest {largest})")
            continue
        per_trial: dict[str, list[float]] = {}
        epochs = []
        for t in range(trials):
            idx = sample_shots(ytr_all, n, np.random.default_rng([n, t]), task)
            xs, xv, xt = standardize(xtr_all[idx].to(device), xva.to(device), xte.to(device))
            ys = torch.as_tensor(ytr_all[idx]).to(device)
            if solver == "lbfgs":
                lin, best_epoch = fit_logreg_lbfgs(xs, ys, task), None
            else:
                lin, best_epoch, history = fit_logreg_adamw(xs, ys, xv, yva, task, seed=1000 * n + t)
                _capped(history, best_epoch, tag, log)
            epochs.append(best_epoch)
            with torch.no_grad():
                m = task.metrics(lin(xt).cpu(), yte)
            for k, v in m.items():
                per_trial.setdefault(k, []).append(v)
        out[n] = {**summarize(per_trial), "best_epoch": epochs}
        stop = "" if solver == "lbfgs" else f" (best epochs {min(epochs)}-{max(epochs)})"
        log(f"{tag} low-shot {n}/class, {trials} trials, {solver}: f1 {out[n]['f1_mean']:.4f} +- "
            f"{out[n]['f1_ci']:.4f}{stop}")
    return out


def _fmt(mean, ci):
    if math.isnan(mean):
        return "—"
    return f"{mean:.4f}" if math.isnan(ci) else f"{mean:.4f} ± {ci:.4f}"


def markdown_table(datasets: dict, labels: list[str], metric: str = "f1") -> str:
    """Table 3: rows are data sets, columns backbones, cells the MLP probe's mean ± 95% CI; the best in bold."""
    cell = lambda text: str(text).replace("|", "\\|")     # noqa: E731 - a '|' in a label would split the cell
    lines = [f"| Dataset | {' | '.join(map(cell, labels))} |", "|---" * (len(labels) + 1) + "|"]
    for name, r in datasets.items():
        means = [r["mlp"][lab][f"{metric}_mean"] for lab in labels]
        best = max((m for m in means if not math.isnan(m)), default=float("nan"))
        cells = []
        for lab, m in zip(labels, means):
            c = _fmt(m, r["mlp"][lab][f"{metric}_ci"])
            cells.append(f"**{c}**" if len(labels) > 1 and m == best else c)
        lines.append(f"| {cell(name)} ({r['task']}, {r['n_samples']} samples, {r['trials']} trials) | {' | '.join(cells)} |")
    return "\n".join(lines)


# =====================================================================================================================
#  Outputs: results.json (strict JSON), results.csv, lowshot.png; each written atomically, each path printed
# =====================================================================================================================

METRICS = ("f1", "acc", "balanced_acc", "precision", "recall", "auroc")
OUTPUTS = ("results.json", "results.csv", "lowshot.png")


def _json_safe(x):
    """NaN (the CI of a single trial, an AUROC with one class present) -> null, so any JSON parser reads the file."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _csv_bytes(results: dict) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["dataset", "backbone", "checkpoint", "sha256", "probe", "shots", "metric", "mean", "ci95", "trials"])
    probe = f"logreg-{results['settings']['lowshot_solver']}"
    for name, r in results["datasets"].items():
        for lab, bb in results["backbones"].items():
            rows = [("mlp", "", r["mlp"][lab])] + [(probe, n, s) for n, s in r["lowshot"][lab].items()]
            for kind, n, s in rows:
                for k in METRICS:
                    w.writerow([name, lab, bb["path"], bb["sha256"], kind, n, k, s[f"{k}_mean"], s[f"{k}_ci"],
                                s["trials"]])
    return buf.getvalue().encode()


def write_plot(results: dict, path: str) -> bool:
    """Figure 5: low-shot macro F1 against samples per class, one panel per data set. False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names, labels = list(results["datasets"]), list(results["backbones"])
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        for lab in labels:
            curve = results["datasets"][name]["lowshot"][lab]
            es = [0 if math.isnan(curve[n]["f1_ci"]) else curve[n]["f1_ci"] for n in curve]
            ax.errorbar([int(n) for n in curve], [curve[n]["f1_mean"] for n in curve], yerr=es, marker="o",
                        capsize=3, label=lab)
        ax.set_xscale("log", base=2)
        ax.set_title(name)
        ax.set_xlabel("samples per class")
        ax.set_ylabel("macro F1")
    axes[0][0].legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    write_atomic(path, buf.getvalue(), then="run again")
    return True


def write_outputs(results: dict, out_dir: str, log=print) -> list[str]:
    """results.json, results.csv and (with matplotlib) lowshot.png in out_dir; returns the paths written."""
    written = [os.path.join(out_dir, OUTPUTS[0]), os.path.join(out_dir, OUTPUTS[1])]
    doc = json.dumps(_json_safe(results), indent=1, allow_nan=False) + "\n"
    write_atomic(written[0], doc.encode(), then="run again")
    write_atomic(written[1], _csv_bytes(results), then="run again")
    png = os.path.join(out_dir, OUTPUTS[2])
    if write_plot(results, png):
        written.append(png)
    else:
        log(f"note: {png} not written: it needs matplotlib (pip install matplotlib); the low-shot curves are in "
            f"results.json and results.csv")
    for p in written:
        log(f"wrote {p}")
    return written


# =====================================================================================================================
#  evaluate(): validate everything, then probe every (backbone, data set) pair
# =====================================================================================================================


def validate_settings(trials, lowshot_trials, shots, image_size, batch_size, workers, seed, lowshot_solver) -> list:
    """Every numeric flag's range, before any work; returns the low-shot sizes sorted, duplicates dropped."""
    def need(ok, msg):
        if not ok:
            raise UserError(msg)
    need(trials is None or 1 <= trials <= MAX_TRIALS, f"--trials {trials}: must be 1 to {MAX_TRIALS}")
    need(1 <= lowshot_trials <= MAX_TRIALS, f"--lowshot-trials {lowshot_trials}: must be 1 to {MAX_TRIALS}")
    need(len(shots) > 0, "--shots needs at least one size")
    need(all(n >= 1 for n in shots), f"--shots {' '.join(map(str, shots))}: every size must be at least 1")
    need(image_size is None or 16 <= image_size <= 2048, f"--image-size {image_size}: must be 16 to 2048 px")
    need(batch_size >= 1, f"--batch-size {batch_size}: must be at least 1")
    need(workers >= 0, f"--workers {workers}: must be >= 0")
    need(seed >= 0, f"--seed {seed}: must be >= 0")
    need(lowshot_solver in ("adamw", "lbfgs"), f"--lowshot-solver {lowshot_solver!r}: choose adamw or lbfgs")
    return sorted(set(int(n) for n in shots))


def prepare_output_dir(output_dir: str) -> str:
    """Create <output-dir>/cache now, so that a bad --output-dir stops the run before any work."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"--output-dir {output_dir} is a file: pass a folder (it is created if missing)")
    cache = os.path.join(output_dir, "cache")
    try:
        os.makedirs(cache, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output-dir {output_dir}: cannot create {cache} ({e.strerror}): pass a writable "
                        f"folder") from None
    if not os.access(output_dir, os.W_OK) or not os.access(cache, os.W_OK):
        raise UserError(f"--output-dir {output_dir} is not writable: pass a writable folder")
    for name in OUTPUTS:                  # found now, not after an hour of probes
        if os.path.isdir(os.path.join(output_dir, name)):
            raise UserError(f"cannot write {os.path.join(output_dir, name)}: a folder is in the way; move it or "
                            f"pass another --output-dir")
    return cache


def load_backbones(checkpoints: Sequence[str], labels: Sequence[str] | None, model: str | None, log) -> list:
    real = [os.path.realpath(p) for p in checkpoints]
    twice = next((p for i, p in enumerate(checkpoints) if real[i] in real[:i]), None)
    if twice is not None and not labels:            # (with --labels, one backbone under two names is allowed)
        raise UserError(f"--checkpoints lists {twice} twice: list each backbone once (or name each with --labels)")
    if not labels and len(set(default_labels(checkpoints))) < len(checkpoints):
        raise UserError(f"--checkpoints {' '.join(checkpoints)} share a default name (the phase or the file name): "
                        f"give each a column name with --labels")
    labels = list(labels) if labels else default_labels(checkpoints)
    if len(labels) != len(checkpoints):
        raise UserError(f"--labels has {len(labels)} names for {len(checkpoints)} --checkpoints")
    if len(set(labels)) != len(labels) or not all(lab.strip() for lab in labels):
        raise UserError("--labels must be distinct, non-empty names (default: the phase or the checkpoint file name)")
    out = []
    for lab, path in zip(labels, checkpoints):
        net, arch = load_backbone(path, model)
        bb = Backbone(lab, path, sha256_file(path), arch, net)
        log(f"backbone {lab}: {path} ({arch}, {age_text(path)}, sha256 {bb.sha256[:12]})")
        out.append(bb)
    return out


def probe_dataset(spec: str, backbones: list, s: dict, dev, cache: str, log) -> tuple[str, dict]:
    """Both probes of every backbone on one data set; s holds the validated settings."""
    d = load_probe_data(spec, s["image_size"], s["seed"])
    task = task_of(d.labels["train"])
    n_samples = sum(len(v) for v in d.labels.values())
    k = s["trials"] or trials_for(n_samples)
    log(f"[{d.name}] {spec}: {task.kind}, {task.n_out} {'labels' if task.kind == 'multilabel' else 'classes'}, "
        f"train {len(d.labels['train'])} val {len(d.labels['val'])} test {len(d.labels['test'])}; MLP {k} trials, "
        f"low-shot {s['lowshot_trials']} trials ({s['lowshot_solver']})")
    r = {"source": spec, "task": task.kind, "n_samples": n_samples, "trials": k, "mlp": {}, "lowshot": {}}
    for bb in backbones:
        feats = cached_features(bb, d, s["image_size"], cache, dev, log, s["workers"], s["batch_size"])
        tag = f"[{d.name}] {bb.label}:"
        r["mlp"][bb.label] = run_mlp_probe(feats, d.labels, task, k, dev, log, tag)
        r["lowshot"][bb.label] = run_lowshot(feats, d.labels, task, s["shots"], s["lowshot_trials"], dev, log, tag,
                                             s["lowshot_solver"])
    return d.name, r


def evaluate(checkpoints: Sequence[str], labels: Sequence[str] | None = None, data: Sequence[str] = (),
             output_dir: str = "runs/evaluate", trials: int | None = None, shots: Sequence[int] = DEFAULT_SHOTS,
             lowshot_trials: int = 10, device: str | None = None, model: str | None = None,
             image_size: int | None = None, workers: int = 0, seed: int = 0, lowshot_solver: str = "adamw",
             batch_size: int = 128, log=print) -> dict:
    """Run both probes for every (backbone, data set) pair, write the outputs, and return what results.json holds:
    {'backbones': {label: path, sha256, arch}, 'settings': {...}, 'datasets': {name: results}}."""
    if not checkpoints:
        raise UserError("no backbone: pass --checkpoints A.pth [B.pth ...]")
    shots = validate_settings(trials, lowshot_trials, shots, image_size, batch_size, workers, seed, lowshot_solver)
    if model is not None and model not in pgnm.MODEL_NAMES:
        raise UserError(f"--model {model!r}: choose one of {', '.join(pgnm.MODEL_NAMES)}")
    dev = resolve_device(device)
    specs = list(data) or [SYNTHETIC]
    names = [data_name(sp) for sp in specs]
    if len(set(names)) < len(names):
        raise UserError(f"--data: two data sets share a name ({names}); rename one")
    for spec in specs:
        check_data_spec(spec)
    cache = prepare_output_dir(output_dir)
    backbones = load_backbones(checkpoints, labels, model, log)
    size = image_size or (64 if specs == [SYNTHETIC] else 224)
    s = dict(trials=trials, shots=shots, lowshot_trials=lowshot_trials, lowshot_solver=lowshot_solver,
             image_size=size, batch_size=batch_size, workers=workers, seed=seed, device=str(dev))
    results = {"backbones": {bb.label: {"path": bb.path, "sha256": bb.sha256, "arch": bb.arch} for bb in backbones},
               "settings": s, "datasets": {}}
    for spec in specs:
        name, r = probe_dataset(spec, backbones, s, dev, cache, log)
        results["datasets"][name] = r
    log("")
    log("MLP probe on frozen features, test macro F1 (mean ± t 95% CI over trials):")
    log(markdown_table(results["datasets"], list(results["backbones"])))
    log("")
    write_outputs(results, output_dir, log)
    return results


# =====================================================================================================================
#  Logistic regression against scikit-learn (the README's measured comparison of the L-BFGS solver)
# =====================================================================================================================


def bench_logreg(spec: str, checkpoint: str, image_size: int | None, output_dir: str, device, log=print) -> dict:
    """Our L-BFGS logistic regression vs scikit-learn's LogisticRegression on the same standardized features."""
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise UserError("--bench-logreg compares against scikit-learn: pip install scikit-learn") from None
    validate_settings(None, 1, [1], image_size, 1, 0, 0, "lbfgs")
    dev = resolve_device(device)
    check_data_spec(spec)
    cache = prepare_output_dir(output_dir)
    bb, = load_backbones([checkpoint], None, None, log)
    size = image_size or (64 if spec == SYNTHETIC else 224)
    d = load_probe_data(spec, size)
    feats = cached_features(bb, d, size, cache, dev, log)
    task = task_of(d.labels["train"])
    if task.kind == "multilabel":
        raise UserError(f"--bench-logreg needs a single-label data set; {spec} is multi-label")
    xtr, xte = standardize(feats["train"], feats["test"])
    ytr, yte = d.labels["train"], d.labels["test"]
    t0 = time.perf_counter()
    lin = fit_logreg_lbfgs(xtr.to(dev), torch.as_tensor(ytr).to(dev), task)
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


# The probes' settings, which --bench-logreg does not read.
BENCH_IGNORES = {"labels", "trials", "lowshot_trials", "shots", "lowshot_solver", "model", "batch_size", "workers",
                 "seed"}


class _Parser(argparse.ArgumentParser):
    def error(self, message):      # argparse's usage + message would be two lines; every bad input here is one
        self.exit(2, f"error: {' '.join(message.split())} (see python evaluate.py --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", nargs="+", metavar="PTH",
                   help="backbones to compare: ours, the authors', timm or torchvision weights (default: every "
                        "<runs-dir>/<phase>/model_<phase>.pth that exists, phases heated, finetune, baseline)")
    p.add_argument("--labels", nargs="+", metavar="NAME",
                   help="a column name per checkpoint (default: the phase for pgnm.py outputs, else the file name)")
    p.add_argument("--data", nargs="+", metavar="NPZ_OR_DIR", default=[],
                   help="MedMNIST .npz files (train_/val_/test_ arrays, or merged images/labels) and/or ImageFolder "
                        f"roots with train/ and val/ [and test/]; '{SYNTHETIC}' names the built-in set (default: "
                        "the built-in synthetic unseen-concept set)")
    p.add_argument("--output-dir", default="runs/evaluate",
                   help="results.json, results.csv, lowshot.png and the feature cache (default: runs/evaluate)")
    p.add_argument("--trials", type=int, metavar="N",
                   help=f"MLP trials per data set, 1-{MAX_TRIALS} (default: 7 under 10k samples, 3 up to 30k, 1 above)")
    p.add_argument("--lowshot-trials", type=int, default=10, metavar="N",
                   help=f"trials per low-shot size, 1-{MAX_TRIALS} (default: 10)")
    p.add_argument("--shots", type=int, nargs="+", default=list(DEFAULT_SHOTS), metavar="N",
                   help=f"low-shot training samples per class (default: {' '.join(map(str, DEFAULT_SHOTS))})")
    p.add_argument("--lowshot-solver", choices=("adamw", "lbfgs"), default="adamw",
                   help=f"adamw: AdamW defaults, batch {LOWSHOT_BATCH}, stop after {PATIENCE} epochs without a gain "
                        "in accuracy on the val split (the paper); lbfgs: scikit-learn's objective with C=1, no val "
                        "split (Sariyildiz et al.) (default: adamw)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--model", choices=pgnm.MODEL_NAMES,
                   help="backbone architecture (default: told from the checkpoint's keys)")
    p.add_argument("--image-size", type=int, metavar="PX",
                   help="input size in px, 16-2048 (default: 224; 64 when only the synthetic set is probed)")
    p.add_argument("--batch-size", type=int, default=128, metavar="N",
                   help="images per batch in feature extraction (default: 128)")
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="data-loader processes for feature extraction (default: 0)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the synthetic set and of the splits made here (a merged .npz; 10%% of train/ "
                        "as val for an ImageFolder tree without test/) (default: 0)")
    p.add_argument("--runs-dir", default="runs", help="where the default checkpoints are looked for (default: runs)")
    p.add_argument("--bench-logreg", action="store_true",
                   help="time the L-BFGS logistic regression against scikit-learn's on the first --data set with the "
                        "first checkpoint, instead of the probes")
    return p


def cli(argv: Sequence[str] | None = None) -> int:
    log = lambda *x: print(*x, flush=True)  # noqa: E731
    parser = build_parser()
    try:
        a = parser.parse_args(argv)
    except SystemExit as e:                 # --help (0) or a malformed flag (2, one line already printed)
        return e.code if isinstance(e.code, int) else 2
    given = {k for k, v in vars(a).items() if v != parser.get_default(k)}
    unread = (given & BENCH_IGNORES if a.bench_logreg else set()) | \
        ({"runs_dir"} if a.checkpoints and "runs_dir" in given else set())
    if unread:                              # a flag that would be silently ignored: say so instead
        flags = ", ".join(sorted(f"--{k.replace('_', '-')}" for k in unread))
        print(f"error: {flags} not read " + ("with --bench-logreg (it times one fit on the first --data set "
                                             "and the first checkpoint)" if a.bench_logreg else
                                             "with --checkpoints (--runs-dir only finds the default checkpoints)")
              + f"; drop {'them' if len(unread) > 1 else 'it'} (see python evaluate.py --help)", file=sys.stderr)
        return 2
    try:
        validate_settings(a.trials, a.lowshot_trials, a.shots, a.image_size, a.batch_size, a.workers, a.seed,
                          a.lowshot_solver)
        if a.checkpoints:
            ckpts = a.checkpoints
        else:
            ckpts = default_checkpoints(a.runs_dir)
            log(f"no --checkpoints: using every {a.runs_dir}/<phase>/model_<phase>.pth that exists "
                f"({', '.join(DEFAULT_PHASES)})")
        if a.bench_logreg:
            bench_logreg((a.data or [SYNTHETIC])[0], ckpts[0], a.image_size, a.output_dir, a.device, log)
            return 0
        evaluate(ckpts, a.labels, a.data, a.output_dir, a.trials, a.shots, a.lowshot_trials, a.device, a.model,
                 a.image_size, a.workers, a.seed, a.lowshot_solver, a.batch_size, log=log)
        return 0
    except (UserError, OSError) as e:
        print(f"error: {pgnm.failure_line(e)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the feature cache keeps what was extracted; run the same command again", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
