"""The package's layers (docs/design.md, Layers): no module imports one from a layer above its own, and no import
circle among its modules. Every import statement counts, function-local ones too: a circle hidden in a function
still ties two modules together."""
import ast
import re

import pytest

from tests.conftest import REPO

PACKAGE = "tokenformer_mp"


def layers(design: str) -> dict[str, int]:
    """The table in docs/design.md: module-name prefix (or __init__, the package's own module) -> layer."""
    rows = re.findall(r"^\s*(\d+)\s{2,}(\S+(?: \S+)*?)\s{2,}", design.split("## Layers", 1)[1], re.M)
    return {name: int(layer) for layer, names in rows for name in names.split()}


def modules(root) -> dict[str, object]:
    """'tokenformer_mp.data.batches' -> its path; a package by its __init__.py."""
    out = {}
    for path in (root / PACKAGE).rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path, known) -> set[str]:
    """The package modules `name` imports. `from P import x` is P.x when that is a module, else P; the parent
    packages that Python runs first are namespaces, not dependencies."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            found.update(subs or [base])
    return {m for m in found if m in known and m != name}


def layer_of(name: str, table: dict[str, int]) -> int:
    if name == PACKAGE:
        return table["__init__"]
    parts = name.split(".")[1:]
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in table:
            return table[".".join(parts[:n])]
    raise AssertionError(f"{name}: in no layer of docs/design.md's table")


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One import circle per strongly connected group of modules (Tarjan), each as the modules on it."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
                on.discard(group[-1])
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def violations(root) -> tuple[list[str], list[list[str]]]:
    table = layers((root / "docs" / "design.md").read_text())
    known = modules(root)
    graph = {name: imports(name, path, known) for name, path in known.items()}
    upward = [f"{a} (layer {layer_of(a, table)}) imports {b} (layer {layer_of(b, table)})"
              for a, deps in sorted(graph.items()) for b in sorted(deps) if layer_of(b, table) > layer_of(a, table)]
    return upward, circles(graph)


def test_no_module_imports_a_layer_above_it_nor_in_a_circle():
    table = layers((REPO / "docs" / "design.md").read_text())
    assert table["versions"] == 0 and table["model"] == 3 and table["__init__"] == table["cli"] == 11, table
    upward, loops = violations(REPO)
    assert upward == [] and loops == [], (upward, loops)


def test_the_check_sees_an_upward_import_and_a_circle(tmp_path):
    """The check itself, on a copy of the package with the circle there was before issue 26 (checkpoint.py reading
    reshard.py's resolve_source) put back: one upward import (5 -> 6) and one circle of those two."""
    import shutil
    shutil.copytree(REPO / PACKAGE, tmp_path / PACKAGE, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    ckpt = tmp_path / PACKAGE / "checkpoint.py"
    ckpt.write_text(ckpt.read_text() + "\n\ndef _resolve(path):\n    from .reshard import plan_from_config\n")
    upward, loops = violations(tmp_path)
    assert upward == [f"{PACKAGE}.checkpoint (layer 5) imports {PACKAGE}.reshard (layer 6)"], upward
    assert loops == [[f"{PACKAGE}.checkpoint", f"{PACKAGE}.reshard"]], loops


@pytest.mark.parametrize("line, expect", [("from .. import versions", "versions"), ("from . import batches",
                         "data.batches"), ("from ..model import Pattention", "model"), ("import tokenformer_mp.store",
                         "store")], ids=["package", "submodule", "parent", "absolute"])
def test_import_forms_resolve_to_modules(tmp_path, line, expect):
    """Each form of import, in tokenformer_mp/data/x.py, names the module it loads."""
    known = {f"{PACKAGE}.{m}" for m in ("versions", "data", "data.batches", "model", "store", "data.x")}
    (tmp_path / "x.py").write_text(line)
    assert imports(f"{PACKAGE}.data.x", tmp_path / "x.py", known) == {f"{PACKAGE}.{expect}"}
