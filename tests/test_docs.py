"""The docs stay in step with the code: every setting is in README's table, every
README command exists."""

from __future__ import annotations

import re

from ctr.cli import build_parser
from service.settings import Settings
from tests.helpers import ROOT


def _settings_table() -> dict[str, str]:
    """README's settings table: each ``CTR_*`` name in a row's first cell, with the
    row's default cell (a row naming two settings, ``a`` / ``b``, splits both)."""
    section = (ROOT / "README.md").read_text().split("\n## Settings", 1)[1]
    section = section.split("\n## ", 1)[0]
    table: dict[str, str] = {}
    for line in section.splitlines():
        if not line.startswith("| `CTR_"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        names = re.findall(r"`(CTR_[A-Z0-9_]+)`", cells[0])
        defaults = cells[1].split(" / ") if len(names) > 1 else [cells[1]]
        assert len(defaults) == len(names), line
        for env, default in zip(names, defaults, strict=True):
            assert env not in table, f"{env} has two rows"
            table[env] = default
    return table


def _documented(default: object, cell: str) -> bool:
    """Whether a table cell states the setting's default."""
    if default is None:
        return cell == "unset"
    if default == "":
        return cell.startswith("empty")
    written = re.fullmatch(r"`([^`]*)`", cell)
    if written is None:
        return False
    value = written.group(1)
    if isinstance(default, bool):
        return value == str(default).lower()
    if isinstance(default, int | float):
        return float(value) == float(default)
    return value == str(default)


def test_every_setting_is_in_the_table_with_its_default() -> None:
    table = _settings_table()
    fields = {f"CTR_{name.upper()}": field for name, field in Settings.model_fields.items()}
    assert sorted(table) == sorted(fields), "README settings table and Settings differ"
    for env, field in fields.items():
        assert _documented(field.default, table[env]), (env, field.default, table[env])


def test_readme_ctr_commands_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    sub = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for line in readme.splitlines():
        if line.startswith("| `ctr "):
            cmd = line.split("`")[1].split()[1]
            assert cmd in sub, cmd


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in readme and "bash scripts/test.sh" in ci


def test_the_test_workers_start_on_test_files_that_exist() -> None:
    """tests/conftest.py sends the longest files out first under pytest-xdist: a name
    that no longer exists (a file renamed) would quietly go back to the end."""
    from tests.conftest import LONG_FILES

    assert len(set(LONG_FILES)) == len(LONG_FILES)
    assert all((ROOT / "tests" / name).is_file() for name in LONG_FILES), LONG_FILES
    script = (ROOT / "scripts" / "test.sh").read_text()
    assert "--dist loadfile" in script and "--no-loadscope-reorder" in script
