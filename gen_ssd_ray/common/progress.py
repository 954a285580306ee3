"""Progress display for the driver: problems done / pruned / errors / total, tokens per second, ETA.

A tqdm bar when enabled (tqdm computes the ETA); otherwise one log line every `every_s` seconds, which
is what `ray job logs` shows best.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("gen_ssd_ray")


class Progress:
    def __init__(self, total: int, initial: int = 0, enabled: bool = True, every_s: float = 15.0):
        self.total, self.initial, self.every_s = total, initial, every_s
        self.started = self.last_log = time.perf_counter()
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="problem", dynamic_ncols=True, desc="generate")

    def update(self, stats) -> None:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        fields = {
            "pruned": stats.statuses.get("pruned", 0),
            "errors": stats.statuses.get("error", 0),
            "tok/s": f"{stats.teacher_tokens / elapsed:.0f}",
        }
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(fields, refresh=False)
            return
        now = time.perf_counter()
        done = self.initial + stats.problems_done
        if now - self.last_log >= self.every_s or done == self.total or stats.problems_done == 1:
            self.last_log = now
            rate = stats.problems_done / elapsed
            eta = (self.total - done) / rate if rate else float("nan")
            log.info(
                "problems %d/%d (pruned %s, errors %s), teacher %s tok/s, ETA %.0f s",
                done,
                self.total,
                fields["pruned"],
                fields["errors"],
                fields["tok/s"],
                eta,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
