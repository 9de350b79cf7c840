"""The project's shape: pins agree, the layout exists, every MLproject entry point names a module."""

from __future__ import annotations

import json
import re
import tomllib

import yaml

from conftest import ROOT

PINNED = {"mlflow", "ray", "torch", "gymnasium", "numpy", "pandas", "pyarrow", "transformers", "peft",
          "bitsandbytes", "trl", "datasets"}


def _pins(requirements: list[str]) -> dict[str, str]:
    out = {}
    for req in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^\s;]+)", req.strip())
        if match:
            out[match.group(1).lower()] = match.group(3)
    return out


def test_pyproject_and_conda_pins_agree():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    conda_pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict) and "pip" in d)
    py_pins, conda_pins = _pins(project["dependencies"]), _pins(conda_pip)
    assert PINNED <= set(py_pins), f"not pinned exactly in pyproject.toml: {PINNED - set(py_pins)}"
    assert len(py_pins) == len(project["dependencies"]), "every runtime dependency is pinned with =="
    assert py_pins == conda_pins
    assert py_pins["torch"] == "2.13.0"


def test_installed_versions_match_pins():
    from importlib.metadata import version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for name, pin in _pins(project["dependencies"]).items():
        assert version(name).split("+")[0] == pin, name


def test_layout():
    for folder in ("mlproject", "pipelines", "envs", "registry_hooks", "notebooks", "conf", "tests", "benchmarks"):
        assert (ROOT / folder).is_dir(), folder
    for name in ("MLproject", "conda.yaml", "pyproject.toml", "Makefile", "README.md", ".ci/run"):
        assert (ROOT / name).is_file(), name


def test_mlproject_entry_points_name_existing_modules():
    spec = yaml.safe_load((ROOT / "MLproject").read_text())
    assert spec["conda_env"] == "conda.yaml"
    for name, entry in spec["entry_points"].items():
        module = re.search(r"python -m ([\w.]+)", entry["command"]).group(1)
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), name
        for param in re.findall(r"\{(\w+)\}", entry["command"]):
            assert param in entry["parameters"], f"{name}: {param}"


def test_importing_any_module_is_cheap():
    """No module of the four packages imports MLflow, Ray, torch or transformers when imported:
    heavy imports live inside the functions that need them. ``policy_model.py`` is the file
    MLflow logs and runs as the model (models from code), never imported by the library."""
    import pkgutil
    import subprocess
    import sys

    modules = []
    for package in ("mlproject", "envs", "pipelines", "registry_hooks"):
        modules.append(package)
        # walk_packages: the submodules of mlproject.bridge, .config, .data and .reasoner too
        modules += [m.name for m in pkgutil.walk_packages([str(ROOT / package)], prefix=f"{package}.")]
    modules.remove("mlproject.policy_model")
    assert len(modules) > 45 and "pipelines.train" in modules and "registry_hooks.webhook" in modules
    assert "mlproject.bridge.server" in modules and "mlproject.reasoner.engine" in modules
    code = ("import importlib, json, sys\n"
            "heavy = {'mlflow', 'ray', 'torch', 'transformers'}\n"
            "out = {}\n"
            "for name in sys.argv[1:]:\n"
            "    importlib.import_module(name)\n"
            "    out[name] = sorted(heavy & set(sys.modules))\n"
            "print(json.dumps(out))\n")
    run = subprocess.run([sys.executable, "-c", code, *modules], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = json.loads(run.stdout)
    assert set(loaded) == set(modules)
    first_heavy = next(((m, h) for m, h in loaded.items() if h), None)
    assert first_heavy is None, f"importing {first_heavy[0]} loads {first_heavy[1]}"
