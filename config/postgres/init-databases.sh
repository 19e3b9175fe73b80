#!/usr/bin/env bash
# PostgreSQL's first start (/docker-entrypoint-initdb.d/ of the postgres image): one database per store,
# owned by its own login role with its own password (IAM_AUTHN_DB_PASSWORD, IAM_TOKEN_DB_PASSWORD,
# IAM_USERS_DB_PASSWORD), so no role can open another role's store (DESIGN.md §1).
# The role owns its database, so `iam migrate` can create its tables in the public schema (PostgreSQL 15+).
set -euo pipefail

for store in authn token users; do
  password_var="IAM_${store^^}_DB_PASSWORD"
  psql -v ON_ERROR_STOP=1 --no-psqlrc --username "${POSTGRES_USER:-postgres}" --dbname postgres \
       -v name="iam_${store}" -v password="${!password_var:?is not set}" <<'SQL'
CREATE ROLE :"name" LOGIN PASSWORD :'password';
CREATE DATABASE :"name" OWNER :"name";
REVOKE ALL ON DATABASE :"name" FROM PUBLIC;
SQL
done
