"""`pipeline control`: Antigravity's command line. Signed commands sent to a DatabaseAgent
group and their acknowledgements, the fleet as its heartbeats report it, the control log;
and the lines they print (docs/control-plane.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from pipeline.commands._common import (
    FAILED,
    OK,
    Subparsers,
    check_streams,
    group_options,
    load_config,
    load_kafka_config,
    positive,
    stream_list,
    verifier,
)
from pipeline.errors import ConfigError, PipelineError
from pipeline.terminal import printable

if TYPE_CHECKING:
    from pipeline.config import Config

_T = TypeVar("_T")


def register(commands: Subparsers) -> None:
    control = commands.add_parser(
        "control",
        help="Antigravity: steer a DatabaseAgent group through the signed control topic",
        description="Send signed commands to every DatabaseAgent of a group and wait for their "
        "acknowledgements, or show the fleet and the control log. Sending needs the private "
        "key (PIPELINE_CONTROL_PRIVATE_KEY_FILE); agents verify with the public keys in "
        "PIPELINE_CONTROL_PUBLIC_KEYS. Exit status 1 when an instance rejects the command or "
        "does not answer in time.",
    )
    actions = control.add_subparsers(required=True, metavar="ACTION")
    keygen_parser = actions.add_parser(
        "keygen", help="write DIR/antigravity.key (mode 0600) and DIR/antigravity.pub"
    )
    keygen_parser.add_argument("dir", type=Path, metavar="DIR")
    keygen_parser.set_defaults(handler=keygen)

    def sender(name: str, help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(name, help=help_text)
        group_options(parser)
        parser.add_argument(
            "--wait",
            type=positive(float),
            default=30.0,
            metavar="SECONDS",
            help="how long to wait for the live instances' acks (30)",
        )
        parser.set_defaults(handler=send, action=name)
        return parser

    for name, verb in (("activate", "start"), ("deactivate", "pause")):
        sender(name, f"{verb} ingesting streams on every instance").add_argument(
            "--streams", required=True, type=stream_list, help="comma list, e.g. events,metrics"
        )
    assign = sender("assign", "a new assignment version: the active streams and batch limits")
    assign.add_argument("--file", type=Path, help="a TOML file with any of the flags below")
    assign.add_argument("--version", type=positive(int), help="above the current one")
    assign.add_argument("--streams", type=stream_list, help="comma list of active streams")
    for limit in ("batch-max-records", "batch-max-bytes", "batch-max-wait-ms"):
        assign.add_argument(f"--{limit}", type=positive(int), help="(the agents' setting)")
    checkpoint = sender("checkpoint", "record the group's stored offsets under NAME")
    checkpoint.add_argument("name", metavar="NAME")
    rollback = sender("rollback", "re-apply an assignment, or roll the data back")
    target = rollback.add_mutually_exclusive_group(required=True)
    target.add_argument("--to-version", type=positive(int), metavar="N")
    target.add_argument("--to-checkpoint", metavar="NAME")
    rollback.add_argument(
        "--then",
        choices=["reingest", "hold"],
        default="reingest",
        help="after a data rollback: ingest again from the checkpoint, or hold the streams "
        "rolled back until activated (reingest)",
    )
    status_parser = actions.add_parser("status", help="the group's live instances and their state")
    group_options(status_parser)
    status_parser.add_argument("--json", action="store_true", help="machine-readable output")
    status_parser.set_defaults(handler=status)
    log_parser = actions.add_parser("log", help="the group's control log (from PostgreSQL)")
    group_options(log_parser)
    log_parser.add_argument("--limit", type=positive(int), default=50, help="rows (50)")
    log_parser.set_defaults(handler=log)


def keygen(args: argparse.Namespace) -> int:
    from pipeline import control

    args.dir.mkdir(parents=True, exist_ok=True)
    private, public = args.dir / "antigravity.key", args.dir / "antigravity.pub"
    for path in (private, public):
        if path.exists():
            raise ConfigError(f"{path} exists: keygen never overwrites a key")
    key, public_key = control.generate_key_pair()
    control.write_private_key_file(private, key)
    control.write_public_key_file(public, public_key)
    print(f"private key: {private} (mode 0600; for PIPELINE_CONTROL_PRIVATE_KEY_FILE)")
    print(f"public key:  {public} (for the agents' PIPELINE_CONTROL_PUBLIC_KEYS)")
    print(f"key id:      {control.key_id(public_key)}")
    return OK


def _command(args: argparse.Namespace) -> Any:
    """The command the arguments of ``pipeline control ACTION`` describe."""
    from pipeline import control

    match args.action:
        case "activate":
            return control.Activate(streams=args.streams)
        case "deactivate":
            return control.Deactivate(streams=args.streams)
        case "checkpoint":
            return control.Checkpoint(name=args.name)
        case "rollback" if args.to_version is not None:
            return control.RollbackVersion(to_version=args.to_version)
        case "rollback":
            return control.RollbackCheckpoint(to_checkpoint=args.to_checkpoint, then=args.then)
    settings: dict[str, Any] = {}
    if args.file is not None:
        try:
            settings = msgspec.toml.decode(args.file.read_bytes())
        except (OSError, msgspec.DecodeError) as exc:
            raise ConfigError(f"--file {args.file}: {exc}") from None
    flags = {
        "version": args.version,
        "streams": args.streams,
        "batch_max_records": args.batch_max_records,
        "batch_max_bytes": args.batch_max_bytes,
        "batch_max_wait_ms": args.batch_max_wait_ms,
    }
    settings.update({k: v for k, v in flags.items() if v is not None})
    limits = {k: settings.pop(k) for k in list(settings) if k.startswith("batch_")}
    try:
        return msgspec.convert({**settings, "limits": limits}, control.Assign)
    except (msgspec.ValidationError, ValueError) as exc:
        raise ConfigError(f"assign: {exc} (give --version and --streams)") from None


def _antigravity(config: Config, *, signing: bool) -> Any:
    """Antigravity: with the private key (required when ``signing``); trusting, for the seq
    and the status views, that key's public half and the agents' public keys
    (PIPELINE_CONTROL_PUBLIC_KEYS), those that are set."""
    from consumers.antigravity import Antigravity
    from pipeline import control

    key = None
    if signing and not config.control_private_key_file:
        raise ConfigError(
            "PIPELINE_CONTROL_PRIVATE_KEY_FILE is not set: sending a command needs "
            "Antigravity's private key (make a pair with `pipeline control keygen DIR`)"
        )
    if config.control_private_key_file:
        try:
            key = control.read_private_key_file(Path(config.control_private_key_file))
        except OSError as exc:
            raise ConfigError(
                f"PIPELINE_CONTROL_PRIVATE_KEY_FILE: cannot read {exc.filename}: {exc.strerror}"
            ) from None
    trusted = verifier(config)
    public_keys = [] if trusted is None else trusted.public_keys
    return Antigravity(
        config.kafka, prefix=config.topic_prefix, private_key=key, public_keys=public_keys
    )


async def _from_database(
    config: Config, what: str, read: Callable[[Any], Awaitable[_T]]
) -> tuple[_T] | None:
    """``read(conn)`` on the group's database, or None with a warning naming ``what`` when
    the database cannot be read (`pipeline control` still works from Kafka alone)."""
    import asyncpg

    from pipeline import db

    try:
        conn = await db.connect(config.database_url, config.db_session)
        try:
            return (await read(conn),)
        finally:
            await conn.close()
    except (OSError, PipelineError, asyncpg.PostgresError) as exc:
        print(f"pipeline: warning: {what} not read from PostgreSQL: {exc}", file=sys.stderr)
        return None


def send(args: argparse.Namespace) -> int:
    """Sign and send a command; report the acks (as the instances report them, unsigned) and
    the group's decision as PostgreSQL recorded it, which is what the exit status follows
    when the database can be read."""
    from pipeline import control_store

    config = load_kafka_config(args, group_id=args.group)
    command = _command(args)
    check_streams("--streams", getattr(command, "streams", ()), config)
    antigravity = _antigravity(config, signing=True)
    group = config.group_id

    async def send_and_read() -> tuple[Any, Any]:
        state = await _from_database(
            config,
            "the group's applied seq (the seq comes from the control topic alone)",
            lambda conn: control_store.load_state(conn, group),
        )
        applied = 0 if state is None else state[0].applied_seq
        delivery = await antigravity.send(group, command, wait_s=args.wait, applied_seq=applied)
        decided = await _from_database(
            config,
            "the group's decision",
            lambda conn: control_store.decisions_from(
                conn, group, delivery.offset, delivery.offset
            ),
        )
        return delivery, decided

    delivery, decided = asyncio.run(send_and_read())
    lines, ok = send_lines(
        group,
        delivery,
        None if decided is None else decided[0].get(delivery.offset),
        database_read=decided is not None,
        wait_s=args.wait,
    )
    for line in lines:
        print(line)
    return OK if ok else FAILED


def send_lines(
    group: str, delivery: Any, decision: Any, *, database_read: bool, wait_s: float
) -> tuple[list[str], bool]:
    """`pipeline control`'s lines for a command sent (a ``Delivery``) and the group's decision
    on it (a ``control_store.Decision``; None: none, or ``database_read`` is false), and
    whether it succeeded: every live instance acked ``applied`` and, when the database could
    be read, the group applied it. The instance ids, acks' details and the decision's reason
    come from the status topic (any agent login writes it) or quote what was sent: each line
    goes through :func:`~pipeline.terminal.printable`."""
    envelope = delivery.envelope
    live = len(delivery.live)
    lines = [
        f"{envelope.kind} (seq {envelope.seq}, command {envelope.command_id}) sent to group "
        f"{group} at control offset {delivery.offset}; "
        + (
            f"{live} live instance(s) by their heartbeats; acks as reported by the instances "
            "(unsigned):"
            if live
            else "no live instance: applied when one starts"
        )
    ]
    for instance, ack in sorted(delivery.acks.items()):
        outcome = ack.outcome + (f": {ack.detail}" if ack.outcome == "rejected" else "")
        lines.append(f"  {instance}: {outcome}")
    for instance in delivery.missing:
        lines.append(f"  {instance}: no ack within {wait_s:g}s")
    ok: bool = delivery.ok
    if decision is not None:
        reason = f" ({decision.reason})" if decision.reason else ""
        lines.append(f"the group's decision (PostgreSQL control_log): {decision.outcome}{reason}")
        ok = ok and decision.outcome == "applied"
    elif database_read and live:
        # Acks without a decision are not to be believed: the status topic is unsigned.
        lines.append("the group's decision (PostgreSQL control_log): none yet")
        ok = False
    return [printable(line) for line in lines], ok


def status(args: argparse.Namespace) -> int:
    config = load_kafka_config(args, group_id=args.group)
    antigravity = _antigravity(config, signing=False)

    async def gather() -> tuple[int, list[Any]]:
        await antigravity.ensure_topics()
        # The seq is from signed envelopes; the instances, what their heartbeats say.
        return await antigravity.highest_seq(config.group_id), await antigravity.fleet(
            config.group_id
        )

    highest, heard = asyncio.run(gather())
    # Without a key to check signatures, no seq on the control topic can be trusted.
    latest = highest if antigravity.verifier.key_ids else None
    if args.json:
        instances = [
            {**msgspec.to_builtins(h), "behind": behind}
            for h, behind in live_instances(latest, heard)
        ]
        print(json.dumps({"group": config.group_id, "latest_seq": latest, "instances": instances}))
        return OK
    for line in status_lines(config.group_id, latest, heard):
        print(line)
    return OK


def live_instances(latest: int | None, heard: Sequence[Any]) -> list[tuple[Any, bool]]:
    """The live instances among the heartbeats ``heard`` (those not stopping), each with
    whether it reports an ``applied_seq`` behind ``latest``, the latest signed seq (None: no
    key to verify one with, so none is behind)."""
    return [
        (h, latest is not None and h.applied_seq < latest) for h in heard if h.state != "stopping"
    ]


def status_lines(group: str, latest: int | None, heard: Sequence[Any]) -> list[str]:
    """`pipeline control status`'s lines from the group's heartbeats (``Heartbeat``s) and the
    latest signed seq (None: no key to verify one with). Whoever may write to the status topic
    writes the heartbeats' fields: each line goes through :func:`~pipeline.terminal.printable`."""
    fleet = live_instances(latest, heard)
    shown = latest if latest is not None else "unknown (no key to verify it with)"
    lines = [
        f"group {group}: latest signed command seq {shown}; {len(fleet)} live instance(s), "
        "as reported by their heartbeats (unsigned):"
    ]
    for h in heard:
        if h.state == "stopping":
            lines.append(
                f"  {h.instance_id}: stopped (last heard {h.at.isoformat(timespec='seconds')})"
            )
    for h, behind in fleet:
        mark = "  BEHIND" if behind else ""
        lines.append(
            f"  {h.instance_id}: {h.state}, seq {h.applied_seq}{mark}, assignment "
            f"v{h.assignment_version}, streams {','.join(h.active_streams) or '-'}, "
            f"{len(h.owned_partitions)} partitions, lag {h.lag}"
            + (f", last error: {h.last_error}" if h.last_error else "")
        )
    return [printable(line) for line in lines]


def log(args: argparse.Namespace) -> int:
    from pipeline import control_store, db

    config = load_config(args, group_id=args.group)

    async def read() -> list[dict[str, Any]]:
        conn = await db.connect(config.database_url, config.db_session)
        try:
            return await control_store.control_log(conn, config.group_id, args.limit)
        finally:
            await conn.close()

    for row in asyncio.run(read()):
        who = row["instance_id"] or "-"
        at = row["recorded_at"].isoformat(timespec="seconds")
        where = "" if row["src_offset"] is None else f" @{row['src_offset']}"
        reason = f" ({row['reason']})" if row["reason"] else ""
        print(
            printable(  # a rejected command's reason quotes what it was sent
                f"{at} {row['direction']:<7} seq {row['seq']} {row['kind']}{where} "
                f"{row['outcome']}{reason} by {who}"
            )
        )
    return OK
