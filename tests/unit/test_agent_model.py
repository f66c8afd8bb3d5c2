"""A model of the DatabaseAgent's orchestration, driven at random: the real Ownership, Batch
and plan, with a model of the consumer (assignment, pauses, fetch positions), the batch being
filled and one batch in flight, rebalances (new partitions may fetch before the callback
pauses them), switching streams off and on, stream failures, transient retries, another
writer moving stored offsets back (a rollback or replay: the fence), and Kafka's committed
offsets reset anywhere. Every committed batch must write exactly its offsets from the stored
one, with no gap; after a drain, every offset must be written exactly once and every stored
offset must be the end. A partition left paused or unpositioned forever fails the drain.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from pipeline.batching import Batch, Plan, plan
from pipeline.ownership import Actions, Ownership

TOPICS = {"m": "metrics", "e": "events"}
PARTS = [("m", 0), ("m", 1), ("e", 0), ("e", 1)]
Part = tuple[str, int]


@dataclass
class Rec:
    topic: str
    partition: int
    offset: int
    serialized_value_size: int = 1


class World:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.own = Ownership(TOPICS)
        self.end = {p: 0 for p in PARTS}
        self.db = {p: 0 for p in PARTS}
        self.kafka_committed = {p: 0 for p in PARTS}
        self.written = {p: {} for p in PARTS}  # offset -> count
        self.assigned = set()
        self.paused = set()
        self.pos = {}
        self.filling = Batch()
        self.filling_ref = self.filling
        self.inflight = None
        self.window = False  # _filling still points at the batch in flight; nobody fills

    def apply(self, a: Actions) -> None:
        if a.forget:
            self.filling_ref.drop(a.forget)
        for p, o in a.seek.items():
            if p in self.assigned:
                self.pos[p] = o
        self.paused |= {p for p in a.pause if p in self.assigned}
        self.paused -= set(a.resume)

    def fetch(self) -> None:
        for p in sorted(self.assigned):
            if p in self.paused:
                continue
            if self.pos.get(p) is None:
                self.pos[p] = self.kafka_committed[p]  # aiokafka resets from Kafka's offset
            n = self.rng.randrange(0, 4)
            hi = min(self.end[p], self.pos[p] + n)
            recs = [Rec(p[0], p[1], o) for o in range(self.pos[p], hi)]
            if recs:
                self.pos[p] = hi
                if self.window or self.own.holding:  # getmany in _idle: rewound
                    self.apply(self.own.rewound_event([p]))
                else:
                    self.filling.add(p, recs, ([(r.offset,) for r in recs], []), 0.0)

    def rebalance(self) -> None:
        chosen = set(self.rng.sample(PARTS, self.rng.randrange(1, 5)))
        self.apply(self.own.revoked_event(sorted(self.assigned)))
        self.assigned = chosen
        self.paused = set()
        self.pos = {p: None for p in chosen}
        if self.rng.random() < 0.3:
            self.fetch()  # new partitions fetch before the callback pauses them
        self.apply(self.own.assigned_event(sorted(chosen)))

    def commit(self, work: Plan) -> bool:
        for m in work.moves:
            if self.db[(m.topic, m.partition)] != m.expected:
                return False
        for p, part in work.parts.items():
            m = next(x for x in work.moves if (x.topic, x.partition) == p)
            offs = [r.offset for r in part.records]
            assert offs == list(range(m.expected, m.new)), (
                "GAP/overlap",
                p,
                m,
                offs[:5],
                offs[-5:],
            )
            for o in offs:
                self.written[p][o] = self.written[p].get(o, 0) + 1
            self.db[p] = m.new
        self.own.committed_event(work.moves)
        return True

    def other_writer(self) -> None:
        p = self.rng.choice(PARTS)
        back = self.rng.randrange(0, self.db[p] + 1)
        for o in list(self.written[p]):
            if o >= back:
                del self.written[p][o]
        self.db[p] = back

    def random_event(self) -> None:
        r = self.rng.randrange(12)
        if r == 0:
            self.rebalance()
        elif r in (1, 2, 3):
            self.fetch()
        elif r == 4:
            self.apply(self.own.deactivate_event([self.rng.choice(list(TOPICS.values()))]))
        elif r == 5:
            self.apply(self.own.activate_event([self.rng.choice(list(TOPICS.values()))]))
        elif r == 6 and self.rng.random() < 0.3:
            self.other_writer()
        elif r == 7:
            for p in PARTS:
                self.end[p] += self.rng.randrange(0, 5)
        elif r == 8 and self.rng.random() < 0.3:
            self.kafka_committed = {p: self.rng.randrange(0, self.end[p] + 1) for p in PARTS}

    def write_inflight(self, drain: bool = False) -> None:
        batch = self.inflight
        try:
            while True:
                work = plan(batch, self.own.writable())
                if not work.moves:
                    self.apply(self.own.rewound_event(batch.parts))
                    return
                for _ in range(0 if drain else self.rng.randrange(3)):
                    self.random_event()
                outcome = (
                    "ok" if drain else self.rng.choice(["ok", "ok", "ok", "transient", "schema"])
                )
                if outcome == "ok":
                    if not self.commit(work):
                        self.apply(self.own.fenced_event(batch.parts))
                    return
                if outcome == "schema":
                    stream = TOPICS[self.rng.choice(list(work.parts))[0]]
                    self.apply(self.own.failed_event(stream, "broken"))
                    continue
                self.apply(self.own.hold_event())
                for _ in range(self.rng.randrange(3)):
                    self.random_event()
        finally:
            self.apply(self.own.release_event())
            self.inflight = None

    def step(self, drain: bool = False) -> None:
        # main loop: position (no write in flight), fill, wait for write, start write
        if self.own.unpositioned():
            if self.inflight is not None:
                self.write_inflight(drain)
            self.apply(self.own.positioned_event({p: self.db[p] for p in self.own.unpositioned()}))
        self.window = False
        for _ in range(self.rng.randrange(1, 5)):
            if not self.own.holding:
                self.fetch()
            if not drain:
                self.random_event()
        if self.inflight is not None:
            self.write_inflight(drain)
        if self.filling.count:
            self.inflight = self.filling  # _filling still points at it until the next fill
            self.window = True
            if not drain and self.rng.random() < 0.5:
                for _ in range(self.rng.randrange(3)):
                    self.random_event()
            self.window = False
            self.filling = self.filling_ref = Batch()  # the next _fill_batch
            if self.rng.random() < 0.5:
                self.write_inflight(drain)


def run(seed: int) -> None:
    w = World(random.Random(seed))
    w.rebalance()
    for _ in range(300):
        w.step()
    # drain: everything assigned, active, nothing new
    if w.inflight is not None:
        w.write_inflight(True)
    w.apply(w.own.revoked_event(sorted(w.assigned)))
    w.assigned = set(PARTS)
    w.paused = set()
    w.pos = {p: None for p in PARTS}
    w.apply(w.own.assigned_event(PARTS))
    w.apply(w.own.activate_event(list(TOPICS.values())))
    for _ in range(2000):
        w.step(drain=True)
        if w.inflight is not None:
            w.write_inflight(True)
        if all(w.db[p] == w.end[p] for p in PARTS):
            break
    for p in PARTS:
        assert w.db[p] == w.end[p], (
            seed,
            "stuck",
            p,
            w.db[p],
            w.end[p],
            p in w.paused,
            w.own.stream_state(TOPICS[p[0]]),
        )
        assert all(w.written[p].get(o) == 1 for o in range(w.end[p])), (seed, p, "not exactly once")


@pytest.mark.parametrize("seed", range(300))
def test_the_orchestration_writes_every_offset_exactly_once(seed: int) -> None:
    run(seed)
