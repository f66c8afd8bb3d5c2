"""A deliberately BROKEN DatabaseAgent, for the negative control of test_network_faults.py:
it does not check its fence. Its compare-and-set runs, but a miss is not a
:class:`~pipeline.errors.FencedError`: the batch is written whatever the stored offsets say.

After a COMMIT whose answer was lost (the hook of tests/integration/hooked_agent.py), the real
agent's retry misses its compare-and-set (the lost COMMIT did commit) and drops the batch;
this one writes the batch a second time, and the exactly-once oracle must catch the
duplicate rows. Run as ``python -m tests.integration.broken_fence_agent``, with the
environment of ``pipeline run`` and the hook's.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pipeline import db
from tests.integration import hooked_agent

COMMAND = [sys.executable, "-m", "tests.integration.broken_fence_agent"]


async def _unchecked_advance_offsets(
    conn: db.Connection, group: str, moves: Sequence[tuple[str, int, int, int]]
) -> None:
    """BROKEN: the compare-and-set of :func:`pipeline.db.advance_offsets`, its row count
    never looked at."""
    await conn.execute(
        """UPDATE ingest_offsets AS o SET next_offset = m.new, updated_at = now()
           FROM unnest($2::text[], $3::int[], $4::bigint[], $5::bigint[]) AS m(t, p, expected, new)
           WHERE o.group_id = $1 AND o.topic = m.t AND o.partition = m.p
             AND o.next_offset = m.expected""",
        group,
        [m[0] for m in moves],
        [m[1] for m in moves],
        [m[2] for m in moves],
        [m[3] for m in moves],
    )


def main() -> int:
    db.advance_offsets = _unchecked_advance_offsets
    return hooked_agent.main()


if __name__ == "__main__":
    sys.exit(main())
