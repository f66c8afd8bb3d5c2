"""`pipeline top`: a live view of every DatabaseAgent of a group, from the heartbeats and each
agent's /metrics (docs/observability.md)."""

from __future__ import annotations

import argparse
import os

from pipeline.commands._common import OK, Subparsers, group_options, load_config, positive
from pipeline.errors import ConfigError


def register(commands: Subparsers) -> None:
    parser = commands.add_parser(
        "top",
        help="a live view of every DatabaseAgent of a group, refreshed every second",
        description="Every DatabaseAgent of the group, from the heartbeats on the status topic "
        "and each agent's /metrics: state, active streams, partitions owned, rows written per "
        "second, lag in records and in seconds, seconds since its last heartbeat, last error. "
        "An instance unheard for 10 s is shown as gone?, one that said it stopped as stopped, "
        "for 5 minutes. On a terminal it redraws in place (q or Ctrl-C quits); otherwise, or "
        "with --once, it prints a table per refresh.",
    )
    group_options(parser)
    parser.add_argument("--once", action="store_true", help="print one table and exit")
    parser.add_argument(
        "--interval",
        type=positive(float),
        default=1.0,
        metavar="SECONDS",
        help="seconds between refreshes (1)",
    )
    parser.add_argument(
        "--metrics-hosts",
        metavar="LIST",
        help="the hosts whose /metrics may be fetched: a comma list of names, IPs and networks "
        "(10.0.0.0/8); heartbeats are unsigned, so an address they name elsewhere is shown, "
        "not fetched (default $PIPELINE_TOP_METRICS_HOSTS, else this machine: "
        "127.0.0.1,::1,localhost)",
    )
    parser.set_defaults(handler=top)


def top(args: argparse.Namespace) -> int:
    from consumers.top import Top, run_top
    from pipeline.top import LOOPBACK_HOSTS, METRICS_HOSTS_ENV, MetricsHosts

    if args.metrics_hosts is not None:
        setting, listed = "--metrics-hosts", args.metrics_hosts
    else:
        setting, listed = METRICS_HOSTS_ENV, os.environ.get(METRICS_HOSTS_ENV, LOOPBACK_HOSTS)
    try:
        hosts = MetricsHosts.parse(listed)
    except ValueError as exc:
        raise ConfigError(f"{setting}: {exc}") from None
    config = load_config(args, group_id=args.group)
    view = Top(
        config.kafka,
        prefix=config.topic_prefix,
        group=config.group_id,
        streams=config.catalog.names,
        interval_s=args.interval,
        metrics_hosts=hosts,
    )
    run_top(view, once=args.once)
    return OK
