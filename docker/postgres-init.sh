#!/usr/bin/env bash
# Creates MaaS's two databases on the first start of the postgres service (the official image runs the
# scripts in /docker-entrypoint-initdb.d only when its data volume is empty):
#   airflow - Airflow's metadata database, owned by role "airflow" (password AIRFLOW_DB_PASSWORD)
#   maas    - the model registry, owned by role "maas" (password REGISTRY_DB_PASSWORD)
# One role per database keeps Airflow and the registry from reading or altering each other's tables.
# Passwords are passed as psql variables and quoted by psql (:'name'), so any character is safe here.
set -euo pipefail

: "${AIRFLOW_DB_PASSWORD:?set AIRFLOW_DB_PASSWORD in .env}"
: "${REGISTRY_DB_PASSWORD:?set REGISTRY_DB_PASSWORD in .env}"

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -v airflow_password="$AIRFLOW_DB_PASSWORD" \
    -v registry_password="$REGISTRY_DB_PASSWORD" <<'SQL'
CREATE ROLE airflow LOGIN PASSWORD :'airflow_password';
CREATE DATABASE airflow OWNER airflow;
CREATE ROLE maas LOGIN PASSWORD :'registry_password';
CREATE DATABASE maas OWNER maas;
SQL
