"""The README's configuration table, generated from ``core.config.Settings`` so that it cannot fall behind.

``python -m unichar.settings_table`` prints the table; ``--write README.md`` replaces the part of the README
between the two marker comments. ``tests/test_readme.py`` fails when the README differs from the output.
"""

from __future__ import annotations

import argparse
import enum
from pathlib import Path

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from core.config import Settings

__all__ = ["BEGIN", "END", "render_table", "replace_section"]

BEGIN = "<!-- settings-table: begin (python -m unichar.settings_table --write README.md) -->"
END = "<!-- settings-table: end -->"


def _default(field: FieldInfo) -> str:
    """The default as a user would type it into the environment; empty where there is none."""
    value = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
    if value is PydanticUndefined or value in (None, "", []):
        return ""
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, enum.Enum):
        value = value.value
    return f"`{value}`"


def render_table() -> str:
    """Every ``Settings`` field as one Markdown table row, in declaration order."""
    rows = ["| Variable | Default | Description |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `UNICHAR_{name.upper()}` | {_default(field)} | {description} |")
    return "\n".join(rows) + "\n"


def replace_section(text: str, table: str) -> str:
    """``text`` with the part between the markers replaced by ``table``; ValueError when a marker is missing."""
    head, begin, rest = text.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise ValueError(f"the README needs the two markers {BEGIN!r} and {END!r}")
    return f"{head}{BEGIN}\n{table}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    """Print the table, or write it into a README."""
    parser = argparse.ArgumentParser(prog="python -m unichar.settings_table", description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, metavar="README", help="replace the table section of this file")
    args = parser.parse_args(argv)
    table = render_table()
    if args.write is None:
        print(table, end="")
    else:
        args.write.write_text(replace_section(args.write.read_text(encoding="utf-8"), table), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
