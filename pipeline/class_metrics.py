"""Scores that count every class alike, as Keras metrics the model is compiled with
(pipeline.model.build_model), so that each epoch reports them beside `accuracy`:

    F1Macro(n_classes)            # `f1_macro`: the unweighted mean of the classes' F1
    BalancedAccuracy(n_classes)   # `balanced_accuracy`: the mean of the classes' recall

Keras logs them as `f1_macro` / `val_f1_macro` and `balanced_accuracy` /
`val_balanced_accuracy`: the search may optimize, prune and rank rungs by the validation ones
(the `metric` setting). Each accumulates the epoch's confusion matrix inside the fit's own
compiled train and test steps, a one-hot product per batch (n_classes^2 additions), so the
scores cost no pass over the data of their own. As scikit-learn's `f1_score(average="macro")`
and `balanced_accuracy_score`: F1 averages over the classes that occur among the labels or the
predictions, recall over those among the labels. Sample weights (`class_weight`) are ignored:
the scores count images. `keras.ops` only: any backend.
"""

from __future__ import annotations

import keras
from keras import ops


class ConfusionScore(keras.metrics.Metric):
    """The epoch's confusion matrix (rows: labels, columns: argmax predictions); subclasses
    score it (`score`)."""

    def __init__(self, n_classes: int, name: str, **kwargs):
        super().__init__(name=name, **kwargs)
        self.n_classes = int(n_classes)
        self.matrix = self.add_variable(shape=(self.n_classes, self.n_classes), initializer="zeros",
                                        dtype="float32", name="confusion")

    def update_state(self, y_true, y_pred, sample_weight=None):
        labels = ops.one_hot(ops.reshape(ops.cast(y_true, "int32"), (-1,)), self.n_classes, dtype="float32")
        predicted = ops.one_hot(ops.argmax(y_pred, axis=-1), self.n_classes, dtype="float32")
        self.matrix.assign_add(ops.matmul(ops.transpose(labels), predicted))

    def reset_state(self):
        self.matrix.assign(ops.zeros((self.n_classes, self.n_classes), dtype="float32"))

    def result(self):
        matrix = ops.convert_to_tensor(self.matrix)
        true_positives = ops.diagonal(matrix)
        return self.score(true_positives, ops.sum(matrix, axis=1), ops.sum(matrix, axis=0))

    def score(self, true_positives, labelled, predicted):
        raise NotImplementedError

    def get_config(self):
        return {"n_classes": self.n_classes, "name": self.name}


def _mean_over(values, present):
    """The mean of `values` where `present` (0 where none is)."""
    mask = ops.cast(present, "float32")
    return ops.sum(values * mask) / ops.maximum(ops.sum(mask), 1.0)


SERIALIZABLE = keras.saving.register_keras_serializable(package="pipeline")  # a saved model loads with them


@SERIALIZABLE
class F1Macro(ConfusionScore):
    def __init__(self, n_classes: int, name: str = "f1_macro", **kwargs):
        super().__init__(n_classes, name, **kwargs)

    def score(self, true_positives, labelled, predicted):
        f1 = 2 * true_positives / ops.maximum(labelled + predicted, 1.0)
        return _mean_over(f1, (labelled + predicted) > 0)


@SERIALIZABLE
class BalancedAccuracy(ConfusionScore):
    def __init__(self, n_classes: int, name: str = "balanced_accuracy", **kwargs):
        super().__init__(n_classes, name, **kwargs)

    def score(self, true_positives, labelled, predicted):
        return _mean_over(true_positives / ops.maximum(labelled, 1.0), labelled > 0)
