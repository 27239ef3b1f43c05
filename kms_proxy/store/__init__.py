"""Metadata stores behind one interface (``base.Store``): SQLite now, PostgreSQL later."""
