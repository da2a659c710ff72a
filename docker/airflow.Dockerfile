# SOFARE Airflow image: the same lock as the embedded runtime, CPU-only torch, plus what the compose runtime adds:
# the Celery provider (CeleryExecutor, Redis broker) and statsd (Airflow metrics -> statsd-exporter -> Prometheus).
# Those are not in requirements.txt because the embedded runtime does not use them; they are installed against the
# lock (-c requirements.txt), so nothing the lock pins moves.
FROM python:3.11-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 AIRFLOW_HOME=/opt/airflow
WORKDIR /opt/sofare
COPY requirements.txt pyproject.toml README.md ./
# torch==2.13.0 must come from the CPU index (2.13.0+cpu), not PyPI's CUDA build.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu -r requirements.txt
RUN pip install -c requirements.txt apache-airflow-providers-celery==3.26.0 celery==5.7.0 kombu==5.7.0 redis==8.2.0 \
    statsd==4.0.1
COPY include ./include
RUN pip install --no-deps -e .
COPY dags ./dags
COPY plugins ./plugins
# /opt/airflow/logs and /opt/sofare/var are named volumes in the compose file: created here, owned by airflow, so that
# Docker initialises each empty volume with this ownership and the unprivileged user can write to it.
RUN useradd --create-home --uid 50000 airflow && mkdir -p /opt/airflow/logs /opt/sofare/var/auth \
    && chown -R airflow /opt/airflow /opt/sofare/var
USER airflow
