"""The package's layering, read from its import statements (ast, no imports run): the library never imports the
application, each library package imports only the packages below it, no private name crosses a module boundary
and nothing reaches into `jax._src`."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qlora_jax"

# The library's floors, bottom first: a unit imports only units on lower floors (or itself). The public modules
# (qlora_jax/*.py) sit above the library and below the application.
FLOORS = (
    ("formats",),
    ("config", "ops", "data"),
    ("nn", "sharding", "checkpoint"),
    ("surgery",),
    ("linen", "models"),
    ("train",),
    ("memory",),
)
FLOOR = {unit: level for level, units in enumerate(FLOORS) for unit in units}
PUBLIC = len(FLOORS)
APP = PUBLIC + 1


def _unit(module: str) -> str:
    """The layering unit of a dotted module name inside qlora_jax."""
    parts = module.split(".")
    if parts[1:2] == ["_src"]:
        return parts[2] if len(parts) > 2 else "_src"
    if parts[1:2] == ["app"]:
        return "app"
    return "public"


def _floor(unit: str) -> int:
    return {"public": PUBLIC, "app": APP}.get(unit, FLOOR.get(unit, -1))


def _modules() -> list[tuple[str, ast.Module, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out.append((name, ast.parse(path.read_text(), str(path)), path))
    return out


def _imports(tree: ast.Module, module: str, is_package: bool) -> list[tuple[str, list[str], int]]:
    """(imported module, names imported from it, line) for every import statement, relative ones resolved."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            out.append((base, [alias.name for alias in node.names], node.lineno))
    return out


def _all_imports():
    for module, tree, path in _modules():
        for target, names, line in _imports(tree, module, path.name == "__init__.py"):
            yield module, target, names, f"{path.relative_to(PACKAGE.parent)}:{line}"


def test_every_library_package_has_a_floor():
    units = {p.stem if p.is_file() else p.name for p in (PACKAGE / "_src").iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert units == set(FLOOR), "qlora_jax/_src changed: give each package a floor in FLOORS"


def test_imports_only_go_down():
    upward = []
    for module, target, _, where in _all_imports():
        if not target.startswith("qlora_jax"):
            continue
        source, dest = _unit(module), _unit(target)
        if dest == "_src" and source != "_src":  # `from qlora_jax._src import checkpoint`: the names are the units
            continue
        if source != dest and _floor(dest) >= _floor(source):
            upward.append(f"{where}: {source} imports {target} ({dest})")
    assert not upward, "\n".join(upward)


def test_the_library_never_imports_the_application():
    found = [where for module, target, _, where in _all_imports()
             if _unit(module) != "app" and target.startswith("qlora_jax.app")]
    assert not found, found


@pytest.mark.parametrize("banned", ["jax._src", "jax._src."])
def test_no_jax_internals(banned):
    found = [where for _, target, _, where in _all_imports() if target == banned.rstrip(".") or
             target.startswith(banned)]
    assert not found, found


def test_no_private_name_crosses_a_module():
    private = [f"{where}: {name} from {target}" for module, target, names, where in _all_imports()
               if target.startswith("qlora_jax") and target != module
               for name in names if name.startswith("_") and not name.startswith("__")]
    assert not private, "\n".join(private)


def test_the_checks_see_an_upward_import():  # the checks above read real import statements
    tree = ast.parse("from qlora_jax.app.cli import main\nfrom qlora_jax._src.train.step import _private\n")
    found = _imports(tree, "qlora_jax._src.formats.blockwise", False)
    assert [(t, n) for t, n, _ in found] == [("qlora_jax.app.cli", ["main"]), ("qlora_jax._src.train.step",
                                                                               ["_private"])]
    assert _floor(_unit(found[0][0])) > _floor(_unit("qlora_jax._src.formats.blockwise"))
    assert _floor(_unit(found[1][0])) > _floor(_unit("qlora_jax._src.formats.blockwise"))
