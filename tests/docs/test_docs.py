"""The docs as a new user reads them: every command in a shell block of README.md, CONTRIBUTING.md and docs/*.md is
runnable here (make targets by `make -n`, `sofare` and `sofare airflow` commands by the real argparse parsers,
`mlflow` by its click CLI, DAG confs by the DAG's Params), every endpoint the docs name exists in the service's
OpenAPI document or routes (or the Airflow plugin's), every DAG's Params are the ones the docs list, and every
relative link and #anchor resolves. A command that cannot be run here is on NOT_RUNNABLE_HERE, with the reason and
with what is checked about it instead."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCK = re.compile(r"^```(bash|sh|shell|console)[ \t]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
SEPARATORS = {"&&", "||", ";", "|"}

# Programs whose documented commands cannot be run or parsed on this machine, and why. What can still be checked
# about them is (see check_curl, check_docker).
NOT_RUNNABLE_HERE = {
    "curl": "talks to a running service (make demo); its method and path are checked against the service's OpenAPI "
    "document and routes in test_documented_endpoints_exist",
    "docker": "no container engine on this machine or in CI: `up` cannot run; `config` runs for real through "
    "docker-compose (check_docker), and tests/unit/test_production_runtime.py checks the compose file further",
    "helm": "docs/kubernetes.md is on paper: there is no cluster in CI or on the development machine",
    "kubectl": "docs/kubernetes.md is on paper: there is no cluster in CI or on the development machine",
}


@dataclass(frozen=True)
class Command:
    doc: str  # path relative to the repository root
    line: int
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]  # VAR=value prefixes

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {shlex.join(self.argv)}"


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def shell_commands(path: Path) -> list[Command]:
    """Every command of every shell block: continuation lines joined, comments dropped, `a && b; c | d` split, VAR=x
    prefixes taken apart; in a console block only the `$ ` lines."""
    text = path.read_text()
    found = []
    for block in SHELL_BLOCK.finditer(text):
        lang, body = block.group(1), block.group(2)
        first = _line_of(text, block.start(2))
        logical: list[tuple[int, str]] = []
        pending, start = "", 0
        for number, raw in enumerate(body.splitlines(), first):
            line = raw.rstrip()
            if lang == "console" and not pending:
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            if not pending:
                start = number
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            logical.append((start, pending + line))
            pending = ""
        for number, line in logical:
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
            lexer.whitespace_split = True
            lexer.commenters = "#"
            words: list[str] = []
            for token in [*lexer, ";"]:
                if token not in SEPARATORS:
                    words.append(token)
                    continue
                env = []
                while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
                    name, value = words.pop(0).split("=", 1)
                    env.append((name, value))
                if words:
                    found.append(Command(str(path.relative_to(ROOT)), number, tuple(words), tuple(env)))
                words = []
    return found


COMMANDS = [command for doc in DOCS for command in shell_commands(doc)]


def test_the_docs_have_commands_to_check():
    programs = {c.argv[0] for c in COMMANDS}
    assert {"make", "sofare", "source", "curl"} <= programs, programs
    assert any(c.argv[:2] == ("sofare", "airflow") for c in COMMANDS)


# -- commands ---------------------------------------------------------------------------------------------------------


@cache
def make_dry_run(target: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, check=False, timeout=120)


def check_make(command: Command) -> None:
    targets = [a for a in command.argv[1:] if not a.startswith("-") and "=" not in a]
    assert targets, "name the target"
    for target in targets:
        done = make_dry_run(target)
        assert done.returncode == 0, f"make -n {target}: {done.stderr.strip()[-500:]}"


def _parse_exits(parse: Any, *args: Any) -> int | None:
    """Run an argparse parse; its exit status if it exited (0 for --help), None if it parsed."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            parse(*args)
        except SystemExit as exit_:
            if exit_.code not in (0, None):
                raise AssertionError(f"rejected: {err.getvalue().strip()[-500:]}") from None
            return 0
    return None


def check_sofare(command: Command) -> None:
    from sofare import cli

    args = cli.parse_args(list(command.argv[1:]))  # argparse exits 2 on a bad one (pytest reports it)
    if args.command == "airflow":
        check_airflow(list(args.airflow_args))


@cache
def dag_params(dag_id: str) -> Any:
    """The DAG's ParamsDict, parsed from dags/ the way Airflow parses it."""
    from sofare import runtime
    from sofare.config import load_config

    return runtime.load_dag(load_config(), dag_id).params


def dag_ids() -> set[str]:
    return {p.stem for p in (ROOT / "dags").glob("sofare_*.py")}


def check_airflow(args: list[str]) -> None:
    """The real Airflow CLI parser; a DAG named must exist, a trigger's conf must satisfy that DAG's Params."""
    from airflow.cli.cli_parser import get_parser

    assert args, "sofare airflow needs an Airflow command"
    if "--help" in args or "-h" in args:
        assert _parse_exits(get_parser().parse_args, args) == 0
        return
    assert _parse_exits(get_parser().parse_args, args) is None
    parsed = get_parser().parse_args(args)
    dag_id = getattr(parsed, "dag_id", None)
    if dag_id is not None:
        assert dag_id in dag_ids(), f"no DAG {dag_id!r} in dags/"
    conf = getattr(parsed, "conf", None) or getattr(parsed, "dag_run_conf", None)
    if conf is not None:
        check_conf(dag_id, json.loads(conf))


def check_conf(dag_id: str, conf: dict[str, Any]) -> None:
    params = copy.deepcopy(dag_params(dag_id))
    unknown = set(conf) - set(params.keys())
    assert not unknown, f"{dag_id} has no Params {sorted(unknown)} (it has {sorted(params.keys())})"
    params.update(conf)  # ParamValidationError on a value the DAG's trigger form would refuse
    params.validate()


def check_mlflow(command: Command) -> None:
    from mlflow.cli import cli

    ctx = cli.make_context("mlflow", list(command.argv[1:]))
    protected = getattr(ctx, "_protected_args", None) or ctx.protected_args
    name, sub, rest = cli.resolve_command(ctx, [*protected, *ctx.args])
    assert sub is not None, f"mlflow has no command {name!r}"
    sub.make_context(name, rest, parent=ctx)  # click raises UsageError on a bad option or value


def check_source(command: Command) -> None:
    assert command.argv[1:] == (".venv/bin/activate",), "the one documented way: source .venv/bin/activate"
    assert (ROOT / ".venv" / "bin" / "activate").is_file(), "make setup creates it"


def check_python(command: Command) -> None:
    assert command.argv[1] == "-c" and len(command.argv) == 3, "python -c CODE"
    compile(command.argv[2], f"<{command}>", "exec")


def check_pytest(command: Command) -> None:
    """Paths and node ids exist, -m names registered markers, -k is given an expression (collection is pytest's)."""
    import tomllib

    markers = {
        m.split(":")[0]
        for m in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    }
    argv = list(command.argv[1:])
    while argv:
        arg = argv.pop(0)
        if arg == "-m":
            used = set(re.findall(r"[a-z_]+", argv.pop(0))) - {"and", "or", "not"}
            assert used <= markers, f"unknown markers {used - markers}"
        elif arg == "-k":
            assert argv.pop(0).strip()
        elif not arg.startswith("-"):
            path, _, node = arg.partition("::")
            assert (ROOT / path).exists(), f"no {path}"
            if node:
                assert f"def {node.split('[')[0]}(" in (ROOT / path).read_text(), f"no test {node} in {path}"


def check_pre_commit(command: Command) -> None:
    done = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "pre-commit"), *command.argv[1:], "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-500:]


def check_curl(command: Command) -> None:
    assert any(a.startswith("http://127.0.0.1:") for a in command.argv), "curl the local service"


def check_docker(command: Command) -> None:
    """`docker compose -f FILE config …` runs for real (docker-compose 1.29, scripts/system-deps.sh), with the
    documented environment and, to prove the README's claim, without FRED_API_KEY; `up` and the rest need an engine."""
    argv = list(command.argv)
    assert argv[1] == "compose", "docker compose -f docker-compose.airflow.yml …"
    assert (ROOT / argv[argv.index("-f") + 1]).is_file()
    env = dict(command.env)
    assert "FRED_API_KEY" in env, "the compose file refuses to render without FRED_API_KEY"
    if "config" not in argv:
        return
    compose = shutil.which("docker-compose")
    assert compose, "docker-compose (scripts/system-deps.sh installs it)"
    base = {k: v for k, v in os.environ.items() if k != "FRED_API_KEY"}
    done = subprocess.run(
        [compose, *argv[2:]], cwd=ROOT, env={**base, **env}, capture_output=True, text=True, check=False, timeout=120
    )
    assert done.returncode == 0, done.stderr[-500:]
    without = {k: v for k, v in env.items() if k != "FRED_API_KEY"}
    refused = subprocess.run(
        [compose, *argv[2:]],
        cwd=ROOT,
        env={**base, **without},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert refused.returncode != 0 and "set FRED_API_KEY" in refused.stderr


CHECKS = {
    "make": check_make,
    "sofare": check_sofare,
    "mlflow": check_mlflow,
    "source": check_source,
    "python": check_python,
    "pytest": check_pytest,
    "pre-commit": check_pre_commit,
    "curl": check_curl,
    "docker": check_docker,
    "helm": lambda command: None,  # NOT_RUNNABLE_HERE
    "kubectl": lambda command: None,  # NOT_RUNNABLE_HERE
}


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_documented_command_is_runnable(command: Command):
    program = command.argv[0]
    assert program != "airflow", "write `sofare airflow …`: a bare `airflow` is not on PATH and reads ~/airflow"
    assert not program.startswith(".venv/"), "write the command as it runs with the venv active (README)"
    assert program in CHECKS, f"{program}: add a check here, or a NOT_RUNNABLE_HERE entry saying why it cannot be"
    assert program not in NOT_RUNNABLE_HERE or NOT_RUNNABLE_HERE[program]
    CHECKS[program](command)


def test_make_lint_runs_ruff_and_mypy():
    done = make_dry_run("lint")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert ".venv/bin/ruff check include dags plugins tests benchmarks scripts" in lines
    assert ".venv/bin/ruff format --check include dags plugins tests benchmarks scripts" in lines
    assert ".venv/bin/mypy include/sofare" in lines


# -- DAG Params ---------------------------------------------------------------------------------------------------------

PARAMS_MENTION = re.compile(r"`?\b(sofare_[a-z]+)\b`? \(([^()]*)\)")
PARAM_NAMES = re.compile(r"Params ((?:[a-z_]+)(?:(?:, | and |/)[a-z_]+)*)")


def test_the_params_the_docs_list_are_the_dags_params():
    checked = 0
    for doc in DOCS:
        text = FENCE.sub(lambda m: m.group(0) if m.group(0).startswith("```\n") else "", doc.read_text())
        for mention in PARAMS_MENTION.finditer(text):
            names = PARAM_NAMES.search(" ".join(mention.group(2).split()))
            if names is None or mention.group(1) not in dag_ids():
                continue
            listed = set(re.split(r", | and |/", names.group(1)))
            assert listed == set(dag_params(mention.group(1)).keys()), f"{doc.name}: {mention.group(0)[:120]}"
            checked += 1
    assert checked >= 5


# -- endpoints ----------------------------------------------------------------------------------------------------------

METHOD_PATH = re.compile(r"\b(GET|POST|PUT|PATCH|DELETE)((?:\|(?:GET|POST|PUT|PATCH|DELETE))*) (/[\w./-]*)")
CODE_PATH = re.compile(r"`(/[\w./-]*)`")


def documented_endpoints() -> set[tuple[str | None, str, str]]:
    """(method or None, path, where) of every endpoint the docs name: `GET /x` mentions, `/x` code spans, curl URLs."""
    found: set[tuple[str | None, str, str]] = set()
    for doc in DOCS:
        text = doc.read_text()
        for m in METHOD_PATH.finditer(text):
            for method in (m.group(1), *m.group(2).split("|")[1:]):
                found.add((method, m.group(3), doc.name))
        found.update((None, m.group(1), doc.name) for m in CODE_PATH.finditer(text))
    for command in COMMANDS:
        if command.argv[0] != "curl":
            continue
        argv = list(command.argv)
        url = next(a for a in argv if a.startswith("http://"))
        data = any(a in ("-d", "--data", "--data-binary") for a in argv)
        method = argv[argv.index("-X") + 1] if "-X" in argv else ("POST" if data else "GET")
        found.add((method, urlsplit(url).path or "/", str(command)))
    return found


def plugin_routes() -> list[tuple[str, set[str], bool]]:
    """(path, methods, is a mount) of the Airflow plugin's pages, with its URL prefix."""
    spec = importlib.util.spec_from_file_location("sofare_plugin_for_docs", ROOT / "plugins" / "sofare_plugin.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (mounted,) = module.SofarePlugin.fastapi_apps
    out = []
    for route in mounted["app"].routes:
        methods = set(getattr(route, "methods", None) or {"GET"})
        out.append((mounted["url_prefix"] + route.path, methods, not hasattr(route, "methods")))
    return out


@pytest.fixture(scope="module")
def service(model_home) -> dict[str, Any]:
    """The session's trained model loaded as the service loads it, and its OpenAPI document built as the service
    builds it (a real example window from the warehouse)."""
    from sofare.registry import versions
    from sofare.serving import bento, openapi
    from sofare.serving.predictor import Predictor

    cfg, version = model_home["cfg"], model_home["version"]
    with pytest.MonkeyPatch.context() as mp:
        for key, value in model_home["env"].items():
            mp.setenv(key, value)
        predictor = Predictor.from_directory(cfg, versions.download(cfg, version), version, "stable")
        document = openapi.document(cfg, predictor, bento.example_window(cfg))
    return {"predictor": predictor, "document": document}


@pytest.fixture(scope="module")
def service_routes(service) -> dict[str, set[str]]:
    """path -> methods the service answers: its OpenAPI document, the gateway's other routes, BentoML's probes."""
    from sofare.serving import http

    routes = {path: {m.upper() for m in ops} for path, ops in service["document"]["paths"].items()}
    assert {"/predict", "/predict_batch", "/predict_latest", "/model_info"} <= set(routes)
    gateway = http.Gateway(app=None, resolve=lambda: None, observe=lambda *a: None, metrics=lambda: (b"", ""))
    for path, (methods, _) in gateway.routes().items():
        routes.setdefault(path, set()).update(methods)
    for probe in http.PROBES:
        routes.setdefault(probe, set()).add("GET")
    return routes


@pytest.mark.slow
def test_readme_request_bodies_come_from_the_document_and_are_answered(service, tmp_path):
    """The README's python -c turns the served document (what `curl …/docs.json -o api.json` saves) into
    predict.json and predict_batch.json; the model answers both."""
    from sofare.serving import schemas

    (snippet,) = [c for c in COMMANDS if c.doc == "README.md" and c.argv[0] == "python"]
    (tmp_path / "api.json").write_text(json.dumps(service["document"]))
    done = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "python"), *snippet.argv[1:]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    predictor = service["predictor"]
    window = schemas.decode((tmp_path / "predict.json").read_bytes(), schemas.Window)
    assert 0.0 <= predictor.predict(window)["prob_up"] <= 1.0
    batch = schemas.decode((tmp_path / "predict_batch.json").read_bytes(), schemas.Batch)
    assert len(batch.windows) == 1 and batch.windows[0] == window


@pytest.mark.slow
def test_documented_endpoints_exist(service_routes):
    plugin = plugin_routes()
    problems = []
    for method, path, where in sorted(documented_endpoints(), key=str):
        if path.startswith("/sofare/"):  # the Airflow plugin's pages
            ok = any(
                (path.rstrip("/") == route or (mount and path.startswith(route + "/")))
                and (method is None or method in methods)
                for route, methods, mount in plugin
            )
        else:
            ok = path in service_routes and (method is None or method in service_routes[path])
        if not ok:
            problems.append(f"{where}: {method or 'any method'} {path}")
    assert not problems, "documented but not served:\n" + "\n".join(problems)


@pytest.mark.slow
def test_every_api_endpoint_is_in_the_readme(service_routes):
    readme = (ROOT / "README.md").read_text()
    missing = [
        f"{m} {p}" for p, methods in service_routes.items() for m in sorted(methods) if f"`{m} {p}`" not in readme
    ]
    assert not missing, f"README's endpoint list lacks {missing}"


# -- links --------------------------------------------------------------------------------------------------------------

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def github_anchor(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation dropped except - and _, spaces to -."""
    text = re.sub(r"`|\*\*|\*", "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE):
        slug = github_anchor(heading)
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def test_every_relative_link_and_anchor_resolves():
    checked, broken = 0, []
    for doc in [*DOCS, ROOT / "include" / "sample_data" / "SOURCES.md"]:
        for target in LINK.findall(FENCE.sub("", doc.read_text())):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not fetched (no network)
            path, _, anchor = unquote(target).partition("#")
            resolved = (doc.parent / path).resolve() if path else doc
            checked += 1
            if not resolved.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no {resolved})")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no heading #{anchor} in {resolved.name})")
    assert checked >= 10 and not broken, "\n".join(broken)


def test_anchor_ids_follow_github():
    assert github_anchor("Where do I change X?") == "where-do-i-change-x"
    assert github_anchor("`sofare_train`: the **Params**") == "sofare_train-the-params"
    assert github_anchor("Roll back (the model misbehaves)") == "roll-back-the-model-misbehaves"
