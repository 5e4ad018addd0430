"""API keys from the operator's commands: create-key, then revoke-key stops it (SQLite, subprocesses)."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess

from server.auth import Authenticator
from storage import db as dbmod
from storage import schema
from tests.support import CLI, ROOT


def run(args: list[str], data_dir: pathlib.Path) -> subprocess.CompletedProcess[str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MP4T_")}, "MP4T_DATA_DIR": str(data_dir)}
    return subprocess.run([*CLI, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def test_create_then_revoke_a_key(tmp_path: pathlib.Path) -> None:
    created = run(["create-key", "--tenant", "acme", "--label", "mobile backend"], tmp_path)
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)["api_key"]
    schema.init_db(f"sqlite:///{tmp_path / 'mp4totext.db'}")
    try:
        assert Authenticator().tenant_for(f"Bearer {key}") == json.loads(created.stdout)["tenant_id"]
        revoked = run(["revoke-key", key[:12]], tmp_path)
        assert revoked.returncode == 0 and "revoked 1 key" in revoked.stdout, revoked.stderr
        assert Authenticator().tenant_for(f"Bearer {key}") is None
        assert run(["revoke-key", "m2t_nosuchkey"], tmp_path).returncode == 1
    finally:
        dbmod.database.close()
