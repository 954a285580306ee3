"""Speed of decontamination (gen_ssd_ray.common.decontam) at scale: training problems checked per second.

    python scripts/bench_decontam.py                          # 1M training problems x 10k evaluation problems
    python scripts/bench_decontam.py --train 100000 --eval 2000

Builds, in memory and seeded, an evaluation set of `--eval` problems (GSM8K test, then its questions with
their numbers redrawn) and `--train` training problems (GSM8K train questions with their numbers redrawn,
so most share template phrasing with nothing; one in `--contaminated` is a test question verbatim and
one in the same number a test question with one number changed). Then times building the index and
checking every training problem (`EvalIndex.match` and the threshold, one core), and prints problems per
second, how many were dropped and the index's size, then a closing JSON line. Numbers only: nothing here
is asserted.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_NUMBER = re.compile(r"\d+")


def _questions(split: str) -> list[str]:
    path = ROOT / "data" / "gsm8k" / f"{split}.jsonl"
    return [json.loads(line)["question"] for line in path.read_text().splitlines() if line.strip()]


def _redraw(text: str, rng: random.Random) -> str:
    return _NUMBER.sub(lambda m: str(rng.randint(2, 999)), text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=1_000_000)
    ap.add_argument("--eval", type=int, default=10_000)
    ap.add_argument(
        "--contaminated", type=int, default=1000, help="one in N training problems is a test copy"
    )
    ap.add_argument("--ngram", type=int, default=8)
    ap.add_argument("--threshold", type=float, default=0.5)
    args = ap.parse_args(argv)

    from gen_ssd_ray.common.decontam import EvalIndex

    rng = random.Random(0)
    test, train = _questions("test"), _questions("train")
    evals = test[: args.eval] + [_redraw(rng.choice(test), rng) for _ in range(args.eval - len(test))]
    t0 = time.perf_counter()
    items = []
    for i in range(args.train):
        if i % args.contaminated == 0:
            items.append(rng.choice(test))  # verbatim
        elif i % args.contaminated == 1:
            q = rng.choice(test)
            items.append(_NUMBER.sub(lambda m: str(int(m.group()) + 1), q, count=1))  # one number changed
        else:
            items.append(_redraw(rng.choice(train), rng))
    made = time.perf_counter() - t0

    t0 = time.perf_counter()
    index = EvalIndex(enumerate(evals), args.ngram)
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    dropped = exact = 0
    for text in items:
        m = index.match(text)
        if m.contaminated(args.threshold):
            dropped += 1
            exact += m.exact
    checked = time.perf_counter() - t0
    result = {
        "train_problems": args.train,
        "eval_problems": len(index),
        "ngram": args.ngram,
        "threshold": args.threshold,
        "index_ngrams": len(index.postings),
        "index_build_s": round(built, 2),
        "check_s": round(checked, 2),
        "problems_per_s": round(args.train / checked),
        "dropped": dropped,
        "dropped_exact": exact,
        "planted": 2 * len(range(0, args.train, args.contaminated)),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "data_build_s": round(made, 1),
    }
    print(
        f"index: {len(index)} evaluation problems, {len(index.postings)} distinct {args.ngram}-grams, "
        f"built in {built:.2f} s"
    )
    print(
        f"check: {args.train} training problems in {checked:.1f} s = {result['problems_per_s']} problems/s "
        f"(one core); dropped {dropped} ({exact} exact duplicates; {result['planted']} planted)"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
