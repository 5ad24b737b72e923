"""The layers of docs/architecture.md, checked on the source: who may import whom.

- shared/ (the kernel) imports neither services/ nor tools/;
- services/<name>/ imports only itself and shared/: no other service, no tools/;
- services/cli.py (the operator CLI) composes the services but imports no tools/, so the
  production image runs it without tools/;
- tools/ may import anything but the test kit; nothing in services/, shared/ or tools/ imports tests/.

Every `import` and `from ... import` counts, including those inside functions and under
`TYPE_CHECKING`: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("services", "shared", "tools")
SERVICES = ("intake", "scoring", "alerts", "reporting")


@dataclass(frozen=True)
class Import:
    source: str  # dotted name of the importing module
    target: str  # dotted name of what it imports (module, or module.attribute for `from`)
    where: str  # path:line, for the failure message

    def __str__(self) -> str:
        return f"{self.where}: {self.source} imports {self.target}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(node: ast.ImportFrom, source: str, is_package: bool) -> str:
    """The absolute module of a `from` import (relative ones resolved against `source`)."""
    if not node.level:
        return node.module or ""
    package = source.split(".") if is_package else source.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports_in(path: Path) -> Iterator[Import]:
    source = module_name(path)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(source, alias.name, where)
        elif isinstance(node, ast.ImportFrom):
            module = resolve(node, source, path.name == "__init__.py")
            for alias in node.names:
                # `from services import cli` imports the module services.cli: keep the name.
                yield Import(source, module if alias.name == "*" else f"{module}.{alias.name}", where)


def all_imports() -> list[Import]:
    return [imp for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))
            for imp in imports_in(path)]


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def service_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "services" and parts[1] in SERVICES else None


def test_the_scan_sees_the_imports_it_judges() -> None:
    targets = {(imp.source, imp.target) for imp in all_imports()}
    assert ("services.cli", "services.alerts.cli") in targets  # inside a function
    assert ("tools.cli", "services.cli") in targets  # `from services import cli`
    assert ("shared.kafka", "shared.settings.KafkaSettings") in targets


def test_shared_imports_neither_services_nor_tools() -> None:
    bad = [imp for imp in all_imports() if within(imp.source, "shared")
           and (within(imp.target, "services") or within(imp.target, "tools"))]
    assert not bad, "\n".join(map(str, bad))


def test_a_service_imports_no_other_service() -> None:
    bad = [imp for imp in all_imports() if (own := service_of(imp.source)) is not None
           and within(imp.target, "services") and service_of(imp.target) != own]
    assert not bad, "\n".join(map(str, bad))


def test_services_import_no_tools() -> None:
    bad = [imp for imp in all_imports() if within(imp.source, "services") and within(imp.target, "tools")]
    assert not bad, "\n".join(map(str, bad))


def test_nothing_in_the_product_or_the_tools_imports_the_test_kit() -> None:
    bad = [imp for imp in all_imports() if within(imp.target, "tests")]
    assert not bad, "\n".join(map(str, bad))


def test_services_holds_only_the_four_services_and_the_operator_cli() -> None:
    entries = {p.name for p in (ROOT / "services").iterdir() if p.name != "__pycache__"}
    assert entries == {"__init__.py", "cli.py", *SERVICES}
