"""SQL identifiers: the one way a name reaches a statement; pure.

Table, schema and column names come from the streams catalog, a file an operator writes, so
every identifier in every statement is quoted here, and every name derived from another
(staging tables, indexes) stays within PostgreSQL's limit without two colliding
(docs/streams.md, "Names").
"""

from __future__ import annotations

import hashlib

MAX_IDENTIFIER_BYTES = 63  # PostgreSQL's NAMEDATALEN - 1; longer names are truncated silently


def ident(name: str) -> str:
    """One identifier, quoted: ``"name"``."""
    if not name or "\x00" in name:
        raise ValueError(f"not an SQL identifier: {name!r}")
    return '"' + name.replace('"', '""') + '"'


def table(name: str) -> str:
    """A table name as the catalog writes it (``table`` or ``schema.table``), quoted."""
    return ".".join(ident(part) for part in split_table(name))


def split_table(name: str) -> tuple[str, str]:
    """``(schema, table)`` of a catalog table name; the schema is ``public`` when not given."""
    schema, dot, bare = name.rpartition(".")
    return (schema if dot else "public"), bare


def columns(names: tuple[str, ...] | list[str]) -> str:
    """A list of column names, quoted and comma-separated."""
    return ", ".join(map(ident, names))


def derived(*parts: str) -> str:
    """A name made of others (``stage_<table>_<shape>``, ``<table>_source``), joined by ``_``,
    at most 63 bytes. A name that would be longer keeps its start and ends with a hash of the
    whole, so two long names that share a start never collide."""
    name = "_".join(part.replace(".", "_") for part in parts)
    if len(name.encode()) <= MAX_IDENTIFIER_BYTES:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    head = name.encode()[: MAX_IDENTIFIER_BYTES - len(digest) - 1].decode("utf-8", "ignore")
    return f"{head}_{digest}"
