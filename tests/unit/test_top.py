"""`pipeline top`'s pure part: scrapes parsed, the fleet merged from heartbeats and scrapes,
rates, staleness, and the screen."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import generate_latest

from pipeline.control import Heartbeat, metrics_scrape_address
from pipeline.metrics import Metrics
from pipeline.top import (
    FORGET_AFTER_S,
    LOOPBACK_HOSTS,
    STALE_AFTER_S,
    Fleet,
    MetricsHosts,
    Row,
    Scrape,
    parse_scrape,
    render,
)

NOW = datetime(2026, 11, 30, 8, 0, 0, tzinfo=UTC)
GROUP = "database-agent"
ALL = ("states", "events", "metrics", "analytics", "config")


def beat(
    instance: str = "vm-1",
    *,
    ago: float = 1.0,
    state: str = "running",
    lag: int = 7,
    group: str = GROUP,
    address: str = "127.0.0.1:9108",
    streams: tuple[str, ...] = ALL,
    partitions: int = 3,
    error: str = "",
) -> Heartbeat:
    return Heartbeat(
        instance_id=instance,
        group=group,
        state=state,  # type: ignore[arg-type]
        applied_seq=0,
        assignment_version=0,
        active_streams=streams,
        owned_partitions=tuple(("agents.metrics", p) for p in range(partitions)),
        lag=lag,
        last_error=error,
        metrics_address=address,
        at=NOW - timedelta(seconds=ago),
    )


def scrape(
    at: float, rows: float | None = 0, lag: int | None = None, lag_s: float | None = None
) -> Scrape:
    return Scrape(at=at, rows_ingested=rows, lag_records=lag, lag_seconds=lag_s)


# --- scrapes ----------------------------------------------------------------------------------


def test_a_scrape_of_the_agents_own_metrics() -> None:
    metrics = Metrics()
    metrics.rows_ingested.labels("performance_metrics", "live").inc(1200)
    metrics.rows_ingested.labels("system_events", "live").inc(34)
    metrics.lag.labels("agents.metrics", "0").set(5)
    metrics.lag.labels("agents.metrics", "1").set(11)
    found = parse_scrape(generate_latest(metrics.registry).decode(), at=3.5)
    assert found.at == 3.5
    assert found.rows_ingested == 1234
    assert found.lag_records == 16
    # pipeline_consumer_lag_seconds is an agent's newer metric: absent here, or not yet set.
    assert found.lag_seconds is None


def test_lag_seconds_is_the_oldest_partitions() -> None:
    text = (
        "# HELP pipeline_consumer_lag_seconds Age of the oldest record not yet written\n"
        "# TYPE pipeline_consumer_lag_seconds gauge\n"
        'pipeline_consumer_lag_seconds{topic="agents.metrics",partition="0"} 0.0\n'
        'pipeline_consumer_lag_seconds{topic="agents.metrics",partition="1"} 42.5\n'
        'pipeline_consumer_lag_seconds{topic="agents.events",partition="0"} 3.25\n'
    )
    assert parse_scrape(text, at=0) == Scrape(
        at=0, rows_ingested=None, lag_records=None, lag_seconds=42.5
    )


def test_metrics_declared_but_without_samples() -> None:
    # A fresh agent: no table written yet (0 rows), no partition's lag measured yet (unknown).
    text = generate_latest(Metrics().registry).decode()
    assert "# TYPE pipeline_rows_ingested_total counter" in text
    assert "# TYPE pipeline_consumer_lag_records gauge" in text
    assert parse_scrape(text, at=1) == Scrape(
        at=1, rows_ingested=0, lag_records=None, lag_seconds=None
    )


def test_an_empty_page_has_nothing() -> None:
    assert parse_scrape("", at=0) == Scrape(0, None, None, None)


def test_not_prometheus_text_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_scrape("<html>\n<body>Not Found</body>\n</html>\n", at=0)


# --- where a heartbeat says its /metrics are ----------------------------------------------------


@pytest.mark.parametrize(
    ("configured", "advertised"),
    [
        ("127.0.0.1:9108", "127.0.0.1:9108"),
        ("10.1.2.3:9109", "10.1.2.3:9109"),
        ("agent-7.internal:9108", "agent-7.internal:9108"),
        ("localhost:9108", "localhost:9108"),
        ("0.0.0.0:9108", "vm-host:9108"),  # listens everywhere: reachable by the host's name
        ("", ""),  # serves no /metrics
    ],
)
def test_metrics_scrape_address(configured: str, advertised: str) -> None:
    assert metrics_scrape_address(configured, "vm-host") == advertised


# --- the fleet ----------------------------------------------------------------------------------


def test_an_instance_as_its_heartbeat_says_before_any_scrape() -> None:
    fleet = Fleet(GROUP)
    fleet.heard(beat(lag=7, ago=2.4))
    assert fleet.rows(NOW) == [
        Row("vm-1", "running", ALL, 3, None, 7, None, heard_s=2.4, last_error="")
    ]


def test_other_groups_are_not_shown() -> None:
    fleet = Fleet(GROUP)
    fleet.heard(beat("vm-1"))
    fleet.heard(beat("vm-2", group="other"))
    assert [r.instance_id for r in fleet.rows(NOW)] == ["vm-1"]


def test_the_newest_heartbeat_wins_whatever_the_order_read() -> None:
    fleet = Fleet(GROUP)
    fleet.heard(beat(ago=1, lag=10))
    fleet.heard(beat(ago=4, lag=99))  # older: ignored
    assert fleet.rows(NOW)[0].lag_records == 10
    fleet.heard(beat(ago=0.5, lag=3))
    assert fleet.rows(NOW)[0].lag_records == 3


def test_instances_are_sorted_by_id() -> None:
    fleet = Fleet(GROUP)
    for instance in ("vm-3", "vm-1", "vm-2"):
        fleet.heard(beat(instance))
    assert [r.instance_id for r in fleet.rows(NOW)] == ["vm-1", "vm-2", "vm-3"]


def test_rows_per_second_from_two_scrapes() -> None:
    fleet = Fleet(GROUP)
    fleet.heard(beat())
    fleet.scraped("vm-1", scrape(10.0, rows=1000))
    assert fleet.rows(NOW)[0].rows_per_s is None  # one scrape is no rate
    fleet.scraped("vm-1", scrape(12.0, rows=6000))
    assert fleet.rows(NOW)[0].rows_per_s == 2500.0
    fleet.scraped("vm-1", scrape(13.0, rows=6000))
    assert fleet.rows(NOW)[0].rows_per_s == 0.0


def test_a_counter_that_went_down_counts_from_zero() -> None:
    # The agent restarted under the same instance id: its counter starts again.
    fleet = Fleet(GROUP)
    fleet.heard(beat())
    fleet.scraped("vm-1", scrape(10.0, rows=50_000))
    fleet.scraped("vm-1", scrape(11.0, rows=300))
    assert fleet.rows(NOW)[0].rows_per_s == 300.0


def test_the_lag_from_metrics_wins_over_the_heartbeat() -> None:
    fleet = Fleet(GROUP)
    fleet.heard(beat(lag=7))
    fleet.scraped("vm-1", scrape(1.0, lag=12, lag_s=4.5))
    row = fleet.rows(NOW)[0]
    assert (row.lag_records, row.lag_seconds) == (12, 4.5)


def test_without_the_lag_metrics_the_heartbeats_lag_and_no_seconds() -> None:
    fleet = Fleet(GROUP)
    fleet.heard(beat(lag=7))
    fleet.scraped("vm-1", scrape(1.0, lag=None, lag_s=None))
    row = fleet.rows(NOW)[0]
    assert (row.lag_records, row.lag_seconds) == (7, None)


def test_a_failed_scrape_makes_the_numbers_unknown_and_says_why() -> None:
    fleet = Fleet(GROUP)
    fleet.heard(beat(lag=7, error="database unreachable"))
    fleet.scraped("vm-1", scrape(1.0, rows=10, lag=12, lag_s=4.5))
    fleet.scraped("vm-1", scrape(2.0, rows=20, lag=12, lag_s=4.5))
    fleet.scrape_failed("vm-1", "connection refused")
    row = fleet.rows(NOW)[0]
    assert (row.rows_per_s, row.lag_records, row.lag_seconds) == (None, 7, None)
    assert row.last_error == "database unreachable; metrics 127.0.0.1:9108: connection refused"
    # The next scrape that works measures from the last one that worked.
    fleet.scraped("vm-1", scrape(4.0, rows=60, lag=0, lag_s=0.0))
    row = fleet.rows(NOW)[0]
    assert (row.rows_per_s, row.lag_records, row.lag_seconds, row.last_error) == (
        20.0,
        0,
        0.0,
        "database unreachable",
    )


def test_a_silent_instance_is_gone_but_still_shown() -> None:
    fleet = Fleet(GROUP)
    fleet.heard(beat("vm-1", ago=STALE_AFTER_S + 1, lag=7))
    fleet.heard(beat("vm-2", ago=1))
    fleet.scraped("vm-1", scrape(1.0, rows=10, lag=12))
    gone, alive = fleet.rows(NOW)
    assert gone == Row(
        "vm-1", "gone?", ALL, 3, None, None, None, heard_s=STALE_AFTER_S + 1, last_error=""
    )
    assert alive.state == "running"
    assert fleet.scrape_targets(NOW) == {"vm-2": "127.0.0.1:9108"}


def test_a_stopping_instance_then_stopped() -> None:
    fleet = Fleet(GROUP)
    fleet.heard(beat(state="stopping", ago=2))
    assert fleet.rows(NOW)[0].state == "stopping"
    assert fleet.rows(NOW + timedelta(seconds=STALE_AFTER_S))[0].state == "stopped"
    assert fleet.scrape_targets(NOW) == {}


def test_an_instance_unheard_for_long_leaves_the_view() -> None:
    fleet = Fleet(GROUP)
    fleet.heard(beat("vm-1", ago=FORGET_AFTER_S - 1))
    assert [r.state for r in fleet.rows(NOW)] == ["gone?"]
    assert fleet.rows(NOW + timedelta(seconds=2)) == []


def test_instances_without_metrics_are_not_scraped() -> None:
    fleet = Fleet(GROUP, metrics_hosts=MetricsHosts.parse("10.0.0.0/8"))
    fleet.heard(beat("vm-1", address=""))
    fleet.heard(beat("vm-2", address="10.0.0.2:9108"))
    assert fleet.scrape_targets(NOW) == {"vm-2": "10.0.0.2:9108"}


# --- which addresses are fetched: heartbeats are unsigned -------------------------------------


def test_by_default_only_this_machine_is_scraped() -> None:
    fleet = Fleet(GROUP)
    fleet.heard(beat("vm-1", address="127.0.0.1:9108"))
    fleet.heard(beat("vm-2", address="localhost:9109"))
    fleet.heard(beat("vm-3", address="10.0.0.2:9108"))
    fleet.heard(beat("vm-4", address="169.254.169.254:80"))
    assert fleet.scrape_targets(NOW) == {"vm-1": "127.0.0.1:9108", "vm-2": "localhost:9109"}
    errors = {r.instance_id: r.last_error for r in fleet.rows(NOW)}
    assert errors == {
        "vm-1": "",
        "vm-2": "",
        "vm-3": "metrics 10.0.0.2:9108: not fetched: host not allowed (PIPELINE_TOP_METRICS_HOSTS)",
        "vm-4": "metrics 169.254.169.254:80: not fetched: host not allowed "
        "(PIPELINE_TOP_METRICS_HOSTS)",
    }


@pytest.mark.parametrize(
    ("address", "refusal"),
    [
        ("vm-7.internal:9108", None),
        ("VM-7.Internal:9108", None),
        ("10.1.2.3:9108", None),
        ("192.168.1.5:9108", None),
        ("192.168.2.5:9108", "not fetched: host not allowed (PIPELINE_TOP_METRICS_HOSTS)"),
        ("vm-8.internal:9108", "not fetched: host not allowed (PIPELINE_TOP_METRICS_HOSTS)"),
        ("127.0.0.1:9108", "not fetched: host not allowed (PIPELINE_TOP_METRICS_HOSTS)"),
        ("vm-7.internal:9108/admin?x=", "not fetched: not HOST:PORT"),
        ("evil@vm-7.internal:9108", "not fetched: not HOST:PORT"),
        ("vm-7.internal#@10.1.2.3:9108", "not fetched: not HOST:PORT"),
        ("vm-7.internal:0", "not fetched: not HOST:PORT"),
        ("vm-7.internal:70000", "not fetched: not HOST:PORT"),
        ("vm-7.internal", "not fetched: not HOST:PORT"),
        ("[::1]:9108", "not fetched: host not allowed (PIPELINE_TOP_METRICS_HOSTS)"),
    ],
)
def test_an_address_is_fetched_only_on_an_allowed_host(address: str, refusal: str | None) -> None:
    hosts = MetricsHosts.parse(" vm-7.internal, 10.0.0.0/8 ,192.168.1.5,")
    assert hosts.refusal(address) == refusal


def test_the_default_hosts_are_the_loopback_ones() -> None:
    hosts = MetricsHosts.parse(LOOPBACK_HOSTS)
    assert [hosts.refusal(a) for a in ("127.0.0.1:1", "[::1]:1", "localhost:1")] == [None] * 3
    assert hosts.refusal("127.0.0.2:1") is not None  # the list, not all of 127/8


@pytest.mark.parametrize("entry", ["10.0.0.0/33", "a/b", "host name", "evil@host", "h:80"])
def test_an_entry_that_is_no_host_is_refused(entry: str) -> None:
    with pytest.raises(ValueError, match=f"{entry!r} is not a host name, an IP address or"):
        MetricsHosts.parse(f"localhost,{entry}")


def test_scrapes_of_unknown_instances_are_ignored() -> None:
    fleet = Fleet(GROUP)
    fleet.scraped("vm-9", scrape(1.0))
    fleet.scrape_failed("vm-9", "timed out")
    assert fleet.rows(NOW) == []


# --- the screen ---------------------------------------------------------------------------------


def sample_fleet() -> Fleet:
    fleet = Fleet(GROUP)
    fleet.heard(beat("vm-27798", lag=0, partitions=8))
    fleet.heard(beat("vm-27800", lag=1500, partitions=7, streams=("metrics", "events")))
    fleet.heard(beat("vm-3", ago=42, lag=9, partitions=5, error="database unreachable"))
    fleet.scraped("vm-27798", scrape(0.0, rows=0, lag=0))
    fleet.scraped("vm-27798", scrape(1.0, rows=123_456.4, lag=0, lag_s=0.0))
    fleet.scraped("vm-27800", scrape(0.0, rows=0))
    fleet.scraped("vm-27800", scrape(2.0, rows=3000, lag=2_345, lag_s=12.34))
    return fleet


def test_the_screen() -> None:
    lines = render(
        sample_fleet().rows(NOW), group=GROUP, streams=ALL, now=NOW, interval_s=1, width=None
    )
    assert lines == [
        "pipeline top 2026-11-30 08:00:00 UTC: group database-agent, 3 instance(s) "
        "(1 gone?, 2 running), every 1s",
        "live instances in all: 124,956 rows/s, lag 2,345 records / 12 s",
        "",
        "INSTANCE  STATE    STREAMS         PARTS   ROWS/S    LAG  LAG S  HEARD  LAST ERROR",
        "vm-27798  running  all                 8  123,456      0    0.0     1s",
        "vm-27800  running  metrics,events      7    1,500  2,345     12     1s",
        "vm-3      gone?    all                 5        -      -      -    42s  "
        "database unreachable",
    ]


def test_a_narrow_screen_cuts_the_lines() -> None:
    lines = render(
        sample_fleet().rows(NOW), group=GROUP, streams=ALL, now=NOW, interval_s=1, width=70
    )
    assert all(len(line) <= 70 for line in lines)
    assert lines[6] == "vm-3      gone?    all                 5        -      -      -    ..."
    assert lines[4].startswith("vm-27798  running  all")


def test_an_empty_group_says_what_to_check() -> None:
    lines = render([], group="g", streams=ALL, now=NOW, interval_s=2.5, width=None)
    assert lines[0] == "pipeline top 2026-11-30 08:00:00 UTC: group g, 0 instance(s), every 2.5s"
    assert lines[1] == "live instances in all: - rows/s, lag - records / - s"
    assert lines[3].startswith("no heartbeat from group g in the last 300s")


@pytest.mark.parametrize(
    ("streams", "shown"),
    [(ALL, "all"), ((), "none"), (("events",), "events"), (("config", "states"), "config,states")],
)
def test_active_streams_shown(streams: tuple[str, ...], shown: str) -> None:
    fleet = Fleet(GROUP)
    fleet.heard(beat(streams=streams))
    line = render(fleet.rows(NOW), group=GROUP, streams=ALL, now=NOW, interval_s=1, width=None)[4]
    assert line.split()[2] == shown


@pytest.mark.parametrize(
    ("ago", "shown"), [(0.2, "0s"), (59.9, "59s"), (61, "1m01s"), (3725, "1h02m")]
)
def test_heard_ago_shown(ago: float, shown: str) -> None:
    fleet = Fleet(GROUP, forget_after_s=10_000)
    fleet.heard(beat(ago=ago))
    line = render(fleet.rows(NOW), group=GROUP, streams=ALL, now=NOW, interval_s=1, width=None)[4]
    assert line.split()[7] == shown
