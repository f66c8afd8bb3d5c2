"""``pipeline top``'s pure part: a DatabaseAgent group as its heartbeats and its agents'
``/metrics`` describe it, and the screen that shows it.

Two sources, merged per instance (by instance id):

* **Heartbeats** on the status topic (:class:`pipeline.control.Heartbeat`, every 3 s): state,
  active streams, owned partitions, lag in records, last error, and where its ``/metrics``
  are (``metrics_address``).
* **Scrapes** of that ``/metrics`` (every refresh, :func:`parse_scrape`): the rows written
  (``pipeline_rows_ingested_total``, whose growth between two scrapes is the rate), the lag
  in records (``pipeline_consumer_lag_records``, summed over partitions) and in seconds
  (``pipeline_consumer_lag_seconds``, the oldest partition's). A metric the agent does not
  export is shown as ``-``; the lag in records then comes from the heartbeat.

An instance whose last heartbeat is older than :data:`STALE_AFTER_S` is shown as ``gone?``
(it may be dead, frozen or cut off) with its last known streams and partitions, and one whose
last heartbeat said it was stopping as ``stopped``; neither is scraped. Both leave the view
once unheard for :data:`FORGET_AFTER_S`.

A heartbeat is unsigned: anyone who may write the status topic can name any address in it.
So an address is scraped only when its host is one the operator allowed
(:class:`MetricsHosts`: ``PIPELINE_TOP_METRICS_HOSTS`` or ``--metrics-hosts``; this machine's
loopback by default); any other is shown, not fetched.

Everything here is values in, values out: the time is passed in (``now`` for heartbeat ages,
monotonic seconds for scrapes), nothing touches the network or the terminal
(consumers/top.py does).
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from prometheus_client.parser import text_string_to_metric_families

from pipeline.control import Heartbeat
from pipeline.terminal import printable

__all__ = [
    "FORGET_AFTER_S",
    "LAG_RECORDS",
    "LAG_SECONDS",
    "LOOPBACK_HOSTS",
    "METRICS_HOSTS_ENV",
    "ROWS_INGESTED",
    "STALE_AFTER_S",
    "Fleet",
    "MetricsHosts",
    "Row",
    "Scrape",
    "parse_scrape",
    "render",
]

#: Three heartbeat intervals (3 s, consumers/controller.py) and a second of slack.
STALE_AFTER_S = 10.0
#: How long an instance that went quiet stays in the view; also how far back the status
#: topic is read at start.
FORGET_AFTER_S = 300.0

ROWS_INGESTED = "pipeline_rows_ingested_total"
LAG_RECORDS = "pipeline_consumer_lag_records"
LAG_SECONDS = "pipeline_consumer_lag_seconds"


#: The setting that lists the hosts ``pipeline top`` may scrape (a comma list).
METRICS_HOSTS_ENV = "PIPELINE_TOP_METRICS_HOSTS"
#: What it may scrape when the setting is not given: this machine only.
LOOPBACK_HOSTS = "127.0.0.1,::1,localhost"

# HOST:PORT as a heartbeat advertises it: a host name or IPv4 address, or an IPv6 address in
# brackets; nothing that could make the URL reach elsewhere (user info, a path, a query).
_ADDRESS = re.compile(r"(?P<host>[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):(?P<port>[0-9]{1,5})\Z")
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class MetricsHosts:
    """The hosts whose ``/metrics`` ``pipeline top`` may fetch: names (any case, as the
    heartbeat writes them) and IP networks (``10.0.0.0/8``; a bare IP is a network of one)."""

    names: frozenset[str] = frozenset()
    networks: tuple[_Network, ...] = field(default=())

    @classmethod
    def parse(cls, text: str) -> MetricsHosts:
        """A comma list of host names, IP addresses and networks; ``ValueError`` naming an
        entry that is none of them."""
        names: set[str] = set()
        networks: list[_Network] = []
        for entry in (e.strip() for e in text.split(",")):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            if "/" in entry or not re.fullmatch(r"[A-Za-z0-9.-]+", entry):
                raise ValueError(f"{entry!r} is not a host name, an IP address or a network")
            names.add(entry.lower())
        return cls(frozenset(names), tuple(networks))

    def refusal(self, address: str) -> str | None:
        """Why ``address`` (a heartbeat's ``HOST:PORT``) is not fetched; None to fetch it."""
        found = _ADDRESS.match(address)
        if found is None or not 0 < int(found["port"]) < 65536:
            return "not fetched: not HOST:PORT"
        host = found["host"].strip("[]")
        if host.lower() in self.names:
            return None
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        if ip is not None and any(ip in network for network in self.networks):
            return None
        return f"not fetched: host not allowed ({METRICS_HOSTS_ENV})"


@dataclass(frozen=True)
class Scrape:
    """What one ``/metrics`` scrape said; ``None`` where the agent exports no such series."""

    at: float  # monotonic seconds, when it was taken
    rows_ingested: float | None  # every pipeline_rows_ingested_total series, summed
    lag_records: int | None  # every partition's pipeline_consumer_lag_records, summed
    lag_seconds: float | None  # the largest pipeline_consumer_lag_seconds


def parse_scrape(text: str, *, at: float) -> Scrape:
    """The numbers ``pipeline top`` shows, from a ``/metrics`` page (Prometheus text format).

    Raises ``ValueError`` for text that is not in that format. A lag gauge declared without
    samples (no partition measured yet) counts as absent; the rows counter declared without
    samples is 0 (no table written yet).
    """
    found: dict[str, list[float]] = {ROWS_INGESTED: [], LAG_RECORDS: [], LAG_SECONDS: []}
    rows_declared = False
    for family in text_string_to_metric_families(text):
        # The text format's parser names a counter's family without its "_total".
        rows_declared |= family.name in (ROWS_INGESTED, ROWS_INGESTED.removesuffix("_total"))
        for sample in family.samples:
            values = found.get(sample.name)
            if values is not None and math.isfinite(sample.value):
                values.append(sample.value)
    rows, lag, lag_seconds = found[ROWS_INGESTED], found[LAG_RECORDS], found[LAG_SECONDS]
    return Scrape(
        at=at,
        rows_ingested=sum(rows) if rows or rows_declared else None,
        lag_records=round(sum(lag)) if lag else None,
        lag_seconds=max(lag_seconds) if lag_seconds else None,
    )


@dataclass(frozen=True)
class Row:
    """One instance as shown: ``None`` is unknown (shown as ``-``)."""

    instance_id: str
    state: str  # the heartbeat's state, or "gone?" (stale) or "stopped"
    active_streams: tuple[str, ...]
    partitions: int
    rows_per_s: float | None
    lag_records: int | None
    lag_seconds: float | None
    heard_s: float  # since its last heartbeat
    last_error: str  # the agent's, and why its /metrics could not be read

    @property
    def live(self) -> bool:
        return self.state not in ("gone?", "stopped", "stopping")


@dataclass
class _Instance:
    heartbeat: Heartbeat
    scrape: Scrape | None = None  # the last scrape that worked
    scrape_error: str = ""  # why the last scrape failed; "" when it worked
    rows_per_s: float | None = None  # between the last two scrapes that worked


class Fleet:
    """The instances of one group: heartbeats and scrapes in, :class:`Row` s out."""

    def __init__(
        self,
        group: str,
        *,
        stale_after_s: float = STALE_AFTER_S,
        forget_after_s: float = FORGET_AFTER_S,
        metrics_hosts: MetricsHosts | None = None,
    ) -> None:
        self.group = group
        self.metrics_hosts = metrics_hosts or MetricsHosts.parse(LOOPBACK_HOSTS)
        self.stale_after_s = stale_after_s
        self.forget_after_s = forget_after_s
        self._instances: dict[str, _Instance] = {}

    def heard(self, heartbeat: Heartbeat) -> None:
        """A heartbeat from the status topic (other groups' are ignored, as are ones older
        than what this instance already said)."""
        if heartbeat.group != self.group:
            return
        known = self._instances.get(heartbeat.instance_id)
        if known is None:
            self._instances[heartbeat.instance_id] = _Instance(heartbeat)
        elif heartbeat.at >= known.heartbeat.at:
            known.heartbeat = heartbeat
        self._instances = {
            i: known
            for i, known in self._instances.items()
            if _age(heartbeat.at, known.heartbeat) <= self.forget_after_s
        }

    def scrape_targets(self, now: datetime) -> dict[str, str]:
        """Instance id -> ``/metrics`` address of every live instance that serves one on a
        host :attr:`metrics_hosts` allows."""
        return {
            i: known.heartbeat.metrics_address
            for i, known in self._instances.items()
            if known.heartbeat.metrics_address
            and self._state(known, now) not in _NOT_LIVE
            and self.metrics_hosts.refusal(known.heartbeat.metrics_address) is None
        }

    def scraped(self, instance_id: str, scrape: Scrape) -> None:
        """A scrape that worked. The rate is the rows written since the scrape before it,
        over the time between them; a counter that went down (the agent restarted) counts
        from zero, as Prometheus' ``rate()`` does."""
        known = self._instances.get(instance_id)
        if known is None:
            return
        before, known.scrape, known.scrape_error = known.scrape, scrape, ""
        known.rows_per_s = None
        if before is None or scrape.rows_ingested is None or before.rows_ingested is None:
            return
        elapsed = scrape.at - before.at
        if elapsed <= 0:
            return
        grown = scrape.rows_ingested - before.rows_ingested
        known.rows_per_s = (grown if grown >= 0 else scrape.rows_ingested) / elapsed

    def scrape_failed(self, instance_id: str, reason: str) -> None:
        """A scrape that did not work: its numbers are unknown until one works again."""
        known = self._instances.get(instance_id)
        if known is not None:
            known.scrape_error = reason
            known.rows_per_s = None

    def rows(self, now: datetime) -> list[Row]:
        """Every instance heard within :data:`FORGET_AFTER_S` of ``now``, by instance id."""
        return [
            self._row(known, now)
            for _, known in sorted(self._instances.items())
            if _age(now, known.heartbeat) <= self.forget_after_s
        ]

    def _state(self, known: _Instance, now: datetime) -> str:
        beat = known.heartbeat
        if _age(now, beat) > self.stale_after_s:
            return "stopped" if beat.state == "stopping" else "gone?"
        return beat.state

    def _row(self, known: _Instance, now: datetime) -> Row:
        beat = known.heartbeat
        state = self._state(known, now)
        live = state not in _NOT_LIVE
        scrape = known.scrape if live and not known.scrape_error else None
        problems = [beat.last_error] if beat.last_error else []
        refused = beat.metrics_address and self.metrics_hosts.refusal(beat.metrics_address)
        if live and refused:
            problems.append(f"metrics {beat.metrics_address}: {refused}")
        elif live and known.scrape_error:
            problems.append(f"metrics {beat.metrics_address}: {known.scrape_error}")
        lag: int | None = None
        if live:
            lag = scrape.lag_records if scrape and scrape.lag_records is not None else beat.lag
        return Row(
            instance_id=beat.instance_id,
            state=state,
            active_streams=beat.active_streams,
            partitions=len(beat.owned_partitions),
            rows_per_s=known.rows_per_s if scrape else None,
            lag_records=lag,
            lag_seconds=scrape.lag_seconds if scrape else None,
            heard_s=max(_age(now, beat), 0.0),
            last_error="; ".join(problems),
        )


_NOT_LIVE = frozenset({"gone?", "stopped", "stopping"})


def _age(now: datetime, heartbeat: Heartbeat) -> float:
    return (now - heartbeat.at).total_seconds()


# --- the screen ---------------------------------------------------------------------------------

_HEADINGS = ("INSTANCE", "STATE", "STREAMS", "PARTS", "ROWS/S", "LAG", "LAG S", "HEARD")
_RIGHT = frozenset({"PARTS", "ROWS/S", "LAG", "LAG S", "HEARD"})
_ERROR_HEADING = "LAST ERROR"
_GAP = "  "


def render(
    rows: Sequence[Row],
    *,
    group: str,
    streams: Collection[str],
    now: datetime,
    interval_s: float,
    width: int | None,
) -> list[str]:
    """The screen: a header, the group's totals, and a table with a line per instance.

    ``streams`` are the catalog's stream names: an instance with all of them active shows
    "all".

    Lines are at most ``width`` characters (``None``: no limit); the last error takes what
    the other columns leave, cut with ``...``.
    """
    live = [r for r in rows if r.live]
    states = _counts(printable(r.state) for r in rows)
    lines = [
        f"pipeline top {now:%Y-%m-%d %H:%M:%S %Z}: group {group}, {len(rows)} instance(s)"
        + (f" ({states})" if states else "")
        + f", every {interval_s:g}s",
        _totals(live),
        "",
    ]
    if not rows:
        lines.append(
            f"no heartbeat from group {group} in the last {FORGET_AFTER_S:g}s: are its agents "
            "running, with this PIPELINE_TOPIC_PREFIX and group?"
        )
        return [_cut(line, width) for line in lines]
    table = [list(_HEADINGS)] + [_cells(r, streams) for r in rows]
    widths = [max(len(cells[i]) for cells in table) for i in range(len(_HEADINGS))]
    errors = [_ERROR_HEADING] + [printable(r.last_error) for r in rows]
    for cells, error in zip(table, errors, strict=True):
        fixed = _GAP.join(
            cell.rjust(w) if heading in _RIGHT else cell.ljust(w)
            for cell, w, heading in zip(cells, widths, _HEADINGS, strict=True)
        )
        lines.append(f"{fixed}{_GAP}{error}" if error else fixed.rstrip())
    return [_cut(line, width) for line in lines]


def _cells(row: Row, streams: Collection[str]) -> list[str]:
    """A row's cells; a heartbeat's text is whoever wrote to the status topic's, escaped
    (:func:`~pipeline.terminal.printable`) before the columns are measured."""
    return [
        printable(row.instance_id),
        printable(row.state),
        printable(_streams(row.active_streams, streams)),
        str(row.partitions),
        _count(row.rows_per_s),
        _count(row.lag_records),
        _seconds(row.lag_seconds),
        _ago(row.heard_s),
    ]


def _totals(live: Sequence[Row]) -> str:
    rates = [r.rows_per_s for r in live if r.rows_per_s is not None]
    lags = [r.lag_records for r in live if r.lag_records is not None]
    ages = [r.lag_seconds for r in live if r.lag_seconds is not None]
    return (
        f"live instances in all: {_count(sum(rates) if rates else None)} rows/s, lag "
        f"{_count(sum(lags) if lags else None)} records / {_seconds(max(ages) if ages else None)} s"
    )


def _counts(states: Iterable[str]) -> str:
    counts: dict[str, int] = {}
    for state in states:
        counts[state] = counts.get(state, 0) + 1
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))


def _streams(active: tuple[str, ...], streams: Collection[str]) -> str:
    if not active:
        return "none"
    if set(active) == set(streams):
        return "all"
    return ",".join(active)


def _count(value: float | None) -> str:
    return "-" if value is None else f"{round(value):,}"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 10 else f"{value:,.0f}"


def _ago(seconds: float) -> str:
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def _cut(line: str, width: int | None) -> str:
    if width is None or len(line) <= width:
        return line
    return line[: max(width - 3, 0)] + "..." if width >= 3 else line[:width]
