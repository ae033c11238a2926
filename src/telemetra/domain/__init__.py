"""Typed records and errors shared by every layer. No I/O here."""
