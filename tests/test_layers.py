"""The layers of common/, read from the import statements of every module (nested imports
included): data knows no models, models know no files or training loop, loss and recall
take tensors only, plots know no models or data, nothing in common/ imports a task
script, and no two modules import each other, directly or through others."""
import ast
from pathlib import Path

import pytest

COMMON = Path(__file__).resolve().parents[1] / "common"
DATA = {"datasets", "synthetic", "sampling", "loader", "task_data", "image_check"}
MODELS = {"models", "cubs", "networks"}
TRAINING = {"engine", "train_classifier", "init_weights", "diagnostics", "evaluate", "cli"}
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
