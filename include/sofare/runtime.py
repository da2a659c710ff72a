"""The embedded runtime: Airflow home under var/, `sofare init`, and running DAGs in-process.

`sofare init` is idempotent: it creates var/, the warehouse schema, Airflow's metadata database
(SQLite under var/airflow) and the Airflow connection `sofare_warehouse` (only if it is missing,
so a connection an operator pointed at PostgreSQL is never overwritten).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sofare.data import warehouse
from sofare.data.features import feature_spec
from sofare.errors import NotFoundError

if TYPE_CHECKING:
    from sofare.config import Config

log = logging.getLogger(__name__)


class DagRunFailed(RuntimeError):
    """A DAG run ended in a state other than success; the message names the failed tasks."""


EXECUTION_API = "AIRFLOW__CORE__EXECUTION_API_SERVER_URL"


def airflow_environment(cfg: Config) -> dict[str, str]:
    """Airflow settings for the embedded runtime (any already in the environment win)."""
    return {
        "AIRFLOW_HOME": str(cfg.airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(cfg.root / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(cfg.root / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__API__HOST": "127.0.0.1",  # the API server (UI) on loopback only
    }


def use_airflow_environment(cfg: Config) -> None:
    """Point Airflow at var/airflow unless told otherwise; must run before Airflow is imported."""
    for key, value in airflow_environment(cfg).items():
        os.environ.setdefault(key, value)


def airflow_process_environment(cfg: Config, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment an `airflow ...` process of this project runs in: `base` (default: this process's), the
    embedded runtime's settings where `base` has none, and this interpreter's bin directory first on PATH (`airflow
    standalone` starts its components as `airflow ...` subprocesses)."""
    env = dict(os.environ if base is None else base)
    for key, value in airflow_environment(cfg).items():
        env.setdefault(key, value)
    # task processes reach the API server here; Airflow's default is localhost:8080 whatever port the API serves on
    env.setdefault(
        EXECUTION_API, f"http://{env['AIRFLOW__API__HOST']}:{env.get('AIRFLOW__API__PORT', '8080')}/execution/"
    )
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, *(p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir)])
    return env


def airflow_command(args: list[str]) -> list[str]:
    """The argv of `airflow ARGS` run by this interpreter (the venv's Airflow, whatever PATH says)."""
    return [sys.executable, "-m", "airflow", *args]


def airflow_config_file(env: dict[str, str]) -> Path:
    """Where Airflow reads (and on first use writes) its airflow.cfg in `env`."""
    return Path(env.get("AIRFLOW_CONFIG") or Path(env["AIRFLOW_HOME"]) / "airflow.cfg")


def settle_airflow_config(cfg: Config, env: dict[str, str]) -> list[str]:
    """Write the embedded runtime's `AIRFLOW__<SECTION>__<KEY>` settings, as `env` has them, into the airflow.cfg that
    Airflow generated with its own defaults (examples loaded, DAGs from AIRFLOW_HOME/dags, the API on 0.0.0.0), so an
    `airflow` run without this project's environment sees the same Airflow. Comments and every other line stay as
    they are; returns the `section.key` settings it changed."""
    path = airflow_config_file(env)
    wanted: dict[str, dict[str, str]] = {}
    for name in [*airflow_environment(cfg), EXECUTION_API]:
        if name.startswith("AIRFLOW__") and name in env:
            _, section, key = name.lower().split("__", 2)
            wanted.setdefault(section, {})[key] = env[name]
    changed: list[str] = []
    done: set[tuple[str, str]] = set()

    def missing(section: str) -> list[str]:
        keys = [k for k in wanted.get(section, {}) if (section, k) not in done]
        done.update((section, k) for k in keys)
        changed.extend(f"{section}.{k}" for k in keys)
        return [f"{k} = {wanted[section][k]}\n" for k in keys]

    out: list[str] = []
    section = ""
    for line in path.read_text().splitlines(keepends=True):
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            out.extend(missing(section))
            section = stripped[1:-1].strip().lower()
        elif "=" in stripped and not stripped.startswith(("#", ";")):
            key, value = (part.strip() for part in stripped.split("=", 1))
            if key.lower() in wanted.get(section, {}) and (section, key.lower()) not in done:
                done.add((section, key.lower()))
                if value != wanted[section][key.lower()]:
                    changed.append(f"{section}.{key.lower()}")
                    line = f"{key} = {wanted[section][key.lower()]}\n"
        out.append(line)
    out.extend(missing(section))
    for name in wanted:  # a section the file lacks
        if keys := missing(name):
            out.extend([f"\n[{name}]\n", *keys])
    if changed:
        path.write_text("".join(out))
    return changed


def _ensure_connection(conn_id: str, url: str) -> str:
    """Create the Airflow connection if it does not exist; say what happened."""
    from airflow.models import Connection
    from airflow.utils.session import create_session
    from sqlalchemy.engine import make_url

    with create_session() as session:
        if session.query(Connection).filter(Connection.conn_id == conn_id).first() is not None:
            return f"Airflow connection {conn_id!r} exists (left as it is)"
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            conn = Connection(conn_id=conn_id, conn_type="sqlite", host=parsed.database)
        else:
            conn = Connection(conn_id=conn_id, uri=url.replace("postgresql+psycopg2://", "postgresql://", 1))
        conn.description = "SOFARE warehouse (raw data, features, predictions, deployments, audit)"
        session.add(conn)
    return f"Airflow connection {conn_id!r} created -> {make_url(url).render_as_string(hide_password=True)}"


def init(cfg: Config, rebuild_features: bool = False, airflow: bool = True) -> list[str]:
    """Create var/, the warehouse schema, Airflow's metadata DB and connection. Idempotent."""
    done = []
    for directory in (cfg.var_dir, cfg.var_dir / "logs", cfg.airflow_home):
        directory.mkdir(parents=True, exist_ok=True)
    engine = warehouse.get_engine(cfg)
    warehouse.init_schema(engine, feature_spec(cfg).columns, rebuild_features=rebuild_features)
    done.append(f"warehouse schema ready at {warehouse.describe(engine)} (feature set {feature_spec(cfg).version})")
    if airflow:
        use_airflow_environment(cfg)
        env = airflow_process_environment(cfg)
        logfile = cfg.var_dir / "logs" / "airflow-db-migrate.log"
        with logfile.open("w") as out:
            rc = subprocess.run(
                airflow_command(["db", "migrate"]), stdout=out, stderr=subprocess.STDOUT, env=env, check=False
            ).returncode
        if rc != 0:
            raise RuntimeError(f"`airflow db migrate` failed (exit {rc}); see {logfile}")
        done.append(f"Airflow metadata database ready in {env['AIRFLOW_HOME']}")
        settled = settle_airflow_config(cfg, env)
        if settled:
            done.append(f"{airflow_config_file(env)}: {', '.join(settled)} set as `sofare airflow` runs it")
        done.append(_ensure_connection(cfg.warehouse.conn_id, warehouse.warehouse_url(cfg)))
    return done


def load_dag(cfg: Config, dag_id: str) -> Any:
    """The DAG defined in dags/<dag_id>.py, parsed the way Airflow parses it (import errors raised)."""
    from airflow.dag_processing.dagbag import DagBag

    path = cfg.root / "dags" / f"{dag_id}.py"
    if not path.exists():
        raise FileNotFoundError(f"no DAG file {path}")
    bag = DagBag(dag_folder=str(path))
    if bag.import_errors:
        raise RuntimeError(f"{path} does not import: {next(iter(bag.import_errors.values()))}")
    dag = bag.dags.get(dag_id)
    if dag is None:
        raise NotFoundError(f"{path} defines no DAG {dag_id!r}")
    return dag


@contextlib.contextmanager
def _output_to(logfile: Path) -> Iterator[None]:
    """Send this process's stdout/stderr (Airflow's task logs) to a file for the duration."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with logfile.open("a") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def run_dag(
    cfg: Config,
    dag_id: str,
    conf: dict[str, Any] | None = None,
    logical_date: datetime | None = None,
    logfile: Path | None = None,
) -> Any:
    """Run one DAG run in-process with `dag.test()`; raise DagRunFailed unless it succeeded."""
    use_airflow_environment(cfg)
    kwargs: dict[str, Any] = {"run_conf": conf or {}}
    if logical_date is not None:
        kwargs["logical_date"] = logical_date
    with _output_to(logfile) if logfile else contextlib.nullcontext():
        run = load_dag(cfg, dag_id).test(**kwargs)
    if run is None or str(run.state) != "success":
        failed = _failed_tasks(run)
        where = f"; task logs in {logfile}" if logfile else ""
        raise DagRunFailed(
            f"{dag_id} run ended {getattr(run, 'state', 'without a run')}; failed tasks: {failed or 'none'}{where}"
        )
    return run


def _failed_tasks(run: Any) -> list[str]:
    if run is None:
        return []
    from airflow.utils.session import create_session

    with create_session() as session:
        return sorted(
            f"{ti.task_id}[{ti.map_index}]" if ti.map_index >= 0 else ti.task_id
            for ti in run.get_task_instances(session=session)
            if str(ti.state) == "failed"
        )
