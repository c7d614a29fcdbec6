"""The time to read a folder of JPEGs several hundred pixels a side (issue 40): N photo-like
JPEGs (smooth colour fields with noise, quality 90) of W x H written as train/<class>/ and
test/<class>/, then `pipeline.data.load_dataset` on the folder (decode, convert, resize to
`image_size`, as a run reads it), wall seconds per 1,000 images.

    python bench/read_jpegs.py                        # 2,000 images of 500x375 to 64x64
    python bench/read_jpegs.py --n 1000 --image-size 0 --width 256 --height 256

Last line: `n width height image_size threads read_s per_1000_s mb`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from common import result_line

import numpy as np  # noqa: I001
from PIL import Image

from pipeline.data import load_dataset


def write_photos(root: Path, n: int, width: int, height: int, classes: int = 5) -> float:
    """`n` JPEGs, 80% under train/, 20% under test/; returns their megabytes."""
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(n):
        split, label = ("train" if i % 5 else "test"), f"c{(i // 5) % classes}"
        (root / split / label).mkdir(parents=True, exist_ok=True)
        a, b, c = rng.random(3) * 0.05
        field = np.stack([np.sin(a * xs + b * ys), np.cos(b * xs - c * ys), np.sin(c * xs + a * ys)], -1)
        image = np.clip(127 + 100 * field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / split / label / f"{i}.jpg", quality=90)
    return sum(p.stat().st_size for p in root.rglob("*.jpg")) / 1e6


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--image-size", type=int, default=64)
    a = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-jpegs-") as tmp:
        mb = write_photos(Path(tmp), a.n, a.width, a.height)
        print(f"wrote {a.n} JPEGs of {a.width}x{a.height}, {mb:.1f} MB", flush=True)
        start = time.perf_counter()
        load_dataset(tmp, image_size=a.image_size)
        seconds = time.perf_counter() - start
    print(result_line(dict(n=a.n, width=a.width, height=a.height, image_size=a.image_size, threads=os.cpu_count(),
                           read_s=seconds, per_1000_s=1000 * seconds / a.n, mb=mb)))


if __name__ == "__main__":
    main()
