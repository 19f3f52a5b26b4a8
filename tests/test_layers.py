"""The house keeps its floors: no package imports one above it, and no package circles back.

Floors, lowest first: ``artifacts`` (atomic writes, manifests, guarded loading: every floor
saves and loads through it), ``metrics`` (figures), ``data`` (images, datasets, the generator,
artifact files), ``members`` and ``tiling`` (detectors and how they run over large images),
``grading`` (regions, levels, types), ``fusion`` (the hybrid), ``evaluation`` (scoring
detectors on labeled splits), ``deploy`` (members exported as graphs, run under ONNX Runtime)
and ``prediction`` (applying a hybrid to many images, results streamed), ``reporting`` (HTML
reports and charts) and ``retraining`` (the scheduled retraining: workspace, holdout, one run),
``configs``, ``experiments`` (the benchmark's job grid, its runner and ranking), ``pipelines``
(the entry points). Imports inside functions count too: hiding one there does not change which
floor depends on which.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOORS = {
    "artifacts": -1,
    "metrics": 0,
    "data": 1,
    "members": 2,
    "tiling": 2,
    "grading": 3,
    "fusion": 4,
    "evaluation": 5,
    "deploy": 5,
    "prediction": 5,
    "reporting": 6,
    "retraining": 6,
    "configs": 7,
    "experiments": 8,
    "pipelines": 9,
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


def test_packages_on_one_floor_do_not_import_each_other_both_ways():
    graph = package_graph()
    circles = [(a, b) for a in graph for b in graph[a] if a < b and a in graph.get(b, {})]
    assert not circles, circles


def test_the_check_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "module.py"
    source.write_text(
        "def f():\n    from pipelines.common import main_guard\n    import fusion.hybrid\n"
    )
    assert imports_of(source) == {"pipelines", "fusion"}
