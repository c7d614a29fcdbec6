"""A stand-in for a user's own photo folder, made from an image folder of `<class>/<image>`
files: `--per-class` images of each class, resized to `--size` × `--size`, saved as
`<out>/<class>/<n>.JPG` (upper-case, as cameras name them), one folder per class and no
train/ or test/, so a run holds out its own stratified 20% test split.

    python bench/make_photos.py ../shared/data/cifar10-train /tmp/photos --per-class 300 --size 100

Only PIL and the standard library: no import of the pipeline. Prints the folder and its count.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="image folder: <class>/<image>")
    parser.add_argument("out", type=Path, help="folder to write (must not exist)")
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--size", type=int, default=100)
    args = parser.parse_args()
    args.out.mkdir(parents=True)
    count = 0
    for class_dir in sorted(p for p in args.source.iterdir() if p.is_dir()):
        (args.out / class_dir.name).mkdir()
        for n, path in enumerate(sorted(class_dir.iterdir())[:args.per_class]):
            with Image.open(path) as im:
                im.convert("RGB").resize((args.size, args.size), Image.Resampling.BICUBIC).save(
                    args.out / class_dir.name / f"{n:04d}.JPG", quality=92)
            count += 1
    print(f"{args.out}: {count} images of {args.size}x{args.size}")


if __name__ == "__main__":
    main()
