"""The house rules, enforced: one package per stage, each importing only the stages before it; the
served bundle free of training code; DAG files light at parse time; no process-global state from
library code."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "include" / "sofare"
STAGES = ("data", "validation", "training", "registry", "serving", "deploy", "monitoring")
FOUNDATIONS = {"config": {"errors"}, "errors": set(), "contracts": {"errors"}}  # module -> foundations it may import
TOP = ("tasks", "orchestration", "runtime", "cli")
ALLOWED = {stage: set(STAGES[: i + 1]) for i, stage in enumerate(STAGES)}
ALLOWED["serving"] = {"data", "serving"}  # serving runs without training code: not training, not the registry
TRAINING_ONLY = ("mlflow", "lightning", "optuna", "optuna_integration", "evidently", "great_expectations")


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _part(path: Path) -> str:
    """The stage, foundation or top-level module a file belongs to."""
    rel = path.relative_to(PACKAGE).with_suffix("")
    return rel.parts[0] if rel.parts[0] != "__init__" else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports, at any depth (function-level imports count too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.lineno, node.module))
            if node.module == "sofare":  # `from sofare import tasks`
                found += [(node.lineno, f"sofare.{alias.name}") for alias in node.names]
    return found


def _violations(path: Path) -> list[str]:
    part = _part(path)
    out = []
    for line, name in _imports(path):
        if not name.startswith("sofare.") or part in TOP or part == "__init__":
            continue
        target = name.split(".")[1]
        where = f"{path.relative_to(ROOT)}:{line} imports {name}"
        if target in TOP:
            out.append(f"{where}: only the top level (tasks, orchestration, runtime, cli) may import it")
        elif part in FOUNDATIONS:
            if target not in FOUNDATIONS[part] and target != part:
                out.append(f"{where}: foundation {part!r} may import only {sorted(FOUNDATIONS[part]) or 'nothing'}")
        elif target in STAGES and target not in ALLOWED[part]:
            out.append(f"{where}: stage {part!r} may import only {sorted(ALLOWED[part])} and the foundations")
    return out


def test_every_stage_is_a_package_that_says_what_it_owns():
    for stage in STAGES[:5]:
        init = PACKAGE / stage / "__init__.py"
        assert init.exists(), f"{stage}/ is not a package"
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "May import" in doc and len(doc) > 120, f"{init} must say what it owns and which stages it may import"


def test_a_stage_imports_only_the_stages_before_it():
    problems = [v for path in _modules() for v in _violations(path)]
    assert problems == [], "\n".join(problems)


def test_the_rule_catches_a_forbidden_import(tmp_path, monkeypatch):
    """The check above is not vacuous: a serving module importing training (even lazily) and a stage
    importing the task layer are both reported."""
    probe = tmp_path / "sofare" / "serving" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("def f():\n    from sofare.training import pipeline\n    from sofare import tasks\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "sofare")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    problems = _violations(probe)
    assert len(problems) == 2 and "sofare.training" in problems[0] and "sofare.tasks" in problems[1]


def test_serving_source_never_names_training_libraries():
    for path in (PACKAGE / "serving").rglob("*.py"):
        named = {name.split(".")[0] for _, name in _imports(path)} & set(TRAINING_ONLY)
        assert not named, f"{path.relative_to(ROOT)} imports {sorted(named)}"


def test_importing_all_of_serving_loads_no_training_library():
    """What a bento imports, checked in a fresh interpreter: no MLflow, Lightning, Optuna, Evidently, GX."""
    code = (
        "import importlib, json, pkgutil, sys, sofare.serving as s\n"
        "for m in pkgutil.walk_packages(s.__path__, 'sofare.serving.'):\n"
        "    importlib.import_module(m.name)\n"
        f"print(json.dumps(sorted(m for m in {list(TRAINING_ONLY)!r} if m in sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_the_bento_service_imports_only_serving():
    service = ROOT / "bentos" / "sofare" / "service.py"
    stages = {name.split(".")[1] for _, name in _imports(service) if name.startswith("sofare.")}
    assert stages <= {"serving", "config", "errors", "contracts"}, stages
    assert "sys.path" not in service.read_text()


@pytest.mark.parametrize("dag", sorted((ROOT / "dags").glob("*.py")), ids=lambda p: p.stem)
def test_dag_files_import_only_light_modules_at_top_level(dag):
    tree = ast.parse(dag.read_text())
    light = ("airflow", "pendulum", "__future__", "sofare.config", "sofare.orchestration", "sofare.validation")
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in top if isinstance(n, ast.ImportFrom) and n.module]
    heavy = [n for n in names if not (n in light or n.startswith(tuple(f"{m}." for m in light)))]
    assert heavy == [], f"{dag.name} imports {heavy} at parse time (import inside the task instead)"


def test_library_code_changes_no_process_global_state():
    offenders = []
    for path in _modules():
        text = path.read_text()
        for needle in ("install_opener(", "setdefaulttimeout(", "os.environ["):
            for number, line in enumerate(text.splitlines(), 1):
                stripped = line.split("#")[0]
                if needle in stripped and (needle != "os.environ[" or "] =" in stripped):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == [], "\n".join(offenders)
