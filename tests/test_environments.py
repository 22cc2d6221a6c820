"""pyproject.toml, environment.yml and binder/environment.yml name the same packages and Python."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONDA_NAMES = {"torch": {"pytorch", "pytorch-cpu"}}  # conda-forge spells PyTorch differently


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[;]", requirement.strip(), maxsplit=1)[0].lower()


def _conda(path: Path) -> tuple[set, set, str]:
    env = yaml.safe_load(path.read_text())
    conda, pip, python = set(), set(), None
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pip |= {_name(d) for d in dep.get("pip", []) if not d.startswith("-")}
        elif _name(dep) == "python":
            python = dep.split("=", 1)[1]
        else:
            conda.add(_name(dep))
    return conda, pip, python


def _covered(required: set, available: set) -> set:
    return {r for r in required if not ({r} | CONDA_NAMES.get(r, set())) & available}


def test_same_packages_and_python():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_name(r) for r in project["dependencies"]}
    notebooks = {_name(r) for r in project["optional-dependencies"]["notebooks"]}
    dev = {_name(r) for r in project["optional-dependencies"]["dev"]}
    minimum = re.search(r">=\s*(\d+\.\d+)", project["requires-python"]).group(1)

    conda, pip, python = _conda(ROOT / "environment.yml")
    assert python == minimum
    assert not _covered(core | notebooks | dev, conda | pip), "environment.yml misses packages"

    conda, pip, python = _conda(ROOT / "binder" / "environment.yml")
    assert python == minimum
    assert not _covered(core | notebooks, conda | pip), "binder/environment.yml misses packages"
    assert "pytorch-cpu" in conda  # Binder has no GPU: never pull a CUDA build there
    assert "pip install --no-deps -e ." in (ROOT / "binder" / "postBuild").read_text()
