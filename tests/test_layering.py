"""The package's dependencies point one way: every import of a ds_upcycle module goes to a lower layer.

Read from the source with `ast` (module-level and function-level imports alike), so a cycle cannot
hide behind an import inside a function. docs/ARCHITECTURE.md describes the layers.
"""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ds_upcycle"

# Component (first name under ds_upcycle/) -> layer; an import must go to a lower layer or stay
# inside its own component.
LAYERS = {
    "__init__": 0, "choices": 0, "errors": 0, "trust": 0, "cache": 0, "accelerator": 0, "quick_exit": 0,
    "atomic": 1, "comm": 1, "config": 1, "dtypes": 1,
    "data": 2, "moe": 2,
    "model": 3,
    "checkpoint": 4,
    "trained": 5,
    "training": 6, "upcycle": 6, "evaluation": 6, "hf": 6,
    "eval": 7, "reproduce": 7,  # eval: lm-eval task folders whose code calls evaluation/
    "cli": 8, "lm_eval": 8,
}
# Where imports inside functions may name ds_upcycle modules: the commands, which load the library
# behind a command only when it runs (DeepSpeed and lm-eval take seconds to import).
LAZY_ALLOWED = {"cli.py", "evaluation/cli.py"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path):
    """(imported ds_upcycle module, inside a function?) for every import statement of a file."""
    is_package = path.name == "__init__.py"
    return imports_in(path.read_text(), module_name(path), is_package)


def imports_in(source: str, module: str, is_package: bool = False):
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    functions = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    local = {id(inner) for f in functions for inner in ast.walk(f) if inner is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from . import x`: x is a submodule if a file or folder has its name, else a name of the package.
            names = [target] if node.module else [
                f"{target}.{alias.name}" if _is_module(f"{target}.{alias.name}") else target for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            if name == "ds_upcycle" or name.startswith("ds_upcycle."):
                yield name, id(node) in local


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or path.is_dir()


def component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def package_files():
    return sorted(PACKAGE.rglob("*.py"))


def test_every_component_has_a_layer():
    assert {component(module_name(p)) for p in package_files()} <= set(LAYERS)


def test_imports_point_down():
    wrong = []
    for path in package_files():
        here = component(module_name(path))
        for target, _ in imported_modules(path):
            there = component(target)
            if there != here and LAYERS[there] >= LAYERS[here]:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {target}")
    assert not wrong, "imports that do not point to a lower layer:\n" + "\n".join(wrong)


def test_no_function_local_imports_of_the_package_outside_the_commands():
    lazy = [f"{path.relative_to(PACKAGE)} imports {target} inside a function"
            for path in package_files() for target, local in imported_modules(path)
            if local and str(path.relative_to(PACKAGE)) not in LAZY_ALLOWED]
    assert not lazy, "\n".join(lazy)


def test_checkpoint_format_readers_do_not_import_each_other():
    readers = {"ds_upcycle.checkpoint.zero_reader", "ds_upcycle.checkpoint.stage0"}
    for name in readers:
        path = PACKAGE / "checkpoint" / f"{name.rpartition('.')[2]}.py"
        assert not {target for target, _ in imported_modules(path)} & (readers - {name})


def test_the_import_parser_sees_hidden_and_relative_imports():
    """The oracle itself, on made-up modules."""
    hidden = "def f():\n    from ..upcycle import expand\n    return expand\n"
    assert list(imports_in(hidden, "ds_upcycle.checkpoint.probe")) == [("ds_upcycle.upcycle", True)]
    top = "from .. import __version__, comm\nimport ds_upcycle.model\n"
    assert sorted(imports_in(top, "ds_upcycle.training.probe")) == [
        ("ds_upcycle", False), ("ds_upcycle.comm", False), ("ds_upcycle.model", False)]


# What DeepSpeed's MoE modules and our wrappers of them hold inside: only moe/ (the live modules)
# and checkpoint/ (their files) may name it. Everything else goes through moe.live (one view of any
# MoE block) and moe.names / checkpoint's layer descriptions.
MOE_INTERNALS = re.compile(r"deepspeed\.moe|deepspeed\.module_inject|deepspeed_moe|deepspeed_experts|AutoEPMoELayer|"
                           r"auto_ep|expert_group_name|\broute_load\b|\broute_group\b|tokens_per_expert|"
                           r"\blocal_experts\b|\.wg\.")
MOE_OWNERS = ("moe", "checkpoint")


def test_only_moe_and_checkpoint_know_the_moe_modules_inside():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] in MOE_OWNERS:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            offenders += [f"{path.relative_to(PACKAGE)}:{number}: {m[0]}" for m in MOE_INTERNALS.finditer(code)]
    assert not offenders, "\n".join(offenders)
