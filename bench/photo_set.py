"""The suite's real photo set (bench/budget_suite.py's `photos`): the clothing data set of
github.com/alexeygrigorev/clothing-dataset-small at commit 11961516512414bf9f6c150a832cfd21b54a6b54,
licence CC0 1.0 (public domain; its LICENSE file), turned into an image folder of class folders:

    python bench/photo_set.py            # -> /work/data/photos-clothing (from the fetched mirror)
    python bench/photo_set.py --git-dir /path/to/clothing-dataset-small/.git --out /tmp/photos

3,781 JPEG photos (mostly 400 x 533 px, portrait, a garment on a plain or home background) of 10
classes: dress, hat, longsleeve, outwear, pants, shirt, shoes, shorts, skirt, t-shirt; unbalanced
(t-shirt 928, skirt 136). By default all of them go to `<out>/<class>/<n>.jpg`, one folder per
class, and a run holds out its own stratified, seeded 20% test split (757 photos, the same for
every side of a seed): the repository's own test/ has 372 photos, whose standard error (about
2.4 points at 70% accuracy) would hide the 1-point differences the suite measures.
`--keep-splits` keeps the repository's: its train/ (3,068) and validation/ (341) become
`<out>/train/` (the pipeline holds out its own validation rows), its test/ (372) `<out>/test/`.
Each photo is copied byte for byte (no re-encoding), `n` counting the class's files in the
repository's (sorted) order; `<out>/SOURCE.txt` names the repository, commit and licence and maps
each file back to its path there.

Reads the mirror (a bare git directory, as the session's `fetch` leaves it) with `git archive`;
only the standard library. Refuses an `--out` that exists. Prints the folder and its counts.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import tarfile
from pathlib import Path

REPOSITORY = "alexeygrigorev/clothing-dataset-small"
COMMIT = "11961516512414bf9f6c150a832cfd21b54a6b54"
LICENCE = "CC0 1.0 Universal (public domain dedication; the repository's LICENSE)"
SPLITS = {"train": "train", "validation": "train", "test": "test"}  # repository folder -> our split
GIT_DIR = Path("/work/.mirror/alexeygrigorev+clothing-dataset-small/repo/.git")
OUT = Path("/work/data/photos-clothing")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--git-dir", type=Path, default=GIT_DIR, help="the repository's (bare) git directory")
    parser.add_argument("--commit", default=COMMIT)
    parser.add_argument("--out", type=Path, default=OUT, help="folder to write (must not exist)")
    parser.add_argument("--keep-splits", action="store_true", help="train/ and test/ as the repository splits them")
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; remove it first")
    archive = subprocess.Popen(["git", "--git-dir", str(args.git_dir), "archive", "--format=tar", args.commit,
                                *SPLITS], stdout=subprocess.PIPE)
    tmp = args.out.with_name(args.out.name + ".partial")
    counts, lines = collections.Counter(), []
    with tarfile.open(fileobj=archive.stdout, mode="r|") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 3 or Path(member.name).suffix.lower() not in (".jpg", ".jpeg"):
                continue
            source, label, _ = parts
            data = tar.extractfile(member).read()
            if data[:2] != b"\xff\xd8":  # a pointer or a truncated file, not a JPEG
                raise SystemExit(f"{member.name}: not a JPEG file ({len(data)} bytes)")
            split = SPLITS[source] if args.keep_splits else "."
            n = counts[split, label]
            counts[split, label] += 1
            target = tmp / split / label / f"{n:04d}.jpg"  # "./" is dropped
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            lines.append(f"{target.relative_to(tmp)} <- {member.name}")
    if archive.wait():
        raise SystemExit(f"git archive failed (exit {archive.returncode})")
    (tmp / "SOURCE.txt").write_text(
        f"https://github.com/{REPOSITORY} at commit {args.commit}\nlicence: {LICENCE}\n"
        f"made by bench/photo_set.py; each file <- its path in the repository:\n" + "\n".join(lines) + "\n")
    tmp.rename(args.out)
    for split in ("train", "test") if args.keep_splits else (".",):
        by_class = {label: n for (s, label), n in sorted(counts.items()) if s == split}
        print(f"{args.out / split}: {sum(by_class.values())} photos, {len(by_class)} classes: "
              + ", ".join(f"{k} {v}" for k, v in by_class.items()))


if __name__ == "__main__":
    main()
