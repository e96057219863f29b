"""The house rules of DESIGN.md, read off the source: imports point down the wings, and no
module changes another library's objects."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "xrvd"

# Top to bottom: a module may import from its own wing or any wing below it.
WINGS = ("entry", "commands", "runtime", "ingest", "engine", "report", "store", "pipeline",
         "leaves")
ENGINE = {"worker", "pool", "forkserver", "deliver", "events", "cluster"}
LEAVES = {"__init__", "config", "config_base", "sources", "web", "stats", "thresholds", "errors",
          "log", "systemd", "metrics", "fsutil", "cpus"}


def wing_of(module: str) -> str:
    """module: dotted, relative to the package ('commands.serve', 'worker')."""
    head = module.split(".")[0]
    if head in ("cli", "__main__"):
        return "entry"
    if head in ("commands", "ingest", "report", "store", "pipeline"):
        return head
    if head == "runtime":
        return "runtime"
    if head in ENGINE:
        return "engine"
    if head in LEAVES:
        return "leaves"
    raise AssertionError(f"xrvd/{module.replace('.', '/')}.py belongs to no wing of "
                         "DESIGN.md's module map: place it in one")


def modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        found.append((".".join(parts), path))
    return found


def imported(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, module) of every xrvd module this one imports, function-level imports too."""
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "xrvd":
                target = node.module.partition(".")[2]
            else:
                continue
            for alias in node.names:  # `from . import log` names a module
                candidate = f"{target}.{alias.name}" if target else alias.name
                is_module = (PACKAGE / candidate.replace(".", "/")).with_suffix(".py").exists() \
                    or (PACKAGE / candidate.replace(".", "/")).is_dir()
                found.append((node.lineno, candidate if is_module else target or "__init__"))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "xrvd":
                    found.append((node.lineno, alias.name.partition(".")[2] or "__init__"))
    return found


def test_every_module_belongs_to_a_wing():
    for module, _ in modules():
        wing_of(module)


def test_imports_point_down_the_wings():
    broken = []
    for module, path in modules():
        rank = WINGS.index(wing_of(module))
        for line, target in imported(module, path):
            if WINGS.index(wing_of(target)) < rank:
                broken.append(f"xrvd/{path.relative_to(PACKAGE)}:{line} ({wing_of(module)}) "
                              f"imports {target} ({wing_of(target)})")
    assert not broken, "imports that point up the wings of DESIGN.md:\n" + "\n".join(broken)


def test_the_rule_is_checked_on_real_imports():
    """The reader sees relative, absolute and function-level imports (else the rule above
    would pass on nothing)."""
    found = dict((m, {t for _, t in imported(m, p)}) for m, p in modules())
    assert "commands.serve" in found["cli"]  # function-level, relative
    assert {"store", "config"} <= found["ingest.scp"]
    assert "report.build" in found["report.files"]


def _names(module_path: Path) -> dict[str, str]:
    """Local name -> the module it stands for, for every third-party import."""
    names = {}
    for node in ast.walk(ast.parse(module_path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != "xrvd":
                    names[(alias.asname or alias.name).split(".")[0]] = alias.name
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module and \
                node.module.split(".")[0] != "xrvd":
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _assigned_roots(node: ast.AST):
    """The root name of every attribute assigned (x.y = ..., x.y.z += ..., setattr(x, ...))."""
    targets: list[ast.AST] = []
    if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
            node.func.id == "setattr" and node.args:
        targets = [ast.Attribute(value=node.args[0], attr="?", lineno=node.lineno)]
    while targets:
        target = targets.pop()
        if isinstance(target, (ast.Tuple, ast.List)):
            targets.extend(target.elts)
        elif isinstance(target, ast.Attribute):
            root = target.value
            while isinstance(root, (ast.Attribute, ast.Subscript)):
                root = root.value
            if isinstance(root, ast.Name):
                yield target.lineno, root.id


def test_no_module_assigns_to_another_librarys_attributes():
    """No monkeypatching: where a library must behave differently, xrvd subclasses it or
    passes a hook, on its own objects (DESIGN.md, rules of the house)."""
    found = []
    for _, path in modules():
        libraries = _names(path)
        for node in ast.walk(ast.parse(path.read_text())):
            for line, root in _assigned_roots(node):
                if root in libraries:
                    found.append(f"xrvd/{path.relative_to(PACKAGE)}:{line} assigns to an "
                                 f"attribute of {libraries[root]}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("source, expected", [
    ("import pydicom\npydicom.config.foo = 1\n", 1),
    ("from pynetdicom import dimse_messages\ndimse_messages.NamedTemporaryFile = None\n", 1),
    ("import socket\nsetattr(socket, 'x', 1)\n", 1),
    ("from pydicom.uid import UID\nclass U(UID):\n    pass\nU.x = 1\n", 0),
])
def test_the_monkeypatch_check_sees_assignments(tmp_path, source, expected):
    module = tmp_path / "m.py"
    module.write_text(source)
    libraries = _names(module)
    hits = [root for node in ast.walk(ast.parse(source))
            for _, root in _assigned_roots(node) if root in libraries]
    assert len(hits) == expected
