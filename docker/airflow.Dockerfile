# SOFARE Airflow image: the same lock as the embedded runtime, CPU-only torch.
FROM python:3.11-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 AIRFLOW_HOME=/opt/airflow
WORKDIR /opt/sofare
COPY requirements.txt pyproject.toml README.md ./
# torch==2.13.0 must come from the CPU index (2.13.0+cpu), not PyPI's CUDA build.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu -r requirements.txt
COPY include ./include
RUN pip install --no-deps -e .
COPY dags ./dags
COPY plugins ./plugins
RUN useradd --create-home --uid 50000 airflow && mkdir -p /opt/airflow /opt/sofare/var \
    && chown -R airflow /opt/airflow /opt/sofare/var
USER airflow
