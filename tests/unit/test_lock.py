"""The lock (requirements/*.txt) against pyproject.toml and against the venv the tests run in.

pip's --require-hashes refuses any package the lock does not pin, so a dependency resolved outside
the lock fails the install; these tests make the same promise visible before anyone installs.
"""
from __future__ import annotations

import importlib.metadata as md
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import lockfile  # noqa: E402

REQ = ROOT / "requirements"
LOCKS = {"core.txt": [], "diarize.txt": ["diarize"], "test.txt": ["test", "diarize"]}


@pytest.mark.parametrize("lock,extras", sorted(LOCKS.items()))
def test_lock_covers_every_declared_dependency(lock: str, extras: list[str]) -> None:
    assert lockfile.uncovered(REQ / lock, extras) == []


@pytest.mark.parametrize("lock", ["core.txt", "diarize.txt"])
def test_smaller_locks_agree_with_the_tested_one(lock: str) -> None:
    # core and diarize are compiled with test.txt as a constraint: an image gets exactly the
    # versions the suite ran with.
    tested = lockfile.applicable(REQ / "test.txt")
    for name, version in lockfile.applicable(REQ / lock).items():
        assert tested.get(name) == version, f"{lock} pins {name}=={version}, test.txt {tested.get(name)}"


@pytest.mark.parametrize("lock", sorted([*LOCKS, "nodeps.txt"]))
def test_every_pin_has_a_hash(lock: str) -> None:
    text = (REQ / lock).read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])
    assert entries
    for entry in entries:
        if entry.strip():
            assert "==" in entry.split()[0] and "--hash=sha256:" in entry, entry[:120]


def test_torch_and_torchaudio_are_pinned_as_a_pair_that_loads() -> None:
    locked = lockfile.applicable(REQ / "diarize.txt")
    assert locked["torchaudio"] != "2.11.1"  # does not load with torch 2.11.0
    assert locked["torch"].split(".")[:2] == locked["torchaudio"].split(".")[:2]
    assert (md.version("torch"), md.version("torchaudio")) == (locked["torch"], locked["torchaudio"])
    out = subprocess.run([sys.executable, "-c", "import torchaudio, pyannote.audio"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_the_venv_is_the_test_lock() -> None:
    wrong, extra = lockfile.env_problems(REQ / "test.txt")
    assert wrong == [], wrong
    assert extra == [], extra


def test_every_install_path_uses_the_lock() -> None:
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "--require-hashes -r \"$lock\"" in setup
    for dockerfile in ("Dockerfile", "Dockerfile.cuda"):
        text = (ROOT / dockerfile).read_text()
        assert "--require-hashes" in text, dockerfile
        assert "requirements/nodeps.txt" in text, dockerfile
        # the project itself never resolves its ranges inside an image
        for line in re.findall(r"pip install[^\n&]*", text):
            assert "--require-hashes" in line or "--no-deps" in line, f"{dockerfile}: {line}"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/test.sh" in ci
