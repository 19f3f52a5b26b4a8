"""The house keeps its floors: no package imports one above it, and each package sits on the
lowest floor its imports allow (one above the highest package it imports; 0 if it imports none),
so the table says what the code does.

Floors, lowest first: ``artifacts`` (atomic writes, manifests, guarded loading: every floor
saves and loads through it), ``metrics`` (figures), ``data`` (images, maps on disk, datasets,
the generator), ``members``, ``tiling`` (detectors and how they run over large images) and
``reporting`` (HTML reports and charts), ``grading`` (regions, levels, types), ``configs`` (the
configuration and its schema, which reads the members' registry) and ``graphs`` (members as
graphs, and running an export of them), ``fusion`` (the hybrid), ``evaluation`` (scoring
detectors on labeled splits), ``deploy`` (writing an export, checked against PyTorch) and
``prediction`` (applying a hybrid to many images, results streamed), ``retraining`` (the
scheduled retraining) and ``experiments`` (the benchmark's job grid, its runner and ranking),
``pipelines`` (the entry points). Imports inside functions count too: hiding one there does not
change which floor depends on which.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOORS = {
    "artifacts": 0,
    "metrics": 1,
    "data": 2,
    "members": 3,
    "tiling": 3,
    "reporting": 3,
    "grading": 4,
    "configs": 4,
    "graphs": 4,
    "fusion": 5,
    "evaluation": 6,
    "deploy": 6,
    "prediction": 6,
    "retraining": 7,
    "experiments": 7,
    "pipelines": 8,
}


def imports_of(path: Path) -> set[str]:
    """The project packages a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {name.split(".")[0] for name in names} & set(FLOORS)
    return found


def package_graph() -> dict[str, dict[str, list[str]]]:
    """package -> imported package -> the files that import it."""
    graph: dict[str, dict[str, list[str]]] = {name: {} for name in FLOORS}
    for package in FLOORS:
        for path in sorted((ROOT / package).rglob("*.py")):
            for imported in imports_of(path) - {package}:
                graph[package].setdefault(imported, []).append(str(path.relative_to(ROOT)))
    return graph


def test_no_package_imports_a_floor_above_it():
    upward = [
        f"{file} imports {imported} (floor {FLOORS[imported]} above {package}'s {FLOORS[package]})"
        for package, edges in package_graph().items()
        for imported, files in edges.items()
        for file in files
        if FLOORS[imported] > FLOORS[package]
    ]
    assert not upward, "\n".join(upward)


def test_each_package_sits_on_the_lowest_floor_its_imports_allow():
    # With the check above this also rules out imports between packages on one floor, and so
    # any circle.
    wrong = {
        package: (FLOORS[package], max((FLOORS[name] + 1 for name in edges), default=0))
        for package, edges in package_graph().items()
        if FLOORS[package] != max((FLOORS[name] + 1 for name in edges), default=0)
    }
    assert not wrong, f"package: (its floor, the floor its imports give) {wrong}"


def test_the_check_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "module.py"
    source.write_text(
        "def f():\n    from pipelines.common import main_guard\n    import fusion.hybrid\n"
    )
    assert imports_of(source) == {"pipelines", "fusion"}
