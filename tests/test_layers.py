"""The package layout shows the architecture: dependencies point one way (docs/ARCHITECTURE.md).

model ← config/util ← store/image/builder/network/guest/runtime ← context ← lifecycle ← services ← cli, api.
Imports only for type hints (under `if TYPE_CHECKING:`) count too: a layer that needs an upper
one's types sits in the wrong place. Nothing under src/ names a test module.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "mvm"
LAYER = {
    "errors": 0, "model": 0,
    "config": 1, "util": 1,
    "store": 2, "image": 2, "builder": 2, "network": 2, "guest": 2, "runtime": 2,
    "context": 3,
    "lifecycle": 4,
    "services": 5,
    "cli": 6, "api": 6,
}
# Within layer 2, what may use what (guest channels are how a runtime reaches its guest; the
# builder microVM's host and guest sides run the image pipeline's code);
# within layer 6, only `mvm agent serve` starting the API's server: otherwise the CLI and the
# API are two edges over the same services.
SIDEWAYS = {("runtime", "guest"), ("network", "runtime"), ("image", "guest"), ("builder", "image"),
            ("builder", "guest"), ("cli", "api")}


def _imports(tree: ast.Module) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mvm"):
            parts = node.module.split(".")
            if len(parts) == 1:
                out += [a.name for a in node.names]
            else:
                out.append(parts[1])
        elif isinstance(node, ast.Import):
            out += [a.name.split(".")[1] for a in node.names if a.name.startswith("mvm.")]
    return out


def test_dependencies_point_one_way() -> None:
    wrong = []
    for f in sorted(SRC.rglob("*.py")):
        rel = f.relative_to(SRC)
        me = rel.parts[0].removesuffix(".py")
        if me == "__init__":
            continue
        for dep in _imports(ast.parse(f.read_text())):
            if dep not in LAYER or dep == me:
                continue
            if LAYER[dep] > LAYER[me] or (LAYER[dep] == LAYER[me] and LAYER[me] in (2, 6)
                                          and (me, dep) not in SIDEWAYS):
                wrong.append(f"{rel} imports mvm.{dep}")
    assert wrong == []


def test_type_checking_imports_count() -> None:
    """(The check above sees an import made only for type hints.)"""
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mvm.store import Store\n")
    assert _imports(tree) == ["store"]


#: A module of the tests named in a string (`importlib.import_module("tests.doubles.x")`).
TEST_MODULE = re.compile(r"^\s*tests\s*$|\btests\.[A-Za-z_]")


def _test_modules_named(tree: ast.Module) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if node.level == 0 else []
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            out += [(node.lineno, node.value[:60])] if TEST_MODULE.search(node.value) else []
            continue
        else:
            continue
        out += [(node.lineno, n) for n in names if n == "tests" or n.startswith("tests.")]
    return out


def test_src_never_names_a_test_module() -> None:
    """Tests inject their doubles (into a `Host` they build; in a process they start, through a
    seam they set: `context/compose.py`); the library never reaches for them, not even by name."""
    wrong = [f"{f.relative_to(SRC)}:{line}: {name!r}" for f in sorted(SRC.rglob("*.py"))
             for line, name in _test_modules_named(ast.parse(f.read_text()))]
    assert wrong == []


def test_a_test_module_is_seen_however_it_is_named() -> None:
    """(The check above sees imports and module names in strings; paths and words are not names.)"""
    tree = ast.parse("import tests.doubles\nfrom tests import conftest\nimport importlib\n"
                     "importlib.import_module('tests.doubles.fake_runtime')\n"
                     "'see tests/test_store_contract.py; cryptomgr.notests, tests v2'\n")
    assert [line for line, _ in _test_modules_named(tree)] == [1, 2, 4]


def test_the_test_seams_are_read_only_where_the_context_is_composed() -> None:
    """MVM_TEST_* are read at the edge (`context/compose.py`), not by the `Host` nor below it."""
    seam = SRC / "context" / "compose.py"
    named = [str(f.relative_to(SRC)) for f in sorted(SRC.rglob("*.py")) if f != seam and "MVM_TEST_" in f.read_text()]
    assert named == []


def test_every_module_belongs_to_a_layer() -> None:
    top = {p.name.removesuffix(".py") for p in SRC.iterdir()
           if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists())) and p.name != "__init__.py"}
    assert top <= set(LAYER), f"not placed in a layer: {sorted(top - set(LAYER))}"


def _module_imports(f: Path, modules: set[str]) -> set[str]:
    """The mvm modules `f` imports anywhere (inside functions too): `from mvm.a import b` is
    module mvm.a.b when there is one, else mvm.a."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mvm"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("mvm."))
    return out


def test_no_import_cycles_even_inside_functions() -> None:
    """A cycle hidden in a function-level import is still a cycle: the lower module must not
    need the upper one (move the shared piece down, or pass it in). Packages' __init__
    re-exports are not modules of their own here."""
    files = {".".join(f.relative_to(SRC.parent).with_suffix("").parts): f
             for f in SRC.rglob("*.py") if f.name != "__init__.py"}
    graph = {m: _module_imports(f, set(files)) & set(files) for m, f in files.items()}
    cycles = []
    for start in sorted(graph):
        seen, stack = {start}, [(start, [start])]
        while stack:
            here, path = stack.pop()
            for dep in sorted(graph[here]):
                if dep == start:
                    cycles.append(" -> ".join([*path, dep]))
                elif dep not in seen and dep > start:  # (each cycle once, from its least module)
                    seen.add(dep)
                    stack.append((dep, [*path, dep]))
    assert cycles == []


#: The edges reach the lifecycle and the store only through the services.
EDGES = ("cli", "api")
BEHIND_SERVICES = ("mvm.lifecycle", "mvm.store")


def edge_violations(src: Path = SRC) -> list[str]:
    """Imports of the lifecycle or the store in `cli/` and `api/` (anywhere: inside functions,
    under `TYPE_CHECKING`), and `.store` / `.locks` attribute access (a host context's store or
    locks reached around the services)."""
    wrong = []
    for edge in EDGES:
        for f in sorted((src / edge).rglob("*.py")):
            rel = f.relative_to(src)
            for node in ast.walk(ast.parse(f.read_text())):
                names: list[str] = []
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.Attribute) and node.attr in ("store", "locks"):
                    wrong.append(f"{rel}:{node.lineno} reaches .{node.attr}")
                bad = sorted({n for n in names for b in BEHIND_SERVICES if n == b or n.startswith(b + ".")})
                if bad:
                    wrong.append(f"{rel}:{node.lineno} imports {bad[0]}")
    return wrong


def test_cli_and_api_go_through_services() -> None:
    assert edge_violations() == []
