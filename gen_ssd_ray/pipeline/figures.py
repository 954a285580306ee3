"""The report's figures: PNG files drawn with matplotlib (Agg backend, imported only when drawing).

`draw_figures(data, folder, methods)` takes what `gen_ssd_ray.pipeline.report.collect` gathered and
writes, into `folder`, whichever of these it has the numbers for:

- `accuracy.png`       held-out accuracy per model (teacher, cold start, each distilled student) as bars
                       with their Wilson 95% intervals as error bars;
- `student_ppl.png`    per method, the student PPL of all generated trajectories and of the kept ones, on
                       log-spaced bins and a log x-axis;
- `response_length.png` response length of the kept trajectories;
- `cost_accuracy.png`  per method, one point: generation cost (teacher tokens generated; student tokens
                       processed) against the distilled student's accuracy with its interval, the cold
                       start and the teacher as reference lines;
- `training_loss.png`  the loss curve of every fine-tuning stage.

It returns the figures written (file, title, caption) and one note for each thing it left out (a method
without rows, without an evaluation, trajectories without a finite PPL), so that the Markdown says so.
A missing element never stops the others. It reads no file and knows nothing about how the numbers
were produced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REFERENCE_COLORS = {"teacher": "tab:gray", "cold_start": "tab:blue"}
METHOD_COLORS = ["tab:green", "tab:orange", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive"]
DPI = 110
# Every file draw_figures may write (an earlier report's copy of one not drawn this time is removed).
FILES = ("accuracy.png", "student_ppl.png", "response_length.png", "cost_accuracy.png", "training_loss.png")


@dataclass(frozen=True)
class Figure:
    file: str  # PNG name, next to report.md
    title: str
    caption: str


def color_of(name: str, methods: list[str]) -> str:
    if name in REFERENCE_COLORS:
        return REFERENCE_COLORS[name]
    i = methods.index(name) if name in methods else len(methods)
    return METHOD_COLORS[i % len(METHOD_COLORS)]


def finite_positive(values: list[Any]) -> list[float]:
    """The values a log axis can show: numbers that are finite and > 0 (None, NaN, inf, <= 0 dropped)."""
    out = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f) and f > 0:
            out.append(f)
    return out


def draw_figures(data: dict[str, Any], folder: Path, methods: list[str]) -> tuple[list[Figure], list[str]]:
    """Write the figures into `folder`; returns (figures written, notes on what was left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name in FILES:
        (folder / name).unlink(missing_ok=True)
    figures: list[Figure] = []
    notes: list[str] = []
    for draw in (_accuracy, _student_ppl, _response_length, _cost_accuracy, _training_loss):
        fig_info = draw(plt, data, folder, methods, notes)
        if fig_info is not None:
            figures.append(fig_info)
    return figures, notes


def _save(plt, fig, folder: Path, name: str) -> None:
    fig.tight_layout()
    fig.savefig(folder / name, dpi=DPI)
    plt.close(fig)


def _accuracy(plt, data, folder, methods, notes) -> Figure | None:
    evals = data["eval"]
    order = ["teacher", "cold_start", *methods]
    names = [n for n in order if evals.get(n, {}).get("accuracy") is not None]
    missing = [n for n in order if n not in names]
    if missing:
        notes.append(f"accuracy: no evaluation (or no accuracy) for {', '.join(missing)}; not drawn")
    if not names:
        return None
    fig, ax = plt.subplots(figsize=(max(5.5, 1.3 * len(names) + 2), 3.8))
    accs = [evals[n]["accuracy"] for n in names]
    cis = [evals[n].get("ci95") or [a, a] for n, a in zip(names, accs, strict=True)]
    yerr = [
        [a - lo for a, (lo, _) in zip(accs, cis, strict=True)],
        [hi - a for a, (_, hi) in zip(accs, cis, strict=True)],
    ]
    x = list(range(len(names)))
    ax.bar(x, accs, color=[color_of(n, methods) for n in names], alpha=0.85)
    ax.errorbar(x, accs, yerr=yerr, fmt="none", ecolor="black", capsize=5, linewidth=1.2)
    for xi, a, (_, hi) in zip(x, accs, cis, strict=True):
        ax.text(xi, hi + 0.02, f"{a:.2f}", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(x, [n if n in REFERENCE_COLORS else f"distilled:\n{n}" for n in names], fontsize=9)
    n_probs = max((evals[n].get("problems") or 0) for n in names)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.12)
    ax.set_title(f"held-out accuracy ({n_probs} problems), 95% Wilson intervals", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    _save(plt, fig, folder, "accuracy.png")
    return Figure(
        "accuracy.png",
        "Accuracy on held-out problems",
        "Bars: accuracy of each model; error bars: the 95% Wilson interval over the test problems.",
    )


def _student_ppl(plt, data, folder, methods, notes) -> Figure | None:
    import numpy as np

    gens = data["generation"]
    series = {}
    for m in methods:
        g = gens.get(m)
        if g is None:
            continue
        all_, kept = finite_positive(g["_ppls_all"]), finite_positive(g["_ppls"])
        dropped = g["trajectories"] - len(all_)
        if not g["trajectories"]:
            notes.append(f"student PPL: {m} has no generated trajectories; no histogram")
        elif dropped:
            notes.append(
                f"student PPL: {m}: {dropped} of {g['trajectories']} trajectories have no finite student PPL "
                "(error rows, or NaN/inf); not drawn"
            )
        if all_ or kept:
            series[m] = (all_, kept)
    if not series:
        notes.append("student PPL: no trajectory of any method has a finite student PPL; no histogram")
        return None
    values = [v for all_, kept in series.values() for v in all_ + kept]
    lo, hi = min(values), max(values)
    if hi / lo < 1.5:  # a narrow range: widen it so that the bins are not empty slivers
        lo, hi = lo / 1.25, hi * 1.25
    bins = np.geomspace(lo, hi, 31)
    fig, axes = plt.subplots(len(series), 1, figsize=(7, 1.9 * len(series) + 1.0), sharex=True, squeeze=False)
    for ax, (m, (all_, kept)) in zip(axes[:, 0], series.items(), strict=True):
        ax.hist(all_, bins=bins, histtype="stepfilled", color="0.8", label=f"all ({len(all_)})")
        ax.hist(
            kept,
            bins=bins,
            histtype="step",
            linewidth=1.8,
            color=color_of(m, methods),
            label=f"kept ({len(kept)})",
        )
        ax.set_xscale("log")
        ax.set_ylabel("trajectories", fontsize=9)
        ax.set_title(m, loc="left", fontsize=9)
        ax.legend(fontsize=8, loc="upper right")
    axes[-1, 0].set_xlabel("student PPL of the trajectory (log scale, log-spaced bins)")
    _save(plt, fig, folder, "student_ppl.png")
    return Figure(
        "student_ppl.png",
        "Student perplexity of the generated trajectories",
        "Per method: grey, every trajectory with a finite student PPL; line, the kept (selected) ones.",
    )


def _response_length(plt, data, folder, methods, notes) -> Figure | None:
    gens = data["generation"]
    series = {m: gens[m]["_lengths"] for m in methods if m in gens and gens[m]["_lengths"]}
    if not series:
        notes.append("response length: no method kept a trajectory; no histogram")
        return None
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(
        list(series.values()),
        bins=20,
        label=list(series),
        color=[color_of(m, methods) for m in series],
        histtype="step",
        linewidth=1.5,
    )
    ax.set_xlabel("response length (tokens) of kept trajectories")
    ax.set_ylabel("trajectories")
    ax.legend()
    _save(plt, fig, folder, "response_length.png")
    return Figure(
        "response_length.png", "Response length", "Response length of each method's kept trajectories."
    )


def _cost_accuracy(plt, data, folder, methods, notes) -> Figure | None:
    gens, evals = data["generation"], data["eval"]
    points = []
    for m in methods:
        if m not in gens:
            notes.append(f"cost vs accuracy: {m} has no generation results; no point")
        elif evals.get(m, {}).get("accuracy") is None:
            notes.append(
                f"cost vs accuracy: {m} has no evaluated distilled student (nothing kept, or not run); no point"
            )
        else:
            points.append(m)
    if not points:
        return None
    panels = [
        ("teacher_tokens_generated", "teacher tokens generated"),
        ("student_tokens_processed", "student tokens processed"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(11, 4.0), sharey=True, squeeze=False)
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        xs = []
        # labels alternate above and below their point in the order of x, so that neighbours do not overlap
        rank = {m: i for i, m in enumerate(sorted(points, key=lambda m: gens[m][key]))}
        for m in points:
            x, acc = gens[m][key], evals[m]["accuracy"]
            lo, hi = evals[m].get("ci95") or [acc, acc]
            xs.append(x)
            ax.errorbar(
                [x],
                [acc],
                yerr=[[acc - lo], [hi - acc]],
                fmt="o",
                markersize=7,
                capsize=5,
                color=color_of(m, methods),
                label=m,
            )
            up = rank[m] % 2 == 0
            ax.annotate(m, (x, acc), textcoords="offset points", xytext=(8, 6 if up else -14), fontsize=9)
        for ref, style in (("cold_start", "--"), ("teacher", ":")):
            acc = evals.get(ref, {}).get("accuracy")
            if acc is not None:
                ax.axhline(acc, linestyle=style, color=color_of(ref, methods), label=f"{ref} ({acc:.2f})")
        if all(x > 0 for x in xs) and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        else:
            ax.set_xlim(0, max(max(xs), 1) * 1.25)
        ax.set_xlabel(f"{label} in generation (all trajectories)")
        ax.grid(alpha=0.3)
        ax.set_ylim(0, 1.05)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper left", ncol=2)
    axes[0, 0].set_ylabel("distilled student accuracy")
    fig.suptitle("generation cost vs. accuracy of the student distilled on it (95% intervals)", fontsize=10)
    _save(plt, fig, folder, "cost_accuracy.png")
    return Figure(
        "cost_accuracy.png",
        "Cost versus accuracy",
        "One point per method: the tokens its generation spent (teacher tokens generated, left; student "
        "tokens processed, right) against the accuracy of the student distilled on its kept trajectories, "
        "with its 95% interval. Dashed: the cold-start student; dotted: the teacher.",
    )


def _training_loss(plt, data, folder, methods, notes) -> Figure | None:
    training = {k: t for k, t in data["training"].items() if t["metrics"]}
    if not training:
        return None
    # The models' own training (long) and the distillation runs (short) on separate panels.
    groups = [
        [k for k in training if not k.startswith("distill/")],
        [k for k in training if k.startswith("distill/")],
    ]
    groups = [g for g in groups if g]
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.5), squeeze=False)
    for ax, names in zip(axes[0], groups, strict=True):
        for name in names:
            m = training[name]["metrics"]
            losses = [r["loss"] if r.get("loss") is not None else float("nan") for r in m]  # null: skipped
            ax.plot([r["step"] for r in m], losses, label=name, linewidth=1)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (NLL per response token)")
        ax.set_yscale("log")
        ax.legend()
    fig.suptitle("training loss")
    _save(plt, fig, folder, "training_loss.png")
    return Figure("training_loss.png", "Training loss", "Loss per optimizer step of every fine-tuning stage.")
