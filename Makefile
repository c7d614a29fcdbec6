# Two commands do all set-up on a fresh machine with Python 3.11:
#   make run    # builds .venv, then `mlflow run .` on the embedded digits data
#   make test   # builds .venv (with the JAX backend beside TensorFlow), lints, builds the docs, then the test suite
#   make quick  # the same without the process drills (tests marked `drill` in pytest.ini), for the edit-and-run loop
PYTHON ?= python3.11
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: run test quick lint
run: $(VENV)/.installed
	mlflow run . --env-manager local

test: lint $(VENV)/.jax  # one pytest worker per core (pytest-xdist)
	python -m pytest -q -n auto

quick: lint $(VENV)/.jax  # the suite without the `drill` tests (processes killed, signalled or serving)
	python -m pytest -q -n auto -m "not drill"

lint: $(VENV)/.installed  # ruff's settings: pyproject.toml's [tool.ruff]; then the docs: reference pages current, site built
	ruff check .
	python docs/gen_reference.py --check
	NO_MKDOCS_2_WARNING=1 mkdocs build --strict --site-dir site  # a broken link, anchor or page fails the build

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.jax: requirements-jax.txt $(VENV)/.installed
	$(VENV)/bin/python -m pip install --quiet -r requirements-jax.txt
	touch $@
