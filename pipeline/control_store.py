"""The control plane's state in PostgreSQL (sql/004_control_plane.sql); IO only.

Every function takes a connection inside the caller's transaction: the DatabaseAgent runs
them as work in its ingest transaction (``DatabaseAgent.in_ingest_transaction``), so a
decision, its effect and its ``control_log`` row commit together, or not at all.
docs/control-plane.md describes the protocol.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec
from asyncpg import Connection

from pipeline import db, sql_names
from pipeline.catalog import Catalog, StreamSpec
from pipeline.catalog import load as load_catalog
from pipeline.control import Assign, BatchLimits, ControlError, GroupState


@dataclass(frozen=True)
class Decision:
    """How the group decided one control record (from ``control_log``): a rejection's reason
    code (``control.Reason``) and what it says, "" both when applied."""

    command_id: str | None
    seq: int | None
    kind: str
    outcome: str  # "applied" or "rejected"
    code: str = ""
    detail: str = ""

    @property
    def reason(self) -> str:
        """The reason as ``control_log`` stores it: "code: detail" ("" when applied)."""
        return f"{self.code}: {self.detail}" if self.code else ""


def _decision(row: Any) -> Decision:
    code, _, detail = row["reason"].partition(": ")
    return Decision(row["command_id"], row["seq"], row["kind"], row["outcome"], code, detail)


_limits_decoder = msgspec.json.Decoder(BatchLimits)


def _state(row: Any) -> GroupState:
    if row is None:
        return GroupState()
    streams = row["active_streams"]
    return GroupState(
        next_offset=row["next_offset"],
        applied_seq=row["applied_seq"],
        assignment_version=row["assignment_version"],
        active_streams=None if streams is None else tuple(streams),
        limits=_limits_decoder.decode(row["limits"]),
    )


_STATE_COLUMNS = (
    "next_offset, applied_seq, assignment_version, active_streams, batch_limits::text AS limits"
)


async def load_state(conn: Connection, group: str) -> GroupState:
    """The group's state as committed (no lock)."""
    row = await conn.fetchrow(
        f"SELECT {_STATE_COLUMNS} FROM control_state WHERE group_id = $1", group
    )
    return _state(row)


async def lock_state(conn: Connection, group: str) -> GroupState:
    """The group's state, locked until the transaction ends: one decision at a time."""
    await conn.execute(
        "INSERT INTO control_state (group_id) VALUES ($1) ON CONFLICT DO NOTHING", group
    )
    row = await conn.fetchrow(
        f"SELECT {_STATE_COLUMNS} FROM control_state WHERE group_id = $1 FOR UPDATE",
        group,
    )
    return _state(row)


async def save_state(conn: Connection, group: str, state: GroupState) -> None:
    await conn.execute(
        """UPDATE control_state SET next_offset = $2, applied_seq = $3, assignment_version = $4,
               active_streams = $5, batch_limits = $6::text::jsonb, updated_at = now()
           WHERE group_id = $1""",
        group,
        state.next_offset,
        state.applied_seq,
        state.assignment_version,
        None if state.active_streams is None else list(state.active_streams),
        msgspec.json.encode(state.limits).decode(),
    )


async def decisions_from(
    conn: Connection, group: str, first: int, last: int
) -> dict[int, Decision]:
    """How the group decided the control records at offsets ``first`` to ``last`` (those
    that were for it), in one query: a run of records is followed at once. One offset:
    ``first == last``."""
    rows = await conn.fetch(
        """SELECT src_offset, command_id::text, seq, kind, outcome, reason FROM control_log
           WHERE direction = 'command' AND target = $1 AND src_offset BETWEEN $2 AND $3""",
        group,
        first,
        last,
    )
    return {r["src_offset"]: _decision(r) for r in rows}


async def record_rejections(
    conn: Connection, *, group: str, instance_id: str, rejected: list[tuple[int, Decision]]
) -> None:
    """The group's decisions on a run of rejected records (offset, decision), in one
    statement: a flood of garbage costs one round trip per fetched run, not one per record."""
    if not rejected:
        return
    await conn.execute(
        """INSERT INTO control_log (direction, command_id, seq, kind, target, instance_id,
               outcome, reason, src_offset)
           SELECT 'command', r.command_id::uuid, r.seq, r.kind, $1, $2, 'rejected', r.reason,
               r.src_offset
           FROM unnest($3::text[], $4::bigint[], $5::text[], $6::text[], $7::bigint[])
               AS r(command_id, seq, kind, reason, src_offset)""",
        group,
        instance_id,
        [d.command_id for _, d in rejected],
        [d.seq for _, d in rejected],
        [d.kind for _, d in rejected],
        [d.reason for _, d in rejected],
        [offset for offset, _ in rejected],
    )


async def record_acks(
    conn: Connection, *, group: str, instance_id: str, decisions: list[Decision]
) -> None:
    """The instance's acknowledgements of ``decisions`` (rows of direction ``status``, next
    to the group's decisions), in one statement."""
    if not decisions:
        return
    await conn.execute(
        """INSERT INTO control_log (direction, command_id, seq, kind, target, instance_id,
               outcome, reason)
           SELECT 'status', r.command_id::uuid, r.seq, r.kind, $1, $2, r.outcome, r.reason
           FROM unnest($3::text[], $4::bigint[], $5::text[], $6::text[], $7::text[])
               AS r(command_id, seq, kind, outcome, reason)""",
        group,
        instance_id,
        [d.command_id for d in decisions],
        [d.seq for d in decisions],
        [d.kind for d in decisions],
        [d.outcome for d in decisions],
        [d.reason for d in decisions],
    )


async def record_decision(
    conn: Connection,
    *,
    group: str,
    offset: int,
    decision: Decision,
    instance_id: str,
    issuer: str = "",
    version: int | None = None,
    body: bytes = b"{}",
    issued_at: datetime | None = None,
) -> None:
    await conn.execute(
        """INSERT INTO control_log (direction, command_id, seq, kind, target, issuer,
               instance_id, version, outcome, reason, body, issued_at, src_offset)
           VALUES ('command', $1::text::uuid, $2, $3, $4, $5, $6, $7, $8, $9, $10::text::jsonb,
               $11, $12)""",
        decision.command_id,
        decision.seq,
        decision.kind,
        group,
        issuer,
        instance_id,
        version,
        decision.outcome,
        decision.reason,
        body.decode(),
        issued_at,
        offset,
    )


# -- assignments ------------------------------------------------------------------------------


async def record_assignment(conn: Connection, group: str, assign: Assign, command_id: str) -> None:
    """Append an assignment to the group's history."""
    await conn.execute(
        """INSERT INTO assignments (group_id, version, streams, batch_limits, command_id)
           VALUES ($1, $2, $3, $4::text::jsonb, $5::text::uuid)""",
        group,
        assign.version,
        list(assign.streams),
        msgspec.json.encode(assign.limits).decode(),
        command_id,
    )


async def assignment(
    conn: Connection, group: str, version: int
) -> tuple[tuple[str, ...], BatchLimits] | None:
    row = await conn.fetchrow(
        "SELECT streams, batch_limits::text AS limits FROM assignments "
        "WHERE group_id = $1 AND version = $2",
        group,
        version,
    )
    if row is None:
        return None
    return tuple(row["streams"]), _limits_decoder.decode(row["limits"])


# -- checkpoints --------------------------------------------------------------------------------


async def take_checkpoint(conn: Connection, group: str, name: str, command_id: str) -> bool:
    """Record the group's stored offsets under ``name``; False if the name is taken.

    One statement reads every partition's ``ingest_offsets`` row: a snapshot of committed
    batches only, so the cut is consistent (each partition at a batch boundary)."""
    created = await conn.fetchval(
        """INSERT INTO checkpoints (group_id, name, command_id) VALUES ($1, $2, $3::text::uuid)
           ON CONFLICT DO NOTHING RETURNING true""",
        group,
        name,
        command_id,
    )
    if not created:
        return False
    await conn.execute(
        """INSERT INTO checkpoint_offsets (group_id, name, topic, partition, next_offset)
           SELECT group_id, $2, topic, partition, next_offset FROM ingest_offsets
           WHERE group_id = $1""",
        group,
        name,
    )
    return True


async def checkpoint_offsets(
    conn: Connection, group: str, name: str
) -> dict[tuple[str, int], int] | None:
    """A checkpoint's offsets; None when there is no checkpoint of that name."""
    exists = await conn.fetchval(
        "SELECT true FROM checkpoints WHERE group_id = $1 AND name = $2", group, name
    )
    if not exists:
        return None
    rows = await conn.fetch(
        "SELECT topic, partition, next_offset FROM checkpoint_offsets "
        "WHERE group_id = $1 AND name = $2",
        group,
        name,
    )
    return {(r["topic"], r["partition"]): r["next_offset"] for r in rows}


@dataclass(frozen=True)
class RolledBack:
    """What a data rollback did: rows deleted per table, dead letters deleted, and the
    topics whose stored offsets moved back."""

    rows: dict[str, int]
    dead_letters: int
    topics: tuple[str, ...]


class RollbackRefused(ControlError):
    """A data rollback that cannot restore a stream's tables: refused before anything
    changes (the command is rejected as ``apply_failed``)."""


def unrestorable(specs: Iterable[StreamSpec]) -> list[str]:
    """Why a rollback cannot restore each of these streams, one line each; pure.

    A "latest" table without a history keeps no earlier rows to go back to. A history
    stream whose tombstones delete cannot be rebuilt from its history either: tombstones
    are not history rows, so a key deleted before the checkpoint would come back, and one
    deleted after it would stay deleted."""
    reasons = []
    for spec in specs:
        if spec.mode == "latest":
            reasons.append(
                f'stream {spec.name!r} ({spec.table}) is a "latest" table without history: '
                "its rows before the checkpoint are not kept anywhere"
            )
        elif spec.mode == "history" and spec.tombstones == "delete":
            reasons.append(
                f"stream {spec.name!r} ({spec.table}) deletes on tombstones, which its "
                "history does not record: its latest table cannot be rebuilt from it"
            )
    return reasons


async def roll_back_data(
    conn: Connection,
    group: str,
    checkpoint: Mapping[tuple[str, int], int],
    stream_topics: Mapping[str, str],
    catalog: Catalog | None = None,
) -> RolledBack:
    """Put the group's data back to ``checkpoint``, in the caller's transaction.

    1. Lock the group's ``ingest_offsets`` rows: batches of other instances wait, then miss
       their compare-and-set (the fence) and re-read from the checkpoint.
    2. Per stream (``stream_topics``: stream name -> deployed topic, specs from ``catalog``,
       by default the built-in one), delete the rows ingested at or after the checkpoint's
       offset of their partition (a partition the checkpoint did not know: all of them).
       "Latest" tables are rebuilt, for the keys that lost history rows, from the history
       that remains.
    3. Delete the group's dead letters at or after the checkpoint.
    4. Move ``ingest_offsets`` back to the checkpoint.

    A stream that moved past the checkpoint and cannot be restored (:func:`unrestorable`)
    makes it a :class:`RollbackRefused` naming it, before anything is changed. The data
    tables do not record their group: each belongs to one group and topic
    (``table_owners``), and a table another group owns makes the rollback an
    :class:`~pipeline.errors.OwnershipError`, before anything is deleted.
    """
    if catalog is None:
        catalog = load_catalog()
    stored = {
        (r["topic"], r["partition"]): r["next_offset"]
        for r in await conn.fetch(
            "SELECT topic, partition, next_offset FROM ingest_offsets WHERE group_id = $1 "
            "FOR UPDATE",
            group,
        )
    }
    back = {tp: checkpoint.get(tp, 0) for tp in stored}
    moved = sorted({tp[0] for tp, offset in back.items() if stored[tp] > offset})
    refused = unrestorable(catalog[s] for s, t in stream_topics.items() if t in moved)
    if refused:
        raise RollbackRefused(
            "the rollback would not restore every table, so nothing was changed: "
            + "; ".join(refused)
        )
    # Only the group's own tables: another group's rows would share partitions and offsets.
    await db.claim_tables(
        conn,
        group,
        db.stream_tables(catalog, {s: t for s, t in stream_topics.items() if t in moved}),
    )
    deleted: dict[str, int] = {}
    for stream, topic in stream_topics.items():
        cut = [(p, offset) for (t, p), offset in back.items() if t == topic and t in moved]
        if not cut:
            continue
        deleted.update(await _delete_after(conn, catalog[stream], cut))
    triples = [(t, p, o) for (t, p), o in back.items() if t in moved]
    letters = await conn.execute(
        """DELETE FROM dead_letters d
           USING unnest($2::text[], $3::int[], $4::bigint[]) AS c(t, p, o)
           WHERE d.group_id = $1 AND d.src_topic = c.t AND d.src_partition = c.p
             AND d.src_offset >= c.o""",
        group,
        [t for t, _, _ in triples],
        [p for _, p, _ in triples],
        [o for _, _, o in triples],
    )
    await conn.execute(
        """UPDATE ingest_offsets AS i SET next_offset = c.o, updated_at = now()
           FROM unnest($2::text[], $3::int[], $4::bigint[]) AS c(t, p, o)
           WHERE i.group_id = $1 AND i.topic = c.t AND i.partition = c.p""",
        group,
        [t for t, _, _ in triples],
        [p for _, p, _ in triples],
        [o for _, _, o in triples],
    )
    return RolledBack(deleted, db.row_count(letters), tuple(moved))


_CUT = "cut AS (SELECT * FROM unnest($1::int[], $2::bigint[]) AS c(p, o))"
_AFTER_CUT = (
    'EXISTS (SELECT 1 FROM cut WHERE {t}."src_partition" = cut.p AND {t}."src_offset" >= cut.o)'
)


def restore_statement(spec: StreamSpec) -> str:
    """SQL that deletes a stream's rows from the cut on (``$1`` partitions, ``$2`` their
    first offsets to delete) and returns how many per-record rows went; pure.

    An append table loses its rows by source. A history table loses its rows by source, and
    its latest table follows: each key that lost history rows gets back its latest row of
    those left (the highest version; without a version, the highest offset), or none. All
    parts of the statement read the snapshot before the delete, hence ``kept`` leaves the
    deleted rows out by the same test rather than by reading the table again."""
    if spec.mode == "append":
        return (
            f"WITH {_CUT}, gone AS (DELETE FROM {sql_names.table(spec.table)} AS t USING cut "
            f'WHERE t."src_partition" = cut.p AND t."src_offset" >= cut.o RETURNING 1) '
            "SELECT count(*) FROM gone"
        )
    if spec.mode != "history" or spec.history_table is None:
        raise RollbackRefused("; ".join(unrestorable([spec])))
    ident = sql_names.ident
    key = sql_names.columns(spec.key)
    same_key = " AND ".join(f"t.{ident(k)} = lost.{ident(k)}" for k in spec.key)
    kept_key = " AND ".join(f"t.{ident(k)} = kept.{ident(k)}" for k in spec.key)
    if spec.version is not None:
        order = f'{key}, {ident(spec.version)} DESC, "src_partition", "src_offset"'
    else:
        order = f'{key}, "src_partition" DESC, "src_offset" DESC'
    cols = sql_names.columns((*spec.tables.table.columns, "ingested_at"))
    h_cols = ", ".join(f"h.{ident(c)}" for c in (*spec.tables.table.columns, "ingested_at"))
    updates = ", ".join(
        f"{ident(c)} = EXCLUDED.{ident(c)}"
        for c in (*spec.tables.table.columns, "ingested_at")
        if c not in spec.key
    )
    latest = sql_names.table(spec.table)
    history = sql_names.table(spec.history_table)
    return (
        f"WITH {_CUT}, "
        f"gone AS (DELETE FROM {history} AS t USING cut "
        f'WHERE t."src_partition" = cut.p AND t."src_offset" >= cut.o '
        f"RETURNING {', '.join(f't.{ident(k)}' for k in spec.key)}), "
        f"lost AS (SELECT DISTINCT {key} FROM gone), "
        f"kept AS (SELECT DISTINCT ON ({key}) {h_cols} FROM {history} AS h "
        f"JOIN lost USING ({key}) WHERE NOT {_AFTER_CUT.format(t='h')} ORDER BY {order}), "
        f"rebuilt AS (INSERT INTO {latest} ({cols}) SELECT {cols} FROM kept "
        f"ON CONFLICT ({key}) DO UPDATE SET {updates}), "
        f"dropped AS (DELETE FROM {latest} AS t USING lost WHERE {same_key} "
        f"AND NOT EXISTS (SELECT 1 FROM kept WHERE {kept_key})) "
        "SELECT count(*) FROM gone"
    )


async def _delete_after(
    conn: Connection, spec: StreamSpec, cut: Iterable[tuple[int, int]]
) -> dict[str, int]:
    partitions, offsets = zip(*cut, strict=True)
    count: int = await conn.fetchval(restore_statement(spec), list(partitions), list(offsets))
    return {spec.row_per_record[0]: count}


async def control_log(conn: Connection, group: str, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` rows of the group's control log, oldest first."""
    rows = await conn.fetch(
        """SELECT * FROM (SELECT id, direction, command_id::text AS command_id, seq, kind,
               instance_id, outcome, reason, src_offset, recorded_at
           FROM control_log WHERE target = $1 ORDER BY id DESC LIMIT $2) AS newest
           ORDER BY id""",
        group,
        limit,
    )
    return [dict(r) for r in rows]
