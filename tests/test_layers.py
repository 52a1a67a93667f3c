"""The package layout shows the architecture: dependencies point one way (docs/ARCHITECTURE.md).

model ← config/util ← store/image/builder/network/guest/runtime ← lifecycle ← services ← cli, api.
Imports only for type hints (under `if TYPE_CHECKING:`) do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "mvm"
LAYER = {
    "errors": 0, "model": 0,
    "config": 1, "util": 1,
    "store": 2, "image": 2, "builder": 2, "network": 2, "guest": 2, "runtime": 2,
    "lifecycle": 3,
    "services": 4,
    "cli": 5, "api": 5,
}
# Within layer 2, what may use what (guest channels are how a runtime reaches its guest; the
# builder microVM's host and guest sides run the image pipeline's code);
# within layer 5, only `mvm agent serve` starting the API's server: otherwise the CLI and the
# API are two edges over the same services.
SIDEWAYS = {("runtime", "guest"), ("network", "runtime"), ("image", "guest"), ("builder", "image"),
            ("builder", "guest"), ("cli", "api")}


def _imports(tree: ast.Module) -> list[str]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
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
            if LAYER[dep] > LAYER[me] or (LAYER[dep] == LAYER[me] and LAYER[me] in (2, 5)
                                          and (me, dep) not in SIDEWAYS):
                wrong.append(f"{rel} imports mvm.{dep}")
    assert wrong == []


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
