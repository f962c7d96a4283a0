"""The README documents every setting and the two set-up commands that CI and a new user rely on."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from core.config import Settings
from unichar.settings_table import BEGIN, END, main, render_table, replace_section

README = Path(__file__).resolve().parent.parent / "README.md"


def test_configuration_table_is_the_generated_one() -> None:
    text = README.read_text(encoding="utf-8")
    assert replace_section(text, render_table()) == text, "run: python -m unichar.settings_table --write README.md"


def test_every_setting_has_a_row_and_a_description() -> None:
    table = render_table()
    for name, field in Settings.model_fields.items():
        assert f"`UNICHAR_{name.upper()}`" in table
        assert field.description, f"Settings.{name} has no description"


def test_readme_names_the_run_and_test_commands() -> None:
    text = README.read_text(encoding="utf-8")
    commands = re.findall(r"```sh\n(.*?)\n```", text, re.S)
    assert any("unichar run" in command and "torch==2.13.0" in command for command in commands)
    assert "bash .ci/run" in commands


def test_missing_markers_are_a_clear_error() -> None:
    with pytest.raises(ValueError, match="markers"):
        replace_section("# no table here\n", render_table())


def test_write_replaces_only_the_section(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{BEGIN}\nstale\n{END}\nafter\n", encoding="utf-8")
    assert main(["--write", str(readme)]) == 0
    assert readme.read_text(encoding="utf-8") == f"before\n{BEGIN}\n{render_table()}{END}\nafter\n"
