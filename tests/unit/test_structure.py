"""The shape of the package: small modules, imports flowing one way, no dispatch on name strings."""
import ast
from pathlib import Path

from lorabench.methods import METHODS
from lorabench.tasks import TASKS

PACKAGE = Path(__file__).resolve().parents[2] / "lorabench"
MODULES = {p.stem: ast.parse(p.read_text(), str(p)) for p in PACKAGE.glob("*.py")}


def test_no_module_is_over_400_lines_and_the_cli_is_under_375():
    lines = {p.stem: len(p.read_text().splitlines()) for p in PACKAGE.glob("*.py")}
    assert {m: n for m, n in lines.items() if n > 400} == {}
    assert lines["cli"] < 375   # parsing and printing of six commands (run, report, compare, check, list, merge)


def _imports(tree: ast.Module) -> set[str]:
    """Every lorabench module this one imports, anywhere: top level, inside functions, under TYPE_CHECKING."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lorabench."):
            out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("lorabench."))
    return out & set(MODULES)


def test_imports_flow_one_way():
    graph = {name: _imports(tree) - {name} for name, tree in MODULES.items()}
    order, state = [], {}

    def visit(name, path):
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", f"import cycle: {' -> '.join(path + [name])}"
        state[name] = "open"
        for dep in sorted(graph[name]):
            visit(dep, path + [name])
        state[name] = "done"
        order.append(name)

    for name in sorted(graph):
        visit(name, [])
    assert order.index("rows") < order.index("report") and order.index("cells") < order.index("plan")


def _name_comparisons(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, name) of every comparison against a method's or a task's name (==, !=, in)."""
    names = set(METHODS) | set(TASKS)
    return [(node.lineno, c.value) for node in ast.walk(tree) if isinstance(node, ast.Compare)
            for side in [node.left, *node.comparators] for c in ast.walk(side)
            if isinstance(c, ast.Constant) and c.value in names]


def test_no_method_or_task_name_is_compared_outside_its_registry():
    found = {m: _name_comparisons(tree) for m, tree in MODULES.items() if m not in ("methods", "tasks")}
    assert {m: hits for m, hits in found.items() if hits} == {}


def test_the_name_check_catches_what_it_must_refuse():
    tree = ast.parse('if cell.method == "full" or bundle.task.name in ("causal-lm", "x"): pass')
    assert [name for _, name in _name_comparisons(tree)] == ["full", "causal-lm"]


# torch APIs lorabench calls that older releases lack, and the release that made each public.
TORCH_APIS = {
    "torch.distributed.fsdp.fully_shard": "2.6",            # FSDP2 (before: torch.distributed._composable.fsdp)
    "torch.OutOfMemoryError": "2.5",                        # (before: torch.cuda.OutOfMemoryError)
    "torch.amp.GradScaler": "2.3",                          # device-generic, the CPU's included
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
        assert floor >= tuple(int(x) for x in since.split(".")), f"torch>={floor} lacks {api} (public since {since})"
        module, _, name = api.rpartition(".")
        assert hasattr(importlib.import_module(module), name), api   # and the torch installed here has it
