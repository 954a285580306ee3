"""The pipeline's report: Markdown plus PNG plots, computed only from the run's own files.

Reads, under a pipeline's output folder: `generate/<method>/` (the committed shards), `eval/<model>/
summary.json`, and `<stage>/summary.json` + `metrics.jsonl` of every fine-tuning stage; writes
`report/report.md`, `report/metrics.json` (the same numbers, machine-readable) and, next to them, the
PNG figures of gen_ssd_ray.pipeline.figures (accuracy bars with 95% intervals, student-PPL histograms
on a log scale, cost versus accuracy per method, response lengths, training loss), which report.md
embeds with relative links. Anything missing (a method without rows or evaluation, a summary not
written, NaN PPLs) leaves that element out, and report.md says what was left out.

Per method: trajectories generated and kept (the method's `selected` column), mean response length
and mean student PPL of the kept ones, teacher tokens generated and student tokens processed per kept
trajectory, the distilled student's accuracy next to the cold-start student's and the teacher's, each with its
Wilson 95% interval (`wilson_interval`, printed as [lo, hi]).
Decontamination: how many problems (generation) and rows (fine-tuning) each stage dropped as
overlapping the evaluation set (`decontamination`).
It knows nothing about how the files were produced.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from gen_ssd_ray.common.fsio import atomic_write_json, atomic_write_text
from gen_ssd_ray.pipeline.figures import Figure, draw_figures

REPORT_DIR = "report"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def method_stats(out: Path, method: str) -> dict[str, Any]:
    """Generation numbers of one method, from its committed shards."""
    from gen_ssd_ray.generate.manifest import read_output

    df = read_output(out / "generate" / method).to_pandas()
    kept = df[df["selected"] == True]  # noqa: E712 (nullable column)
    completed = df[df["status"] == "completed"]
    n_kept = len(kept)

    def mean(series) -> float | None:
        s = series.dropna()
        return round(float(s.mean()), 3) if len(s) else None

    teacher_tokens = int(df["teacher_tokens_generated"].fillna(0).sum())
    student_tokens = int(df["student_tokens_processed"].fillna(0).sum())
    return {
        "method": method,
        "problems": int(df["problem_id"].nunique()),
        "trajectories": len(df),
        "by_status": {k: int(v) for k, v in df["status"].value_counts().items()},
        "completed_correct_frac": round(float((completed["correct"] == True).mean()), 3)  # noqa: E712
        if len(completed)
        else None,
        "kept": n_kept,
        "problems_with_kept": int(kept["problem_id"].nunique()),
        "kept_mean_response_tokens": mean(kept["num_response_tokens"]),
        "kept_mean_student_ppl": mean(kept["student_ppl"]),
        "teacher_tokens_generated": teacher_tokens,
        "student_tokens_processed": student_tokens,
        "teacher_tokens_per_kept": round(teacher_tokens / n_kept, 1) if n_kept else None,
        "student_tokens_per_kept": round(student_tokens / n_kept, 1) if n_kept else None,
        "_lengths": kept["num_response_tokens"].dropna().tolist(),
        "_ppls": kept["student_ppl"].dropna().tolist(),
        "_ppls_all": df["student_ppl"].dropna().tolist(),
    }


def collect(out: Path, methods: list[str]) -> dict[str, Any]:
    """Everything the report shows, from the stages this run recorded in pipeline.json (a folder left
    over from an earlier run whose stage did not run this time is not shown)."""
    from gen_ssd_ray.train.checkpoint import read_metrics

    out = Path(out)
    state = _read_json(out / "pipeline.json") or {}
    ran = {k for k, v in state.get("stages", {}).items() if v.get("status") in ("done", "skipped")}
    gens = {m: method_stats(out, m) for m in methods if f"generate/{m}" in ran}
    evals = {}
    for name in ["teacher", "cold_start", *methods]:
        s = _read_json(out / "eval" / name / "summary.json")
        if s is not None and f"eval/{name}" in ran:
            evals[name] = {**s, "ci95": accuracy_ci95(s)}
    training = {}
    for name in ["teacher", "cold_start", *(f"distill/{m}" for m in methods)]:
        s = _read_json(out / name / "summary.json")
        if s is not None and name in ran:
            training[name] = {"summary": s, "metrics": read_metrics(out / name)}
    return {
        "generation": gens,
        "eval": evals,
        "training": training,
        "decontamination": decontamination(state, training, methods),
        "state": state,
        "styles": lab_styles(out, list(gens), list(evals)),
        "paired": paired_comparisons(out, [m for m in methods if m in evals], list(evals)),
    }


def decontamination(
    state: dict[str, Any], training: dict[str, Any], methods: list[str]
) -> list[dict[str, Any]]:
    """What `data.decontaminate` dropped in each stage that recorded it: generation stages drop problems
    (`problems_dropped_contaminated` of their summary in pipeline.json), fine-tuning stages rows (the
    filter step labelled `decontaminate: ...` of their summary.json)."""
    from gen_ssd_ray.common.decontam import STEP_PREFIX

    rows = []
    for m in methods:
        summary = state.get("stages", {}).get(f"generate/{m}", {}).get("summary") or {}
        if "problems_dropped_contaminated" in summary:
            rows.append(
                {
                    "stage": f"generate/{m}",
                    "unit": "problems",
                    "dropped": summary["problems_dropped_contaminated"],
                    "kept": summary.get("problems_total"),
                }
            )
    for name, t in training.items():
        for step in t["summary"].get("filters") or []:
            if str(step.get("expr", "")).startswith(STEP_PREFIX):
                rows.append(
                    {
                        "stage": name,
                        "unit": "rows",
                        "dropped": step["before"] - step["after"],
                        "kept": step["after"],
                        "check": step["expr"],
                    }
                )
    return rows


def mcnemar_exact_p(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: the chance of a split at least this uneven of the discordant
    problems (solved by exactly one of two models) if both were equally good."""
    n, k = a_only + b_only, min(a_only, b_only)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def paired_comparisons(out: Path, methods: list[str], models: list[str]) -> list[dict[str, Any]]:
    """The first distilled method (Gen-SSD in the default) against every other evaluated student, on
    the same held-out problems: how many each one solved that the other did not, and the exact McNemar
    p-value. Paired on problems, it is far more sensitive than comparing two accuracies' intervals."""
    import pandas as pd

    if not methods:
        return []

    methods = [m for m in methods if (out / "eval" / m / "predictions.parquet").is_file()]
    models = [m for m in models if (out / "eval" / m / "predictions.parquet").is_file()]
    if not methods:
        return []

    def solved(name: str) -> pd.Series:
        df = pd.read_parquet(out / "eval" / name / "predictions.parquet", columns=["problem_id", "correct"])
        return df.assign(ok=df["correct"].fillna(False).astype(bool)).groupby("problem_id")["ok"].mean()

    ref = methods[0]
    a = solved(ref)
    rows = []
    for other in [m for m in models if m not in (ref, "teacher")]:
        b = solved(other).reindex(a.index)
        if b.isna().any():  # evaluated on other problems: not comparable
            continue
        a_only, b_only = int((a > b).sum()), int((b > a).sum())
        rows.append(
            {
                "method": ref,
                "other": other,
                "problems": int(len(a)),
                "method_only": a_only,
                "other_only": b_only,
                "p_value": round(mcnemar_exact_p(a_only, b_only), 4),
            }
        )
    return rows


def lab_styles(out: Path, methods: list[str], models: list[str]) -> dict[str, Any] | None:
    """On the lab task only (every problem id starts with ``lab-``): the style (`classify_style`) of each
    method's kept trajectories, and of each evaluated model's answers with its accuracy per style.
    This is what the methods' numbers rest on: which way of solving the student was taught, and which
    way it then solves held-out problems. None for any other task."""
    import pandas as pd

    from gen_ssd_ray.generate.manifest import read_output
    from gen_ssd_ray.lab.problems import STYLES, classify_style

    kept: dict[str, dict[str, int]] = {}
    for m in methods:
        df = read_output(out / "generate" / m).to_pandas()
        if len(df) == 0 or not df["problem_id"].str.startswith("lab-").all():
            return None
        styles = df.loc[df["selected"] == True, "response"].map(classify_style)  # noqa: E712
        kept[m] = {st: int((styles == st).sum()) for st in STYLES}
    answers: dict[str, dict[str, dict[str, Any]]] = {}
    for name in models:
        path = out / "eval" / name / "predictions.parquet"
        if not path.is_file():
            continue
        df = pd.read_parquet(path, columns=["problem_id", "response", "correct"])
        if len(df) == 0 or not df["problem_id"].str.startswith("lab-").all():
            return None
        df["style"] = df["response"].fillna("").map(classify_style)
        answers[name] = {
            st: {"answers": int(len(g)), "accuracy": round(float((g["correct"] == True).mean()), 3)}  # noqa: E712
            for st, g in df.groupby("style")
        }
    return {"kept": kept, "answers": answers}


Z95 = 1.959964  # the standard normal's 97.5% quantile


def wilson_interval(successes: float, total: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of a proportion `successes / total` (None when `total` is 0). Unlike the
    normal approximation it stays inside [0, 1] and is not degenerate at 0 or `total` successes."""
    if not total:
        return None
    p, n = successes / total, total
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, center - half), min(1.0, center + half)


def _ci95(accuracy: float | None, n: int | None) -> list[float] | None:
    """Wilson 95% interval, rounded to 3 digits, of a proportion `accuracy` measured on `n` problems."""
    if accuracy is None or not n:
        return None
    lo, hi = wilson_interval(accuracy * n, n)
    return [round(lo, 3), round(hi, 3)]


def accuracy_ci95(summary: dict[str, Any]) -> list[float] | None:
    """The 95% interval of an evaluation summary's accuracy, over the problems it scored (its accuracy
    is a mean over those; with several samples per problem, accuracy x problems counts as successes)."""
    n = summary.get("problems_scored", summary.get("problems"))
    return _ci95(summary.get("accuracy"), n)


def _interval(ci: list[float] | None) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "n/a"


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if not math.isinf(v) else "inf"
    return str(v)


def render_markdown(
    data: dict[str, Any],
    methods: list[str],
    figures: list[Figure],
    notes: list[str],
    config: dict[str, Any],
) -> str:
    """report.md: the tables, then the figures (relative links to the PNGs next to it) and a list of
    what was left out of them."""
    gens, evals, training = data["generation"], data["eval"], data["training"]
    lines = ["# Gen-SSD distillation report", ""]
    gen_problems = sorted({g["problems"] for g in gens.values()})
    eval_problems = sorted({e.get("problems") for e in evals.values() if e.get("problems") is not None})
    lines += [
        f"Generation on {', '.join(map(str, gen_problems)) or 'no'} problems per method; evaluation on "
        f"{', '.join(map(str, eval_problems)) or 'no'} held-out problems "
        f"({config.get('eval_sampling', 'greedy')}). One run: generation seed {config.get('generate_seed')}, "
        f"cold-start training seed {config.get('train_seed')}, model initialization seed {config.get('init_seed')}. "
        "The 95% intervals (Wilson) cover the sampling of test problems only, not seeds: differences inside "
        "them are not evidence either way.",
        "",
        "## Methods",
        "",
        "| method | problems | trajectories | kept | problems with a kept one | kept: mean length (tokens) | "
        "kept: mean student PPL | teacher tokens / kept | student tokens / kept | distilled student accuracy "
        "[95% interval] |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        g = gens.get(m)
        if g is None:
            lines.append(f"| {m} | no generation results (the stage did not run) | | | | | | | | |")
            continue
        e = evals.get(m, {})
        acc = (
            f"{_fmt(e.get('accuracy'))} {_interval(e.get('ci95'))}"
            if e.get("accuracy") is not None
            else "n/a"
        )
        lines.append(
            f"| {m} | {g['problems']} | {g['trajectories']} | {g['kept']} | {g['problems_with_kept']} | "
            f"{_fmt(g['kept_mean_response_tokens'], 1)} | {_fmt(g['kept_mean_student_ppl'])} | "
            f"{_fmt(g['teacher_tokens_per_kept'], 1)} | {_fmt(g['student_tokens_per_kept'], 1)} | {acc} |"
        )
    lines += [
        "",
        "## Accuracy on held-out problems",
        "",
        "| model | accuracy | 95% interval | problems | unverified | mean length |",
    ]
    lines.append("|---|---|---|---|---|---|")
    for name in ["teacher", "cold_start", *methods]:
        e = evals.get(name)
        if e is None:
            why = data["state"].get("stages", {}).get(f"distill/{name}", {}).get("status")
            if why == "empty":
                lines.append(f"| {name} | no student: nothing was kept to train on | | | | |")
            continue
        label = name if name in ("teacher", "cold_start") else f"student distilled with {name}"
        lines.append(
            f"| {label} | {_fmt(e.get('accuracy'))} | {_interval(e.get('ci95'))} | {e.get('problems')} | {e.get('unverified')} | "
            f"{_fmt(e.get('mean_response_tokens'), 1)} |"
        )
    if data.get("paired"):
        lines += [
            "",
            "## Paired comparison on the same held-out problems",
            "",
            "| method | against | solved only by the method | solved only by the other | exact McNemar p |",
            "|---|---|---|---|---|",
        ]
        for r in data["paired"]:
            lines.append(
                f"| {r['method']} | {r['other']} | {r['method_only']} | {r['other_only']} | {r['p_value']:.4f} |"
            )
    styles = data.get("styles")
    if styles:
        from gen_ssd_ray.lab.problems import STYLES

        lines += [
            "",
            "## Lab task: how the solutions are written",
            "",
            "Styles of the kept trajectories (what each student was distilled on). `shortcut` is the "
            "teacher's compressed style (two operations in one step) that the smaller student cannot follow.",
            "",
            "| method | " + " | ".join(STYLES) + " |",
            "|---|" + "---|" * len(STYLES),
        ]
        for m, counts in styles["kept"].items():
            lines.append(f"| {m} | " + " | ".join(str(counts.get(st, 0)) for st in STYLES) + " |")
        lines += [
            "",
            "Styles of each model's answers to the held-out problems: answers (accuracy within that style).",
            "",
            "| model | " + " | ".join(STYLES) + " |",
            "|---|" + "---|" * len(STYLES),
        ]
        for name, per in styles["answers"].items():
            cells = [
                f"{per[st]['answers']} ({_fmt(per[st]['accuracy'], 2)})" if st in per else "0"
                for st in STYLES
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Decontamination", ""]
    decon = data.get("decontamination") or []
    if decon:
        checks = sorted({d["check"] for d in decon if d.get("check")})
        lines += [
            "Before generation and fine-tuning, problems whose question overlaps the evaluation set were "
            "dropped (data.decontaminate" + (f"; {'; '.join(checks)}" if checks else "") + ").",
            "",
            "| stage | dropped | kept |",
            "|---|---|---|",
        ]
        lines += [f"| {d['stage']} | {d['dropped']} {d['unit']} | {_fmt(d['kept'])} |" for d in decon]
    else:
        lines.append(
            "No stage recorded a decontamination check (decontaminate.enabled=false, or an older run)."
        )
    lines += ["", "## Training", "", "| stage | examples | steps | first loss | final loss | tokens/s |"]
    lines.append("|---|---|---|---|---|---|")
    for name, t in training.items():
        s = t["summary"]
        lines.append(
            f"| {name} | {s.get('examples')} | {s.get('steps')} | {_fmt(s.get('first_loss'))} | "
            f"{_fmt(s.get('final_loss'))} | {_fmt(s.get('train/tokens_per_s'), 1)} |"
        )
    lines += [
        "",
        "Kept = the method's `selected` trajectories (Gen-SSD and standard KD: completed and verified "
        "correct; post-hoc: the correct one with the lowest student PPL per problem). Teacher tokens / kept "
        "counts every token the teacher generated, including rejected candidates and samples. For the "
        "baselines the student tokens are the one scoring pass that gives their PPL column.",
        "",
    ]
    lines += ["## Figures", ""]
    for f in figures:
        lines += [f"### {f.title}", "", f.caption, "", f"![{f.title}]({f.file})", ""]
    if not figures:
        lines += ["No figure: the run recorded no results to draw.", ""]
    if notes:
        lines += ["Left out of the figures:", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines) + "\n"


def write_report(out: Path, methods: list[str]) -> Path:
    """Write `<out>/report/` and return the path of report.md."""
    out = Path(out)
    folder = out / REPORT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    data = collect(out, methods)
    config = _config_facts(out)
    figures, notes = draw_figures(data, folder, methods)
    atomic_write_text(folder / "report.md", render_markdown(data, methods, figures, notes, config))
    public = {
        "generation": {
            m: {k: v for k, v in g.items() if not k.startswith("_")} for m, g in data["generation"].items()
        },
        "accuracy": {k: v.get("accuracy") for k, v in data["eval"].items()},
        "accuracy_ci95": {k: v["ci95"] for k, v in data["eval"].items()},
        "lab_styles": data["styles"],
        "paired": data["paired"],
        "eval_problems": {k: v.get("problems") for k, v in data["eval"].items()},
        "training": {
            k: {kk: t["summary"].get(kk) for kk in ("examples", "steps", "first_loss", "final_loss")}
            for k, t in data["training"].items()
        },
        "decontamination": data["decontamination"],
        "figures": [f.file for f in figures],
        "figures_left_out": notes,
        **config,
    }
    atomic_write_json(folder / "metrics.json", public, indent=1)
    return folder / "report.md"


def _config_facts(out: Path) -> dict[str, Any]:
    """Seeds and sampling, read from the stages' own resolved configs."""
    import yaml

    facts: dict[str, Any] = {}
    for sub in sorted((out / "generate").glob("*/_config.yaml")):
        facts["generate_seed"] = yaml.safe_load(sub.read_text())["search"]["seed"]
        break
    for stage in ("cold_start", "teacher"):
        cfg_file = out / stage / "_config.yaml"
        if cfg_file.is_file():
            facts["train_seed"] = yaml.safe_load(cfg_file.read_text())["optim"]["seed"]
            break
    state = _read_json(out / "pipeline.json") or {}
    facts["init_seed"] = state.get("init_seed")
    ev = next(iter(sorted((out / "eval").glob("*/summary.json"))), None)
    if ev is not None:
        s = json.loads(ev.read_text()).get("sampling", {})
        facts["eval_sampling"] = (
            "greedy" if not s.get("temperature") else f"temperature {s['temperature']}, n={s.get('n')}"
        )
    return facts
