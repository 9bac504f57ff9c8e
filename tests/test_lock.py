"""requirements/dev.lock is what `make install` installs: every requirement of the project (and
of its dev extras) must be pinned there, with hashes, or a fresh machine would get something
other than what was tested (or miss a package: the project itself is installed --no-deps)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "dev.lock"


def _pins(text: str) -> dict[str, tuple[Version, str]]:
    """name -> (version, the whole entry: pin line, markers and hash lines)."""
    pins: dict[str, tuple[Version, str]] = {}
    for entry in re.split(r"\n(?=\S)", text):
        match = re.match(r"([A-Za-z0-9._-]+)(?:\[[^\]]*\])?==([^\s;\\]+)", entry)
        if match:
            pins[canonicalize_name(match[1])] = (Version(match[2]), entry)
    return pins


def _requirements(project: dict, extra: str, seen: set[str]) -> list[Requirement]:
    """The project's requirements with `extra`, following `cdp-activation[...]` self-references."""
    found: list[Requirement] = []
    for line in project["optional-dependencies"][extra]:
        requirement = Requirement(line)
        if canonicalize_name(requirement.name) == "cdp-activation":
            for inner in requirement.extras - seen:
                seen.add(inner)
                found += _requirements(project, inner, seen)
        else:
            found.append(requirement)
    return found


def test_every_requirement_is_pinned_with_hashes_in_the_lock() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins(LOCK.read_text())
    wanted = [Requirement(line) for line in project["dependencies"]]
    wanted += _requirements(project, "dev", {"dev"})
    environment = {**default_environment(), "extra": ""}
    missing = []
    for requirement in wanted:
        if requirement.marker and not requirement.marker.evaluate(environment):
            continue
        pin = pins.get(canonicalize_name(requirement.name))
        if pin is None or pin[0] not in requirement.specifier:
            missing.append(str(requirement))
    assert not missing, f"not pinned in {LOCK.name} (run `make lock`): {missing}"
    unhashed = [name for name, (_, entry) in pins.items() if "--hash=sha256:" not in entry]
    assert not unhashed, f"pinned without a hash: {unhashed}"


def test_the_lock_holds_a_setuptools_without_known_advisories_and_the_build_backend() -> None:
    pins = _pins(LOCK.read_text())
    assert pins["setuptools"][0] >= Version("65.5.1")  # CVE-2022-40897
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    for line in build:  # `make install` builds the project with --no-build-isolation
        requirement = Requirement(line)
        assert pins[canonicalize_name(requirement.name)][0] in requirement.specifier


def test_pip_is_bootstrapped_from_the_same_pin() -> None:
    bootstrap = _pins((ROOT / "requirements" / "pip.lock").read_text())["pip"]
    locked = _pins(LOCK.read_text())["pip"]
    assert bootstrap[0] == locked[0]
    hashes = re.compile(r"--hash=sha256:[0-9a-f]{64}")
    assert hashes.findall(bootstrap[1]) == hashes.findall(locked[1]) != []
