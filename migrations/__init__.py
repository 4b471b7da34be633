"""Alembic migrations; lz4.py is a helper the versions share."""
