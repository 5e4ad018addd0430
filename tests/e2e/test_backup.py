"""Backup and restore drill on the real services: an installation of its own (PostgreSQL database,
RabbitMQ vhost, S3 bucket, a server and a worker) does real work, is backed up with
`mp4totext backup`, wiped (database dropped, every object deleted), restored with `mp4totext
restore` into a new empty database, and every transcription and media must read back the same."""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import time
import uuid
from typing import Any, Iterator

import pytest

from tests.support import Stack
from tests.support.common import CLI, ROOT


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.fixture()
def drill(stack: Stack, s3_client: Any, tmp_path: pathlib.Path, log_dir: pathlib.Path) -> Iterator[dict[str, Any]]:
    import psycopg2

    base = stack.env["MP4T_DATABASE_URL"].rsplit("/", 1)[0]
    name = f"mp4t_drill_{uuid.uuid4().hex[:8]}"
    vhost = f"mp4t-drill-{uuid.uuid4().hex[:8]}"
    bucket = f"mp4t-drill-{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(base + "/postgres")
    admin.autocommit = True
    admin.cursor().execute(f"CREATE DATABASE {name}")
    ctl = shutil.which("rabbitmqctl")
    assert ctl, "rabbitmqctl"
    subprocess.run([ctl, "add_vhost", vhost], check=True, capture_output=True)
    subprocess.run([ctl, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"], check=True, capture_output=True)
    s3_client.make_bucket(bucket)
    broker = stack.env["MP4T_BROKER_URL"].rsplit("/", 1)[0] + "/" + vhost
    env = {**stack.env, "MP4T_DATABASE_URL": f"{base}/{name}", "MP4T_BROKER_URL": broker, "MP4T_S3_BUCKET": bucket,
           "MP4T_DATA_DIR": str(tmp_path / "data")}
    st = Stack(env, log_dir, stack.s3)
    try:
        yield {"stack": st, "env": env, "admin": admin, "db": name, "bucket": bucket, "dir": tmp_path / "backup"}
    finally:
        st.stop()
        admin.cursor().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()
        subprocess.run([ctl, "delete_vhost", vhost], capture_output=True)
        for obj in s3_client.list_objects(bucket, recursive=True):
            s3_client.remove_object(bucket, obj.object_name)
        s3_client.remove_bucket(bucket)


def snapshot(client: Any, names: list[str]) -> dict[str, Any]:
    """What a user can read back: each transcription's text and JSON export, and its media."""
    out = {}
    for name in names:
        job = client.get(name)
        media = client.get_media(job.media)
        out[name] = {"state": job.state, "text": job.result.text, "json": client.export(name, "json"),
                     "media": (media.name, media.state, media.sha256, media.size_bytes)}
    return out


def test_backup_wipe_restore_drill(drill: dict[str, Any], speech_mp4: pathlib.Path, s3_client: Any) -> None:
    from mp4totext.client import Client
    from mp4totext.v1 import transcription_pb2 as tpb

    st, env, root = drill["stack"], drill["env"], drill["dir"]
    st.start_server()
    st.start_worker("critical,high")
    made = run_cli(env, "create-key", "--tenant", "drill")
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)["api_key"]
    with Client(st.target, key) as client:
        names = []
        for _ in range(2):
            media = client.upload(str(speech_mp4))
            names.append(client.create(media.name).name)
        for name in names:
            assert client.wait(name, timeout=300).state == tpb.TRANSCRIPTION_STATE_SUCCEEDED
        before = snapshot(client, names)

    first = run_cli(env, "backup", str(root))
    assert first.returncode == 0, first.stderr
    first_out = json.loads(first.stdout)
    assert first_out["objects"] >= 4 and first_out["copied"] == first_out["objects"]  # originals + extracted audio
    again = run_cli(env, "backup", str(root))  # the schedule's next run copies only what is new
    assert again.returncode == 0 and json.loads(again.stdout)["copied"] == 0, again.stderr
    backed_up_at = time.monotonic()

    # The disaster: the database and every object gone.
    st.stop()
    admin = drill["admin"]
    admin.cursor().execute(f"DROP DATABASE {drill['db']} WITH (FORCE)")
    admin.cursor().execute(f"CREATE DATABASE {drill['db']}")
    for obj in list(s3_client.list_objects(drill["bucket"], recursive=True)):
        s3_client.remove_object(drill["bucket"], obj.object_name)

    began = time.monotonic()
    restored = run_cli(env, "restore", str(root))
    assert restored.returncode == 0, restored.stderr
    restore_s = time.monotonic() - began
    st.servers.clear(), st.targets.clear()
    st.start_server()
    rto_s = time.monotonic() - began
    with Client(st.target, key) as client:  # the same API key works: it is in the restored database
        after = snapshot(client, names)
    assert after == before
    for name, seen in after.items():
        media_name, _, sha, size = seen["media"]
        media_id = media_name.split("/")[1]
        originals = [o for o in s3_client.list_objects(drill["bucket"], recursive=True)
                     if media_id in o.object_name and o.object_name.endswith("original")]
        assert len(originals) == 1, originals
        data = s3_client.get_object(drill["bucket"], originals[0].object_name).read()
        assert len(data) == size and hashlib.sha256(data).hexdigest() == sha

    refused = run_cli(env, "restore", str(root))  # never over a database in use
    assert refused.returncode == 1 and "already has tables" in refused.stderr
    print(f"\nrestore drill: {len(names)} transcriptions, {first_out['objects']} objects; restore {restore_s:.1f} s, "
          f"serving again after {rto_s:.1f} s (RTO); data lost = what was written after the last backup "
          f"({time.monotonic() - backed_up_at:.0f} s before the wipe here; RPO = the backup interval)")
    assert os.path.isdir(root / "objects")
