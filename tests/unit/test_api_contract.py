"""The public API contract (protos/mp4totext/v1/) checked with buf: lint and breaking changes.

Mobile clients generate their stubs from these .proto files, so within v1 nothing may be
removed, renamed, renumbered or retyped (additions are fine). buf.yaml at the repository
root holds the rules: lint STANDARD minus the two response-naming rules a resource-style API
breaks on purpose, breaking FILE.

The baseline is protos/v1-baseline.binpb, a buf image (`buf build --exclude-source-info`) of
protos/ at commit PINNED_V1_COMMIT plus exactly the Apple file options of BASELINE_ADDED_OPTIONS
(objc_class_prefix/swift_prefix: set once, before any Swift/ObjC code was generated, see
buf.yaml). It is committed rather than read from git history because a CI checkout may be
shallow or a plain source tree; when the pinned commit *is* in the history,
test_baseline_image_is_pinned_commit checks the image really is the protos at that commit with
those options added, so the baseline cannot quietly be rebuilt from a changed contract.

buf comes from PyPI `buf-bin` (test extras): found next to sys.executable or on PATH. Without
it these tests skip locally and fail in CI (CI=true). buf never needs the network here (no
deps; the well-known types ship with buf); a dead proxy makes sure of it.

Self-contained on purpose: no tests.conftest helpers, no package __init__ needed.
"""
from __future__ import annotations

import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
BUF_YAML = ROOT / "buf.yaml"
BASELINE = PROTOS / "v1-baseline.binpb"
# main's HEAD when the contract check was added; the image above was built from it with
#   buf build '.git#ref=<this>,subdir=protos' --exclude-source-info -o protos/v1-baseline.binpb
PINNED_V1_COMMIT = "127e5cb5662329af214c3bcc6c150c57b85f660f"
# Added to each pinned file after its java_package line (issue 13: mobile stubs); the image is
#   buf build <pinned protos + these lines> --exclude-source-info -o protos/v1-baseline.binpb
# and `buf breaking` between it and the pinned commit reports only FILE_SAME_OBJC_CLASS_PREFIX and
# FILE_SAME_SWIFT_PREFIX. Never change these values within v1 (FILE rules catch it).
BASELINE_ADDED_OPTIONS = 'option objc_class_prefix = "MTT";\noption swift_prefix = "MTT";\n'
# buf's exit code for "ran fine, found problems" (1 is a usage/build error).
BUF_FINDINGS = 100


def _find_buf() -> str | None:
    # The venv's own buf (the version the test extras pin) before whatever is on PATH.
    return shutil.which("buf", path=str(pathlib.Path(sys.executable).parent)) or shutil.which("buf")


@pytest.fixture(scope="module")
def buf(tmp_path_factory: pytest.TempPathFactory) -> "Buf":
    exe = _find_buf()
    if exe is None:
        msg = "buf not found next to sys.executable or on PATH (pip install buf-bin)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg + "; CI must run the API contract check")
        pytest.skip(msg)
    return Buf(exe, tmp_path_factory.mktemp("buf-cache"))


class Buf:
    def __init__(self, exe: str, cache: pathlib.Path) -> None:
        self.exe = exe
        self.env = {
            **os.environ,
            "BUF_CACHE_DIR": str(cache),
            # Nothing here needs the network; if buf ever tried (a dep, a remote plugin) it
            # fails at once instead of hanging or reaching out.
            "HTTPS_PROXY": "http://127.0.0.1:9",
            "HTTP_PROXY": "http://127.0.0.1:9",
            "NO_PROXY": "",
        }

    def __call__(self, *args: str, cwd: pathlib.Path = ROOT) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.exe, *args], cwd=cwd, env=self.env, capture_output=True, text=True,
                              timeout=120)

    def breaking(self, against: str | pathlib.Path, input_: str = "protos",
                 cwd: pathlib.Path = ROOT) -> subprocess.CompletedProcess[str]:
        return self("breaking", input_, "--against", str(against), "--error-format=json", cwd=cwd)


def _out(proc: subprocess.CompletedProcess[str]) -> str:
    return f"rc={proc.returncode}\n{proc.stdout}{proc.stderr}"


def _rule_ids(proc: subprocess.CompletedProcess[str]) -> set[str]:
    return {json.loads(line)["type"] for line in proc.stdout.splitlines() if line.strip()}


def _copy_workspace(tmp_path: pathlib.Path) -> pathlib.Path:
    """buf.yaml and the .proto files in a temp dir laid out like the repo."""
    shutil.copy2(BUF_YAML, tmp_path / "buf.yaml")
    shutil.copytree(PROTOS, tmp_path / "protos", ignore=shutil.ignore_patterns("*.binpb"))
    return tmp_path


def _edit(path: pathlib.Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} not found exactly once in {path.name}"
    path.write_text(text.replace(old, new))


def test_buf_config_is_as_documented() -> None:
    import yaml

    cfg = yaml.safe_load(BUF_YAML.read_text())
    assert cfg["version"] == "v2"
    assert cfg["modules"] == [{"path": "protos"}]
    assert "deps" not in cfg  # nothing to download
    assert cfg["lint"]["use"] == ["STANDARD"]
    assert sorted(cfg["lint"]["except"]) == ["RPC_REQUEST_RESPONSE_UNIQUE", "RPC_RESPONSE_STANDARD_NAME"]
    assert cfg["breaking"]["use"] == ["FILE"]


def test_lint_passes(buf: Buf) -> None:
    proc = buf("lint", "protos")
    assert proc.returncode == 0, _out(proc)


def test_lint_covers_the_v1_files(buf: Buf) -> None:
    proc = buf("ls-files", "protos")
    assert proc.returncode == 0, _out(proc)
    on_disk = sorted(str(f.relative_to(ROOT)) for f in (PROTOS / "mp4totext/v1").glob("*.proto"))
    assert {"protos/mp4totext/v1/media.proto", "protos/mp4totext/v1/transcription.proto"} <= set(on_disk)
    assert sorted(proc.stdout.split()) == on_disk  # every v1 file, the ones added since v1 too


def test_no_breaking_change_against_pinned_v1(buf: Buf) -> None:
    proc = buf.breaking(BASELINE)
    assert proc.returncode == 0, "v1 contract broken (add, never remove/rename/retype):\n" + _out(proc)


def test_baseline_image_is_pinned_commit(buf: Buf, tmp_path: pathlib.Path) -> None:
    """When git history has the pinned commit: the image and protos/ at that commit are the same
    contract (no breaking change either way, so nothing added or removed on either side)."""
    git = shutil.which("git")
    if git is None or subprocess.run([git, "cat-file", "-e", f"{PINNED_V1_COMMIT}^{{commit}}"], cwd=ROOT,
                                     capture_output=True).returncode != 0:
        pytest.skip(f"commit {PINNED_V1_COMMIT[:12]} not in this checkout (shallow clone?); "
                    "the committed baseline image is used as is")
    archive = subprocess.run([git, "archive", "--format=tar", PINNED_V1_COMMIT, "protos"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tmp_path, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(tmp_path)
    for f in (tmp_path / "protos").rglob("*"):
        if f.is_file() and f.suffix != ".proto":
            f.unlink()
        elif f.is_file():
            _edit(f, 'option java_package = "dev.mp4totext.v1";\n',
                  'option java_package = "dev.mp4totext.v1";\n' + BASELINE_ADDED_OPTIONS)
    # The pinned commit has no buf.yaml: module root protos/ (as '.git#ref=...,subdir=protos'
    # would see it), FILE rules, each direction.
    rules = '{"version":"v2","modules":[{"path":"protos"}],"breaking":{"use":["FILE"]}}'
    for input_, against in ((str(BASELINE), "protos"), ("protos", str(BASELINE))):
        proc = buf("breaking", input_, "--against", against, "--config", rules, "--error-format=json",
                   cwd=tmp_path)
        assert proc.returncode == 0, f"{BASELINE.name} is not protos/ at {PINNED_V1_COMMIT}:\n" + _out(proc)


def test_adding_a_field_is_not_breaking(buf: Buf, tmp_path: pathlib.Path) -> None:
    ws = _copy_workspace(tmp_path)
    media = ws / "protos/mp4totext/v1/media.proto"
    _edit(media, "  string request_id = 13;\n}", "  string request_id = 13;\n  // New.\n  string label = 14;\n}")
    _edit(ws / "protos/mp4totext/v1/transcription.proto", "  repeated EnhancementKind enhancement_kinds = 14;\n}",
          "  repeated EnhancementKind enhancement_kinds = 14;\n  repeated string languages = 15;\n}")
    assert buf("lint", "protos", cwd=ws).returncode == 0
    proc = buf.breaking(BASELINE, cwd=ws)
    assert proc.returncode == 0, _out(proc)


def test_removing_a_field_is_breaking(buf: Buf, tmp_path: pathlib.Path) -> None:
    ws = _copy_workspace(tmp_path)
    _edit(ws / "protos/mp4totext/v1/media.proto", "  string filename = 2;\n", "")
    proc = buf.breaking(BASELINE, cwd=ws)
    assert proc.returncode == BUF_FINDINGS, _out(proc)
    assert "FIELD_NO_DELETE" in _rule_ids(proc), _out(proc)


def test_changing_a_field_type_is_breaking(buf: Buf, tmp_path: pathlib.Path) -> None:
    ws = _copy_workspace(tmp_path)
    _edit(ws / "protos/mp4totext/v1/media.proto", "  int64 size_bytes = 4;\n  // Lower-case",
          "  string size_bytes = 4;\n  // Lower-case")
    proc = buf.breaking(BASELINE, cwd=ws)
    assert proc.returncode == BUF_FINDINGS, _out(proc)
    assert "FIELD_SAME_TYPE" in _rule_ids(proc), _out(proc)
