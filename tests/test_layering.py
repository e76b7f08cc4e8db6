"""The package layers: each part of lsts imports only the parts below it (read from the source with
`ast`, every import statement, also those inside functions), so no import cycle between packages
can come back. Bottom to top:

    cli  <  kernels  <  config  <  parallel  <  attention  <  models  <  inference, train  <  finetune
    <  planner  <  launch/

(config reads the kernel backends' names from `lsts.kernels.backend`, which imports no torch.)

``lsts`` itself (the version) sits below everything. Within one part, modules import each other
freely."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAYERS = [
    {"lsts"},
    {"lsts.cli"},
    {"lsts.kernels"},
    {"lsts.config"},
    {"lsts.parallel"},
    {"lsts.attention"},
    {"lsts.models"},
    {"lsts.inference", "lsts.train"},
    {"lsts.finetune"},
    {"lsts.planner"},
    {"launch"},
]
LEVEL = {part: level for level, parts in enumerate(LAYERS) for part in parts}


def _part(module: str) -> str | None:
    """``lsts.parallel.ring`` -> ``lsts.parallel``; ``launch.train`` -> ``launch``; None outside."""
    names = module.split(".")
    if names[0] == "launch":
        return "launch"
    if names[0] != "lsts":
        return None
    return ".".join(names[:2]) if len(names) > 1 else "lsts"


def _imports(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name


def _sources():
    for top in ("lsts", "launch"):
        for path in sorted((ROOT / top).rglob("*.py")):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            yield path, module


def test_every_part_of_lsts_has_a_layer():
    assert {_part(module) for _, module in _sources()} <= set(LEVEL)


def test_no_part_imports_a_part_above_it_or_beside_it():
    upward = []
    for path, module in _sources():
        here = _part(module)
        for line, imported in _imports(path):
            there = _part(imported)
            if there is None or there == here:
                continue
            if LEVEL[there] >= LEVEL[here]:
                upward.append(f"{path.relative_to(ROOT)}:{line} ({here}) imports {imported}")
    assert not upward, "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    """The test itself can fail: a kernel module importing the trainer is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from lsts.train.trainer import train\n")
    [(line, imported)] = list(_imports(bad))
    assert line == 2 and LEVEL[_part(imported)] > LEVEL[_part("lsts.kernels.norm")]
