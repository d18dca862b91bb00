"""Opening the read models: PostgreSQL when BATON_DATABASE_URL is set, else SQLite in the data dir."""

from __future__ import annotations

from projections.audit_log import AuditLog
from projections.sql import Database, open_database
from projections.task_board import TaskBoard
from services.runtime.settings import Settings


def _database(settings: Settings, name: str) -> Database:
    return open_database(
        database_url=settings.database_url,
        sqlite_path=settings.path("projections", f"{name}.sqlite"),
        schema=f"baton_{'projections' if name == 'task_board' else 'audit'}",
    )


def open_task_board(settings: Settings) -> TaskBoard:
    return TaskBoard(_database(settings, "task_board"))


def open_audit_log(settings: Settings) -> AuditLog:
    return AuditLog(_database(settings, "audit_log"))
