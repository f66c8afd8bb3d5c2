"""`pipeline run` with a memory probe, to tell a leak from allocator retention (docs/testing.md,
"The soak run: `make soak`"): ``python -m tests.soak --agent-module
tests.integration.memory_probe_agent`` with ``MEMORY_PROBE_DIR`` set. Every 10 s a thread
appends to ``MEMORY_PROBE_DIR/<instance>-<pid>.jsonl`` the process's RSS, its allocated
blocks, malloc's bytes in use and, every 30 s, CPython's arenas and the bytes in their
allocated blocks (``sys._debugmallocstats``, which writes to file descriptor 2: a log line
written in that instant lands in the probe's file, not the agent's log). With
``MEMORY_PROBE_TRIM=1`` it then calls ``malloc_trim(0)`` and adds the RSS after it.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from pipeline import cli, heap

EVERY_S = 10.0
_ARENA_LINES = {
    "# arenas allocated current": "arenas",
    "# arenas highwater mark": "arenas_high_water",
    "# bytes in allocated blocks": "allocated_block_bytes",
}


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _arenas() -> dict[str, int]:
    with tempfile.TemporaryFile("w+") as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(captured.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        text = captured.read()
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition("=")
        if name.strip() in _ARENA_LINES:
            found[_ARENA_LINES[name.strip()]] = int(value.replace(",", "").strip())
    return found


def _probe(path: Path, trim: bool) -> None:
    began = time.monotonic()
    libc = ctypes.CDLL(None)
    for n in range(1, 10**9):
        time.sleep(EVERY_S)
        row: dict[str, float | int | None] = {
            "t": round(time.monotonic() - began, 1),
            "rss_mib": _rss_mib(),
            "allocated_blocks": heap.allocated_blocks(),
            "malloc_in_use_bytes": heap.malloc_in_use_bytes(),
        }
        if n % 3 == 0:
            row.update(_arenas())
        if trim:
            libc.malloc_trim(0)
            row["rss_mib_after_trim"] = _rss_mib()
        with path.open("a") as out:
            out.write(json.dumps(row) + "\n")


def main() -> int:
    out = Path(os.environ["MEMORY_PROBE_DIR"])
    out.mkdir(parents=True, exist_ok=True)
    name = os.environ.get("PIPELINE_INSTANCE_ID", "agent")
    path = out / f"{name}-{os.getpid()}.jsonl"
    trim = os.environ.get("MEMORY_PROBE_TRIM") == "1"
    threading.Thread(target=_probe, args=(path, trim), name="memory-probe", daemon=True).start()
    return cli.main(["run", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
