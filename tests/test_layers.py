"""The house: quantize/ is stage folders, and imports point one way, from a stage to the stages it builds on.

Reads every module's imports (top-level and inside functions) from the source, without importing anything, and
fails on an import circle, an import that points up the stage order, or a private name taken from another
module. The order, lowest first, is STAGES; recipe.py, pipeline.py and cli.py sit on top.
"""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "quantize"
# lowest first: a module may import its own stage and the stages before it in this list, never one after it
STAGES = ["common", "sources", "formats", "runtimes", "methods", "measure", "fit", "report", "top"]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in STAGES) else "top"


def imports(module: str) -> list[tuple[str, str | None]]:
    """(imported module, name taken from it or None) for every `import` in the module's source."""
    tree = ast.parse(MODULES[module].read_text())
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names if a.name.startswith("quantize")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("quantize"):
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub, None) if sub in MODULES else (base, a.name))
    return out


def test_every_folder_is_a_stage():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.is_symlink() and p.name != "__pycache__"}
    assert folders == set(STAGES) - {"top"}
    data = {p.name for p in PACKAGE.iterdir() if p.is_symlink()}  # package data: links to recipes/ and eval/tasks
    assert data == {"recipes", "eval_tasks"} and not [f for d in data for f in (PACKAGE / d).glob("*.py")]
    top = {p.name for p in PACKAGE.glob("*.py")}
    assert top == {"__init__.py", "recipe.py", "preflight.py", "pipeline.py", "cli.py"}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    mine = STAGES.index(stage(module))
    for target, name in imports(module):
        assert target in MODULES, f"{module} imports {target}, which is not a module of the package"
        theirs = STAGES.index(stage(target))
        assert theirs <= mine, f"{module} ({STAGES[mine]}) imports {target} ({STAGES[theirs]}), a later stage"
        assert name is None or not name.startswith("_"), f"{module} takes the private {name} from {target}"


def test_no_import_circle():
    graph = {m: {t for t, _ in imports(m) if t != m} for m in MODULES}
    done, path = set(), []

    def visit(m):
        if m in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        path.append(m)
        for t in sorted(graph[m]):
            visit(t)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)


def test_the_checks_see_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks above can fail: a planted circle and an upward import are caught."""
    fake = tmp_path / "quantize"
    (fake / "common").mkdir(parents=True)
    (fake / "methods").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "common" / "__init__.py").write_text("")
    (fake / "methods" / "__init__.py").write_text("")
    (fake / "common" / "a.py").write_text("from quantize.methods import b\n")  # up the order
    (fake / "methods" / "b.py").write_text("def f():\n    from quantize.common import a\n")  # and a circle
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    monkeypatch.setattr(sys.modules[__name__], "MODULES", {module_name(p): p for p in fake.rglob("*.py")})
    with pytest.raises(AssertionError, match="a later stage"):
        test_imports_point_down("quantize.common.a")
    with pytest.raises(AssertionError, match="import circle"):
        test_no_import_circle()
