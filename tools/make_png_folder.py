"""Write pgnm's built-in synthetic scans as an ImageFolder of 8-bit greyscale PNG files, for timing a run that reads
its data from disk (`pgnm.py --bench-e2e ROOT`, `--bench-data ROOT`) without a real data set.

    python tools/make_png_folder.py /tmp/pngs --size 256 --per-class 16 --copies 25

root/train/<class>/*.png and root/val/<class>/*.png, the 24 classes of the synthetic set. --copies hard-links each
training image under that many names (a copy where links are not allowed), so that an epoch is long, for the price of
per-class unique images: the loader decodes and augments every file as if it were new, but the files come from the
page cache after their first read (as a data set on a local disk does after its first epoch).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pgnm  # noqa: E402


def make_png_folder(root: str, size: int = 256, per_class: int = 16, copies: int = 1, val_per_class: int = 4,
                    seed: int = 0) -> dict:
    """Write the folder; returns the number of files per split."""
    counts = {}
    for split, n, k in (("train", per_class, copies), ("val", val_per_class, 1)):
        images, labels, classes = pgnm.synthetic_arrays(n, size, seed, split)
        counts[split] = 0
        for i, (img, lab) in enumerate(zip(images, labels)):
            folder = os.path.join(root, split, classes[lab])
            os.makedirs(folder, exist_ok=True)
            first = os.path.join(folder, f"{i:05d}_0.png")
            Image.fromarray(img, mode="L").save(first)
            for c in range(1, k):
                dst = os.path.join(folder, f"{i:05d}_{c}.png")
                try:
                    os.link(first, dst)
                except OSError:
                    shutil.copyfile(first, dst)
            counts[split] += k
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--per-class", type=int, default=16, help="distinct training images per class")
    p.add_argument("--copies", type=int, default=1, help="names per training image (hard links)")
    p.add_argument("--val-per-class", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    counts = make_png_folder(a.root, a.size, a.per_class, a.copies, a.val_per_class, a.seed)
    print(f"wrote {a.root}: " + ", ".join(f"{s} {n} images" for s, n in counts.items()) + f" of {a.size} px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
