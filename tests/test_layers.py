"""The package's layers: data below, train and evaluate beside each other, the application above.

``cmcl.train`` and ``cmcl.evaluate`` never import each other (``cmcl.pipeline`` and ``cmcl.cli`` wire
them); ``cmcl.data`` imports neither; importing the training configuration does not pull in faiss.
Checked on the source (every import statement, also those inside functions) and in a fresh
interpreter (what an import really loads).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import REPO, run_process

PKG = REPO / "cmcl"

FORBIDDEN = {
    "cmcl.data": ("cmcl.train", "cmcl.evaluate", "cmcl.extract", "cmcl.pipeline", "cmcl.cli"),
    "cmcl.train": ("cmcl.evaluate", "cmcl.extract", "cmcl.pipeline", "cmcl.cli"),
    "cmcl.evaluate": ("cmcl.train", "cmcl.extract", "cmcl.pipeline", "cmcl.cli"),
    "cmcl.extract": ("cmcl.train", "cmcl.evaluate", "cmcl.pipeline", "cmcl.cli"),
}


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_only_what_lies_below(layer):
    folder = PKG / layer.split(".")[1]
    bad = []
    for path in sorted(folder.rglob("*.py")):
        for name in imports_of(path):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[layer]):
                bad.append(f"{path.relative_to(REPO)} imports {name}")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from cmcl.evaluate.report import table2\n    import cmcl.train.trainer\n")
    assert {"cmcl.evaluate.report", "cmcl.train.trainer"} <= imports_of(probe)


@pytest.mark.parametrize("module,absent", [
    ("cmcl.train.config", ("faiss", "cmcl.evaluate")),
    ("cmcl.train.trainer", ("faiss", "cmcl.evaluate")),
    ("cmcl.evaluate.runs", ("cmcl.train",)),
    ("cmcl.data.runs", ("cmcl.train", "cmcl.evaluate", "faiss")),
])
def test_importing_a_module_loads_nothing_above_it(module, absent):
    code = (f"import sys, {module}\n"
            f"bad = [m for m in sys.modules if any(m == a or m.startswith(a + '.') for a in {absent!r})]\n"
            "print(bad)\nsys.exit(1 if bad else 0)\n")
    proc = run_process(["-c", code], timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
