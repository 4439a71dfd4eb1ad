"""PGNM — Policy Gradient-Driven Noise Mask, the reference trainer in one file.

PGNM (Yavuz & Yang, "Policy Gradient-Driven Noise Mask", arXiv:2406.14568) pretrains a medical image classifier
in two steps. In the *heated* phase a light policy network looks at each image and emits the shape parameters of a
Beta distribution per cell of a G x G grid; a noise mask is sampled from it, upsampled, blurred and multiplied into
the image; the classifier sees only the masked image. Both networks are trained on eq. 8 of the paper, the
classifier through the cross-entropy of the masked image, the policy through the log-probability of its masks
(a score-function term in the authors' form; `--objective reinforce` is our textbook REINFORCE variant). The policy is then thrown away and the heated classifier is *fine-tuned* on clean images.

    # the main job: heated pretraining on 8 GPUs (paper recipe: resnet50, batch 32/GPU, 90 epochs, grid 64, fp32;
    # add --amp for speed, which is ours: the authors' --amp was never applied)
    torchrun --nproc_per_node 8 pgnm.py --phase heated --data-path /data/radimagenet_refined --sync-bn
    # fine-tune the heated classifier on clean images (finds runs/heated/model_heated.pth by itself)
    python pgnm.py --phase finetune --data-path /data/radimagenet_refined
    # plain supervised training for the paper's comparison rows
    python pgnm.py --phase baseline --data-path /data/radimagenet_refined --auto-augment imagenet
    # speed of a heated step against its parts and against the authors' formulation
    python pgnm.py --bench --model resnet50 --batch-size 32 --train-crop-size 224
    # the tests (CPU, a few minutes)
    python -m pytest -q test_pgnm.py

Without --data-path every phase runs on a built-in synthetic multi-modality data set (CT, MR, ultrasound, X-ray)
with a tiny CPU preset, so `python pgnm.py --phase heated` shows the whole pipeline on a laptop in minutes.

Runtime dependencies: torch >= 2.5, torchvision >= 0.20, numpy, pillow. Nothing else; timm is *not* needed: ResNet-10t,
ResNet-18 and ResNet-50 are written here from scratch with module names chosen so that their state_dict keys and
shapes equal timm's `resnet10t` / `resnet18` / `resnet50` (and torchvision's resnet18/50), so weights move between
them with strict=True. Importing this file defines things and does nothing else; every piece (Beta mask sampler,
upsample+blur, EMA, objective, metrics, models, data, checkpoints) can be used on its own.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import errno
import functools
import hashlib
import io
import json
import math
import os
import random
import re
import shlex
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

# =====================================================================================================================
#  Config and phase presets
# =====================================================================================================================


def _f(default, help: str, *aliases: str):
    """A config field whose help text is its comment; aliases are extra CLI spellings (the authors' flag names)."""
    return field(default=default, metadata={"help": help, "aliases": aliases})


@dataclass
class Config:
    # --- what to run -------------------------------------------------------------------------------------------------
    phase: str = _f("heated", "heated (policy + classifier on masked input) | finetune | baseline")
    data_path: str | None = _f(None, "ImageFolder root with train/ val/ [test/], or a MedMNIST .npz; "
                                     "omitted = the built-in synthetic data set with a tiny CPU preset")
    output_dir: str | None = _f(None, "where checkpoints and log.jsonl go (default runs/<phase>)")
    device: str | None = _f(None, "cuda | cpu | cuda:N (default: cuda when available; torchrun picks LOCAL_RANK)")
    seed: int = _f(0, "seed of everything random: init, data order, augmentation, masks")
    # --- models ------------------------------------------------------------------------------------------------------
    model: str = _f("resnet50", "classifier: resnet10t | resnet18 | resnet50")
    policy_model: str = _f("resnet10t", "policy trunk g(.) (the paper always uses resnet10t)")
    num_classes: int | None = _f(None, "classifier outputs (default: the number of classes in the data)")
    # --- optimisation (per process: the effective batch is batch_size x world size) ---------------------------------
    epochs: int = _f(90, "training epochs")
    batch_size: int = _f(32, "images per process (per GPU)", "-b")
    lr: float = _f(0.1, "classifier SGD learning rate; the policy gets lr * policy_lr_ratio")
    policy_lr_ratio: float = _f(0.1, "policy lr / classifier lr (authors: 1/10)")
    momentum: float = _f(0.9, "SGD momentum, both networks")
    weight_decay: float = _f(1e-4, "SGD weight decay, both networks", "--wd")
    lr_step_size: int = _f(30, "classifier StepLR: epochs between decays")
    lr_gamma: float = _f(0.1, "classifier StepLR: decay factor")
    lr_min: float = _f(0.0, "policy CosineAnnealingLR floor")
    lr_warmup_epochs: int = _f(0, "classifier linear/constant warm-up length in epochs")
    lr_warmup_method: str = _f("linear", "linear | constant")
    lr_warmup_decay: float = _f(0.01, "warm-up starts at lr * this")
    label_smoothing: float = _f(0.0, "cross-entropy label smoothing")
    clip_grad_norm: float | None = _f(None, "clip each network's gradient norm to this (after AMP unscaling)")
    # --- PGNM (paper section 2) -------------------------------------------------------------------------------------
    objective: str = _f("paper", "paper: eq. 8, mean(logsumexp logP) * CE (the authors' code) | reinforce: "
                                 "CE + mean((c_b - mean c) * sum logP), our principled variant, not from the paper")
    noise: str = _f("beta", "beta: learned policy (the method) | uniform: M~U(0,1) | gaussian: M~N(0.5,0.2) "
                            "clamped to [0,1] (Table 4 ablations, no policy)")
    grid: int = _f(64, "noise matrix is grid x grid (grid == crop size is the paper's 'pure noise')")
    kernel: int = _f(13, "Gaussian blur kernel size in pixels, odd; 0 disables the blur")
    sigma: float = _f(6.0, "Gaussian blur standard deviation in pixels")
    tau_image: float = _f(0.9, "eq. 10: weight of the dataset-level parameters in the image-level ones")
    tau_dataset: float = _f(0.99, "eq. 12-13: EMA decay of the dataset-level parameters per step")
    policy_size: int | None = _f(None, "DEVIATION from the paper: resize the policy's input to this many pixels "
                                       "(the mask is still upsampled to the full image); default: full size")
    # --- data --------------------------------------------------------------------------------------------------------
    workers: int = _f(8, "data-loader processes per training process", "-j")
    train_crop_size: int = _f(224, "RandomResizedCrop size for training (px)")
    crop_scale_min: float = _f(0.08, "RandomResizedCrop's smallest crop, as a fraction of the image area")
    val_resize_size: int = _f(256, "evaluation resize of the shorter side (px)")
    val_crop_size: int = _f(224, "evaluation centre crop (px)")
    interpolation: str = _f("bilinear", "resize interpolation: bilinear | bicubic | nearest")
    auto_augment: str | None = _f(None, "imagenet | cifar10 | svhn (AutoAugment), ra (RandAugment), "
                                        "ta_wide (TrivialAugmentWide), augmix")
    ra_magnitude: int = _f(9, "RandAugment magnitude")
    augmix_severity: int = _f(3, "AugMix severity")
    mixup_alpha: float = _f(0.0, "MixUp alpha (0 = off), applied on the device per batch")
    cutmix_alpha: float = _f(0.0, "CutMix alpha (0 = off); with MixUp, one of the two is picked per batch")
    mean: float = _f(0.3162, "normalisation mean on all three channels (RadImageNet statistics)")
    std: float = _f(0.3213, "normalisation std on all three channels (RadImageNet statistics)")
    skip_bad_images: bool = _f(False, "skip unreadable images (each is reported, the total counted per epoch) "
                                      "instead of stopping")
    val_split: float = _f(0.1, "for a merged .npz (images, labels): the fraction held out for val and for test")
    synthetic_per_class: int = _f(64, "built-in data set: training images per class (val/test get a quarter)")
    synthetic_size: int = _f(64, "built-in data set: image side in pixels")
    # --- checkpoints -------------------------------------------------------------------------------------------------
    finetune: str | None = _f(None, "initial classifier weights: ours, the authors', timm or torchvision; "
                                    "phase finetune defaults to <output-dir>/../heated/model_heated.pth")
    resume: str | None = _f(None, "PATH of a checkpoint, or 'auto': the output directory's checkpoint if any")
    save_every_steps: int = _f(0, "also checkpoint every N training steps (0 = at epoch ends only)")
    average_last: int = _f(0, "also write model_<phase>_avgN.pth, the mean of the last N epochs' classifier "
                              "weights (the authors' release step, N = 3); 0 = off")
    max_bad_steps: int = _f(20, "stop after this many non-finite steps in a row (each is skipped and counted)")
    # --- speed and scale ---------------------------------------------------------------------------------------------
    amp: bool = _f(False, "mixed precision: autocast + GradScaler (fp16); Beta math stays float32")
    amp_dtype: str = _f("float16", "float16 (V100) | bfloat16 (A100 and newer; no scaler)")
    sync_bn: bool = _f(False, "convert BatchNorm to SyncBatchNorm before DDP (GPU only)")
    channels_last: bool | None = _f(None, "NHWC memory format (faster convolutions on tensor cores); default: on for "
                                          "CUDA with --amp, off otherwise; --no-channels-last forces it off")
    compile: bool = _f(False, "torch.compile both networks (saved keys never carry the wrapper prefix)")
    compile_mode: str = _f("default", "torch.compile mode: default | max-autotune-no-cudagraphs | reduce-overhead "
                                      "(captures the networks in CUDA graphs; experimental, see README 'Speed')")
    deterministic: bool = _f(False, "bit-reproducible runs: deterministic kernels, no cuDNN autotuning")
    no_malloc_tuning: bool = _f(False, "on CPU, leave glibc's allocator settings alone (otherwise a CPU run raises "
                                       "its mmap/trim thresholds so freed activations are reused, and says so at start)")
    # --- logging -----------------------------------------------------------------------------------------------------
    print_freq: int = _f(10, "progress line every N steps")
    save_masks: bool = _f(False, "heated phase: write masks_epochNNN.png (images, masks, masked images) every "
                             "epoch")


# Each phase starts from Config's paper defaults and changes only these (the authors' finetune recipe, README).
PHASE_PRESETS: dict[str, dict] = {
    "heated": {},
    "finetune": dict(epochs=10, lr=0.001, batch_size=64, lr_warmup_epochs=7, lr_warmup_method="linear"),
    "baseline": {},
}

# Without --data-path: a CPU-sized run on the built-in synthetic scans (64 px); the grid, kernel and sigma keep the
# paper's proportions to the image (64/224 of the crop: grid 16, kernel 5, sigma 2).
SYNTHETIC_PRESET: dict = dict(model="resnet10t", train_crop_size=64, val_resize_size=64, val_crop_size=64,
                              crop_scale_min=0.35, grid=16, kernel=5, sigma=2.0, workers=0, print_freq=12,
                              batch_size=32, synthetic_per_class=48)
SYNTHETIC_PHASE_PRESETS: dict[str, dict] = {
    "heated": dict(epochs=5, lr=0.02, lr_step_size=4),   # eq. 8 scales the CE gradient by ~5: keep lr low
    "finetune": dict(epochs=3, lr=0.01, lr_warmup_epochs=1, batch_size=32),
    "baseline": dict(epochs=5, lr=0.1, lr_step_size=4),
}

PHASES = ("heated", "finetune", "baseline")
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")
MODEL_NAMES = ("resnet10t", "resnet18", "resnet50")


class UserError(Exception):
    """Bad input or configuration: the CLI prints the message as one line, with no traceback."""


def failure_line(e: BaseException) -> str:
    """What the three tools print after 'error: ' for a UserError, an OSError (the environment, not the code: a
    read-only folder, a vanished file) or a requested stop: one line. A UserError raised in a data-loader worker
    arrives wrapped with the worker's traceback: its last line is the message."""
    if isinstance(e, OSError) and not isinstance(e, UserError):
        return f"{e.strerror or e}{': ' + str(e.filename) if e.filename else ''}"
    text = str(e).strip()
    return text.splitlines()[-1].split("UserError: ", 1)[-1] if text else type(e).__name__


def make_config(phase: str = "heated", **overrides) -> Config:
    """Config = paper defaults < phase preset < synthetic preset (no data path) < explicit overrides."""
    if phase not in PHASES:
        raise UserError(f"--phase {phase!r}: choose one of {', '.join(PHASES)}")
    names = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise UserError(f"unknown config field(s) {unknown}; see `python pgnm.py --help`")
    values = dict(PHASE_PRESETS[phase])
    if overrides.get("data_path") is None:
        values.update(SYNTHETIC_PRESET)
        values.update(SYNTHETIC_PHASE_PRESETS[phase])
    values.update(overrides)
    values["phase"] = phase
    return Config(**values)


def default_output_dir(phase: str) -> str:
    return os.path.join("runs", phase)


def preset_name(cfg: Config) -> str:
    """The preset make_config applied on top of the paper's defaults, in words (printed at start)."""
    if cfg.data_path is None:
        return "synthetic CPU demo (no --data-path)"
    return "finetune (the authors' recipe)" if cfg.phase == "finetune" else "none (the paper's defaults)"


def config_differences(cfg: Config) -> dict:
    """The fields whose values differ from the paper's defaults (Config's), in field order. The phase and the
    default output directory runs/<phase> are not differences."""
    ref = Config()
    out = {}
    for f in dataclasses.fields(Config):
        value = getattr(cfg, f.name)
        if f.name == "phase" or (f.name == "output_dir" and value in (None, default_output_dir(cfg.phase))):
            continue
        if value != getattr(ref, f.name):
            out[f.name] = value
    return out


def differences_text(cfg: Config) -> str:
    """config_differences as `name=value ...`, each value quoted as a shell would need (a path with spaces)."""
    diff = " ".join(f"{k}={shlex.quote(format_value(v))}" for k, v in config_differences(cfg).items())
    return diff or "nothing"


def format_value(value) -> str:
    """A config value as --help and the start-up line print it."""
    if value is None:
        return "none"
    if value == "default":          # --compile-mode's own word for torch's default mode
        return "'default'"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def help_defaults(name: str) -> str:
    """A field's defaults for --help, derived from make_config so the help cannot drift from what a run uses:
    'default X' (the paper's), then each preset that changes it ('finetune: Y' with --data-path; 'demo: Z' without),
    e.g. 'default 0.1; finetune: 0.001; demo: 0.02 heated / 0.01 finetune / 0.1 baseline'."""
    default = format_value(next(f.default for f in dataclasses.fields(Config) if f.name == name))
    real = {p: format_value(getattr(make_config(p, data_path="DATA"), name)) for p in PHASES}
    demo = {p: format_value(getattr(make_config(p), name)) for p in PHASES}
    parts = [f"default {default}"]
    parts += [f"{p}: {v}" for p, v in real.items() if v != default]
    if demo != real:
        values = set(demo.values())
        parts.append("demo: " + (values.pop() if len(values) == 1 else " / ".join(f"{v} {p}" for p, v in demo.items())))
    return "; ".join(parts)


CHOICES = {"phase": PHASES, "model": MODEL_NAMES, "policy_model": MODEL_NAMES, "objective": ("paper", "reinforce"),
           "noise": ("beta", "uniform", "gaussian"), "lr_warmup_method": ("linear", "constant"),
           "amp_dtype": ("float16", "bfloat16"), "compile_mode": COMPILE_MODES,
           "interpolation": ("bilinear", "bicubic", "nearest"),
           "auto_augment": (None, "imagenet", "cifar10", "svhn", "ra", "ta_wide", "augmix")}    # the flags of a list


def check_number(cfg: Config, name: str, lo: float, hi: float = math.inf, lo_open: bool = False,
                 hi_open: bool = False, what: str = "", optional: bool = False) -> None:
    """UserError unless cfg.<name> is a finite number in [lo, hi] (or open at either end); None passes if optional."""
    v, flag = getattr(cfg, name), "--" + name.replace("_", "-")
    if v is None and optional:
        return
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and \
        (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        what = what or ((f"> {lo}" if lo_open else f">= {lo}") if hi == math.inf else
                        f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")
        raise UserError(f"{flag} {v}: must be {what}")


def check_ranges(cfg: Config) -> None:
    """Every numeric flag inside its range (check_number), each with the message a user reads."""
    number = functools.partial(check_number, cfg)
    number("seed", 0, 2 ** 63 - 1)
    number("epochs", 1)
    number("batch_size", 1)
    number("num_classes", 2, optional=True)
    number("lr", 0, lo_open=True, what="a positive finite number")
    number("policy_lr_ratio", 0)
    number("momentum", 0, 1, hi_open=True)
    number("weight_decay", 0)
    number("lr_step_size", 1)
    number("lr_gamma", 0, 1, lo_open=True)
    number("lr_min", 0, cfg.lr * cfg.policy_lr_ratio,
           what=f"in [0, the policy's lr = lr x policy-lr-ratio = {cfg.lr * cfg.policy_lr_ratio:g}]")
    number("lr_warmup_epochs", 0)
    number("lr_warmup_decay", 0, 1, lo_open=True)
    number("label_smoothing", 0, 1, hi_open=True)
    number("clip_grad_norm", 0, lo_open=True, optional=True)
    for name in ("train_crop_size", "val_resize_size", "val_crop_size"):   # before --grid, which is compared to them
        number(name, 1, what="at least 1 px")
    number("grid", 1)
    number("sigma", 0, lo_open=True)
    number("tau_image", 0, 1)
    number("tau_dataset", 0, 1)
    number("ra_magnitude", 0, 30)                 # RandAugment has 31 magnitude bins
    number("augmix_severity", 1, 10)
    number("mixup_alpha", 0)
    number("cutmix_alpha", 0)
    number("mean", -math.inf, what="a finite number")
    number("std", 0, lo_open=True)
    number("crop_scale_min", 0, 1, lo_open=True)
    number("workers", 0)
    number("policy_size", 16, what="at least 16 px", optional=True)
    number("save_every_steps", 0)
    number("average_last", 0, cfg.epochs, what=f"between 0 (off) and --epochs ({cfg.epochs})")
    number("max_bad_steps", 1)
    number("print_freq", 1)
    number("val_split", 0, 0.5, lo_open=True, hi_open=True)
    number("synthetic_per_class", 1)
    number("synthetic_size", 32, what="at least 32 px (the synthetic scans' burned-in text needs it)")


def validate_config(cfg: Config) -> None:
    """Check every flag's value once, before any work, with messages that say what to do. Numbers must be finite and
    inside their range: a NaN or inf, or a value that would crash only after an epoch, stops here."""
    def need(cond: bool, msg: str):
        if not cond:
            raise UserError(msg)

    for name, allowed in CHOICES.items():
        need(getattr(cfg, name) in allowed, f"--{name.replace('_', '-')} {getattr(cfg, name)!r}: choose one of "
             f"{', '.join(str(v) for v in allowed if v is not None)}")
    need(cfg.device is None or re.fullmatch(r"cpu|cuda(:\d+)?", cfg.device.strip().lower()) is not None,  # as resolve_device
         f"--device {cfg.device!r}: choose cpu, cuda or cuda:N")
    need(cfg.resume is None or cfg.resume != "", "--resume '': give a checkpoint PATH or 'auto'")
    for name, instead in (("data_path", "leave the flag out for the built-in synthetic data"),
                          ("output_dir", "leave the flag out for runs/<phase>"),
                          ("finetune", "leave the flag out for the phase's default")):
        need(getattr(cfg, name) != "", f"--{name.replace('_', '-')} '': give a path, or {instead} (an empty shell "
                                       f"variable?)")
    need(cfg.output_dir is None or not os.path.exists(cfg.output_dir) or os.path.isdir(cfg.output_dir),
         f"--output-dir {cfg.output_dir} is a file, not a folder: give a folder (it is created if missing)")
    check_ranges(cfg)                     # before the checks that compare flags with each other
    need(cfg.val_crop_size <= cfg.val_resize_size, f"--val-crop-size {cfg.val_crop_size} is larger than "
         f"--val-resize-size {cfg.val_resize_size}: the centre crop would pad the images with black; give "
         f"--val-crop-size at most --val-resize-size")
    heated = cfg.phase == "heated"                     # only the heated phase draws masks at the crop's size
    need(not heated or cfg.grid <= min(cfg.train_crop_size, cfg.val_crop_size),
         f"--grid {cfg.grid} is larger than the crop ({min(cfg.train_crop_size, cfg.val_crop_size)} px): "
         f"use a grid at most --train-crop-size/--val-crop-size")
    need(cfg.kernel == 0 or (cfg.kernel > 0 and cfg.kernel % 2 == 1),
         f"--kernel {cfg.kernel}: the blur kernel must be 0 (no blur) or a positive odd number"
         + (f" (e.g. {cfg.kernel + 1})" if cfg.kernel > 0 else ""))
    need(not heated or cfg.kernel // 2 < min(cfg.train_crop_size, cfg.val_crop_size),
         f"--kernel {cfg.kernel} is too large for the crop: reflect padding needs kernel//2 < crop size")
    need(not cfg.save_masks or cfg.phase == "heated", f"--save-masks draws the heated phase's masks; the {cfg.phase} "
         f"phase trains on clean images and has none: drop --save-masks")


# =====================================================================================================================
#  Pure math: Beta policy (eq. 3-4, 7), EMA (eq. 10-13), mask upsample + blur, objective (eq. 8), metrics
# =====================================================================================================================

BETA_EPS = 1e-6  # masks are clamped to [eps, 1 - eps]: Beta.log_prob(0 or 1) is +-inf, and float32 samples hit 0/1
# |log alpha|, |log beta| <= 20 keeps exp() finite in float32; binds only when a diverging policy emits larger values
# (a test provokes it)
LOG_CONCENTRATION_LIMIT = 20.0


def mix_image_params(dataset_param: torch.Tensor, image_param: torch.Tensor, tau_i: float) -> torch.Tensor:
    """Eq. 10-11: alpha_img = tau_i * alpha_d + (1 - tau_i) * a.   (1, G*G), (B, G*G) -> (B, G*G)"""
    return tau_i * dataset_param + (1.0 - tau_i) * image_param


def ema_update(dataset_param: torch.Tensor, batch_mean: torch.Tensor, tau_d: float) -> torch.Tensor:
    """Eq. 12-13: alpha_d <- tau_d * alpha_d + (1 - tau_d) * mean_b(a); no gradient.   (1, G*G) -> (1, G*G)

    `batch_mean` is mean_b(a) over the *global* batch: under DDP the caller averages it over ranks first."""
    return (tau_d * dataset_param + (1.0 - tau_d) * batch_mean).detach()


def beta_distribution(log_alpha: torch.Tensor, log_beta: torch.Tensor) -> torch.distributions.Beta:
    """Eq. 3: B(exp a, exp b) in float32, without per-call argument validation (a device sync on GPU)."""
    a = log_alpha.float().clamp(-LOG_CONCENTRATION_LIMIT, LOG_CONCENTRATION_LIMIT).exp()
    b = log_beta.float().clamp(-LOG_CONCENTRATION_LIMIT, LOG_CONCENTRATION_LIMIT).exp()
    return torch.distributions.Beta(a, b, validate_args=False)


def sample_beta_mask(log_alpha: torch.Tensor, log_beta: torch.Tensor, eps: float = BETA_EPS,
                     return_clamped: bool = False):
    """Eq. 4 and 7: M ~ B(exp a, exp b) (no reparameterisation), logP = log B(M).   (B, G*G) -> (B, G*G) x2

    Always float32, also under autocast. M is clamped to [eps, 1-eps] before log_prob so logP stays finite;
    the clamped M is both the action and what logP scores. Draws from the device's default generator.
    With return_clamped, also the number of elements the clamp changed (a 0-d int64 tensor on the device, no sync):
    for concentrations below ~0.5 the clamp binds often enough to lower logP measurably (README)."""
    with torch.autocast(device_type=log_alpha.device.type, enabled=False):
        dist_ = beta_distribution(log_alpha, log_beta)
        raw = dist_.sample()
        mask = raw.clamp(eps, 1.0 - eps)
        logp = dist_.log_prob(mask)
    if return_clamped:
        return mask, logp, (mask != raw).sum()
    return mask, logp


def sample_fixed_noise(kind: str, shape: Sequence[int], device):
    """Table 4 ablations without a policy: 'uniform' M ~ U(0,1); 'gaussian' M ~ N(0.5, 0.2) clamped to [0,1].

    The paper gives no parameters for its Gaussian; 0.5 +- 0.2 keeps the mask's mean at the uniform's."""
    if kind == "uniform":
        return torch.rand(shape, device=device)
    if kind == "gaussian":
        return (0.5 + 0.2 * torch.randn(shape, device=device)).clamp_(0.0, 1.0)
    raise ValueError(f"unknown noise kind {kind!r}")


def gaussian_kernel1d(kernel: int, sigma: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """torchvision's Gaussian: exp(-x^2 / 2 sigma^2) on x = -(k-1)/2 .. (k-1)/2, normalised to sum 1.   -> (k,)"""
    half = (kernel - 1) * 0.5
    x = torch.linspace(-half, half, steps=kernel, dtype=dtype, device=device)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    return pdf / pdf.sum()


def nearest_upsample_matrix(src: int, dst: int) -> torch.Tensor:
    """U with U @ v == F.interpolate(v, dst, mode='nearest') for a length-src vector v.   -> (dst, src)

    The source index of each output pixel is taken from F.interpolate itself, so the rounding rule matches."""
    idx = F.interpolate(torch.arange(src, dtype=torch.float64).view(1, 1, src, 1), size=(dst, 1), mode="nearest")
    return F.one_hot(idx.view(dst).long(), src).double()


def reflect_blur_matrix(n: int, kernel: int, sigma: float) -> torch.Tensor:
    """K with K @ v == 1-D Gaussian blur of v with reflect padding (torchvision's gaussian_blur, one axis). -> (n, n)"""
    r = kernel // 2
    if r >= n:
        raise ValueError(f"blur kernel {kernel} needs an image side > {r} for reflect padding, got {n}")
    w = gaussian_kernel1d(kernel, sigma, dtype=torch.float64)
    i = torch.arange(n).view(n, 1)
    j = i + torch.arange(-r, r + 1).view(1, kernel)  # (n, k) taps before reflection
    j = torch.where(j < 0, -j, j)
    j = torch.where(j > n - 1, 2 * (n - 1) - j, j)
    mat = torch.zeros(n, n, dtype=torch.float64)
    mat.scatter_add_(1, j, w.expand(n, kernel).clone())
    return mat


@functools.lru_cache(maxsize=32)
def mask_operators(grid: int, height: int, width: int, kernel: int, sigma: float,
                   device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_h, A_w) with upsample+blur(M) == A_h @ M @ A_w^T: both steps are linear and separable.   (H, G), (W, G)"""
    a_h, a_w = nearest_upsample_matrix(grid, height), nearest_upsample_matrix(grid, width)
    if kernel > 0:
        a_h = reflect_blur_matrix(height, kernel, sigma) @ a_h
        a_w = reflect_blur_matrix(width, kernel, sigma) @ a_w
    return a_h.to(device=device, dtype=dtype), a_w.to(device=device, dtype=dtype)


def upsample_blur(mask: torch.Tensor, size: tuple[int, int], kernel: int, sigma: float) -> torch.Tensor:
    """Fig. 4 post-processing: nearest upsample G x G -> H x W, then Gaussian blur (kernel, sigma, reflect padding).

    Numerically torchvision's `F.interpolate(mode='nearest')` + `gaussian_blur` (to ~1e-6), computed as two small
    matrix products instead of a dense k x k convolution on the full image. kernel 0 = no blur.
    (B, G*G) or (B, 1, G, G) -> (B, 1, H, W), float32."""
    b = mask.shape[0]
    grid = int(round(math.sqrt(mask[0].numel())))
    a_h, a_w = mask_operators(grid, size[0], size[1], kernel, float(sigma), mask.device)
    with torch.autocast(device_type=mask.device.type, enabled=False):
        return a_h @ mask.float().reshape(b, 1, grid, grid) @ a_w.T


def reference_upsample_blur(mask: torch.Tensor, size: tuple[int, int], kernel: int, sigma: float) -> torch.Tensor:
    """The authors' mask post-processing, F.interpolate + a dense torchvision gaussian_blur, which --bench times as
    the authors' formulation (upsample_blur gives the same mask, see its test).   (B, G*G) -> (B, 1, H, W)"""
    from torchvision.transforms.functional import gaussian_blur
    b = mask.shape[0]
    grid = int(round(math.sqrt(mask[0].numel())))
    m = mask.reshape(b, 1, grid, grid)
    if (grid, grid) != tuple(size):
        m = F.interpolate(m, size=size, mode="nearest")
    return gaussian_blur(m, kernel_size=kernel, sigma=sigma) if kernel > 0 else m


def paper_objective(logp: torch.Tensor, ce: torch.Tensor) -> torch.Tensor:
    """Eq. 8: L = mean_b( log sum_j exp logP[b, j] ) * CE, CE the batch-mean cross-entropy.   (B, G*G), () -> ()

    The authors' code computes log(sum(exp(logP))), which overflows; logsumexp is the same number, stably."""
    return torch.logsumexp(logp.float(), dim=1).mean() * ce.float()


def reinforce_objective(logp: torch.Tensor, ce_per_image: torch.Tensor) -> torch.Tensor:
    """Our variant (not in the paper): CE for the classifier + REINFORCE with a batch-mean baseline for the policy,
    L = mean_b(c_b) + mean_b((c_b - mean c) * sum_j logP[b, j]), c detached in the second term.   (B, G*G), (B,) -> ()"""
    c = ce_per_image.float()
    advantage = (c - c.mean()).detach()
    return c.mean() + (advantage * logp.float().sum(dim=1)).mean()


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """C[i, j] = #samples of true class i predicted as j.   (N,), (N,) -> (C, C) int64"""
    return torch.bincount(target.long() * num_classes + pred.long(), minlength=num_classes ** 2).view(
        num_classes, num_classes)


def binary_auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve = Mann-Whitney U / (n_pos n_neg), ties counted half (as scikit-learn).
    NaN when one of the two groups is empty.   (N,), (N,) bool -> float"""
    scores, positive = scores.double().flatten(), positive.bool().flatten()
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(scores)
    s, p = scores[order], positive[order]
    _, counts = torch.unique_consecutive(s, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg_rank = ends - (counts.double() - 1) / 2          # 1-based mean rank of each tie group
    ranks = torch.repeat_interleave(avg_rank, counts)
    u = ranks[p].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def classification_metrics(probs: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro precision/recall/F1, macro one-vs-rest AUROC and normalised predictive
    entropy mean(H(p)) / log C.   (N, C) probabilities, (N,) labels -> dict

    Conventions follow scikit-learn's defaults: precision/recall/F1 average over the classes that occur in the
    labels or the predictions (0 where undefined); balanced accuracy over the classes that occur in the labels;
    AUROC over the classes that occur in the labels and not in all of them (scikit-learn refuses otherwise)."""
    probs, target = probs.detach().double().cpu(), target.detach().long().cpu()
    n, c = probs.shape
    if n == 0:
        return {k: float("nan") for k in ("acc", "balanced_acc", "precision", "recall", "f1", "auroc", "entropy")}
    pred = probs.argmax(1)
    cm = confusion_matrix(pred, target, c).double()
    tp, support, predicted = cm.diag(), cm.sum(1), cm.sum(0)
    present = (support > 0) | (predicted > 0)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    f1_den = 2 * tp + (predicted - tp) + (support - tp)
    f1 = torch.where(f1_den > 0, 2 * tp / f1_den.clamp(min=1), torch.zeros_like(tp))
    aucs = [binary_auroc(probs[:, k], target == k) for k in range(c) if 0 < support[k] < n]
    entropy = (-torch.special.xlogy(probs, probs).sum(1).mean() / math.log(c)).clamp_min(0.0).abs() if c > 1 else \
        torch.tensor(0.0)
    return {
        "acc": float(tp.sum() / n),
        "balanced_acc": float(recall[support > 0].mean()),
        "precision": float(precision[present].mean()),
        "recall": float(recall[present].mean()),
        "f1": float(f1[present].mean()),
        "auroc": float(np.mean(aucs)) if aucs else float("nan"),
        "entropy": float(entropy),
    }


# =====================================================================================================================
#  Models: ResNet-10t / 18 / 50 (timm-compatible names) and the policy network
# =====================================================================================================================
# Module names (conv1/bn1/act1, layerN.i.convK/bnK, downsample.{0,1} or .{1,2} with avg_down, the 'tiered' stem
# conv1.{0,1,3,4,6}, fc) are chosen to equal timm's, so state_dicts load both ways with strict=True.


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1, self.bn1, self.act1 = _conv3x3(inplanes, planes, stride), nn.BatchNorm2d(planes), nn.ReLU(True)
        self.conv2, self.bn2, self.act2 = _conv3x3(planes, planes), nn.BatchNorm2d(planes), nn.ReLU(True)
        self.downsample = downsample

    def zero_init_last(self):
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(x + shortcut)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        out = planes * self.expansion
        self.conv1, self.bn1, self.act1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU(True)
        self.conv2, self.bn2, self.act2 = _conv3x3(planes, planes, stride), nn.BatchNorm2d(planes), nn.ReLU(True)
        self.conv3, self.bn3, self.act3 = nn.Conv2d(planes, out, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(True)
        self.downsample = downsample

    def zero_init_last(self):
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return self.act3(x + shortcut)


class ResNet(nn.Module):
    """ResNet with timm's names. tiered_stem: three 3x3 convs 3->24->32->64 (first stride 2) instead of one 7x7;
    avg_down: the shortcut downsamples with a 2x2 average pool then a stride-1 1x1 conv (ResNet-D).
    num_classes=0 gives a feature extractor whose forward returns pooled (B, num_features) features."""

    def __init__(self, block, layers: Sequence[int], num_classes: int = 1000, tiered_stem: bool = False,
                 avg_down: bool = False):
        super().__init__()
        if tiered_stem:
            self.conv1 = nn.Sequential(
                nn.Conv2d(3, 24, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU(True),
                _conv3x3(24, 32), nn.BatchNorm2d(32), nn.ReLU(True), _conv3x3(32, 64))
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1, self.act1 = nn.BatchNorm2d(64), nn.ReLU(True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or inplanes != planes * block.expansion:
                out = planes * block.expansion
                if avg_down:
                    pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity()
                    downsample = nn.Sequential(pool, nn.Conv2d(inplanes, out, 1, bias=False), nn.BatchNorm2d(out))
                else:
                    downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
            blocks = [block(inplanes, planes, stride, downsample)]
            inplanes = planes * block.expansion
            blocks += [block(inplanes, planes) for _ in range(1, n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_features = inplanes
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.fc = nn.Linear(inplanes, num_classes) if num_classes > 0 else nn.Identity()
        # timm's initialisation (the authors trained timm models): He init, last BN of each residual branch at 0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif hasattr(m, "zero_init_last"):
                m.zero_init_last()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled pre-fc features.   (B, 3, H, W) -> (B, num_features)"""
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.global_pool(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


def resnet10t(num_classes: int = 1000) -> ResNet:
    return ResNet(BasicBlock, (1, 1, 1, 1), num_classes, tiered_stem=True, avg_down=True)


def resnet18(num_classes: int = 1000) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes)


def resnet50(num_classes: int = 1000) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes)


MODELS: dict[str, Callable[[int], ResNet]] = {"resnet10t": resnet10t, "resnet18": resnet18, "resnet50": resnet50}


def build_model(name: str, num_classes: int = 1000) -> ResNet:
    if name not in MODELS:
        raise UserError(f"--model {name!r}: choose one of {', '.join(MODELS)}")
    return MODELS[name](num_classes)


def _policy_head(dim: int, out: int) -> nn.Sequential:
    """h(.) of Fig. 4: Linear-BN-ReLU x2, then a projection to one value per grid cell (the authors' layout)."""
    return nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(True),
                         nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(True), nn.Linear(dim, out))


class PolicyNet(nn.Module):
    """The policy of eq. 2: trunk g(.) (`fe`) and two heads (`alpha`, `beta`), keys as in the authors' code.
    forward returns the raw head outputs (a, b), each (B, G*G); the EMA mixing of eq. 10 is done by the caller,
    so each head runs exactly once per step (the authors ran them twice, updating BatchNorm statistics twice)."""

    def __init__(self, grid: int, trunk: str = "resnet10t"):
        super().__init__()
        self.grid = grid
        self.fe = build_model(trunk, num_classes=0)
        d = self.fe.num_features
        self.alpha = _policy_head(d, grid * grid)
        self.beta = _policy_head(d, grid * grid)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.fe(x)                                     # (B, 512)
        return self.alpha(f), self.beta(f)                 # (B, G*G) each


def guess_architecture(state_dict: dict) -> str | None:
    """Which of our ResNets a classifier state_dict belongs to, from its key layout; None if none."""
    keys = set(state_dict)
    if "conv1.6.weight" in keys and "layer1.0.conv2.weight" in keys and "layer1.1.conv1.weight" not in keys:
        return "resnet10t"
    if "conv1.weight" in keys and "layer1.0.conv3.weight" in keys and "layer3.5.conv1.weight" in keys \
            and "layer3.6.conv1.weight" not in keys:
        return "resnet50"
    if "conv1.weight" in keys and "layer1.1.conv2.weight" in keys and "layer1.0.conv3.weight" not in keys \
            and "layer1.2.conv1.weight" not in keys:
        return "resnet18"
    return None


# =====================================================================================================================
#  Data: image decoding, ImageFolder, MedMNIST .npz, the built-in synthetic scans, transforms, samplers
# =====================================================================================================================

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm")


def to_8bit(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit L (greyscale) or RGB. 16/32-bit integer and float images are scaled by their own
    min..max range to 0..255 (never clipped: medical PNGs often use 12 of 16 bits); alpha is dropped; palettes are
    expanded. In float images the range is taken over the finite pixels; NaN and -inf pixels become 0, +inf 255."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        finite = a[np.isfinite(a)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        a = np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo)
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        return Image.fromarray(np.round(a).astype(np.uint8), mode="L")
    if img.mode in ("L", "RGB"):
        return img
    if img.mode in ("LA", "1"):
        return img.convert("L")
    return img.convert("RGBA").convert("RGB") if img.mode in ("P", "PA") else img.convert("RGB")


def to_rgb8(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (greyscale replicated), by to_8bit's rules."""
    return to_8bit(img).convert("RGB")


def load_image(path: str) -> torch.Tensor:
    """Decode an image file to a (3, H, W) uint8 tensor."""
    with Image.open(path) as img:
        img.load()
        rgb = to_rgb8(img)
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()


@contextlib.contextmanager
def cpu_rng(seed: int):
    """torch's CPU random stream seeded with `seed` inside the block and restored after it. The CPU generator only:
    torch.manual_seed would also reseed every GPU's generator (unrestored, and the same on every rank), and costs
    ~0.5 ms a call (it records a stack trace for CUDA's lazy init) -- a third of a loader worker's time per image."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(seed))
        yield


def sample_seed(seed: int, epoch: int, index: int, stream: int = 0) -> int:
    """A well-mixed 63-bit seed that is a function of (stream, seed, epoch, index) only. Stream 0 seeds one sample's
    augmentation, so results do not depend on the number of loader workers or on where a run was stopped and
    resumed; 1 the epoch's shuffle, 2 a batch's MixUp/CutMix, 3 the noisy evaluation."""
    state = np.random.SeedSequence([stream, seed, epoch, index]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class AugmentedDataset(torch.utils.data.Dataset):
    """Base of our data sets: subclasses decode sample i to a (3, H, W) uint8 tensor; this applies the transform with
    the torch RNG seeded from (seed, epoch, i) when indexed with (epoch, i) (see TrainSampler), else unseeded.
    With skip_bad, an unreadable sample is reported, counted in `bad_count` (shared by loader workers) and yields
    None, which `collate_skip_none` drops."""

    skip_hint = ", or pass --skip-bad-images"      # how the tool reading the data skips an unreadable file

    def __init__(self, transform=None, seed: int = 0, skip_bad: bool = False):
        self.transform, self.seed, self.skip_bad = transform, seed, skip_bad
        self.bad_count = torch.multiprocessing.Value("i", 0) if skip_bad else None
        self.targets: list[int] = []

    def __len__(self):
        return len(self.targets)

    def describe(self, i: int) -> str:
        return f"sample {i}"

    def decode(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (None, key)
        try:
            img = self.decode(i)
        except Exception as e:  # noqa: BLE001 - any decoder failure is the same user-facing problem
            if not self.skip_bad:
                raise UserError(f"cannot read {self.describe(i)} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                f"fix or delete it{self.skip_hint}") from None
            with self.bad_count.get_lock():
                self.bad_count.value += 1
            print(f"warning: skipped unreadable {self.describe(i)} ({type(e).__name__})", file=sys.stderr, flush=True)
            return None
        if self.transform is not None:
            if epoch is None:
                img = self.transform(img)
            else:
                with cpu_rng(sample_seed(self.seed, epoch, i)):
                    img = self.transform(img)
        return img, self.targets[i]


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def scan_images(folder: str, root: str, seen_dirs: dict[str, str], linked_files: dict[str, str]) -> list[str]:
    """The image files under folder, following symbolic links, but never out of root (the split folder), never into
    a folder twice (a link loop, or two ways to one folder) and never to one file twice. Breaking one of these is a
    UserError naming the link. seen_dirs (real path -> path) and linked_files (a file link's real target -> the link)
    are shared by every class of a split, so a file reached from two classes is caught as well."""
    real_root = os.path.realpath(root)
    files, stack = [], [folder]
    while stack:
        d = stack.pop()
        real = os.path.realpath(d)
        if not _inside(real, real_root):
            raise UserError(f"{d} is a symbolic link out of {root} (to {real}): splits must not share or borrow "
                            f"images; copy them in or point --data-path at the real tree")
        if real in seen_dirs:
            raise UserError(f"{d} is the folder {seen_dirs[real]} again (a symbolic link loop, or two links to one "
                            f"folder): remove the link")
        seen_dirs[real] = d
        try:
            entries = list(os.scandir(d))
        except OSError as e:
            raise UserError(f"cannot list {d} ({e.strerror or type(e).__name__})") from None
        for e in entries:
            try:
                is_dir = e.is_dir()
            except OSError:
                is_dir = False
            if is_dir and not e.name.startswith("."):       # .ipynb_checkpoints, .git, ...
                stack.append(e.path)
            elif e.name.lower().endswith(IMG_EXTENSIONS) and not e.name.startswith("."):  # ._x.png: macOS metadata
                if e.is_symlink() and os.path.exists(e.path):   # a broken link stays in: decoding reports it
                    target = os.path.realpath(e.path)
                    if not _inside(target, real_root):
                        raise UserError(f"{e.path} is a symbolic link out of {root} (to {target}): splits must not "
                                        f"share or borrow images; copy it in or point --data-path at the real tree")
                    if target in linked_files:
                        raise UserError(f"{e.path} and {linked_files[target]} are links to the same file {target}: "
                                        f"remove one")
                    linked_files[target] = e.path
                files.append(e.path)
    return files


class ImageFolderDataset(AugmentedDataset):
    """root/<class>/**/<image>; classes sorted by name (torchvision's ImageFolder order)."""

    def __init__(self, root: str, transform=None, seed: int = 0, skip_bad: bool = False, classes=None):
        super().__init__(transform, seed, skip_bad)
        self.root = root
        if not os.path.isdir(root):
            raise UserError(f"data folder {root} does not exist: --data-path needs train/ and val/ class folders")
        found = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
        if not found:
            raise UserError(f"{root} has no class folders: put the images of each class in {root}/<class>/")
        self.classes = list(classes) if classes is not None else found
        extra = sorted(set(found) - set(self.classes))
        if extra:
            raise UserError(f"{root} has class folder(s) {extra[:3]} that train/ does not have: splits must share classes")
        self.samples: list[tuple[str, int]] = []
        seen_dirs: dict[str, str] = {}
        linked_files: dict[str, str] = {}
        for k, name in enumerate(self.classes):
            folder = os.path.join(root, name)
            files = sorted(scan_images(folder, root, seen_dirs, linked_files)) if os.path.isdir(folder) else []
            if not files and folder in (os.path.join(root, c) for c in found):
                raise UserError(f"class folder {folder} has no images ({', '.join(IMG_EXTENSIONS)}): "
                                f"add images or remove the folder")
            self.samples += [(p, k) for p in files]
        for real, path in linked_files.items():     # a link to a file that is also counted where it lies
            if os.path.dirname(real) in seen_dirs and real.lower().endswith(IMG_EXTENSIONS):
                twin = os.path.join(seen_dirs[os.path.dirname(real)], os.path.basename(real))
                raise UserError(f"{path} is a symbolic link to {twin}, which is counted already: remove the link")
        self.targets = [t for _, t in self.samples]

    def describe(self, i):
        return f"image {self.samples[i][0]}"

    def decode(self, i):
        return load_image(self.samples[i][0])


class ArrayDataset(AugmentedDataset):
    """In-memory uint8 images (N, H, W) or (N, H, W, 3) with integer labels: MedMNIST and the synthetic scans."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str], transform=None, seed: int = 0,
                 name: str = "array"):
        super().__init__(transform, seed)
        self.images, self.classes, self.name = images, classes, name
        self.targets = [int(t) for t in labels]

    def describe(self, i):
        return f"{self.name}[{i}]"

    def decode(self, i):
        a = torch.from_numpy(np.ascontiguousarray(self.images[i]))
        return a.expand(3, *a.shape) if a.ndim == 2 else a.permute(2, 0, 1)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: SIGTERM and SIGINT are for the training process, which finishes its step, writes a
    checkpoint and then shuts its workers down. scancel and a SLURM time limit signal the whole process group; a
    worker killed by it would end the run ('DataLoader worker exited unexpectedly') before that checkpoint."""
    import signal
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def collate_skip_none(batch):
    """default_collate without the samples that --skip-bad-images dropped."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.utils.data.default_collate(batch)


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Seeded per-class shuffle cut into len(fractions) parts; every part gets round(n_c * f) of class c, the first
    part the rest. Returns sorted index arrays."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in fractions]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        counts = [int(round(len(idx) * f)) for f in fractions[1:]]
        first = len(idx) - sum(counts)
        bounds = np.cumsum([first] + counts)
        for k, chunk in enumerate(np.split(idx, bounds[:-1])):
            parts[k] += chunk.tolist()
    return [np.array(sorted(p), dtype=np.int64) for p in parts]


def npz_labels(labels: np.ndarray, path: str, split: str) -> np.ndarray:
    """A label array as int64 (N,) or (N, L), or a UserError naming the file and split: labels must be integers, or
    floats holding whole numbers; NaN, fractions, strings, objects and 0-d arrays are refused, as are negatives."""
    where = f"{path}: {split}_labels" if split else f"{path}: labels"
    if labels.ndim == 0 or labels.ndim > 2:
        raise UserError(f"{where} must be an array of shape (N,) or (N, L), got shape {labels.shape}")
    if labels.dtype == np.bool_ or np.issubdtype(labels.dtype, np.integer):
        out = labels.astype(np.int64)
    elif np.issubdtype(labels.dtype, np.floating):
        bad = ~np.isfinite(labels) | (labels != np.round(labels))
        if bad.any():
            raise UserError(f"{where} must be whole numbers, found {labels[bad].flat[0]!r} "
                            f"({int(bad.sum())} such values)")
        out = labels.astype(np.int64)
    else:
        raise UserError(f"{where} must be integers, got dtype {labels.dtype}")
    if out.size and out.min() < 0:
        raise UserError(f"{where} must be >= 0, found {int(out.min())}")
    return out


def load_npz(path: str, val_split: float = 0.1, seed: int = 0) -> dict:
    """MedMNIST .npz -> {'train'|'val'|'test': (images uint8, labels int64 (N,) or (N, L))}. Either the official layout
    ({split}_images, {split}_labels) or a merged one (images, labels), split here by a seeded stratified split.
    Every split must be non-empty; labels are checked by npz_labels."""
    if os.path.isdir(path):
        raise UserError(f"--data-path {path} is a folder without train/ and val/: give an ImageFolder root or a .npz")
    if not os.path.isfile(path):
        raise UserError(f"--data-path {path} does not exist")

    def get(key):
        try:
            return np.asarray(npz[key])
        except Exception as e:  # noqa: BLE001 - object arrays (pickles are refused), a damaged member, ...
            raise UserError(f"cannot read {key} from {path} ({type(e).__name__}: {str(e).splitlines()[0][:120]}): "
                            f"store numeric arrays (np.savez without dtype=object)") from None
    try:
        npz = np.load(path, allow_pickle=False)
        keys = set(npz.files)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot read {path} as .npz ({type(e).__name__}): pass a MedMNIST .npz file") from None
    out = {}
    if {"train_images", "train_labels"} <= keys:
        for split in ("train", "val", "test"):
            if f"{split}_images" in keys:
                if f"{split}_labels" not in keys:
                    raise UserError(f"{path} has {split}_images but no {split}_labels")
                out[split] = (get(f"{split}_images"), npz_labels(get(f"{split}_labels"), path, split))
        if "val" not in out:
            raise UserError(f"{path} has no val_images/val_labels: MedMNIST files carry train_*, val_*, test_*")
    elif {"images", "labels"} <= keys:
        images, labels = get("images"), npz_labels(get("labels"), path, "")
        if labels.ndim == 0 or images.ndim == 0 or len(labels) != len(images):
            raise UserError(f"{path} has {len(images) if images.ndim else 0} images but "
                            f"{len(labels) if labels.ndim else 0} labels")
        flat = labels.reshape(len(labels), -1)
        strat = flat[:, 0] if flat.shape[1] == 1 else np.zeros(len(labels), dtype=np.int64)
        tr, va, te = stratified_split(strat, (1 - 2 * val_split, val_split, val_split), seed)
        if len(va) == 0 or len(te) == 0:
            raise UserError(f"{path}: {len(labels)} images split at --val-split {val_split} leave the val/test split "
                            f"empty (round(images per class x {val_split}) is 0 for every class): raise --val-split "
                            f"or use more images")
        out = {"train": (images[tr], labels[tr]), "val": (images[va], labels[va]), "test": (images[te], labels[te])}
    else:
        raise UserError(f"{path} has keys {sorted(keys)}; expected train_images/train_labels/val_images/val_labels"
                        f"[/test_*] (MedMNIST) or images/labels (merged)")
    for split, (images, labels) in out.items():
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
            raise UserError(f"{path}: {split} images must be uint8 N*H*W or N*H*W*3, got {images.dtype} {images.shape}")
        if len(labels) != len(images):
            raise UserError(f"{path}: {split} has {len(images)} images but {len(labels)} labels")
        if len(images) == 0:
            raise UserError(f"{path}: the {split} split has no images")
    return out


# --- the built-in synthetic scans ------------------------------------------------------------------------------------
# Classes are modality x anatomy x finding. Each modality has its own intensity look-up table and noise model, so the
# low-level heterogeneity the paper targets (Fig. 1: brightness, contrast, noise differ by modality) is present:
# CT low Gaussian noise on a dark background; MR Rician noise with a smooth bias field; ultrasound speckle inside a
# fan with burned-in text; X-ray a blurred projection-like image filling the frame.

SYN_MODALITIES = ("CT", "MR", "US", "XR")
SYN_SEEN_ANATOMY = ("head", "chest", "abdomen")
SYN_UNSEEN_ANATOMY = ("knee", "spine")   # "unseen concepts" for evaluate.py: no class overlaps the seen ones
SYN_FINDINGS = ("normal", "lesion")
AIR, FAT, SOFT, BONE, FLUID, LESION, ORGAN = range(7)
SYN_LUT = {  # tissue intensity in [0, 1] for AIR, FAT, SOFT, BONE, FLUID, LESION, ORGAN
    "CT": (0.00, 0.22, 0.42, 0.95, 0.06, 0.66, 0.52),
    "MR": (0.00, 0.88, 0.45, 0.12, 0.28, 0.80, 0.60),
    "US": (0.00, 0.35, 0.52, 0.90, 0.04, 0.16, 0.42),
    "XR": (0.00, 0.25, 0.40, 1.00, 0.05, 0.60, 0.45),   # attenuation, projected below
}


def synthetic_classes(unseen: bool = False) -> list[str]:
    anatomy = SYN_UNSEEN_ANATOMY if unseen else SYN_SEEN_ANATOMY
    return [f"{m}__{a}__{f}" for m in SYN_MODALITIES for a in anatomy for f in SYN_FINDINGS]


def _gauss_matrix(n: int, sigma: float) -> np.ndarray:
    x = np.arange(n)
    g = np.exp(-0.5 * ((x[:, None] - x[None, :]) / sigma) ** 2)
    return g / g.sum(1, keepdims=True)


def _ellipse(x, y, cx, cy, rx, ry):
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0


def _tissue_map(anatomy: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    t = np.full(x.shape, AIR, dtype=np.int64)
    if anatomy == "head":
        t[_ellipse(x, y, 0, 0, 0.78, 0.9)] = BONE
        t[_ellipse(x, y, 0, 0, 0.70, 0.82)] = SOFT
        t[_ellipse(x, y, -0.12, -0.05, 0.08, 0.25) | _ellipse(x, y, 0.12, -0.05, 0.08, 0.25)] = FLUID
    elif anatomy == "chest":
        t[_ellipse(x, y, 0, 0.05, 0.92, 0.66)] = FAT
        t[_ellipse(x, y, 0, 0.05, 0.85, 0.60)] = SOFT
        t[_ellipse(x, y, -0.40, 0.0, 0.30, 0.45) | _ellipse(x, y, 0.40, 0.0, 0.30, 0.45)] = FLUID
        t[_ellipse(x, y, 0.08, 0.12, 0.18, 0.20)] = ORGAN
        t[_ellipse(x, y, 0, 0.50, 0.10, 0.09)] = BONE
    elif anatomy == "abdomen":
        t[_ellipse(x, y, 0, 0, 0.92, 0.72)] = FAT
        t[_ellipse(x, y, 0, 0, 0.80, 0.62)] = SOFT
        t[_ellipse(x, y, -0.35, -0.12, 0.36, 0.30)] = ORGAN
        t[_ellipse(x, y, -0.30, 0.30, 0.10, 0.14) | _ellipse(x, y, 0.30, 0.30, 0.10, 0.14)] = ORGAN
        t[_ellipse(x, y, 0, 0.45, 0.11, 0.10)] = BONE
    elif anatomy == "knee":
        t[_ellipse(x, y, 0, 0, 0.55, 0.98)] = SOFT
        t[_ellipse(x, y, 0, -0.52, 0.26, 0.44)] = BONE
        t[_ellipse(x, y, 0, 0.55, 0.22, 0.40)] = BONE
        t[_ellipse(x, y, 0, 0.03, 0.24, 0.05)] = FLUID
    elif anatomy == "spine":
        t[(np.abs(x) < 0.6) & (np.abs(y) < 0.98)] = SOFT
        for k in range(5):
            cy = -0.8 + 0.4 * k
            t[(np.abs(x) < 0.22) & (np.abs(y - cy) < 0.14)] = BONE
            t[(np.abs(x) < 0.20) & (np.abs(y - cy - 0.2) < 0.04)] = FLUID
    else:
        raise ValueError(anatomy)
    return t


def synthetic_scan(modality: str, anatomy: str, finding: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One procedurally generated 'scan' (size x size uint8) of the given class."""
    lin = np.linspace(-1, 1, size)
    y0, x0 = np.meshgrid(lin, lin, indexing="ij")
    th, s = rng.uniform(-0.25, 0.25), rng.uniform(0.85, 1.1)
    dx, dy = rng.uniform(-0.08, 0.08, 2)
    x = (np.cos(th) * x0 + np.sin(th) * y0) / s + dx
    y = (-np.sin(th) * x0 + np.cos(th) * y0) / s + dy
    t = _tissue_map(anatomy, x, y)
    if finding == "lesion":
        inside = np.flatnonzero(np.isin(t, (SOFT, ORGAN)))
        c = inside[rng.integers(len(inside))]
        r = rng.uniform(0.10, 0.16)
        t[_ellipse(x, y, x.flat[c], y.flat[c], r, r * rng.uniform(0.8, 1.25)) & (t != AIR) & (t != BONE)] = LESION
    lut = np.asarray(SYN_LUT[modality]) * rng.uniform(0.9, 1.1)
    img = lut[t]
    g = _gauss_matrix(size, 0.6)
    img = g @ img @ g.T
    if modality == "CT":
        img = img + rng.normal(0, 0.015, img.shape)
    elif modality == "MR":
        a = rng.uniform(0, 2 * np.pi)
        img = img * (1 + 0.3 * (np.cos(a) * x0 + np.sin(a) * y0))                       # bias field
        img = np.hypot(img + rng.normal(0, 0.04, img.shape), rng.normal(0, 0.04, img.shape))  # Rician
    elif modality == "US":
        img = img * rng.gamma(2.0, 0.5, img.shape)                                      # speckle, mean 1
        img = _gauss_matrix(size, 0.7) @ img @ _gauss_matrix(size, 0.7).T
        r = np.hypot(x0, y0 + 1.15)
        ang = np.arctan2(x0, y0 + 1.15)
        img = img * ((np.abs(ang) < 0.75) & (r > 0.35) & (r < 2.1))                     # fan
        cols = 2 + 4 * np.arange(rng.integers(3, 6))
        for c0 in cols:                                                                  # burned-in text
            glyph = rng.random((5, 3)) < 0.55
            img[2:7, c0:c0 + 3][glyph] = 1.0
    elif modality == "XR":
        gb = _gauss_matrix(size, 2.0)
        img = 1 - np.exp(-2.5 * (gb @ img @ gb.T)) + 0.08 * (y0 + 1)
        img = img + rng.normal(0, 0.01, img.shape)
    return np.clip(img * 255, 0, 255).round().astype(np.uint8)


def synthetic_arrays(per_class: int, size: int, seed: int, split: str,
                     unseen: bool = False) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A deterministic class-balanced split of the synthetic set: (N, size, size) uint8, (N,) labels, class names."""
    classes = synthetic_classes(unseen)
    split_id = {"train": 0, "val": 1, "test": 2}[split] + (10 if unseen else 0)
    n = per_class * len(classes)
    images = np.empty((n, size, size), dtype=np.uint8)
    labels = np.arange(n) % len(classes)
    for i in range(n):
        modality, anatomy, finding = classes[labels[i]].split("__")
        images[i] = synthetic_scan(modality, anatomy, finding, size, np.random.default_rng([seed, split_id, i]))
    return images, labels, classes


# --- transforms and samplers -----------------------------------------------------------------------------------------

def build_transform(cfg: Config, train: bool):
    """torchvision.transforms.v2 on uint8 tensors: train RandomResizedCrop + hflip [+ auto-augment], eval resize +
    centre crop; then float in [0, 1] and normalisation with the RadImageNet mean/std on all three channels."""
    from torchvision.transforms import v2
    interp = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC,
              "nearest": v2.InterpolationMode.NEAREST}[cfg.interpolation]
    if train:
        t = [v2.RandomResizedCrop(cfg.train_crop_size, scale=(cfg.crop_scale_min, 1.0), interpolation=interp,
                                  antialias=True),
             v2.RandomHorizontalFlip(0.5)]
        if cfg.auto_augment == "ra":
            t.append(v2.RandAugment(interpolation=interp, magnitude=cfg.ra_magnitude))
        elif cfg.auto_augment == "ta_wide":
            t.append(v2.TrivialAugmentWide(interpolation=interp))
        elif cfg.auto_augment == "augmix":
            t.append(v2.AugMix(interpolation=interp, severity=cfg.augmix_severity))
        elif cfg.auto_augment is not None:
            t.append(v2.AutoAugment(v2.AutoAugmentPolicy(cfg.auto_augment), interpolation=interp))
    else:
        t = [v2.Resize(cfg.val_resize_size, interpolation=interp, antialias=True), v2.CenterCrop(cfg.val_crop_size)]
    t += [v2.ToDtype(torch.float32, scale=True), v2.Normalize([cfg.mean] * 3, [cfg.std] * 3)]
    return v2.Compose(t)


class TrainSampler(torch.utils.data.Sampler):
    """Seeded shuffle per epoch, split over ranks like DistributedSampler(drop_last) so every rank runs the same number
    of full batches, and resumable: `set_epoch(e, start_batch)` skips the batches already trained on.
    Yields (epoch, index) keys so the data set can seed each sample's augmentation (AugmentedDataset)."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0, shuffle: bool = True):
        self.n, self.batch_size, self.rank, self.world, self.seed, self.shuffle = n, batch_size, rank, world, seed, shuffle
        self.epoch, self.start_batch = 0, 0
        self.batches_per_epoch = (n // world) // batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0):
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self):
        return (self.batches_per_epoch - self.start_batch) * self.batch_size

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, 0, stream=1))
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        mine = order[self.rank::self.world][: self.batches_per_epoch * self.batch_size]
        for i in mine[self.start_batch * self.batch_size:].tolist():
            yield (self.epoch, i)


class EvalSampler(torch.utils.data.Sampler):
    """Rank r evaluates samples r, r+W, r+2W, ...: no padding, so after gathering every sample counts exactly once."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        self.indices = list(range(rank, n, world))

    def __len__(self):
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


def build_datasets(cfg: Config) -> dict:
    """{'train', 'val', 'test' (or None), 'classes'} from --data-path: an ImageFolder root, a MedMNIST .npz, or
    (no path) the built-in synthetic scans."""
    t_train, t_eval = build_transform(cfg, True), build_transform(cfg, False)
    path = cfg.data_path
    if path is None:
        out = {}
        for split, n in (("train", cfg.synthetic_per_class), ("val", max(1, cfg.synthetic_per_class // 4)),
                         ("test", max(1, cfg.synthetic_per_class // 4))):
            images, labels, classes = synthetic_arrays(n, cfg.synthetic_size, cfg.seed, split)
            out[split] = ArrayDataset(images, labels, classes, t_train if split == "train" else t_eval, cfg.seed,
                                      name=f"synthetic-{split}")
        out["classes"] = classes
        return out
    if not os.path.exists(path):
        raise UserError(f"--data-path {path} does not exist: give an ImageFolder root (train/, val/) or a .npz file")
    if os.path.isfile(path):
        if not path.endswith(".npz"):
            raise UserError(f"--data-path {path}: a file must be a MedMNIST .npz; a folder must hold train/ and val/")
        splits = load_npz(path, cfg.val_split, cfg.seed)
        labels_train = splits["train"][1]
        if labels_train.ndim == 2 and labels_train.shape[1] > 1:
            raise UserError(f"{path} is multi-label ({labels_train.shape[1]} labels per image, e.g. ChestMNIST): "
                            f"pgnm.py trains single-label classifiers; use evaluate.py for multi-label probes")
        n_classes = int(max(int(s[1].max()) for s in splits.values()) + 1)
        classes = [str(k) for k in range(n_classes)]
        out = {"classes": classes, "test": None}
        for split, (images, labels) in splits.items():
            out[split] = ArrayDataset(images, labels.reshape(len(labels)), classes,
                                      t_train if split == "train" else t_eval, cfg.seed,
                                      name=f"{os.path.basename(path)}:{split}")
        return _check_splits(out, path)
    if not os.path.isdir(os.path.join(path, "train")) or not os.path.isdir(os.path.join(path, "val")):
        raise UserError(f"--data-path {path} must contain train/ and val/ class folders (see refine_radimagenet.py)")
    reals = {s: os.path.realpath(os.path.join(path, s)) for s in ("train", "val", "test")
             if os.path.isdir(os.path.join(path, s))}
    for s1 in reals:
        for s2 in reals:
            if s1 != s2 and _inside(reals[s1], reals[s2]):
                raise UserError(f"{os.path.join(path, s1)} lies inside {os.path.join(path, s2)} (through a symbolic "
                                f"link): splits must not share images")
    train = ImageFolderDataset(os.path.join(path, "train"), t_train, cfg.seed, cfg.skip_bad_images)
    out = {"train": train, "classes": train.classes, "test": None}
    for split in ("val", "test"):
        folder = os.path.join(path, split)
        if os.path.isdir(folder):
            out[split] = ImageFolderDataset(folder, t_eval, cfg.seed, cfg.skip_bad_images, classes=train.classes)
    return _check_splits(out, path)


def _check_splits(out: dict, path: str) -> dict:
    """Refuse what would train or evaluate nothing: an empty split, or a training set with a single class."""
    for split in ("train", "val", "test"):
        if out.get(split) is not None and len(out[split]) == 0:
            raise UserError(f"{path}: the {split} split has no images")
    present = sorted(set(out["train"].targets))
    if len(present) < 2:
        raise UserError(f"{path}: the train split has images of one class only ({out['classes'][present[0]]!r}): "
                        f"a classifier needs at least two")
    return out


def data_fingerprint(train: AugmentedDataset, classes: Sequence[str]) -> dict:
    """What a checkpoint remembers of its training data, so a resume on other data is refused rather than trained
    with permuted labels or another split: the class names, the number of training images and a hash of the labels
    with the images' relative paths (a folder) or a sample of their pixels (arrays: a merged .npz split by --seed)."""
    h = hashlib.sha256("\n".join(classes).encode())
    h.update(np.asarray(train.targets, dtype=np.int64).tobytes())
    if isinstance(train, ImageFolderDataset):
        h.update("\n".join(os.path.relpath(p, train.root) for p, _ in train.samples).encode())
    elif isinstance(train, ArrayDataset):
        h.update(np.ascontiguousarray(train.images[::max(1, len(train.images) // 1000)]).tobytes())
    return {"classes": list(classes), "train_images": len(train), "sha256": h.hexdigest()[:16]}


def check_same_data(saved: dict | None, now: dict, source: str) -> None:
    """A UserError naming what changed when `now` (data_fingerprint of this run) is not the checkpoint's data."""
    if not saved or not now or saved == now:
        return
    hint = "resume on the data the run started with, or start afresh in another --output-dir"
    if saved["classes"] != now["classes"]:
        diff = next((f"class {i} was {a!r}, now {b!r}" for i, (a, b) in enumerate(zip(saved["classes"], now["classes"]))
                     if a != b), f"{len(saved['classes'])} classes then, {len(now['classes'])} now")
        raise UserError(f"{source} was trained on other classes ({diff}): the labels would be permuted; {hint}")
    raise UserError(f"{source} was trained on other training data ({saved['train_images']} images then, "
                    f"{now['train_images']} now{', other images or split' if saved['train_images'] == now['train_images'] else ''}"
                    f"): {hint}")


def build_mixup(cfg: Config, num_classes: int):
    """MixUp / CutMix from torchvision.transforms.v2 (one of the two per batch when both are on), or None."""
    from torchvision.transforms import v2
    ops = []
    if cfg.mixup_alpha > 0:
        ops.append(v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes))
    if cfg.cutmix_alpha > 0:
        ops.append(v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes))
    if not ops:
        return None
    return ops[0] if len(ops) == 1 else v2.RandomChoice(ops)


# =====================================================================================================================
#  Distributed
# =====================================================================================================================


@dataclass
class DistInfo:
    """This process's place in the run: its rank, the number of processes, and its device."""
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or SLURM (SLURM_PROCID,
    SLURM_NTASKS, SLURM_LOCALID) variables; (0, 1, 0) for a plain process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def resolve_device(spec: str | None, local_rank: int = 0, world: int = 1) -> torch.device:
    """--device as a torch.device that always carries an index on CUDA (torch.cuda.set_device refuses a bare 'cuda').

    None: cuda when a GPU is visible, else cpu. 'cuda': this process's GPU, i.e. its local rank in a multi-process run,
    else GPU 0. 'cuda:N': GPU N of the visible ones (numbered after CUDA_VISIBLE_DEVICES), single process only: with
    several processes each takes the GPU of its LOCAL_RANK, so an explicit index is refused there, on every rank."""
    text = str(spec).strip().lower() if spec is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    m = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", text)
    if m is None or (m.group(1) == "cpu" and m.group(2) is not None):
        raise UserError(f"--device {spec!r}: use cpu, cuda or cuda:N")
    if m.group(1) == "cpu":
        return torch.device("cpu")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    seen = f"CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "CUDA_VISIBLE_DEVICES unset"
    if not torch.cuda.is_available():
        raise UserError(f"--device {text} but no CUDA GPU is visible ({seen}): pass --device cpu")
    n = torch.cuda.device_count()
    if world > 1:
        if m.group(2) is not None:
            raise UserError(f"--device {text} in a run of {world} processes: each process takes the GPU of its "
                            f"LOCAL_RANK; pass --device cuda (or none) and choose GPUs with CUDA_VISIBLE_DEVICES")
        index = local_rank
        if index >= n:
            raise UserError(f"LOCAL_RANK {local_rank} but only {n} GPU(s) are visible ({seen}): start at most {n} "
                            f"processes per node (torchrun --nproc_per_node {n})")
    else:
        index = int(m.group(2) or 0)
        if index >= n:
            raise UserError(f"--device {text} but only {n} GPU(s) are visible, cuda:0 to cuda:{n - 1} ({seen})")
    return torch.device("cuda", index)


def setup_distributed(device: str | None = None) -> DistInfo:
    """Read torchrun or SLURM variables (dist_env), pick this process's device (resolve_device) and join the process
    group: NCCL on GPU, gloo on CPU. A single process is world size 1 with no process group."""
    env = os.environ
    rank, world, local = dist_env()
    if world > 1 and not ("RANK" in env and "WORLD_SIZE" in env):     # SLURM: srun sets no rendezvous address
        env.setdefault("MASTER_PORT", "29500")
        if "MASTER_ADDR" not in env:
            raise UserError("SLURM run without MASTER_ADDR: export MASTER_ADDR=$(scontrol show hostnames "
                            "$SLURM_JOB_NODELIST | head -n 1) in the batch script")
    dev = resolve_device(device, local, world)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    info = DistInfo(rank, world, dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world,
                                **({"device_id": dev} if dev.type == "cuda" else {}))
    return info


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_MALLOC_TUNED = False


def tune_cpu_allocator(log=print) -> bool:
    """Raise glibc's mmap and trim thresholds to 1 GiB, once per process (Linux/glibc only).

    With glibc's defaults every activation buffer above the (at most 32 MiB) mmap threshold is mapped and unmapped
    on each step, and its pages are faulted in and zeroed again: on a 2-core CPU a heated step took ~2.4M page
    faults and ran 7% slower than its two networks' steps apart. CUDA needs no such thing (it caches)."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED or not sys.platform.startswith("linux"):
        return _MALLOC_TUNED
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        ok = all(libc.mallopt(k, v) == 1 for k, v in ((m_mmap_threshold, 1 << 30), (m_trim_threshold, 1 << 30),
                                                       (m_top_pad, 64 << 20)))
    except (OSError, AttributeError):
        ok = False
    if ok:
        _MALLOC_TUNED = True
        log("CPU allocator: glibc mmap/trim thresholds raised to 1 GiB (freed activations are reused; "
            "--no-malloc-tuning keeps the defaults)")
    return ok


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of t over ranks (t itself with one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def average_buffers(module: nn.Module | None) -> None:
    """Mean of the floating-point buffers (BatchNorm running statistics) over ranks. DDP copies rank 0's buffers at
    the start of each forward only, so after the last step every rank holds its own; averaging at the epoch's end
    makes every rank evaluate and save the same model, with statistics from all ranks' batches."""
    if module is None or not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    for b in module.buffers():
        if b.is_floating_point():
            dist.all_reduce(b)
            b /= dist.get_world_size()


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate tensors of different lengths (dim 0) from all ranks, in rank order."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    m = int(max(s.item() for s in sizes))
    padded = torch.zeros((m, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    out = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)])


# =====================================================================================================================
#  Checkpoints
# =====================================================================================================================

CHECKPOINT = "checkpoint.pth"
CHECKPOINT_PREV = "checkpoint_prev.pth"
CONFIG_JSON = "config.json"
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_prefixes(state_dict: dict) -> dict:
    """Drop DDP ('module.') and torch.compile ('_orig_mod.') prefixes, in any order and number."""
    out = {}
    for k, v in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in WRAPPER_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """The raw module under DDP and/or torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def load_failure(path: str, e: BaseException) -> str:
    """Why torch.load could not read `path`, in words (for one-line errors): an empty file, a file that is not a
    PyTorch file at all (torch.save writes a zip, older torch a pickle), objects that weights_only refuses, or the
    exception's first line. Never the advice to load with weights_only=False that torch's own message gives."""
    with contextlib.suppress(OSError):
        with open(path, "rb") as fh:
            head = fh.read(4)
        if not head:
            return "the file is empty"
        if head[:2] != b"PK" and head[:1] != b"\x80":
            return "not a PyTorch file: torch.save writes a zip archive"
    text = str(e).strip()
    if "Weights only load failed" in text:
        return "it holds objects other than tensors and plain data, which are never loaded (weights_only=True)"
    return f"{type(e).__name__}: {text.splitlines()[0][:160]}" if text else type(e).__name__


def safe_load(path: str, map_location="cpu"):
    """torch.load with weights_only=True (no code runs from the file). argparse.Namespace, which the authors' and
    torchvision's checkpoints carry under 'args', is allowed as plain data."""
    if hasattr(torch.serialization, "safe_globals"):
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    return torch.load(path, map_location=map_location, weights_only=True)


TEMP_FILE = re.compile(r"^(checkpoint\.pth|checkpoint_prev\.pth|model_[a-z]+(_avg\d+)?\.pth|log\.jsonl|config\.json|"
                       r"curves\.png|masks_epoch\d+\.png)\.tmp\.\d+$")     # write_atomic's temp files of a run


def _create_new(path: str) -> int:
    """Open a file that did not exist, for writing, never through a symbolic link; a leftover one is removed first."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        return os.open(path, flags, 0o666)  # less the umask, as open() gives
    except FileExistsError:
        os.unlink(path)                      # unlink removes a planted link itself, never its target
        return os.open(path, flags, 0o666)


def write_atomic(path: str, data: bytes, keep_previous: str | None = None, then: str = "resume with --resume auto"
                 ) -> None:
    """Write to a fresh temp file, fsync, then os.replace: a reader never sees a half-written file, and a symbolic link
    at `path` is replaced, its target untouched. With keep_previous, the old file is first moved there, so a complete
    file exists at every instant. A failed write (disk full, quota, a folder in the way, ...) removes the temp file,
    leaves the existing files as they were and raises UserError ending in 'free space or fix the folder, then <then>'.
    Every file the three tools write goes through here."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with os.fdopen(_create_new(tmp), "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if keep_previous and os.path.lexists(path):
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if not isinstance(e, OSError):
            raise
        kept = f"; {os.path.basename(path)} is as it was" if os.path.isfile(path) else ""
        raise UserError(f"cannot write {path} ({e.strerror or type(e).__name__}){kept}: free space or fix the "
                        f"folder, then {then}") from None
    with contextlib.suppress(OSError, AttributeError):   # make the renames durable (POSIX; not on Windows)
        dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def sha256_file(path: str) -> str:
    """The SHA-256 of a file's bytes, hex, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_save(obj, path: str, keep_previous: str | None = None, then: str = "resume with --resume auto") -> None:
    """torch.save through write_atomic (serialised in memory first, so a failed write is a plain OSError)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_atomic(path, buf.getbuffer(), keep_previous, then)


def nonfinite_tensors(obj, prefix: str = "") -> list[str]:
    """The names of the floating-point tensors (and floats) in a nested dict/list that hold a NaN or an inf."""
    found: list[str] = []
    tensors: list[tuple[str, torch.Tensor]] = []

    def walk(o, name):
        if isinstance(o, torch.Tensor):
            if o.is_floating_point() or o.is_complex():
                tensors.append((name, o))
        elif isinstance(o, float):
            if not math.isfinite(o):
                found.append(name)
        elif isinstance(o, dict):
            for k, v in o.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, f"{name}[{i}]")
    walk(obj, prefix)
    if tensors:
        ok = torch.stack([t.detach().isfinite().all().cpu() for _, t in tensors])     # one sync per device
        found += [name for (name, _), good in zip(tensors, ok.tolist()) if not good]
    return found


class CorruptCheckpoint(Exception):
    """A checkpoint file that exists but must not be used: truncated, a CRC mismatch, unpicklable, non-finite."""


def verify_and_load(path: str) -> dict:
    """Load a checkpoint after checking its integrity: every zip record's CRC-32 (torch.save writes a zip; torch.load
    itself does not check them, so flipped bits would load as garbage) and, for our keys, finite values."""
    import zipfile
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
            if bad is not None:
                raise CorruptCheckpoint(f"CRC mismatch in {bad}")
        obj = safe_load(path)
    except CorruptCheckpoint:
        raise
    except Exception as e:  # noqa: BLE001 - truncated zip, bad pickle, a refused global, ...
        raise CorruptCheckpoint(load_failure(path, e)) from None
    if isinstance(obj, dict):
        bad = nonfinite_tensors({k: obj.get(k) for k in ("model", "policy_net", "base_alpha", "base_beta",
                                                         "optimizer", "pol_optimizer") if k in obj})
        if bad:
            raise CorruptCheckpoint(f"non-finite values in {', '.join(bad[:3])}")
    return obj


def write_json_atomic(obj, path: str) -> None:
    """JSON text (indented, one trailing newline) through write_atomic (config.json)."""
    write_atomic(path, (json.dumps(obj, indent=1) + "\n").encode())


def load_classifier_weights(path: str, flag: str = "--finetune") -> dict:
    """A classifier state_dict from any of: our checkpoint.pth / model_<phase>.pth, the authors' checkpoints ('model'
    key, 'module.'/'_orig_mod.' prefixes), timm or torchvision weight files. Never runs code from the file."""
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder: give a weights file in it (model_<phase>.pth, checkpoint.pth)")
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path} does not exist")
    try:
        obj = safe_load(path)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot load weights from {flag} {path} ({load_failure(path, e)})") from None
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    policy = obj.get("policy_net") if isinstance(obj, dict) and isinstance(obj.get("policy_net"), dict) else obj
    if isinstance(policy, dict) and all(isinstance(k, str) for k in policy) \
            and {k.split(".")[0] for k in strip_prefixes(policy)} == {"fe", "alpha", "beta"}:    # PolicyNet's keys
        raise UserError(f"{path} holds the policy network's weights (PolicyNet), not a classifier's: give the heated "
                        f"run's model_heated.pth or checkpoint.pth")
    if obj == {}:
        raise UserError(f"{path} holds no weights (an empty state_dict): give the file a run wrote, model_<phase>.pth")
    odd = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))] \
        if isinstance(obj, dict) else []
    if not isinstance(obj, dict) or odd:
        k = odd[0] if odd else None
        what = (f"its key {k!r:.40} is not a name" if not isinstance(k, str) else
                f"its entry {k!r:.40} is a {type(obj[k]).__name__}, not a tensor") if odd else f"it is a {type(obj).__name__}"
        raise UserError(f"{path} holds no state_dict of tensors ({what}; expected a checkpoint with 'model' or raw "
                        f"weights)")
    return strip_prefixes(obj)


def average_state_dicts(state_dicts: Sequence[dict], names: Sequence[str] | None = None) -> dict:
    """The key-by-key mean of N state dicts, the authors' release step (their utils/weight_averaging.py averages the
    last three epochs' weights). Floating tensors: summed in the given order in their own dtype, then divided by N,
    as theirs (bit for bit). Integer tensors (BatchNorm's num_batches_tracked): the floor of the mean, kept integer;
    theirs turn into float32 means, which load_state_dict truncates to the same count. Keys, their order (the first
    dict's) and dtypes are kept, so the result loads with strict=True wherever the inputs do."""
    if not state_dicts:
        raise UserError("nothing to average: give at least one state dict")
    first = state_dicts[0]
    names = list(names) if names is not None else [f"state dict {i}" for i in range(len(state_dicts))]
    for i, sd in enumerate(state_dicts[1:], start=1):
        if set(sd) != set(first):
            diff = sorted(set(sd) ^ set(first))
            raise UserError(f"{names[i]} has other keys than {names[0]} ({diff[:3]}): average weights of one model")
        bad = [k for k in first if sd[k].shape != first[k].shape or sd[k].dtype != first[k].dtype]
        if bad:
            raise UserError(f"{names[i]} differs from {names[0]} at {bad[:3]} (shape or dtype): "
                            f"average weights of one model")
    n, out = len(state_dicts), {}
    for k, v in first.items():
        if v.is_floating_point():
            total = v.detach().cpu().clone()
            for sd in state_dicts[1:]:
                total = total + sd[k].detach().cpu()
            out[k] = total / n
        else:
            total = sum(sd[k].detach().cpu().long() for sd in state_dicts)
            out[k] = torch.div(total, n, rounding_mode="floor").to(v.dtype)
    return out


def average_checkpoints(paths: Sequence[str], output: str, log=print, then: str = "resume with --resume auto") -> dict:
    """Average the classifier weights of checkpoint or weight files (ours, the authors' model_<epoch>.pth, timm,
    torchvision; prefixes stripped) into `output`, a bare state_dict. Returns the average."""
    real = [os.path.realpath(p) for p in paths]
    twice = next((p for i, p in enumerate(paths) if real[i] in real[:i]), None)
    if twice is not None:
        raise UserError(f"--average lists {twice} twice: it would count double in the mean; list each file once")
    if os.path.realpath(output) in real:
        raise UserError(f"--average-output {output} is one of the files averaged: it would be overwritten; give "
                        f"another path")
    state_dicts = [load_classifier_weights(p, "--average") for p in paths]
    for p, sd in zip(paths, state_dicts):
        bad = nonfinite_tensors(sd)
        if bad:
            raise UserError(f"--average {p} holds NaN/inf in {', '.join(bad[:3])}: leave it out (an average with it "
                            f"would be NaN)")
    avg = average_state_dicts(state_dicts, paths)
    atomic_save(avg, output, then=then)
    log(f"saved {output}: the mean of {len(paths)} state dicts ({', '.join(os.path.basename(p) for p in paths)})")
    return avg


EPOCH_WEIGHTS = "epoch_weights"


def epoch_weights_path(output_dir: str, epoch: int) -> str:
    """Where --average-last keeps the classifier weights after epoch `epoch` (1-based, as log.jsonl counts)."""
    return os.path.join(output_dir, EPOCH_WEIGHTS, f"model_epoch{epoch:03d}.pth")


def average_last_epochs(cfg: Config, log=print) -> str | None:
    """--average-last N: the mean of the weights kept after the last N epochs, written to model_<phase>_avgN.pth.
    The kept files are in the output directory, so a resumed run averages the same ones a straight run would."""
    n = cfg.average_last
    paths = [epoch_weights_path(cfg.output_dir, e) for e in range(cfg.epochs - n + 1, cfg.epochs + 1)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        log(f"warning: no average of the last {n} epochs: {missing[0]} is missing (resumed from a run without "
            f"--average-last?); `python pgnm.py --average FILE ...` averages any weight files")
        return None
    out = os.path.join(cfg.output_dir, f"model_{cfg.phase}_avg{n}.pth")
    average_checkpoints(paths, out, log)
    return out


def load_into_classifier(model: ResNet, state_dict: dict, source: str, arch: str, log=print) -> None:
    """Load backbone weights strictly; the head is re-initialised (with a message) when the class count differs.
    A state_dict of another architecture is refused with a message naming the right --model."""
    own = model.state_dict()
    sd = {k: v for k, v in state_dict.items() if not k.startswith(("fc.", "head.", "classifier."))}
    backbone = {k for k in own if not k.startswith("fc.")}
    missing, unexpected = sorted(backbone - set(sd)), sorted(set(sd) - backbone)
    wrong = sorted(k for k in backbone & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or wrong:
        guess = guess_architecture(state_dict)
        hint = f"it looks like {guess}: pass --model {guess}" if guess and guess != arch else \
            "pass the --model it was trained with"
        detail = (f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}" if unexpected
                  else f"shape mismatch at {wrong[:2]}")
        raise UserError(f"{source} does not fit --model {arch} ({detail}); {hint}")
    head = {k: state_dict[k] for k in ("fc.weight", "fc.bias") if k in state_dict}
    if isinstance(model.fc, nn.Linear) and head.get("fc.weight") is not None \
            and head["fc.weight"].shape == model.fc.weight.shape:
        sd.update(head)
    elif isinstance(model.fc, nn.Linear):
        n_old = head["fc.weight"].shape[0] if "fc.weight" in head else 0
        log(f"note: {source} has a {n_old}-class head, the data has {model.fc.out_features} classes: "
            f"the head (fc) is re-initialised")
        sd.update({"fc.weight": model.fc.weight.detach().clone(), "fc.bias": model.fc.bias.detach().clone()})
    model.load_state_dict(sd, strict=True)


def rng_state() -> dict:
    """Every generator a training step draws from, as plain types (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
             "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_checkpoint_with_fallback(output_dir: str, log=print) -> tuple[dict | None, str | None]:
    """The newest sound checkpoint in output_dir: checkpoint.pth, else (reported in one line) checkpoint_prev.pth.
    (None, None) only when neither file exists; when they exist but neither is sound, a UserError: a run must not
    silently start again from scratch (and overwrite them)."""
    problems = []
    for name in (CHECKPOINT, CHECKPOINT_PREV):
        path = os.path.join(output_dir, name)
        if not os.path.lexists(path):
            continue
        try:
            ckpt = verify_and_load(path)
        except CorruptCheckpoint as e:
            problems.append(f"{name}: {e}")
            if name == CHECKPOINT:
                log(f"warning: {path} is unusable ({e}); trying the previous checkpoint")
            continue
        return ckpt, path
    if problems:
        raise UserError(f"--resume auto: no usable checkpoint in {output_dir} ({'; '.join(problems)}); nothing was "
                        f"overwritten: restore a good copy, or move them away to start from scratch")
    return None, None


def clean_temp_files(output_dir: str, log=print) -> None:
    """Remove the temp files a killed run left behind (only names of our own temp pattern; links are unlinked, never
    followed)."""
    if not os.path.isdir(output_dir):
        return
    for e in os.scandir(output_dir):
        if TEMP_FILE.match(e.name) and (e.is_symlink() or e.is_file(follow_symlinks=False)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(e.path)
            log(f"removed {e.path}, left by an interrupted write")


@contextlib.contextmanager
def output_dir_lock(output_dir: str, log=print):
    """Hold an exclusive lock on <output_dir>/.lock for the run, so that a second run in the same folder is refused
    instead of interleaving log.jsonl and overwriting checkpoints. The lock is a POSIX record lock (lockf): it goes
    when the process dies, however it dies, so a killed run leaves nothing stuck, and unlike flock it is not shared
    with forked DataLoader workers, which may outlive a SIGKILLed parent by seconds. Where the file system has no
    locks (some Lustre mounts) or the OS has none (Windows), the run goes on with a note."""
    try:
        import fcntl
    except ImportError:
        log("note: no file locking on this OS: nothing stops a second run in the same --output-dir")
        yield
        return
    path = os.path.join(output_dir, ".lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as e:
        raise UserError(f"cannot open the lock file {path} ({e.strerror}): it must be a plain file pgnm.py creates; "
                        f"remove a link or folder there, or choose a writable --output-dir") from None
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                log(f"note: cannot lock {path} ({e.strerror}): nothing stops a second run in the same --output-dir")
            else:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                raise UserError(f"--output-dir {output_dir} is in use by another run (pid {holder}): wait for it to "
                                f"end, or choose another --output-dir") from None
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} on {os.uname().nodename if hasattr(os, 'uname') else '?'}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


# =====================================================================================================================
#  Training: one step, one epoch, evaluation
# =====================================================================================================================


@dataclass
class Run:
    """What a phase trains with, fixed for the whole run: the config, the networks, their optimisers and schedulers,
    the fp16 GradScaler and the batch MixUp/CutMix. `model`/`policy` may be wrapped (DDP, torch.compile) for the step;
    `model_raw`/`policy_raw` are the modules underneath, what is saved and loaded. There is a policy only in the heated
    phase with --noise beta."""
    cfg: Config
    info: DistInfo
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    policy: nn.Module | None = None
    pol_optimizer: torch.optim.Optimizer | None = None
    pol_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    scaler: torch.amp.GradScaler | None = None
    mixup: Callable | None = None
    data_id: dict | None = None      # data_fingerprint of the training data, saved with every checkpoint
    buffers: "BufferCopy | None" = field(default=None, repr=False)   # the buffers as before this step (train_step)

    @property
    def model_raw(self) -> nn.Module:
        return unwrap(self.model)

    @property
    def policy_raw(self) -> nn.Module | None:
        return unwrap(self.policy) if self.policy is not None else None

    @property
    def heated(self) -> bool:
        return self.cfg.phase == "heated"

    def networks(self) -> list[nn.Module]:
        return [self.model_raw] + ([self.policy_raw] if self.policy is not None else [])

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.optimizer, self.pol_optimizer) if o is not None]

    def autocast(self):
        dtype = torch.bfloat16 if self.cfg.amp_dtype == "bfloat16" or self.info.device.type == "cpu" else torch.float16
        return torch.autocast(self.info.device.type, dtype=dtype, enabled=self.cfg.amp)

    def parameters(self) -> list[nn.Parameter]:
        return [p for net in self.networks() for p in net.parameters()]


@dataclass
class StepState:
    """What a training step changes besides the weights and optimiser states: the dataset-level Beta parameters of
    eq. 12-13 (log space, (1, G*G) float32, identical on every rank; None without a policy) and the skipped steps."""
    alpha_d: torch.Tensor | None = None
    beta_d: torch.Tensor | None = None
    bad_in_a_row: int = 0      # non-finite steps since the last good one
    bad_total: int = 0         # non-finite steps in the whole run
    amp_skipped: int = 0       # fp16 overflows that GradScaler skipped (expected now and then; it lowers its scale)
    clamped: torch.Tensor | None = None   # this epoch's mask elements changed by the [eps, 1-eps] clamp (device int64)
    sampled: int = 0                      # this epoch's mask elements sampled (the clamped fraction's denominator)


def clamp_counts(state: StepState, device: torch.device) -> tuple[int, int]:
    """This epoch's (clamped, sampled) mask elements summed over ranks. A collective: every rank calls it."""
    zero = torch.zeros((), dtype=torch.int64, device=device)
    t = torch.stack([state.clamped if state.clamped is not None else zero, zero + state.sampled])
    c, n = all_reduce_sum(t).tolist()
    return int(c), int(n)


class Forward(NamedTuple):
    """A training forward pass: the objective, the batch-mean cross-entropy (detached), the mask fed to the
    classifier (heated phase) and the dataset-level parameters this step would commit (eq. 12-13)."""
    loss: torch.Tensor
    ce: torch.Tensor
    mask: torch.Tensor | None = None
    next_d: tuple[torch.Tensor, torch.Tensor] | None = None


def make_mask(run: Run, state: StepState, x: torch.Tensor):
    """Algorithm 1 up to 'sample the noise matrix', for a batch: the policy's Beta parameters (eq. 2), mixed with the
    dataset-level ones of *before* this step (eq. 10-11); the next dataset-level parameters (eq. 12-13, batch mean over
    all ranks, not committed here); the sampled mask (eq. 4) upsampled and blurred (Fig. 4); and logP (eq. 7).
    Without a policy (Table 4 ablations) the mask is fixed noise and logP, next_d are None. Counts the mask elements
    the clamp changed into state.clamped/sampled (a measurement: it counts skipped steps too).
    x (B, 3, H, W) -> M_in (B, 1, H, W), logP (B, G*G), (alpha_d', beta_d') (1, G*G) each"""
    cfg, size = run.cfg, x.shape[-2:]
    if run.policy is None:
        noise = sample_fixed_noise(cfg.noise, (x.shape[0], cfg.grid * cfg.grid), x.device)
        return upsample_blur(noise, size, cfg.kernel, cfg.sigma), None, None
    x_policy = x if cfg.policy_size is None else F.interpolate(x, size=cfg.policy_size, mode="bilinear",
                                                               antialias=True)
    with run.autocast():
        a, b = run.policy(x_policy)                                                # eq. 2: (B, G*G) each
    a, b = a.float(), b.float()
    alpha_img = mix_image_params(state.alpha_d, a, cfg.tau_image)                 # eq. 10
    beta_img = mix_image_params(state.beta_d, b, cfg.tau_image)                   # eq. 11
    batch_mean = all_reduce_mean(torch.cat([a.detach().mean(0, keepdim=True), b.detach().mean(0, keepdim=True)]))
    next_d = (ema_update(state.alpha_d, batch_mean[:1], cfg.tau_dataset),         # eq. 12
              ema_update(state.beta_d, batch_mean[1:], cfg.tau_dataset))          # eq. 13
    mask, logp, n_clamped = sample_beta_mask(alpha_img, beta_img, return_clamped=True)   # eq. 4, 7
    state.clamped = n_clamped if state.clamped is None else state.clamped + n_clamped
    state.sampled += mask.numel()
    return upsample_blur(mask, size, cfg.kernel, cfg.sigma), logp, next_d         # Fig. 4


def compute_loss(run: Run, state: StepState, x: torch.Tensor, y: torch.Tensor) -> Forward:
    """The forward pass and objective of the run's phase: heated = mask, classify the masked batch (eq. 5), eq. 8
    (or our REINFORCE variant); finetune and baseline = plain cross-entropy."""
    cfg = run.cfg
    if not run.heated:
        with run.autocast():
            out = run.model(x)
        loss = F.cross_entropy(out.float(), y, label_smoothing=cfg.label_smoothing)
        return Forward(loss, loss.detach())
    m_in, logp, next_d = make_mask(run, state, x)
    x_masked = x * m_in                                                            # eq. 5, mask over channels
    if cfg.channels_last:
        x_masked = x_masked.contiguous(memory_format=torch.channels_last)
    with run.autocast():
        out = run.model(x_masked)
    ce = F.cross_entropy(out.float(), y, label_smoothing=cfg.label_smoothing, reduction="none")   # (B,)
    if logp is None:
        loss = ce.mean()
    elif cfg.objective == "paper":
        loss = paper_objective(logp, ce.mean())                                    # eq. 8
    else:
        loss = reinforce_objective(logp, ce)
    return Forward(loss, ce.detach().mean(), m_in, next_d)


def grad_norm(run: Run) -> torch.Tensor:
    """Total gradient norm of both networks, each clipped to --clip-grad-norm when given (as the authors), else one
    fused norm over the optimisers' parameters (lists: no module walk). Its finiteness decides whether the step is
    taken."""
    if run.cfg.clip_grad_norm is not None:
        norms = [nn.utils.clip_grad_norm_([p for p in n.parameters() if p.grad is not None], run.cfg.clip_grad_norm)
                 for n in run.networks()]
        return torch.stack([n.float() for n in norms]).sum()
    grads = [p.grad for o in run.optimizers() for g in o.param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        return torch.zeros((), device=run.info.device)
    if hasattr(nn.utils, "get_total_norm"):
        return nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def buffers_key(nets: Sequence[nn.Module]) -> list[tuple[int, int]]:
    """Which networks and buffers a BufferCopy holds: a network replaced, or moved (`.to()` makes new buffer tensors,
    the first one included), gets a new key."""
    return [(id(n), id(next(n.buffers(), None))) for n in nets]


class BufferCopy:
    """A copy of every buffer of some networks (BatchNorm running statistics and counts: a training-mode forward
    updates them), refreshed before each step so that a skipped step can put them back. The copies are allocated once
    (an allocation per buffer per step cost ~1 ms on a GPU host) and refreshed by one multi-tensor copy per dtype."""

    def __init__(self, nets: Sequence[nn.Module]):
        groups: dict[torch.dtype, list[torch.Tensor]] = {}
        for net in nets:
            for b in net.buffers():
                groups.setdefault(b.dtype, []).append(b)
        self.key = buffers_key(nets)
        self.groups = [(bufs, [b.clone() for b in bufs]) for bufs in groups.values()]

    @staticmethod
    def _copy(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
        if hasattr(torch, "_foreach_copy_"):
            torch._foreach_copy_(dst, src)
        else:
            for d, s in zip(dst, src):
                d.copy_(s)

    def take(self) -> None:
        for bufs, saved in self.groups:
            self._copy(saved, bufs)

    def restore(self) -> None:
        for bufs, saved in self.groups:
            self._copy(bufs, saved)


def buffer_copy(run: Run) -> BufferCopy:
    """The run's BufferCopy, made at its first step (and again if its networks were replaced or moved), freshly
    taken."""
    nets = run.networks()
    if run.buffers is None or run.buffers.key != buffers_key(nets):
        run.buffers = BufferCopy(nets)
    run.buffers.take()
    return run.buffers


def rank_flags(flags: Sequence, device: torch.device) -> torch.Tensor:
    """Each flag (a bool or a 0-d tensor) summed over all ranks, left on the device (> 0: set on some rank)."""
    return all_reduce_sum(torch.stack([torch.as_tensor(f, device=device).float().reshape(()) for f in flags]))


def any_rank(flags: Sequence, device: torch.device) -> list[bool]:
    """Each flag OR-ed over all ranks: one all-reduce, one device sync."""
    return (rank_flags(flags, device) > 0).tolist()


def skips_on_device(run: Run) -> bool:
    """Whether every optimiser is fused SGD (CUDA), whose kernel can skip a step itself (see step_unless)."""
    return all(g.get("fused") and not g["dampening"] for o in run.optimizers() for g in o.param_groups)


def step_unless(optimizers: Sequence[torch.optim.Optimizer], bad: torch.Tensor) -> None:
    """Fused SGD steps that the kernel skips by itself where `bad` (0-d, on the device) is nonzero -- weights and
    momentum untouched -- so the step is queued before the host has read whether it is good, and the GPU does not
    idle while the host decides. Momentum buffers that do not exist yet are made zero first: the fused first step
    fills an uninitialised buffer, and a skipped first step would leave it so (with dampening 0, m = 0.9 * 0 + g is
    the first step's m = g exactly)."""
    for opt in optimizers:
        if not opt.state:
            for group in opt.param_groups:
                for p in group["params"]:
                    if group["momentum"] and p.grad is not None:
                        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
        opt.found_inf = bad
        try:
            opt.step()
        finally:
            del opt.found_inf


def train_step(run: Run, state: StepState, x: torch.Tensor, y: torch.Tensor,
               stop_pending: bool = False) -> tuple[Forward, bool, bool]:
    """One optimisation step of both networks: Algorithm 1's loop body. Returns (forward, taken, stop).

    A step whose loss or gradients are not finite on any rank is skipped on every rank: weights, optimiser states,
    BatchNorm statistics and alpha_d/beta_d stay as they were, and the step is counted. Under fp16 a finite loss with
    overflowing gradients is GradScaler's ordinary skip (its scale is lowered, counted in amp_skipped); a non-finite
    loss leaves the scale as it was too. The same all-reduce carries
    `stop_pending` (a pre-emption signal on this rank), so all ranks agree to stop after the same step. The host reads
    it once per step: with fused SGD (CUDA) after the optimiser steps are queued (step_unless), else before them."""
    if run.cfg.compile and run.cfg.compile_mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()   # a new step: the CUDA graphs may reuse the last step's memory
    buffers = buffer_copy(run)
    fwd = compute_loss(run, state, x, y)
    for opt in run.optimizers():
        opt.zero_grad(set_to_none=True)
    (run.scaler.scale(fwd.loss) if run.scaler is not None else fwd.loss).backward()
    if run.scaler is not None:
        for opt in run.optimizers():
            run.scaler.unscale_(opt)
    flags = rank_flags([~torch.isfinite(fwd.loss.detach()), ~torch.isfinite(grad_norm(run)), stop_pending],
                       run.info.device)
    on_device = skips_on_device(run)
    if on_device:
        step_unless(run.optimizers(), (flags[:2].sum() > 0).float())
    loss_bad, grad_bad, stop = (flags > 0).tolist()                               # the step's one host sync
    taken = not (loss_bad or grad_bad)
    if taken:
        if not on_device:
            for opt in run.optimizers():
                run.scaler.step(opt) if run.scaler is not None else opt.step()
        if fwd.next_d is not None:
            state.alpha_d, state.beta_d = fwd.next_d                                 # eq. 12-13, committed
        state.bad_in_a_row = 0
    else:
        buffers.restore()
        if run.scaler is not None and not loss_bad:
            state.amp_skipped += 1
        else:
            state.bad_in_a_row += 1
            state.bad_total += 1
    if run.scaler is not None:        # a non-finite loss is no fp16 gradient overflow: the scale stays as it was
        if loss_bad:
            run.scaler.update(new_scale=run.scaler.get_scale())
        else:
            run.scaler.update()
    return fwd, taken, stop


class TrainingStopped(Exception):
    """A requested stop (SIGTERM/SIGUSR1) after a checkpoint: the CLI exits with code 3, meaning 'resume me'."""


class Diverged(TrainingStopped):
    """Training cannot go on: too many non-finite steps in a row, an epoch of skipped steps only, or a state that is no
    longer finite. The last good checkpoint is kept; the CLI exits with code 4 (requeueing would fail again)."""


class Preemption:
    """SIGTERM and SIGUSR1 (scancel, a SLURM time limit or its --signal warning) set `signalled` at any moment; the
    training loop hands it to the next step's all-reduce, so every rank stops after the same step, checkpoints and
    exits with code 3."""

    def __init__(self):
        self.signalled = False
        self._old: dict = {}

    def __enter__(self):
        import signal
        for name in ("SIGTERM", "SIGUSR1"):
            sig = getattr(signal, name, None)
            if sig is not None:
                try:
                    self._old[sig] = signal.signal(sig, self._handler)
                except ValueError:          # not the main thread (a notebook worker, say): no handler
                    pass
        return self

    def _handler(self, signum, frame):
        self.signalled = True

    def __exit__(self, *exc):
        import signal
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        return False


class RunClock:
    """The whole phase's remaining time from measured times: seconds per training step (this epoch so far) and the
    last epoch's time outside the training loop (evaluation, checkpoint, figures), which also prices the final test
    evaluation (scaled by the test/val sizes). Until one evaluation is timed the ETA is a lower bound, shown as '>='."""

    def __init__(self, epochs: int, steps_per_epoch: int, test_share: float):
        self.epochs, self.steps_per_epoch, self.test_share = epochs, steps_per_epoch, test_share
        self.outside: float | None = None     # seconds per epoch outside train_one_epoch, last measured

    def remaining(self, epoch: int, sec_per_step: float, steps_left: int, evaluated: bool = False) -> str:
        """Time to the phase's end with `steps_left` steps of epoch `epoch` (0-based) to go, e.g. '0:02:10'."""
        later = self.epochs - epoch - 1
        outside = self.outside or 0.0
        secs = ((steps_left + later * self.steps_per_epoch) * sec_per_step
                + outside * ((0 if evaluated else 1) + later + self.test_share))
        return ("" if self.outside is not None else ">=") + str(datetime.timedelta(seconds=int(secs)))


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except ImportError:  # Windows
        return float("nan")


def device_batch(run: Run, x: torch.Tensor, y: torch.Tensor, epoch: int, step: int):
    """A loader batch on the run's device, through MixUp/CutMix (seeded by epoch and step, so a resumed run draws the
    same) and in channels-last memory when the run uses it."""
    x = x.to(run.info.device, non_blocking=True)
    y = y.to(run.info.device, non_blocking=True)
    if run.mixup is not None:
        with cpu_rng(sample_seed(run.cfg.seed, epoch, step, stream=2)):    # MixUp/CutMix draw on the CPU
            x, y = run.mixup(x, y)
    if run.cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def progress_line(run: Run, state: StepState, fwd: Forward, where: tuple[int, int, int, int], t_epoch: float,
                  seen: int, data_time: float, clock: RunClock | None) -> str:
    """The every---print-freq line: loss, lr, img/s, data time, the epoch's and the run's ETA, mask mean,
    alpha_d/beta_d means, memory. `where` is (epoch, step, the epoch's first step, its step count), 0-based."""
    epoch, step, start_step, total = where
    el = time.perf_counter() - t_epoch
    done = step + 1 - start_step
    sec_per_step = el / max(done, 1)
    parts = [f"[{run.cfg.phase}] epoch {epoch + 1}/{run.cfg.epochs} step {step + 1}/{total}",
             f"loss {fwd.loss.item():.4f}", f"lr {run.optimizer.param_groups[0]['lr']:.5g}",
             f"img/s {seen * run.info.world / max(el, 1e-9):.1f}", f"data {data_time / max(done, 1):.4f}s",
             f"epoch eta {datetime.timedelta(seconds=int(sec_per_step * (total - step - 1)))}"]
    if clock is not None:
        parts.append(f"run eta {clock.remaining(epoch, sec_per_step, total - step - 1)}")
    if fwd.mask is not None:
        parts.append(f"mask {fwd.mask.mean().item():.3f}")
    if state.alpha_d is not None:
        parts.append(f"alpha_d {state.alpha_d.mean().item():.3f} beta_d {state.beta_d.mean().item():.3f}")
    parts.append(f"mem {_memory_mb(run.info.device):.0f}MB")
    return "  ".join(parts)


def train_one_epoch(run: Run, state: StepState, loader, epoch: int, start_step: int, log, on_step=None,
                    preemption: Preemption | None = None, clock: RunClock | None = None) -> dict:
    """Train for one (possibly resumed) epoch. Logs a progress line every print_freq steps, with the epoch's and
    (given a clock) the whole phase's ETA; calls on_step(step, loss_sum, n_ok, stop) after each step (mid-epoch
    checkpoints). Returns the epoch's loss sum, step count and training seconds."""
    cfg, dev = run.cfg, run.info.device
    run.model.train()
    if run.policy is not None:
        run.policy.train()
    total = len(loader) + start_step
    lr = run.optimizer.param_groups[0]["lr"]        # the schedulers step per epoch: the lr of every step here
    loss_sum, n_ok = torch.zeros((), device=dev), 0
    amp_skipped_at_start = state.amp_skipped
    t_epoch = t_last = time.perf_counter()
    data_time, seen = 0.0, 0
    for step, (x, y) in enumerate(loader, start=start_step):
        data_time += time.perf_counter() - t_last
        if x.shape[0] == 0:           # every image of the batch was unreadable (--skip-bad-images)
            if run.info.distributed:  # the other ranks are in this step's collectives: stop rather than hang them
                raise UserError(f"a whole batch was unreadable on rank {run.info.rank} (epoch {epoch + 1}, step "
                                f"{step + 1}): fix or remove the broken images listed above")
            t_last = time.perf_counter()
            continue
        x, y = device_batch(run, x, y, epoch, step)
        amp_skipped_before = state.amp_skipped
        fwd, taken, stop = train_step(run, state, x, y, preemption is not None and preemption.signalled)
        if taken:
            loss_sum += fwd.loss.detach()
            n_ok += 1
        elif state.amp_skipped == amp_skipped_before:
            log(f"warning: non-finite step skipped (epoch {epoch + 1} step {step + 1}; {state.bad_in_a_row} in a row, "
                f"{state.bad_total} in total)")
        elif state.amp_skipped == 1:          # the run's first: explained once, later ones are only counted
            log(f"note: fp16 overflow at epoch {epoch + 1} step {step + 1}: GradScaler skipped the step and lowered "
                f"its loss scale. Expected a few times, mostly early in a run; further ones are counted silently "
                f"(amp_skipped_steps in log.jsonl and a count at each epoch's end)")
        seen += x.shape[0]
        if (step + 1) % cfg.print_freq == 0 or step + 1 == total:
            log(progress_line(run, state, fwd, (epoch, step, start_step, total), t_epoch, seen, data_time, clock))
        if on_step is not None:
            on_step(step + 1, loss_sum, n_ok, stop)
        if state.bad_in_a_row >= cfg.max_bad_steps:
            raise Diverged(f"{state.bad_in_a_row} non-finite steps in a row (epoch {epoch + 1}, step "
                           f"{step + 1}); lower --lr, add --clip-grad-norm, or drop --amp, and resume with "
                           f"--resume auto: the last good checkpoint is kept")
        if stop:
            raise TrainingStopped(f"stop requested by signal at epoch {epoch + 1}, step {step + 1}"
                                  + ("; checkpoint written, continue with --resume auto" if on_step else ""))
        t_last = time.perf_counter()
    if state.amp_skipped > amp_skipped_at_start:
        log(f"note: GradScaler skipped {state.amp_skipped - amp_skipped_at_start} fp16-overflow step(s) in epoch "
            f"{epoch + 1} ({state.amp_skipped} in the run)")
    seconds = time.perf_counter() - t_epoch
    return {"loss_sum": loss_sum, "n_ok": n_ok, "seconds": seconds, "sec_per_step": seconds / max(len(loader), 1),
            "lr": lr}


@torch.no_grad()
def predict(model: nn.Module, loader, device: torch.device, autocast, transform_input=None) -> tuple[torch.Tensor, ...]:
    """Softmax probabilities and labels of a loader's samples, gathered from all ranks (rank by rank: the metrics do
    not depend on the order)."""
    model.eval()
    probs, targets = [], []
    for x, y in loader:
        if x.shape[0] == 0:
            continue
        x = x.to(device, non_blocking=True)
        if transform_input is not None:
            x = transform_input(x)
        with autocast:
            probs.append(model(x).float().softmax(1))
        targets.append(y.to(device))
    c = unwrap(model).fc.out_features
    p = torch.cat(probs) if probs else torch.zeros(0, c, device=device)
    t = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long, device=device)
    return all_gather_cat(p).cpu(), all_gather_cat(t).cpu()


def evaluate(run: Run, state: StepState, loader, epoch: int, noisy: bool = False) -> dict:
    """Metrics on a split. noisy=True masks each image with its own sample from the dataset-level noise model,
    Beta(exp alpha_d, exp beta_d) for the learned policy (the paper's Table 1 'Noisy' input); the masks are drawn
    from a generator seeded by (seed, epoch) so training's random stream is untouched."""
    cfg, dev = run.cfg, run.info.device
    if not noisy:
        probs, target = predict(run.model, loader, dev, run.autocast())
    else:
        def mask_input(x):
            b = x.shape[0]
            if state.alpha_d is not None:
                m, _ = sample_beta_mask(state.alpha_d.expand(b, -1), state.beta_d.expand(b, -1))
            else:
                m = sample_fixed_noise(cfg.noise, (b, cfg.grid * cfg.grid), x.device)
            return x * upsample_blur(m, x.shape[-2:], cfg.kernel, cfg.sigma)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(sample_seed(cfg.seed, epoch, run.info.rank, stream=3))
            probs, target = predict(run.model, loader, dev, run.autocast(), mask_input)
    m = classification_metrics(probs, target)
    m["loss"] = float(F.nll_loss(probs.clamp_min(1e-12).log(), target)) if len(target) else float("nan")
    m["n"] = int(len(target))
    return m


# --- what a person looks at: the mask figure (Figs. 4 and 6), per-image mask statistics, curves.png -------------------


FIGURE_IMAGES = 8          # validation images in the mask figure: one per class, classes spread over the list
FIGURE_TILE = 192          # smaller images are enlarged (nearest) to about this many pixels, larger ones reduced
FIGURE_ROWS = ("image", "mask", "masked")

# A viridis-like ramp (dark blue -> green -> yellow) at 0, 1/8, ..., 1: perceptually ordered, readable in greyscale.
_RAMP = np.array([[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141], [39, 173, 129],
                  [92, 200, 99], [170, 220, 50], [253, 231, 37]], dtype=np.float64)


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB on the viridis-like ramp.   (...) -> (..., 3)"""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.minimum(np.floor(v).astype(int), len(_RAMP) - 2)
    t = (v - lo)[..., None]
    return np.round(_RAMP[lo] * (1 - t) + _RAMP[lo + 1] * t).astype(np.uint8)


def figure_indices(targets: Sequence[int], k: int = FIGURE_IMAGES) -> list[int]:
    """The mask figure's images, chosen once per run: the first sample of each class, or of k classes spread evenly
    over the class list when there are more than k."""
    first: dict[int, int] = {}
    for i, t in enumerate(targets):
        first.setdefault(int(t), i)
    classes = sorted(first)
    if len(classes) > k:
        classes = [classes[j * len(classes) // k] for j in range(k)]
    return [first[c] for c in classes]


@dataclass
class FixedImages:
    """The validation images the mask figure and the per-image mask statistics follow through a run."""
    x: torch.Tensor            # (K, 3, H, W), normalised, evaluation transform
    names: list[str]           # their class names


def fixed_images(dataset: AugmentedDataset, classes: Sequence[str]) -> FixedImages | None:
    """figure_indices' samples of a validation set through its (evaluation) transform. With --skip-bad-images, a
    class whose first image is unreadable shows its first readable one; a class with none is left out."""
    picked = []
    for i in figure_indices(dataset.targets):
        t = dataset.targets[i]
        sample = next((s for j in range(i, len(dataset)) if dataset.targets[j] == t
                       for s in [dataset[j]] if s is not None), None)
        if sample is not None:
            picked.append((sample[0], t))
    if not picked:
        return None
    return FixedImages(torch.stack([s for s, _ in picked]), [classes[t] for _, t in picked])


@torch.no_grad()
def policy_masks(run: Run, state: StepState, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The masks training would apply to x (eq. 2, 10-11, 4, Fig. 4), with the policy in eval mode and the same seed
    every epoch, so that a change between epochs comes from the policy and not from the random stream. Also the
    expected mask E[M] = e^a / (e^a + e^b) of each image's Beta parameters (None without a policy).
    x (K, 3, H, W) -> M_in (K, 1, H, W), E[M] (K, G*G)"""
    cfg, dev = run.cfg, run.info.device
    x = x.to(dev)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(sample_seed(cfg.seed, 0, 0, stream=4))
        if run.policy is None:
            noise = sample_fixed_noise(cfg.noise, (x.shape[0], cfg.grid * cfg.grid), dev)
            return upsample_blur(noise, x.shape[-2:], cfg.kernel, cfg.sigma).cpu(), None
        policy = run.policy_raw
        was_training = policy.training
        policy.eval()
        x_policy = x if cfg.policy_size is None else F.interpolate(x, size=cfg.policy_size, mode="bilinear",
                                                                   antialias=True)
        with run.autocast():
            a, b = policy(x_policy)
        policy.train(was_training)
        alpha_img = mix_image_params(state.alpha_d, a.float(), cfg.tau_image)           # eq. 10
        beta_img = mix_image_params(state.beta_d, b.float(), cfg.tau_image)             # eq. 11
        mask, _ = sample_beta_mask(alpha_img, beta_img)
        m_in = upsample_blur(mask, x.shape[-2:], cfg.kernel, cfg.sigma)
    return m_in.cpu(), beta_mean(alpha_img, beta_img).cpu()


def beta_mean(log_alpha: torch.Tensor, log_beta: torch.Tensor) -> torch.Tensor:
    """E[M] of B(exp a, exp b) = e^a / (e^a + e^b) = sigmoid(a - b), with beta_distribution's clamp.   -> same shape"""
    lim = LOG_CONCENTRATION_LIMIT
    return torch.sigmoid(log_alpha.float().clamp(-lim, lim) - log_beta.float().clamp(-lim, lim))


def mask_statistics(expected: torch.Tensor, alpha_d: torch.Tensor, beta_d: torch.Tensor) -> dict:
    """Whether the masks are image-specific, for log.jsonl: the dataset-level expected mask value, each fixed image's
    (mean over cells of E[M]), and the spread across images (per cell the std of E[M] over the images, averaged over
    cells: 0 when the policy ignores the image).   E[M] (K, G*G), alpha_d/beta_d (1, G*G) -> dict"""
    return {"mask_mean_dataset": round(float(beta_mean(alpha_d, beta_d).mean()), 5),
            "mask_mean_images": [round(float(v), 5) for v in expected.mean(1)],
            "mask_image_spread": round(float(expected.std(0, unbiased=False).mean()), 6)}


def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)     # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, OSError, ImportError, AttributeError):
        return ImageFont.load_default()              # older Pillow: the small bitmap font


def mask_figure_layout(k: int, image_size: int) -> dict:
    """Where everything of the mask figure goes (pixels): a title band, class names above the columns, row labels
    at the left, three rows of k tiles, the mean of each mask below its column, and the colour bar at the right."""
    tile = image_size * max(1, round(FIGURE_TILE / image_size)) if image_size < FIGURE_TILE else min(image_size, 256)
    pad, label_w, title_h, names_h, caption_h, bar_w = 8, 84, 46, 38, 24, 84
    cols = [label_w + c * (tile + pad) for c in range(k)]
    top = title_h + names_h
    rows = {name: top + r * (tile + pad) for r, name in enumerate(FIGURE_ROWS)}
    bar_x = label_w + k * (tile + pad) + 4
    return {"size": (bar_x + bar_w, top + 3 * (tile + pad) + caption_h), "tile": tile, "cols": cols, "rows": rows,
            "names_y": title_h, "caption_y": top + 3 * (tile + pad), "bar": (bar_x, rows["mask"], bar_x + 16,
                                                                                rows["mask"] + tile)}


def _fit(draw, text: str, font, width: int, lines: int = 2) -> list[str]:
    """Greedy word wrap into at most `lines` lines of `width` pixels; the last line is cut with '...' if needed."""
    words, out, cur = text.split(), [], ""
    for w in words:
        cand = f"{cur} {w}".strip()
        if draw.textlength(cand, font=font) <= width or not cur:
            cur = cand
        else:
            out.append(cur)
            cur = w
    out.append(cur)
    if len(out) > lines:
        out = out[:lines - 1] + [" ".join(out[lines - 1:])]
    last = out[-1]
    while draw.textlength(last, font=font) > width and len(last) > 1:
        last = last[:-4] + "..." if len(last) > 4 else last[:-1]
    return out[:-1] + [last]


def save_mask_figure(path: str, images: torch.Tensor, masks: torch.Tensor, mean: float, std: float,
                     names: Sequence[str] | None = None, title: Sequence[str] = ()) -> None:
    """Figs. 4 and 6 as a PNG (PIL only): the images, their masks in colour (with a 0-1 colour bar) and the masked
    images, one column per image, row labels at the left, class names above and each mask's mean below.
    images (K, 3, H, W) normalised, masks (K, 1, H, W) in [0, 1]"""
    from PIL import ImageDraw
    k, _, h, w = images.shape
    lay = mask_figure_layout(k, max(h, w))
    tile = lay["tile"]
    img = (images.float() * std + mean).clamp(0, 1)
    m = masks.float().clamp(0, 1)
    as_rgb = lambda t: (t.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)   # noqa: E731
    rows = {"image": as_rgb(img), "mask": colormap(m[:, 0].numpy()), "masked": as_rgb(img * m)}
    big, small = _font(16), _font(13)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = max([lay["size"][0]] + [round(probe.textlength(line, font=big if i == 0 else small)) + 16
                                    for i, line in enumerate(title[:2])])     # a title never cut off
    canvas = Image.new("RGB", (width, lay["size"][1]), "white")
    draw = ImageDraw.Draw(canvas)
    resample = Image.NEAREST if tile >= max(h, w) else Image.BILINEAR
    for name, arr in rows.items():
        for c in range(k):
            canvas.paste(Image.fromarray(arr[c]).resize((tile, tile), resample), (lay["cols"][c], lay["rows"][name]))
    for i, line in enumerate(title[:2]):
        draw.text((8, 4 + i * 20), line, fill="black", font=big if i == 0 else small)
    for name, y in lay["rows"].items():
        draw.text((8, y + tile // 2 - 8), name, fill="black", font=big)
    for c in range(k):
        x = lay["cols"][c]
        if names is not None:
            label = str(names[c]).replace("__", " / ").replace("_", " ")
            for i, line in enumerate(_fit(draw, label, small, tile)):
                draw.text((x, lay["names_y"] + i * 16), line, fill="black", font=small)
        draw.text((x, lay["caption_y"] + 2), f"mask mean {float(m[c].mean()):.3f}", fill="black", font=small)
    x0, y0, x1, y1 = lay["bar"]
    ramp = colormap(np.linspace(1.0, 0.0, y1 - y0))[:, None, :].repeat(x1 - x0, axis=1)
    canvas.paste(Image.fromarray(ramp), (x0, y0))
    draw.rectangle((x0 - 1, y0 - 1, x1, y1), outline="black")
    for v in (0.0, 0.5, 1.0):
        y = round(y1 - 1 - v * (y1 - y0 - 1))
        draw.line((x1, y, x1 + 4, y), fill="black")
        draw.text((x1 + 7, y - 7), f"{v:g}", fill="black", font=small)
    draw.text((x0, y0 - 18), "mask", fill="black", font=small)
    buf = io.BytesIO()
    canvas.save(buf, format="png")
    write_atomic(path, buf.getvalue())


def save_curves(log_path: str, path: str) -> str | None:
    """curves.png from log.jsonl (matplotlib, optional): losses, clean and masked validation accuracy, and in the
    heated phase alpha_d/beta_d and the fixed images' expected mask values per epoch. None when written, else why
    not, as a line for the user."""
    def skipped(why: str) -> str:      # an older curves.png (a run resumed without matplotlib) would mislead: remove it
        stale = os.path.lexists(path)
        if stale:
            os.remove(path)
        return f"curves.png skipped{' (the older one removed)' if stale else ''}: {why}"
    try:
        from matplotlib.figure import Figure        # no pyplot: no global state, no display needed
    except ImportError:
        return skipped("matplotlib is not installed (pip install matplotlib)")
    recs = []
    if os.path.isfile(log_path):
        with open(log_path) as fh:
            recs = [r for r in map(json.loads, filter(str.strip, fh)) if not r.get("final") and "epoch" in r]
    if not recs:
        return skipped(f"{log_path} has no epoch to draw")
    ep = [r["epoch"] for r in recs]
    col = lambda key: [r.get(key, float("nan")) for r in recs]    # noqa: E731
    heated = "val_noisy_acc" in recs[-1]
    policy = "mask_mean_images" in recs[-1]
    n = 6 if policy else 3
    fig = Figure(figsize=(4.0 * min(n, 3), 3.2 * (2 if n > 3 else 1)), dpi=100)
    axes = fig.subplots(2 if n > 3 else 1, min(n, 3), squeeze=False).ravel()
    phase = recs[-1].get("phase", "")
    ax = axes[0]
    ax.plot(ep, col("train_loss"), "o-", label="train")
    ax.set_title("training objective (policy + classifier)" if policy else "training loss (cross-entropy)")
    ax = axes[1]
    ax.plot(ep, col("val_loss"), "o-", label="clean")
    if heated:
        ax.plot(ep, col("val_noisy_loss"), "s--", label="masked")
    ax.set_title("validation cross-entropy")
    ax = axes[2]
    ax.plot(ep, col("val_acc"), "o-", label="clean")
    ax.plot(ep, col("val_balanced_acc"), ":", color="C0", label="clean, balanced")
    if heated:
        ax.plot(ep, col("val_noisy_acc"), "s--", label="masked")
    ax.set_title("validation accuracy")
    if policy:
        ax = axes[3]
        ax.plot(ep, col("alpha_d_mean"), "o-", label="log alpha_d")
        ax.plot(ep, col("beta_d_mean"), "s-", label="log beta_d")
        ax.set_title("dataset-level Beta parameters (mean)")
        ax = axes[4]
        per_image = np.array([r.get("mask_mean_images", [np.nan]) for r in recs], dtype=float)
        for j in range(per_image.shape[1]):
            ax.plot(ep, per_image[:, j], "-", lw=1, alpha=0.7, label="fixed images, one line each" if j == 0 else None)
        ax.plot(ep, col("mask_mean_dataset"), "k-", lw=2.5, label="dataset-level")
        ax.set_title("expected mask value E[M]")
        ax = axes[5]
        ax.plot(ep, col("mask_image_spread"), "o-", color="C3")
        ax.set_title("spread of E[M] across images")
    for ax in axes[:n]:
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(f"{phase}: {os.path.dirname(log_path) or '.'}/log.jsonl")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_atomic(path, buf.getvalue())
    return None


# =====================================================================================================================
#  main: build everything, resume, train, evaluate, save
# =====================================================================================================================


def file_hash() -> str:
    """This file's SHA-256, first 10 hex digits: printed at start so a log names the code that made it."""
    return sha256_file(__file__)[:10]


def build_schedulers(cfg: Config, optimizer, pol_optimizer):
    """Classifier: StepLR (optionally after a linear/constant warm-up); policy: cosine over all epochs (authors)."""
    sched = torch.optim.lr_scheduler
    main_s = sched.StepLR(optimizer, step_size=cfg.lr_step_size, gamma=cfg.lr_gamma)
    if cfg.lr_warmup_epochs > 0:
        warm = (sched.LinearLR(optimizer, start_factor=cfg.lr_warmup_decay, total_iters=cfg.lr_warmup_epochs)
                if cfg.lr_warmup_method == "linear" else
                sched.ConstantLR(optimizer, factor=cfg.lr_warmup_decay, total_iters=cfg.lr_warmup_epochs))
        main_s = sched.SequentialLR(optimizer, [warm, main_s], milestones=[cfg.lr_warmup_epochs])
    pol_s = sched.CosineAnnealingLR(pol_optimizer, T_max=cfg.epochs, eta_min=cfg.lr_min) if pol_optimizer else None
    return main_s, pol_s


def step_schedulers(run) -> None:
    """One epoch's lr step of both networks. torch 2.5's SequentialLR steps its next scheduler with an epoch argument
    and warns about that deprecated form: torch's own call, not ours, so that one warning is hushed."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The epoch parameter in `scheduler", category=UserWarning)
        for s in (run.scheduler, run.pol_scheduler):
            if s is not None:
                s.step()


def make_checkpoint(run: Run, state: StepState, epoch: int, step: int, steps_per_epoch: int, meter: dict) -> dict:
    """The checkpoint.pth payload: the authors' key names, plain types only (torch.load(weights_only=True) works).
    epoch/step: the epoch being trained and how many of its steps are done (step == steps_per_epoch: complete)."""
    counters = {"bad_total": state.bad_total, "amp_skipped": state.amp_skipped}
    if state.alpha_d is not None:
        counters["mask_clamped"], counters["mask_sampled"] = clamp_counts(state, run.info.device)
    rngs = [rng_state()]
    if run.info.distributed:
        rngs = [None] * run.info.world
        dist.all_gather_object(rngs, rng_state())
    return {
        "model": run.model_raw.state_dict(),
        "policy_net": run.policy_raw.state_dict() if run.policy is not None else None,
        "base_alpha": state.alpha_d.detach().cpu() if state.alpha_d is not None else None,
        "base_beta": state.beta_d.detach().cpu() if state.beta_d is not None else None,
        "optimizer": run.optimizer.state_dict(),
        "pol_optimizer": run.pol_optimizer.state_dict() if run.pol_optimizer is not None else None,
        "main_lr_scheduler": run.scheduler.state_dict(),
        "pol_lr_scheduler": run.pol_scheduler.state_dict() if run.pol_scheduler is not None else None,
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "epoch": epoch,
        "step": step,
        "steps_per_epoch": steps_per_epoch,
        "world_size": run.info.world,
        "meter": {"loss_sum": float(meter["loss_sum"]), "n_ok": int(meter["n_ok"])},
        "counters": counters,
        "args": dataclasses.asdict(run.cfg),
        "data": run.data_id,
        "rng": rngs,
        "pgnm_version": file_hash(),
    }


RESUME_KEYS = {"model": dict, "optimizer": dict, "main_lr_scheduler": dict, "epoch": int, "step": int, "args": dict}


def check_resumable(ckpt, source: str) -> None:
    """A UserError unless ckpt is a pgnm.py checkpoint.pth. The authors' (torchvision-reference) checkpoints carry an
    argparse.Namespace under 'args', one optimiser for both networks and no step or RNG state: they cannot continue
    exactly, so they are refused with the way to start from their weights instead."""
    if not isinstance(ckpt, dict):
        raise UserError(f"{source} is not a checkpoint (it holds a {type(ckpt).__name__}): to start from its weights "
                        f"use --finetune {source}")
    if isinstance(ckpt.get("args"), argparse.Namespace):
        raise UserError(f"{source} is a checkpoint of the authors' code, not of pgnm.py: it cannot be resumed (one "
                        f"optimiser for both networks, no step or RNG state); to start from its classifier weights "
                        f"use --finetune {source}")
    missing = [k for k in RESUME_KEYS if k not in ckpt]
    if missing and {str(k).split(".")[0] for k in strip_prefixes({str(k): v for k, v in ckpt.items()})} \
            == {"fe", "alpha", "beta"}:
        raise UserError(f"{source} holds the policy network's weights (PolicyNet), not a checkpoint: resume from the "
                        f"run's checkpoint.pth")
    if missing:
        raise UserError(f"{source} is not a resumable pgnm.py checkpoint (no {', '.join(missing)}; "
                        f"model_<phase>.pth holds weights only): to start from its weights use --finetune {source}")
    def weights(sd) -> bool:
        return isinstance(sd, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items())

    wrong = [k for k, kind in RESUME_KEYS.items() if not isinstance(ckpt[k], kind) or isinstance(ckpt[k], bool)]
    wrong += [k for k in ("model", "policy_net") if k not in wrong and ckpt.get(k) is not None and not weights(ckpt[k])]
    if wrong:                  # written by hand or by another program: restoring it would fail half-way
        kind = type(ckpt[wrong[0]]).__name__
        what = "not a state_dict of named tensors" if isinstance(ckpt[wrong[0]], dict) else \
            f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"
        raise UserError(f"{source} is damaged: its '{wrong[0]}' is not what pgnm.py writes ({what}); resume from "
                        f"another checkpoint, or start afresh")


def restore_checkpoint(run: Run, state: StepState, ckpt: dict, source: str) -> None:
    """Put every saved state back: both networks, alpha_d/beta_d, optimisers, schedulers, scaler, RNGs."""
    check_resumable(ckpt, source)
    saved, cfg = ckpt.get("args") or {}, run.cfg
    for key in ("phase", "model", "policy_model", "grid", "noise"):
        if key in saved and saved[key] != getattr(cfg, key):
            raise UserError(f"{source} was written with --{key.replace('_', '-')} {saved[key]}, this run has "
                            f"{getattr(cfg, key)}: use the same flags or another --output-dir")
    weights = strip_prefixes(ckpt["model"]) if isinstance(ckpt.get("model"), dict) else {}
    saved_fc, fc = weights.get("fc.weight"), getattr(run.model_raw, "fc", None)
    if isinstance(saved_fc, torch.Tensor) and isinstance(fc, nn.Linear) and saved_fc.shape[0] != fc.out_features:
        raise UserError(f"{source} has {saved_fc.shape[0]} classifier outputs, this run {fc.out_features} "
                        f"(--num-classes or the data's classes): resume with the same, or start from its weights "
                        f"with --finetune {source} in another --output-dir")
    try:
        run.model_raw.load_state_dict(strip_prefixes(ckpt["model"]))
        if run.policy is not None:
            run.policy_raw.load_state_dict(strip_prefixes(ckpt["policy_net"]))
    except (RuntimeError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{source} does not match this run's networks ({str(e).splitlines()[0][:160]}); "
                        f"use the same --model/--grid or another --output-dir") from None
    dev = run.info.device
    try:
        if state.alpha_d is not None:
            state.alpha_d, state.beta_d = ckpt["base_alpha"].to(dev), ckpt["base_beta"].to(dev)
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scheduler.load_state_dict(ckpt["main_lr_scheduler"])
        if run.pol_optimizer is not None:
            run.pol_optimizer.load_state_dict(ckpt["pol_optimizer"])
            run.pol_scheduler.load_state_dict(ckpt["pol_lr_scheduler"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{source} lacks or has a damaged optimiser, scheduler or alpha_d/beta_d state "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}): resume from "
                        f"another checkpoint, or start from its weights with --finetune {source}") from None
    if run.scaler is not None and ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    counters = ckpt.get("counters") or {}
    state.bad_total, state.amp_skipped = counters.get("bad_total", 0), counters.get("amp_skipped", 0)
    if state.alpha_d is not None and run.info.is_main and "mask_sampled" in counters:
        # the epoch's clamp counts so far, summed over ranks: rank 0 carries them on, the others restart at 0
        state.clamped = torch.tensor(counters["mask_clamped"], dtype=torch.int64, device=dev)
        state.sampled = int(counters["mask_sampled"])
    rngs = ckpt.get("rng") or []
    if len(rngs) == run.info.world:
        set_rng_state(rngs[run.info.rank])
    else:
        torch.manual_seed(rank_seed(cfg.seed, run.info.rank) + 1)


SCHEDULE_FIELDS = ("epochs", "lr", "policy_lr_ratio", "momentum", "weight_decay", "lr_step_size", "lr_gamma", "lr_min",
                   "lr_warmup_epochs", "lr_warmup_method", "lr_warmup_decay")


def apply_new_schedule(run: Run, saved_args: dict, epochs_done: int, source: str, log) -> None:
    """The rule for resuming with other optimisation flags: this run's config wins. When --lr, --epochs, the policy's
    lr ratio, momentum, weight decay or the lr schedule differ from the checkpoint's, the optimisers take the new
    values and both schedules are rebuilt and stepped through the epochs already done, exactly as if the new values
    had been used from the start (so a longer --epochs stretches the policy's cosine to end at --lr-min); the
    momentum buffers are kept. One line says what changed. Same flags: nothing is touched."""
    cfg = run.cfg
    changed = [k for k in SCHEDULE_FIELDS if k in saved_args and saved_args[k] != getattr(cfg, k)]
    if not changed:
        return
    for opt, lr in ((run.optimizer, cfg.lr), (run.pol_optimizer, cfg.lr * cfg.policy_lr_ratio)):
        for group in (opt.param_groups if opt is not None else []):
            group.update(lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
            group.pop("initial_lr", None)
    run.scheduler, run.pol_scheduler = build_schedulers(cfg, run.optimizer, run.pol_optimizer)
    with warnings.catch_warnings():          # "scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore")
        for _ in range(epochs_done):
            step_schedulers(run)
    now = f"classifier lr {run.optimizer.param_groups[0]['lr']:.6g}"
    if run.pol_optimizer is not None:
        now += f", policy lr {run.pol_optimizer.param_groups[0]['lr']:.6g}"
    log(f"note: {source} was written with " + " ".join(f"--{k.replace('_', '-')} {saved_args[k]}" for k in changed)
        + "; this run has " + " ".join(f"--{k.replace('_', '-')} {getattr(cfg, k)}" for k in changed)
        + f": the new values are used and the lr schedules rebuilt as if they had applied from the start ({now} "
        f"for epoch {epochs_done + 1} of {cfg.epochs})")


UNNOTED_ON_RESUME = ("resume", "output_dir", "device", "workers", "print_freq", "no_malloc_tuning", "finetune")


def note_other_changes(cfg: Config, saved_args: dict, start: Progress, source: str, log) -> None:
    """Resuming with other flags than the schedule's (apply_new_schedule): this run's values win from where it
    continues, and one note line names them, so that a run trained partly with other settings (a --kernel, a --seed,
    a --tau-image) is never mistaken for a straight one; config.json holds this run's values. Flags that cannot change
    the numbers (where to write, how many loader workers, ...) are not named."""
    skip = set(SCHEDULE_FIELDS) | set(UNNOTED_ON_RESUME)
    changed = [f.name for f in dataclasses.fields(Config)
               if f.name not in skip and f.name in saved_args and saved_args[f.name] != getattr(cfg, f.name)]
    if changed:
        flag = lambda k, v: f"--{k.replace('_', '-')} {format_value(v)}"     # noqa: E731
        log(f"note: {source} was written with " + " ".join(flag(k, saved_args[k]) for k in changed)
            + "; this run has " + " ".join(flag(k, getattr(cfg, k)) for k in changed)
            + f": the new values apply from epoch {start.epoch + 1}, step {start.step} on (the epochs before used the "
              f"old ones)")


def json_safe(obj):
    """NaN and inf as null, so that every log line is valid JSON (json.dumps would write bare NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _append_jsonl(path: str, record: dict) -> None:
    """Append one JSON line (NaN as null); a symbolic link at path is refused, never written through."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        raise UserError(f"cannot append to {path} ({e.strerror}; a symbolic link is not written through): "
                        f"remove it or choose another --output-dir") from None
    with os.fdopen(fd, "a") as fh:
        fh.write(json.dumps(json_safe(record), allow_nan=False) + "\n")


def _trim_log(path: str, start_epoch: int) -> None:
    """On resume, drop log lines of epochs that will be trained again (and any final line); the file is rewritten
    by write_atomic, so a symbolic link there is replaced, not written through."""
    if not os.path.isfile(path):
        return
    with open(path) as fh:
        lines = [ln for ln in fh if ln.strip()]
    keep = []
    for ln in lines:
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            continue
        if rec.get("final") or rec.get("epoch", 0) > start_epoch:
            continue
        keep.append(ln)
    if keep != lines:
        write_atomic(path, "".join(keep).encode())


def default_finetune_path(output_dir: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(output_dir)), "heated", "model_heated.pth")


RANK_SEED_STRIDE = 7919   # a prime: rank r seeds its generators with seed + 7919 r, so no two ranks share a stream


def rank_seed(seed: int, rank: int) -> int:
    return seed + RANK_SEED_STRIDE * rank


@dataclass
class Data:
    """The data of a phase: class names, the training set with its resumable sampler and loader, and the evaluation
    loaders ('val', and 'test' when the data has a test split)."""
    classes: list[str]
    num_classes: int
    train: AugmentedDataset
    sampler: TrainSampler
    train_loader: torch.utils.data.DataLoader
    eval_loaders: dict
    sizes: dict

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch


@dataclass
class Progress:
    """Where training (re)starts: the epoch, the steps of it already done and their loss meter."""
    epoch: int = 0
    step: int = 0
    meter: dict = field(default_factory=lambda: {"loss_sum": 0.0, "n_ok": 0})


def configure_runtime(cfg: Config, info: DistInfo, log) -> None:
    """Determinism or cuDNN autotuning, and every rank's seeds."""
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    seed = rank_seed(cfg.seed, info.rank)
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def build_data(cfg: Config, info: DistInfo) -> Data:
    """Data sets, the training sampler (resumable, split over ranks) and the loaders."""
    data = build_datasets(cfg)
    num_classes = cfg.num_classes or len(data["classes"])
    for split in ("train", "val", "test"):
        ds = data.get(split)
        if ds is not None and ds.targets and max(ds.targets) >= num_classes:
            raise UserError(f"{split} has label {max(ds.targets)} but the classifier has {num_classes} outputs: "
                            f"fix --num-classes or the labels")
    train = data["train"]
    if len(train) // info.world < cfg.batch_size:
        raise UserError(f"the training split has {len(train)} images, fewer than one batch of {cfg.batch_size} "
                        f"per process: lower --batch-size")
    sampler = TrainSampler(len(train), cfg.batch_size, info.rank, info.world, cfg.seed)
    loader_kw = dict(num_workers=cfg.workers, pin_memory=info.device.type == "cuda",
                     collate_fn=collate_skip_none if cfg.skip_bad_images else None,
                     worker_init_fn=ignore_stop_signals,
                     generator=torch.Generator())  # own generator: building an iterator must not draw from torch's
    train_loader = torch.utils.data.DataLoader(train, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                                               persistent_workers=cfg.workers > 0, **loader_kw)
    eval_loaders = {s: torch.utils.data.DataLoader(data[s], batch_size=cfg.batch_size,
                                                   sampler=EvalSampler(len(data[s]), info.rank, info.world),
                                                   persistent_workers=s == "val" and cfg.workers > 0, **loader_kw)
                    for s in ("val", "test") if data.get(s) is not None}
    sizes = {s: len(data[s]) for s in ("train", "val", "test") if data.get(s) is not None}
    return Data(data["classes"], num_classes, train, sampler, train_loader, eval_loaders, sizes)


def find_checkpoint(cfg: Config, log) -> tuple[dict | None, str | None]:
    """The checkpoint to resume from: --resume PATH, or with --resume auto the output directory's (None if none)."""
    if not cfg.resume:
        return None, None
    if cfg.resume == "auto":
        ckpt, path = load_checkpoint_with_fallback(cfg.output_dir, log)
        if ckpt is None:
            log(f"resume auto: no checkpoint in {cfg.output_dir}; starting from scratch")
        else:
            check_resumable(ckpt, path)
        return ckpt, path
    if os.path.isdir(cfg.resume):
        raise UserError(f"--resume {cfg.resume} is a folder: give its checkpoint.pth, or use --resume auto with "
                        f"--output-dir {cfg.resume}")
    if not os.path.isfile(cfg.resume):
        raise UserError(f"--resume {cfg.resume} does not exist (use --resume auto to continue the output dir)")
    try:
        ckpt = verify_and_load(cfg.resume)
    except CorruptCheckpoint as e:
        prev = os.path.join(os.path.dirname(cfg.resume), CHECKPOINT_PREV)
        hint = (f"try {prev}" if os.path.isfile(prev) and not os.path.samefile(prev, cfg.resume)
                else "give a checkpoint.pth written by pgnm.py")
        raise UserError(f"--resume {cfg.resume} is unusable ({e}); {hint}") from None
    check_resumable(ckpt, cfg.resume)
    return ckpt, cfg.resume


def use_channels_last(cfg: Config, device: torch.device) -> bool:
    """--channels-last / --no-channels-last, else automatic: NHWC where it is faster, on CUDA under --amp (tensor-core
    convolutions want NHWC; in fp32 on GPU and on CPU the gain is small or negative)."""
    return bool(cfg.channels_last) if cfg.channels_last is not None else (device.type == "cuda" and cfg.amp)


def sgd_implementation(device: torch.device) -> dict:
    """The fastest SGD step a device has, as SGD keyword arguments: on CUDA one fused kernel for all parameters
    (fused=True, torch >= 2.3), else torch's default (multi-tensor on CUDA, a per-parameter loop on CPU, whose
    results the CPU tests pin). Same update rule either way."""
    if device.type != "cuda":
        return {"fused": None, "foreach": None}
    return {"fused": True, "foreach": None}


def make_sgd(params, device: torch.device, **kw) -> torch.optim.SGD:
    return torch.optim.SGD(params, **kw, **sgd_implementation(device))


def build_run(cfg: Config, info: DistInfo, num_classes: int, resuming: bool, log) -> tuple[Run, StepState]:
    """The networks (initial classifier weights from --finetune, or the heated model for phase finetune), SyncBN,
    device and memory format, SGD optimisers (policy lr = lr * policy_lr_ratio), schedulers, GradScaler, MixUp,
    and alpha_d, beta_d ~ U[0, 1) (the authors' code) from a generator that is the same on every rank."""
    dev = info.device
    model = build_model(cfg.model, num_classes)
    policy = PolicyNet(cfg.grid, cfg.policy_model) if cfg.phase == "heated" and cfg.noise == "beta" else None
    init_from = cfg.finetune
    if init_from is None and cfg.phase == "finetune" and not resuming:
        init_from = default_finetune_path(cfg.output_dir)
        if not os.path.isfile(init_from):
            raise UserError(f"no heated model at {init_from}: run `python pgnm.py --phase heated` first "
                            f"(with the same --data-path), or pass --finetune PATH")
    if init_from and not resuming:
        load_into_classifier(model, load_classifier_weights(init_from), init_from, cfg.model, log)
        bad = nonfinite_tensors(model.state_dict())
        if bad:
            raise UserError(f"{init_from} holds NaN/inf weights ({', '.join(bad[:3])}): a run cannot start from it")
        log(f"initialised the classifier from {init_from}")
    if cfg.sync_bn and info.distributed and dev.type != "cuda":
        log("note: --sync-bn needs GPUs (SyncBatchNorm has no CPU kernel); BatchNorm stays per process")
    elif cfg.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        policy = nn.SyncBatchNorm.convert_sync_batchnorm(policy) if policy is not None else None
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(dev, memory_format=memory_format)
    policy = policy.to(dev, memory_format=memory_format) if policy is not None else None
    optimizer = make_sgd(model.parameters(), dev, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    pol_optimizer = (make_sgd(policy.parameters(), dev, lr=cfg.lr * cfg.policy_lr_ratio, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay) if policy is not None else None)
    scheduler, pol_scheduler = build_schedulers(cfg, optimizer, pol_optimizer)
    scaler = torch.amp.GradScaler("cuda") if cfg.amp and dev.type == "cuda" and cfg.amp_dtype == "float16" else None
    run = Run(cfg, info, model, optimizer, scheduler, policy=policy, pol_optimizer=pol_optimizer,
              pol_scheduler=pol_scheduler, scaler=scaler, mixup=build_mixup(cfg, num_classes))
    state = StepState()
    if policy is not None:
        g = torch.Generator().manual_seed(cfg.seed)
        state.alpha_d = torch.rand((1, cfg.grid ** 2), generator=g).to(dev)
        state.beta_d = torch.rand((1, cfg.grid ** 2), generator=g).to(dev)
    return run, state


def restore_run(run: Run, state: StepState, ckpt: dict, ckpt_path: str, steps_per_epoch: int, log) -> Progress:
    """Restore every state from a checkpoint and say where training continues."""
    check_same_data(ckpt.get("data"), run.data_id, ckpt_path)
    restore_checkpoint(run, state, ckpt, ckpt_path)
    start = Progress(int(ckpt["epoch"]), int(ckpt["step"]))
    if start.step >= int(ckpt.get("steps_per_epoch", steps_per_epoch)):
        start = Progress(start.epoch + 1, 0)
    if start.epoch > run.cfg.epochs or (start.epoch == run.cfg.epochs and start.step > 0):
        raise UserError(f"{ckpt_path} has trained {start.epoch} epochs{' and part of one more' if start.step else ''}, "
                        f"more than --epochs {run.cfg.epochs}: give --epochs {start.epoch + (start.step > 0)} or more "
                        f"(its weights alone: --finetune {ckpt_path})")
    elif ckpt.get("steps_per_epoch") != steps_per_epoch:
        raise UserError(f"{ckpt_path} was written mid-epoch with {ckpt.get('steps_per_epoch')} steps per epoch, "
                        f"this run has {steps_per_epoch}: resume with the same number of processes and --batch-size")
    else:
        start.meter = ckpt.get("meter") or start.meter
    apply_new_schedule(run, ckpt.get("args") or {}, start.epoch, ckpt_path, log)
    note_other_changes(run.cfg, ckpt.get("args") or {}, start, ckpt_path, log)
    log(f"resumed from {ckpt_path}: epoch {start.epoch + 1}, step {start.step}")
    if run.info.is_main:
        out = run.cfg.output_dir
        bad = os.path.join(out, CHECKPOINT)
        if os.path.abspath(ckpt_path) == os.path.abspath(os.path.join(out, CHECKPOINT_PREV)) and os.path.lexists(bad):
            os.replace(bad, bad + ".corrupt")   # kept for inspection; the next save must not rotate it over prev
            log(f"moved the unusable {bad} to {bad}.corrupt")
        _trim_log(os.path.join(out, "log.jsonl"), start.epoch)
    return start


def compile_networks(run: Run) -> None:
    """torch.compile the classifier and the policy (the networks only: the Beta sampling, the mask and the objective
    stay eager, in float32). reduce-overhead also replays each network's kernels as CUDA graphs (see train_step)."""
    mode = None if run.cfg.compile_mode == "default" else run.cfg.compile_mode
    run.model = torch.compile(run.model, mode=mode)
    run.policy = torch.compile(run.policy, mode=mode) if run.policy is not None else None


def wrap_for_training(run: Run) -> None:
    """DDP (after SyncBN, before compile) and torch.compile around the networks; run.*_raw stay the modules. The SGD
    implementation is set for this device again: a restored optimiser state carries the flags of the machine that
    wrote it (a GPU's fused=True would fail on a CPU with an older torch)."""
    for opt in run.optimizers():
        for group in opt.param_groups:
            group.update(sgd_implementation(run.info.device))
    if run.info.distributed:
        ids = [run.info.device.index] if run.info.device.type == "cuda" else None
        run.model = nn.parallel.DistributedDataParallel(run.model, device_ids=ids)
        if run.policy is not None:
            run.policy = nn.parallel.DistributedDataParallel(run.policy, device_ids=ids)
    if run.cfg.compile:
        compile_networks(run)


def log_header(cfg: Config, info: DistInfo, data: Data, log, malloc_tuned: bool = False) -> None:
    """What runs, where, with which code, data and settings, and where its outputs go (the whole configuration is
    in <output-dir>/config.json; the line prints what differs from the paper's defaults)."""
    dev = info.device
    log(f"pgnm {file_hash()} | python {sys.version.split()[0]} torch {torch.__version__} | device {dev}"
        f"{' (' + torch.cuda.get_device_name(dev) + ')' if dev.type == 'cuda' else ''} | world size {info.world}")
    if malloc_tuned:
        log("CPU allocator: glibc mmap/trim thresholds raised to 1 GiB so freed activations are reused "
            "(--no-malloc-tuning keeps glibc's defaults)")
    log(f"data: {cfg.data_path or 'built-in synthetic scans'} | {len(data.classes)} classes | "
        + " ".join(f"{s} {n}" for s, n in data.sizes.items())
        + f" | {data.steps_per_epoch} steps/epoch, effective batch {cfg.batch_size * info.world}")
    counts = np.bincount(np.asarray(data.train.targets, dtype=np.int64), minlength=data.num_classes)
    empty = [data.classes[k] if k < len(data.classes) else str(k) for k in np.flatnonzero(counts == 0)]
    if empty:                   # e.g. .npz labels {0, 2}: class 1 exists only as an output no image trains
        log(f"warning: {len(empty)} of {data.num_classes} classes have no training image (e.g. {empty[0]!r}): the "
            f"classifier cannot learn them; check the labels (or --num-classes)")
    log(f"config (preset: {preset_name(cfg)}; differs from the paper's defaults: {differences_text(cfg)}) | "
        f"full config: {os.path.join(cfg.output_dir, CONFIG_JSON)}")
    log(f"writing to {cfg.output_dir}{os.sep}: {CHECKPOINT} every epoch, log.jsonl"
        + (", masks_epochNNN.png" if cfg.save_masks and cfg.phase == "heated" else "")
        + f"; at the end model_{cfg.phase}.pth and curves.png (with matplotlib)")


def save_checkpoint(run: Run, state: StepState, epoch: int, step: int, steps_per_epoch: int, meter: dict) -> None:
    """Every rank builds the payload (the RNG states are gathered); rank 0 writes it, keeping the previous one. A
    payload with a NaN or inf anywhere is never written (Diverged: the previous checkpoints stay the last good ones);
    a failed write (disk full) stops every rank with rank 0's message."""
    payload = make_checkpoint(run, state, epoch, step, steps_per_epoch, meter)
    out = run.cfg.output_dir
    bad = nonfinite_tensors(payload)
    if any_rank([bool(bad)], run.info.device)[0]:       # BatchNorm statistics differ between ranks mid-epoch
        bad = bad or ["another rank's state"]
        raise Diverged(f"the training state holds NaN/inf ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}) at "
                       f"epoch {epoch + 1}, step {step}: not written, {os.path.join(out, CHECKPOINT)} stays the last "
                       f"good checkpoint; lower --lr or add --clip-grad-norm, and resume with --resume auto")
    error = None
    if run.info.is_main:
        try:
            atomic_save(payload, os.path.join(out, CHECKPOINT), os.path.join(out, CHECKPOINT_PREV))
        except UserError as e:
            error = e
    if any_rank([error is not None], run.info.device)[0]:
        raise error or UserError(f"rank 0 could not write the checkpoint in {out} (see its message)")


def epoch_record(run: Run, state: StepState, data: Data, epoch: int, stats: dict, meter: dict,
                 bad_images: int | None) -> dict:
    """The epoch's log.jsonl line: training loss and counters, then clean (and, heated, noisy) validation metrics."""
    n_ok = meter["n_ok"] + stats["n_ok"]
    train_loss = (meter["loss_sum"] + float(all_reduce_mean(stats["loss_sum"]))) / max(n_ok, 1)
    rec = {"phase": run.cfg.phase, "epoch": epoch + 1, "train_loss": train_loss,
           "lr": stats["lr"], "bad_steps": state.bad_total,
           "amp_skipped_steps": state.amp_skipped, "epoch_seconds": round(stats["seconds"], 2)}
    if bad_images is not None:
        rec["skipped_images"] = bad_images
    if state.alpha_d is not None:
        rec.update(alpha_d_mean=float(state.alpha_d.mean()), beta_d_mean=float(state.beta_d.mean()))
        clamped, sampled = clamp_counts(state, run.info.device)
        rec.update(clamped_elements=clamped, clamped_fraction=clamped / max(sampled, 1))
    val = data.eval_loaders["val"]
    rec.update({f"val_{k}": v for k, v in evaluate(run, state, val, epoch).items()})
    if run.heated:
        rec.update({f"val_noisy_{k}": v for k, v in evaluate(run, state, val, epoch, True).items()})
    return rec


EPOCH_LINE_KEYS = ("val_acc", "val_balanced_acc", "val_f1", "val_auroc", "val_entropy", "val_noisy_acc",
                   "val_noisy_balanced_acc", "mask_image_spread")     # the metrics an epoch's "done" line shows


def write_mask_figure(run: Run, epoch: int, fixed: FixedImages, masks: torch.Tensor, rec: dict) -> str:
    """<output-dir>/masks_epochNNN.png (--save-masks): the fixed validation images, their masks and the masked
    images, titled with the epoch's mask statistics. Returns the path."""
    cfg, n = run.cfg, len(fixed.names)
    path = os.path.join(cfg.output_dir, f"masks_epoch{epoch + 1:03d}.png")
    head = f"{cfg.phase} epoch {epoch + 1}/{cfg.epochs}: "
    title = [head + (f"the masks the policy gives {n} fixed validation images (same images and seed every epoch)"
                     if run.policy is not None else f"--noise {cfg.noise} masks (no policy) on {n} fixed validation "
                                                    f"images")]
    if "mask_image_spread" in rec:
        title.append(f"expected mask value E[M]: dataset-level {rec['mask_mean_dataset']:.3f}; spread "
                     f"across images {rec['mask_image_spread']:.4f} (0 = the same mask for every image)")
    save_mask_figure(path, fixed.x, masks, cfg.mean, cfg.std, fixed.names, title)
    return path


def train_epochs(run: Run, state: StepState, data: Data, start: Progress, log,
                 preemption: Preemption | None = None) -> dict:
    """The epoch loop: train (checkpointing every --save-every-steps and on a stop signal), average BatchNorm
    statistics over ranks, step the schedulers, evaluate, follow the fixed images' masks, log, checkpoint, and
    with --save-masks draw the mask figure. Returns the last epoch's record. A stop signal that arrives outside a
    step (setup, evaluation) stops at the next epoch boundary or step; an epoch in which every step was skipped
    raises Diverged."""
    cfg, out_dir, spe = run.cfg, run.cfg.output_dir, data.steps_per_epoch
    log_path = os.path.join(out_dir, "log.jsonl")
    sizes = data.sizes
    clock = RunClock(cfg.epochs, spe, sizes.get("test", 0) / max(sizes.get("val", 1), 1))
    fixed = fixed_images(data.eval_loaders["val"].dataset, data.classes) if run.heated else None
    last: dict = {}
    with (contextlib.nullcontext(preemption) if preemption is not None else Preemption()) as preemption:
        if start.epoch < cfg.epochs and any_rank([preemption.signalled], run.info.device)[0]:
            raise TrainingStopped("stop requested by signal before training began (nothing new to checkpoint)")
        for epoch in range(start.epoch, cfg.epochs):
            t_start = time.perf_counter()
            step0 = start.step if epoch == start.epoch else 0
            meter = dict(start.meter) if epoch == start.epoch else {"loss_sum": 0.0, "n_ok": 0}
            data.sampler.set_epoch(epoch, step0)
            if step0 == 0:                 # a resumed mid-epoch run keeps the counts restored from its checkpoint
                state.clamped, state.sampled = None, 0
            bad0 = data.train.bad_count.value if data.train.bad_count is not None else 0

            def on_step(step, loss_sum, n_ok, stop, epoch=epoch, meter=meter):
                if stop or (cfg.save_every_steps and step % cfg.save_every_steps == 0 and step < spe):
                    so_far = {"loss_sum": meter["loss_sum"] + float(loss_sum), "n_ok": meter["n_ok"] + n_ok}
                    save_checkpoint(run, state, epoch, step, spe, so_far)

            stats = train_one_epoch(run, state, data.train_loader, epoch, step0, log, on_step, preemption, clock)
            t_trained = time.perf_counter()
            if meter["n_ok"] + stats["n_ok"] == 0:
                raise Diverged(f"every step of epoch {epoch + 1} was skipped (non-finite loss or gradients, or no "
                               f"readable batch): nothing was learned; lower --lr, add --clip-grad-norm, or drop --amp "
                               f"(the last good checkpoint is kept)")
            for net in run.networks():
                average_buffers(net)
            step_schedulers(run)
            bad_images = data.train.bad_count.value - bad0 if data.train.bad_count is not None else None
            rec = epoch_record(run, state, data, epoch, stats, meter, bad_images)
            follow = fixed is not None and (run.policy is not None or cfg.save_masks)
            masks = policy_masks(run, state, fixed.x) if follow else None
            if masks is not None and masks[1] is not None:
                rec.update(mask_statistics(masks[1], state.alpha_d.cpu(), state.beta_d.cpu()))
            if run.info.is_main:       # the line first: a run killed before the checkpoint re-trains the epoch,
                _append_jsonl(log_path, rec)                # and the resume trims the line again
                if cfg.average_last and epoch >= cfg.epochs - cfg.average_last:   # before the checkpoint, likewise
                    os.makedirs(os.path.join(out_dir, EPOCH_WEIGHTS), exist_ok=True)
                    atomic_save(run.model_raw.state_dict(), epoch_weights_path(out_dir, epoch + 1))
            figure = None                  # likewise: a run stopped before the checkpoint draws it again on resume
            if run.info.is_main and cfg.save_masks and masks is not None:
                figure = write_mask_figure(run, epoch, fixed, masks[0], rec)
            save_checkpoint(run, state, epoch, spe, spe, {"loss_sum": 0.0, "n_ok": 0})
            clock.outside = time.perf_counter() - t_trained     # evaluation and checkpoint, for the ETAs
            log(f"[{cfg.phase}] epoch {epoch + 1}/{cfg.epochs} done: train_loss {rec['train_loss']:.4f}  "
                + "  ".join(f"{k} {rec[k]:.4f}" for k in EPOCH_LINE_KEYS if k in rec)
                + f"  | epoch {datetime.timedelta(seconds=int(time.perf_counter() - t_start))}"
                  f"  run eta {clock.remaining(epoch, stats['sec_per_step'], 0, evaluated=True)}")
            if figure is not None:
                log(f"wrote {figure}")
            clock.outside = time.perf_counter() - t_trained
            last = rec
            if epoch + 1 < cfg.epochs and any_rank([preemption.signalled], run.info.device)[0]:
                raise TrainingStopped(f"stop requested by signal after epoch {epoch + 1}; checkpoint written, "
                                      f"continue with --resume auto")
    return last


def finish(run: Run, state: StepState, data: Data, last: dict, log) -> dict:
    """The test split (clean and, heated, noisy), the final log line and the classifier-only weights."""
    cfg, out_dir = run.cfg, run.cfg.output_dir
    final = {k: v for k, v in last.items() if k.startswith("val_")}
    if "test" in data.eval_loaders:
        test_loader = data.eval_loaders["test"]
        test = {f"test_{k}": v for k, v in evaluate(run, state, test_loader, cfg.epochs).items()}
        if run.heated:
            test.update({f"test_noisy_{k}": v for k, v in evaluate(run, state, test_loader, cfg.epochs, True).items()})
        final.update(test)
        log(f"[{cfg.phase}] test: " + "  ".join(f"{k} {v:.4f}" for k, v in test.items()
                                                if k in ("test_acc", "test_balanced_acc", "test_f1", "test_auroc",
                                                         "test_entropy", "test_noisy_acc")))
    if run.info.is_main:
        _append_jsonl(os.path.join(out_dir, "log.jsonl"), {"phase": cfg.phase, "epoch": cfg.epochs, "final": True,
                                                           **{k: v for k, v in final.items() if k.startswith("test_")}})
        atomic_save(run.model_raw.state_dict(), os.path.join(out_dir, f"model_{cfg.phase}.pth"))
        if cfg.average_last:
            average_last_epochs(cfg, log)
    final["output_dir"] = out_dir
    return final


def loads_into(model: str) -> str:
    """Which libraries' model of this name a saved classifier state_dict loads into (torchvision has no resnet10t)."""
    return f"timm's {model}" if model == "resnet10t" else f"timm's or torchvision's {model}"


def describe_output(name: str, cfg: Config) -> str:
    """One line on what a file in the output directory is."""
    if name == f"model_{cfg.phase}.pth":
        return f"the classifier's weights alone; loads into {loads_into(cfg.model)} with strict=True"
    if name == CHECKPOINT:
        return "the whole training state at the last epoch's end; --resume auto continues from it"
    if name == CHECKPOINT_PREV:
        return "the checkpoint before it, the fallback if checkpoint.pth is damaged"
    if name == "log.jsonl":
        return "one JSON line of metrics per epoch, then a final line with the test metrics"
    if name == CONFIG_JSON:
        return "every setting of this run"
    if name == "curves.png":
        policy = cfg.phase == "heated" and cfg.noise == "beta"
        return "losses, accuracies" + (" and the masks' statistics" if policy else "") + " per epoch"
    if name.startswith("masks_epoch"):
        masks = "the policy's masks" if cfg.noise == "beta" else f"the --noise {cfg.noise} masks"
        return f"{masks} on fixed validation images, one figure per epoch"
    if name.startswith(f"{EPOCH_WEIGHTS}/"):
        return f"the classifier's weights after that epoch, kept for --average-last {cfg.average_last}"
    if name.startswith(f"model_{cfg.phase}_avg"):
        return f"the mean of the last epochs' classifier weights (--average-last {cfg.average_last})"
    return "written by this run"


SERIES = ("masks_epoch", EPOCH_WEIGHTS + "/model_epoch")        # per-epoch files, listed as one line each


def written_since(out_dir: str, since: float) -> list[str]:
    """The files of the output directory (and its epoch_weights/) written since `since` (time.time()), but not the
    run's lock, in a fixed order: the model, the checkpoints, the log and the config, then figures and anything else by name."""
    if not os.path.isdir(out_dir):
        return []
    folders = [(out_dir, ""), (os.path.join(out_dir, EPOCH_WEIGHTS), EPOCH_WEIGHTS + "/")]
    names = [prefix + e.name for folder, prefix in folders if os.path.isdir(folder) for e in os.scandir(folder)
             if e.is_file() and ".tmp." not in e.name and e.name != ".lock" and e.stat().st_mtime >= since - 0.05]
    first = ("model_", CHECKPOINT, CHECKPOINT_PREV, "log.jsonl", CONFIG_JSON, "curves.png")
    return sorted(names, key=lambda n: (next((i for i, p in enumerate(first) if n.startswith(p)), len(first)), n))


def log_summary(cfg: Config, final: dict, seconds: float, files: Sequence[str], log) -> None:
    """The end of a phase: the metrics that matter, the wall time, every file written (with its path), what next."""
    split = "test" if "test_acc" in final else "val"
    names = {"acc": "acc", "balanced_acc": "balanced acc", "f1": "macro F1", "auroc": "AUROC"}
    metrics = "  ".join(f"{v} {final[f'{split}_{k}']:.3f}" for k, v in names.items() if f"{split}_{k}" in final)
    if f"{split}_noisy_acc" in final:
        metrics += (f"  | masked (\"noisy\") input: acc {final[f'{split}_noisy_acc']:.3f}  "
                    f"balanced acc {final[f'{split}_noisy_balanced_acc']:.3f}")
    log(f"[{cfg.phase}] finished in {datetime.timedelta(seconds=int(seconds))} ({cfg.epochs} epochs). "
        f"{split} split: {metrics}")
    log(f"[{cfg.phase}] files written:")
    width = max((len(os.path.join(cfg.output_dir, n)) for n in files), default=0)
    for n in files:
        head = next((p for p in SERIES if n.startswith(p)), None)
        series = [m for m in files if head is not None and m.startswith(head)]
        if series and n != series[0]:
            continue                           # a series of per-epoch files is one line: first .. last
        path = os.path.join(cfg.output_dir, n)
        if len(series) > 1:
            log(f"  {path} .. {os.path.join(cfg.output_dir, series[-1])}  ({len(series)} files) "
                f"{describe_output(n, cfg)}")
        else:
            log(f"  {path:<{width}}  {describe_output(n, cfg)}")
    model = os.path.join(cfg.output_dir, f"model_{cfg.phase}.pth")
    log(f"[{cfg.phase}] next: {next_command(cfg, model)}")


# What a fine-tuning run must share with its heated run: the network and what its images look like.
CARRIED_TO_FINETUNE = ("model", "num_classes", "train_crop_size", "val_resize_size", "val_crop_size",
                       "interpolation", "mean", "std", "val_split", "synthetic_size", "synthetic_per_class")


def next_command(cfg: Config, model: str) -> str:
    """The command to paste after a phase: heated -> finetune with what differs from the finetune preset among
    CARRIED_TO_FINETUNE (and --finetune unless the default path finds the model); else evaluate.py. Shell-quoted."""
    q = lambda v: shlex.quote(format_value(v))       # noqa: E731
    if cfg.phase != "heated":
        return f"python evaluate.py --checkpoints {q(model)}" + (" --data YOUR_UNSEEN_DATA" if cfg.data_path else "")
    ref = make_config("finetune", data_path=cfg.data_path)
    flags = [f"--data-path {q(cfg.data_path)}"] * (cfg.data_path is not None)
    flags += [f"--{k.replace('_', '-')} {q(getattr(cfg, k))}" for k in CARRIED_TO_FINETUNE
              if getattr(cfg, k) != getattr(ref, k)]
    if os.path.abspath(default_finetune_path(default_output_dir("finetune"))) != os.path.abspath(model):
        flags.append(f"--finetune {q(model)}")
    return " ".join(["python pgnm.py --phase finetune", *flags])


def main(cfg: Config) -> dict:
    """Run one phase end to end and return its final metrics ({'val_*', 'test_*', ...}). Raises UserError on bad
    input and TrainingStopped when training cannot go on; a checkpoint is kept either way."""
    validate_config(cfg)
    owns_group = not (dist.is_available() and dist.is_initialized())
    info = setup_distributed(cfg.device)
    cfg = dataclasses.replace(cfg, channels_last=use_channels_last(cfg, info.device))
    try:
        return run_phase(cfg, info)
    finally:
        if owns_group:
            cleanup_distributed()


@contextlib.contextmanager
def claim_output_dir(cfg: Config, info: DistInfo, log):
    """Rank 0 creates the output folder and holds its lock for the run (a second run there is refused), refuses a
    symbolic link at log.jsonl (never written through) and removes the temp files a killed run left. Every rank
    stops if rank 0 could not."""
    with contextlib.ExitStack() as stack:
        error = None
        if info.is_main:
            try:
                splits = [os.path.join(cfg.data_path, s) for s in ("train", "val", "test")] \
                    if cfg.data_path and os.path.isdir(cfg.data_path) else []
                inside = [s for s in splits if _inside(os.path.realpath(cfg.output_dir), os.path.realpath(s))]
                if inside:
                    raise UserError(f"--output-dir {cfg.output_dir} lies inside {inside[0]}: its figures would be "
                                    f"read as images of a class; choose a folder outside the split folders")
                try:
                    os.makedirs(cfg.output_dir, exist_ok=True)
                except OSError as e:
                    raise UserError(f"cannot create --output-dir {cfg.output_dir} ({e.strerror})") from None
                stack.enter_context(output_dir_lock(cfg.output_dir, log))
                earlier = [n for n in (CHECKPOINT, CHECKPOINT_PREV)
                           if os.path.lexists(os.path.join(cfg.output_dir, n))]
                if earlier and not cfg.resume:       # a new run there would rotate them away: work lost, silently
                    raise UserError(f"--output-dir {cfg.output_dir} holds an earlier run ({earlier[0]}): continue it "
                                    f"with --resume auto, or start afresh in another --output-dir (or remove it)")
                if earlier and cfg.resume != "auto" and os.path.realpath(os.path.dirname(os.path.abspath(
                        cfg.resume))) != os.path.realpath(cfg.output_dir):     # another run's checkpoint, continued here
                    raise UserError(f"--output-dir {cfg.output_dir} holds another run ({earlier[0]}) and --resume "
                                    f"{cfg.resume} is from elsewhere: continuing it here would overwrite that run; "
                                    f"give an --output-dir without a checkpoint")
                models = [n for n in sorted(os.listdir(cfg.output_dir)) if re.fullmatch(
                    rf"model_{cfg.phase}(_avg\d+)?\.pth", n)]      # a run's end (or --average-last) would replace it
                if not earlier and models:                            # and its checkpoints were deleted
                    raise UserError(f"--output-dir {cfg.output_dir} holds an earlier run's {models[0]} and no "
                                    f"checkpoint to continue: a new run would overwrite it; choose another "
                                    f"--output-dir, or move it away")
                kept = os.path.join(cfg.output_dir, EPOCH_WEIGHTS)
                if cfg.average_last and os.path.lexists(kept) and (os.path.islink(kept) or not os.path.isdir(kept)):
                    raise UserError(f"{kept} is in the way of --average-last's folder (a file or a link): move it "
                                    f"away or choose another --output-dir")
                log_path = os.path.join(cfg.output_dir, "log.jsonl")
                if os.path.islink(log_path):
                    raise UserError(f"{log_path} is a symbolic link: pgnm.py does not write through links it did not "
                                    f"create; remove it or choose another --output-dir")
                clean_temp_files(cfg.output_dir, log)
            except UserError as e:
                error = e
        if any_rank([error is not None], info.device)[0]:
            raise error or UserError(f"rank 0 could not use --output-dir {cfg.output_dir} (see its message)")
        yield


def run_phase(cfg: Config, info: DistInfo) -> dict:
    """One phase: data -> claim the output folder -> networks and optimisers -> restore -> train and evaluate every
    epoch -> test and save -> curves.png and a summary of the metrics, the wall time and every file written. A stop
    signal is caught from the start (see train_epochs)."""
    started, t0 = time.time(), time.perf_counter()
    log = (lambda *a, **k: print(*a, **k, flush=True)) if info.is_main else (lambda *a, **k: None)
    cfg = dataclasses.replace(cfg, output_dir=cfg.output_dir or default_output_dir(cfg.phase))
    with Preemption() as preemption:
        configure_runtime(cfg, info, log)
        data = build_data(cfg, info)
        with claim_output_dir(cfg, info, log):
            ckpt, ckpt_path = find_checkpoint(cfg, log)
            if ckpt is None and info.is_main:     # from scratch: lines of epochs no checkpoint kept are stale
                _trim_log(os.path.join(cfg.output_dir, "log.jsonl"), 0)
            run, state = build_run(cfg, info, data.num_classes, ckpt is not None, log)
            run.data_id = data_fingerprint(data.train, data.classes)
            start = (restore_run(run, state, ckpt, ckpt_path, data.steps_per_epoch, log) if ckpt is not None
                     else Progress())
            wrap_for_training(run)
            if info.is_main:
                write_json_atomic(dataclasses.asdict(cfg), os.path.join(cfg.output_dir, CONFIG_JSON))
            # Only now, with the inputs checked: a failed start should not speak of allocators.
            malloc_tuned = (info.device.type == "cpu" and not cfg.no_malloc_tuning
                            and tune_cpu_allocator(lambda *a: None))
            log_header(cfg, info, data, log, malloc_tuned)
            if 0 < cfg.epochs <= cfg.lr_warmup_epochs:
                log(f"warning: --lr-warmup-epochs {cfg.lr_warmup_epochs} is not shorter than --epochs {cfg.epochs}: the "
                    f"lr never leaves its warm-up (it stays below --lr {cfg.lr:g}); give fewer warm-up epochs")
            last = train_epochs(run, state, data, start, log, preemption)
            if not last and ckpt is not None:
                log(f"nothing to train: {ckpt_path} already finished {cfg.epochs} epochs")
                here = os.path.join(cfg.output_dir, CHECKPOINT)
                if info.is_main and not os.path.lexists(here):   # --resume OTHER into a new folder: keep it resumable
                    with open(ckpt_path, "rb") as fh:
                        write_atomic(here, fh.read())
            final = finish(run, state, data, last, log)
            if info.is_main:
                why_not = save_curves(os.path.join(cfg.output_dir, "log.jsonl"), os.path.join(cfg.output_dir,
                                                                                           "curves.png"))
                if why_not:
                    log(why_not)
                log_summary(cfg, final, time.perf_counter() - t0, written_since(cfg.output_dir, started), log)
            return final


# =====================================================================================================================
#  --bench: a heated step against its parts and against the authors' formulation
# =====================================================================================================================


def _authors_heated_step(model, policy, opt, pol_opt, base, x, y, cfg):
    """The authors' heated step, kept only as the --bench comparison point: heads run twice, a validated Beta,
    F.interpolate + dense torchvision blur, log(sum(exp)), fp32. (Their samples are clamped here too, or
    validation would raise on an exact 0/1.)"""
    f = policy.fe(x)
    new_a = 0.9 * base[0] + 0.1 * policy.alpha(f)
    new_b = 0.9 * base[1] + 0.1 * policy.beta(f)
    base[0] = (0.99 * base[0] + 0.01 * policy.alpha(f).detach().mean(0, keepdim=True)).detach()
    base[1] = (0.99 * base[1] + 0.01 * policy.beta(f).detach().mean(0, keepdim=True)).detach()
    d = torch.distributions.Beta(torch.exp(new_a), torch.exp(new_b), validate_args=True)
    m = d.sample().clamp(BETA_EPS, 1 - BETA_EPS)
    m_in = reference_upsample_blur(m, x.shape[-2:], cfg.kernel, cfg.sigma)
    out = model(x * m_in)
    loss = torch.mean(torch.log(torch.sum(d.log_prob(m).exp(), 1)) * F.cross_entropy(out, y))
    opt.zero_grad(set_to_none=True)
    pol_opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    pol_opt.step()


def bench_device(cfg: Config, log=print) -> tuple[DistInfo, Callable]:
    """The device of a bench process (its local rank's GPU under torchrun, see resolve_device), cuDNN autotuning on
    CUDA, and its log: the first process prints, the others run silently on their own GPUs."""
    rank, world, local = dist_env()
    dev = resolve_device(cfg.device, local, world)
    if rank != 0:
        log = lambda *a, **k: None          # noqa: E731
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True
    elif not cfg.no_malloc_tuning:
        tune_cpu_allocator(log)
    return DistInfo(0, 1, dev), log


def _scaled_step(run: Run, loss: torch.Tensor, optimizer) -> None:
    """backward + step of one optimiser, through the fp16 GradScaler when the run has one."""
    optimizer.zero_grad(set_to_none=True)
    if run.scaler is None:
        loss.backward()
        optimizer.step()
    else:
        run.scaler.scale(loss).backward()
        run.scaler.step(optimizer)
        run.scaler.update()


def bench_variants(cfg: Config, info: DistInfo) -> tuple[Run, dict[str, Callable]]:
    """The networks, optimisers and one fixed batch of --bench, and its variants (a)-(g) (see bench) as closures."""
    dev = info.device
    b, s, g = cfg.batch_size, cfg.train_crop_size, cfg.grid
    hcfg = dataclasses.replace(cfg, phase="heated", noise="beta", channels_last=use_channels_last(cfg, dev))
    fmt = torch.channels_last if hcfg.channels_last else torch.contiguous_format
    model = build_model(cfg.model, 1000).to(dev, memory_format=fmt)
    policy = PolicyNet(g, cfg.policy_model).to(dev, memory_format=fmt)
    opt = make_sgd(model.parameters(), dev, lr=1e-4, momentum=0.9, weight_decay=1e-4)
    pol_opt = make_sgd(policy.parameters(), dev, lr=1e-5, momentum=0.9, weight_decay=1e-4)
    authors_nets = [copy.deepcopy(n).to(memory_format=torch.contiguous_format) for n in (model, policy)]
    authors_opts = [torch.optim.SGD(n.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
                    for n, lr in zip(authors_nets, (1e-4, 1e-5))]
    scaler = torch.amp.GradScaler("cuda") if cfg.amp and dev.type == "cuda" and cfg.amp_dtype == "float16" else None
    run = Run(hcfg, info, model, opt, policy=policy, pol_optimizer=pol_opt, scaler=scaler)
    state = StepState(torch.rand(1, g * g, device=dev), torch.rand(1, g * g, device=dev))
    if cfg.compile:
        compile_networks(run)
    cuda_graphs = cfg.compile and cfg.compile_mode == "reduce-overhead" and dev.type == "cuda"
    mark_step = torch.compiler.cudagraph_mark_step_begin if cuda_graphs else (lambda: None)
    x_plain = torch.randn(b, 3, s, s, device=dev)
    x = x_plain.contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (b,), device=dev)
    x_masked = (x * make_mask(run, state, x)[0]).detach().contiguous(memory_format=fmt)
    bases = [[state.alpha_d.clone(), state.beta_d.clone()] for _ in range(2)]    # the authors' own alpha_d/beta_d

    def classifier_step(inp):                  # (a), (c): cross-entropy of the classifier alone
        mark_step()
        with run.autocast():
            out = run.model(inp)
        _scaled_step(run, F.cross_entropy(out.float(), y), opt)

    def policy_step():                         # (d): the policy, eq. 10-11, the Beta draw and its logP term
        mark_step()
        x_policy = x if cfg.policy_size is None else F.interpolate(x, size=cfg.policy_size, mode="bilinear",
                                                                   antialias=True)
        with run.autocast():
            log_a, log_b = run.policy(x_policy)
        _, logp = sample_beta_mask(mix_image_params(state.alpha_d, log_a.float(), 0.9),
                                   mix_image_params(state.beta_d, log_b.float(), 0.9))
        _scaled_step(run, torch.logsumexp(logp, 1).mean(), pol_opt)

    @torch.no_grad()
    def mask_only():                           # (e): sample + upsample + blur
        m, _ = sample_beta_mask(state.alpha_d.expand(b, -1), state.beta_d.expand(b, -1))
        upsample_blur(m, (s, s), cfg.kernel, cfg.sigma)

    return run, {
        "baseline": lambda: classifier_step(x),
        "heated": lambda: train_step(run, state, x, y),
        "classifier": lambda: classifier_step(x_masked),
        "policy": policy_step,
        "mask": mask_only,
        "authors": lambda: _authors_heated_step(run.model_raw, run.policy_raw, opt, pol_opt, bases[0], x, y, cfg),
        "authors_fp32": lambda: _authors_heated_step(*authors_nets, *authors_opts, bases[1], x_plain, y, cfg),
    }


def time_interleaved(variants: dict[str, Callable], rounds: int, warmup: int, dev: torch.device
                     ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Milliseconds of each variant per round, the variants run one after another in every round and the order
    rotated from round to round (no variant always runs first); the first `warmup` rounds are not kept. Also the
    host's milliseconds per call until it returned, before the device caught up: the time to queue its kernels."""
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in variants}
    host: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(warmup + rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync()
            t0 = time.perf_counter()
            variants[name]()
            t1 = time.perf_counter()
            sync()
            if r >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
                host[name].append((t1 - t0) * 1e3)
    return {k: np.asarray(v) for k, v in times.items()}, {k: np.asarray(v) for k, v in host.items()}


BENCH_LABELS = {"baseline": "(a) baseline classifier step", "heated": "(b) heated step (ours)",
                "classifier": "(c) classifier step, masked batch", "policy": "(d) policy step alone",
                "mask": "(e) mask pipeline alone", "authors": "(f) authors' heated step, these flags",
                "authors_fp32": "(g) authors' step as they ran it"}


def pace(dev: torch.device, host_share: float) -> str:
    """What a step's host share (time to queue it / its time) says: on a GPU, a share near 1 means the host's kernel
    launches, not the GPU, set the pace; a CPU runs each kernel as it is queued, so there the share is always ~1."""
    if dev.type == "cpu":
        return "a CPU runs what it queues: no verdict"
    return "the host's kernel launches set the pace" if host_share >= 0.8 else "the GPU sets the pace"


def bench(cfg: Config, rounds: int = 20, warmup: int = 3, log=print) -> dict:
    """Time, interleaved on one batch: (a) a baseline classifier step, (b) our heated step, (c) a classifier step on
    a pre-made masked batch, (d) a policy step alone, (e) the mask pipeline alone, (f) the authors' heated step with
    this run's memory format and optimiser (fp32: their code has no autocast), (g) the authors' heated step as they
    ran it: fp32, contiguous memory, no compile, torch's default SGD, on separate copies of the networks.
    (a)-(e) use the flags given (--amp, --amp-dtype, --channels-last, --compile, --policy-size).
    Prints medians and ratios and one JSON line; returns the numbers."""
    validate_config(dataclasses.replace(cfg, phase="heated"))
    info, log = bench_device(cfg, log)
    dev, b = info.device, cfg.batch_size
    torch.manual_seed(cfg.seed)
    run, variants = bench_variants(cfg, info)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t, host = time_interleaved(variants, rounds, warmup, dev)
    med = {k: float(np.median(v)) for k, v in t.items()}
    res = {f"{k}_ms": round(v, 3) for k, v in med.items()}
    res.update({f"{k}_host_ms": round(float(np.median(host[k])), 3) for k in ("baseline", "policy")})
    # Ratios are paired: computed within each round (its variants ran seconds apart), then the median over rounds,
    # so a machine whose speed drifts over minutes does not bias them.
    ratio = lambda num, den: round(float(np.median(num / den)), 4)     # noqa: E731
    res.update(heated_over_parts=ratio(t["heated"], t["classifier"] + t["policy"]),
               heated_over_baseline=ratio(t["heated"], t["baseline"]), mask_share=ratio(t["mask"], t["heated"]),
               authors_over_heated=ratio(t["authors"], t["heated"]),
               authors_fp32_over_heated=ratio(t["authors_fp32"], t["heated"]),
               heated_img_s=round(b / med["heated"] * 1e3, 1), peak_mem_mb=round(_memory_mb(dev), 1))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    flags = dict(device=str(dev), device_name=name, torch=torch.__version__, model=cfg.model,
                 policy_model=cfg.policy_model, batch_size=b, crop=cfg.train_crop_size, grid=cfg.grid,
                 amp=str(run.autocast().fast_dtype).replace("torch.", "") if cfg.amp else "off",
                 channels_last=run.cfg.channels_last, compile=cfg.compile_mode if cfg.compile else "off",
                 policy_size=cfg.policy_size, rounds=rounds,
                 sgd="fused" if sgd_implementation(dev)["fused"] else "default")
    log(f"bench: {cfg.model} + policy {cfg.policy_model}, batch {b}, {cfg.train_crop_size} px, grid {cfg.grid}, "
        f"kernel {cfg.kernel}, amp {flags['amp']}, channels-last {'on' if run.cfg.channels_last else 'off'}, "
        f"compile {flags['compile']}, policy size {cfg.policy_size or 'full'}, device {dev} ({name}), "
        f"median of {rounds}")
    for k, lab in BENCH_LABELS.items():
        q1, q3 = np.percentile(t[k], 25), np.percentile(t[k], 75)
        log(f"  {lab:<38} {med[k]:9.2f} ms  [{q1:.1f}-{q3:.1f}]  {b / med[k] * 1e3:9.1f} img/s")
    log(f"  heated / (classifier + policy) = {res['heated_over_parts']:.3f}   heated / baseline = "
        f"{res['heated_over_baseline']:.3f}   mask share of heated = {res['mask_share']:.4f}")
    log(f"  host time to queue a step: baseline {res['baseline_host_ms']:.2f} of {med['baseline']:.2f} ms, policy "
        f"{res['policy_host_ms']:.2f} of {med['policy']:.2f} ms ({pace(dev, res['baseline_host_ms'] / med['baseline'])})")
    log(f"  authors / ours = {res['authors_over_heated']:.3f}   authors as they ran it (fp32, contiguous) / ours = "
        f"{res['authors_fp32_over_heated']:.3f}   peak mem {res['peak_mem_mb']} MB")
    log(json.dumps({**res, **flags}))
    return res


def bench_data(cfg: Config, batches: int = 50, log=print) -> dict:
    """Images per second of the training data loader alone (decode + augmentation + collation)."""
    validate_config(dataclasses.replace(cfg, phase="baseline"))        # no masks drawn: the grid is not checked
    data = build_datasets(cfg)
    ds = data["train"]
    sampler = TrainSampler(len(ds), cfg.batch_size, seed=cfg.seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=cfg.workers, persistent_workers=False,
                                         collate_fn=collate_skip_none if cfg.skip_bad_images else None)
    if len(loader) < 2:
        raise UserError(f"--bench-data: {len(ds)} training images make {len(loader)} batch(es) of {cfg.batch_size}; "
                        f"the timing needs at least 2: lower --batch-size")
    n, t0, it = 0, 0.0, iter(loader)
    for i in range(min(batches + 1, len(loader))):
        x, _ = next(it)
        if i == 0:                       # the first batch pays for worker start-up: the clock starts after it
            t0 = time.perf_counter()
            continue
        n += x.shape[0]
    el = time.perf_counter() - t0
    res = {"images_per_s": round(n / el, 1), "workers": cfg.workers, "batch_size": cfg.batch_size, "images": n}
    log(f"bench-data: {cfg.data_path or 'synthetic'}: {res['images_per_s']} images/s with {cfg.workers} workers")
    log(json.dumps(res))
    return res


def bench_e2e(cfg: Config, steps: int = 150, log=print) -> dict:
    """End to end: images/s of heated training steps fed by the data loader from --data-path (decode, augmentation,
    collation, pinned copy to the device, with --workers processes), over images/s of the same step on one batch
    already on the device, in the same process. ratio 1.0: the loader is never waited for.

    The first max(20, 3 x workers) steps are not timed (start-up, cuDNN autotuning, compilation, and long enough for
    a loader slower than the step to have emptied its prefetch queue); the timed steps run on across epoch ends as a
    real run does. data_wait_share is the timed share spent waiting for batches."""
    validate_config(cfg)
    info, log = bench_device(cfg, log)
    dev = info.device
    cfg = dataclasses.replace(cfg, channels_last=use_channels_last(cfg, dev),
                              output_dir=cfg.output_dir or os.path.join("runs", "bench_e2e"))
    configure_runtime(cfg, info, log)
    data = build_data(cfg, info)
    run, state = build_run(cfg, info, data.num_classes, False, log)
    wrap_for_training(run)
    run.model.train()
    if run.policy is not None:
        run.policy.train()
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    warm = max(20, 3 * cfg.workers)

    def to_device(x, y):
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        return (x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x), y

    done, epoch, wait, first = 0, 0, 0.0, None
    t0 = t_end = time.perf_counter()
    while done < warm + steps:
        data.sampler.set_epoch(epoch)
        it = iter(data.train_loader)
        while done < warm + steps:
            t_wait = time.perf_counter()
            batch = next(it, None)
            if batch is None:
                break
            if done >= warm:
                wait += time.perf_counter() - t_wait
            x, y = to_device(*batch)
            first = first or (x, y)
            train_step(run, state, x, y)
            done += 1
            if done == warm:
                sync()
                t0 = time.perf_counter()
        epoch += 1
    sync()
    t_end = time.perf_counter()
    loader_s = t_end - t0
    x, y = first
    for i in range(warm // 2 + steps):         # the same step on a resident batch: what the device alone allows
        if i == warm // 2:
            sync()
            t0 = time.perf_counter()
        train_step(run, state, x, y)
    sync()
    resident_s = time.perf_counter() - t0
    b = cfg.batch_size
    res = {"e2e_img_s": round(steps * b / loader_s, 1), "resident_img_s": round(steps * b / resident_s, 1),
           "e2e_over_resident": round(resident_s / loader_s, 4), "data_wait_share": round(wait / loader_s, 4),
           "workers": cfg.workers, "batch_size": b, "steps": steps, "epochs_touched": epoch,
           "device": str(dev), "amp": str(run.autocast().fast_dtype).replace("torch.", "") if cfg.amp else "off",
           "channels_last": cfg.channels_last,
           "compile": cfg.compile_mode if cfg.compile else "off", "cpu_count": os.cpu_count()}
    log(f"bench-e2e: {cfg.model} heated, batch {b}, {cfg.train_crop_size} px, {cfg.workers} workers, {steps} timed "
        f"steps on {dev}: {res['e2e_img_s']} img/s from {cfg.data_path} vs {res['resident_img_s']} img/s on a "
        f"resident batch = {res['e2e_over_resident']:.3f} (waiting for data {100 * res['data_wait_share']:.1f}%)")
    log(json.dumps(res))
    return res


# =====================================================================================================================
#  CLI
# =====================================================================================================================


HELP_EPILOG = """\
defaults: "default" is the paper's recipe (heated and baseline with --data-path). Two presets change some values:
  finetune  --phase finetune with --data-path: the authors' finetune recipe
  demo      no --data-path: the built-in synthetic scans with a CPU-sized run (resnet10t, 64 px, 3-5 epochs)
Flags given on the command line override both. At start pgnm.py prints the preset in force and every value that
differs from the paper's defaults, and writes the whole configuration to <output-dir>/config.json."""


def build_parser() -> argparse.ArgumentParser:
    """Flags from Config's fields (authors' names kept: --data-path, -b/--batch-size, --wd, --grid, --kernel, ...).
    Every default is argparse.SUPPRESS so that only flags given on the command line override the presets."""
    p = argparse.ArgumentParser(prog="pgnm.py", description=__doc__.split("\n\n")[0], epilog=HELP_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(Config):
        flags = [f"--{f.name.replace('_', '-')}", *f.metadata.get("aliases", ())]
        help_ = f.metadata["help"]
        if f.name == "phase":
            help_ += f" (default {f.default})"
        elif f.name != "data_path" and not (f.default is None and "default" in help_):
            help_ += f" ({help_defaults(f.name)})"
        if f.type == "bool | None":              # tri-state: --flag / --no-flag / absent = automatic
            p.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, help=help_)
            continue
        if f.type in ("bool", bool):
            p.add_argument(*flags, dest=f.name, action="store_true", help=help_)
            continue
        base = str(f.type).replace(" | None", "")
        conv = {"int": int, "float": float, "str": str}[base]
        p.add_argument(*flags, dest=f.name, type=conv, help=help_)
    p.add_argument("--bench", action="store_true", help="time a heated step and its parts (see bench())")
    p.add_argument("--bench-data", metavar="PATH", help="time the training data loader alone on this data set")
    p.add_argument("--bench-rounds", type=int, help="timed rounds per variant (default 20)")
    p.add_argument("--average", nargs="+", metavar="PATH", help="average these weight or checkpoint files (e.g. the "
                   "authors' model_87..89.pth) into --average-output, and exit")
    p.add_argument("--average-output", metavar="PATH", help="where --average writes (default: model_avgN.pth next to "
                   "the first file)")
    p.add_argument("--bench-e2e", metavar="PATH", help="heated training steps fed from this ImageFolder with --workers "
                   "loader processes, over the same step on a batch already on the device (see bench_e2e())")
    p.add_argument("--bench-steps", type=int, help="--bench-e2e: timed steps (default 150)")
    return p


# Training flags --bench never reads (it times steps on random in-memory batches).
BENCH_UNREAD = ("data_path", "output_dir", "resume", "finetune", "epochs", "workers", "save_every_steps",
                "average_last", "save_masks")


# Training flags --bench-e2e and --bench-data never read (their PATH is the data; nothing is trained or resumed).
TIMING_UNREAD = ("data_path", "resume", "finetune", "epochs", "save_every_steps", "average_last", "save_masks")
MODE_UNREAD = {"--bench": BENCH_UNREAD, "--bench-e2e": TIMING_UNREAD, "--bench-data": TIMING_UNREAD + ("output_dir",)}


# Flags that only some runs read: (flag, what reads it) -> given without it, the run would silently ignore them.
MASK_FLAGS = ("grid", "kernel", "sigma", "noise", "objective", "tau_image", "tau_dataset", "policy_size", "policy_model",
              "policy_lr_ratio", "lr_min")
POLICY_FLAGS = ("objective", "tau_image", "tau_dataset", "policy_size", "policy_model", "policy_lr_ratio", "lr_min")


def unread_flags(phase: str, given: dict) -> dict:
    """The command-line flags this run would not read, each with the run that would: {field: why}. Judged on the
    flags given (presets set some of them for every phase; only what the user typed can be a mistake)."""
    why = {}
    for k in given:
        if k in MASK_FLAGS and phase != "heated":
            why[k] = f"--phase {phase} (it trains on clean images; masks are the heated phase's)"
        elif k in POLICY_FLAGS and given.get("noise", "beta") != "beta":
            why[k] = f"--noise {given['noise']} (fixed noise, no policy network)"
    needs = {"amp_dtype": ("amp", "--amp"), "compile_mode": ("compile", "--compile"),
             "ra_magnitude": ("auto_augment", "--auto-augment ra"),
             "augmix_severity": ("auto_augment", "--auto-augment augmix")}
    for k, (on, flag) in needs.items():
        if k in given and (not given.get(on) or (on == "auto_augment" and given[on] != flag.split()[-1])):
            why[k] = f"a run without {flag}"
    return why


def _one_line_usage_error(message: str):
    """argparse's error(), in one line (its default prints the whole usage first) and with exit code 2."""
    print(f"error: {message} (see python pgnm.py --help)", file=sys.stderr, flush=True)
    sys.exit(2)


def refuse_unread_flags(mode: str | None, phase: str | None, args: dict) -> None:
    """A usage error naming the flags this command would not read, rather than ignoring them: --average reads none,
    --bench and --bench-e2e time heated steps (no --phase; --bench no data or output flag), and a phase does not
    read another's flags (unread_flags). mode: the --average/--bench* flag given, if any; phase: --phase if given."""
    ignored = ["phase"] * (phase is not None and mode == "--average"
                           or phase not in (None, "heated") and mode in ("--bench", "--bench-e2e")) \
        + [k for k in (list(args) if mode == "--average" else MODE_UNREAD.get(mode, ())) if k in args]
    if ignored:
        _one_line_usage_error(f"{mode} does not use {', '.join('--' + k.replace('_', '-') for k in ignored)}: "
                              + ("it averages the files as they are" if mode == "--average" else
                                 "it times the loader on its PATH" if mode == "--bench-data" else
                                 "it times heated steps" + (" on random batches in memory (--bench-e2e PATH times "
                                                            "them on your data)" if mode == "--bench" else
                                                            " on its PATH"))
                              + "; drop the flag")
    unread = unread_flags(phase or "heated", args) if mode != "--average" else {}
    if unread:                                  # e.g. --phase baseline --noise uniform is no Table 4 ablation
        by: dict[str, list[str]] = {}
        for k, why in unread.items():
            by.setdefault(why, []).append("--" + k.replace("_", "-"))
        _one_line_usage_error("; ".join(f"{', '.join(flags)} not used by {why}" for why, flags in by.items())
                              + f": drop {'them' if len(unread) > 1 else 'it'}")


def cli(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0 done; 2 bad input or environment (one line on stderr, no traceback); 3 stopped by a signal after
    a checkpoint (requeue and --resume auto); 4 training diverged (the last good checkpoint is kept; change a flag
    before resuming); 130 Ctrl-C."""
    parser = build_parser()
    parser.error = _one_line_usage_error
    args = vars(parser.parse_args(argv))
    do_bench, bench_path = args.pop("bench", False), args.pop("bench_data", None)
    rounds = args.pop("bench_rounds", None)
    e2e_path, e2e_steps = args.pop("bench_e2e", None), args.pop("bench_steps", None)
    phase = args.pop("phase", None)
    average, average_output = args.pop("average", None), args.pop("average_output", None)
    for flag, value, needs, main_flag in (("--average-output", average_output, average, "--average"),
                                          ("--bench-rounds", rounds, do_bench, "--bench"),
                                          ("--bench-steps", e2e_steps, e2e_path, "--bench-e2e")):
        if value is not None and not needs:     # alone, it would be ignored and a training run would start
            other = [m for m, on in (("--bench", do_bench), ("--bench-data", bench_path), ("--bench-e2e", e2e_path),
                                     ("--average", average)) if on]
            _one_line_usage_error(f"{flag} only goes with {main_flag}: " + (f"{other[0]} does not read it" if other
                                                                            else "without it a training run would start"))
    rounds, e2e_steps = 20 if rounds is None else rounds, 150 if e2e_steps is None else e2e_steps
    for flag, value in (("--bench-rounds", rounds), ("--bench-steps", e2e_steps)):
        if value < 1:
            _one_line_usage_error(f"{flag} {value}: must be >= 1")
    modes = [m for m, on in (("--average", average), ("--bench", do_bench), ("--bench-data", bench_path is not None),
                             ("--bench-e2e", e2e_path is not None)) if on]
    if len(modes) > 1:                          # one would run and the others be ignored
        _one_line_usage_error(f"{' and '.join(modes)}: give one of them per command")
    refuse_unread_flags(modes[0] if modes else None, phase, args)
    phase = phase or "heated"
    try:
        if average:
            average_checkpoints(average, average_output or os.path.join(os.path.dirname(os.path.abspath(average[0])),
                                                                        f"model_avg{len(average)}.pth"),
                                then="run the command again")
            return 0
        for flag, path in (("--bench-e2e", e2e_path), ("--bench-data", bench_path)):
            if path is not None and not os.path.exists(path):      # before anything names it --data-path
                raise UserError(f"{flag} {path} does not exist: give an ImageFolder root (train/, val/) or a .npz")
        if e2e_path is not None:
            args["data_path"] = e2e_path
            bench_e2e(make_config("heated", **args), steps=e2e_steps)
            return 0
        if bench_path is not None:
            args["data_path"] = bench_path
            bench_data(make_config(phase, **args))
            return 0
        if do_bench:
            bench(Config(**args), rounds=rounds)           # the paper's defaults: resnet50, 224 px, grid 64
            return 0
        main(make_config(phase, **args))
        return 0
    except TrainingStopped as e:
        print(f"stopped: {failure_line(e)}", file=sys.stderr, flush=True)
        return 4 if isinstance(e, Diverged) else 3
    except (UserError, OSError) as e:
        print(f"error: {failure_line(e)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted; resume with --resume auto", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
