# SOFARE Airflow image: the lock (requirements.txt, which holds the Celery provider, Celery and the Redis client the
# e2e tier also runs), CPU-only torch, plus statsd (Airflow metrics -> statsd-exporter -> Prometheus), installed
# against the lock (-c requirements.txt) so nothing the lock pins moves.
FROM python:3.11-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 AIRFLOW_HOME=/opt/airflow
WORKDIR /opt/sofare
COPY requirements.txt pyproject.toml README.md ./
# torch==2.13.0+cpu (requirements-overrides.txt) comes from the CPU index, not PyPI's CUDA build.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu -r requirements.txt
RUN pip install -c requirements.txt statsd==4.0.1
COPY include ./include
RUN pip install --no-deps -e .
COPY dags ./dags
COPY plugins ./plugins
# /opt/airflow/logs and /opt/sofare/var are named volumes in the compose file: created here, owned by airflow, so that
# Docker initialises each empty volume with this ownership and the unprivileged user can write to it.
RUN useradd --create-home --uid 50000 airflow && mkdir -p /opt/airflow/logs /opt/sofare/var/auth \
    && chown -R airflow /opt/airflow /opt/sofare/var
USER airflow
