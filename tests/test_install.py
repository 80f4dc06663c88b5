"""`make` installs the pinned set in constraints.txt; it must agree with pyproject.toml's ranges."""
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def pin_lines() -> list[str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]


def pins() -> dict:
    return {canonicalize_name(name): version for name, version in (line.split("==") for line in pin_lines())}


def requirements() -> list[Requirement]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    listed = (project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
              + pyproject["build-system"]["requires"])
    return [req for req in map(Requirement, listed) if canonicalize_name(req.name) != "fsl-jax"]


def test_every_dependency_is_pinned_inside_its_range():
    pinned = pins()
    for req in requirements():
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} (pyproject.toml) has no pin in constraints.txt"
        assert req.specifier.contains(pinned[name]), f"constraints.txt pins {req.name}=={pinned[name]}, outside {req}"


def test_constraints_are_exact_pins_listed_once():
    lines = pin_lines()
    assert all(line.count("==") == 1 for line in lines), [line for line in lines if line.count("==") != 1]
    assert len(pins()) == len(lines), "a package is pinned twice in constraints.txt"
    # not in pyproject.toml, but installed by `make` too: pip itself, and the jax backend
    assert {"pip", "jaxlib"} <= set(pins())
