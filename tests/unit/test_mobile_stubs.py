"""Mobile stubs: what can be proven offline about generating Android and iOS code from protos/.

buf.gen.yaml generates with Buf's hosted plugins (Java, Kotlin, grpc-java, grpc-kotlin, Swift,
grpc-swift), which needs the network. Here, without it:

- every file of protos/mp4totext/v1/ (new ones too) carries the file options mobile generators
  name things by, with the values frozen in the v1 baseline image (objc_class_prefix and
  swift_prefix "MTT", java_package, java_multiple_files, go_package), as protoc parses them;
- buf.gen.yaml itself, with its Java and Kotlin plugins swapped for protoc's built-in generators
  (`protoc_builtin`, same inputs, out dirs and `lite` option), runs through `buf generate` and
  gives one Java class per message and enum under dev/mp4totext/v1 and a Kotlin DSL per message;
- that generated (lite) Java compiles with javac against protobuf-java of the same release as
  protoc, and a Java program and the Python stubs exchange messages both ways;
- protoc's Objective-C generator names every message MTT<Name> (Swift's prefix is the same).

Not proven here: grpc-java/grpc-kotlin/Swift output (their plugins are not in the registries this
machine reaches: PyPI, npm, Debian) and compiling Kotlin (Debian has no Kotlin compiler and no
protobuf-kotlin runtime). The Node client (tests/e2e/test_second_language_client.py) covers a
second language against the real server.

Needs: grpc_tools (test extra), buf (buf-bin, test extra), Debian's protobuf-compiler and
libprotobuf-java and a JDK (scripts/setup.sh test). Missing ones skip locally, fail in CI.
"""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
import yaml
from google.protobuf import descriptor_pb2

from tests.support import ROOT, need

PROTOS = ROOT / "protos"
V1 = PROTOS / "mp4totext" / "v1"
BASELINE = PROTOS / "v1-baseline.binpb"
JAVA_DIR = pathlib.PurePosixPath("dev/mp4totext/v1")
# Debian's libprotobuf-java: the protobuf-java runtime of the same release as Debian's protoc.
PROTOBUF_JAR = pathlib.Path("/usr/share/java/protobuf.jar")
# What mobile generators name things by; all frozen within v1 (buf breaking, FILE rules).
MOBILE_OPTIONS = ("objc_class_prefix", "swift_prefix", "java_package", "java_multiple_files", "go_package")
BUF_ENV = {**os.environ, "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}


def _proto_files() -> list[pathlib.Path]:
    return sorted(V1.glob("*.proto"))


def _descriptors() -> descriptor_pb2.FileDescriptorSet:
    """protos/mp4totext/v1/*.proto as protoc (grpc_tools) parses them."""
    from grpc_tools import protoc
    import grpc_tools

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "v1.binpb"
        rc = protoc.main(["protoc", f"-I{PROTOS}", f"-I{include}", f"--descriptor_set_out={out}",
                          *[str(p) for p in _proto_files()]])
        assert rc == 0, "protoc could not parse protos/mp4totext/v1"
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _ours(fds: descriptor_pb2.FileDescriptorSet) -> list[descriptor_pb2.FileDescriptorProto]:
    return [f for f in fds.file if f.name.startswith("mp4totext/v1/")]


def _lower_camel(name: str) -> str:
    return name[0].lower() + name[1:]


def _find(program: str) -> str | None:
    return shutil.which(program, path=str(pathlib.Path(sys.executable).parent)) or shutil.which(program)


# ---------------------------------------------------------------- options and config


def test_every_proto_sets_the_frozen_mobile_options() -> None:
    """A buf image is a FileDescriptorSet on the wire, so the baseline reads as one."""
    baseline = {f.name: f.options for f in _ours(descriptor_pb2.FileDescriptorSet.FromString(BASELINE.read_bytes()))}
    frozen = baseline["mp4totext/v1/media.proto"]
    assert frozen.objc_class_prefix == "MTT" and frozen.swift_prefix == "MTT"
    assert frozen.java_package == "dev.mp4totext.v1" and frozen.java_multiple_files
    files = _ours(_descriptors())
    assert {f.name for f in files} >= set(baseline)
    assert len(files) == len(_proto_files())
    for f in files:
        for option in MOBILE_OPTIONS:
            assert f.options.HasField(option), f"{f.name} does not set option {option} (copy media.proto's block)"
            assert getattr(f.options, option) == getattr(frozen, option), f"{f.name}: {option} differs from v1"


def test_buf_gen_yaml_targets_android_and_ios_under_gen() -> None:
    cfg = yaml.safe_load((ROOT / "buf.gen.yaml").read_text())
    assert cfg["version"] == "v2" and cfg["inputs"] == [{"directory": "protos"}]
    assert "managed" not in cfg  # the names come from the file options, as with plain protoc
    remotes = {p["remote"].split(":")[0]: p for p in cfg["plugins"]}
    assert set(remotes) == {"buf.build/protocolbuffers/java", "buf.build/protocolbuffers/kotlin",
                            "buf.build/grpc/java", "buf.build/grpc/kotlin",
                            "buf.build/apple/swift", "buf.build/grpc/swift"}
    for plugin in cfg["plugins"]:
        assert plugin["out"].startswith("gen/"), plugin
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "/gen/" in ignored


# ---------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def protoc() -> str:
    exe = shutil.which("protoc")
    need(exe is not None, "protoc with built-in Java/Kotlin/ObjC generators (apt install protobuf-compiler)")
    return str(exe)


@pytest.fixture(scope="module")
def android(protoc: str, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """buf generate with buf.gen.yaml, its Java and Kotlin plugins run by protoc's built-ins."""
    buf = _find("buf")
    need(buf is not None, "buf (pip install buf-bin)")
    cfg = yaml.safe_load((ROOT / "buf.gen.yaml").read_text())
    local = []
    for plugin in cfg["plugins"]:
        lang = {"buf.build/protocolbuffers/java": "java", "buf.build/protocolbuffers/kotlin": "kotlin"}.get(
            plugin["remote"].split(":")[0])
        if lang:
            local.append({"protoc_builtin": lang, "protoc_path": protoc,
                          **{k: v for k, v in plugin.items() if k != "remote"}})
    assert len(local) == 2
    tmp = tmp_path_factory.mktemp("android")
    template = tmp / "buf.gen.local.yaml"
    template.write_text(yaml.safe_dump({**cfg, "plugins": local}))
    env = {**BUF_ENV, "BUF_CACHE_DIR": str(tmp / "cache")}
    proc = subprocess.run([str(buf), "generate", "--template", str(template), "--output", str(tmp / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return tmp / "out" / "gen" / "android"


def test_java_and_kotlin_classes_for_every_message_and_enum(android: pathlib.Path) -> None:
    java = android / "java" / JAVA_DIR
    kotlin = android / "kotlin" / JAVA_DIR
    files = _ours(_descriptors())
    messages = [m.name for f in files for m in f.message_type]
    enums = [e.name for f in files for e in f.enum_type]
    assert "Media" in messages and "Transcription" in messages and "UploadMediaRequest" in messages
    for name in messages:
        source = (java / f"{name}.java").read_text()
        assert "package dev.mp4totext.v1;" in source and "GeneratedMessageLite" in source, name  # lite: Android
        assert (java / f"{name}OrBuilder.java").exists(), name
        dsl = (kotlin / f"{name}Kt.kt").read_text()
        assert f"public inline fun {_lower_camel(name)}(block: dev.mp4totext.v1.{name}Kt.Dsl.() -> kotlin.Unit)" in dsl
        assert f"fun dev.mp4totext.v1.{name}.copy(" in dsl, name
    for name in enums:
        assert f"public enum {name}" in (java / f"{name}.java").read_text(), name


ROUND_TRIP_JAVA = """
import dev.mp4totext.v1.*;

public final class MobileRoundTrip {
  public static void main(String[] args) throws Exception {
    // stdin: a Transcription serialised by Python; stdout: an UploadMediaRequest for Python.
    Transcription job = Transcription.parseFrom(System.in);
    System.err.println(job.getName() + "|" + job.getState() + "|" + job.getResult().getSegments(0).getText()
        + "|" + job.getResult().getSegments(0).getEndOffset().getSeconds());
    UploadMediaRequest first = UploadMediaRequest.newBuilder()
        .setMetadata(UploadMetadata.newBuilder()
            .setFilename("clip.mp4").setSizeBytes(3_000_000_000L).setSha256(job.getResult().getText()))
        .build();
    first.writeTo(System.out);
    System.out.flush();
  }
}
"""


def test_generated_java_compiles_and_matches_python_on_the_wire(android: pathlib.Path, protoc: str,
                                                                tmp_path: pathlib.Path) -> None:
    from mp4totext.v1 import media_pb2
    from mp4totext.v1 import transcription_pb2 as tpb

    javac, java = shutil.which("javac"), shutil.which("java")
    need(javac is not None and java is not None, "a JDK (apt install default-jdk-headless)")
    need(PROTOBUF_JAR.exists(), f"{PROTOBUF_JAR} (apt install libprotobuf-java)")
    # Generated code and runtime must be one release: Debian ships both as protobuf 3.21.x.
    protoc_version = subprocess.run([protoc, "--version"], capture_output=True, text=True).stdout.split()[-1]
    jar_version = re.search(r"protobuf-(?:java-)?([\d.]+)\.jar$", PROTOBUF_JAR.resolve().name)
    assert jar_version and jar_version.group(1) == protoc_version, (PROTOBUF_JAR.resolve(), protoc_version)

    (tmp_path / "MobileRoundTrip.java").write_text(ROUND_TRIP_JAVA)
    sources = sorted(str(p) for p in (android / "java").rglob("*.java"))
    classes = tmp_path / "classes"
    proc = subprocess.run([javac, "-nowarn", "-encoding", "UTF-8", "-d", str(classes), "-cp", str(PROTOBUF_JAR),
                           *sources, str(tmp_path / "MobileRoundTrip.java")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-5000:]
    assert (classes / JAVA_DIR / "Media.class").exists()

    job = tpb.Transcription(name="transcriptions/t-1", state=tpb.TRANSCRIPTION_STATE_SUCCEEDED)
    job.result.text = "hello from python"
    seg = job.result.segments.add(text="hello from python")
    seg.end_offset.seconds = 7
    run = subprocess.run([java, "-cp", f"{classes}{os.pathsep}{PROTOBUF_JAR}", "MobileRoundTrip"],
                         input=job.SerializeToString(), capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr.decode()
    assert run.stderr.decode().strip() == "transcriptions/t-1|TRANSCRIPTION_STATE_SUCCEEDED|hello from python|7"
    first = media_pb2.UploadMediaRequest.FromString(run.stdout)
    assert first.WhichOneof("payload") == "metadata"
    assert (first.metadata.filename, first.metadata.size_bytes, first.metadata.sha256) == (
        "clip.mp4", 3_000_000_000, "hello from python")


def test_objective_c_classes_carry_the_prefix(protoc: str, tmp_path: pathlib.Path) -> None:
    proc = subprocess.run([protoc, f"-I{PROTOS}", f"--objc_out={tmp_path}", *[str(p) for p in _proto_files()]],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    headers = "".join(p.read_text() for p in tmp_path.rglob("*.pbobjc.h"))
    for f in _ours(_descriptors()):
        for m in f.message_type:
            assert f"@interface MTT{m.name} : GPBMessage" in headers, m.name
        for e in f.enum_type:
            assert f"typedef GPB_ENUM(MTT{e.name})" in headers, e.name


# ---------------------------------------------------------------- frozen within v1


def test_changing_a_mobile_prefix_is_breaking(tmp_path: pathlib.Path) -> None:
    buf = _find("buf")
    need(buf is not None, "buf (pip install buf-bin)")
    shutil.copy2(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(PROTOS, tmp_path / "protos", ignore=shutil.ignore_patterns("*.binpb"))
    media = tmp_path / "protos/mp4totext/v1/media.proto"
    text = media.read_text()
    assert text.count('option swift_prefix = "MTT";') == 1
    media.write_text(text.replace('option swift_prefix = "MTT";', 'option swift_prefix = "Mp4t";'))
    proc = subprocess.run([str(buf), "breaking", "protos", "--against", str(BASELINE), "--error-format=json"],
                          cwd=tmp_path, env={**BUF_ENV, "BUF_CACHE_DIR": str(tmp_path / "cache")},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 100 and "FILE_SAME_SWIFT_PREFIX" in proc.stdout, proc.stdout + proc.stderr
