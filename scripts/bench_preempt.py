"""Mid-trajectory resume, measured (`make bench-preempt`): what a preemption costs with the journal of
accepted chunks (gen_ssd_ray.generate.journal) and without it.

    python -m scripts.bench_preempt [--part sim|cpu|both] [--problems N] [--limit N] [--cycles N]

(a) `sim`: the simulated cluster (H100 profile, EOS once per `--eos-every` tokens, search.max_new_tokens
    16384: trajectories of ~16k tokens), `python -m jobs.generate` as a subprocess. An uninterrupted
    run gives the teacher tokens the problems need (U, counted by the simulated engines themselves:
    gen_ssd_ray.sim.teacher TOKENS_ENV) and the journal's bytes and writes. Then, with the journal on
    and off (runtime.journal_interval_s=0: the job as it was), a run is SIGKILLed (its process group
    and every process it started, Ray's included) once its engines have decoded 80% of U and the same command is resubmitted. Regenerated teacher
    tokens = decoded before the kill + decoded after it - U; reported as a fraction of U and of the
    tokens decoded after the resume and of the work in flight at the kill (decoded tokens not in a
    committed row), with the run's `resume/*` counters and the exactly-once check.
(b) `cpu`: the CPU default (conf/default.yaml, real vLLM and the embedded SmolLM2 models), `data.limit`
    problems, `--cycles` SIGKILLs of the job (its process group and every process it started) at
    random instants, each followed by the
    same command, then a final run to the end; and one uninterrupted run. Reported: problems lost and
    duplicated, restored trajectories whose final response does not begin with the tokens journaled at
    the kill, and teacher tokens over all cycles / the uninterrupted run's (counted by the beam
    managers as expansions arrive: gen_ssd_ray.generate.manager TEACHER_TOKENS_ENV; an expansion in
    flight at a kill is not counted, so this is a lower bound). `--store`: the output on a local
    folder, on S3 (a moto server on 127.0.0.1, reached through the standard AWS environment), or both.

Progress lines go to stdout; the last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
JOB = [sys.executable, "-m", "jobs.generate"]
TAG_ENV = "GEN_SSD_BENCH_PREEMPT_RUN"  # marks the processes of one job run (see `kill`)


def log(msg: str) -> None:
    print(f"[bench-preempt {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "RAY_AUTH_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        **extra,
    }


def counted(folder: Path) -> int:
    """Tokens counted in a folder of per-engine (or per-manager) counter files."""
    total = 0
    for f in folder.glob("*.txt") if folder.is_dir() else []:
        text = f.read_text().strip()
        total += int(text) if text else 0
    return total


def summary_of(stdout: str) -> dict:
    for line in stdout.splitlines()[::-1]:
        if line.startswith('{"output_dir"'):
            return json.loads(line)
    return {}


def run_to_end(args: list[str], env: dict, timeout: float = 3600) -> tuple[int, dict, float]:
    t0 = time.time()
    r = subprocess.run([*JOB, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        log(f"job exit {r.returncode}: {r.stderr[-2000:]}")
    return r.returncode, summary_of(r.stdout), time.time() - t0


def start(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [*JOB, *args],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _tagged(tag: str) -> list[int]:
    """Pids of the processes whose environment carries `tag` (the job's, Ray's and its workers')."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if f"{TAG_ENV}={tag}".encode() in (d / "environ").read_bytes().split(b"\0"):
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


def kill(proc: subprocess.Popen, tag: str | None = None) -> None:
    """SIGKILL the job's process group and, with `tag`, every process it started (Ray's services and
    workers run in sessions of their own and would otherwise keep generating and journaling for a
    moment: a preempted machine does not)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for _ in range(3 if tag else 0):
        for pid in _tagged(tag):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    proc.wait()


def exactly_once(out: str | Path, n: int) -> dict:
    from gen_ssd_ray.sim.harness import output_ids

    ids = output_ids(out)
    return {
        "committed": len(ids),
        "lost": n - len(ids),
        "duplicated": sum(c - 1 for c in ids.values() if c > 1),
    }


def _committed(out: Path) -> tuple[int, int]:
    """Committed problems and the teacher tokens of their rows."""
    from gen_ssd_ray.generate.manifest import read_manifest, read_output

    if read_manifest(out) is None:
        return 0, 0
    t = read_output(out, columns=["problem_id", "teacher_tokens_generated"]).to_pydict()
    return len(set(t["problem_id"])), sum(x or 0 for x in t["teacher_tokens_generated"])


# ---- (a) the simulated cluster ----------------------------------------------------------------------


def sim_part(tmp: Path, n: int, eos_every: int, compression: float, at: float) -> dict:
    from gen_ssd_ray.sim.harness import stand_in_models, write_problems
    from gen_ssd_ray.sim.teacher import TOKENS_ENV

    max_new = 16384
    data = write_problems(tmp / "sim.jsonl", n)
    teacher, student = stand_in_models(tmp / "models", max_new + 4096)
    profile = yaml.safe_load((ROOT / "conf" / "sim" / "h100.yaml").read_text())
    profile["source"] = f"conf/sim/h100.yaml with teacher.eos_prob 1/{eos_every} (scripts/bench_preempt.py)"
    profile["teacher"]["eos_prob"] = 1.0 / eos_every
    (tmp / "h100-16k.yaml").write_text(yaml.safe_dump(profile))
    common = [
        "--config",
        "conf/sim_cluster.yaml",
        f"data.path={data}",
        f"sim.profile={tmp / 'h100-16k.yaml'}",
        f"teacher.model={teacher}",
        f"student.model={student}",
        f"teacher.max_model_len={max_new + 4096}",
        f"search.max_new_tokens={max_new}",
        "teacher.num_engines=2",
        "student.num_scorers=2",
        "sim.engines_per_actor=2",
        "teacher.max_inflight_problems=32",
        "runtime.num_beam_managers=1",
        "output.shard_size=16",
        "sim.model_load=false",
        f"sim.time_compression={compression}",
    ]
    result: dict = {"problems": n, "max_new_tokens": max_new, "eos_prob": 1.0 / eos_every, "kill_at": at}

    ref_tokens = tmp / "tokens-ref"
    rc, ref, wall = run_to_end(
        [*common, f"output.dir={tmp / 'sim-ref'}"], _env(**{TOKENS_ENV: str(ref_tokens)})
    )
    u = counted(ref_tokens)
    sim_s = ref.get("elapsed_s", wall) * compression
    inflight = (ref.get("dispatch") or {}).get("peak_in_flight") or 0
    bytes_w, segs, steps = (ref.get(f"journal/{k}_written", 0) for k in ("bytes", "segments", "steps"))
    result["uninterrupted"] = {
        "rc": rc,
        "teacher_tokens": u,
        "rows_teacher_tokens": ref.get("teacher/tokens_generated"),
        "trajectories_by_status": ref.get("trajectories_by_status"),
        "sim_s": round(sim_s, 1),
        "peak_in_flight_trajectories": inflight,
        "journal_bytes": bytes_w,
        "journal_segments": segs,
        "journal_steps": steps,
        "journal_bytes_per_trajectory": round(bytes_w / n, 1) if n else None,
        # per in-flight trajectory per simulated second (segments are one object per manager write)
        "journal_bytes_per_inflight_traj_per_s": round(bytes_w / sim_s / inflight, 2) if inflight else None,
        "journal_records_per_inflight_traj_per_s": round(steps / sim_s / inflight, 4) if inflight else None,
        "journal_objects_per_s": round(segs / sim_s, 3) if sim_s else None,
    }
    log(f"sim uninterrupted: {result['uninterrupted']}")
    for mode, interval in (("journal", None), ("no_journal", "0")):
        extra = [] if interval is None else [f"runtime.journal_interval_s={interval}"]
        out = tmp / f"sim-{mode}"
        t1, t2 = tmp / f"tokens-{mode}-1", tmp / f"tokens-{mode}-2"
        args = [*common, *extra, f"output.dir={out}"]
        tag = f"{mode}-{time.time_ns()}"
        proc = start(args, _env(**{TOKENS_ENV: str(t1), TAG_ENV: tag}))
        while proc.poll() is None and counted(t1) < at * u:
            time.sleep(0.02)
        killed = proc.poll() is None
        kill(proc, tag)
        time.sleep(2.0)
        g1 = counted(t1)  # after every process of the run is gone
        committed_at_kill, committed_tokens = _committed(out)
        rc, s, _ = run_to_end(args, _env(**{TOKENS_ENV: str(t2)}))
        g2 = counted(t2)
        regenerated = g1 + g2 - u
        result[mode] = {
            "killed": killed,
            "rc": rc,
            "decoded_before_kill": g1,
            "decoded_after_resume": g2,
            "committed_at_kill": committed_at_kill,
            "committed_tokens_at_kill": committed_tokens,
            "regenerated_tokens": regenerated,
            "regenerated_frac_of_run": round(regenerated / u, 4) if u else None,
            "regenerated_frac_of_resumed": round(regenerated / g2, 4) if g2 else None,
            # of the work in flight at the kill (decoded, not in a committed row): 1.0 is "all of it"
            "regenerated_frac_of_inflight_work": round(regenerated / (g1 - committed_tokens), 4)
            if g1 > committed_tokens
            else None,
            "resume/trajectories_restored": s.get("resume/trajectories_restored"),
            "resume/teacher_tokens_restored": s.get("resume/teacher_tokens_restored"),
            **exactly_once(out, n),
        }
        log(f"sim {mode}: {result[mode]}")
    return result


# ---- (b) the CPU default ----------------------------------------------------------------------------


def _journaled_prefixes(out: str | Path) -> dict:
    from gen_ssd_ray.common.storage import Storage
    from gen_ssd_ray.generate.journal import JOURNAL_DIR, decode_segment

    store = Storage(str(out))
    steps: dict = {}
    for name in store.list(JOURNAL_DIR):
        if not name.endswith(".jsonl.gz") or name.rsplit("/", 1)[-1].startswith("."):
            continue
        try:
            lines = decode_segment(store.read_bytes(name))
        except (FileNotFoundError, OSError, EOFError):
            continue
        for line in lines:
            for s in line["steps"]:
                steps.setdefault((line["p"], line["t"]), {})[s["step"]] = s
    prefixes = {}
    for key, by_step in steps.items():
        ids, i = [], 0
        while i in by_step:
            ids += by_step[i]["kept"][0][2] if by_step[i]["kept"] else []
            i += 1
        prefixes[key] = tuple(ids)
    return prefixes


def cpu_part(
    tmp: Path,
    limit: int,
    cycles: int,
    seed: int,
    window: tuple[float, float],
    out: str | None = None,
    uninterrupted: int | None = None,
) -> dict:
    """(b) on `out` (default: a local folder under `tmp`; an s3:// URI with the S3 environment set).
    `uninterrupted`: the uninterrupted run's teacher tokens, measured before with the same arguments
    (its run is then skipped)."""
    from gen_ssd_ray.generate.manager import TEACHER_TOKENS_ENV
    from gen_ssd_ray.generate.manifest import read_output

    rng = random.Random(seed)
    common = ["--config", "conf/default.yaml", f"data.limit={limit}", "runtime.progress=false"]
    out = out or str(tmp / "cpu-out")
    where = "s3" if "://" in out else "local"
    ref_tokens = tmp / f"cpu-tokens-ref-{where}"
    if uninterrupted is None:
        rc, ref, ref_wall = run_to_end(
            [*common, f"output.dir={out}-ref"], _env(**{TEACHER_TOKENS_ENV: str(ref_tokens)})
        )
        u = counted(ref_tokens)
        log(f"cpu uninterrupted ({where}): rc {rc}, {u} teacher tokens, {ref_wall:.0f} s")
    else:
        u, ref_wall = uninterrupted, float("nan")
        log(f"cpu uninterrupted ({where}): not run, {u} teacher tokens as given (--uninterrupted-tokens)")
    args = [*common, f"output.dir={out}"]
    total_tokens, kills, mid_generation, bad_prefix, prefixes = 0, 0, 0, 0, {}
    for c in range(cycles):
        folder = tmp / f"cpu-tokens-{where}-{c}"
        tag = f"cpu-{c}-{time.time_ns()}"
        proc = start(args, _env(**{TEACHER_TOKENS_ENV: str(folder), TAG_ENV: tag}))
        delay = rng.uniform(*window)
        t0 = time.time()
        while proc.poll() is None and time.time() - t0 < delay:
            time.sleep(0.1)
        killed = proc.poll() is None
        if killed:
            kill(proc, tag)
            kills += 1
        time.sleep(2.0)
        total_tokens += counted(folder)
        # a kill after the teacher's first expansion of this run (not one during start-up or restore)
        mid_generation += killed and counted(folder) > 0
        prefixes.update(_journaled_prefixes(out))
        log(
            f"cpu cycle {c}: {f'killed after {delay:.0f} s' if killed else 'ended before its kill'}, "
            f"{counted(folder)} teacher tokens, {len(prefixes)} journaled"
        )
    folder = tmp / f"cpu-tokens-{where}-final"
    rc, s, _ = run_to_end(args, _env(**{TEACHER_TOKENS_ENV: str(folder)}))
    total_tokens += counted(folder)
    rows = read_output(out, columns=["problem_id", "trajectory_index", "response_token_ids"]).to_pylist()
    got = {(r["problem_id"], r["trajectory_index"]): tuple(r["response_token_ids"] or ()) for r in rows}
    for key, prefix in prefixes.items():
        if key in got and got[key][: len(prefix)] != prefix:
            bad_prefix += 1
    return {
        "limit": limit,
        "cycles": cycles,
        "kills": kills,
        "kills_mid_generation": mid_generation,
        "final_rc": rc,
        **exactly_once(out, limit),
        "journaled_trajectories_seen": len(prefixes),
        "restored_not_prefix": bad_prefix,
        "final_resume/trajectories_restored": s.get("resume/trajectories_restored"),
        "teacher_tokens_all_cycles": total_tokens,
        "teacher_tokens_uninterrupted": u,
        "teacher_tokens_ratio": round(total_tokens / u, 3) if u else None,
        "uninterrupted_wall_s": None if uninterrupted is not None else round(ref_wall, 1),
        "uninterrupted_measured_here": uninterrupted is None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("sim", "cpu", "both"), default="both")
    ap.add_argument("--problems", type=int, default=128, help="(a) problems")
    ap.add_argument("--eos-every", type=int, default=100_000, help="(a) mean tokens between EOS")
    ap.add_argument("--compression", type=float, default=40.0, help="(a) sim.time_compression")
    ap.add_argument(
        "--kill-at", type=float, default=0.8, help="(a) the kill, as a fraction of the run's tokens"
    )
    ap.add_argument("--limit", type=int, default=16, help="(b) data.limit")
    ap.add_argument("--cycles", type=int, default=20, help="(b) SIGKILL/resume cycles")
    ap.add_argument("--window", type=float, nargs=2, default=(30.0, 90.0), help="(b) kill delay range, s")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--uninterrupted-tokens",
        type=int,
        default=None,
        help="(b) the uninterrupted run's teacher tokens, from an earlier run with the same --limit "
        "(skips that run)",
    )
    ap.add_argument(
        "--store",
        choices=("local", "s3", "both"),
        default="both",
        help="(b) output on a local folder, on S3 (an S3-compatible server on 127.0.0.1: tests/s3server.py), or both",
    )
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-preempt-"))
    result: dict = {"tmp": str(tmp)}
    if args.part in ("sim", "both"):
        result["sim"] = sim_part(tmp, args.problems, args.eos_every, args.compression, args.kill_at)
    if args.part in ("cpu", "both"):
        window = tuple(args.window)
        if args.store in ("local", "both"):
            result["cpu_local"] = cpu_part(
                tmp, args.limit, args.cycles, args.seed, window, None, args.uninterrupted_tokens
            )
        if args.store in ("s3", "both"):
            from tests.s3server import local_s3, make_bucket, s3_environ

            with local_s3() as endpoint:
                os.environ.update(s3_environ(endpoint))  # the jobs (subprocesses) inherit it
                bucket = make_bucket("bench-preempt", endpoint)
                result["cpu_s3"] = cpu_part(
                    tmp,
                    args.limit,
                    args.cycles,
                    args.seed,
                    window,
                    f"{bucket}/cpu-out",
                    args.uninterrupted_tokens,
                )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
