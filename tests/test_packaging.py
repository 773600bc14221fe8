"""Installing dho keeps the torch a user has: the metadata declares ranges, the tested versions live in
constraints.txt (what `make setup` and CI install), and what is optional is an extra."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirements() -> dict[str, Requirement]:
    return {Requirement(r).name.lower(): Requirement(r) for r in PYPROJECT["dependencies"]}


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def test_torch_range_admits_older_newer_and_the_tested_version():
    torch = _requirements()["torch"].specifier
    pins = _constraints()
    tested = Version(pins["torch"])
    next_minor = Version(f"{tested.major}.{tested.minor + 1}.0")
    for version in ("2.1.0", "2.13.0", str(tested), str(next_minor), f"{tested.major}.{tested.minor + 5}.2"):
        assert torch.contains(version), f"pip install dho would replace torch {version}"
    assert not torch.contains("2.0.1")  # the code needs 2.1 (torch.amp, inference_mode, the flop counter)
    assert _requirements()["torchvision"].specifier.contains(str(Version(pins["torchvision"])))
    # no dependency is pinned exactly in the metadata; every pin of constraints.txt is admitted by it
    for name, req in _requirements().items():
        assert not any(s.operator == "==" for s in req.specifier), f"{name} is pinned in pyproject.toml"
        if name in pins:
            assert req.specifier.contains(pins[name]), f"constraints.txt pins {name}=={pins[name]} outside {req}"


def test_optional_parts_are_extras_and_setup_uses_the_constraints():
    extras = PYPROJECT["optional-dependencies"]
    assert {"tensorboard", "wandb", "onnx", "demo", "test"} <= set(extras)
    assert not any(Requirement(r).name in ("tensorboard", "wandb", "onnx", "onnxruntime") for r in PYPROJECT["dependencies"])
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"pip\b.*install -q -c \$\(CONSTRAINTS\) torch torchvision", makefile.replace("$(PIP)", "pip"))
    assert "-c $(CONSTRAINTS) -e '.[test]'" in makefile
