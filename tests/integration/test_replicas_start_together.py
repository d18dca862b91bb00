"""Replicas starting at the same moment on a new database all come up: each store's tables and
each read model's schema are made once, whoever gets there first (PostgreSQL and SQLite)."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from services.runtime.store import postgres_env, sqlite_env
from tests.support.processes import REPO_ROOT

REPLICAS = 4

OPEN_STORE = "import json, sys; from services.runtime.store import ServiceStore; ServiceStore('together', json.loads(sys.argv[1]))"
OPEN_READ_MODELS = """
import sys
from pathlib import Path
from projections.audit_log import AuditLog
from projections.sql import open_database
from projections.task_board import TaskBoard
TaskBoard(open_database(database_url=sys.argv[1], sqlite_path=Path('unused'), schema='baton_projections'))
AuditLog(open_database(database_url=sys.argv[1], sqlite_path=Path('unused'), schema='baton_audit'))
"""


def start_together(code: str, argument: str) -> list[subprocess.CompletedProcess]:
    """`REPLICAS` processes running `code` at once; each one's outcome."""
    running = [subprocess.Popen([sys.executable, "-c", code, argument], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(REPLICAS)]
    return [subprocess.CompletedProcess(p.args, p.wait(60), p.communicate()[0]) for p in running]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_replicas_opening_one_new_store_at_once_all_come_up(backend: str, tmp_path: Path, request: pytest.FixtureRequest):
    env = (sqlite_env(tmp_path / "together.sqlite") if backend == "sqlite" else
           postgres_env(request.getfixturevalue("postgres_url"), schema=f"baton_together_{secrets.token_hex(4)}"))
    for done in start_together(OPEN_STORE, json.dumps(env)):
        assert done.returncode == 0, done.stdout


def test_replicas_opening_the_read_models_of_a_new_database_at_once_all_come_up(postgres_url: str):
    for done in start_together(OPEN_READ_MODELS, postgres_url):
        assert done.returncode == 0, done.stdout
