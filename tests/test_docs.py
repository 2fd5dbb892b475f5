"""The docs stay in step with the code: every setting is in README's table, every
README command exists."""

from __future__ import annotations

from ctr.cli import build_parser
from service.settings import Settings
from tests.helpers import ROOT


def test_every_setting_is_documented() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in Settings.model_fields:
        env = f"CTR_{name.upper()}"
        assert f"`{env}`" in readme or f"`{env}` /" in readme or env in readme, env


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
