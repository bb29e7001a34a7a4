"""docs/config.md keeps up with gossipfl/config.py: every key listed, with the code's type and default, and none
that the code does not have.

The doc has one ``## [section]`` heading per section of ``NodeConfig``, each followed by a table whose rows read
``| `key` | type | `default` | allowed | what it does |``, the default written as TOML would write it. A key
added to a section dataclass fails these tests until its row is added to that section's table (and a new
section until its heading and table are added).
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from pathlib import Path
from typing import Any

from gossipfl.config import NodeConfig

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "config.md"

# How the doc's type column names each option type the config loader accepts (gossipfl.config._coerce).
TYPE_NAMES: dict[Any, str] = {str: "string", int: "integer", float: "float", bool: "boolean", Path: "path",
                              Path | None: "path", list[str]: "list of strings"}

SECTION_HEADING = re.compile(r"^## \[(\w+)\]\s*$")
KEY_ROW = re.compile(r"^\|\s*`(?P<key>\w+)`\s*\|\s*(?P<type>[^|]*?)\s*\|\s*`(?P<default>[^`]*)`\s*\|")
HOW_TO_ADD = ("add to the table under the `## [section]` heading of docs/config.md one row per key: "
              "| `key` | type | `default` | allowed | what it does |, the default as TOML writes it "
              "(`2.0`, `\"int8\"`, `[]`)")


@dataclasses.dataclass(frozen=True)
class Row:
    section: str
    key: str
    type: str
    default: str
    line: int


def code_sections() -> dict[str, type]:
    """Section name -> its dataclass, as the loader walks them (``source`` is not a section)."""
    hints = typing.get_type_hints(NodeConfig)
    sections = {f.name: hints[f.name] for f in dataclasses.fields(NodeConfig) if f.name != "source"}
    assert all(dataclasses.is_dataclass(cls) for cls in sections.values())
    return sections


def code_keys() -> dict[tuple[str, str], tuple[Any, Any]]:
    """(section, key) -> (type hint, default) for every key the config accepts."""
    keys = {}
    for section, cls in code_sections().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                raise AssertionError(f"{section}.{f.name} has no default: every config key needs one")
            keys[section, f.name] = (hints[f.name], default)
    return keys


def doc_headings() -> list[str]:
    return [m.group(1) for line in DOC.read_text("utf-8").splitlines() if (m := SECTION_HEADING.match(line))]


def doc_rows() -> list[Row]:
    """The key rows of the section tables; a row that starts like a key row but does not parse is an error."""
    rows, section = [], None
    for number, line in enumerate(DOC.read_text("utf-8").splitlines(), 1):
        if heading := SECTION_HEADING.match(line):
            section = heading.group(1)
        elif line.startswith(("# ", "## ")):
            section = None  # a heading that is no section ends the section's table
        elif section is not None and line.startswith("| `"):
            row = KEY_ROW.match(line)
            assert row, f"docs/config.md:{number}: a key row must read | `key` | type | `default` | ...: {line!r}"
            rows.append(Row(section, row["key"], row["type"], row["default"], number))
    return rows


def toml_value(text: str) -> Any:
    return tomllib.loads(f"value = {text}")["value"]


def as_toml(value: Any) -> Any:
    """A code default as it reads back from TOML: paths are strings there, and no file is ``""``."""
    return str(value) if isinstance(value, Path) else "" if value is None else value


def test_every_section_has_one_heading():
    headings = doc_headings()
    sections = list(code_sections())
    missing = [s for s in sections if s not in headings]
    stale = [s for s in headings if s not in sections]
    twice = sorted({s for s in headings if headings.count(s) > 1})
    assert not missing, f"sections not in docs/config.md: {missing}; add a `## [section]` heading and its table"
    assert not stale, f"docs/config.md has sections the config does not: {stale}"
    assert not twice, f"sections with more than one heading in docs/config.md: {twice}"


def test_every_key_is_documented():
    documented = {(r.section, r.key) for r in doc_rows()}
    missing = [f"{s}.{k}" for s, k in code_keys() if (s, k) not in documented]
    assert not missing, f"config keys missing from docs/config.md: {missing}; {HOW_TO_ADD}"


def test_every_documented_key_exists_once():
    keys = code_keys()
    rows = doc_rows()
    stale = [f"{r.section}.{r.key} (line {r.line})" for r in rows if (r.section, r.key) not in keys]
    assert not stale, f"docs/config.md lists keys that gossipfl/config.py does not have: {stale}"
    seen = [(r.section, r.key) for r in rows]
    twice = sorted({f"{s}.{k}" for s, k in seen if seen.count((s, k)) > 1})
    assert not twice, f"keys listed more than once in docs/config.md: {twice}"


def test_documented_defaults_are_the_code_defaults():
    keys = code_keys()
    wrong = []
    for row in doc_rows():
        if (row.section, row.key) not in keys:
            continue  # reported by test_every_documented_key_exists_once
        _, default = keys[row.section, row.key]
        expected = as_toml(default)
        try:
            stated = toml_value(row.default)
        except tomllib.TOMLDecodeError as exc:
            wrong.append(f"{row.section}.{row.key} (line {row.line}): `{row.default}` is not a TOML value: {exc}")
            continue
        # The type too: `2` for a float default reads as an integer; write `2.0`, as TOML would.
        if stated != expected or type(stated) is not type(expected):
            wrong.append(f"{row.section}.{row.key} (line {row.line}): docs say `{row.default}`, "
                         f"the code's default is {expected!r}")
    assert not wrong, "defaults in docs/config.md that differ from gossipfl/config.py:\n" + "\n".join(wrong)


def test_documented_types_are_the_code_types():
    keys = code_keys()
    wrong = []
    for row in doc_rows():
        if (row.section, row.key) not in keys:
            continue
        hint, _ = keys[row.section, row.key]
        assert hint in TYPE_NAMES, f"{row.section}.{row.key}: option type {hint!r} has no name in TYPE_NAMES"
        if row.type != TYPE_NAMES[hint]:
            wrong.append(f"{row.section}.{row.key} (line {row.line}): docs say {row.type!r}, "
                         f"the code's type is {TYPE_NAMES[hint]!r}")
    assert not wrong, "types in docs/config.md that differ from gossipfl/config.py:\n" + "\n".join(wrong)


def test_linked_files_exist():
    text = DOC.read_text("utf-8")
    targets = {m.group(1) for m in re.finditer(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text)}
    assert targets, "docs/config.md links to no other doc"
    missing = sorted(t for t in targets if not (DOC.parent / t).exists())
    assert not missing, f"docs/config.md links to files that do not exist: {missing}"
