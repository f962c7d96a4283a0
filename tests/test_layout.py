"""Import boundaries, as a meta-test: dependencies point inward (DESIGN.md, Layout).

``core`` imports nothing from the frontends, the workers, training or the command line; ``core/model`` imports
nothing else of the project, so the runtime stays usable on its own. Imports are read with ``ast``, so a module
is checked even where importing it would need a service or a GPU.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = frozenset({"core", "bots", "workers", "training", "unichar", "migrations", "tests", "bench"})


def imports_of(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """Every absolute module name the source of ``module`` imports (relative imports resolved), with its line."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            found.append((node.lineno, ".".join(base + [node.module] if node.module else base)))
    return found


def violations(folder: str, allowed: str) -> list[str]:
    """``file:line imports name`` for each import of a project module outside ``allowed`` under ``folder``."""
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_package else parts)
        for line, name in imports_of(path.read_text(encoding="utf-8"), module, is_package):
            inside = name == allowed or name.startswith(allowed + ".")
            if name.split(".")[0] in PROJECT_PACKAGES and not inside:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return bad


def test_core_imports_only_core() -> None:
    assert violations("core", "core") == []


def test_model_runtime_imports_nothing_else_of_the_project() -> None:
    assert violations("core/model", "core.model") == []


def test_absolute_and_relative_imports_are_resolved() -> None:
    """The checker sees every form of import, so a pass above is not vacuous."""
    source = (
        "import workers.tasks, os\nfrom bots.render import split\nfrom ..config import Settings\nfrom . import api\n"
    )
    assert imports_of(source, "core.model.llm") == [
        (1, "workers.tasks"),
        (1, "os"),
        (2, "bots.render"),
        (3, "core.config"),
        (4, "core.model"),
    ]
    assert imports_of("from .kv_cache import KVCache\n", "core.model", is_package=True) == [(1, "core.model.kv_cache")]
