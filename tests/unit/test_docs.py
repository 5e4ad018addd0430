"""The docs stay true to the code: the settings table is generated from mp4totext/config.py and
must be current, every setting is documented, the README stays a short front page whose links
resolve."""
from __future__ import annotations

import dataclasses
import pathlib
import re
import subprocess
import sys

from mp4totext.config import Settings

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_settings_table_is_generated_from_the_code() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "settings_doc.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    operations = (ROOT / "docs" / "operations.md").read_text()
    for field in dataclasses.fields(Settings):
        row = re.search(rf"^\| `MP4T_{field.name.upper()}` \| `[^`]*` \| (.+) \|$", operations, re.M)
        assert row and row.group(1).strip(), f"MP4T_{field.name.upper()} has no description in config.py"


def test_readme_is_a_front_page_with_the_two_commands_first() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail to docs/"
    assert lines[0] == "# mp4totext" and lines[2] == "```bash"
    assert lines[3].startswith("bash scripts/run.sh") and lines[4].startswith("bash scripts/test.sh")
    assert "exec bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()  # the same test command


def test_every_local_link_in_the_docs_resolves() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to missing {target}"
