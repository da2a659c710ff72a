-- One server, three databases: Airflow metadata, the SOFARE warehouse, MLflow's backend store.
CREATE USER sofare WITH PASSWORD 'sofare';
CREATE DATABASE sofare OWNER sofare;
CREATE DATABASE mlflow OWNER sofare;
