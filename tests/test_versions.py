"""The version ranges of pyproject.toml are ranges that ran: each floor is pinned in .ci/lowest.txt, which CI
(`.ci/run`) installs into a second environment to run the whole suite on the lowest versions too."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
LOWEST = ROOT / ".ci" / "lowest.txt"


def floors() -> dict[str, Version]:
    """Every `>=` floor of pyproject's dependencies and of its test extra (what CI installs), by package."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = {}
    for line in [*project["dependencies"], *project["optional-dependencies"]["test"]]:
        requirement = Requirement(line)
        lows = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
        assert len(lows) == 1, f"{line}: give it one floor (>=), the version .ci/lowest.txt pins"
        found[canonicalize_name(requirement.name)] = lows[0]
    return found


def pins() -> dict[str, Version]:
    """The `name==version` lines of .ci/lowest.txt."""
    found = {}
    for line in LOWEST.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", line
            found[canonicalize_name(requirement.name)] = Version(specifier.version)
    return found


def test_every_floor_is_the_version_the_lowest_run_installs():
    assert floors() == pins()


def test_ci_runs_the_suite_on_the_lowest_versions_after_the_newest():
    script = (ROOT / ".ci" / "run").read_text()
    lowest = script.index('-c .ci/lowest.txt -e ".[test]"')
    assert script.count("python -m pytest") == 2 and script.index("python -m pytest") < lowest
    assert script.rindex("python -m pytest") > lowest
    assert ".venv-lowest/" in (ROOT / ".gitignore").read_text().splitlines()
