"""The versions that ran: each floor of pyproject.toml is pinned in .ci/lowest.txt, every package of the README's
quick start in constraints.txt (inside pyproject's ranges), and CI (`.ci/run`) runs the whole suite on the newest
versions, on constraints.txt where they differ, and on the lowest."""

from __future__ import annotations

import tomllib
from importlib.metadata import distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOWEST = ROOT / ".ci" / "lowest.txt"
TESTED = ROOT / "constraints.txt"


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirements() -> list[Requirement]:
    """pyproject's dependencies and its test extra: what CI installs."""
    return [Requirement(line) for line in [*project()["dependencies"], *project()["optional-dependencies"]["test"]]]


def floors() -> dict[str, Version]:
    """Every `>=` floor of pyproject's dependencies and of its test extra, by package."""
    found = {}
    for requirement in requirements():
        line = str(requirement)
        lows = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
        assert len(lows) == 1, f"{line}: give it one floor (>=), the version .ci/lowest.txt pins"
        found[canonicalize_name(requirement.name)] = lows[0]
    return found


def pins(path: Path = LOWEST) -> dict[str, Version]:
    """The `name==version` lines of a constraints file."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", line
            found[canonicalize_name(requirement.name)] = Version(specifier.version)
    return found


def test_every_floor_is_the_version_the_lowest_run_installs():
    assert floors() == pins()


def test_the_tested_versions_pin_every_requirement_inside_its_range():
    tested = pins(TESTED)
    for requirement in requirements():
        name = canonicalize_name(requirement.name)
        assert name in tested, f"constraints.txt pins no {requirement.name}: refresh it with .ci/freeze"
        assert requirement.specifier.contains(tested[name]), f"constraints.txt: {name} {tested[name]} not {requirement}"
    assert tested["torch"] == Version("2.13.0")  # the CPU wheel the quick start names


def test_python_floor_is_one_every_dependency_accepts():
    floor = Version(project()["requires-python"].removeprefix(">="))
    for requirement in requirements():
        needs = distribution(requirement.name).metadata.get("Requires-Python")
        assert needs is None or floor in SpecifierSet(needs), f"{requirement.name} needs Python {needs}"


def test_ci_runs_the_newest_the_tested_and_the_lowest_versions():
    script = (ROOT / ".ci" / "run").read_text()
    newest = script.index('environment .venv "torch==2.13.0" -e ".[test]"')
    tested = script.index('environment .venv-tested -c constraints.txt "torch==2.13.0" -e ".[test]"')
    lowest = script.index('environment .venv-lowest -c .ci/lowest.txt -e ".[test]"')
    assert newest < tested < lowest and "python -m pytest" in script
    assert script.count("suite newest") == script.count("suite tested") == script.count("suite lowest") == 1
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert ".venv-lowest/" in ignored and ".venv-tested/" in ignored
