"""The project's habits as files: the CI workflow runs what .ci/run runs (every tier) and `make lint`, on Python 3.11
with a venv cached on the lock; the pre-commit hooks run the checks `make lint` runs, with the venv's tools; the
LICENSE is the Apache License 2.0 that pyproject.toml declares. (No runner here: the workflow is checked as data.)"""

from __future__ import annotations

import os
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"


@pytest.fixture(scope="module")
def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def _runs(job: dict) -> list[list[str]]:
    return [shlex.split(line) for step in job["steps"] if "run" in step for line in step["run"].splitlines() if line]


def test_ci_runs_every_tier_as_ci_run_does_and_lint(workflow):
    jobs = workflow["jobs"]
    assert [".ci/run"] in _runs(jobs["test"]), "the test job runs .ci/run"
    assert "make test" in (ROOT / ".ci" / "run").read_text().splitlines()
    assert ["make", "lint"] in _runs(jobs["lint"])
    assert {"push", "pull_request"} <= set(workflow[True])  # PyYAML reads the key `on` as True


def test_every_ci_step_runs_a_real_script_or_make_target(workflow):
    for name, job in workflow["jobs"].items():
        for argv in _runs(job):
            if argv[0] == "make":
                for target in argv[1:]:
                    done = subprocess.run(
                        ["make", "-n", target], cwd=ROOT, capture_output=True, text=True, check=False, timeout=120
                    )
                    assert done.returncode == 0, f"{name}: make -n {target}: {done.stderr[-300:]}"
            else:
                script = ROOT / argv[0]
                assert script.is_file() and os.access(script, os.X_OK), f"{name}: {argv[0]} is not an executable script"


def test_ci_uses_python_3_11_the_system_packages_and_a_venv_cached_on_the_lock(workflow):
    for name, job in workflow["jobs"].items():
        assert job["container"].startswith("python:3.11-"), f"{name}: Python 3.11, as pyproject requires"
        (cache,) = [s for s in job["steps"] if s.get("uses", "").startswith("actions/cache@")]
        assert cache["with"]["path"] == ".venv"
        assert "hashFiles('requirements.txt'" in cache["with"]["key"]
        uses = [s["uses"] for s in job["steps"] if "uses" in s]
        assert all("@v" in u for u in uses), "actions pinned to a major version"
    assert ["scripts/system-deps.sh"] in _runs(workflow["jobs"]["test"])
    assert 'requires-python = ">=3.11,<3.12"' in (ROOT / "pyproject.toml").read_text()


def test_pre_commit_hooks_run_what_make_lint_runs_with_the_venv_tools():
    config = ROOT / ".pre-commit-config.yaml"
    done = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "pre-commit"), "validate-config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    hooks = {h["id"]: h for repo in yaml.safe_load(config.read_text())["repos"] for h in repo["hooks"]}
    assert set(hooks) == {"ruff-check", "ruff-format", "mypy"}
    for hook in hooks.values():
        tool = ROOT / shlex.split(hook["entry"])[0]
        assert hook["language"] == "system" and tool.is_file() and os.access(tool, os.X_OK), hook
    lint = subprocess.run(["make", "-n", "lint"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert f"{hooks['mypy']['entry']}\n" in lint and hooks["mypy"]["pass_filenames"] is False
    assert shlex.split(hooks["ruff-check"]["entry"])[:2] == [".venv/bin/ruff", "check"]
    assert shlex.split(hooks["ruff-format"]["entry"])[:2] == [".venv/bin/ruff", "format"]
    everything = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    checks = [line for line in lint.splitlines() if line.startswith((".venv/bin/ruff", ".venv/bin/mypy"))]
    assert len(checks) == 3 and all(line in everything.splitlines() for line in checks), "make test runs make lint"
    assert everything.index(checks[-1]) < everything.index(".venv/bin/pytest"), "lint first"


def test_license_is_the_apache_2_0_text_pyproject_declares():
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX: How to apply the Apache License to your work." in text
    sections = [f"{n}. {title}" for n, title in enumerate(["Definitions", "Grant of Copyright License"], 1)]
    assert all(s in text for s in sections) and "9. Accepting Warranty or Additional Liability." in text
    debian = Path("/usr/share/common-licenses/Apache-2.0")
    if debian.exists():  # Debian ships the canonical text: the same words
        assert text.split() == debian.read_text().split()
