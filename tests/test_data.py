"""Loaders: image folders the test writes, a CIFAR-10 python-format archive the test
writes (read through the local-copy path), and the errors for bad input."""

from __future__ import annotations

import json
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline.config import FOLDER_SPACE, SEED_SPACE, Settings
from pipeline.data import CIFAR10_CLASSES, load_dataset
from pipeline.errors import PipelineError


def write_images(root, classes=("cat", "dog"), n=5, size=(12, 12), mode="RGB", suffix=".png"):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / c / f"{i}{suffix}")


def test_digits_is_uint8_images_with_sealed_test_split():
    data = load_dataset("digits")
    assert data.x_train.dtype == np.uint8 and data.x_train.shape[1:] == (8, 8, 1)
    assert data.x_train.max() == 255 and data.n_classes == 10
    assert len(data.y_train) + len(data.test) == 1797
    assert not data.test.opened


def test_folder_with_train_and_test_splits(tmp_path, capsys):
    write_images(tmp_path / "train", n=6)
    write_images(tmp_path / "test", n=2, suffix=".jpg")
    data = load_dataset(str(tmp_path))
    assert data.class_names == ["cat", "dog"]
    assert data.x_train.shape == (12, 12, 12, 3) and data.x_train.dtype == np.uint8
    assert len(data.test) == 4 and sorted(set(data.y_train)) == [0, 1]
    assert data.source == str(tmp_path.resolve())
    out = capsys.readouterr().out
    assert f"loading dataset {tmp_path}" in out, "a user waiting for a load knows what it reads"
    assert f"loaded {tmp_path.name}: 12 train / 4 test images of 12x12x3, 2 classes, in " in out


def test_flat_folder_gets_stratified_seeded_split(tmp_path):
    write_images(tmp_path, classes=("a", "b", "c"), n=10, mode="L")
    first = load_dataset(str(tmp_path), seed=3)
    again = load_dataset(str(tmp_path), seed=3)
    assert first.x_train.shape[1:] == (12, 12, 1)  # grayscale keeps one channel
    assert len(first.test) == 6 and np.bincount(first.test.y).tolist() == [2, 2, 2]
    np.testing.assert_array_equal(first.test.y, again.test.y)


def test_image_size_resizes_images_of_different_sizes(tmp_path):
    write_images(tmp_path / "a", classes=("x",), n=4, size=(10, 10))
    write_images(tmp_path / "b", classes=("x",), n=4, size=(14, 9))
    (tmp_path / "a" / "x").rename(tmp_path / "small")
    (tmp_path / "b" / "x").rename(tmp_path / "large")
    for d in ("a", "b"):
        (tmp_path / d).rmdir()
    with pytest.raises(PipelineError, match="set image_size"):
        load_dataset(str(tmp_path))
    data = load_dataset(str(tmp_path), image_size=16)
    assert data.x_train.shape[1:] == (16, 16, 3)


def test_image_size_resizes_array_datasets():
    data = load_dataset("digits", image_size=12)
    assert data.x_train.shape[1:] == (12, 12, 1) and data.test.x.shape[1:] == (12, 12, 1)


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda root: None, "not a known dataset"),
        (lambda root: root.mkdir(), "no class folders"),
        (lambda root: (root / "cat").mkdir(parents=True), "class folder has no png/jpg/jpeg image"),
        (lambda root: (write_images(root, n=1), (root / "dog" / "0.png").write_bytes(b"not a png")),
         "dog: no readable image"),
        (lambda root: write_images(root, classes=("cat",)), "one class ('cat'); a classifier needs at least 2"),
        (lambda root: (write_images(root / "train", classes=("cat",)), write_images(root / "test", classes=("cat",))),
         "one class ('cat')"),
        (lambda root: (write_images(root, classes=("cat",)), write_images(root, classes=("dog",), n=1)),
         "dog: 1 image; the seeded 20% test split needs at least 2 per class"),
    ],
    ids=["missing", "empty", "class-without-images", "class-of-corrupt-images", "one-class", "one-class-with-splits",
         "class-too-small-for-the-test-split"],
)
def test_bad_folders_give_one_line_errors(tmp_path, make, fragment):
    root = tmp_path / "images"
    make(root)
    with pytest.raises(PipelineError) as error:
        load_dataset(str(root))
    assert fragment in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("cv_folds, fragment", [(1, "class 'dog' has 1 training image(s); the validation split needs "
                                                     "at least 2 per class"),
                                                 (3, "class 'dog' has 2 training image(s); cv_folds=3 needs at least 3")])
def test_a_class_too_small_for_validation_or_folds_is_refused_before_any_run(tmp_path, cv_folds, fragment, capsys):
    from pipeline.cli import main

    write_images(tmp_path / "data" / "train", classes=("cat",), n=6)
    write_images(tmp_path / "data" / "train", classes=("dog",), n=max(2, cv_folds) - 1)
    write_images(tmp_path / "data" / "test", n=2)
    store = tmp_path / "optuna.db"
    code = main(["search", "--dataset", str(tmp_path / "data"), "--cv-folds", str(cv_folds),
                 "--storage", f"sqlite:///{store}"])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and err.count("\n") == 1, err
    assert not store.exists(), "refused before any study is made"


def test_unknown_dataset_name():
    with pytest.raises(PipelineError, match="dataset='mnist': not a known dataset"):
        load_dataset("mnist")


def cifar_batch(n, seed):
    rng = np.random.default_rng(seed)
    return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}


def write_cifar_folder(folder, n=6):
    folder.mkdir(parents=True)
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(cifar_batch(n, i)))
    (folder / "test_batch").write_bytes(pickle.dumps(cifar_batch(n, 9)))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [c.encode() for c in CIFAR10_CLASSES]}))


def check_cifar(data, n=6):
    assert data.x_train.shape == (5 * n, 32, 32, 3) and data.x_train.dtype == np.uint8
    assert len(data.test) == n and data.class_names == CIFAR10_CLASSES
    # channel-first rows are transposed to HWC: pixel (0, 0) holds the first R, G and B bytes
    first = cifar_batch(n, 1)[b"data"][0]
    assert data.x_train[0, 0, 0].tolist() == [first[0], first[1024], first[2048]]


def test_cifar_local_folder(tmp_path):
    write_cifar_folder(tmp_path / "cifar-10-batches-py")
    check_cifar(load_dataset(str(tmp_path / "cifar-10-batches-py")))


def test_cifar_local_archive(tmp_path):
    write_cifar_folder(tmp_path / "cifar-10-batches-py")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    check_cifar(load_dataset(str(archive)))


def test_truncated_cifar_archive_is_named(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(b"\x1f\x8b\x08broken")
    with pytest.raises(PipelineError, match="cifar-10-python.tar.gz: not a readable CIFAR-10 archive"):
        load_dataset(str(archive))


def test_cifar10_offline_without_cache_says_how_to_use_a_local_copy(tmp_path, monkeypatch):
    """Runs against the real network: this machine has none, as offline users have none."""
    monkeypatch.setattr("keras.src.backend.config._KERAS_DIR", str(tmp_path / "keras"))  # an empty cache
    with pytest.raises(PipelineError, match="local copy"):
        load_dataset("cifar10")


def test_an_image_folder_defaults_to_the_photos_space_and_digits_and_cifar10_to_the_seed(tmp_path):
    write_images(tmp_path / "pets", n=2)
    (tmp_path / "cifar").mkdir()
    (tmp_path / "cifar" / "data_batch_1").write_bytes(b"")
    assert Settings(dataset=str(tmp_path / "pets")).search_space == FOLDER_SPACE == "search_spaces/photos.yaml"
    for dataset in ("digits", "cifar10", str(tmp_path / "cifar"), str(tmp_path / "cifar.tar.gz")):
        assert Settings(dataset=dataset).search_space == SEED_SPACE == "search_spaces/seed.yaml", dataset
    assert Settings(dataset=str(tmp_path / "pets"), search_space="x.yaml").search_space == "x.yaml"
    assert Settings().replace(dataset=str(tmp_path / "pets")).search_space == SEED_SPACE, "as resolved"


def test_a_search_on_an_image_folder_logs_the_folder_as_its_datasets_source(tmp_path, settings, capsys):
    """A study on an image folder (the CIFAR-10 recipe's kind of data) runs end to end on the
    folder's default space, says so, and its runs' datasets name the folder as their source."""
    import json

    import mlflow

    from pipeline.cli import run

    write_images(tmp_path / "pets", n=12)
    run("main", settings.replace(dataset=str(tmp_path / "pets"), search_space="", n_trials=1, epochs=1))
    out = capsys.readouterr().out
    line = "search space: search_spaces/photos.yaml, the default of an image folder (search_space=search_spaces/seed.yaml"
    assert out.count(line) == 2, out  # at the start and in the summary
    runs = mlflow.search_runs(experiment_names=["test-experiment"], output_format="list")
    assert len(runs) == 2  # the parent and its trial
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.params["search_space"] == "search_spaces/photos.yaml"
    trial = next(r for r in runs if r is not parent)
    assert trial.data.params["whiten"] == "True" and trial.data.params["tta"] == "flip"
    for r in runs:
        sources = {json.loads(d.dataset.source)["uri"] for d in r.inputs.dataset_inputs}
        assert sources == {str(tmp_path / "pets")}, sources


def write_sized(folder, sizes, cls="cat"):
    """One RGB PNG per (width, height) in `sizes`, in `folder/<cls>/`."""
    (folder / cls).mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(np.full((h, w, 3), i * 20, np.uint8), "RGB").save(folder / cls / f"s{i}.png")


def test_the_loading_line_counts_splits_sizes_resizing_and_skipped_files(tmp_path, capsys):
    """Images read per split, original sizes (most common, smallest, largest), what image_size
    did, and the files skipped by reason, in one line; the same facts in the lineage."""
    root = tmp_path / "photos"
    write_images(root / "train", n=3, size=(20, 10))
    write_sized(root / "train", [(30, 40), (8, 6)], cls="dog")
    write_images(root / "validation", n=2, size=(20, 10))
    write_images(root / "test", n=1, size=(16, 16))
    (root / "train" / "cat" / "notes.txt").write_text("not a photo")
    (root / "train" / "dog" / ".DS_Store").write_bytes(b"\0")
    (root / "test" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    data = load_dataset(str(root), image_size=16)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("read "))
    assert line == (f"read {root}: images read train/ 8, validation/ 4, test/ 2; original sizes 20x10 most common "
                    "(10 of 14), smallest 8x6, largest 30x40; image_size=16: 12 of 14 resized to 16x16; skipped "
                    "3 file(s): 2 not an image (train/cat/notes.txt, train/dog/.DS_Store), 1 unreadable "
                    "(test/dog/broken.jpg)"), line
    assert len(data.y_train) == 12 and len(data.test) == 2, "the broken test file is skipped, not an error"
    facts = dict(data.lineage(data.x_train, data.y_train).facts)
    assert facts["images_read"] == "train/ 8, validation/ 4, test/ 2"
    assert facts["skipped"].startswith("3 file(s): 2 not an image") and facts["image_size"].startswith("16: 12 of 14")


def test_a_native_size_folder_says_it_kept_the_size_and_skipped_nothing(tmp_path, capsys):
    write_images(tmp_path / "train", n=2)
    write_images(tmp_path / "test", n=1)
    load_dataset(str(tmp_path))
    out = capsys.readouterr().out
    assert (f"read {tmp_path}: images read train/ 4, test/ 2; original sizes 12x12 most common (6 of 6), smallest "
            "12x12, largest 12x12; image_size=0: native size kept, 12x12; skipped none") in out, out


@pytest.mark.parametrize("folder", ["validation", "val", "valid"])
def test_a_validation_folder_is_the_validation_split_and_the_refit_trains_on_it(tmp_path, folder, capsys):
    """validation/, val/ or valid/ beside train/: its images are the one validation split
    (no row of train/ split off, val_fraction unused), and they are training rows of the refit."""
    from pipeline.train import validation_splits

    write_images(tmp_path / "train", n=6)
    write_images(tmp_path / folder, n=3, size=(12, 12))
    write_images(tmp_path / "test", n=2)
    data = load_dataset(str(tmp_path))
    assert capsys.readouterr().out.count(f"loaded {tmp_path.name}: 12 train + 6 validation / 4 test images") == 1
    assert len(data.y_train) == 18 and data.val_rows.tolist() == list(range(12, 18))
    assert data.folders == {"training": "train/", "validation": f"{folder}/", "test": "test/"}
    (split,) = validation_splits(data.x_train, data.y_train, 1, 0.5, 0, data.val_rows)
    assert split.val_rows.tolist() == list(range(12, 18)) and split.train_rows.tolist() == list(range(12))
    assert not data.test.opened


def test_a_validation_folder_without_test_splits_the_test_off_train_only(tmp_path):
    write_images(tmp_path / "train", n=10)
    write_images(tmp_path / "val", n=2)
    data = load_dataset(str(tmp_path))
    assert len(data.test) == 4 and len(data.y_train) == 16 + 4 and len(data.val_rows) == 4
    assert data.folders["test"] == "a seeded 20% of train/"


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda root: write_images(root / "validation", classes=("cat", "dog", "fox")),
         "validation: class folder(s) ['fox'] not in "),
        (lambda root: write_images(root / "val", classes=("cat",)), "val/dog: class folder missing or without images"),
        (lambda root: (write_images(root / "val"), write_images(root / "valid")),
         "several validation folders (val/, valid/); keep one"),
    ],
    ids=["extra-class", "missing-class", "two-validation-folders"],
)
def test_a_validation_folder_whose_classes_differ_is_a_one_line_error(tmp_path, make, fragment):
    root = tmp_path / "images"
    write_images(root / "train")
    write_images(root / "test")
    make(root)
    with pytest.raises(PipelineError) as error:
        load_dataset(str(root))
    assert fragment in str(error.value) and "\n" not in str(error.value), str(error.value)


def _inputs(run):
    """{context: [rows, ...]} of a run's MLflow dataset inputs, and the tags of the first."""
    found, tags = {}, {}
    for d in run.inputs.dataset_inputs:
        context = {t.key: t.value for t in d.tags}
        profile = json.loads(d.dataset.profile)
        found.setdefault(context["mlflow.data.context"], []).append(profile["features_shape"][0])
        tags = tags or context
    return found, tags


def three_folders(tmp_path, validation: str):
    """pets/ with train/ (6 images a class), `validation`/ (3) and test/ (2), 2 classes."""
    root = tmp_path / "pets"
    for folder, n in (("train", 6), (validation, 3), ("test", 2)):
        write_images(root / folder, n=n)
    return root


def test_a_study_validates_on_the_validation_folder_and_refits_on_train_and_validation(tmp_path, settings, capsys):
    """End to end: the trial trains on train/ and validates on validation/ (val_fraction would
    split 0.5 of train/ off), the refit trains on both, the test opens only at the refit; the
    start of the run says which folder serves what, and the lineage carries the read facts."""
    import mlflow

    from pipeline.cli import run

    root = three_folders(tmp_path, "validation")
    run("main", settings.replace(dataset=str(root), n_trials=1, epochs=1, val_fraction=0.5))
    out = capsys.readouterr().out
    assert ("splits: training <- train/ (12 images), validation <- validation/ (6; val_fraction unused), "
            "test <- test/ (4, sealed until the refit)") in out, out
    assert "on all 18 training images (train/ + validation/)" in out
    runs = mlflow.search_runs(experiment_names=["test-experiment"], output_format="list")
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    trial = next(r for r in runs if r is not parent)
    inputs, tags = _inputs(trial)
    assert inputs == {"training": [12], "validation": [6]}
    assert tags["images_read"] == "train/ 12, validation/ 6, test/ 4" and tags["skipped"] == "none"
    assert _inputs(parent)[0] == {"training": [18], "test": [4]}


def test_cv_folds_with_a_validation_folder_draws_the_folds_from_train_and_validation_pooled(tmp_path, settings,
                                                                                             capsys):
    import mlflow

    from pipeline.cli import run

    root = three_folders(tmp_path, "val")
    run("search", settings.replace(dataset=str(root), n_trials=1, epochs=1, cv_folds=3))
    out = capsys.readouterr().out
    assert "splits: cv_folds=3: folds of train/ and val/ pooled (18 images; val_fraction unused)" in out, out
    (trial,) = [r for r in mlflow.search_runs(experiment_names=["test-experiment"], output_format="list")
                if "mlflow.parentRunId" in r.data.tags]
    inputs, _ = _inputs(trial)
    assert inputs["validation"] == [6, 6, 6] and inputs["training"] == [12, 12, 12], "val/'s 6 images in the folds"
