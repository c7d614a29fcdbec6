"""The documentation's reference pages are generated from the code (docs/gen_reference.py):
the committed pages must be what the code gives now, and every setting and space key is in them."""

from __future__ import annotations

import importlib.util
import re

import pytest
from conftest import ROOT

from pipeline import space
from pipeline.config import fields


def generator():
    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "docs" / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_reference_pages_are_what_the_code_gives():
    for path, render in generator().PAGES.items():
        assert path.read_text() == render(), f"{path.name} is stale: run python docs/gen_reference.py"


def test_every_setting_and_space_key_has_a_row_with_its_default():
    gen = generator()
    settings = gen.settings_page()
    for name, _, default, help_ in fields():
        assert f"| `{name}` | " in settings and help_.replace("|", "\\|") in settings, name
    keys = gen.space_keys_page()
    for table in (space.BLOCK_KEYS, space.DENSE_KEYS, space.TRAINING_KEYS, space.AUGMENT_KEYS, space.TOP_SETTINGS):
        for key in table:
            assert f"| `{key}` | " in keys, key
    row = next(line for line in keys.splitlines() if line.startswith("| `weight_decay` |"))
    assert "`0.004` for adamw" in row and "`0` for adam," in row, row  # a default that depends on the optimizer
    assert "| `filters` | int >= 1 | required | no |" in keys
    assert "| `translate` | int >= 0 pixels (0 = off) | `0` | yes |" in keys


def test_a_space_key_without_a_meaning_stops_the_generator(monkeypatch):
    gen = generator()
    monkeypatch.setitem(space.TOP_SETTINGS, "new_key", (bool, lambda v: True, ""))
    with pytest.raises(SystemExit, match=r"undescribed \[\('top', 'new_key'\)\]"):
        gen.space_keys_page()


def test_the_readmes_links_to_files_of_the_checkout_lead_to_files():
    """README.md and bench/README.md are read on the repository's pages, not built by MkDocs:
    a link from them to a page or file that is gone fails here."""
    for readme in (ROOT / "README.md", ROOT / "bench" / "README.md"):
        targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme.read_text())
        local = [t for t in targets if "://" not in t]
        assert local, readme
        missing = [t for t in local if not (readme.parent / t).exists()]
        assert not missing, f"{readme.relative_to(ROOT)} links to missing files: {missing}"


def test_the_readmes_budget_figures_are_those_the_records_give():
    """The README's table of the budget suite is rendered from bench/results/budget/'s records
    (`python bench/budget_suite.py --report --readme`): a figure copied by hand, or a record added
    without rendering, fails here."""
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    import budget_suite

    text = (ROOT / "README.md").read_text()
    start, end = (text.index(marker) for marker in budget_suite.README_BLOCK)
    shown = text[start:end + len(budget_suite.README_BLOCK[1])]
    assert shown == budget_suite.readme_block(budget_suite.load_records()), \
        "run: python bench/budget_suite.py --report --readme"
    assert "| photos (photos.yaml) | 600 s |" in shown
