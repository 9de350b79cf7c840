"""docs/configuration.md is generated from the schema and cannot drift from it."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT
from mlproject.config import Config
from mlproject.config.reference import PAGE, reference_markdown, section
from mlproject.instruments import CONTRACT_NAMES, PRESETS

REGENERATE = "python -m mlproject.config.reference --write"


def leaf_keys(sec) -> list:
    return [*sec.keys, *(key for sub in sec.sections for key in leaf_keys(sub))]


def test_committed_page_is_the_generated_one():
    assert PAGE == ROOT / "docs" / "configuration.md"
    assert PAGE.read_text(encoding="utf-8") == reference_markdown(), f"docs/configuration.md is stale: run {REGENERATE}"


def test_every_schema_key_is_documented_with_its_default():
    page = reference_markdown()
    keys = {key.name: key for key in leaf_keys(section(Config()))}
    # A mapping-valued setting (tune.space) is one documented key; its params are one per entry.
    assert set(keys) == {"tune.space" if k.startswith("tune.space.") else k for k in Config().flat()}
    for name, key in keys.items():
        assert f"| `{name}` |" in page, name
        assert key.description, f"{name} has no docstring in mlproject/config/schema.py"
    assert keys["env.window"].default == 32 and keys["env.instrument.preset"].default == "ES"
    assert "| `env.window` | int, >= 1 | `32` | Bars of features in one observation. |" in page
    assert "| `train.activation` | one of tanh, relu, silu | `tanh` |" in page


def test_every_preset_is_in_the_table():
    page = reference_markdown()
    assert set(CONTRACT_NAMES) == set(PRESETS)
    for symbol in PRESETS:
        assert f"| `{symbol}` | {CONTRACT_NAMES[symbol]} |" in page
    assert "| `ES` | E-mini S&P 500 | 0.25 | 50 | 12.5 | 4.50 |" in page


def test_command_prints_and_writes_the_page(tmp_path):
    command = [sys.executable, "-m", "mlproject.config.reference"]
    printed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert printed == reference_markdown()
    subprocess.run([*command, "--write", str(tmp_path / "docs" / "configuration.md")], cwd=ROOT, check=True)
    assert (tmp_path / "docs" / "configuration.md").read_text(encoding="utf-8") == printed
