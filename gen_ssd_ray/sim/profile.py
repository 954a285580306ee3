"""Time and memory constants of simulated engines, and the compressed clock they run on.

A profile is a YAML file with a `source` (where its numbers come from), a `teacher` section and a
`scorer` section (`TeacherProfile`, `ScorerProfile`). Named profiles live in conf/sim/<name>.yaml;
`load_profile` takes a name or a path.

The teacher models a continuous-batching engine: one decode step of a batch of `b` sequences whose
contexts add up to `c` tokens takes `step_base_s + step_per_seq_s * b + step_per_ctx_token_s * c`
simulated seconds, and a prompt's uncached tokens cost `prefill_per_token_s` each. The scorer takes
`call_base_s + per_token_s * tokens` per call, where tokens are those it must (re)process.

`SimClock` maps simulated seconds to wall-clock seconds through `time_compression`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

PROFILES_DIR = Path(__file__).resolve().parents[2] / "conf" / "sim"


@dataclass(frozen=True)
class TeacherProfile:
    step_base_s: float
    step_per_seq_s: float
    step_per_ctx_token_s: float
    prefill_per_token_s: float
    # KV cache of one engine, in tokens (vLLM reports it as blocks x block_size).
    kv_capacity_tokens: int
    block_size: int = 16
    # Probability that a sampled token is EOS (mean response length 1/p tokens).
    eos_prob: float = 0.002
    # Model load + warm-up, simulated seconds (a restarted actor pays it again).
    load_s: float = 60.0


@dataclass(frozen=True)
class ScorerProfile:
    call_base_s: float
    per_token_s: float
    # Tokens of KV (cached contexts plus a call's working set) the device holds; beyond it a call
    # fails with an out-of-memory error, as a GPU does.
    memory_tokens: int
    # Mean student NLL per token, and its spread between candidates (selection and pruning).
    nll_mean: float = 0.7
    nll_spread: float = 0.3
    load_s: float = 20.0


@dataclass(frozen=True)
class Profile:
    name: str
    source: str
    teacher: TeacherProfile
    scorer: ScorerProfile


def _section(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ValueError(f"{where}: must be a mapping of {cls.__name__} keys, got {data!r}")
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(names)}")
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    missing = required - set(data)
    if missing:
        raise ValueError(f"{where}: missing keys {sorted(missing)}")
    return cls(**data)


def load_profile(name_or_path: str) -> Profile:
    """The profile `conf/sim/<name>.yaml`, or the YAML file at a path. Raises ValueError if missing
    or malformed (the message names the file)."""
    import yaml

    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
        raise ValueError(
            f"sim.profile: no profile {name_or_path!r} (named profiles: {known}, or a YAML path)"
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must be a mapping with source, teacher and scorer, got {data!r}")
    for key in ("source", "teacher", "scorer"):
        if key not in data:
            raise ValueError(f"{path}: missing the {key!r} section")
    return Profile(
        name=path.stem,
        source=str(data["source"]).strip(),
        teacher=_section(TeacherProfile, data["teacher"], f"{path}: teacher"),
        scorer=_section(ScorerProfile, data["scorer"], f"{path}: scorer"),
    )


class SimClock:
    """Simulated time: `now()` in simulated seconds since `epoch` (wall-clock Unix seconds), and
    `work(sim_s)`, which keeps a device busy for `sim_s / compression` wall-clock seconds.

    `work` schedules against a cursor (the time the device's previous work ends), not from when it is
    called: the Python bookkeeping between two steps overlaps the simulated device time, as the
    host's scheduling overlaps a GPU's kernels, so a busy host process does not slow the simulated
    device down (unless it falls behind by more than a step, which then shows as lost throughput).
    """

    def __init__(self, compression: float, epoch: float | None = None):
        self.compression = compression
        self.epoch_given = epoch is not None
        self.epoch = time.time() if epoch is None else epoch
        self.cursor = 0.0  # time.monotonic() at which the device's work so far ends

    def now(self) -> float:
        return (time.time() - self.epoch) * self.compression

    async def sleep(self, sim_s: float) -> None:
        """Wait `sim_s` simulated seconds (idle waits: polling a fault, loading a model)."""
        await asyncio.sleep(max(0.0, sim_s) / self.compression)

    async def work(self, sim_s: float) -> None:
        now = time.monotonic()
        self.cursor = max(self.cursor, now) + max(0.0, sim_s) / self.compression
        await asyncio.sleep(self.cursor - now)
