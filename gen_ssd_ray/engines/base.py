"""The engine boundary: what an actor needs from a teacher backend and from a scorer backend.

Actors (gen_ssd_ray.engines.actors) hold one backend each and call nothing else, so any class that
satisfies these protocols can stand behind the real actors, beam managers and driver. Backends are
picked by name from `gen_ssd_ray.engines.registry` (`teacher.backend`, `student.backend`,
`model.backend`); each is built from its config section with the model path resolved.

Every method is a coroutine: the actor is async, and a backend that blocks (a torch forward) runs it
in a worker thread itself. Sampling travels with every request (`ExpandRequest.temperature`, `top_p`,
`seed`), never with the engine, so one engine serves generation and evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from gen_ssd_ray.core.types import ExpandRequest, ExpandResult, ScoreRequest, ScoreResult

if TYPE_CHECKING:
    from gen_ssd_ray.common.config import SimConfig
    from gen_ssd_ray.generate.config import StudentConfig


class EngineDead(RuntimeError):
    """The engine inside a live actor is gone (vLLM's EngineDeadError, a simulated dead engine core).
    The actor answers the call with this error and then ends its process, so that Ray restarts it
    (`max_restarts`) with a fresh engine, and callers move the work elsewhere at once."""


@dataclass(frozen=True)
class EngineContext:
    """Where a backend stands: its index in its pool (teacher engines, scorers) and, for the
    simulated backends, the `sim` config section (profile, time compression, fault schedule)."""

    index: int = 0
    sim: SimConfig | None = None
    restarted: bool = False  # the actor was restarted by Ray (a fresh engine after a failure)


@dataclass(frozen=True)
class Sample:
    """One generated response: its token ids, its text, and why it ended.

    `finish_reason` is vLLM's: "stop" (EOS or a stop string), "length" (`max_tokens` or the model
    length reached) or "abort".
    """

    token_ids: tuple[int, ...]
    text: str
    finish_reason: str


@dataclass(frozen=True)
class Generation:
    """The n samples of one prompt, or the reason the engine rejected that prompt (`error`)."""

    samples: tuple[Sample, ...] = ()
    error: str | None = None


def to_generations(
    outcomes: Sequence[Any], samples_of: Callable[[Any], tuple[Sample, ...]]
) -> list[Generation]:
    """Per-prompt outcomes of a backend's `generate` (results, or exceptions from
    `asyncio.gather(..., return_exceptions=True)`) as Generations: a ValueError (input the engine
    rejects, e.g. too long) becomes a Generation with `error`; any other exception (a dead engine) is
    raised; a result becomes its `samples_of(result)`."""
    out = []
    for o in outcomes:
        if isinstance(o, ValueError):
            out.append(Generation(error=f"{type(o).__name__}: {o}"))
        elif isinstance(o, BaseException):
            raise o
        else:
            out.append(Generation(samples_of(o)))
    return out


@runtime_checkable
class TeacherBackend(Protocol):
    async def expand(self, requests: Sequence[ExpandRequest]) -> list[ExpandResult]:
        """K continuations per request (one request per partial solution), run concurrently."""

    async def generate(self, requests: Sequence[ExpandRequest]) -> list[Generation]:
        """Whole responses with text and finish reason. A prompt the engine rejects as input comes
        back as a `Generation` with `error`; any other failure (a dead engine) is raised."""

    async def reset_prefix_cache(self) -> None:
        """Forget cached prefixes (a benchmark's cold start); a backend without a cache does nothing."""

    async def check_health(self) -> None:
        """Raise if the engine cannot serve requests (EngineDead when its engine core is gone)."""

    def progress(self) -> int:
        """A counter that advances whenever the engine does work (decode steps, finished requests):
        a caller whose request is late tells a busy engine (advancing) from a hung one."""

    def capacity(self) -> dict[str, int]:
        """What the engine holds at once: `kv_tokens` (KV cache, in tokens) and `max_num_seqs`."""

    def shutdown(self) -> None:
        """Stop the engine's processes now."""


@runtime_checkable
class ScorerBackend(Protocol):
    async def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        """Student NLL of each request's candidates. Raises ValueError for a request the model cannot
        hold (that problem becomes an error row)."""

    async def release(self, groups: Sequence[str]) -> None:
        """Drop whatever is kept for these trajectories (finished or abandoned)."""

    async def check_health(self) -> None:
        """Raise if the scorer cannot serve requests."""

    # Optional: `capacity() -> {"kv_tokens": ...}`, the KV tokens the scorer holds at once (cached
    # beams and a forward's working set), for admission (gen_ssd_ray.generate.admission).

    def progress(self) -> int:
        """A counter that advances whenever the scorer finishes work (see TeacherBackend.progress)."""

    def shutdown(self) -> None:
        """Free the model."""


@dataclass(frozen=True)
class ScorerSpec:
    """What a scorer backend is built from: the `student` config section (model path resolved), the
    teacher's model path (for token alignment when the vocabularies differ) and the longest sequence
    it must hold (the teacher's `max_model_len`)."""

    student: StudentConfig
    teacher_model: str
    max_model_len: int = 2048
    device: str = "auto"  # "auto": cuda when available, else cpu
    sim: SimConfig | None = None  # the simulated scorer's section (gen_ssd_ray.sim)
