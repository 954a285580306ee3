"""Which scorer scores a trajectory: sticky, spread over every scorer, with bounded load.

A scorer keeps a trajectory's accepted context cached between chunks, so all chunks of one trajectory
(its `group`) should go to the same scorer; and every scorer should get an equal share, however many
teacher engines there are. `ScorerRouter` does both with rendezvous hashing with bounded load
(consistent hashing in the style of Mirrokni, Thorup and Zadimoghaddam, "Consistent Hashing with
Bounded Loads", 2018): each scorer gets a pseudo-random score per group; a new group goes to the
highest-scoring scorer whose load (groups assigned to it now) is below
`ceil((1 + epsilon) * (groups + 1) / scorers)`, and stays there until it is released. The ranking of
a group is also its fallback order: when its scorer is down, the next one in the ranking takes it
(`moved`), and keeps it, so its cache is rebuilt in one place.

Pure bookkeeping: no Ray, no asyncio. One router per beam manager (each balances its own groups).
"""

from __future__ import annotations

import hashlib
import math


def _score(group: str, scorer: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{group}\0{scorer}".encode(), digest_size=8).digest(), "big")


class ScorerRouter:
    def __init__(self, num_scorers: int, epsilon: float = 0.25):
        if num_scorers < 1:
            raise ValueError(f"num_scorers must be >= 1, got {num_scorers}")
        self.n, self.epsilon = num_scorers, epsilon
        self.load = [0] * num_scorers
        self.of: dict[str, int] = {}
        self._order: dict[str, list[int]] = {}  # a live group's order (its scorer, then its ranking)

    def ranking(self, group: str) -> list[int]:
        """Every scorer, best first, for this group (the same on every call and every manager)."""
        return sorted(range(self.n), key=lambda s: _score(group, s), reverse=True)

    def order(self, group: str) -> list[int]:
        """The scorers to try for this group: its assigned one first (assigning it now if new), then
        the rest of its ranking."""
        order = self._order.get(group)
        if order is None:
            rank = self.ranking(group)
            cap = math.ceil((1 + self.epsilon) * (len(self.of) + 1) / self.n)
            s = next((c for c in rank if self.load[c] < cap), rank[0])
            self.of[group] = s
            self.load[s] += 1
            order = self._order[group] = [s, *(c for c in rank if c != s)]
        return order

    def moved(self, group: str, scorer: int) -> None:
        """The group was scored elsewhere (its scorer was down): it stays there from now on."""
        old = self.of.get(group)
        if old == scorer:
            return
        if old is not None:
            self.load[old] -= 1
        self.of[group] = scorer
        self.load[scorer] += 1
        self._order[group] = [scorer, *(c for c in self.ranking(group) if c != scorer)]

    def release(self, group: str) -> None:
        """The trajectory ended (or was abandoned)."""
        s = self.of.pop(group, None)
        self._order.pop(group, None)
        if s is not None:
            self.load[s] -= 1
