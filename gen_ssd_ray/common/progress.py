"""Progress of a job over problems: done / total, generated tokens per second, ETA, job-specific counts.

A tqdm bar when enabled (tqdm computes the ETA); otherwise one log line every `every_s` seconds (and
for the first and the last problem), which is what `ray job logs` shows best.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger("gen_ssd_ray")


class Progress:
    def __init__(
        self, desc: str, total: int | None, initial: int = 0, enabled: bool = True, every_s: float = 15.0
    ):
        self.desc, self.total, self.every_s = desc, total, every_s
        self.done = self.initial = initial
        self.tokens = 0
        self.started = self.last_log = time.perf_counter()
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="problem", dynamic_ncols=True, desc=desc)

    def update(self, problems: int, tokens: int, **counts: Any) -> None:
        """`problems` more are done, having generated `tokens`; `counts` are shown as they are."""
        self.done += problems
        self.tokens += tokens
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        fields = {**counts, "tok/s": f"{self.tokens / elapsed:.0f}"}
        if self.bar is not None:
            self.bar.update(problems)
            self.bar.set_postfix(fields, refresh=False)
            return
        now = time.perf_counter()
        first = self.done - self.initial == problems
        if now - self.last_log >= self.every_s or (self.total and self.done >= self.total) or first:
            self.last_log = now
            rate = (self.done - self.initial) / elapsed
            eta = (self.total - self.done) / rate if rate and self.total else float("nan")
            shown = ", ".join(f"{k} {v}" for k, v in fields.items())
            log.info(
                "%s: problems %d/%s (%s), ETA %.0f s", self.desc, self.done, self.total or "?", shown, eta
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
