"""What reading an image folder met, said plainly: images read per split, their original
sizes, what `image_size` did to them, and the files skipped with the reason.

    reads = Reads(image_size)
    reads.read("train/", count)          # images read from a split folder
    reads.size((width, height))          # the original size of each image read
    reads.skip("not an image", path)     # a file left out, and why
    reads.line(root, shape)  # "read /data/pets: images read train/ 12, test/ 4; original sizes ...; ..."
    reads.facts(shape)       # the same, {key: text}, for the MLflow dataset lineage (pipeline.tracking)

Skip reasons: `not an image` (a file whose suffix is not png/jpg/jpeg: notes, .DS_Store) and
`unreadable` (an image file PIL cannot decode: truncated, corrupt). Imports nothing heavy.
"""

from __future__ import annotations

import collections
from pathlib import Path

NOT_AN_IMAGE, UNREADABLE = "not an image", "unreadable"
EXAMPLES = 2  # skipped files named per reason


def _size(wh: tuple[int, int]) -> str:
    return f"{wh[0]}x{wh[1]}"


class Reads:
    """Counts of one folder's read, gathered while it is read (one thread appends at a time)."""

    def __init__(self, image_size: int):
        self.image_size = image_size
        self.splits: dict[str, int] = {}
        self.sizes: collections.Counter = collections.Counter()
        self.skipped: dict[str, list[Path]] = {}

    def read(self, split: str, count: int) -> None:
        self.splits[split] = self.splits.get(split, 0) + count

    def size(self, wh: tuple[int, int]) -> None:
        self.sizes[tuple(wh)] += 1

    def skip(self, reason: str, path: Path) -> None:
        self.skipped.setdefault(reason, []).append(path)

    def skipped_count(self, reason: str | None = None) -> int:
        return sum(len(v) for k, v in self.skipped.items() if reason in (None, k))

    def facts(self, shape: tuple, root: Path | None = None) -> dict[str, str]:
        """{images_read, original_sizes, image_size, skipped} as text; `shape`: the images' as loaded."""
        total = sum(self.sizes.values())
        facts = {"images_read": ", ".join(f"{split} {n:,}" for split, n in self.splits.items())}
        if self.sizes:
            (common, count), = self.sizes.most_common(1)
            by_area = sorted(self.sizes, key=lambda wh: (wh[0] * wh[1], wh))
            facts["original_sizes"] = (f"{_size(common)} most common ({count:,} of {total:,}), "
                                       f"smallest {_size(by_area[0])}, largest {_size(by_area[-1])}")
        loaded = f"{shape[1]}x{shape[0]}"
        if self.image_size:
            changed = total - self.sizes.get((self.image_size, self.image_size), 0)
            facts["image_size"] = f"{self.image_size}: {changed:,} of {total:,} resized to {loaded}"
        else:
            facts["image_size"] = f"0: native size kept, {loaded}"
        facts["skipped"] = self._skipped_text(root)
        return facts

    def _skipped_text(self, root: Path | None) -> str:
        if not self.skipped:
            return "none"
        parts = []
        for reason, paths in self.skipped.items():
            shown = [str(p.relative_to(root)) if root and p.is_relative_to(root) else str(p) for p in paths[:EXAMPLES]]
            more = ", ..." if len(paths) > EXAMPLES else ""
            parts.append(f"{len(paths):,} {reason} ({', '.join(shown)}{more})")
        return f"{self.skipped_count():,} file(s): " + ", ".join(parts)

    def line(self, root: Path, shape: tuple) -> str:
        """The loading line: `read <root>: images read ...; original sizes ...; image_size=...; skipped ...`."""
        facts = self.facts(shape, root)
        parts = [f"images read {facts['images_read']}"]
        if "original_sizes" in facts:
            parts.append(f"original sizes {facts['original_sizes']}")
        parts += [f"image_size={facts['image_size']}", f"skipped {facts['skipped']}"]
        return f"read {root}: " + "; ".join(parts)
