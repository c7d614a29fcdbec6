"""What the start of a run says about its data, beyond what loading it said (pipeline.data):

    splits_line(data, settings)     # which folders of an image folder serve which split
    imbalance_line(data, settings)  # where the largest class has 3x the images of the smallest

`splits_line`: an image folder's training, validation and test splits and the folders they
come from (None for the built-in datasets). With a validation folder (validation/, val/ or
valid/ beside train/) and `cv_folds=1` that folder is the validation split and `val_fraction`
is unused; with `cv_folds > 1` the folds are drawn from train/ and the validation folder
pooled. The test split stays sealed until the refit either way.

`imbalance_line`: counted on the training rows (a validation folder's included), it names the
settings that weigh every class alike: `metric=val_f1_macro` or `val_balanced_accuracy`, and
`class_weight=balanced`.
"""

from __future__ import annotations

import numpy as np

from pipeline.config import BALANCED_METRICS, Settings
from pipeline.data import Dataset

IMBALANCE = 3.0  # largest class / smallest class from which the start of a run warns


def splits_line(data: Dataset, settings: Settings) -> str | None:
    """`splits: training <- train/ (1,234 images), validation <- validation/ (341; val_fraction
    unused), test <- test/ (500, sealed until the refit)`; None without folders."""
    if not data.folders:
        return None
    folders, test = data.folders, f"test <- {data.folders['test']} ({len(data.test):,}, sealed until the refit)"
    if data.val_rows is None:
        if settings.cv_folds == 1:
            validation = (f"validation <- {settings.val_fraction:.0%} of {folders['training']} "
                          f"(val_fraction={settings.val_fraction})")
        else:
            validation = f"cv_folds={settings.cv_folds}: {settings.cv_folds} folds of {folders['training']}"
        return f"splits: training <- {folders['training']} ({len(data.y_train):,} images), {validation}, {test}"
    val, train = len(data.val_rows), len(data.y_train) - len(data.val_rows)
    if settings.cv_folds > 1:
        return (f"splits: cv_folds={settings.cv_folds}: folds of {folders['training']} and {folders['validation']} "
                f"pooled ({len(data.y_train):,} images; val_fraction unused), {test}")
    return (f"splits: training <- {folders['training']} ({train:,} images), validation <- {folders['validation']} "
            f"({val:,}; val_fraction unused), {test}")


def imbalance_line(data: Dataset, settings: Settings) -> str | None:
    """`classes imbalanced: ...` where the largest class has IMBALANCE times the smallest's
    training images or more; None otherwise."""
    counts = np.bincount(data.y_train, minlength=data.n_classes)
    small, large = int(counts.argmin()), int(counts.argmax())
    if counts[small] and counts[large] < IMBALANCE * counts[small]:
        return None
    ratio = f"{counts[large] / counts[small]:.1f}:1" if counts[small] else "no image of the smallest"
    return (f"classes imbalanced: {data.class_names[large]!r} has {counts[large]:,} training images, "
            f"{data.class_names[small]!r} {counts[small]:,} ({ratio}); to weigh every class alike set "
            f"metric={' or '.join(BALANCED_METRICS)} and class_weight=balanced "
            f"(now metric={settings.metric}, class_weight={settings.class_weight})")
