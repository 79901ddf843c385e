"""The layers of common/, read from the import statements of every module (nested imports
included): data knows no models, models know no files or training loop, loss and recall
take tensors only, plots know no models or data, the training loop draws no figures and
knows no CUBS diagnostics, nothing in common/ imports a task script, and no two modules
import each other, directly or through others. Also: no function over 80 lines."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

COMMON = Path(__file__).resolve().parents[1] / "common"
DATA = {"datasets", "synthetic", "sampling", "loader", "task_data", "image_check"}
MODELS = {"models", "cubs", "networks"}
TRAINING = {"engine", "init_weights", "diagnostics", "evaluate", "cli"}
PLOTS_AND_REPORTS = {"plots", "formats", "placements", "runs_folder", "architecture", "recipes",
                     "report", "report_pdf", "archive"}


def common_imports(module: str) -> set[str]:
    """Names of the common/ modules (and top-level scripts) that common/<module>.py imports."""
    return imported_names((COMMON / f"{module}.py").read_text())


def imported_names(source: str) -> set[str]:
    """The modules a source imports anywhere in it, functions included: `common.x` as `x`,
    any other as its top-level package."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "common":
                found |= {alias.name for alias in node.names}
            elif node.module.startswith("common."):
                found.add(node.module.split(".")[1])
            else:
                found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                found.add(parts[1] if parts[0] == "common" and len(parts) > 1 else parts[0])
    return found


def test_every_module_is_in_a_layer_or_a_known_helper():
    known = DATA | MODELS | TRAINING | PLOTS_AND_REPORTS | {"loss", "recall", "runtime", "checkpoint", "files",
                                                            "errors", "flops", "schema", "__init__"}
    assert {p.stem for p in COMMON.glob("*.py")} <= known  # a new module must be placed here


@pytest.mark.parametrize("module", sorted(DATA))
def test_data_modules_import_no_model_training_or_plot_module(module):
    assert not common_imports(module) & (MODELS | TRAINING | PLOTS_AND_REPORTS)


@pytest.mark.parametrize("module", sorted(MODELS))
def test_models_import_no_data_training_or_file_module(module):
    assert not common_imports(module) & (DATA | TRAINING | PLOTS_AND_REPORTS | {"checkpoint", "runtime"})


def test_plots_import_no_model_data_or_training_module():
    # plots.py draws what it is given (histories, values, images), whoever computed them.
    assert not common_imports("plots") & (MODELS | DATA | TRAINING)


@pytest.mark.parametrize("module", ["loss", "recall"])
def test_loss_and_recall_take_tensors_only(module):
    assert common_imports(module) <= {"__future__", "math", "typing", "collections", "torch"}


@pytest.mark.parametrize("module", sorted(p.stem for p in COMMON.glob("*.py")))
def test_nothing_in_common_imports_a_task_script(module):
    scripts = {p.stem for p in COMMON.parent.glob("t[1-4]_*.py")}
    assert len(scripts) == 4 and not common_imports(module) & scripts


def test_the_reader_sees_imports_it_must_catch():
    # task_data.py reads the runtime, not the training loop; architecture.py counts CUBS and SE
    # modules.
    assert "runtime" in common_imports("task_data") and "engine" not in common_imports("task_data")
    assert {"cubs", "models"} <= common_imports("architecture")
    nested = "import os\n\ndef f():\n    from common import archive\n    import common.plots as p\n"
    assert imported_names(nested) == {"os", "archive", "plots"}


def test_settings_and_reports_do_not_reach_into_the_loop_or_the_loader():
    # cli builds FitConfig and recipes.py quotes RANDOM_AREA: both live in schema.py, so the
    # flags need no training loop and the reports no data pipeline.
    assert "engine" not in common_imports("cli")
    for module in ("report", "report_pdf", "archive", "runs_folder", "architecture", "recipes"):
        assert not {"loader", "engine"} & common_imports(module), module


def reachable(module: str) -> set[str]:
    """Every module (common/ or not) that importing common/<module> can load, through the
    common/ modules it imports, nested imports included."""
    modules = {p.stem for p in COMMON.glob("*.py")}
    seen, todo = set(), [module]
    while todo:
        for name in common_imports(todo.pop()) - seen:
            seen.add(name)
            if name in modules:
                todo.append(name)
    return seen


@pytest.mark.parametrize("module", ["engine", "evaluate", "checkpoint"])
def test_the_training_loop_draws_no_figures_and_knows_no_cubs_diagnostics(module):
    # curves.png is drawn by the script's on_epoch (plots.curves_png); T2, T3 and T4 pass
    # diagnostics to evaluate.holdout_scorer, so T1 never loads the CUBS blocks.
    assert not {"plots", "matplotlib", "diagnostics", "cubs"} & reachable(module), module


def test_the_import_closure_is_read_through_nested_modules():
    assert {"plots", "matplotlib", "formats"} <= reachable("placements")


def import_graph() -> dict[str, set[str]]:
    """common/ module -> the common/ modules it imports."""
    modules = {p.stem for p in COMMON.glob("*.py")}
    return {m: common_imports(m) & modules for m in sorted(modules)}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None where it has none (depth first: an
    edge back to a module still on the path closes a cycle)."""
    path: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        path.append(module)
        for imported in sorted(graph.get(module, ())):
            cycle = visit(imported)
            if cycle:
                return cycle
        path.pop()
        done.add(module)
        return None

    return next((c for c in map(visit, sorted(graph)) if c), None)


def test_find_cycle_names_the_cycle_and_passes_a_layered_graph():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles_in_common():
    # A cycle makes a module's import order matter and its job unclear: the report modules
    # import one way, from report (the command) down to runs_folder.
    graph = import_graph()
    assert {"report_pdf", "archive"} <= graph["report"]
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle in common/: {' -> '.join(cycle)}"


def test_nothing_in_common_imports_the_report_command():
    assert not [m for m, imported in import_graph().items() if "report" in imported]


# ---------------------------------------------------------------- function length
MAX_FUNCTION_LINES = 80
# Functions allowed over MAX_FUNCTION_LINES, by "file:name" (none at present).
LONG_FUNCTIONS: set[str] = set()


def long_functions(paths, root: Path = COMMON.parent) -> dict[str, int]:
    """{"file:function": lines} of every function (methods and nested ones included) longer
    than MAX_FUNCTION_LINES, from its first decorator to its last line."""
    found = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - min([node.lineno] + [d.lineno for d in node.decorator_list]) + 1
                if lines > MAX_FUNCTION_LINES:
                    found[f"{path.relative_to(root)}:{node.name}"] = lines
    return found


def test_no_function_in_the_scripts_or_common_is_over_80_lines():
    paths = sorted(COMMON.parent.glob("t[1-4]_*.py")) + sorted(COMMON.glob("*.py"))
    assert len(paths) > 30
    too_long = {k: v for k, v in long_functions(paths).items() if k not in LONG_FUNCTIONS}
    assert not too_long, f"split these functions (lines): {too_long}"


def test_long_functions_counts_from_the_decorator_to_the_last_line(tmp_path):
    body = "\n".join(f"        x{i} = {i}" for i in range(MAX_FUNCTION_LINES - 1))
    (tmp_path / "m.py").write_text(f"class C:\n    @staticmethod\n    def f():\n{body}\n\n\n"
                                   f"def g():\n    pass\n")
    assert long_functions([tmp_path / "m.py"], tmp_path) == {"m.py:f": MAX_FUNCTION_LINES + 1}


# ---------------------------------------------------------------- what a task script pulls in
SCRIPTS = sorted(COMMON.parent.glob("t[1-4]_*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_scripts_build_their_networks_themselves(script):
    # networks.build_model (a network from its name in a meta) is for the report and for
    # rebuilding a saved run; a script shows the constructor it trains.
    assert "networks" not in imported_names(script.read_text())


def test_t3_loads_at_most_16_common_modules():
    # What a reader (or a Colab cell) takes in with T3: the comparison of placements and
    # its figures load when they are drawn, the smoke data generator only with --smoke.
    code = "import sys, t3_cubs; print(sorted(m for m in sys.modules if m.startswith('common.')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=COMMON.parent, capture_output=True,
                         text=True, check=True).stdout
    loaded = ast.literal_eval(out.strip())
    assert len(loaded) <= 16, loaded
    assert not {"common.plots", "common.networks", "common.synthetic"} & set(loaded)
