"""The data: datasets loaded once per process into uint8 arrays (N, H, W, C) with int labels (this
module), what reading an image folder met (`reads`), and the lines that say so at a run's start
(`lines`: the splits, imbalanced classes; imports `pipeline.config`, which nothing here below it does).

    load_dataset("digits")                     # embedded, offline: scikit-learn's 8x8 digits
    load_dataset("cifar10")                    # Keras' loader (downloads once, then its cache)
    load_dataset("/data/cifar-10-python.tar.gz")   # local CIFAR-10 copy (or cifar-10-batches-py/)
    load_dataset("/data/my_images")            # <root>/{train,validation,test}/<class>/* or <root>/<class>/*

An image folder is read as its layout says: `train/` and `test/` (each of class folders) are
the training and test splits; a validation folder beside `train/` (`validation/`, `val/` or
`valid/`) is read too, and its images are appended to the training images, their row numbers
kept as `val_rows`: the search validates on them (pipeline.train.validation_splits) and the
refit trains on all training rows, train/ and validation/ together. Without `test/` a seeded
20% of `train/` (or of a flat `<root>/<class>/` folder) is the test split. A validation or test
folder must hold the class folders of `train/`, no more, no fewer (a one-line error).

The test split is wrapped in `HeldOut`: nothing reads it until the refit calls `open()`,
and `opened` records whether anyone did. A dataset read from files says what it reads (a
progress bar for large image folders) and what it loaded; an image folder also says, in one
line, the images read per split, their original sizes, what `image_size` did and the files
skipped (pipeline.data.reads), facts its lineage carries too. `digest` fingerprints the content
of a split for MLflow's dataset lineage (pipeline.tracking.log_datasets).
"""

from __future__ import annotations

import hashlib
import pickle
import tarfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.data.reads import NOT_AN_IMAGE, UNREADABLE, Reads

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
VALIDATION_FOLDERS = ("validation", "val", "valid")  # a validation split beside train/, by the names in use
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TEST_FRACTION = 0.2  # test share for datasets that ship without a test split
BAR_FROM = 2000  # image files from which reading a folder shows a progress bar
DIGEST_ROWS = 4096  # rows hashed at a time (no copy of a whole split)
SOURCES = {  # where the built-in datasets come from, for the lineage of every run
    "digits": "sklearn.datasets.load_digits",
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
}


@dataclass
class HeldOut:
    """The test split, sealed until the refit opens it once."""

    x: np.ndarray = field(repr=False)
    y: np.ndarray = field(repr=False)
    opened: bool = False

    def open(self) -> tuple[np.ndarray, np.ndarray]:
        self.opened = True
        return self.x, self.y

    def __len__(self):
        return len(self.y)


@dataclass
class Dataset:
    name: str
    x_train: np.ndarray = field(repr=False)
    y_train: np.ndarray = field(repr=False)
    test: HeldOut
    class_names: list[str]
    source: str = ""  # where the images come from: a built-in loader, a URL, or an absolute path
    val_rows: np.ndarray | None = field(default=None, repr=False)  # training rows read from a validation folder
    folders: dict = field(default_factory=dict)  # split -> the folder it was read from: {"training": "train/", ...}
    facts: dict = field(default_factory=dict)  # what reading the folder met (pipeline.data.reads.Reads.facts)

    @property
    def input_shape(self) -> tuple:
        return tuple(self.x_train.shape[1:])

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def lineage(self, x: np.ndarray, y: np.ndarray, rows: np.ndarray | None = None) -> "Lineage":
        """What MLflow's dataset tracking records of images `x` (or their `rows`) of this dataset."""
        count = len(y) if rows is None else len(rows)
        return Lineage(self.name, self.source, digest(x, y, rows), count, self.n_classes, tuple(x.shape[1:]),
                       tuple(self.facts.items()))


@dataclass(frozen=True)
class Lineage:
    """A split as MLflow's dataset tracking shows it: name, source, content digest, rows,
    classes and image shape, and what reading the folder met (`facts`: (key, text) pairs)."""

    name: str
    source: str
    digest: str
    rows: int
    classes: int
    shape: tuple
    facts: tuple = ()


def digest(x: np.ndarray, y: np.ndarray, rows: np.ndarray | None = None) -> str:
    """A content digest of labelled images (all rows, or `rows` in that order): it changes
    when any pixel, label or the row selection changes."""
    rows = np.arange(len(y)) if rows is None else np.asarray(rows)
    h = hashlib.sha256(repr((x.shape[1:], str(x.dtype), len(rows))).encode())
    for start in range(0, len(rows), DIGEST_ROWS):
        chunk = rows[start:start + DIGEST_ROWS]
        h.update(np.ascontiguousarray(x[chunk]).tobytes())
        h.update(np.ascontiguousarray(y[chunk], np.int64).tobytes())
    return h.hexdigest()[:16]


def _split(x, y, seed: int):
    """Stratified, seeded train/test split for datasets without one."""
    from sklearn.model_selection import train_test_split  # here: checking a dataset name needs no sklearn

    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=TEST_FRACTION, stratify=y, random_state=seed)
    return x_tr, y_tr, x_te, y_te


def check_splittable(data: Dataset, cv_folds: int) -> None:
    """Refuse a train split whose every class cannot reach both sides of the stratified
    validation split (2 images) or every CV fold (`cv_folds` images). A validation folder is
    the validation split as it is (with `cv_folds=1`): nothing is split."""
    if data.val_rows is not None and cv_folds == 1:
        return
    need = max(2, cv_folds)
    counts = np.bincount(data.y_train, minlength=data.n_classes)
    for name, count in zip(data.class_names, counts):
        if count < need:
            rule = f"cv_folds={cv_folds} needs" if cv_folds > 1 else "the validation split needs"
            raise PipelineError(f"dataset {data.source or data.name}: class {name!r} has {count} training image(s); "
                                f"{rule} at least {need} per class")


def _make(name, x_tr, y_tr, x_te, y_te, classes, source, **extra) -> Dataset:
    if len(classes) < 2:
        raise PipelineError(f"dataset {source}: one class ({', '.join(map(repr, classes))}); "
                            "a classifier needs at least 2")
    as_images = lambda x: np.ascontiguousarray(x.reshape(x.shape if x.ndim == 4 else (*x.shape, 1)), np.uint8)  # noqa: E731
    return Dataset(
        name,
        as_images(x_tr),
        np.asarray(y_tr, np.int32).ravel(),
        HeldOut(as_images(x_te), np.asarray(y_te, np.int32).ravel()),
        list(classes),
        str(source),
        **extra,
    )


def load_digits(seed: int) -> Dataset:
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = np.rint(bunch.images * (255 / 16)).astype(np.uint8)  # 0..16 grey levels -> 0..255
    return _make("digits", *_split(x, bunch.target, seed), [str(c) for c in bunch.target_names], SOURCES["digits"])


def load_cifar10_keras() -> Dataset:
    import keras

    try:
        (x_tr, y_tr), (x_te, y_te) = keras.datasets.cifar10.load_data()
    except Exception as e:  # no cache and no network, or a broken download
        raise PipelineError(
            f"dataset=cifar10: Keras could not load CIFAR-10 ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
            "offline, point dataset at a local copy: the cifar-10-python.tar.gz archive or its "
            "cifar-10-batches-py/ folder"
        ) from None
    return _make("cifar10", x_tr, y_tr, x_te, y_te, CIFAR10_CLASSES, SOURCES["cifar10"])


def _cifar_batches(read, where) -> Dataset:
    """CIFAR-10 python format: `read(name)` returns the bytes of one batch file."""

    def batch(name):
        try:
            d = pickle.loads(read(name), encoding="bytes")
            return d[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.array(d[b"labels"])
        except (KeyError, FileNotFoundError, pickle.UnpicklingError, ValueError, EOFError) as e:
            raise PipelineError(f"{where}: cannot read CIFAR-10 batch '{name}' ({type(e).__name__})") from None

    train = [batch(f"data_batch_{i}") for i in range(1, 6)]
    x_te, y_te = batch("test_batch")
    try:
        meta = pickle.loads(read("batches.meta"), encoding="bytes")
        classes = [c.decode() for c in meta[b"label_names"]]
    except (KeyError, FileNotFoundError):
        classes = CIFAR10_CLASSES
    x_tr = np.concatenate([x for x, _ in train])
    y_tr = np.concatenate([y for _, y in train])
    return _make(Path(where).name, x_tr, y_tr, x_te, y_te, classes, Path(where).resolve())


def load_cifar10_archive(path: Path) -> Dataset:
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}

            def read(name):
                if name not in members:
                    raise FileNotFoundError(name)
                return tar.extractfile(members[name]).read()

            return _cifar_batches(read, str(path))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise PipelineError(f"{path}: not a readable CIFAR-10 archive ({e})") from None


def load_cifar10_folder(path: Path) -> Dataset:
    return _cifar_batches(lambda name: (path / name).read_bytes(), str(path))


def _read_image(path: Path, mode: str | None, size: int):
    """(uint8 array, original (width, height)) of one image file, or None where PIL cannot read it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            original = im.size
            im = im.convert(mode or ("L" if im.mode in ("L", "LA", "I", "I;16", "1") else "RGB"))
            if size:
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(im, np.uint8), original
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None


def _class_dirs(root: Path) -> list[Path]:
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise PipelineError(f"{root}: no class folders (expected <root>/<class>/<image> or <root>/train/<class>/...)")
    return dirs


def _image_files(class_dir: Path, reads: Reads | None = None) -> list[Path]:
    """The image files of a class folder; the other files are skipped as `not an image`."""
    files = sorted(p for p in class_dir.iterdir() if p.is_file())
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if reads is not None:
        for p in files:
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                reads.skip(NOT_AN_IMAGE, p)
    if not images:
        raise PipelineError(f"{class_dir}: class folder has no png/jpg/jpeg image")
    return images


def _read_split(root: Path, classes: list[str], mode: str | None, size: int, reads: Reads, label: str):
    from joblib import Parallel, delayed

    files, labels = [], []
    for index, name in enumerate(classes):
        if not (root / name).is_dir():
            raise PipelineError(f"{root / name}: class folder missing or without images")
        found = _image_files(root / name, reads)
        files += found
        labels += [index] * len(found)
    jobs = Parallel(n_jobs=-1, prefer="threads", batch_size=256, return_as="generator")(
        delayed(_read_image)(f, mode, size) for f in files)
    if len(files) >= BAR_FROM:
        from tqdm import tqdm

        jobs = tqdm(jobs, total=len(files), desc=f"reading {root}", unit="image", dynamic_ncols=True)
    images, kept = [], []
    for path, index, read in zip(files, labels, jobs):
        if read is None:
            reads.skip(UNREADABLE, path)
            continue
        images.append(read[0])
        kept.append(index)
        reads.size(read[1])
    missing = sorted(set(range(len(classes))) - set(kept))
    if missing:
        raise PipelineError(f"{root / classes[missing[0]]}: no readable image (each unreadable)")
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise PipelineError(f"{root}: images differ in size {sorted(shapes)[:3]}...; set image_size to resize them")
    reads.read(label, len(images))
    return np.stack(images), np.array(kept)


def _detect_mode(class_dirs: list[Path]) -> str | None:
    """One colour mode for all images: RGB if any sampled image has colour, else grayscale."""
    from PIL import Image

    for d in class_dirs:
        for f in _image_files(d)[:20]:
            try:
                with Image.open(f) as im:
                    if im.mode not in ("L", "LA", "I", "I;16", "1"):
                        return "RGB"
            except OSError:
                continue  # the full read skips the broken file
    return "L"


def validation_folder(root: Path) -> Path | None:
    """The validation folder beside `root/train/` (validation/, val/ or valid/), if any; two
    of them is a one-line error (which one is meant?)."""
    if not (root / "train").is_dir():
        return None
    found = [root / name for name in VALIDATION_FOLDERS if (root / name).is_dir()]
    if len(found) > 1:
        raise PipelineError(f"{root}: several validation folders ({', '.join(p.name + '/' for p in found)}); "
                            "keep one")
    return found[0] if found else None


def _read_beside(folder: Path, train_root: Path, classes: list[str], mode: str | None, size: int, reads: Reads,
                 shape: tuple):
    """A split folder beside train/ (validation or test): the same class folders, images of
    the training images' size."""
    extra = sorted({d.name for d in _class_dirs(folder)} - set(classes))
    if extra:
        raise PipelineError(f"{folder}: class folder(s) {extra} not in {train_root}")
    x, y = _read_split(folder, classes, mode, size, reads, f"{folder.name}/")
    if x.shape[1:] != shape:
        raise PipelineError(f"{folder.parent}: {train_root.name} and {folder.name} images differ in size; "
                            "set image_size to resize them")
    return x, y


def load_image_folder(root: Path, seed: int, image_size: int) -> Dataset:
    val_root = validation_folder(root)
    has_test = (root / "train").is_dir() and (root / "test").is_dir()
    train_root = root / "train" if has_test or val_root else root
    class_dirs = _class_dirs(train_root)
    classes = [d.name for d in class_dirs]
    mode = _detect_mode(class_dirs)
    reads = Reads(image_size)
    x, y = _read_split(train_root, classes, mode, image_size, reads, f"{train_root.name}/" if train_root != root else "")
    shape = x.shape[1:]
    folders = {"training": f"{train_root.name}/" if train_root != root else f"{root.name}/"}
    if val_root:
        folders["validation"] = f"{val_root.name}/"
        x_va, y_va = _read_beside(val_root, train_root, classes, mode, image_size, reads, shape)
    if has_test:
        folders["test"] = "test/"
        x_te, y_te = _read_beside(root / "test", train_root, classes, mode, image_size, reads, shape)
    else:
        counts = np.bincount(y, minlength=len(classes))
        if len(classes) > 1 and counts.min() < 2:
            small = classes[int(counts.argmin())]
            raise PipelineError(f"{train_root / small}: {counts.min()} image; the seeded {TEST_FRACTION:.0%} test "
                                "split needs at least 2 per class")
        x, y, x_te, y_te = _split(x, y, seed)
        folders["test"] = f"a seeded {TEST_FRACTION:.0%} of {folders['training']}"
    val_rows = None
    if val_root:
        val_rows = np.arange(len(y), len(y) + len(y_va))
        x, y = np.concatenate([x, x_va]), np.concatenate([y, y_va])
    print(reads.line(root, shape), flush=True)
    return _make(root.name, x, y, x_te, y_te, classes, root.resolve(), val_rows=val_rows, folders=folders,
                 facts=reads.facts(shape, root))


def load_dataset(name: str, seed: int = 42, image_size: int = 0) -> Dataset:
    """Dispatch on the `dataset` setting; every failure is a one-line PipelineError. A dataset
    read from files or downloaded says what it reads and what it loaded."""
    if name == "digits":
        return _load(name, seed, image_size)
    print(f"loading dataset {name}" + (f", resized to {image_size}x{image_size}" if image_size else ""), flush=True)
    start = time.perf_counter()
    data = _load(name, seed, image_size)
    val = len(data.val_rows) if data.val_rows is not None else 0
    train = f"{len(data.y_train) - val:,} train" + (f" + {val:,} validation" if val else "")
    print(f"loaded {data.name}: {train} / {len(data.test):,} test images of "
          f"{'x'.join(map(str, data.input_shape))}, {data.n_classes} classes, in {time.perf_counter() - start:.1f} s",
          flush=True)
    return data


def check_dataset_name(name: str) -> None:
    """A dataset that is neither known nor a path is refused before anything heavy is imported."""
    if name not in ("digits", "cifar10") and not Path(name).expanduser().exists():
        raise PipelineError(f"dataset={name!r}: not a known dataset (digits, cifar10) and no such file or folder")


def is_image_folder(name: str) -> bool:
    """`dataset` names an image folder (`<class>/<image>`, or train/ and test/ of them), not
    CIFAR-10's python folder (which holds `data_batch_1`)."""
    path = Path(name).expanduser()
    return path.is_dir() and not (path / "data_batch_1").is_file()


def _load(name: str, seed: int, image_size: int) -> Dataset:
    check_dataset_name(name)
    if name == "digits":
        data = load_digits(seed)
    elif name == "cifar10":
        data = load_cifar10_keras()
    else:
        path = Path(name).expanduser()
        if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
            data = load_cifar10_archive(path)
        elif is_image_folder(name):
            return load_image_folder(path, seed, image_size)
        elif path.is_dir():
            data = load_cifar10_folder(path)
        else:
            raise PipelineError(f"dataset={name!r}: expected a folder or a cifar-10-python.tar.gz archive")
    return resize(data, image_size) if image_size else data


def resize(data: Dataset, size: int) -> Dataset:
    """Resize every image to size x size (for the array datasets; folders resize on read)."""
    if data.input_shape[:2] == (size, size):
        return data
    from keras import ops

    def r(x):
        out = ops.image.resize(x.astype(np.float32), (size, size), interpolation="bilinear", antialias=True)
        return np.clip(np.rint(ops.convert_to_numpy(out)), 0, 255).astype(np.uint8)

    return replace(data, x_train=r(data.x_train), test=HeldOut(r(data.test.x), data.test.y))
