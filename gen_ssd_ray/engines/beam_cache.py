"""Which student KV a scorer keeps per trajectory, and what it evicts: pure bookkeeping.

A trajectory (`ScoreRequest.group`) scored at step t leaves, per live beam,
- its accepted context (prompt + accepted response), its KV once, as a chain of nodes (each call adds
  the part of the context it ran, on top of the node it continued), and
- its K **suffixes**: each candidate's own tokens, KV only for those tokens, on top of the context.
Step t+1 continues one suffix per beam (the selected candidate): its context is the old context + that
suffix, found by `lookup`, and nothing is copied; once the call's nodes are committed, `drop_older` drops
everything of the group from before the call that no new node continues (the losing suffixes). So a beam costs
`context + K x chunk` tokens of KV between calls, never `K x context`.

The budget is in tokens of KV (the scorer converts its bytes); `need` is what a call adds before it
commits (new bases and suffixes, its working buffers). `make_room` evicts whole trajectories, those
neither being scored nor queued first (then queued ones, never the forward's own), and the **most
recently scored first**: a trajectory
just scored is waiting for its teacher's next chunk, the furthest from its next score call, while the
least recently scored is about to come back (least-recently-used eviction under round-robin access
evicts exactly what is needed next and hits 0%). A trajectory that was evicted misses: its next call
recomputes its context (`lookup` returns no hit), correctly and at a cost.

A trajectory's first call also looks at the first contexts of recent other trajectories: the part
they share (the chat template and system prompt, the whole prompt for several trajectories of one
problem) is copied, not run again (`Hit.shared`).

Payloads are opaque (the hf scorer's KV tensors; None in the simulated scorer). Not thread-safe: the
scorer calls it from its one worker thread.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Node:
    """KV of token positions `[start, len(ids))` of the sequence `ids`; a suffix's `parent` holds
    `[0, start)`."""

    ids: tuple[int, ...]
    start: int
    kv: Any
    generation: int
    parent: Node | None = None

    @property
    def tokens(self) -> int:
        return len(self.ids) - self.start

    def segments(self, length: int) -> list[tuple[Node, int]]:
        """(node, tokens of that node to take) covering positions [0, length) of `ids`."""
        if self.parent is None:
            return [(self, length)]
        if length <= self.start:
            return self.parent.segments(length)
        return [*self.parent.segments(self.start), (self, length - self.start)]


@dataclass
class _Group:
    nodes: list[Node] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(n.tokens for n in self.nodes)


@dataclass(frozen=True)
class Hit:
    """The cached part of a context: `node.segments(length)`; `length` 0 is a miss. `shared`: the
    node is another trajectory's (a common prompt prefix): the caller copies that part into the new
    trajectory's own first node instead of linking to it."""

    node: Node | None
    length: int
    shared: bool = False


# A trajectory's first call may start from the context of a recent other trajectory's first call,
# as far as they agree (the chat template, a system prompt, the same problem for several
# trajectories), if that is at least SHARED_MIN_TOKENS; the last ROOTS first contexts are candidates.
SHARED_MIN_TOKENS = 16
ROOTS = 16


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class BeamCache:
    """See the module docstring."""

    def __init__(self, budget_tokens: int):
        self.budget_tokens = int(budget_tokens)
        self._groups: OrderedDict[str, _Group] = OrderedDict()  # least recently scored first
        self.tokens = 0
        self.evicted_groups = 0
        self._roots: OrderedDict[int, tuple[str, Node]] = OrderedDict()  # first contexts, newest last

    def __contains__(self, group: str) -> bool:
        return group in self._groups

    def groups(self) -> list[str]:
        return list(self._groups)

    def lookup(self, group: str, context: Sequence[int], keep_last: int = 1) -> Hit:
        """The longest cached sequence of `group` that is a prefix of `context`, capped so that the
        last `keep_last` tokens of the context are run again (their outputs are needed)."""
        g = self._groups.get(group)
        best: Node | None = None
        if g is not None:
            ctx = tuple(context)
            # longest first: the first match is the answer, usually one of the last call's nodes (a
            # group keeps its whole chain, and comparing every node would cost steps x context)
            for n in sorted(g.nodes, key=lambda n: len(n.ids), reverse=True):
                if len(n.ids) <= len(ctx) and ctx[: len(n.ids)] == n.ids:
                    best = n
                    break
        if best is None:
            return self._shared(tuple(context), keep_last)
        length = min(len(best.ids), len(context) - keep_last)
        return Hit(best, length) if length > 0 else Hit(None, 0)

    def _shared(self, context: tuple[int, ...], keep_last: int) -> Hit:
        best, length = None, 0
        for _, node in reversed(self._roots.values()):
            n = common_prefix(node.ids, context)
            if n > length:
                best, length = node, n
        length = min(length, len(context) - keep_last)
        return Hit(best, length, shared=True) if length >= SHARED_MIN_TOKENS else Hit(None, 0)

    def commit(self, group: str, nodes: Iterable[Node]) -> None:
        """Add a call's new nodes to `group`, now the most recently scored."""
        g = self._groups.setdefault(group, _Group())
        self._groups.move_to_end(group)
        nodes = list(nodes)
        g.nodes.extend(nodes)
        self.tokens += sum(n.tokens for n in nodes)
        for n in nodes:
            if n.parent is None and n.start == 0:
                self._roots[id(n)] = (group, n)
                while len(self._roots) > ROOTS:
                    self._roots.popitem(last=False)

    def drop_older(self, group: str, generation: int) -> None:
        """Drop the group's nodes from before `generation` that no newer node continues (the losing
        candidates of the last call, contexts no beam continues)."""
        g = self._groups.get(group)
        if g is None:
            return
        keep = [n for n in g.nodes if n.generation >= generation]
        ancestors: set[int] = set()
        for n in keep:
            while (n := n.parent) is not None:
                ancestors.add(id(n))
        keep += [n for n in g.nodes if n.generation < generation and id(n) in ancestors]
        self.tokens += sum(n.tokens for n in keep) - g.tokens
        kept = {id(n) for n in keep}
        for n in g.nodes:
            if id(n) not in kept:
                self._roots.pop(id(n), None)
        g.nodes = keep

    def release(self, groups: Iterable[str]) -> None:
        for name in groups:
            g = self._groups.pop(name, None)
            if g is not None:
                self.tokens -= g.tokens
                for n in g.nodes:
                    self._roots.pop(id(n), None)

    def make_room(self, need: int, protect: set[str] = frozenset(), keep: set[str] = frozenset()) -> bool:
        """Evict trajectories until `need` more tokens fit the budget: first those not in `protect`
        (neither queued nor being scored), most recently scored first; then, if that is not enough,
        protected ones too (they will recompute), but never one in `keep` (the forward's own). False
        if even that cannot make room."""
        for spare in (protect | keep, keep):
            for name in reversed(list(self._groups)):
                if self.tokens + need <= self.budget_tokens:
                    return True
                if name not in spare:
                    self.release([name])
                    self.evicted_groups += 1
        return self.tokens + need <= self.budget_tokens


def run_fitting(
    batch: list, fits: Callable[[list], bool], run: Callable[[list], None], too_big: Callable[[Any], None]
) -> None:
    """Run `batch` when `fits(batch)` (which makes room for it); otherwise its halves the same way,
    in order, down to single items; an item that cannot fit alone goes to `too_big`."""
    if fits(batch):
        run(batch)
    elif len(batch) > 1:
        half = len(batch) // 2
        run_fitting(batch[:half], fits, run, too_big)
        run_fitting(batch[half:], fits, run, too_big)
    else:
        too_big(batch[0])


def forward_kv_tokens(pasts: Sequence[int], queries: Sequence[int]) -> int:
    """KV tokens a batched forward holds besides the cache: its right-padded past (every row as long
    as the longest cached prefix of the batch) with the query KV appended, and the new KV kept."""
    if not pasts:
        return 0
    return len(pasts) * (max(pasts) + max(queries)) + sum(queries)
