"""Write the settings table of docs/operations.md from mp4totext/config.py (the Settings fields,
their defaults and their comments), between the markers below.

Usage: python scripts/settings_doc.py [--check]

--check exits 1 when the committed table differs from what config.py gives (tests/unit/test_docs.py
runs it): a setting added, renamed or re-defaulted without the docs becomes a failing test.
A field's description is its trailing comment, else the comment block right above it (shared by
the fields that follow the block without a comment of their own); "# -- name" lines start a section.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import pathlib
import re
import sys
import tokenize

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = ROOT / "mp4totext" / "config.py"
DOC = ROOT / "docs" / "operations.md"
BEGIN, END = "<!-- settings:begin (scripts/settings_doc.py) -->", "<!-- settings:end -->"
FIELD = re.compile(r"^    ([a-z_0-9]+): [^=]+= (.+?)\s*$")


@dataclasses.dataclass
class Row:
    section: str
    name: str
    default: str
    doc: str


def _comments(source: str) -> dict[int, str]:
    """Line number -> the comment on it (without '#')."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def rows() -> tuple[list[Row], dict[str, str]]:
    """The fields in order, and each section's note (the comment lines under its "# --" title)."""
    source = CONFIG.read_text()
    lines = source.splitlines()
    comments = _comments(source)
    start = next(i for i, line in enumerate(lines) if line.startswith("class Settings"))
    section, notes, block, shared, in_header, out = "general", {}, [], "", False, []
    for number, line in enumerate(lines[start + 1:], start + 2):
        stripped = line.strip()
        if line.startswith("    @") or line.startswith("    def "):
            break
        if stripped.startswith("# --"):
            title = stripped[4:].strip()
            section, block, shared, in_header = title, [], "", True
            continue
        if stripped.startswith("#"):
            text = stripped.lstrip("#").strip()
            if in_header:
                notes[section] = f"{notes.get(section, '')} {text}".strip()
            else:
                block.append(text)
            continue
        match = FIELD.match(line)
        if not match:
            continue
        in_header = False
        name, default = match.groups()
        trailing = comments.get(number, "")
        if trailing and "#" in default:
            default = default[:default.index("  #")].rstrip()
        if block:  # a comment block describes the fields under it, up to one with its own comment
            shared, block = " ".join(block), []
        out.append(Row(section, name, _default(default), trailing or shared))
        if trailing:
            shared = ""
    return out, notes


def _default(expr: str) -> str:
    if "default_factory" in expr:
        env = re.search(r'os\.environ\.get\("([A-Z_]+)"', expr)
        return f"${env.group(1)}" if env else "(computed)"
    return "empty" if expr in ('""', "''") else expr.strip('"')


def table() -> str:
    fields, notes = rows()
    out, section = [], None
    for row in fields:
        if row.section != section:
            section = row.section
            title, _, rest = section.partition(":")
            note = " ".join(x for x in (rest.strip(), notes.get(section, "")) if x)
            heading = title if title[1:2].isupper() else title[0].upper() + title[1:]  # "gRPC server" stays
            out += ["", f"**{heading}**" + (f": {note}" if note else ""), "",
                    "| Variable | Default | What it does |", "|---|---|---|"]
        doc = row.doc.replace("|", "\\|")
        out.append(f"| `MP4T_{row.name.upper()}` | `{row.default}` | {doc} |")
    return "\n".join(out).strip() + "\n"


def rendered(text: str) -> str:
    before, rest = text.split(BEGIN, 1)
    _, after = rest.split(END, 1)
    return f"{before}{BEGIN}\n{table()}{END}{after}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = DOC.read_text()
    new = rendered(text)
    if args.check:
        if new != text:
            print(f"{DOC.relative_to(ROOT)}: the settings table is stale; run python scripts/settings_doc.py")
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
