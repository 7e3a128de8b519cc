"""dvc.yaml states each stage's inputs: a test that it lists what the stage's code really uses.

A stage's code deps must cover every module of the package that its command imports, found
from the package's own import graph: the CLI command a stage runs, the `stages` function that
command calls, and every `pap_severity` module those import, transitively (imports inside
functions count too, so the set is an over-approximation, never an under-one). `cli` and
`stages` themselves (and the package root, which holds the version) are the glue every stage
shares and are not required: listing them would rerun every stage on any edit of either. The training stages must list as params every setting
that defines a training run (`config.RUN_PARAMS`); the tune stage may leave out the settings its
study sets itself. A stale cache otherwise follows silently.
"""

from __future__ import annotations

import ast
import importlib
import copy
import shlex
from pathlib import Path

import pytest
import yaml

from pap_severity import cli
from pap_severity.config import PIPELINES, RUN_PARAMS, Config

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "pap_severity"
GLUE = {"pap_severity", "pap_severity.cli", "pap_severity.stages"}  # and the version string of the root
TRAINING_STAGES = ("tune", "train", "train_final")


def module_file(module: str) -> Path | None:
    """The file of a pap_severity module (a package's __init__.py), None for other modules."""
    if module != "pap_severity" and not module.startswith("pap_severity."):
        return None
    path = ROOT / "src" / Path(*module.split("."))
    if path.is_dir():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def lazy_names(package: str) -> dict[str, str]:
    """A package whose names load on first use (pap_severity.explain's `_WHERE`): name -> submodule."""
    if module_file(package) is None or module_file(package).name != "__init__.py":
        return {}
    return getattr(importlib.import_module(package), "_WHERE", {})


def imported_modules(node: ast.AST, current: str) -> set[str]:
    """The pap_severity modules imported anywhere under `node` (module-level or inside functions).
    A lazy package stands for the submodules of the names taken from it, or for all of them when
    it is imported whole (`from pap_severity import explain`, then `explain.anything`)."""
    found = set()
    for item in ast.walk(node):
        if isinstance(item, ast.Import):
            found.update(alias.name for alias in item.names)
        elif isinstance(item, ast.ImportFrom):
            base = item.module or ""
            if item.level:  # relative: from . import x
                parts = current.split(".")
                package = parts if module_file(current).name == "__init__.py" else parts[:-1]
                base = ".".join(package[: len(package) - item.level + 1] + ([base] if base else []))
            found.add(base)
            lazy = lazy_names(base)
            found.update(f"{base}.{lazy.get(alias.name, alias.name)}" for alias in item.names)
    for module in list(found):
        if module not in (item.module for item in ast.walk(node) if isinstance(item, ast.ImportFrom)):
            found.update(f"{module}.{sub}" for sub in lazy_names(module).values())  # imported whole
    return {m for m in found if module_file(m) is not None}


def source_of(module: str) -> ast.Module:
    return ast.parse(module_file(module).read_text())


def closure(modules: set[str]) -> set[str]:
    """Every pap_severity module reachable from `modules`, parents of submodules included."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        module = todo.pop()
        if module in seen or module in GLUE:  # the glue's own imports are not the stage's
            continue
        seen.add(module)
        parent = module.rpartition(".")[0]
        if parent.startswith("pap_severity") and parent != "pap_severity":
            todo.append(parent)
        todo.extend(imported_modules(source_of(module), module) - seen)
    return seen


def function_node(module: str, name: str) -> ast.FunctionDef:
    for node in source_of(module).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise LookupError(f"{module}.{name} not found")


def cli_callback(words: list[str]):
    """The typer callback of `pap-severity WORDS...` (a command or a command of a sub-app)."""
    app = cli.app
    while True:
        for command in app.registered_commands:
            name = command.name or command.callback.__name__.replace("_", "-")
            if words and name == words[0]:
                return command.callback
        for group in app.registered_groups:
            if words and group.name == words[0]:
                app, words = group.typer_instance, words[1:]
                break
        else:
            raise LookupError(f"no CLI command for {words}")


def stage_function_imports(name: str, seen: set[str] | None = None) -> set[str]:
    """The imports of stages.<name> and of every stages.py function it calls, transitively."""
    seen = set() if seen is None else seen
    if name in seen:
        return set()
    seen.add(name)
    try:
        node = function_node("pap_severity.stages", name)
    except LookupError:
        return set()  # a constant such as stages.TUNING
    found = imported_modules(node, "pap_severity.stages")
    for call in ast.walk(node):
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Name):
            found |= stage_function_imports(call.func.id, seen)
    return found


def stage_modules(cmd: str) -> set[str]:
    """The pap_severity modules the commands of a stage's `cmd` import, transitively, glue excluded."""
    roots: set[str] = set()
    for part in cmd.split("&&"):
        words = [w for w in shlex.split(part) if "=" not in w or w.startswith("-")]
        if "pap-severity" not in words:
            continue
        words = words[words.index("pap-severity") + 1:]
        callback = cli_callback([w for w in words if not w.startswith("-")][:2])
        body = function_node("pap_severity.cli", callback.__name__)
        roots |= imported_modules(body, "pap_severity.cli")
        # The `stages.<name>(...)` it calls: that function's own imports, and those of the stages.py
        # helpers it calls in turn (explain -> served_bundle).
        for node in ast.walk(body):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "stages":
                roots |= stage_function_imports(node.attr)
    tree = source_of("pap_severity.cli")
    module_level = ast.Module(body=[n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))],
                              type_ignores=[])
    roots |= imported_modules(module_level, "pap_severity.cli")
    # An empty package __init__ (pap_severity, pap_severity.data) holds no code to depend on.
    return {m for m in closure(roots) - GLUE if module_file(m).read_text().strip()}


def covers(deps: list[str], module: str) -> bool:
    target = module_file(module).relative_to(ROOT)
    return any(target == Path(dep) or Path(dep) in target.parents for dep in deps)


def stages_of(dvc: dict) -> dict[str, dict]:
    """name -> stage body; a foreach stage contributes its `do` template."""
    return {name: (body["do"] if "do" in body else body) for name, body in dvc["stages"].items()}


def listed(stage: dict, kind: str) -> list[str]:
    """The paths of a stage's deps, outs or metrics (an entry with options is a one-key dict)."""
    return [entry if isinstance(entry, str) else next(iter(entry)) for entry in stage.get(kind, [])]


def stage_code(stage: dict) -> set[str]:
    """stage_modules of its cmd, and for a stage that builds the bento (bento/service.py among its deps)
    what the service imports: the bento carries that code."""
    modules = stage_modules(stage["cmd"])
    deps = listed(stage, "deps")
    if "bento/service.py" in deps:
        service = ast.parse((ROOT / "bento" / "service.py").read_text())
        modules |= {m for m in closure(imported_modules(service, "bento.service")) - GLUE
                    if module_file(m).read_text().strip()}
    return modules


def missing_deps(stage: dict) -> list[str]:
    deps = listed(stage, "deps")
    return sorted(str(module_file(m).relative_to(ROOT)) for m in stage_code(stage) if not covers(deps, m))


def tune_overrides() -> set[str]:
    """The run settings a tuning study sets itself whatever the pipeline (the stage is shared by all)."""
    from pap_severity.tuning import space

    cfg = Config()
    return set.intersection(*(set(space.overridden_keys(cfg, p)) for p in cfg.train.pipelines))


def missing_params(name: str, stage: dict) -> list[str]:
    listed = []
    for entry in stage.get("params", []):
        listed.extend(entry if isinstance(entry, list) else [entry] if isinstance(entry, str) else list(entry))
    exempt = tune_overrides() if name == "tune" else set()

    def listed_for(key: str) -> bool:
        section = key.split(".")[0]
        return key in listed or section in listed or key in exempt

    return [key for key in RUN_PARAMS if not listed_for(key)]


@pytest.fixture(scope="module")
def dvc() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def test_every_stage_lists_the_modules_its_command_imports(dvc):
    problems = {name: missing for name, stage in stages_of(dvc).items() if (missing := missing_deps(stage))}
    assert not problems, f"dvc.yaml stages miss code deps: {problems}"


def extra_deps(stage: dict) -> list[str]:
    """Listed source deps that no module of the stage's command lives in: an edit there would rerun
    the stage for nothing. The package's __init__ (the version string) is allowed."""
    files = {module_file(m).relative_to(ROOT) for m in stage_code(stage)}
    deps = listed(stage, "deps")
    return [d for d in deps if d.startswith("src/") and not d.endswith("__init__.py")
            and not any(Path(d) == f or Path(d) in f.parents for f in files)]


def test_no_stage_lists_code_its_command_does_not_import(dvc):
    problems = {name: extra for name, stage in stages_of(dvc).items() if (extra := extra_deps(stage))}
    assert not problems, f"dvc.yaml stages list code deps they do not use: {problems}"


@pytest.mark.parametrize("name", TRAINING_STAGES)
def test_training_stages_list_every_setting_that_defines_a_run(dvc, name):
    assert not missing_params(name, stages_of(dvc)[name]), (
        f"dvc.yaml stage {name} misses params that define a training run: {missing_params(name, stages_of(dvc)[name])}")


def test_the_checks_fail_when_a_listed_dep_or_param_is_removed(dvc):
    original = stages_of(dvc)["train"]
    stage = copy.deepcopy(original)
    assert "src/pap_severity/models.py" in stage["deps"]
    stage["deps"].remove("src/pap_severity/models.py")
    assert set(missing_deps(stage)) - set(missing_deps(original)) == {"src/pap_severity/models.py"}
    stage = copy.deepcopy(original)
    assert "model" in stage["params"]
    stage["params"].remove("model")
    assert set(missing_params("train", stage)) - set(missing_params("train", original)) == {"model"}


def test_the_import_graph_sees_imports_inside_functions():
    # stages.train imports training lazily; training imports models at module level.
    assert {"pap_severity.training", "pap_severity.models"} <= stage_modules("pap-severity train --pipeline combined")


MERGED_STAGES = ("tune", "train", "evaluate", "train_final", "ensemble", "compare", "headline")


def pipeline_paths(stage: dict, names: tuple[str, ...]) -> dict[str, set[str]]:
    """Each path pattern of a stage's deps and outs that names a pipeline ({p} for the name) ->
    the pipelines it is listed for."""
    found: dict[str, set[str]] = {}
    for kind in ("deps", "outs", "metrics"):
        for path in listed(stage, kind):
            parts = Path(path).parts
            for name in names:
                hits = [i for i, part in enumerate(parts) if part == name or part.split(".")[0] == name]
                if hits:
                    i = hits[0]
                    pattern = Path(*parts[:i], parts[i].replace(name, "{p}", 1), *parts[i + 1:]).as_posix()
                    found.setdefault(f"{kind}: {pattern}", set()).add(name)
    return found


@pytest.mark.parametrize("name", MERGED_STAGES)
def test_stages_of_every_pipeline_list_each_pipeline_of_params(dvc, name):
    """A stage that runs every pipeline of train.pipelines in one process lists each one's files:
    were one left out, DVC would not cache or check it; were one extra, `dvc repro` would fail."""
    pipelines = tuple(yaml.safe_load((ROOT / "params.yaml").read_text())["train"]["pipelines"])
    stage = dvc["stages"][name]
    assert "foreach" not in stage
    found = pipeline_paths(stage, PIPELINES)
    assert found, f"{name} lists no file of any pipeline"
    wrong = {pattern: sorted(listed) for pattern, listed in found.items() if listed != set(pipelines)}
    assert not wrong, f"dvc.yaml stage {name} lists these for other pipelines than train.pipelines {pipelines}: {wrong}"


def test_the_pipeline_list_check_sees_a_missing_pipeline(dvc):
    stage = copy.deepcopy(dvc["stages"]["train"])
    stage["outs"].remove("models/corn")
    found = pipeline_paths(stage, PIPELINES)
    assert found["outs: models/{p}"] == set(PIPELINES) - {"corn"}
