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


def airflow_environment(cfg: Config) -> dict[str, str]:
    """Airflow settings for the embedded runtime (any already in the environment win)."""
    return {
        "AIRFLOW_HOME": str(cfg.airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(cfg.root / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(cfg.root / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
    }


def use_airflow_environment(cfg: Config) -> None:
    """Point Airflow at var/airflow unless told otherwise; must run before Airflow is imported."""
    for key, value in airflow_environment(cfg).items():
        os.environ.setdefault(key, value)


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
        logfile = cfg.var_dir / "logs" / "airflow-db-migrate.log"
        with logfile.open("w") as out:
            rc = subprocess.run(
                [sys.executable, "-m", "airflow", "db", "migrate"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=os.environ.copy(),
                check=False,
            ).returncode
        if rc != 0:
            raise RuntimeError(f"`airflow db migrate` failed (exit {rc}); see {logfile}")
        done.append(f"Airflow metadata database ready in {os.environ['AIRFLOW_HOME']}")
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
