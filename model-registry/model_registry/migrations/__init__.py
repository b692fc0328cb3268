"""Alembic migrations of the registry's database; `Store.create_schema()` runs them up to head."""
