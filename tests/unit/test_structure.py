"""The shape of the package: sub-packages by phase, imports that never climb the layer order, no
dispatch on name strings, a torch floor that has every API called."""

import ast
from pathlib import Path

from lorabench.workload.methods import METHODS
from lorabench.workload.tasks import TASKS

PACKAGE = Path(__file__).resolve().parents[2] / "lorabench"
# "plan.cells" -> its syntax tree; the package's own root modules by their bare name ("cli").
MODULES = {
    ".".join(p.relative_to(PACKAGE).with_suffix("").parts): ast.parse(p.read_text(), str(p))
    for p in PACKAGE.rglob("*.py")
}

# The data path, bottom up: a module may import from its own layer and those below it, never above.
# The root holds the foundation (errors, and the process helpers every layer may need) and the
# entry points (the CLI, `lorabench check`, the docs generator) that sit above everything.
LAYERS = ["foundation", "workload", "measure", "plan", "results", "run", "render", "entry"]
ROOT = {
    "errors": "foundation",
    "forksafe": "foundation",
    "child": "foundation",
    "files": "foundation",
    "__init__": "foundation",
    "cli": "entry",
    "parser": "entry",
    "commands": "entry",
    "check": "entry",
    "gpucheck": "entry",
    "hostcheck": "entry",
    "proof": "entry",
    "__main__": "entry",
    "docs": "entry",
}


def layer(module: str) -> int:
    head, _, rest = module.partition(".")
    return LAYERS.index(head if rest else ROOT[head])


def _imports(name: str, tree: ast.Module) -> set[str]:
    """Every lorabench module `name` imports, anywhere: top level, inside functions, under TYPE_CHECKING."""
    here = name.split(".")[:-1]  # the package it is in ([] at the root)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here[: len(here) - (node.level - 1)]
            target = base + (node.module.split(".") if node.module else [])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "lorabench":
            target = node.module.split(".")[1:]
        elif isinstance(node, ast.Import):
            out.update(".".join(a.name.split(".")[1:]) for a in node.names if a.name.startswith("lorabench."))
            continue
        else:
            continue
        dotted = ".".join(target)
        subs = {".".join(target + [a.name]) for a in node.names} & set(MODULES)
        out |= subs or ({dotted} & set(MODULES))
    return out


GRAPH = {name: _imports(name, tree) - {name} for name, tree in MODULES.items()}


def climbs(graph: dict[str, set[str]]) -> list[str]:
    """Every import that reaches a higher layer than its importer's."""
    return [
        f"{a} ({LAYERS[layer(a)]}) imports {b} ({LAYERS[layer(b)]})"
        for a, deps in sorted(graph.items())
        for b in sorted(deps)
        if layer(b) > layer(a)
    ]


def test_every_module_has_a_layer_and_the_root_holds_only_the_named_ones():
    for name in MODULES:
        assert 0 <= layer(name) < len(LAYERS), name
    assert {p.stem for p in PACKAGE.glob("*.py")} == set(ROOT)
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(LAYERS) - {
        "foundation",
        "entry",
    }


def test_no_import_climbs_the_layer_order():
    assert GRAPH["render.report"] and GRAPH["cli"]  # the import reader finds imports at all
    assert "results.rows" in GRAPH["render.report"] and "plan.cells" in GRAPH["plan.presets"]
    assert climbs(GRAPH) == []


def test_the_layer_check_refuses_a_climbing_import():
    assert climbs({"measure.trackers": {"run.runner"}, "run.runner": {"measure.trackers"}}) == [
        "measure.trackers (measure) imports run.runner (run)"
    ]


def test_imports_flow_one_way():
    order, state = [], {}

    def visit(name, path):
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", f"import cycle: {' -> '.join(path + [name])}"
        state[name] = "open"
        for dep in sorted(GRAPH[name]):
            visit(dep, path + [name])
        state[name] = "done"
        order.append(name)

    for name in sorted(GRAPH):
        visit(name, [])


def test_no_private_name_crosses_a_module():
    """A name that starts with _ is its module's own: no other module imports it."""
    crossing = [
        (m, a.name)
        for m, tree in MODULES.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for a in node.names
        if a.name.startswith("_") and not a.name.startswith("__")
    ]
    assert crossing == []


def _name_comparisons(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, name) of every comparison against a method's or a task's name (==, !=, in)."""
    names = set(METHODS) | set(TASKS)
    return [
        (node.lineno, c.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Compare)
        for side in [node.left, *node.comparators]
        for c in ast.walk(side)
        if isinstance(c, ast.Constant) and c.value in names
    ]


def test_no_method_or_task_name_is_compared_outside_its_registry():
    found = {
        m: _name_comparisons(tree)
        for m, tree in MODULES.items()
        if m not in ("workload.methods", "workload.tasks")
    }
    assert {m: hits for m, hits in found.items() if hits} == {}


def test_the_name_check_catches_what_it_must_refuse():
    tree = ast.parse('if cell.method == "full" or bundle.task.name in ("causal-lm", "x"): pass')
    assert [name for _, name in _name_comparisons(tree)] == ["full", "causal-lm"]


# Each cell setting whose values are registry entries, and the module that owns what its values
# mean: only there may a value be compared by its spelling; everywhere else asks the entry (or the
# cell's property that does: `cell.checkpointed`, `cell.quantized`, `cell.on_gpu`, ...).
SETTING_OWNERS = {
    "grad_checkpointing": "workload.checkpointing",
    "compile": "workload.compiler",
    "quantize": "workload.quantization",
    "strategy": "workload.distributed",
    "weights": "workload.models",
    "precision": "workload.precision",
    "dtype": "workload.precision",
    "optimizer": "workload.optimizers",
    "device": "plan.cells",
    "data": "workload.data",
}


def _setting_comparisons(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, setting) of every comparison of a setting's value (`x.quantize`, `c.device`, ...)
    against a spelling (a string, or strings in a tuple, list or set)."""
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        fields = [x.attr for x in sides if isinstance(x, ast.Attribute) and x.attr in SETTING_OWNERS]
        spelled = any(
            isinstance(c, ast.Constant) and isinstance(c.value, str)
            for side in sides
            for c in ([side] if isinstance(side, ast.Constant) else getattr(side, "elts", []))
        )
        out += [(node.lineno, f) for f in fields] if spelled else []
    return out


def test_no_setting_value_is_compared_by_its_spelling_outside_its_owner():
    found = {
        m: [(line, f) for line, f in _setting_comparisons(tree) if SETTING_OWNERS[f] != m]
        for m, tree in MODULES.items()
    }
    assert {m: hits for m, hits in found.items() if hits} == {}


def test_the_setting_check_catches_what_it_must_refuse():
    tree = ast.parse(
        'if cell.quantize != "none" or c.device in ("cpu",) or group.strategy == "fsdp2" or x.rank == 8: pass'
    )
    assert [f for _, f in _setting_comparisons(tree)] == ["quantize", "device", "strategy"]


# torch APIs lorabench calls that older releases lack, and the release that made each public.
TORCH_APIS = {
    "torch.distributed.fsdp.fully_shard": "2.6",  # FSDP2 (before: torch.distributed._composable.fsdp)
    "torch.OutOfMemoryError": "2.5",  # (before: torch.cuda.OutOfMemoryError)
    "torch.amp.GradScaler": "2.3",  # device-generic, the CPU's included
    "torch.distributed.checkpoint.state_dict.get_model_state_dict": "2.2",
    "torch.distributed.device_mesh.init_device_mesh": "2.2",
    "torch.utils.flop_counter.FlopCounterMode": "2.1",
}


def test_the_declared_torch_floor_has_every_api_lorabench_calls():
    import importlib
    import re

    pyproject = (PACKAGE.parent / "pyproject.toml").read_text()
    floor = tuple(int(x) for x in re.search(r'"torch>=([0-9.]+)"', pyproject).group(1).split("."))
    for api, since in TORCH_APIS.items():
        assert floor >= tuple(int(x) for x in since.split(".")), (
            f"torch>={floor} lacks {api} (public since {since})"
        )
        module, _, name = api.rpartition(".")
        assert hasattr(importlib.import_module(module), name), api  # and the torch installed here has it


def test_the_code_is_as_the_formatter_leaves_it_and_the_linter_passes():
    """ruff (pinned in pyproject's dev extra) owns the layout: `ruff format --check` and `ruff check`."""
    import subprocess
    import sys

    root = PACKAGE.parent
    for args in (["format", "--check", "--quiet"], ["check", "--quiet"]):
        out = subprocess.run(
            [sys.executable, "-m", "ruff", *args, "."], cwd=root, capture_output=True, text=True
        )
        assert out.returncode == 0, f"ruff {' '.join(args)}:\n{out.stdout}{out.stderr}"


def test_every_test_file_has_a_name_of_its_own_so_one_pytest_collects_every_tier():
    # the tiers have no __init__.py: two files of one name make `python -m pytest tests` stop at
    # collection ("import file mismatch")
    names = [p.name for p in (PACKAGE.parent / "tests").rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []


# A module past about 500 lines is split along its jobs; the one exception is a table, one job however
# long its entries run (METRICS: a definition, unit, gate and fold per figure).
ONE_JOB_HOWEVER_LONG = {"results.metrics"}


def test_no_module_past_about_500_lines_but_a_table():
    lines = {
        name: len((PACKAGE / (name.replace(".", "/") + ".py")).read_text().splitlines()) for name in MODULES
    }
    assert lines["results.metrics"] > 520  # the count reads the files at all
    assert {name for name, n in lines.items() if n > 520} == ONE_JOB_HOWEVER_LONG
