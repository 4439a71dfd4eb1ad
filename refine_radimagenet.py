"""Refine RadImageNet: from the raw download to stratified ImageFolder splits with ultrasound artifacts removed.

The PGNM paper pretrains on a "refined" RadImageNet (appendix A): stratified train/val/test splits, and ultrasound
images cleaned of burned-in text, markers, calipers, colour overlays and colour bars. The authors' script needs
their precomputed correction masks; this one does the whole job from the raw tree, or applies their masks.

    python refine_radimagenet.py --data-path /data/RadImageNet --output-dir /data/radimagenet_refined --workers 16
    python refine_radimagenet.py ... --split-csv-dir /data/RadImageNet     # the official RadiologyAI_*.csv splits
    python refine_radimagenet.py ... --correction-masks /data/correction_masks   # the authors' masks instead
    python refine_radimagenet.py --make-demo demo_raw                      # a small raw-like tree to try it on
    python refine_radimagenet.py --demo-report docs/refine_demo.png        # the cleaning's figures, measured

Input: <data-path>/radiology_ai/{CT,MR}/<anatomy>/<label>/*.png and radiology_ai/US/<label>/*.png.
Classes: CT__<anatomy>__<label>, MR__<anatomy>__<label>, US__<label> (165 on the full set).
Output: <output-dir>/{train,val,test}/<class>/<file>.png (8-bit), manifest.json (counts per class and split,
duplicates, blanks, unreadable files, the arguments, a checksum of every output) and manifest_images.csv (one row per
image: split, class, source, action, pixels changed, sha256). Re-running the same command resumes: finished outputs
are kept (each was written atomically) and only the rest is done. Bad input is one "error:" line on stderr and exit
code 2. Image work is numpy and PIL only (decoding comes from pgnm.py, so torch must be importable).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

import pgnm

MODALITIES = ("CT", "MR", "US")
IMG_EXTENSIONS = pgnm.IMG_EXTENSIONS         # one list of readable image files for the trainer and this tool
UserError = pgnm.UserError                   # one class, caught by every CLI of the project
RERUN = "re-run the same command (finished outputs are kept)"    # how a failed write ends (pgnm.write_atomic)
SPLITS = ("train", "val", "test")
CSV_NAMES = {s: f"RadiologyAI_{s}.csv" for s in SPLITS}


# =====================================================================================================================
#  Images: decoding, morphology, the fan, artifact detection and filling (numpy + PIL only)
# =====================================================================================================================
# An ultrasound frame as RadImageNet stores it: the scanner's image area (the "fan": a sector or a rectangle of
# tissue) on a black margin, both carrying burned-in annotation, the whole frame resized to 224 x 224. Detection
# works in three places: colour anywhere (Doppler, overlays, colour bars); anything non-black in the margin (text,
# rulers, markers, logos); inside the fan, thin bright structures that speckle and anatomy do not make: long straight
# lines (ROI boxes, rulers), rows of dots between two marks (calipers), dense rows of strokes (text), small crosses.
# The fan is estimated from each image: real frames differ in probe, depth and layout.


def read_image(path: str) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        return pgnm.to_8bit(im)


def _shifts(a: np.ndarray, r: int, fn, pad_mode="edge") -> np.ndarray:
    """fn (np.minimum / np.maximum / np.add) over the (2r+1)^2 neighbourhood, separably."""
    p = np.pad(a, r, mode=pad_mode)
    h, w = a.shape
    rows = p[:, r:r + w].copy() if fn is not np.add else p[:, r:r + w].astype(np.float64)
    for d in range(-r, r + 1):
        if d:
            rows = fn(rows, p[:, r + d:r + d + w])
    out = rows[r:r + h].copy()
    for d in range(-r, r + 1):
        if d:
            out = fn(out, rows[r + d:r + d + h])
    return out


# PIL's ImageFilter.MinFilter / MaxFilter(2r+1) give exactly these results (the tests use them as the oracle), but
# they sort every window: ~100x slower on a 224 x 224 frame (5 ms vs 0.05 ms for r = 1), and refinement calls these
# dozens of times per frame. The separable numpy version stays.
def erode(a, r):
    return _shifts(a, r, np.minimum)


def dilate(a, r):
    return _shifts(a, r, np.maximum)


def grow_mask(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation by a (2r+1)^2 square."""
    return dilate(mask.astype(np.uint8), r).astype(bool) if r > 0 else mask


def box_mean(a: np.ndarray, r: int) -> np.ndarray:
    """Mean over the (2r+1)^2 window (edge padding), by cumulative sums."""
    k = 2 * r + 1
    c = np.cumsum(np.cumsum(np.pad(np.asarray(a, np.float64), r, mode="edge"), 0), 1)
    c = np.pad(c, ((1, 0), (1, 0)))
    h, w = np.shape(a)
    return (c[k:k + h, k:k + w] - c[:h, k:k + w] - c[k:k + h, :w] + c[:h, :w]) / (k * k)


def shift(a: np.ndarray, dy: int, dx: int, fill=0) -> np.ndarray:
    """out[y, x] = a[y + dy, x + dx], `fill` where that falls outside."""
    h, w = a.shape
    out = np.full_like(a, fill)
    if abs(dy) >= h or abs(dx) >= w:
        return out
    sy, ty = (slice(dy, h), slice(0, h - dy)) if dy >= 0 else (slice(0, h + dy), slice(-dy, h))
    sx, tx = (slice(dx, w), slice(0, w - dx)) if dx >= 0 else (slice(0, w + dx), slice(-dx, w))
    out[ty, tx] = a[sy, sx]
    return out


def run_mean(a: np.ndarray, dy: int, dx: int, k0: int, k1: int) -> np.ndarray:
    """Mean of a over the pixels p + k * (dy, dx), k0 <= k <= k1 (0 outside the frame); along rows and columns by
    cumulative sums."""
    if (abs(dy), abs(dx)) not in ((0, 1), (1, 0)):
        return sum(shift(a, k * dy, k * dx) for k in range(k0, k1 + 1)) / (k1 - k0 + 1)
    axis, sgn = (1, dx) if dy == 0 else (0, dy)
    if sgn < 0:
        k0, k1 = -k1, -k0
    n = a.shape[axis]
    pad = [(0, 0), (0, 0)]
    pad[axis] = (max(0, -k0) + 1, max(0, k1))
    c = np.cumsum(np.pad(np.asarray(a, np.float64), pad), axis=axis)
    lo = np.arange(n) + k0 + pad[axis][0] - 1
    hi = np.arange(n) + k1 + pad[axis][0]
    return (np.take(c, hi, axis=axis) - np.take(c, lo, axis=axis)) / (k1 - k0 + 1)


def row_nanmean(a: np.ndarray) -> np.ndarray:
    """np.nanmean(a, 1) without its RuntimeWarning for a row with no finite value (NaN there too, so comparisons
    with it are False): a segment wholly off the frame, on a large frame, printed "Mean of empty slice"."""
    ok = np.isfinite(a)
    n = ok.sum(1)
    return np.where(n > 0, np.where(ok, a, 0.0).sum(1) / np.maximum(n, 1), np.nan)


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean mask: (labels, 0 = background, 1..n; n), by label propagation over
    neighbour pairs with pointer jumping."""
    flat = np.pad(mask, 1).ravel()
    w = mask.shape[1] + 2
    idx = np.flatnonzero(flat)
    labels = np.zeros(mask.shape, np.int32)
    if not idx.size:
        return labels, 0
    src = np.concatenate([idx[flat[idx + off]] for off in (1, w - 1, w, w + 1)])
    dst = np.concatenate([idx[flat[idx + off]] + off for off in (1, w - 1, w, w + 1)])
    root = np.arange(flat.size)
    while True:
        a, b = root[src], root[dst]
        differ = a != b
        if not differ.any():
            break
        low = np.minimum(a[differ], b[differ])
        np.minimum.at(root, a[differ], low)
        np.minimum.at(root, b[differ], low)
        while True:                                       # pointer jumping: every pixel points at its root
            nxt = root[root]
            if np.array_equal(nxt, root):
                break
            root = nxt
    _, inv = np.unique(root[idx], return_inverse=True)
    out = np.zeros(flat.size, np.int32)
    out[idx] = inv.ravel() + 1
    return out.reshape(mask.shape[0] + 2, w)[1:-1, 1:-1], int(inv.max()) + 1


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """mask plus every part of ~mask not 4-connected to the frame's border (flood fill by runs along rows and columns,
    alternately, until nothing changes)."""
    free = ~mask
    outside = np.zeros_like(mask)
    outside[[0, -1], :] = free[[0, -1], :]
    outside[:, [0, -1]] = free[:, [0, -1]]
    while True:
        before = int(outside.sum())
        for f, o in ((free, outside), (free.T, outside.T)):
            run = np.cumsum(np.diff(f.astype(np.int8), axis=1, prepend=0) == 1, axis=1) + \
                np.arange(f.shape[0])[:, None] * f.shape[1]
            hit = np.bincount(run[f & o], minlength=run.max() + 1) > 0
            o[...] = f & hit[run]
        if int(outside.sum()) == before:
            return ~outside


def convex_hull(mask: np.ndarray) -> np.ndarray:
    """The filled convex hull of a boolean mask (monotone chain over each row's two end pixels, drawn by PIL)."""
    rows = np.flatnonzero(mask.any(1))
    if rows.size == 0:
        return mask.copy()
    left = mask[rows].argmax(1)
    right = mask.shape[1] - 1 - mask[rows, ::-1].argmax(1)
    pts = sorted(set(zip(left.tolist(), rows.tolist())) | set(zip(right.tolist(), rows.tolist())))
    if len(pts) == 1:                                      # one pixel (PIL draws no polygon of one point)
        return mask.copy()

    def half(points):
        out = []
        for p in points:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(p)
        return out
    poly = half(pts)[:-1] + half(pts[::-1])[:-1]
    im = Image.new("1", (mask.shape[1], mask.shape[0]), 0)
    ImageDraw.Draw(im).polygon(poly or pts, fill=1, outline=1)
    return np.asarray(im, bool)


@dataclass(frozen=True)
class CleanParams:
    """Thresholds of ultrasound cleaning. Grey levels are 0..255; "contrast" is in units of the local speckle's
    standard deviation (z = (grey - local mean) / local std); lengths are pixels of the stored (224 x 224) frame."""
    colour_threshold: int = 24          # max(R,G,B) - min(R,G,B) above this is colour: Doppler, overlays, colour bars
    black_level: int = 14               # the margin is at most this bright; anything brighter there is annotation
    fan_open: int = 4                   # opening radius (px) that cuts margin annotation off the fan
    fan_min_area: float = 0.02          # a fan covers at least this fraction of the frame
    fan_dim: int = 100                  # patches touching the fan, solid and no brighter than this, are tissue
    local_radius: int = 7               # window radius (px) of the local speckle mean and std
    min_std: float = 6.0                # floor of the local std (grey levels), for flat and black regions
    near_field: int = 6                 # rows under the fan's top edge (skin line) where no line, dot or cross is sought
    text_near_field: int = 8            # ... nor text
    line_half: int = 16                 # ROI boxes, rulers: straight lines of at least 2 * line_half + 1 px, ...
    line_contrast: float = 1.0          # ... 1-2 px wide, this much brighter than both sides in each third of them
    edge_line_contrast: float = 1.3     # ... and this much within 2 px of the fan's edge
    caliper_peak: float = 2.5           # calipers: two marks (peaks above this contrast) at least ...
    caliper_min_length: int = 20        # ... this far apart, joined by dots or a line whose every fifth is ...
    caliper_contrast: float = 1.1       # ... this much brighter (3 x 3 maxima) than the parallels 3 px to either side,
    caliper_gap: float = 1.0            # ... with a fifth of the line (the gaps between dots) below this contrast,
    caliper_flank: float = 0.15         # ... or a solid line thin enough: 2 px to its sides, at most this share of it
    text_bright: float = 1.0            # text: pixels above this contrast ...
    text_fill: tuple = (0.35, 0.30)     # ... fill this fraction of a 15 x 5 window (seed, extension) ...
    text_edges: tuple = (7.0, 6.0)      # ... with this many bright/dark alternations per 15 px row (seed, extension)
    cross_peak: float = 2.8             # + and x marks: a peak above this contrast ...
    cross_arms: float = 1.1             # ... whose two arms outshine the directions 45+ degrees from both by this
    stroke_contrast: float = 2.5        # short vertical strokes (5 px) this much brighter than both sides
    glyph_level: float = 1.5            # glyphs: connected pixels above this contrast, ...
    glyph_size: int = 8                 # ... at least this many, ...
    glyph_contrast: float = 2.8         # ... this bright on average, ...
    glyph_ring: float = 0.2             # ... the pixels around them at most this bright on average, ...
    glyph_solid: float = 0.05           # ... and at most this share of them with all 8 neighbours in the piece
    continue_contrast: float = 1.5      # annotation in the margin or in colour continues into the fan along pixels
    continue_steps: int = 4             # ... above this contrast, up to this many px (text, marks across the edge)
    grow_contrast: float = 1.0          # a detection takes in the pixels above this contrast ...
    grow_steps: int = 1                 # ... within this many px
    halo: int = 1                       # finally the mask grows by this many px (anti-aliased, resampled edges)


def estimate_fan(grey: np.ndarray, p: CleanParams = CleanParams()) -> tuple[np.ndarray, np.ndarray]:
    """(fan, hull): the scanner's image area, from the frame itself. Non-black pixels, opened (annotation in the
    margin is thinner than the opening), holes filled (anechoic regions), plus the convex hull of the opened area's
    large parts and of what lies within 2 * fan_open px of them (an anechoic region on the fan's edge is still inside
    it, and so is a corner of tissue that it cut off). Then each piece of non-black left outside that touches it
    is decided whole: tissue if it lies within fan_open + 2 px of the hull (corners the opening rounded off) or if it
    is a solid patch (an acute corner, or one that a dark region cut off from the rest: 40% of its pixels have all 8
    neighbours in it, or 25% if it is no brighter than fan_dim); annotation otherwise (text or a ruler that touches
    the fan stays margin, all of it: strokes are thin)."""
    nonblack = grey > p.black_level
    core = grow_mask(erode(nonblack.astype(np.uint8), p.fan_open).astype(bool), p.fan_open)
    step = 4                                               # components are labelled on a 4x coarser grid: speed
    small, n = label_components(core[::step, ::step])
    hull = np.zeros_like(core)
    area = np.bincount(small.ravel(), minlength=n + 1)
    for k in np.flatnonzero(area[1:] * step * step >= p.fan_min_area * core.size) + 1:
        part = np.kron(small == k, np.ones((step, step), bool))[:core.shape[0], :core.shape[1]]
        hull |= convex_hull(core & grow_mask(part, step))
    if hull.any():                                         # with the corners a dark region cut off from the rest
        hull = convex_hull(core & grow_mask(hull, 2 * p.fan_open))
    fan = fill_holes(core) | hull
    band = grow_mask(hull, p.fan_open + 2)
    pieces, n = label_components(nonblack & ~fan)
    if n:
        count = lambda m: np.bincount(pieces[m], minlength=n + 1)  # noqa: E731
        size = count(pieces > 0)
        brightest = np.zeros(n + 1)
        np.maximum.at(brightest, pieces.ravel(), grey.ravel())
        solid = count(erode((pieces > 0).astype(np.uint8), 1).astype(bool))
        in_band = count(~band) == 0
        tissue = (count(grow_mask(fan, 1)) > 0) & (in_band | (solid >= 0.4 * size) |
                                                  ((brightest <= p.fan_dim) & (solid >= 0.25 * size)))
        tissue[0] = False
        fan = fan | tissue[pieces]
    solid = erode(nonblack.astype(np.uint8), 1).astype(bool) & band     # a corner that annotation touches: its solid
    fan = fan | grow_mask(grow_within(fan, fan | solid, 2 * p.fan_open), 1) & nonblack & band        # part
    rest = nonblack & ~fan                                 # a lone non-black pixel on the fan's border, darker than
    fan = fan | rest & (box_mean(rest, 1) < 1.5 / 9) & (grey < dilate(grey * fan, 1))   # the tissue next to it: the
    return fan | fan_nubs(grey, fan, nonblack & ~fan, p), hull     # fan's resampled edge (strokes are longer, ink lighter)


FAN_NUB = 3                             # a piece of at most this many non-black px outside the fan, touching it, all
                                        # darker than the brightest tissue it touches, is the fan's resampled corner


def fan_nubs(grey: np.ndarray, fan: np.ndarray, rest: np.ndarray, p: CleanParams = CleanParams()) -> np.ndarray:
    """The pieces of `rest` (non-black outside the fan) that are the tip of a sharp corner of the fan's top (a sector's
    horn, a linear probe's corner), cut off by the resize: at most FAN_NUB px, within near_field rows of the fan's
    first row, on top of the fan (fan right under one of its pixels), and darker than the brightest fan pixel next
    to them (a stroke that touches the fan is longer, or ink lighter than the tissue; a corner's tip fades out of it).
    Left in the margin, such a tip was annotation "continued" along the skin line."""
    if not fan.any():
        return np.zeros_like(fan)
    top = np.zeros(fan.shape, bool)
    top[:np.flatnonzero(fan.any(1))[0] + p.near_field] = True
    near = rest & grow_mask(fan, 1) & top
    if not near.any():
        return near
    pieces, n = label_components(rest & grow_mask(near, FAN_NUB))
    count = lambda w: np.bincount(pieces.ravel(), w, minlength=n + 1)  # noqa: E731
    brightest, beside = np.zeros(n + 1), np.zeros(n + 1)
    np.maximum.at(brightest, pieces.ravel(), grey.ravel())
    np.maximum.at(beside, dilate(pieces, 1).ravel(), (grey * fan).ravel())
    size = count(None)
    nub = (size <= FAN_NUB) & (count(shift(fan, 1, 0, False).ravel()) > 0) & (count(top.ravel()) == size) & \
        (brightest < beside)
    nub[0] = False
    return nub[pieces]


def local_contrast(grey: np.ndarray, tissue: np.ndarray, p: CleanParams = CleanParams()) -> np.ndarray:
    """z = (grey - local mean) / local std over tissue pixels in a (2r+1)^2 window; a second pass leaves out pixels
    more than 1.5 std from the first mean (annotation, specular reflections, anechoic neighbours) and rescales the
    truncated std (x 1/0.74, the std of a normal truncated at +-1.5)."""
    g = grey.astype(np.float64)
    w = tissue.astype(np.float64)
    r = p.local_radius
    n = np.maximum(box_mean(w, r), 1e-6)
    m = box_mean(g * w, r) / n
    s = np.sqrt(np.maximum(box_mean(g * g * w, r) / n - m * m, 0))
    w2 = w * (np.abs(g - m) <= 1.5 * s + 1e-9)
    n2 = box_mean(w2, r)
    few = n2 < 0.1
    n2 = np.maximum(n2, 1e-6)
    m2 = box_mean(g * w2, r) / n2
    s2 = np.sqrt(np.maximum(box_mean(g * g * w2, r) / n2 - m2 * m2, 0)) / 0.74
    return (g - np.where(few, m, m2)) / np.maximum(np.where(few, s, s2), p.min_std)


def below_top(fan: np.ndarray, rows: int) -> np.ndarray:
    """Fan pixels at least `rows` below the fan's first row in their column (outside the near field)."""
    first = np.where(fan.any(0), fan.argmax(0), fan.shape[0])
    return fan & (np.arange(fan.shape[0])[:, None] >= first[None, :] + rows)


def thin_ridge(z: np.ndarray, ny: int, nx: int) -> np.ndarray:
    """How much brighter each pixel is than both pixels just outside a 1-2 px band through it, across (ny, nx)."""
    s = {k: shift(z, k * ny, k * nx, 9.0) for k in (-2, -1, 1, 2)}
    return np.maximum(z - np.maximum(s[-1], s[2]), z - np.maximum(s[-2], s[1]))


def axis_lines(z, fan, hull, known, p: CleanParams = CleanParams()) -> np.ndarray:
    """Horizontal and vertical lines (ROI boxes, rulers): a thin ridge whose mean over each third of a
    2 * line_half + 1 px run is above line_contrast and at least half of the other thirds', extended to its ends
    through contiguous ridge pixels above LINE_ON and LINE_REL of the line's mean contrast. The run must be thin (not
    bright on both sides, as a specular streak is: LINE_WIDE). Known annotation
    (margin, colour) continues a line; outside the fan and in the near field, samples count as bright (no ridge
    along the fan's own border) except in the ring the opening took off (rulers that touch the fan)."""
    half, third = p.line_half, (2 * p.line_half + 1) // 3
    suppress = ~below_top(fan, p.near_field)
    ring = fan & ~grow_mask(hull, 1)
    edge = fan & ~erode(fan.astype(np.uint8), 2).astype(bool)    # the resize's overshoot makes a faint line here
    out = np.zeros(z.shape, bool)
    for (ny, nx), (dy, dx) in (((1, 0), (0, 1)), ((0, 1), (1, 0))):
        r_fan = np.where(ring, thin_ridge(z, ny, nx), thin_ridge(np.where(suppress, 9.0, z), ny, nx)) * fan
        r = np.where(known, 3.0, r_fan)
        parts = [run_mean(r, dy, dx, -half, -half + third - 1), run_mean(r_fan, dy, dx, -half + third, half - third),
                 run_mean(r, dy, dx, half - third + 1, half)]
        lo, hi = np.minimum.reduce(parts), np.maximum.reduce(parts)
        beside = np.where(fan, np.minimum(shift(z, ny, nx, 0.0), shift(z, -ny, -nx, 0.0)), 0.0)
        thin = run_mean(beside, dy, dx, -half, half) <= LINE_WIDE * run_mean(np.where(fan, z, 0.0), dy, dx, -half, half)
        hit = (lo > np.where(edge, p.edge_line_contrast, p.line_contrast)) & (lo > 0.5 * hi) & fan & (r_fan > 0.3) & thin
        on = (r_fan > np.where(edge, 1.0, 0.3)) & (z > LINE_ON)
        strength = np.where(hit, run_mean(np.where(fan, z, 0.0), dy, dx, -half, half), 0.0)   # of the hits within
        near = run_mean(hit, dy, dx, -half, half)                                              # half a run
        on &= z > LINE_REL * run_mean(strength, dy, dx, -half, half) / np.maximum(near, 1e-9)
        for sgn in (1, -1):                               # extend along the line through contiguous ridge pixels
            cur = hit
            for _ in range(half):
                cur = shift(cur, sgn * dy, sgn * dx, False) & on
                out |= cur
        out |= hit
    return out & fan


def peaks(z: np.ndarray, valid: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) of the 3 x 3 local maxima of z above t."""
    return np.nonzero((z >= dilate(z, 1)) & (z > t) & valid)


LINE_ON = 0.5                           # a line extends along its ridge where it is this much above the local mean
LINE_REL = 0.35                         # ... and at least this share of the line's mean contrast (over 33 px about each
                                        # hit within 16 px): it stops at a box's corner, not in the speckle past it
LINE_WIDE = 0.25                        # a line is 1-2 px wide: along its run the darker of the two pixels beside it
                                        # averages at most this share of the run's mean contrast (a specular streak in
                                        # the run is bright on both sides: 0.30-0.52 on seeds 4-11; box lines and
                                        # rulers 99.9% below 0.17, all of 42000 hits on seeds 0-11 below 0.33)
DOT_SCALE = 1.5                         # a caliper's dots: samples this many caliper_contrast above the sides
DOT_END_GAP, DOT_END_RUN = 9, 3         # a speck (dot samples within DOT_END_RUN px) at a segment's end, more than
                                        # DOT_END_GAP px from its other dots, is not painted: something in line with
                                        # them past the end mark (a thin specular reflection), not a dot
CALIPER_WIDE = 0.6                      # a caliper is 1-2 px wide: along it, the darker of the two pixels 1 px to its
                                        # sides averages at most this contrast (a specular streak, 2-4 px wide, is
                                        # bright on both sides of a path along it: 0.65-1.7 on seeds 4-11; calipers
                                        # and segments over other annotation at most 0.72, all but 2 of 7947 <= 0.6)


def joined_dots(at: np.ndarray) -> np.ndarray:
    """Which of a segment's dot samples (positions along it, px, ascending) to paint: not a speck (samples within
    DOT_END_RUN px) at either end that is more than DOT_END_GAP px from the other dots."""
    cut = np.flatnonzero(np.diff(at) > DOT_END_GAP) + 1
    keep = np.ones(at.size, bool)
    if cut.size and at[cut[0] - 1] - at[0] < DOT_END_RUN:
        keep[:cut[0]] = False
    if cut.size and at[-1] - at[cut[-1]] < DOT_END_RUN:
        keep[cut[-1]:] = False
    return keep


def caliper_lines(z, valid, lines, p: CleanParams = CleanParams(), max_peaks: int = 150) -> np.ndarray:
    """Dotted (or solid) straight segments between two strong peaks: calipers and the like. Each fifth of the segment
    must average caliper_contrast above the parallel segments 3 px to either side, and the segment must be thin (not
    bright on both sides 1 px off it, as a specular streak is). A segment that runs along the
    found `lines` for half its length is that line (an ROI box's side, which may end on a specular reflection)."""
    ys, xs = peaks(z, valid, p.caliper_peak)
    order = np.argsort(z[ys, xs])[::-1][:max_peaks]
    ys, xs = ys[order], xs[order]
    i, j = np.triu_indices(len(ys), 1)
    dy, dx = (ys[j] - ys[i]).astype(float), (xs[j] - xs[i]).astype(float)
    length = np.hypot(dy, dx)
    keep = length >= p.caliper_min_length
    i, j, dy, dx, length = i[keep], j[keep], dy[keep], dx[keep], length[keep]
    out = np.zeros(z.shape, bool)
    if not len(i):
        return out
    h, w = z.shape
    zv = np.where(valid, dilate(z, 1), np.nan)          # 3 x 3 maxima: a row of 1 px dots reads as a dashed line

    def along(sel, t, oy=0.0, ox=0.0):
        py = np.round(ys[i[sel]][:, None] + dy[sel][:, None] * t + oy).astype(int)
        px = np.round(xs[i[sel]][:, None] + dx[sel][:, None] * t + ox).astype(int)
        inside = (py >= 0) & (py < h) & (px >= 0) & (px < w)
        v = np.where(inside, zv[np.clip(py, 0, h - 1), np.clip(px, 0, w - 1)], np.nan)
        return np.where(np.isfinite(v), v, 0.0), np.isfinite(v)

    def mean(v, ok):
        return v.sum(1) / np.maximum(ok.sum(1), 1)
    coarse, ok = along(np.arange(len(i)), np.linspace(0.05, 0.95, 10))   # a cheap first look at every pair
    cand = np.flatnonzero(mean(coarse, ok) > p.caliper_contrast)
    t = np.linspace(0.03, 0.97, 40)
    ny, nx = (3 * dx / length)[cand][:, None], (-3 * dy / length)[cand][:, None]
    on, ok = along(cand, t)
    fifths = [mean(on[:, k * 8:(k + 1) * 8], ok[:, k * 8:(k + 1) * 8]) for k in range(5)]
    side = np.maximum(mean(*along(cand, t, ny, nx)), mean(*along(cand, t, -ny, -nx)))
    lo = np.minimum.reduce(fifths) if cand.size else np.zeros(0)
    def plain(oy=0.0, ox=0.0, k=slice(None)):           # z itself along the segment (no 3 x 3 maxima)
        py = np.clip(np.round(ys[i[cand[k]]][:, None] + dy[cand[k]][:, None] * t + oy).astype(int), 0, h - 1)
        px = np.clip(np.round(xs[i[cand[k]]][:, None] + dx[cand[k]][:, None] * t + ox).astype(int), 0, w - 1)
        return np.where(ok[k], z[py, px], np.nan)
    on_plain = plain()
    gaps = np.sort(np.where(ok, on_plain, np.inf), 1)[:, len(t) // 5] if cand.size else np.zeros(0)
    flank = np.maximum(row_nanmean(plain(2 * ny / 3, 2 * nx / 3)), row_nanmean(plain(-2 * ny / 3, -2 * nx / 3))) \
        if cand.size else np.zeros(0)
    thin = flank < p.caliper_flank * row_nanmean(on_plain) if cand.size else np.zeros(0, bool)
    k = np.flatnonzero((lo - side > p.caliper_contrast) & (lo > 0.4 * np.maximum.reduce(fifths)) & (ok.mean(1) > 0.9)
                       & ((gaps < p.caliper_gap) | thin)) if cand.size else cand
    wide = row_nanmean(np.minimum(plain(ny[k] / 3, nx[k] / 3, k), plain(-ny[k] / 3, -nx[k] / 3, k)))
    good = cand[k[wide <= CALIPER_WIDE]]
    near, along_lines = np.zeros(z.shape, bool), grow_mask(lines, 1)
    weaker = np.minimum(z[ys[i], xs[i]], z[ys[j], xs[j]])
    for a in good[np.lexsort((-length[good], -weaker[good]))]:   # the strongest ends first (the marks), then longest
        s = np.linspace(0, 1, int(length[a]) + 1)
        py, px = np.round(ys[i[a]] + dy[a] * s).astype(int), np.round(xs[i[a]] + dx[a] * s).astype(int)
        if near[py, px].mean() > 0.8 or along_lines[py, px].mean() > 0.5:
            continue                                      # mostly a segment already painted (its end past a mark)
        sy, sx = (3 * dx[a] / length[a], -3 * dy[a] / length[a])
        on, ok = along(np.array([a]), s)
        side = np.maximum(along(np.array([a]), s, sy, sx)[0], along(np.array([a]), s, -sy, -sx)[0])
        q = max(1, len(s) // 4)                           # the segment ends at its brightest sample near each end
        first, last = int(np.argmax(on[0, :q])), len(s) - q + int(np.argmax(on[0, -q:]))   # (the marks), not past them
        dots = np.flatnonzero(((on - side)[0] > DOT_SCALE * p.caliper_contrast) & ok[0])
        dots = dots[(dots >= first) & (dots <= last)]
        dots = dots[joined_dots(s[dots] * length[a])]
        if dots.size:                                     # paint the dots, not past an end; not the gaps between
            s = s[dots]                                   # them (tissue: the path runs up to 1 px beside the dots)
            out[np.round(ys[i[a]] + dy[a] * s).astype(int), np.round(xs[i[a]] + dx[a] * s).astype(int)] = True
            near = grow_mask(out, 1)
    return out                                            # (the bright pixels beside it join as the rim)


TEXT_STRONG = (0.40, 7.5)               # a word has a window past one of these (fill, alternations); speckle that
                                        # passes the seed test barely does
TEXT_SIDES = 0.34                       # both halves of a window this share of bright pixels: not past a word's end
                                        # (14 of a half's 40 px: at 11 the bright speckle past a word's last letter
                                        # passed; its letters' edges pass what that speckle does)
TEXT_LETTER = 1.5                       # of a text window, the pixels above this contrast are replaced, with their rim
TEXT_GROUND = 0.2                       # mean contrast of the non-bright pixels among letters: plain tissue


def text_rows(z, valid, p: CleanParams = CleanParams(), hw: int = 7, hh: int = 2) -> np.ndarray:
    """Burned-in text over tissue: windows of (2hw+1) x (2hh+1) px where bright pixels are dense and alternate with
    dark ones along the rows (letters); speckle is sparser and smoother, a specular reflection a single run."""
    bright = (z > p.text_bright) & valid
    edges = np.zeros(z.shape)
    edges[:, 1:] = bright[:, 1:] != bright[:, :-1]
    window = lambda a: run_mean(run_mean(a.astype(np.float64), 0, 1, -hw, hw), 1, 0, -hh, hh)  # noqa: E731
    fill, alternations = window(bright), window(edges) * (2 * hw + 1)
    dim = (z <= p.text_bright) & valid
    between = window(np.where(dim, z, 0.0)) / np.maximum(window(dim), 1e-6)    # letters stand on plain tissue
    seed = (fill > p.text_fill[0]) & (alternations > p.text_edges[0]) & (between < TEXT_GROUND) & valid & \
        ((fill > TEXT_STRONG[0]) | (alternations > TEXT_STRONG[1]))     # speckle barely passes: one test clearly
    if not seed.any():
        return seed
    half = lambda a, k0, k1: run_mean(run_mean(a.astype(np.float64), 0, 1, k0, k1), 1, 0, -hh, hh)  # noqa: E731
    sides = np.minimum(half(bright, -hw, 0), half(bright, 0, hw))
    region = grow_within(seed, (fill > p.text_fill[1]) & (alternations > p.text_edges[1]) & valid &
                         (sides > TEXT_SIDES), 20)
    core = region
    for _ in range(hh):
        core = core | shift(core, 1, 0, False) | shift(core, -1, 0, False)
    for _ in range(hw // 2):                              # window centres lie inside the word: reach its ends
                                                          # (a step more took speckle touching the last letter)
        core = core | ((shift(core, 0, 1, False) | shift(core, 0, -1, False)) & (z > p.text_bright))
    core &= valid
    return grow_within(core & (z > TEXT_LETTER), core & (z > 0.5), 1)   # what stands out, and its rim


def grow_within(seed: np.ndarray, allowed: np.ndarray, steps: int) -> np.ndarray:
    """Geodesic dilation of seed inside `allowed`, `steps` times."""
    m = seed & allowed
    for _ in range(steps):
        m = grow_mask(m, 1) & allowed
    return m


GLYPH_HEAD = 2                          # a glyph's solid pixels may be more than glyph_solid of it if they all fit in
                                        # a GLYPH_HEAD px square: an arrowhead's core (a reflection's is a longer row),
GLYPH_TAIL = 4                          # ... and its pixels further than this from that core lie to one side (its shaft;
                                        # a thin tilted reflection's streak runs out of its core both ways)


GLYPH_SMOOTH = (0.1, 5, 0.85, 11)       # a glyph with its ring above this mean contrast (though below glyph_ring), fewer
                                        # than this many pixels within MARK_FLAT[0] of its brightest grey and this share
                                        # of its convex hull filled is a reflection: an elliptical blob or straight
                                        # streak with one peak (letters, crosses and arrows bend or branch, ink is flat);
                                        # if it has this many pixels (a smaller cross or arrowhead fills its hull)


def glyphs(z, valid, p: CleanParams = CleanParams(), grey=None) -> np.ndarray:
    """Marks, arrows, letters over tissue: connected pieces of pixels above glyph_level that are big enough, bright
    on average, thin (no pixel with all 8 neighbours in the piece, or few; or an arrowhead: a solid core within a
    GLYPH_HEAD px square, the pixels beyond GLYPH_TAIL px of it on one side) and on plain tissue (the pixels around
    them are not bright). Speckle makes small or dim pieces, a specular reflection a solid one (a row of solid pixels,
    or a streak running out of its core both ways) in a bright halo, or (given grey) a convex one with a single peak
    in a faint halo (GLYPH_SMOOTH)."""
    bright = (z > p.glyph_level) & valid
    pieces, n = label_components(bright)
    if not n:
        return bright
    count = lambda w: np.bincount(pieces.ravel(), w, minlength=n + 1)  # noqa: E731
    size = np.maximum(count(None), 1)
    inner = erode(bright.astype(np.uint8), 1).astype(bool)
    solid = count(inner.ravel())
    sy, sx = np.nonzero(inner)
    span = np.zeros(n + 1, bool)                          # solid pixels spread over more than GLYPH_HEAD rows or columns
    for c in (sy, sx):
        lo, hi = np.full(n + 1, 1 << 30), np.full(n + 1, -1)
        np.minimum.at(lo, pieces[sy, sx], c)
        np.maximum.at(hi, pieces[sy, sx], c)
        span |= hi - lo >= GLYPH_HEAD
    ring = (dilate(pieces, 1) * (grow_mask(bright, 1) & ~bright & valid)).ravel()   # the pixels around each piece
    around = np.bincount(ring, z.ravel(), minlength=n + 1) / np.maximum(np.bincount(ring, minlength=n + 1), 1)
    keep = (size >= p.glyph_size) & (count(z.ravel()) / size >= p.glyph_contrast) & (around <= p.glyph_ring)
    head = keep & (solid > p.glyph_solid * size) & ~span
    keep &= solid <= p.glyph_solid * size
    for c in np.flatnonzero(head):                        # an arrowhead: what lies beyond GLYPH_TAIL of its core is
        at = pieces[sy, sx] == c                          # on one side (no two directions 120 degrees apart)
        ys, xs = np.nonzero(pieces == c)
        vy, vx = ys - sy[at].mean(), xs - sx[at].mean()
        d = np.hypot(vy, vx)
        tail = d > GLYPH_TAIL
        vy, vx = vy[tail] / d[tail], vx[tail] / d[tail]
        keep[c] = not tail.any() or (np.outer(vy, vy) + np.outer(vx, vx)).min() > -0.5
    smooth = keep & (around > GLYPH_SMOOTH[0]) & (size >= GLYPH_SMOOTH[3]) if grey is not None else []
    for c in np.flatnonzero(smooth):
        m = pieces == c
        keep[c] = (grey[m] > MARK_FLAT[0] * grey[m].max()).sum() >= GLYPH_SMOOTH[1] or \
            m.sum() < GLYPH_SMOOTH[2] * convex_hull(m).sum()
    keep[0] = False
    return keep[pieces]


MARK_ARMS = ((0, 4), (2, 6), (3, 5))   # arm pairs of cross marks, in steps of 22.5 degrees: +, x, x squeezed by the
                                        # 4:3 -> 1:1 resize


MARK_OTHERS = (2, 3)                    # the directions between a cross's arms are sampled this far out (px): a
                                        # 2 px wide arm lights the pixels next to the centre in every direction
MARK_SOLID = 2.0                        # not within 2 px of a blob: 5 of 9 pixels with all 8 neighbours above this
MARK_HALF = 1.0                         # each of the four half-arms (1-2 px from the centre) above this contrast
MARK_NOTCH = 1.5                        # the two darkest pixels next to the centre between the arms this much below
MARK_NOTCHES = {(0, 4): ((1, 1), (1, -1), (-1, 1), (-1, -1)), (2, 6): ((0, 1), (0, -1), (1, 0), (-1, 0)),
                (3, 5): ((0, 1), (0, -1))}  # the arms' mean: a cross is thin, a specular reflection a solid blob
MARK_SLACK = 0.3                        # speckle can pass peak, half-arm and notch tests each just: their summed
                                        # margins must exceed this (no true mark in the demo's 270 frames below 0.31)
MARK_BLACK = -3.0                       # a stroke has tissue on both sides: no pixel this dark within 1 px of them
MARK_UNEVEN = 0.4                       # a specular reflection seen as a cross: its weakest half-arm under this share of
                                        # the strongest (the blob's width across, against its length along) ...
MARK_HALO = 0.2                         # ... the pixels around its piece (above glyph_level) brighter than this on
                                        # average (a reflection's Gaussian skirt; ink's resampled edge is 1 px) ...
MARK_FLAT = (0.9, 4)                    # ... and fewer than 4 of the piece's pixels within 90% of its brightest grey
                                        # (ink fills an arrowhead or a crossing with one grey; a reflection has one peak)
MARK_FLANK = (0.8, 0.45)                # ... or the candidate below 80% of the brightest contrast within 1 px, on a piece
                                        # whose ring averages above 0.45 (however many of its pixels are near its top
                                        # grey): the flank of a brighter blob in a wide skirt (a cross's centre, where
                                        # its arms overlap, is as bright as the pixels next to it; ink's resampled
                                        # edge is 1 px: rings of true marks so tested on seeds 0-33 at most 0.44)


def halo_and_flat(pieces, n, z, grey, valid) -> tuple[np.ndarray, np.ndarray]:
    """Per piece (label 0..n): the mean contrast of the valid pixels around it, and how many of its pixels are within
    MARK_FLAT[0] of its brightest grey."""
    ring = (dilate(pieces, 1) * (grow_mask(pieces > 0, 1) & (pieces == 0) & valid)).ravel()
    halo = np.bincount(ring, z.ravel(), minlength=n + 1) / np.maximum(np.bincount(ring, minlength=n + 1), 1)
    top = np.zeros(n + 1)
    np.maximum.at(top, pieces.ravel(), grey.ravel())
    return halo, np.bincount(pieces.ravel(), (grey > MARK_FLAT[0] * top[pieces]).ravel(), minlength=n + 1)


def soft_peaks(z, valid, grey, p: CleanParams = CleanParams(), flank=None) -> np.ndarray:
    """Pixels of pieces above glyph_level that look like a specular reflection, not ink: a bright ring around them
    (above MARK_HALO) and a single peak (fewer than MARK_FLAT[1] pixels within MARK_FLAT[0] of the brightest grey),
    or, of the pixels in `flank` (on the edge of a brighter peak), a ring above MARK_FLANK[1] alone."""
    pieces, n = label_components((z > p.glyph_level) & valid)
    halo, flat = halo_and_flat(pieces, n, z, grey, valid)
    soft = (halo > MARK_HALO) & (flat < MARK_FLAT[1])
    wide = halo > MARK_FLANK[1]
    soft[0] = wide[0] = False
    return soft[pieces] if flank is None else soft[pieces] | (wide[pieces] & flank)


def small_marks(z, valid, grey, p: CleanParams = CleanParams()) -> np.ndarray:
    """Cross marks (+, x: a peak whose two arms, each bright on both sides of it, outshine every direction 45 degrees
    or more from both, with dark pixels between the arms next to the peak) and short vertical strokes (speckle and
    specular reflections run across the beam, i.e. mostly horizontally). An elongated reflection passes the cross
    test with its length and width as the arms: a peak whose arms are uneven (weakest half-arm under MARK_UNEVEN of
    the strongest) on a soft_peaks piece is none (a cross's arms are alike; an arrowhead's ink is flat and sharp),
    nor one on the flank of a brighter peak (MARK_FLANK) on a piece in a wide skirt (a broad-topped reflection)."""
    zv = np.where(valid, z, 0.0)
    blob = grow_mask(box_mean(erode((zv > MARK_SOLID).astype(np.uint8), 1), 1) > 4.5 / 9, 2)   # specular
    ys, xs = np.nonzero((z > p.cross_peak) & valid & ~blob)   # the test runs at the candidate peaks only
    zp = np.pad(zv, 4)                                    # 0 outside the frame (as shift fills)
    at = lambda oy, ox: zp[ys + 4 + oy, xs + 4 + ox]  # noqa: E731

    def spokes(reach):                                    # 16 half-arms: mean of z along each, from the centre
        out = []
        for k in range(16):
            offs = {(int(round(j * np.sin(np.pi * k / 8))), int(round(j * np.cos(np.pi * k / 8)))) for j in reach}
            out.append(sum(at(oy, ox) for oy, ox in offs) / len(offs))
        return out
    half, far = spokes((1, 2)), spokes(MARK_OTHERS)
    gap = lambda a, b: min(abs(a - b) % 8, 8 - abs(a - b) % 8)  # noqa: E731
    zc, best, uneven_best = z[ys, xs], np.full(len(ys), -np.inf), np.full(len(ys), -np.inf)
    for a, b in MARK_ARMS:
        others = np.maximum.reduce([(far[c] + far[c + 8]) / 2 for c in range(8) if gap(c, a) >= 2 and gap(c, b) >= 2])
        arms = np.minimum(half[a] + half[a + 8], half[b] + half[b + 8]) / 2
        weakest = np.minimum.reduce([half[a], half[a + 8], half[b], half[b + 8]])
        notch = np.sort([at(oy, ox) for oy, ox in MARK_NOTCHES[(a, b)]], 0)[:2].mean(0)
        uneven = weakest < MARK_UNEVEN * np.maximum.reduce([half[a], half[a + 8], half[b], half[b + 8]])
        thin = (weakest > MARK_HALF) & (notch < arms - MARK_NOTCH) & \
            ((zc - p.cross_peak) + (weakest - MARK_HALF) + (arms - notch - MARK_NOTCH) > MARK_SLACK)
        best = np.maximum(best, np.where(thin & ~uneven, arms - others, -np.inf))
        uneven_best = np.maximum(uneven_best, np.where(thin & uneven, arms - others, -np.inf))
    doubt = (uneven_best > p.cross_arms) & (best <= p.cross_arms)   # only these need the (slower) reflection test
    if doubt.any():
        flank = np.zeros(z.shape, bool)
        flank[ys, xs] = zc < MARK_FLANK[0] * np.maximum.reduce([at(oy, ox) for oy in (-1, 0, 1) for ox in (-1, 0, 1)])
        best = np.where(doubt & soft_peaks(z, valid, grey, p, flank)[ys, xs], best, np.maximum(best, uneven_best))
    cross = np.zeros(z.shape, bool)
    cross[ys[best > p.cross_arms], xs[best > p.cross_arms]] = True
    sides = valid & ~grow_mask(z < MARK_BLACK, 1)         # a fan edge beside black is no stroke's side
    vertical = run_mean(thin_ridge(np.where(sides, z, 9.0), 0, 1) * valid, 1, 0, -2, 2)
    seeds = cross | (vertical > p.stroke_contrast)
    return grow_within(seeds & valid, (z > p.grow_contrast) & valid, p.grow_steps)


RIM_CONTRAST, RIM_LEVEL = 1.0, 120    # beyond the halo, pixels above this contrast and grey level join a detection


def stroke_rim(found, z, grey, tissue) -> np.ndarray:
    """The tissue pixels next to what was found (halo included) that still look like annotation: above RIM_CONTRAST
    and brighter than RIM_LEVEL (burned-in strokes are light grey to white; their anti-aliased and resampled edges
    spread a px further than the halo where they are thick or bright). One px only: speckle beside a stroke stays."""
    return grow_mask(found, 1) & ~found & tissue & (z > RIM_CONTRAST) & (grey > RIM_LEVEL)


SKIN_ROWS, SKIN_HALF, SKIN_FLAT = 3, 10, 0.06   # an ROI line on the fan's first rows (the skin line): grey within
SKIN_END = 0.12                         # a skin line's run ends at its first pixel this share off the run's mean grey:
                                        # speckle that happens to be flat for a few px past the line's end stays


def skin_lines(grey, fan) -> np.ndarray:
    """ROI lines drawn along the fan's top edge, where the near field hides them from axis_lines: in the first
    SKIN_ROWS + 1 rows of the fan, runs of 2 * SKIN_HALF + 1 px whose grey varies by less than SKIN_FLAT of its mean
    (ink is one flat grey; skin is speckle, which varies by 10% or more over such a run). From each run's centre the
    line reaches out SKIN_HALF px each way, through pixels within SKIN_END of the run's mean only (a run ending on a
    line's last pixel holds tissue past it, as flat by chance)."""
    w = below_top(fan, 0) & ~below_top(fan, SKIN_ROWS + 1)
    g = grey * w
    n = run_mean(w.astype(np.float64), 0, 1, -SKIN_HALF, SKIN_HALF)
    m = run_mean(g, 0, 1, -SKIN_HALF, SKIN_HALF) / np.maximum(n, 1e-6)
    var = run_mean(g * g, 0, 1, -SKIN_HALF, SKIN_HALF) / np.maximum(n, 1e-6) - m * m
    flat = w & (n > 0.99) & (m > 60) & (var < (SKIN_FLAT * m) ** 2)
    out = flat.copy()
    rows = np.flatnonzero(flat.any(1))                     # the lines run along rows: only these rows are walked
    if rows.size == 0:
        return out
    band = slice(rows[0], rows[-1] + 1)
    for sgn in (1, -1):
        cur, ref = flat[band], np.where(flat, m, 0.0)[band]
        for _ in range(SKIN_HALF):
            ref = shift(ref, 0, sgn, 0.0)
            cur = shift(cur, 0, sgn, False) & (np.abs(grey[band] - ref) <= SKIN_END * ref)
            ref = np.where(cur, ref, 0.0)
            out[band] |= cur
    return out


FLAT_HALF = 8                           # a ruler or ROI line is one flat grey: along 2 * FLAT_HALF px of it, ...
FLAT_TOL = 3                            # ... FLAT_SHARE of the steps from a px to the next change grey by at most
FLAT_SHARE = 0.8                        # FLAT_TOL (speckle, even resampled, changes by more at nearly every step), ...
FLAT_LEVEL = 40                         # ... on px at least this bright (anechoic tissue is flat, but dark), ...
FLAT_SIDE = 0.5                         # ... with both px just outside a 1-2 px band through them darker than this
                                        # share of them (a thin line, not the flat top of a saturated reflection)


def flat_lines(grey) -> np.ndarray:
    """Horizontal and vertical lines of one flat grey (a depth ruler 1-2 px off a rectangular image, joined to it by
    the resize's dim halo, so that estimate_fan takes it for tissue; ROI sides): thin runs of 2 * FLAT_HALF px along
    which the grey stays within FLAT_TOL from px to px."""
    out = np.zeros(grey.shape, bool)
    for (ny, nx), (dy, dx) in (((1, 0), (0, 1)), ((0, 1), (1, 0))):
        s = {k: shift(grey, k * ny, k * nx, 0.0) for k in (-2, -1, 1, 2)}
        thin = np.minimum(np.maximum(s[-1], s[2]), np.maximum(s[-2], s[1])) < FLAT_SIDE * grey
        same = (np.abs(shift(grey, dy, dx, -99.0) - grey) <= FLAT_TOL) & thin & (grey >= FLAT_LEVEL)
        out |= run_mean(same.astype(np.float64), dy, dx, -FLAT_HALF, FLAT_HALF - 1) >= FLAT_SHARE
    return out


MARGIN_INK = 2                          # annotation continues into the fan from margin pixels this many times
                                        # black_level, through them only: the fan's resampled rim is dimmer


EDGE_TEXT = (7, 2, 4.0)                 # text on the fan's edge: in windows of (2 * 7 + 1) x (2 * 2 + 1) px, more than
                                        # 4 steps per row ...
EDGE_STEP = np.log(2)                   # ... where the grey changes by over x2 (between a letter and the gap beside it)
EDGE_TALL = 12                          # a line of letters is at most this many rows tall at 224 px (the demo's are 8 or
                                        # fewer); a taller piece is anatomy, such as a bright bone surface over its shadow


def edge_text(grey, fan, hull, p: CleanParams = CleanParams()) -> np.ndarray:
    """Text touching the image's first or last rows (a time stamp just above the tissue, a label just under it),
    which estimate_fan takes for tissue (a piece near the hull, as a corner the opening rounded off is): lit pixels
    of the fan outside the hull where the grey along the rows jumps to and fro as between letters (EDGE_TEXT,
    EDGE_STEP), with the lit pixels joined to them there. Tissue there is a corner of solid speckle: its steps are
    smaller. A piece taller than EDGE_TALL rows is not a line of letters."""
    hw, hh, steps = EDGE_TEXT
    strip = fan & ~hull & (grey > MARGIN_INK * p.black_level)
    ok = strip | (grey <= p.black_level)                   # steps between letters and their black gaps count too
    g = np.log(np.maximum(grey, 1.0))
    edges = np.zeros(grey.shape)
    edges[:, 1:] = (strip[:, 1:] | strip[:, :-1]) & ok[:, 1:] & ok[:, :-1] & (np.abs(g[:, 1:] - g[:, :-1]) > EDGE_STEP)
    seed = strip & (run_mean(run_mean(edges, 0, 1, -hw, hw), 1, 0, -hh, hh) * (2 * hw + 1) > steps)
    pieces, n = label_components(grow_within(seed, strip, hw))
    if not n:
        return pieces > 0
    rows = np.arange(grey.shape[0])[:, None] * np.ones(grey.shape[1], int)
    top, bottom = np.full(n + 1, grey.shape[0]), np.full(n + 1, -1)
    np.minimum.at(top, pieces.ravel(), rows.ravel())
    np.maximum.at(bottom, pieces.ravel(), rows.ravel())
    short = bottom - top < EDGE_TALL
    short[0] = False
    return short[pieces]


def artifact_parts(rgb: np.ndarray, p: CleanParams = CleanParams()) -> tuple[dict, np.ndarray, np.ndarray]:
    """({detector: mask of what it found}, fan, hull) of an ultrasound frame (H, W, 3) uint8."""
    x = rgb.astype(np.int16)
    colour = (x.max(2) - x.min(2)) > p.colour_threshold
    grey = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float64)
    fan, hull = estimate_fan(grey, p)
    margin = ~fan & (grey > p.black_level)
    tissue = fan & ~colour
    z = local_contrast(grey, tissue, p)
    inner = below_top(tissue, p.near_field)
    flat = flat_lines(grey) & fan                         # a ruler taken for tissue: its ticks continue from it, ...
    edge = edge_text(grey, fan, hull, p)                  # ... a time stamp's letters not (the skin under one would)
    known = margin | colour | flat | edge
    ink = margin & (grey > MARGIN_INK * p.black_level) | flat   # margin annotation, not the fan's dim resampled rim
    lines = axis_lines(z, tissue, hull, known, p)
    parts = {"colour": colour, "margin": margin, "flat": flat, "edge_text": edge,
             "continued": grow_within(ink, ink | (tissue & (z > p.continue_contrast) & (z - box_mean(z, 2) > 1.0)),
                                      p.continue_steps) & tissue,
             "lines": lines,
             "calipers": caliper_lines(z, inner, lines, p), "text": text_rows(z, below_top(tissue, p.text_near_field), p),
             "marks": small_marks(z, inner, grey, p), "skin": skin_lines(grey, tissue)}
    parts["glyphs"] = glyphs(z, inner & ~np.logical_or.reduce([parts[k] for k in ("continued", "lines", "calipers", "text")]), p,
                             grey)
    parts["rim"] = stroke_rim(grow_mask(np.logical_or.reduce(list(parts.values())), p.halo), z, grey, tissue)
    return parts, fan, hull


def detect_artifacts(rgb: np.ndarray, p: CleanParams = CleanParams()) -> tuple[np.ndarray, np.ndarray]:
    """(mask of pixels to replace, tissue region for the fill) of an ultrasound frame (H, W, 3) uint8."""
    parts, fan, hull = artifact_parts(rgb, p)
    rim = parts.pop("rim")                                # grown already: no halo around it
    return grow_mask(np.logical_or.reduce(list(parts.values())), p.halo) | rim, fan & grow_mask(hull, 1)


def _fill_offsets(radii=(3, 4, 5, 7, 9, 12, 16, 21, 28, 37, 49, 64, 85), angles: int = 16) -> list[tuple[int, int]]:
    """Source offsets for texture, nearest first."""
    out = []
    for r in radii:
        for k in range(angles):
            o = (int(round(r * np.sin(2 * np.pi * k / angles))), int(round(r * np.cos(2 * np.pi * k / angles))))
            if o not in out:
                out.append(o)
    return out


FILL_OFFSETS = _fill_offsets()
FILL_BASE_RADII = (4, 8, 16, 32, 64)     # local-mean windows (px), widened until the window holds known pixels
FILL_MAX_RATIO = 2.5                     # source pixels brighter than this many times their local mean (specular
                                         # reflections) are not copied, ...
FILL_MAX_LOG_STEP = np.log(1.5)          # ... nor sources whose local mean differs from the target's by over x1.5
FILL_TILE = 8                            # texture is copied in blocks of this many px square where it can be


def local_base(grey: np.ndarray, known: np.ndarray, need: np.ndarray) -> np.ndarray:
    """Smooth local mean of the known pixels (normalised box filter) at the `need` pixels, the window widened where it
    holds no known pixel (0 where even the widest holds none)."""
    g, k = grey.astype(np.float64), known.astype(np.float64)
    base = np.full(grey.shape, np.nan)
    for r in FILL_BASE_RADII:
        n = box_mean(k, r)
        undefined = np.isnan(base) & (n > 1e-9)
        base[undefined] = (box_mean(g * k, r)[undefined]) / n[undefined]
        if not np.isnan(base[need]).any():
            break
    return np.nan_to_num(base, nan=0.0)


def _copy_texture(ys, xs, base, ratio, source, tile) -> np.ndarray:
    """Speckle ratios for the pixels (ys, xs): for each tile x tile block, the nearest offset valid for at least 90% of
    its pixels (coherent patches keep the grain), then per pixel for the rest. A source is valid where it is clean
    tissue whose local mean is within x1.5 of the target's. 1.0 where no offset fits."""
    h, w = base.shape
    out = np.ones(len(ys))
    free = np.ones(len(ys), bool)
    block = (ys // tile) * (w // tile + 1) + xs // tile if tile else np.arange(len(ys))
    open_block = np.ones(block.max() + 1, bool)
    for oy, ox in FILL_OFFSETS:
        k = np.flatnonzero(free & open_block[block])
        if not k.size:
            break
        qy, qx = np.clip(ys[k] + oy, 0, h - 1), np.clip(xs[k] + ox, 0, w - 1)
        ok = source[qy, qx] & (qy == ys[k] + oy) & (qx == xs[k] + ox) & \
            (np.abs(np.log((base[qy, qx] + 1) / (base[ys[k], xs[k]] + 1))) < FILL_MAX_LOG_STEP)
        share = np.bincount(block[k], ok, minlength=len(open_block)) / np.maximum(
            np.bincount(block[k], minlength=len(open_block)), 1)
        take = ok & (share[block[k]] >= 0.9)
        out[k[take]] = ratio[qy[take], qx[take]]
        free[k[take]] = False
        open_block[np.unique(block[k[take]])] = False
    return out, free


def fill_artifacts(grey: np.ndarray, mask: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """Replace the masked pixels: inside the tissue by its local mean times speckle copied from nearby unmasked tissue
    (nearest clean sources of a similar local mean, in coherent blocks: grain, contrast and mean follow the
    surroundings); in the margin by the margin's local mean (black stays black). Unmasked pixels are returned
    unchanged.   -> uint8"""
    out = grey.astype(np.float64).copy()
    margin = mask & ~tissue
    if margin.any():
        out[margin] = local_base(grey, ~tissue & ~mask, margin)[margin]
    todo = mask & tissue
    if todo.any():
        known = tissue & ~mask
        base = local_base(grey, known, todo | known)
        ratio = np.where(base > 0.5, grey / np.maximum(base, 0.5), 1.0)
        source = known & ~grow_mask(mask, 1) & (ratio < FILL_MAX_RATIO)
        ys, xs = np.nonzero(todo)
        speckle, free = _copy_texture(ys, xs, base, ratio, source, FILL_TILE)
        if free.any():
            speckle[free] = _copy_texture(ys[free], xs[free], base, ratio, source, 0)[0]
        out[ys, xs] = base[ys, xs] * speckle
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def clean_ultrasound(img: Image.Image, p: CleanParams = CleanParams()) -> tuple[Image.Image, int]:
    """Remove colour and burned-in annotation from an ultrasound frame; returns (8-bit greyscale image, pixels
    replaced). Pixels outside the detected artifacts (and their `halo`) keep their grey value."""
    rgb = np.asarray(img.convert("RGB"))
    mask, tissue = detect_artifacts(rgb, p)
    grey = np.asarray(img.convert("L"))
    return Image.fromarray(fill_artifacts(grey, mask, tissue), mode="L"), int(mask.sum())


def apply_correction_mask(img: Image.Image, mask: np.ndarray) -> Image.Image:
    """The authors' correction: image resized to 224 x 224, plus their mask (saved in OpenCV's BGR order), clipped to
    0..255 (their uint8 addition wrapped around)."""
    rgb = img.convert("RGB")
    if rgb.size != (224, 224):
        rgb = rgb.resize((224, 224), Image.BILINEAR)
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[2] == 3:
        m = m[..., ::-1]                                  # BGR -> RGB
    elif m.ndim == 2:
        m = m[..., None]
    if m.shape[:2] != (224, 224):
        raise ValueError(f"correction mask has shape {np.asarray(mask).shape}, expected 224 x 224")
    out = np.clip(np.asarray(rgb, dtype=np.int32) + m.astype(np.int32), 0, 255).astype(np.uint8)
    if (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all():
        return Image.fromarray(out[..., 0], mode="L")
    return Image.fromarray(out, mode="RGB")


# =====================================================================================================================
#  Synthetic scanner frames: --make-demo, --demo-report and the tests' ground truth
# =====================================================================================================================
# What a scanner renders, at scanner resolution, then resized to 224 x 224 as RadImageNet stores it: a sector
# (convex probe, apex above the frame) or a rectangle (linear probe) of speckled tissue with layers, cysts, nodes
# and bright specular reflections (anatomy: they must survive), on a black margin; burned-in anti-aliased text of
# several sizes and grey levels in the margin and over tissue, a depth ruler with ticks, calipers (+ marks joined by
# a dotted line), single +, x and arrow marks, ROI boxes, colour Doppler with a colour bar, colourful segmentations.
# The clean frame is resized the same way: the truth against which removal and damage are measured. (pgnm.py's
# built-in ultrasound class is a different, 64 px toy; nothing here is shared with it.)

SCANNER_SIZE = (640, 480)             # (width, height) of a rendered scanner frame, px
STORE_SIZE = 224                      # RadImageNet's stored size
RESIZE_FILTERS = (Image.BILINEAR, Image.BICUBIC, Image.LANCZOS)   # one per frame, at random: stores differ
DEMO_WORDS = ("LYMPH NODE", "THYROID RT", "THYROID LT", "LIVER", "GB", "KIDNEY RT", "OVARY LT", "BREAST", "TRANS",
              "SAG", "LONG", "CBD", "PANC", "SPLEEN", "BLADDER")
DEMO_SITES = ("ST MARY HOSPITAL", "RADIOLOGY DEPT", "IMAGING CENTER", "UNIV MED CTR", "WOMENS CLINIC")
ANNOTATION_KINDS = ("roi", "doppler", "segmentation", "ruler", "calipers", "marks", "text", "tissue_text")


def _blur(a: np.ndarray, sy: float, sx: float) -> np.ndarray:
    """Separable Gaussian blur (edge padding)."""
    for axis, sigma in ((0, sy), (1, sx)):
        r = max(1, int(3 * sigma + 0.5))
        k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
        k /= k.sum()
        b = np.moveaxis(a, axis, 0)
        pad = np.pad(b, [(r, r)] + [(0, 0)] * (b.ndim - 1), mode="edge")
        a = np.moveaxis(sum(k[i] * pad[i:i + b.shape[0]] for i in range(2 * r + 1)), 0, axis)
    return a


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """A smooth random field in about [-1, 1]: a coarse grid upsampled bicubically."""
    grid = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, "F").resize((shape[1], shape[0]), Image.BICUBIC), np.float64)


def draw_text(layer: Image.Image, xy, text: str, size: int, grey: int) -> None:
    """Anti-aliased text about `size` px high at xy on an RGBA layer: PIL's own font at that size (Pillow >= 10.1 with
    FreeType), else its small bitmap font scaled up (blurrier, still grey-edged)."""
    try:
        font = ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError, ImportError, AttributeError):
        font = None
    if font is not None:
        ImageDraw.Draw(layer).text(xy, text, fill=(grey, grey, grey, 255), font=font)
        return
    bitmap = ImageFont.load_default()
    _, _, r, b = ImageDraw.Draw(layer).textbbox((0, 0), text, font=bitmap)
    small = Image.new("L", (r + 1, b + 1), 0)
    ImageDraw.Draw(small).text((0, 0), text, fill=255, font=bitmap)
    f = size / max(b, 1)
    alpha = small.resize((max(1, int((r + 1) * f)), max(1, int((b + 1) * f))), Image.BILINEAR)
    ink = Image.new("RGBA", alpha.size, (grey, grey, grey, 255))
    ink.putalpha(alpha)
    layer.alpha_composite(ink, (int(xy[0]), int(xy[1])))


def _probe(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inside, depth 0..1, beam angle) per frame pixel of a sector or a linear probe's image area."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    if rng.random() < 0.5:                                                # sector, apex above the frame
        apex_y, cx = rng.uniform(-70, 15), w / 2 + rng.uniform(-15, 15)
        r_max = rng.uniform(h - 60, h - 30) - apex_y
        r_min = rng.uniform(45, 80) - min(apex_y, 0) * 0.3
        half = min(rng.uniform(0.45, 0.65), np.arcsin(min(1.0, (w / 2 - 70) / r_max)))
        r, ang = np.hypot(xx - cx, yy - apex_y), np.arctan2(xx - cx, yy - apex_y)
        inside = (np.abs(ang) <= half) & (r >= r_min) & (r <= r_max)
        return inside, np.clip((r - r_min) / (r_max - r_min), 0, 1), ang
    half_w, cx = rng.uniform(0.30, 0.36) * w, w / 2 + rng.uniform(-15, 15)
    y0, y1 = rng.uniform(45, 70), h - rng.uniform(25, 60)
    inside = (np.abs(xx - cx) <= half_w) & (yy >= y0) & (yy <= y1)
    return inside, np.clip((yy - y0) / (y1 - y0), 0, 1), np.zeros_like(xx)


def _echogenicity(rng: np.random.Generator, inside: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Tissue brightness 0..1: smooth background, skin and fat layers, 1-3 round structures (anechoic cyst or vessel,
    hypoechoic node with a bright hilum, hyperechoic nodule), attenuation with depth."""
    h, w = inside.shape
    e = rng.uniform(0.32, 0.48) + 0.10 * _smooth_noise(rng, (h, w), 6) + 0.05 * _smooth_noise(rng, (h, w), 14)
    d = depth + 0.03 * _smooth_noise(rng, (h, w), 5)
    skin, fat = rng.uniform(0.015, 0.035), rng.uniform(0.03, 0.07)
    e = np.where(d < skin, rng.uniform(0.55, 0.7), np.where(d < skin + fat, rng.uniform(0.12, 0.25), e))
    yy, xx = np.mgrid[0:h, 0:w]
    ys, xs = np.nonzero(inside & (depth > 0.25) & (depth < 0.9))
    soft = lambda q, k: 1 / (1 + np.exp(np.minimum((q - 1) * k, 50)))  # noqa: E731  soft-edged disc
    for _ in range(rng.integers(1, 4)):
        i = rng.integers(len(ys))
        ry, rx = rng.uniform(15, 45), rng.uniform(25, 80)
        kind = rng.integers(3)
        disc = soft(((yy - ys[i]) / ry) ** 2 + ((xx - xs[i]) / rx) ** 2, 8)
        e = e * (1 - disc) + (0.03, rng.uniform(0.12, 0.2), rng.uniform(0.6, 0.75))[kind] * disc
        if kind == 1 and rng.random() < 0.6:
            hilum = soft(((yy - ys[i]) / (ry * 0.35)) ** 2 + ((xx - xs[i]) / (rx * 0.5)) ** 2, 6)
            e = e * (1 - hilum) + 0.6 * hilum
    return np.clip(e * (1.05 - 0.35 * depth), 0, 1)


def _speckle(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Fully developed speckle: the envelope of complex Gaussian noise blurred by a point-spread function wider
    across the beam than along it, compressed, mean 1."""
    re, im = (_blur(rng.standard_normal(shape), 0.9, 1.7) for _ in range(2))
    env = np.hypot(re, im) ** 0.45
    return env / env.mean()


def _speculars(rng: np.random.Generator, inside, depth, ang) -> np.ndarray:
    """2-5 specular reflections (vessel walls, fascia, calcifications): small bright elongated blobs, long axis across
    the beam."""
    h, w = inside.shape
    out = np.zeros((h, w))
    ys, xs = np.nonzero(inside & (depth > 0.1) & (depth < 0.92))
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(rng.integers(2, 6)):
        i = rng.integers(len(ys))
        t = ang[ys[i], xs[i]] + rng.normal(0, 0.2)
        length, thick = rng.uniform(6, 20), rng.uniform(2.0, 4.0)          # Gaussian sigmas along / across, px
        u = (xx - xs[i]) * np.cos(t) - (yy - ys[i]) * np.sin(t)
        v = (xx - xs[i]) * np.sin(t) + (yy - ys[i]) * np.cos(t)
        out = np.maximum(out, rng.uniform(0.55, 0.85) * np.exp(-0.5 * ((u / length) ** 2 + (v / thick) ** 2)))
    return out


def clean_frame(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """(clean greyscale frame uint8, image area) at scanner resolution."""
    inside, depth, ang = _probe(rng, w, h)
    s = _speckle(rng, (h, w))
    img = _echogenicity(rng, inside, depth) * s * 0.85 + _speculars(rng, inside, depth, ang) * (
        0.8 + 0.2 * np.minimum(s, 1.5))
    return np.clip(img * inside * 255, 0, 255).round().astype(np.uint8), inside


def _grey(rng: np.random.Generator, lo: int = 120, hi: int = 255) -> tuple[int, int, int, int]:
    g = int(rng.integers(lo, hi + 1))
    return g, g, g, 255


def _text(layers: dict, rng: np.random.Generator, inside: np.ndarray) -> None:
    """Institution, patient and time stamp top left; settings top right and bottom left; the study label under the
    image; 0-2 labels over tissue. Sizes 11-26 px, grey levels 120-255."""
    w, h = layers["text"].size
    settings = [f"G{rng.integers(30, 90)} C{rng.integers(1, 9)} A{rng.integers(1, 5)}", f"TIS<{rng.uniform(0.1, 1):.1f}",
                f"MI {rng.uniform(0.2, 1.4):.1f}", f"FR {rng.integers(8, 60)}Hz", f"DR{rng.integers(40, 80)}",
                f"L{rng.integers(7, 18)}-{rng.integers(3, 6)}", f"{rng.integers(2, 12)}.{rng.integers(0, 9)}cm"]
    stamp = (f"{rng.integers(2008, 2020)}/{rng.integers(1, 13):02d}/{rng.integers(1, 29):02d} "
             f"{rng.integers(0, 24):02d}:{rng.integers(0, 60):02d}:{rng.integers(0, 60):02d}")
    x, y, size = int(rng.integers(4, 14)), int(rng.integers(2, 8)), int(rng.integers(12, 19))
    for line in [str(rng.choice(DEMO_SITES)), f"ID {rng.integers(10 ** 6, 10 ** 7)}", stamp][: rng.integers(2, 4)]:
        draw_text(layers["text"], (x, y), line, size, _grey(rng, 150)[0])
        y += size + 2
    size = int(rng.integers(11, 17))
    for k, line in enumerate(rng.permutation(settings)[: rng.integers(2, 5)]):
        draw_text(layers["text"], (w - 10 - 7 * len(line) * size // 12, 4 + k * (size + 2)), str(line), size,
                  _grey(rng)[0])
    if rng.random() < 0.8:
        size = int(rng.integers(16, 27))
        draw_text(layers["text"], (int(rng.integers(w // 4, w // 2)), h - size - int(rng.integers(4, 12))),
                  str(rng.choice(DEMO_WORDS)), size, _grey(rng, 160)[0])
    if rng.random() < 0.6:
        size = int(rng.integers(11, 16))
        draw_text(layers["text"], (int(rng.integers(4, 20)), h - 2 * size - 16), " ".join(rng.permutation(settings)[:3]),
                  size, _grey(rng)[0])
    ys, xs = np.nonzero(inside)
    for _ in range(rng.integers(0, 3)):
        i, size = rng.integers(len(ys)), int(rng.integers(14, 23))
        draw_text(layers["tissue_text"], (min(int(xs[i]), w - 80), min(int(ys[i]), h - 30)),
                  str(rng.choice(DEMO_WORDS)).split()[0], size, _grey(rng, 170)[0])


def _ruler(draw: ImageDraw.ImageDraw, rng: np.random.Generator, inside: np.ndarray) -> None:
    """A depth ruler beside the image: a 1-2 px line with ticks every 35-60 px, and a focus mark."""
    cols, rows = np.flatnonzero(inside.any(0)), np.flatnonzero(inside.any(1))
    x = min(int(cols[-1]) + int(rng.integers(6, 16)), inside.shape[1] - 30)
    ink, width = _grey(rng, 140), int(rng.integers(1, 3))
    draw.line([(x, rows[0]), (x, rows[-1])], fill=ink, width=width)
    for k, y in enumerate(range(int(rows[0]), int(rows[-1]) + 1, int(rng.integers(35, 60)))):
        draw.line([(x, y), (x + (10 if k % 2 == 0 else 5), y)], fill=ink, width=width)
    if rng.random() < 0.6:
        y = int(rng.integers(rows[0] + 40, rows[-1] - 40))
        draw.polygon([(x - 3, y), (x - 11, y - 5), (x - 11, y + 5)], fill=ink)


def _marks(cal: ImageDraw.ImageDraw, draw: ImageDraw.ImageDraw, rng: np.random.Generator, inside) -> None:
    """0-2 calipers (two + marks joined by a dotted line: 2-3 px dots every 8-12 px) and 0-3 single +, x or arrow
    marks (1-2 px lines) over tissue."""
    ys, xs = np.nonzero(inside)

    def spot():
        i = rng.integers(len(ys))
        return int(xs[i]), int(ys[i])

    def cross(d, x, y, a, wd, ink, diagonal):
        arms = ([(x - a, y - a), (x + a, y + a)], [(x - a, y + a), (x + a, y - a)]) if diagonal else \
            ([(x - a, y), (x + a, y)], [(x, y - a), (x, y + a)])
        for arm in arms:
            d.line(arm, fill=ink, width=wd)
    for _ in range(rng.integers(0, 3)):
        (x0, y0), (x1, y1) = spot(), spot()
        ink = _grey(rng, 170)
        n, dot = int(np.hypot(x1 - x0, y1 - y0) // rng.integers(8, 13)), int(rng.integers(2, 4))
        for k in range(1, n):
            cx, cy = x0 + (x1 - x0) * k / n, y0 + (y1 - y0) * k / n
            cal.rectangle([cx - dot / 2, cy - dot / 2, cx + dot / 2 - 1, cy + dot / 2 - 1], fill=ink)
        for x, y in ((x0, y0), (x1, y1)):
            cross(cal, x, y, int(rng.integers(5, 9)), int(rng.integers(1, 3)), ink, False)
    for _ in range(rng.integers(0, 4)):
        (x, y), ink = spot(), _grey(rng, 150)
        a, wd, kind = int(rng.integers(5, 10)), int(rng.integers(1, 3)), rng.integers(3)
        if kind < 2:
            cross(draw, x, y, a, wd, ink, kind == 1)
            continue
        t, length = rng.uniform(0, 2 * np.pi), rng.uniform(25, 50)
        draw.line([(x, y), (x + length * np.cos(t), y + length * np.sin(t))], fill=ink, width=wd)
        draw.polygon([(x, y)] + [(x - 12 * np.cos(t + s), y - 12 * np.sin(t + s)) for s in (2.6, -2.6)], fill=ink)


def _roi_and_doppler(layers: dict, rng: np.random.Generator, inside: np.ndarray, doppler: bool) -> None:
    """An ROI box over tissue (1-2 px grey lines); with Doppler, 1-3 vessels of red / blue flow inside it and a colour
    bar with its scale at the left edge."""
    h, w = inside.shape
    ys, xs = np.nonzero(inside)
    bw, bh, i = int(rng.integers(100, 240)), int(rng.integers(80, 190)), rng.integers(len(ys))
    x0 = int(np.clip(xs[i] - bw // 2, xs.min(), xs.max() - bw))
    y0 = int(np.clip(ys[i] - bh // 2, ys.min(), ys.max() - bh))
    ink = _grey(rng, 140, 230)
    if doppler:
        yy, xx = np.mgrid[0:h, 0:w]
        flow = np.zeros((h, w))
        for _ in range(rng.integers(1, 4)):
            mid = rng.uniform(y0, y0 + bh) + rng.uniform(-0.6, 0.6) * (xx - x0) + rng.uniform(-0.004, 0.004) * (
                xx - x0) ** 2
            tube = np.clip(1 - ((yy - mid) / rng.uniform(4, 10)) ** 2, 0, 1) * rng.choice([-1.0, 1.0])
            flow = np.where(np.abs(tube) > np.abs(flow), tube, flow)
        flow *= np.clip(1 + 0.5 * rng.standard_normal((h, w)), 0, 2)
        box = np.zeros((h, w), bool)
        box[y0:y0 + bh, x0:x0 + bw] = True
        flow[~box | ~inside | (np.abs(flow) < 0.15)] = 0
        v, pos = np.clip(np.abs(flow), 0, 1), flow > 0
        rgba = np.stack([np.where(pos, 120 + 135 * v, 0), np.where(pos, 200 * np.clip(v - 0.7, 0, 1) / 0.3,
                         255 * np.clip(v - 0.6, 0, 1) / 0.4), np.where(pos, 0, 120 + 135 * v),
                         np.where(flow != 0, 255, 0)], -1).astype(np.uint8)
        layers["doppler"].alpha_composite(Image.fromarray(rgba, "RGBA"))
        bx, by, bar_h = int(rng.integers(6, 20)), int(rng.integers(60, 120)), int(rng.integers(90, 140))
        t = np.linspace(1, -1, bar_h)[:, None] * np.ones((1, int(rng.integers(8, 14))))
        bar = np.stack([np.clip(t, 0, 1) * 255, np.clip(np.abs(t) - 0.7, 0, 1) / 0.3 * 220, np.clip(-t, 0, 1) * 255,
                        np.full_like(t, 255)], -1).astype(np.uint8)
        layers["doppler"].alpha_composite(Image.fromarray(bar, "RGBA"), (bx, by))
        draw_text(layers["doppler"], (bx, by - 16), f"+{rng.uniform(5, 40):.1f}", 12, _grey(rng, 160)[0])
        draw_text(layers["doppler"], (bx, by + bar_h + 3), f"-{rng.uniform(5, 40):.1f}", 12, _grey(rng, 160)[0])
    ImageDraw.Draw(layers["roi"]).rectangle([x0, y0, x0 + bw, y0 + bh], outline=ink, width=int(rng.integers(1, 3)))


def _segmentation(layer: Image.Image, rng: np.random.Generator, inside: np.ndarray) -> None:
    """A colourful segmentation over a structure: a traced contour or a translucent fill."""
    ys, xs = np.nonzero(inside)
    i = rng.integers(len(ys))
    cy, cx, ry, rx = ys[i], xs[i], rng.uniform(15, 45), rng.uniform(20, 70)
    colour = [(40, 220, 60), (240, 220, 40), (40, 200, 230), (230, 60, 200)][rng.integers(4)]
    box = [cx - rx, cy - ry, cx + rx, cy + ry]
    if rng.random() < 0.5:
        ImageDraw.Draw(layer).ellipse(box, outline=colour + (255,), width=int(rng.integers(1, 3)))
    else:
        ImageDraw.Draw(layer).ellipse(box, fill=colour + (int(rng.integers(90, 160)),))


def scanner_frame(rng: np.random.Generator, w: int = SCANNER_SIZE[0], h: int = SCANNER_SIZE[1]):
    """(raw RGB frame with burned-in annotation, its clean greyscale truth, {kind: alpha of that annotation}) at
    scanner resolution."""
    clean, inside = clean_frame(rng, w, h)
    layers = {k: Image.new("RGBA", (w, h), (0, 0, 0, 0)) for k in ANNOTATION_KINDS}
    doppler = rng.random() < 0.4
    if doppler or rng.random() < 0.4:
        _roi_and_doppler(layers, rng, inside, doppler)
    if rng.random() < 0.3:
        _segmentation(layers["segmentation"], rng, inside)
    if rng.random() < 0.9:
        _ruler(ImageDraw.Draw(layers["ruler"]), rng, inside)
    _marks(ImageDraw.Draw(layers["calipers"]), ImageDraw.Draw(layers["marks"]), rng, inside)
    _text(layers, rng, inside)
    raw = Image.fromarray(clean).convert("RGBA")
    for layer in layers.values():
        raw.alpha_composite(layer)
    return np.asarray(raw.convert("RGB")), clean, {k: np.asarray(v)[..., 3] for k, v in layers.items()}


def stored_frame(rng: np.random.Generator, size: int = STORE_SIZE, scanner: tuple[int, int] = SCANNER_SIZE):
    """scanner_frame resized to size x size with one of RESIZE_FILTERS: (raw RGB, clean L, {kind: alpha})."""
    raw, clean, kinds = scanner_frame(rng, *scanner)
    f = RESIZE_FILTERS[rng.integers(len(RESIZE_FILTERS))]
    rs = lambda a: np.asarray(Image.fromarray(a).resize((size, size), f))  # noqa: E731
    return rs(raw), rs(clean), {k: rs(v) for k, v in kinds.items()}


def make_demo(root: str, per_class: int = 12, seed: int = 0, size: int = STORE_SIZE) -> dict:
    """A small tree in RadImageNet's raw layout: 6 CT/MR classes and 3 US classes of synthetic frames; the ultrasound
    frames carry burned-in annotation (their clean versions go to <root>/_clean/<label>/ for checking)."""
    rng = np.random.default_rng(seed)
    classes = [("CT", "abd", "normal"), ("CT", "lung", "nodule"), ("MR", "knee", "normal"), ("MR", "brain", "mass"),
               ("CT", "abd", "cyst"), ("MR", "spine", "normal"), ("US", None, "gallbladder"), ("US", None, "ovary"),
               ("US", None, "thyroid")]
    n = 0
    for mod, anat, label in classes:
        folder = os.path.join(root, "radiology_ai", mod, *(a for a in (anat, label) if a))
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            name = f"{mod.lower()}_{anat or 'us'}_{label}_{i:04d}.png"
            if mod == "US":
                raw, clean, _ = stored_frame(rng, size)
                Image.fromarray(raw).save(os.path.join(folder, name))
                os.makedirs(os.path.join(root, "_clean", label), exist_ok=True)
                Image.fromarray(clean).save(os.path.join(root, "_clean", label, name))
            else:
                anatomy = {"abd": "abdomen", "lung": "chest", "knee": "knee", "brain": "head", "spine": "spine"}[anat]
                finding = "normal" if label == "normal" else "lesion"
                Image.fromarray(pgnm.synthetic_scan(mod, anatomy, finding, size, rng)).save(os.path.join(folder, name))
            n += 1
    return {"images": n, "classes": len(classes), "root": root}


# =====================================================================================================================
#  Discovery, analysis, splitting
# =====================================================================================================================


def find_base(data_path: str) -> str:
    """The folder that holds radiology_ai/ (accepts that folder or radiology_ai itself)."""
    if not os.path.exists(data_path):
        raise UserError(f"--data-path {data_path} does not exist")
    if not os.path.isdir(data_path):
        raise UserError(f"--data-path {data_path} is a file: give the folder that holds radiology_ai/")
    if os.path.isdir(os.path.join(data_path, "radiology_ai")):
        return os.path.abspath(data_path)
    if os.path.basename(os.path.normpath(data_path)) == "radiology_ai":
        return os.path.dirname(os.path.abspath(data_path))
    raise UserError(f"--data-path {data_path} has no radiology_ai/ folder (expected radiology_ai/CT|MR|US/...)")


def class_of(rel: str) -> str | None:
    """radiology_ai/CT/abd/cyst/x.png -> CT__abd__cyst; radiology_ai/US/ovary/x.png -> US__ovary; else None."""
    parts = rel.split("/")
    if len(parts) < 4 or parts[0] != "radiology_ai" or parts[1] not in MODALITIES:
        return None
    if parts[1] == "US":
        return f"US__{parts[2]}" if len(parts) == 4 else None
    return f"{parts[1]}__{parts[2]}__{parts[3]}" if len(parts) == 5 else None


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def scan_tree(base: str) -> tuple[list[str], dict[str, list[str]]]:
    """(relative paths radiology_ai/... of every image under base/radiology_ai, sorted; skipped links). Symbolic
    links are followed while they stay inside --data-path, never round a loop, and each folder and file is taken
    once (by its own path where it has one): links that lead out of the root, into a folder above them, or to a
    folder or file already taken are listed, not followed."""
    top = os.path.join(base, "radiology_ai")
    root, top_real = os.path.realpath(base), os.path.realpath(top)
    rel = lambda p: os.path.relpath(p, base).replace(os.sep, "/")  # noqa: E731
    skipped: dict[str, list[str]] = {"links_out_of_root": [], "link_loops": [], "same_file_twice": []}
    walked, found = set(), []
    for dirpath, dirnames, files in os.walk(top, followlinks=True):
        here = os.path.realpath(dirpath)
        walked.add(here)
        keep = []
        for d in sorted(dirnames):
            full = os.path.join(dirpath, d)
            real = os.path.realpath(full)
            if not _inside(real, root):
                skipped["links_out_of_root"].append(rel(full))
            elif _inside(here, real):
                skipped["link_loops"].append(rel(full))
            elif real in walked or (os.path.islink(full) and _inside(real, top_real)):
                skipped["same_file_twice"].append(f"{rel(full)} = {rel(real) if _inside(real, root) else real}")
            else:
                keep.append(d)
        dirnames[:] = keep
        for f in sorted(files):
            full = os.path.join(dirpath, f)
            real = os.path.realpath(full)
            if not f.lower().endswith(IMG_EXTENSIONS):
                continue
            if not _inside(real, root):
                skipped["links_out_of_root"].append(rel(full))
            else:
                found.append((real != os.path.join(top_real, os.path.relpath(full, top)), rel(full), real))
    taken: dict[str, str] = {}
    for _, path, real in sorted(found):                   # a file's own path first, then links to it
        if real in taken:
            skipped["same_file_twice"].append(f"{path} = {taken[real]}")
        else:
            taken[real] = path
    return sorted(taken.values()), {k: sorted(v) for k, v in skipped.items()}


def safe_relpath(entry: str, where: str) -> str:
    """A CSV path must stay inside the data root: no absolute paths, no '..'."""
    p = entry.strip().replace("\\", "/")
    if not p or p.startswith("/") or (len(p) > 1 and p[1] == ":") or ".." in p.split("/"):
        raise UserError(f"{where}: path {entry!r} escapes the data root (absolute or '..'); "
                        f"paths must be relative, like radiology_ai/CT/abd/cyst/x.png")
    p = os.path.normpath(p).replace(os.sep, "/")
    return p if p.startswith("radiology_ai/") else f"radiology_ai/{p}"


def read_split_csvs(csv_dir: str) -> dict[str, str]:
    """{relative path: split} from RadiologyAI_{train,val,test}.csv (UTF-8, column 'filename')."""
    if not os.path.isdir(csv_dir):
        raise UserError(f"--split-csv-dir {csv_dir} is not a folder (it should hold {', '.join(CSV_NAMES.values())})")
    out: dict[str, str] = {}
    for split, name in CSV_NAMES.items():
        path = os.path.join(csv_dir, name)
        if not os.path.isfile(path):
            raise UserError(f"--split-csv-dir {csv_dir} has no {name}")
        try:
            with open(path, newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh)
                if not reader.fieldnames or "filename" not in reader.fieldnames:
                    raise UserError(f"{path} has no 'filename' column (columns: {reader.fieldnames})")
                for line, row in enumerate(reader, start=2):
                    entry = row.get("filename")
                    if not entry or not entry.strip():
                        raise UserError(f"{path} line {line}: no filename (the row has {len(row)} fields): "
                                        f"every row needs one")
                    rel = safe_relpath(entry, f"{name} line {line}")
                    if rel in out and out[rel] != split:
                        raise UserError(f"{rel} is listed in both {CSV_NAMES[out[rel]]} and {name}")
                    out[rel] = split
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#x} at offset {e.start}): "
                            f"save it as UTF-8") from None
        except csv.Error as e:
            raise UserError(f"{path} is not a readable CSV ({e}): check its quoting") from None
    return out


def mask_problem(path: str) -> str | None:
    """Why the authors' correction mask at path cannot be applied (None if it can): read from its .npy header only."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(fh)
    except (OSError, ValueError) as e:
        return f"not a .npy array ({str(e).splitlines()[0][:80]})"
    if dtype.hasobject or dtype.kind not in "biuf":
        return f"holds {dtype} data (pickled objects are never loaded); expected integers"
    if tuple(shape[:2]) != (224, 224) or len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (1, 3)):
        return f"has shape {shape}, expected 224 x 224 (x 3)"
    return None


def analyse(job: tuple[str, str]) -> dict:
    """Decode one image: a hash of its 8-bit pixels (exact duplicates), whether it is blank, or why it is unreadable."""
    base, rel = job
    try:
        img = read_image(os.path.join(base, rel))
        a = np.asarray(img)
        h = hashlib.sha256(f"{img.mode}{a.shape}".encode() + a.tobytes()).hexdigest()[:24]
        return {"rel": rel, "hash": h, "blank": bool(a.min() == a.max())}
    except Exception as e:  # noqa: BLE001 - every decoder failure is reported the same way
        return {"rel": rel, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"}


def target_counts(n: int, ratios: Sequence[float]) -> list[int]:
    """Largest-remainder rounding of n * ratios; every split gets at least one image when n >= len(ratios)."""
    raw = [n * r for r in ratios]
    counts = [int(x) for x in raw]
    for i in sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))[: n - sum(counts)]:
        counts[i] += 1
    if n >= len(ratios):
        for i in range(len(counts)):
            if counts[i] == 0:
                counts[int(np.argmax(counts))] -= 1
                counts[i] = 1
    return counts


def split_by_class(items: dict[str, str], hashes: dict[str, str], ratios: Sequence[float], seed: int) -> dict[str, str]:
    """{rel: split}: per class, a seeded shuffle of its duplicate groups, each group given to the split furthest below
    its target count. Exact duplicates (same hash) always share a split, also across classes. (Unlike
    pgnm.stratified_split, which cuts an array of labels into index parts and knows nothing of duplicates.)"""
    groups: dict[str, list[str]] = {}
    for rel in sorted(items):
        groups.setdefault(hashes[rel], []).append(rel)
    by_class: dict[str, list[str]] = {}
    for h, rels in groups.items():
        for c in sorted({items[r] for r in rels}):
            by_class.setdefault(c, []).append(h)
    split_of_group: dict[str, int] = {}
    for c in sorted(by_class):
        hs = sorted(by_class[c])
        n_c = sum(1 for h in hs for r in groups[h] if items[r] == c)
        target = target_counts(n_c, ratios)
        have = [0] * len(ratios)
        for h in hs:
            if h in split_of_group:
                have[split_of_group[h]] += sum(1 for r in groups[h] if items[r] == c)
        rng = np.random.default_rng([seed, zlib.crc32(c.encode())])
        for h in [hs[i] for i in rng.permutation(len(hs))]:
            if h in split_of_group:
                continue
            k = max(range(len(ratios)), key=lambda i: (target[i] - have[i], -i))
            split_of_group[h] = k
            have[k] += sum(1 for r in groups[h] if items[r] == c)
    return {r: SPLITS[split_of_group[hashes[r]]] for r in items}


# =====================================================================================================================
#  Processing one image, and the whole run
# =====================================================================================================================


@dataclass
class Job:
    rel: str
    cls: str
    split: str
    action: str                    # copy | clean | correct
    src: str
    dst: str
    mask: str | None = None


def output_name(rel: str) -> str:
    return os.path.splitext(os.path.basename(rel))[0] + ".png"


def _open_append(path: str):
    """Append to one of refine's own logs; a symbolic link there is refused, never followed."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror}): it must be a plain file refine creates "
                        f"(remove a link there; check free space and permissions)") from None
    return os.fdopen(fd, "a")


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _render(job: Job, params: CleanParams) -> tuple[bytes, int]:
    """The output file's bytes and the pixels changed. 8-bit PNGs that need no change are copied byte for byte."""
    if job.action == "clean":
        out, changed = clean_ultrasound(read_image(job.src), params)
        return _png_bytes(out), changed
    if job.action == "correct":
        return _png_bytes(apply_correction_mask(read_image(job.src), np.load(job.mask, allow_pickle=False))), 0
    with Image.open(job.src) as im:
        plain = im.format == "PNG" and im.mode in ("L", "RGB", "P", "RGBA", "LA")
    if plain:
        with open(job.src, "rb") as fh:
            return fh.read(), 0
    return _png_bytes(read_image(job.src)), 0


def process(job: Job, params: CleanParams = CleanParams()) -> dict:
    """Make one output file (atomically). A source that cannot be decoded is an 'error' (the run goes on and lists
    it); an output that cannot be written (disk full, permissions) is 'fatal' (the run stops)."""
    try:
        data, changed = _render(job, params)
    except Exception as e:  # noqa: BLE001 - every decoder failure is reported the same way
        return {"rel": job.rel, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"}
    try:
        pgnm.write_atomic(job.dst, data, then=RERUN)
    except UserError as e:
        return {"rel": job.rel, "fatal": str(e)}
    return {"rel": job.rel, "changed": changed, "sha256": hashlib.sha256(data).hexdigest()}


def _parallel(fn, jobs: Sequence, workers: int, label: str, log) -> Iterable:
    """fn over jobs with a process pool (workers > 0) or in this process, with a progress line (rate and ETA)."""
    total, t0, last = len(jobs), time.perf_counter(), 0.0
    if workers > 0:
        import multiprocessing as mp
        pool = mp.get_context("fork" if sys.platform != "win32" else "spawn").Pool(workers)
        it = pool.imap_unordered(fn, jobs, chunksize=max(1, min(64, total // (workers * 8) or 1)))
    else:
        pool, it = None, map(fn, jobs)
    finished = False
    try:
        for i, res in enumerate(it, start=1):
            yield res
            now = time.perf_counter()
            if now - last > 2.0 or i == total:
                rate = i / max(now - t0, 1e-9)
                eta = time.strftime("%H:%M:%S", time.gmtime((total - i) / max(rate, 1e-9)))
                log(f"{label}: {i}/{total} ({100 * i / max(total, 1):.1f}%)  {rate:.1f} img/s  eta {eta}")
                last = now
        finished = True
    finally:
        if pool is not None:
            (pool.close if finished else pool.terminate)()
            pool.join()


def _load_jsonl(path: str) -> list[dict]:
    out = []
    if os.path.isfile(path) and not os.path.islink(path):
        with open(path) as fh:
            for line in fh:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:      # the last line of a killed run may be cut
                    pass
    return out


def check_run_arguments_numbers(ratios: Sequence[float], seed: int, workers: int, params: CleanParams) -> None:
    """Every numeric argument's range, with a message that says what to do."""
    if len(ratios) != 3 or not all(np.isfinite(r) and r > 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-6:
        raise UserError(f"--ratios {' '.join(map(str, ratios))}: give three positive numbers summing to 1, one per "
                        f"split, each of which gets images (train val test, e.g. 0.8 0.1 0.1)")
    for flag, value, lo, hi in (("--seed", seed, 0, 2 ** 63 - 1), ("--workers", workers, 0, 1024),
                                ("--colour-threshold", params.colour_threshold, 0, 255),
                                ("--black-level", params.black_level, 0, 254), ("--halo", params.halo, 0, 3)):
        if not lo <= value <= hi:
            raise UserError(f"{flag} {value}: must be between {lo} and {hi}")


def check_run_arguments(data_path: str, output_dir: str, ratios: Sequence[float], seed: int, workers: int,
                        params: CleanParams) -> str:
    """Every numeric and path argument, before any work, with a message that says what to do; the data root."""
    check_run_arguments_numbers(ratios, seed, workers, params)
    if os.path.lexists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"--output-dir {output_dir} exists and is not a folder: give a folder (created if missing)")
    base = find_base(data_path)
    if _inside(os.path.realpath(output_dir), os.path.realpath(os.path.join(base, "radiology_ai"))):
        raise UserError(f"--output-dir {output_dir} is inside --data-path's radiology_ai/: put it elsewhere")
    if os.path.realpath(output_dir) == os.path.realpath(base):
        raise UserError(f"--output-dir {output_dir} is the data root: train/ val/ test/ and the manifest would lie "
                        f"among the raw download; give a folder of their own")
    return base


@dataclass
class _process_with:
    """A picklable process(job, params) for the worker pool."""
    params: CleanParams = field(default_factory=CleanParams)

    def __call__(self, job: Job) -> dict:
        return process(job, self.params)


def _stat_key(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:                                # a dangling link: analysis reports it unreadable
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def _find_mask(folder: str, rel: str) -> str | None:
    """The authors' masks are <basename>.npy in one folder; a mirrored tree (<relative path>.npy) works too."""
    stem = os.path.splitext(rel)[0]
    for cand in (os.path.join(folder, stem + ".npy"), os.path.join(folder, stem.split("/", 1)[1] + ".npy"),
                 os.path.join(folder, os.path.basename(stem) + ".npy")):
        if os.path.isfile(cand):
            return cand
    return None


def _first(items: Sequence[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


def _discover(base: str, split_csv_dir: str | None, allow_missing: bool, log) -> tuple[dict, dict, dict]:
    """({rel: class} to refine, {rel: split} from the CSVs or {}, lists for the manifest)."""
    files, links = scan_tree(base)
    items = {rel: class_of(rel) for rel in files}
    notes = {"not_in_a_class": sorted(r for r, c in items.items() if c is None), **links,
             "listed_but_missing": [], "on_disk_but_unlisted": []}
    items = {r: c for r, c in items.items() if c is not None}
    for what, found in links.items():
        if found:
            log(f"warning: {len(found)} {what.replace('_', ' ')} not followed (first: {_first(found)}); "
                f"listed in manifest.json")
    listed: dict[str, str] = {}
    if split_csv_dir:
        listed = read_split_csvs(split_csv_dir)
        notes["listed_but_missing"] = missing = sorted(r for r in listed if r not in items)
        notes["on_disk_but_unlisted"] = sorted(r for r in items if r not in listed)
        if missing and not allow_missing:
            raise UserError(f"--split-csv-dir: {len(missing)} listed files are not under {base} (first: "
                            f"{_first(missing)}); pass --allow-missing to go on without them")
        if missing:
            log(f"warning: {len(missing)} listed files are missing (first: {_first(missing)}); going on without them")
        items = {r: c for r, c in items.items() if r in listed}
    if not items:
        raise UserError(f"no images under {os.path.join(base, 'radiology_ai')} "
                        f"(expected radiology_ai/CT|MR/<anatomy>/<label>/*.png, radiology_ai/US/<label>/*.png)")
    return items, listed, notes


def _analyse_all(base: str, items: dict, output_dir: str, workers: int, dry_run: bool, log) -> dict:
    """{rel: analysis} of every image, cached in the output folder so that a resumed run skips this too."""
    cache_path = os.path.join(output_dir, ".analysis.jsonl")
    cached = {r["rel"]: r for r in _load_jsonl(cache_path)}
    stat_key = {rel: _stat_key(os.path.join(base, rel)) for rel in items}
    todo = [(base, rel) for rel in sorted(items) if cached.get(rel, {}).get("stat") != stat_key[rel]]
    with (_open_append(cache_path) if not dry_run else open(os.devnull, "w")) as fh:
        for res in _parallel(analyse, todo, workers, "analyse", log):
            res["stat"] = stat_key[res["rel"]]
            cached[res["rel"]] = res
            fh.write(json.dumps(res) + "\n")
            fh.flush()
    return {rel: cached[rel] for rel in items}


def _plan(usable: dict, split_of: dict, base: str, output_dir: str, correction_masks: str | None,
          no_clean: bool) -> tuple[list[Job], list[str]]:
    """One job per usable image, and the ultrasound images without a correction mask. Unusable masks and two images
    with one output name are errors."""
    jobs, no_mask, bad = [], [], []
    for rel in sorted(usable):
        cls, action, mask = usable[rel], "copy", None
        if cls.startswith("US__") and correction_masks:
            mask = _find_mask(correction_masks, rel)
            problem = mask_problem(mask) if mask else None
            if problem:
                bad.append(f"{mask} {problem}")
            action = "correct" if mask else "copy"
            if not mask:
                no_mask.append(rel)
        elif cls.startswith("US__") and not no_clean:
            action = "clean"
        jobs.append(Job(rel, cls, split_of[rel], action, os.path.join(base, rel),
                        os.path.join(output_dir, split_of[rel], cls, output_name(rel)), mask))
    if bad:
        raise UserError(f"--correction-masks: {len(bad)} masks cannot be applied (first: {bad[0]}); fix or remove "
                        f"them (an image without a mask is copied as it is)")
    names: dict[str, str] = {}
    for j in jobs:
        if j.dst in names:
            raise UserError(f"{j.rel} and {names[j.dst]} would both be written to {j.dst}: rename one")
        names[j.dst] = j.rel
    return jobs, no_mask


def _prepare_output(output_dir: str, jobs: Sequence[Job]) -> None:
    """Create the split / class folders; a symbolic link among them (which would send outputs elsewhere) is refused."""
    real_out = os.path.realpath(output_dir)
    for folder in sorted({os.path.dirname(j.dst) for j in jobs}):
        for p in (os.path.dirname(folder), folder):
            if os.path.islink(p):
                raise UserError(f"{p} is a symbolic link: refine writes only into folders it creates; remove it")
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create {folder} ({e.strerror}): check --output-dir") from None
        if os.path.realpath(folder) != os.path.join(real_out, os.path.relpath(folder, output_dir)):
            raise UserError(f"{folder} leads outside --output-dir: remove the link on its way")


def _run(jobs: Sequence[Job], output_dir: str, workers: int, params: CleanParams, log) -> tuple[dict, list]:
    """Process what is not done yet (finished outputs, logged and present, are kept): (results, failures)."""
    progress_path = os.path.join(output_dir, ".progress.jsonl")
    done = {r["rel"]: r for r in _load_jsonl(progress_path) if "error" not in r and "fatal" not in r}
    results = {j.rel: done[j.rel] for j in jobs if j.rel in done and os.path.isfile(j.dst)}
    pending = [j for j in jobs if j.rel not in results]
    if results:
        log(f"resuming: {len(results)} outputs already done, {len(pending)} to go")
    failed = []
    with _open_append(progress_path) as fh:
        for res in _parallel(_process_with(params), pending, workers, "refine", log):
            if "fatal" in res:
                raise UserError(res["fatal"])
            if "error" in res:
                failed.append({"file": res["rel"], "error": res["error"]})
                continue
            results[res["rel"]] = res
            fh.write(json.dumps(res) + "\n")
            fh.flush()
    return results, failed


def _write_manifest(output_dir: str, jobs: Sequence[Job], results: dict, manifest: dict) -> list[str]:
    """manifest_images.csv (one row per image) and manifest.json (with a checksum over every output); their paths."""
    rows = sorted((j.split, j.cls, output_name(j.rel), j.rel, j.action, results[j.rel]["changed"],
                   results[j.rel]["sha256"]) for j in jobs if j.rel in results)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["split", "class", "file", "source", "action", "pixels_changed", "sha256"])
    w.writerows(rows)
    cleaned = [r for r in rows if r[4] == "clean"]
    manifest.update(images_written=len(rows), checksum=hashlib.sha256(
        "".join(f"{r[0]}/{r[1]}/{r[2]} {r[6]}\n" for r in rows).encode()).hexdigest(),
        cleaning={"images": len(cleaned), "images_changed": sum(1 for r in cleaned if r[5] > 0),
                  "pixels_changed": sum(r[5] for r in cleaned)})
    paths = [os.path.join(output_dir, "manifest_images.csv"), os.path.join(output_dir, "manifest.json")]
    pgnm.write_atomic(paths[0], buf.getvalue().encode(), then=RERUN)
    pgnm.write_atomic(paths[1], json.dumps(manifest, indent=1).encode(), then=RERUN)
    return paths


def refine(data_path: str, output_dir: str, split_csv_dir: str | None = None, correction_masks: str | None = None,
           ratios: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0, workers: int = 0, no_clean: bool = False,
           dry_run: bool = False, params: CleanParams = CleanParams(), log=print,
           allow_missing: bool = False) -> dict:
    """The whole job; returns the manifest (for --dry-run, the plan)."""
    base = check_run_arguments(data_path, output_dir, ratios, seed, workers, params)
    if correction_masks and not os.path.isdir(correction_masks):
        raise UserError(f"--correction-masks {correction_masks} is not a folder of <name>.npy masks")
    items, listed, notes = _discover(base, split_csv_dir, allow_missing, log)
    log(f"refine: {len(items)} images in {len(set(items.values()))} classes under {base}")
    if not dry_run:
        try:
            os.makedirs(output_dir, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create --output-dir {output_dir} ({e.strerror})") from None
    info = _analyse_all(base, items, output_dir, workers, dry_run, log)
    unreadable = sorted(({"file": r, "error": i["error"]} for r, i in info.items() if "error" in i),
                        key=lambda d: d["file"])
    blank = sorted(r for r, i in info.items() if i.get("blank"))
    usable = {r: c for r, c in items.items() if "error" not in info[r] and not info[r].get("blank")}
    hashes = {r: info[r]["hash"] for r in usable}
    groups: dict[str, list[str]] = {}
    for r in sorted(usable):
        groups.setdefault(hashes[r], []).append(r)
    duplicates = [g for g in groups.values() if len(g) > 1]
    mode = "csv" if split_csv_dir else "stratified"
    split_of = {r: listed[r] for r in usable} if split_csv_dir else split_by_class(usable, hashes, ratios, seed)
    jobs, no_mask = _plan(usable, split_of, base, output_dir, correction_masks, no_clean)
    counts: dict[str, dict[str, int]] = {}
    for j in jobs:
        counts.setdefault(j.cls, {s: 0 for s in SPLITS})[j.split] += 1
    totals = {s: sum(c[s] for c in counts.values()) for s in SPLITS}
    actions = {a: sum(j.action == a for j in jobs) for a in ("copy", "clean", "correct")}
    log(f"plan ({mode} split): train {totals['train']}  val {totals['val']}  test {totals['test']}  | "
        f"{actions['clean']} to clean, {actions['correct']} to correct, {actions['copy']} to copy | "
        f"{len(duplicates)} duplicate groups, {len(blank)} blank, {len(unreadable)} unreadable")
    plan = {"mode": mode, "counts": counts, "totals": totals, "actions": actions, "blank": blank,
            "unreadable": unreadable, "duplicates": duplicates}
    if dry_run:
        for c in sorted(counts):
            log(f"  {c:<40} " + "  ".join(f"{s} {counts[c][s]}" for s in SPLITS))
        return plan
    _prepare_output(output_dir, jobs)
    results, failed = _run(jobs, output_dir, workers, params, log)
    plan["unreadable"] = sorted(unreadable + failed, key=lambda d: d["file"])
    args = {"data_path": os.path.abspath(data_path), "split_csv_dir": split_csv_dir, "correction_masks":
            correction_masks, "ratios": list(ratios), "seed": seed, "no_clean": no_clean,
            "clean_params": vars(params) if not no_clean and not correction_masks else None}
    manifest = {"arguments": args, "classes": len(counts), **plan, "missing_correction_masks": no_mask,
                "straddling_duplicates": [g for g in duplicates if len({split_of[r] for r in g}) > 1], **notes}
    paths = _write_manifest(output_dir, jobs, results, manifest)
    if plan["unreadable"]:
        log(f"warning: {len(plan['unreadable'])} unreadable images skipped (first: "
            f"{_first([u['file'] for u in plan['unreadable']])}); listed in manifest.json")
    log(f"done: {manifest['images_written']} images (checksum {manifest['checksum'][:16]}), {len(blank)} blank "
        f"skipped. Wrote {', '.join(os.path.join(output_dir, s) + '/' for s in SPLITS)}, {', '.join(paths)}, and "
        f"the resume logs {os.path.join(output_dir, '.analysis.jsonl')}, {os.path.join(output_dir, '.progress.jsonl')}")
    return manifest


# =====================================================================================================================
#  Measuring the cleaning on the demo: --demo-report, and the tests' figures
# =====================================================================================================================
# A stroke pixel (the issue's definition on real frames) is more than 50 grey levels above the median of its 9 x 9
# window and above 120: text, box lines, rulers; almost no speckle. An artifact pixel is one where the raw frame
# differs from the clean truth at all; a visible one, by more than VISIBLE grey levels (or as much chroma).

STROKE_CONTRAST, STROKE_LEVEL, VISIBLE = 50, 120, 10


def stroke_pixels(grey: np.ndarray) -> np.ndarray:
    g = np.asarray(grey, np.uint8)
    median = np.asarray(Image.fromarray(g).filter(ImageFilter.MedianFilter(9)), np.int16)
    return (g.astype(np.int16) - median > STROKE_CONTRAST) & (g > STROKE_LEVEL)


def frame_metrics(raw: np.ndarray, clean: np.ndarray, refined: np.ndarray) -> dict:
    """Sums for one frame (raw RGB, clean truth L, refined L; all 8-bit): removal, damage, fill error and texture."""
    g, c, out = (np.asarray(Image.fromarray(raw).convert("L"), np.float64), clean.astype(np.float64),
                 refined.astype(np.float64))
    chroma = raw.max(2).astype(np.int16) - raw.min(2)
    artifact = (g != c) | (chroma > 0)
    visible = (np.abs(g - c) > VISIBLE) | (chroma > VISIBLE)
    changed = out != g
    strokes = stroke_pixels(g) & artifact
    fan = fill_holes(c > 0)
    filled = changed & erode(fan.astype(np.uint8), 2).astype(bool)           # fills inside tissue, off its border
    smooth = local_base(g, ~changed & fan, filled)                          # what a smooth blob fill would give
    rf, rt = out - box_mean(out, 2), c - box_mean(c, 2)                     # texture: residuals around the local mean
    pair = filled[:, 1:] & filled[:, :-1]
    m = {"frames": 1, "strokes": strokes.sum(), "strokes_removed": (strokes & changed).sum(),
         "raw_strokes": stroke_pixels(g).sum(), "refined_strokes": stroke_pixels(out).sum(),
         "clean_strokes": stroke_pixels(c).sum(), "visible": visible.sum(), "visible_left": (visible & ~changed).sum(),
         "changed_far": (changed & ~grow_mask(artifact, 2)).sum(), "filled": filled.sum(),
         "abs_err": np.abs(out - c)[filled].sum(), "abs_err_smooth": np.abs(smooth - c)[filled].sum(),
         "pairs": pair.sum()}
    for name, r in (("fill", rf), ("truth", rt)):
        m[f"{name}_sum"], m[f"{name}_sq"] = r[filled].sum(), (r[filled] ** 2).sum()
        m[f"{name}_lag"] = (r[:, 1:][pair] * r[:, :-1][pair]).sum()
    return {k: float(v) for k, v in m.items()}


def summarise(m: dict) -> dict:
    """Figures from summed frame_metrics: percentages, mean absolute errors, residual std and lag-1 autocorrelation."""
    def std(name):
        return float(np.sqrt(max(m[f"{name}_sq"] / max(m["filled"], 1) - (m[f"{name}_sum"] / max(m["filled"], 1)) ** 2,
                                 0)))
    out = {"frames": int(m["frames"]), "stroke_removed_pct": 100 * m["strokes_removed"] / max(m["strokes"], 1),
           "refined_to_raw_strokes_pct": 100 * m["refined_strokes"] / max(m["raw_strokes"], 1),
           "clean_to_raw_strokes_pct": 100 * m["clean_strokes"] / max(m["raw_strokes"], 1),
           "visible_artifact_left_pct": 100 * m["visible_left"] / max(m["visible"], 1),
           "visible_artifact_left_px": int(m["visible_left"]), "changed_beyond_2px": int(m["changed_far"]),
           "fill_mae": m["abs_err"] / max(m["filled"], 1), "smooth_fill_mae": m["abs_err_smooth"] / max(m["filled"], 1),
           "fill_std": std("fill"), "truth_std": std("truth")}
    for name in ("fill", "truth"):
        mean_sq = m[f"{name}_sq"] / max(m["filled"], 1)
        out[f"{name}_lag1"] = (m[f"{name}_lag"] / max(m["pairs"], 1)) / mean_sq if mean_sq else 0.0
    return out


def demo_report(png: str | None = None, frames: int = 60, seed: int = 1, params: CleanParams = CleanParams(),
                log=print, rows: int = 3) -> dict:
    """Render `frames` demo frames in memory, clean them, print the figures (and return them); with `png`, write rows
    of raw | refined | clean truth there."""
    rng = np.random.default_rng(seed)
    total: dict = {}
    seconds, cpu, shown = 0.0, 0.0, []
    for _ in range(frames):
        raw, clean, _ = stored_frame(rng)
        t0, c0 = time.perf_counter(), time.process_time()
        refined = np.asarray(clean_ultrasound(Image.fromarray(raw), params)[0])
        seconds, cpu = seconds + time.perf_counter() - t0, cpu + time.process_time() - c0
        for k, v in frame_metrics(raw, clean, refined).items():
            total[k] = total.get(k, 0.0) + v
        if len(shown) < rows:
            shown.append(np.concatenate([raw] + [np.repeat(a[..., None], 3, 2) for a in (refined, clean)], 1))
    fig = summarise(total)
    fig["images_per_s"], fig["images_per_cpu_s"] = frames / max(seconds, 1e-9), frames / max(cpu, 1e-9)
    log(f"demo report: {frames} synthetic frames (seed {seed}), 224 x 224, cleaning only, one process")
    log(f"  stroke pixels removed          {fig['stroke_removed_pct']:.1f}% of the annotation's stroke pixels "
        f"(refined / raw stroke pixels {fig['refined_to_raw_strokes_pct']:.0f}%; clean truth / raw "
        f"{fig['clean_to_raw_strokes_pct']:.0f}%)")
    log(f"  visible artifact pixels left   {fig['visible_artifact_left_pct']:.1f}% ({fig['visible_artifact_left_px']} px)")
    log(f"  pixels changed > 2 px from any artifact  {fig['changed_beyond_2px']}")
    log(f"  fill error vs clean truth      MAE {fig['fill_mae']:.1f} grey levels (a smooth local-mean fill: "
        f"{fig['smooth_fill_mae']:.1f})")
    log(f"  fill texture vs truth          residual std {fig['fill_std']:.1f} vs {fig['truth_std']:.1f}; lag-1 "
        f"autocorrelation (grain) {fig['fill_lag1']:.2f} vs {fig['truth_lag1']:.2f}")
    log(f"  speed, one process             {fig['images_per_s']:.1f} images/s wall clock, "
        f"{fig['images_per_cpu_s']:.1f} per CPU second")
    if png:
        pgnm.write_atomic(png, _png_bytes(Image.fromarray(np.concatenate(shown, 0)).quantize(64)), then="run again")
        log(f"  wrote {png} (rows of raw | refined | clean truth)")
    return fig


# =====================================================================================================================
#  CLI
# =====================================================================================================================


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one stderr line (and exit code 2), like every other input error."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    d = CleanParams()
    p = _Parser(prog="refine_radimagenet.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-path", metavar="DIR", help="the RadImageNet root (holding radiology_ai/)")
    p.add_argument("--output-dir", metavar="DIR", help="where train/ val/ test/ and the manifest go")
    p.add_argument("--split-csv-dir", metavar="DIR", help="follow RadiologyAI_{train,val,test}.csv (column filename) "
                   "in DIR instead of splitting")
    p.add_argument("--allow-missing", action="store_true", help="with --split-csv-dir: go on when listed files are "
                   "not on disk (they are counted and listed in manifest.json); without it that is an error")
    p.add_argument("--correction-masks", metavar="DIR", help="apply the authors' per-image masks (<name>.npy) to "
                   "ultrasound instead of cleaning it")
    p.add_argument("--ratios", type=float, nargs=3, default=[0.8, 0.1, 0.1], metavar=("TRAIN", "VAL", "TEST"),
                   help="fractions of every class for train, val and test: each positive, summing to 1 "
                   "(default: 0.8 0.1 0.1)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the split, >= 0 (default: %(default)s)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="N", help="worker processes, 0 = this process "
                   "(default: the number of CPUs, %(default)s here)")
    p.add_argument("--no-clean", action="store_true", help="copy ultrasound images as they are")
    p.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    p.add_argument("--colour-threshold", type=int, default=d.colour_threshold, metavar="LEVEL", help="a pixel whose max(R,G,B) - "
                   "min(R,G,B) exceeds this is colour and is replaced, 0-255 (default: %(default)s)")
    p.add_argument("--black-level", type=int, default=d.black_level, metavar="LEVEL", help="the margin around the ultrasound image is "
                   "at most this bright; brighter margin pixels are annotation, 0-254 (default: %(default)s)")
    p.add_argument("--halo", type=int, default=d.halo, metavar="PX", help="grow the artifact mask by this many px, 0-3 "
                   "(default: %(default)s)")
    p.add_argument("--make-demo", metavar="DIR", help="write a small synthetic raw-layout tree to DIR (ultrasound "
                   "with scanner annotation; its clean truth in DIR/_clean) and exit")
    p.add_argument("--demo-per-class", type=int, default=12, metavar="N", help="images per class for --make-demo "
                   "(default: %(default)s)")
    p.add_argument("--demo-report", metavar="PNG", help="clean --demo-frames synthetic frames, print the removal, "
                   "damage, fill and speed figures, write rows of raw | refined | clean truth to PNG, and exit")
    p.add_argument("--demo-frames", type=int, default=60, metavar="N", help="frames for --demo-report "
                   "(default: %(default)s)")
    return p


def _check_new_path(flag: str, path: str, folder: bool) -> None:
    """A path the tool is to create: a folder (or a file) that may exist as such, in a folder that exists."""
    if folder and os.path.lexists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} exists and is not a folder: give a new or existing folder")
    if not folder and (os.path.isdir(path) or not path.lower().endswith(".png")):
        raise UserError(f"{flag} {path}: give a file name ending in .png")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UserError(f"{flag} {path}: the folder {parent} does not exist; create it first")


def unread_flags(a: argparse.Namespace, given: set) -> list[str]:
    """The flags given on the command line that this command would not read, each with the reason: refused, since
    a user who gave them expects them to act."""
    mode = "--make-demo" if a.make_demo else "--demo-report" if a.demo_report else None
    if a.make_demo and a.demo_report:
        return ["--make-demo and --demo-report are two commands: give one of them per command"]
    out = []
    for k in sorted(given):
        flag = "--" + k.replace("_", "-")
        if mode and k not in {"make_demo", "demo_report", "seed"} | ({"demo_per_class"} if a.make_demo else set()) \
                | ({"demo_frames", "colour_threshold", "black_level", "halo"} if a.demo_report else set()):
            out.append(f"{flag} is not read by {mode}")
        elif not mode and k in ("demo_per_class", "demo_frames"):
            out.append(f"{flag} only goes with {'--make-demo' if k == 'demo_per_class' else '--demo-report'}")
        elif not mode and k == "allow_missing" and not a.split_csv_dir:
            out.append(f"{flag} only goes with --split-csv-dir")
        elif not mode and k in ("ratios", "seed") and a.split_csv_dir:
            out.append(f"{flag} is not read with --split-csv-dir (the CSVs give the splits)")
        elif not mode and k in ("colour_threshold", "black_level", "halo") and (a.no_clean or a.correction_masks):
            out.append(f"{flag} is not read with {'--no-clean' if a.no_clean else '--correction-masks'} "
                       f"(no cleaning runs)")
    return out


def cli(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    log = lambda *x: print(*x, flush=True)  # noqa: E731
    unread = unread_flags(a, {k for k, v in vars(a).items() if v != parser.get_default(k)})
    if unread:
        drop = "" if "give one of them" in unread[0] else f": drop {'them' if len(unread) > 1 else 'it'}"
        print(f"error: {'; '.join(unread)}{drop} (see python refine_radimagenet.py --help)", file=sys.stderr)
        return 2
    try:
        params = CleanParams(colour_threshold=a.colour_threshold, black_level=a.black_level, halo=a.halo)
        for flag, value in (("--demo-per-class", a.demo_per_class), ("--demo-frames", a.demo_frames)):
            if not 1 <= value <= 100_000:
                raise UserError(f"{flag} {value}: must be between 1 and 100000")
        if a.make_demo or a.demo_report:
            check_run_arguments_numbers(a.ratios, a.seed, a.workers, params)
        if a.make_demo:
            _check_new_path("--make-demo", a.make_demo, folder=True)
            res = make_demo(a.make_demo, a.demo_per_class, a.seed)
            log(f"wrote {res['images']} images in {res['classes']} classes: "
                f"{os.path.join(a.make_demo, 'radiology_ai')}/ and their clean truth {os.path.join(a.make_demo, '_clean')}/")
            return 0
        if a.demo_report:
            _check_new_path("--demo-report", a.demo_report, folder=False)
            demo_report(a.demo_report, a.demo_frames, a.seed, params, log)
            return 0
        if not a.data_path or not a.output_dir:
            raise UserError("--data-path and --output-dir are required (or --make-demo DIR to try it on a demo tree)")
        refine(a.data_path, a.output_dir, a.split_csv_dir, a.correction_masks, a.ratios, a.seed, a.workers,
               a.no_clean, a.dry_run, params, log, a.allow_missing)
        return 0
    except (UserError, OSError) as e:
        print(f"error: {pgnm.failure_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the finished outputs are kept; run the same command again to go on", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
