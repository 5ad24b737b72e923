"""The lock files (requirements/*.lock, written by scripts/lock) hold exactly the versions
pyproject.toml pins, each with hashes: CI and the image install what the tests ran against."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return re.split(r"[\[=<>~! ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _locked(path: Path) -> dict[str, str]:
    pins = re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", path.read_text(), flags=re.M)
    return {name.lower().replace("_", "-"): version for name, version in pins}


def _pins(requirements: list[str]) -> dict[str, str]:
    return {_name(r): r.split("==", 1)[1].strip() for r in requirements}


@pytest.mark.parametrize(("lock", "groups"), [("prod.lock", ()), ("dev.lock", ("local", "test"))])
def test_every_pin_of_pyproject_is_in_the_lock_at_the_same_version(lock: str, groups: tuple[str, ...]) -> None:
    wanted = _pins(PROJECT["dependencies"])
    for group in groups:
        wanted |= _pins(PROJECT["optional-dependencies"][group])
    locked = _locked(ROOT / "requirements" / lock)
    stale = {name: (version, locked.get(name)) for name, version in wanted.items() if locked.get(name) != version}
    assert not stale, f"run scripts/lock: pyproject pin vs {lock}: {stale}"


def test_every_dependency_of_pyproject_is_pinned_exactly() -> None:
    everything = [*PROJECT["dependencies"], *(r for g in PROJECT["optional-dependencies"].values() for r in g)]
    assert all("==" in r for r in everything), [r for r in everything if "==" not in r]


@pytest.mark.parametrize("lock", ["prod.lock", "dev.lock"])
def test_every_locked_package_carries_a_hash(lock: str) -> None:
    text = (ROOT / "requirements" / lock).read_text()
    blocks = re.split(r"\n(?=[A-Za-z0-9._-]+==)", text.split("\n", 2)[-1])
    assert all("--hash=sha256:" in b for b in blocks if re.match(r"[A-Za-z0-9._-]+==", b))


def test_the_production_lock_holds_no_local_stand_in_and_no_test_tool() -> None:
    locked = _locked(ROOT / "requirements" / "prod.lock")
    dev_only = _pins(PROJECT["optional-dependencies"]["local"]) | _pins(PROJECT["optional-dependencies"]["test"])
    assert not set(dev_only) & set(locked)
