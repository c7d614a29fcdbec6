"""The published models as baselines (issue 7): each is a valid configuration of its space,
builds the architecture its source describes and trains; the `baselines` command logs one
tagged run per baseline under one parent; a baseline outside its space is a clear error."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import ROOT, runs_of
from mlflow.tracking import MlflowClient

from pipeline.cli import run
from pipeline.errors import PipelineError
from pipeline.model import build_model
from pipeline.space import load_space
from pipeline.train import Images, Split, train
from pipeline.warm_start import load_configurations, load_groups, read_file

BASELINES = ROOT / "search_spaces" / "baselines.yaml"
NAMES = ["toy_1conv", "toy_2conv", "toy_2conv_hidden", "toy_tuned", "lab_baseline", "lab_final", "vgg4", "vgg6",
         "resnet_small"]
AIRBENCH = ["airbench93", "airbench94"]
SPACE, CONFIGS = load_configurations(BASELINES)


def test_every_baseline_is_valid_in_the_space_it_names():
    (space_path, raw), (airbench_path, airbench) = read_file(BASELINES)  # two documents, a space each
    assert list(raw) == NAMES and space_path.resolve() == (ROOT / "search_spaces" / "modern.yaml").resolve()
    assert list(airbench) == AIRBENCH and airbench_path.name == "airbench_sizes.yaml"
    assert list(CONFIGS) == NAMES + AIRBENCH and SPACE.path == str(space_path)
    sizes = load_space(airbench_path)
    assert all(sizes.violations(CONFIGS[name]) == [] for name in AIRBENCH)
    modern = load_space(space_path)
    for name in NAMES:
        assert modern.violations(CONFIGS[name]) == [], name
    wide = load_space(ROOT / "search_spaces" / "wide.yaml")  # the published ones are wide.yaml's too
    _, published = load_configurations(BASELINES, wide, [n for n in NAMES if n != "resnet_small"])
    assert all(wide.violations(params) == [] for params in published.values())
    # the tutorial's best is the same configuration in the tutorial's own space
    seed = load_space(ROOT / "search_spaces" / "seed.yaml")
    _, best = load_configurations(ROOT / "search_spaces" / "seed_best.yaml", seed)
    shared = {k: v for k, v in CONFIGS["toy_tuned"].items() if k in best["tutorial_best"]}
    assert shared == best["tutorial_best"]


def test_airbench_baselines_are_the_published_networks():
    for name, width, parameters in (("airbench93", 128, 0.57e6), ("airbench94", 256, 1.97e6)):
        params = CONFIGS[name]
        assert [params[f"conv{i}_filters"] for i in (1, 2, 3)] == [64, width, width]
        assert params["weight_average"] == "ema" and params["tta"] == "flip_shift" and params["whiten"]
        assert params["batch_size"] == 1024 and params["label_smoothing"] == 0.2 and params["optimizer"] == "nesterov"
        model = build_model(params, (32, 32, 3), 10)
        assert abs(model.count_params() - parameters) < 0.01e6, (name, model.count_params())
    # a warm start takes the document made for its space; every document's for another
    sizes = load_space(ROOT / "search_spaces" / "airbench_sizes.yaml")
    assert list(load_configurations(BASELINES, sizes)[1]) == AIRBENCH
    assert list(load_configurations(BASELINES, SPACE)[1]) == NAMES
    assert [list(c) for _, c in load_groups(BASELINES, only=["vgg4", "airbench94"])] == [["vgg4"], ["airbench94"]]
    # the recipe's space: airbench94's network with floored pools and airbench's lookahead
    airbench = load_space(ROOT / "search_spaces" / "airbench.yaml")
    inside = {**CONFIGS["airbench94"], "weight_average": "lookahead", "pool_padding": "valid"}
    assert airbench.violations(airbench.complete(inside)) == []


def test_a_configuration_named_twice_is_a_clear_error(tmp_path):
    path = tmp_path / "twice.yaml"
    doc = f"search_space: {ROOT / 'search_spaces' / 'wide.yaml'}\nconfigurations:\n  one: {{depth: 1}}\n"
    path.write_text(doc + "---\n" + doc)
    with pytest.raises(PipelineError, match=f"^{path}: configuration 'one' is named twice$"):
        read_file(path)


def layer_kinds(model):
    return [type(layer).__name__ for layer in model.layers[2:]]  # after the input and rescaling


def test_baselines_build_the_published_architectures():
    toy = build_model(CONFIGS["toy_1conv"], (32, 32, 3), 10)
    assert layer_kinds(toy) == ["Conv2D", "Activation", "MaxPooling2D", "Flatten", "Dense"]
    assert toy.count_params() == (3 * 3 * 3 * 32 + 32) + (16 * 16 * 32 * 10 + 10)  # softmax straight after the pool

    vgg6 = build_model(CONFIGS["vgg6"], (32, 32, 3), 10)
    block = ["Conv2D", "Activation", "Dropout", "Conv2D", "Activation", "MaxPooling2D"]
    assert layer_kinds(vgg6) == block * 3 + ["Dropout", "Flatten", "Dense", "Dropout", "Dense"]
    dense = [layer for layer in vgg6.layers if isinstance(layer, keras.layers.Dense)]
    assert dense[0].units == 1024 and isinstance(dense[0].kernel_constraint, keras.constraints.MaxNorm)
    assert dense[0].kernel_constraint.max_value == 3.0
    assert [d.rate for d in vgg6.layers if isinstance(d, keras.layers.Dropout)] == [0.2] * 5

    vgg4 = build_model(CONFIGS["vgg4"], (32, 32, 3), 10)
    assert vgg4.optimizer.nesterov and float(vgg4.optimizer.momentum) == 0.9
    assert [d.rate for d in vgg4.layers if isinstance(d, keras.layers.Dropout)] == [0.25, 0.25, 0.5]
    lab = build_model(CONFIGS["lab_baseline"], (32, 32, 3), 10)
    assert layer_kinds(lab)[-3:] == ["Dense", "Dense", "Dense"]

    resnet = build_model(CONFIGS["resnet_small"], (32, 32, 3), 10)
    kinds = layer_kinds(resnet)
    assert kinds[:2] == ["RandomFlip", "Translate"] and kinds[-2:] == ["GlobalAveragePooling2D", "Dense"]
    assert kinds.count("Add") == 3 and kinds.count("BatchNormalization") == 9  # 6 convs + 3 projections
    projections = [la for la in resnet.layers if isinstance(la, keras.layers.Conv2D) and la.kernel_size == (1, 1)]
    assert [p.filters for p in projections] == [32, 64, 128]
    assert resnet.optimizer.nesterov and float(resnet.optimizer.momentum) == 0.9 and resnet.optimizer.weight_decay == 0.005
    assert resnet.loss.label_smoothing == 0.2


@pytest.mark.parametrize("name", NAMES)
def test_each_baseline_trains_one_epoch_on_tiny_data(name):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (48, 8, 8, 3), dtype=np.uint8)
    y = np.arange(48) % 4
    split = Split(Images(x, y), np.arange(32), np.arange(32, 48))
    metrics = train(CONFIGS[name], split, (8, 8, 3), 4, epochs=1)
    assert metrics["epochs_run"] == 1 and np.isfinite(metrics["train_loss"])
    assert 0 <= metrics["val_accuracy"] <= 1 and metrics["params_count"] > 0


def test_baselines_command_logs_one_tagged_run_per_baseline(settings, digits, capsys):
    # the documents name their spaces: the search's `search_space` is not needed (nor read)
    s = settings.replace(epochs=1, only="toy_1conv,lab_final,airbench93", search_space="no-such-space.yaml")
    run("baselines", s, data=digits)
    assert digits.test.opened
    runs = runs_of("test-experiment")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].data.tags["pipeline.role"] == "baselines"
    assert parents[0].info.status == "FINISHED"
    children = {r.data.tags["baseline"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert sorted(children) == ["airbench93", "lab_final", "toy_1conv"] and len(runs) == 4
    spaces = {name: Path(child.data.tags["search_space"]).name for name, child in children.items()}
    assert spaces == {"airbench93": "airbench_sizes.yaml", "lab_final": "modern.yaml", "toy_1conv": "modern.yaml"}
    assert parents[0].data.tags["search_space"].count(",") == 1  # both spaces
    out = capsys.readouterr().out
    for name, child in children.items():
        assert child.info.status == "FINISHED"
        assert {"val_accuracy", "test_accuracy", "test_f1_macro", "seconds", "params_count"} <= set(child.data.metrics)
        assert child.data.params["conv1_filters"] == str(CONFIGS[name]["conv1_filters"])
        line = next(line for line in out.splitlines() if line.startswith(f"{name} ") and "," in line)
        assert f"{int(child.data.metrics['params_count']):,}" in line
        assert f"{child.data.metrics['test_accuracy']:.4f}" in line
    assert "baselines.csv" in {a.path for a in MlflowClient().list_artifacts(parents[0].info.run_id)}


def test_a_baseline_outside_its_space_is_a_clear_error(tmp_path, settings, digits):
    path = tmp_path / "mine.yaml"
    path.write_text(f"search_space: {ROOT / 'search_spaces' / 'wide.yaml'}\n"
                    "configurations:\n  fine: {depth: 1, conv1_filters: 32, conv1_kernel_size: 3}\n"
                    "  odd: {depth: 1, conv1_filters: 32, conv1_kernel_size: 7}\n")
    with pytest.raises(PipelineError) as error:
        run("baselines", settings.replace(baselines=str(path)), data=digits)
    message = str(error.value)
    assert message.startswith(f"{path}: configuration 'odd' is outside search space")
    assert "conv1_kernel_size=7 is outside the space" in message and "\n" not in message
    assert not digits.test.opened and MlflowClient().get_experiment_by_name("test-experiment") is None
