-- One server, three databases: Airflow metadata (POSTGRES_DB), the SOFARE warehouse, MLflow's backend store.
-- Run once, on an empty data volume, by docker/postgres-init.sh, which passes the password of the `sofare` role
-- (SOFARE_DB_PASSWORD, default "sofare" for local use) as the psql variable sofare_password.
CREATE USER sofare WITH PASSWORD :'sofare_password';
CREATE DATABASE sofare OWNER sofare;
CREATE DATABASE mlflow OWNER sofare;
