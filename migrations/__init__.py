"""Alembic migrations of the SQL store (one revision per schema change); run through core.db.migrate."""
