"""Packaging contracts: one pinned source of versions, and MLproject's parameters the
same as the CLI's."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile

import yaml
from conftest import ROOT

from pipeline.cli import COMMANDS
from pipeline.config import fields
from pipeline.mlproject import render


def pinned_lines(text):
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_conda_pip_section_matches_requirements():
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    requirements = pinned_lines((ROOT / "requirements.txt").read_text())
    assert pip == requirements
    assert all("==" in line for line in requirements)
    assert "python=3.11" in conda["dependencies"]


def test_pyproject_pins_the_runtime_requirements_and_a_test_extra_the_rest():
    """requirements.txt's lines before its "# test and tooling only" comment are the package's
    dependencies, those after it its `test` extra; the console script is the CLI's `command_line`."""
    text = (ROOT / "requirements.txt").read_text()
    runtime, marker, tooling = text.partition("\n# test and tooling only")
    assert marker, "requirements.txt marks where its test and tooling pins start"
    runtime, tooling = pinned_lines(runtime), pinned_lines(tooling.split("\n", 1)[1])
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == runtime
    assert project["optional-dependencies"] == {"test": tooling}
    assert {line.split("==")[0] for line in tooling} == {"pytest", "pytest-xdist", "ruff", "uv", "mkdocs", "mkdocs-material",
                                                         "keras-tuner"}
    assert project["scripts"] == {"cnn-search": "pipeline.cli:command_line"}
    assert project["requires-python"] == ">=3.11"


def test_mlproject_entry_points_pass_every_setting_with_the_cli_default():
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    assert set(project["entry_points"]) == set(COMMANDS)
    for name, entry in project["entry_points"].items():
        assert entry["command"].startswith(f"python -m pipeline {name} ")
        for setting, typ, default, _ in fields():
            assert entry["parameters"][setting]["default"] == default, (name, setting)
            assert f"--{setting} {{{setting}}}" in entry["command"], (name, setting)
        assert set(entry["parameters"]) == {f[0] for f in fields()}


def test_mlproject_is_generated_from_the_cli():
    assert (ROOT / "MLproject").read_text() == render(), "run: python -m pipeline.mlproject > MLproject"


def test_the_wheel_ships_the_search_spaces_beside_the_package(tmp_path):
    """A plain `pip install .` finds the default spaces as the checkout does: search_spaces/
    lands beside pipeline/ in site-packages (pipeline.space.PROJECT_DIR). Built from a copy of
    the sources, as setuptools writes its build folders into the tree it builds."""
    source = tmp_path / "source"
    for folder in ("pipeline", "search_spaces"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("cnn_search-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"search_spaces/{p.name}" for p in (ROOT / "search_spaces").glob("*.yaml")} <= names
    assert {"pipeline/space.py", "pipeline/served_model.py", "pipeline/budget/__init__.py"} <= names


def test_the_worker_image_copies_what_the_package_installs():
    """The Dockerfile (the worker image of docs/guides/workers.md) copies pyproject.toml, its readme
    and every package `pip install .` installs, on conda.yaml's Python, and .dockerignore lets them in."""
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    copied = {path for line in lines if line.startswith("COPY ") for path in line.split()[1:-1]}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {name.split(".")[0] for name in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert copied >= {"pyproject.toml", project["project"]["readme"], *packages}, copied
    assert any(line.startswith("FROM python:3.11") for line in lines) and "RUN pip install --no-cache-dir ." in "\n".join(lines)
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    assert allowed >= copied, copied - allowed
