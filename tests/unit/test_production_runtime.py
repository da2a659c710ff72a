"""docker-compose.airflow.yml cannot run here (no container engine); check everything that can be checked offline:
the file against the Compose Specification's JSON schema (vendored: tests/fixtures/compose-spec.json), the services,
healthchecks, dependencies and published ports the production runtime needs, every SOFARE_* override it sets, the
front door's container config with `nginx -t`, the Prometheus config with `promtool check config`, and the Grafana
dashboard and provisioning against what the project exports and what the compose file mounts."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from sofare.config import load_config

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.airflow.yml"
DOCKER = ROOT / "docker"
NGINX_TEMPLATE = DOCKER / "nginx" / "templates" / "default.conf.template"
SPLIT_SCRIPT = DOCKER / "nginx" / "15-sofare-split.envsh"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

LONG_RUNNING = {
    "postgres",
    "redis",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
    "mlflow",
    "serving-stable",
    "serving-canary",
    "frontdoor",
    "prometheus",
    "grafana",
}
ONE_SHOT = {"airflow-init"}
AIRFLOW = {
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def _mounts(service: dict) -> dict[str, str]:
    """container path -> host path of a service's bind mounts (short syntax), "./" stripped."""
    found = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            found[target] = source[2:]
    return found


# -- the compose file -------------------------------------------------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_spec(compose):
    schema = json.loads((ROOT / "tests" / "fixtures" / "compose-spec.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_compose_config_accepts_the_file_when_a_compose_binary_exists(tmp_path):
    """`docker compose config -q` (the v2 plugin) or Debian's `docker-compose` 1.29, whichever is installed: both
    interpolate and check more than the schema does. scripts/system-deps.sh installs Debian's (the setup path of
    `make test`); nothing is installed by a test, so a machine set up another way skips with the reason."""
    command = None
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True, timeout=20, check=False).returncode == 0
    ):
        command = [docker, "compose"]
    elif shutil.which("docker-compose"):
        command = [shutil.which("docker-compose")]
    if command is None:
        pytest.skip("no `docker compose` plugin and no docker-compose binary: validated against the JSON schema only")
    env = {**os.environ, "FRED_API_KEY": "test-key"}
    done = subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), "config", "-q"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_service_the_runtime_needs_is_there_with_a_healthcheck(services):
    assert LONG_RUNNING | ONE_SHOT <= set(services)
    for name, service in services.items():
        if name in ONE_SHOT:
            assert "healthcheck" not in service and service.get("restart") == "no", name
            continue
        check = service.get("healthcheck")
        assert check and check["test"][0] in ("CMD", "CMD-SHELL") and not check.get("disable"), name
        assert service.get("restart") == "always", name


def test_dependencies_exist_and_wait_on_health_or_completion(services):
    for name, service in services.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions"
        for target, spec in depends.items():
            assert target in services, f"{name} depends on a service that does not exist: {target}"
            expected = "service_completed_successfully" if target in ONE_SHOT else "service_healthy"
            assert spec["condition"] == expected, f"{name} -> {target}"
            assert target in ONE_SHOT or "healthcheck" in services[target], f"{name} waits on {target}'s health"
    for name in AIRFLOW - ONE_SHOT:
        assert services[name]["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"
    assert {"serving-stable", "serving-canary"} <= set(services["frontdoor"]["depends_on"])
    assert "prometheus" in services["grafana"]["depends_on"]
    assert "postgres" in services["mlflow"]["depends_on"]


def test_ports_are_published_on_loopback_only(services):
    published = {}
    for name, service in services.items():
        for port in service.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name} publishes {port!r}"
            published[name] = port.rsplit(":", 1)[1]
    assert published == {
        "airflow-apiserver": "8080",
        "mlflow": "5000",
        "frontdoor": "8000",
        "prometheus": "9090",
        "grafana": "3000",
    }


def test_compose_file_wires_celery_postgres_and_the_warehouse_connection(services):
    worker = services["airflow-worker"]
    env = worker["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://redis:")
    assert env["AIRFLOW_CONN_SOFARE_WAREHOUSE"].startswith("postgresql://sofare:")
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://airflow:")
    assert worker["deploy"]["replicas"] >= 2
    assert "--scale airflow-worker=" in COMPOSE_FILE.read_text()
    dockerfile = (ROOT / worker["build"]["dockerfile"]).read_text()
    assert "-r requirements.txt" in dockerfile, "the image installs the lock"
    lock = (ROOT / "requirements.txt").read_text()
    assert "\napache-airflow-providers-celery==" in lock and "\nredis==" in lock, "CeleryExecutor + Redis in the lock"
    for name in AIRFLOW:
        assert services[name]["image"] == worker["image"] and services[name]["environment"]["FRED_API_KEY"]
    assert "sofare init" in " ".join(services["airflow-init"]["command"])
    postgres = _mounts(services["postgres"])
    init_script = postgres["/docker-entrypoint-initdb.d/10-sofare.sh"]
    assert "/sofare-init/postgres-init.sql" in (ROOT / init_script).read_text()
    sql = (ROOT / postgres["/sofare-init/postgres-init.sql"]).read_text()
    assert "CREATE DATABASE sofare" in sql and "CREATE DATABASE mlflow" in sql and ":'sofare_password'" in sql


def test_secrets_come_from_the_environment_with_documented_defaults():
    text = COMPOSE_FILE.read_text()
    header = text.split("\nx-airflow-common:")[0]
    used = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)[:?}-]", text))  # $${X}: the container's own
    for name in used:
        assert name in header, f"{name} is used but not documented in the header"
    for secret in (
        "POSTGRES_PASSWORD",
        "SOFARE_DB_PASSWORD",
        "AIRFLOW_FERNET_KEY",
        "AIRFLOW_API_SECRET_KEY",
        "AIRFLOW_JWT_SECRET",
        "_AIRFLOW_WWW_USER_PASSWORD",
        "GRAFANA_ADMIN_PASSWORD",
    ):
        assert secret in used
    # no password written into the file except through a ${VAR:-default}
    assert not re.search(r"//\w+:(?!\$\{)\w+@", text), "a connection URL with a literal password"


def test_mlflow_has_a_postgres_backend_an_artifact_volume_and_serves_artifacts(compose, services):
    mlflow = services["mlflow"]
    args = mlflow["command"]
    assert args[:2] == ["mlflow", "server"] and "--serve-artifacts" in args
    backend = next(a for a in args if a.startswith("--backend-store-uri="))
    assert backend.startswith("--backend-store-uri=postgresql") and backend.endswith("@postgres:5432/mlflow")
    destination = next(a for a in args if a.startswith("--artifacts-destination=")).split("=", 1)[1]
    assert any(v.split(":")[0] in compose["volumes"] and v.split(":")[1] == destination for v in mlflow["volumes"])
    assert (ROOT / "docker" / "mlflow" / "Dockerfile").exists()
    assert services["airflow-worker"]["environment"]["SOFARE_MLFLOW__TRACKING_URI"] == "http://mlflow:5000"


def test_serving_variants_run_the_bento_image_with_their_variant(services):
    stable, canary = services["serving-stable"], services["serving-canary"]
    assert stable["environment"]["SOFARE_VARIANT"] == "stable" and canary["environment"]["SOFARE_VARIANT"] == "canary"
    assert (stable["environment"]["BENTOML_PORT"], canary["environment"]["BENTOML_PORT"]) == ("3000", "3001")
    cfg = load_config()
    assert cfg.serving.port == 3000  # the canary takes port + 1, as in the embedded runtime
    for service, port in ((stable, "3000"), (canary, "3001")):
        assert service["environment"]["SOFARE_WAREHOUSE__URL"].startswith("postgresql://sofare:")
        assert service["healthcheck"]["test"][-1] == f"http://localhost:{port}/readyz"
        assert "ports" not in service  # reached through the front door (and by Prometheus) only
    assert "SOFARE_STABLE_IMAGE" in stable["image"] and "SOFARE_CANARY_IMAGE" in canary["image"]


def test_compose_overrides_are_valid_config(services):
    env = {k: str(v) for k, v in services["airflow-worker"]["environment"].items() if k.startswith("SOFARE_")}
    cfg = load_config(env=env)
    assert (cfg.ingest.sources.candles, cfg.ingest.sources.safe_haven, cfg.ingest.sources.macro) == (
        "binance",
        "yfinance",
        "fred",
    )
    assert cfg.mlflow_tracking_uri == "http://mlflow:5000"
    for name in ("serving-stable", "serving-canary"):
        env = {k: str(v) for k, v in services[name]["environment"].items() if k.startswith("SOFARE_")}
        env.pop("SOFARE_VARIANT")  # read by the service itself, not a config key
        assert load_config(env=env).warehouse.url.startswith("postgresql://")


# -- the front door (nginx) -------------------------------------------------------------------------------------------


def _split_lines(weight: str) -> subprocess.CompletedProcess:
    """Source the image's envsh hook the way /docker-entrypoint.sh does, and print what it exported."""
    return subprocess.run(
        ["sh", "-c", f'. "{SPLIT_SCRIPT}" && printf "%s" "$SOFARE_SPLIT_LINES"'],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SOFARE_CANARY_WEIGHT": weight},
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


def _render(weight: str) -> str:
    """The nginx image's 20-envsubst-on-templates.sh with NGINX_ENVSUBST_FILTER=^SOFARE_: only the defined SOFARE_*
    variables are replaced, $name and ${name} alike; nginx's own variables stay as they are."""
    done = _split_lines(weight)
    assert done.returncode == 0, done.stderr
    env = {"SOFARE_CANARY_WEIGHT": weight, "SOFARE_SPLIT_LINES": done.stdout}
    return re.sub(
        r"\$(?:\{(SOFARE_\w+)\}|(SOFARE_\w+))", lambda m: env.get(m[1] or m[2], m[0]), NGINX_TEMPLATE.read_text()
    )


def _nginx_test(conf_d: str, prefix: Path) -> subprocess.CompletedProcess:
    """`nginx -t` of the rendered conf.d file inside a copy of the official image's http block (nginx.conf of
    nginx:1.28, whose directives the file must not repeat), with every path nginx writes under `prefix`.

    Upstream host names: the container names serving-stable / serving-canary do not resolve here and nginx -t
    resolves upstream servers, so the test checks a copy with both names replaced by 127.0.0.1 (the real file keeps
    them: Docker's DNS resolves them when the container starts, after both are healthy)."""
    for sub in ("logs", "tmp"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    local = conf_d.replace("serving-stable:", "127.0.0.1:").replace("serving-canary:", "127.0.0.1:")
    (prefix / "default.conf").write_text(local)
    (prefix / "mime.types").write_text("types { text/html html; application/json json; }\n")
    main = f"""
worker_processes auto;
error_log {prefix}/logs/error.log notice;
pid {prefix}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    include {prefix}/mime.types;
    default_type application/octet-stream;
    log_format main '$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent';
    access_log {prefix}/logs/access.log main;
    sendfile on;
    keepalive_timeout 65;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    include {prefix}/default.conf;
}}
"""
    (prefix / "nginx.conf").write_text(main)
    return subprocess.run(
        [NGINX, "-t", "-p", f"{prefix}/", "-c", str(prefix / "nginx.conf")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_frontdoor_mounts_the_template_and_the_split_hook(services):
    door = services["frontdoor"]
    mounts = _mounts(door)
    assert mounts["/etc/nginx/templates"] == "docker/nginx/templates"
    assert mounts["/docker-entrypoint.d/15-sofare-split.envsh"] == str(SPLIT_SCRIPT.relative_to(ROOT))
    assert (ROOT / mounts["/etc/nginx/templates"] / "default.conf.template").exists()
    assert os.access(SPLIT_SCRIPT, os.X_OK), "the entrypoint only sources executable .envsh files"
    assert door["environment"]["NGINX_ENVSUBST_FILTER"] == "^SOFARE_"
    assert "SOFARE_CANARY_WEIGHT" in door["environment"]
    assert door["healthcheck"]["test"][-1] == "http://localhost:8000/frontdoor/healthz"


@pytest.mark.parametrize(
    ("weight", "lines"),
    [
        ("0", ["*  stable;"]),
        ("0.1", ["10.00%  canary;", "*  stable;"]),
        ("0.00001", ["0.01%  canary;", "*  stable;"]),
        ("0.99999", ["99.99%  canary;", "*  stable;"]),
        ("1", ["*  canary;"]),
    ],
)
def test_split_hook_renders_what_the_embedded_front_door_renders(weight, lines):
    from sofare.deploy.frontdoor import _split_lines as embedded

    done = _split_lines(weight)
    assert done.returncode == 0, done.stderr
    assert [line.strip() for line in done.stdout.splitlines()] == lines == embedded(float(weight))


@pytest.mark.parametrize("weight", ["abc", "1.5", "-0.1", "0.1; evil"])
def test_split_hook_refuses_a_weight_outside_0_to_1(weight):
    done = _split_lines(weight)
    assert done.returncode != 0 and "SOFARE_CANARY_WEIGHT must be a number in [0, 1]" in done.stderr


def test_frontdoor_config_routes_like_the_embedded_front_door():
    text = _render("0.25")
    assert re.search(r"map \$http_x_client_id \$sofare_split_key", text)
    assert 'split_clients "${sofare_split_key}" $sofare_split_variant' in text and "25.00%  canary;" in text
    assert re.search(r"map \$http_x_variant \$sofare_variant \{\s*stable\s+stable;\s*canary\s+canary;", text)
    canary = re.search(r"upstream sofare_canary \{(.*?)\}", text, re.DOTALL)[1]
    assert "serving-canary:3001" in canary and re.search(r"serving-stable:3000 [^;]*\bbackup;", canary)
    assert "proxy_next_upstream error timeout http_502 http_503 non_idempotent;" in text
    assert "add_header X-Served-By $sofare_served_by always;" in text
    assert "canary_weight=0.25" in text and not re.search(r"\$\{?SOFARE_", text)


@pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx is not installed (scripts/system-deps.sh installs it)")
@pytest.mark.parametrize("weight", ["0", "0.1", "1"])
def test_frontdoor_config_passes_nginx_t(weight, tmp_path):
    done = _nginx_test(_render(weight), tmp_path)
    assert done.returncode == 0, done.stderr


# -- Prometheus and Grafana -------------------------------------------------------------------------------------------


def test_prometheus_config_is_mounted_and_scrapes_serving_and_airflow(services):
    assert _mounts(services["prometheus"])["/etc/prometheus/prometheus.yml"] == "docker/prometheus/prometheus.yml"
    config = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    assert {"serving-stable:3000", "serving-canary:3001", "airflow-apiserver:8080", "statsd-exporter:9102"} <= targets
    for target in targets - {"localhost:9090"}:
        host, port = target.split(":")
        assert host in services, target
        exposed = [str(p).split("/")[0] for p in services[host].get("expose", [])]
        assert port in exposed or port in {str(p).rsplit(":", 1)[-1] for p in services[host].get("ports", [])}, target
    assert services["airflow-worker"]["environment"]["AIRFLOW__METRICS__STATSD_HOST"] == "statsd-exporter"


def test_prometheus_config_passes_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (scripts/system-deps.sh installs it): config checked as YAML only")
    done = subprocess.run(
        [promtool, "check", "config", str(DOCKER / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _exported_metric_names() -> str:
    """Every metric name the project defines, as text: the package, the bento's service and the Airflow plugin."""
    files = [
        *(ROOT / "include" / "sofare").rglob("*.py"),
        *(ROOT / "bentos" / "sofare").glob("*.py"),
        *(ROOT / "plugins").glob("*.py"),
    ]
    return "\n".join(path.read_text() for path in files)


def test_grafana_dashboard_queries_metrics_the_project_exports():
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "sofare.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    assert exprs and all(exprs)
    names = {
        re.sub(r"_(bucket|count|sum|total)$", "", name)
        for expr in exprs
        for name in re.findall(r"\b(?:sofare|bentoml)_[a-z0-9_]+", expr)
    }
    assert {"sofare_live_accuracy", "bentoml_service_request", "bentoml_service_request_duration_seconds"} <= names
    source = _exported_metric_names()
    missing = sorted(n for n in names if not re.search(rf"\b{n}(?:_total)?\b", source))
    assert not missing, f"the dashboard queries metrics nothing in the project exports: {missing}"


def test_grafana_provisioning_points_at_the_mounted_dashboards_and_prometheus(services):
    mounts = _mounts(services["grafana"])
    provisioning = ROOT / mounts["/etc/grafana/provisioning"]
    provider = yaml.safe_load((provisioning / "dashboards" / "sofare.yml").read_text())["providers"][0]
    dashboards_dir = provider["options"]["path"]
    assert mounts[dashboards_dir] == "docker/grafana/dashboards"
    assert (ROOT / mounts[dashboards_dir] / "sofare.json").exists()
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090" and "9090" in services["prometheus"]["ports"][0]
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "sofare.json").read_text())
    selector = next(v for v in dashboard["templating"]["list"] if v["name"] == "DS_PROMETHEUS")
    assert selector["current"]["value"] == datasource["uid"]
