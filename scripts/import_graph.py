"""Print the import graph between drift_agent's packages (every import, including those inside functions).

python scripts/import_graph.py          # edges "from -> to (modules)"
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "agent" / "drift_agent"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The drift_agent modules `path` imports, resolved to absolute names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("drift_agent"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.startswith("drift_agent"):
                found.add(target)
    return found


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "(top)"


def package_edges() -> dict[tuple[str, str], set[str]]:
    """(importing package, imported package) -> the importing modules, across packages only."""
    edges: dict[tuple[str, str], set[str]] = defaultdict(set)
    for path in sorted(ROOT.rglob("*.py")):
        src = module_name(path)
        for target in imports(path):
            a, b = package_of(src), package_of(target)
            if a != b:
                edges[(a, b)].add(src.removeprefix("drift_agent."))
    return edges


if __name__ == "__main__":
    for (a, b), mods in sorted(package_edges().items()):
        print(f"{a:>10} -> {b:<10} ({', '.join(sorted(mods))})")
    sys.exit(0)
