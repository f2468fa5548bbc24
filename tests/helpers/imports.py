"""The one-way import rule, read from the source: ``datamodules ← lightning_modules ← callbacks ← echo_lvdm``.

A module may import from its own package and the ones to its left, never from one to its right, and library code
never imports the tests or the benchmarks. Every import counts — module level or inside a function, absolute or
relative, and ``importlib.import_module("…")`` with a literal name.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

LAYERS = ("datamodules", "lightning_modules", "callbacks", "echo_lvdm")
NEVER = ("tests", "benchmarks")


@dataclass(frozen=True)
class Violation:
    path: Path
    line: int
    importer: str  # the package the importing file belongs to
    imported: str  # the module it imports

    def __str__(self) -> str:
        return (f"{self.path}:{self.line}: {self.importer} imports {self.imported} against the one-way order "
                f"{' ← '.join(LAYERS)}")


def imported_modules(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file ``path`` whose dotted name is ``module``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            found.append((node.lineno, ".".join([*base, *([node.module] if node.module else [])])))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
    return found


def import_violations(root: Path) -> list[Violation]:
    """Every import under ``root``'s four packages that runs against the order, in file and line order."""
    violations = []
    for rank, layer in enumerate(LAYERS):
        for path in sorted((root / layer).rglob("*.py")):
            module = ".".join(path.relative_to(root).with_suffix("").parts)
            for line, name in imported_modules(path, module):
                top = name.split(".")[0]
                if top in NEVER or (top in LAYERS and LAYERS.index(top) > rank):
                    violations.append(Violation(path.relative_to(root), line, layer, name))
    return violations
