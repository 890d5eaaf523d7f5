"""The layout's layers, read from the import statements (issue 13's "one place above
both halves"): ``gateway/`` and ``dispatch/`` each do one half, ``store/`` keeps what
both share, and only ``panicd/`` composes them into the daemon and panicctl.

Every import counts, also one inside a function or under ``TYPE_CHECKING``: a lazy
import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Which top-level packages each package may import from (besides itself).
ALLOWED: dict[str, frozenset[str]] = {
    "gateway": frozenset({"store"}),
    "store": frozenset({"gateway"}),
    "dispatch": frozenset({"gateway", "store"}),
    # The simulators of the world outside: buttons, and (the demo) the responder's phone,
    # which renders dispatch's messages as a phone would.
    "firmware_sim": frozenset({"gateway", "dispatch", "store"}),
    "panicd": frozenset({"gateway", "dispatch", "store", "firmware_sim"}),
}
OURS = frozenset(ALLOWED) | {"tests", "bench"}


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """(our top-level package, line) for every import in ``path``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".", 1)[0]
            if top in OURS:
                found.add((top, node.lineno))
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_the_layers_below_it(package: str) -> None:
    allowed = ALLOWED[package] | {package}
    crossings = sorted(
        f"{path.relative_to(REPO)}:{line} imports {top}"
        for path in (REPO / package).rglob("*.py")
        for top, line in imported_packages(path)
        if top not in allowed
    )
    assert crossings == []


def test_the_daemon_is_composed_above_both_halves() -> None:
    daemon = {top for top, _ in imported_packages(REPO / "panicd" / "daemon.py")}
    assert {"gateway", "dispatch", "store"} <= daemon
    below = [REPO / package for package in ("gateway", "dispatch", "store")]
    assert not any((path / name).exists() for path in below
                   for name in ("daemon.py", "cli.py", "ctl.py"))
