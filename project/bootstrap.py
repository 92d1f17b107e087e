"""``python -m project.bootstrap``: create the database named by DATABASE_URL if it is missing."""

from __future__ import annotations

import os
import sys

import psycopg2
from psycopg2 import sql

from project.env import env_database


def main() -> int:
    db = env_database("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/workspaces")
    params = {
        "dbname": "postgres",
        "user": db["USER"] or None,
        "password": db["PASSWORD"] or None,
        "host": db["HOST"] or None,
        "port": db["PORT"] or None,
    }
    try:
        conn = psycopg2.connect(**{k: v for k, v in params.items() if v is not None})
    except psycopg2.OperationalError as exc:
        print(f"cannot reach PostgreSQL for DATABASE_URL: {exc}", file=sys.stderr)
        return 1
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", [db["NAME"]])
        if cursor.fetchone() is None:
            cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db["NAME"])))
            print(f"created database {db['NAME']}")
    conn.close()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    sys.exit(main())
