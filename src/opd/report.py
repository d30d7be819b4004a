"""Quickstart tables, Markdown report and the accuracy-vs-sequences plot."""

from __future__ import annotations

from pathlib import Path

COLUMNS = ["method", "lr", "acc before", "acc after", "sampled acc before", "sampled acc after", "sequences", "teacher tokens", "wall s", "seqs to 90% of teacher"]


def _reach(history: list[dict], target: float) -> str:
    for row in history:
        if row["eval/accuracy"] >= target:
            return str(int(row["usage/sequences"]))
    return "not reached"


def table_rows(summary: dict) -> list[list[str]]:
    rows, target = [], 0.9 * summary["teacher_accuracy"]
    for name, res in summary["results"].items():
        first, last = res["history"][0], res["history"][-1]
        rows.append([
            name, f"{res['lr']:g}", f"{first['eval/accuracy']:.3f}", f"{last['eval/accuracy']:.3f}",
            f"{first['eval/sample_accuracy']:.3f}", f"{last['eval/sample_accuracy']:.3f}", str(int(last["usage/sequences"])),
            str(int(last["usage/teacher_tokens"])), f"{res['wall_s']:.0f}", _reach(res["history"], target),
        ])
    return rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def print_table(summary: dict) -> None:
    rows = table_rows(summary)
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
    print("  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print(f"teacher (oracle) greedy accuracy: {summary['teacher_accuracy']:.3f}")


def accuracy_axes():
    """A figure and axes in the reports' style (held-out accuracy on y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=150)
    return fig, ax


def save_accuracy_plot(fig, ax, path: Path, xlabel: str, ylabel: str = "held-out accuracy (greedy)") -> Path:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_accuracy(summary: dict, path: Path) -> Path:
    fig, ax = accuracy_axes()
    for name, res in summary["results"].items():
        xs = [row["usage/sequences"] for row in res["history"]]
        ax.plot(xs, [row["eval/accuracy"] for row in res["history"]], marker="o", ms=3, label=f"{name} (lr {res['lr']:g})")
    ax.axhline(summary["teacher_accuracy"], color="grey", ls="--", lw=1, label="teacher")
    return save_accuracy_plot(fig, ax, path, "training sequences used")


def _grid_table(lr_info: dict) -> str:
    grid = lr_info["grid"]
    lrs = sorted({lr for scores in grid.values() for lr in scores}, key=float)
    rows = [[m] + [f"{grid[m][lr]:.3f}" if lr in grid[m] else "-" for lr in lrs] + [f"{lr_info['chosen'][m]:g}"] for m in grid]
    return markdown_table(["method"] + [f"lr {lr}" for lr in lrs] + ["chosen"], rows)


def write_report(out_dir: Path, summary: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_accuracy(summary, out_dir / "accuracy.png")
    text = REPORT.format(
        table=markdown_table(COLUMNS, table_rows(summary)), teacher=summary["teacher_accuracy"],
        grid=_grid_table(summary["lr_info"]), budget=summary["lr_info"]["budget_sequences"],
        verdict=verdict(summary), base=str(summary.get("student_base"))[:12],
        tuned_on=str(summary["lr_info"].get("student_base"))[:12],
    )
    path = out_dir / "report.md"
    path.write_text(text)
    return path


def verdict(summary: dict) -> str:
    """What the numbers say, and only that: the means over the seeds, and a ranking only
    where the verdict rule gave one (``summary["verdicts"]`` and ``summary["rule"]``, made
    by :mod:`opd.compare.verdicts` from the per-seed finals)."""
    res, target = summary["results"], 0.9 * summary["teacher_accuracy"]
    seeds = summary.get("seeds", [0])
    final = {m: r["history"][-1]["eval/accuracy"] for m, r in res.items()}
    start = {m: r["history"][0]["eval/accuracy"] for m, r in res.items()}
    info = summary["lr_info"]
    tuning = info.get("tuning_seeds") or [info.get("tuning_seed", "n/a")]
    lines = [f"- Seeds {', '.join(map(str, seeds))} (means below); learning rates tuned on the mean over seed(s) "
             f"{', '.join(map(str, tuning))}, never reported."]
    for m in res:
        lines.append(f"- {m}: greedy held-out accuracy {start[m]:.3f} → {final[m]:.3f}; sequences to reach 90% of the "
                     f"teacher's accuracy (mean curve): {_reach(res[m]['history'], target)}.")
    if all(final[m] <= start[m] for m in res):
        lines.append("- No method improved on the student base within this budget.")
    if len(seeds) < 2 or not summary.get("verdicts"):
        lines.append("- One seed: the verdict rule needs several, so these numbers rank nothing.")
        return "\n".join(lines)
    lines += ["", f"Verdicts ({summary['rule']}):", ""] + [f"- {v['sentence']}" for v in summary["verdicts"]]
    return "\n".join(lines)


REPORT = """# opd quickstart: SFT vs GRPO vs OPD on the synthetic testbed

Task: multi-digit addition written digit by digit (horizon 4), held-out test split.
Student: the testbed's tiny student base (trained by SFT until it converged, then damaged
by Gaussian weight noise, as quantization or pruning would, so that it makes mistakes;
weights sha256 {base}, the base that ships with opd unless built anew).
Teacher: the oracle (a perfect program teacher), greedy held-out accuracy **{teacher:.3f}**.
Each method used the same budget of {budget} training sequences (SFT: teacher solutions;
GRPO and OPD: the student's own samples, groups of 8 and 4). Accuracies are means over the
seeds; the verdicts below compare the seeds' final accuracies pair by pair.

{table}

![held-out accuracy vs sequences](accuracy.png)

## What was measured

{verdict}

## Learning rates

Each method ran at its own learning rate, chosen once by final accuracy on the validation
split (the mean over the tuning seeds, never reported ones), from a grid widened past a choice at
its edge (`opd quickstart --tune` re-runs it; the choice is stored in
`src/opd/compare/quickstart_lrs.json`; "-": not tried for that method; tuned on the student
base {tuned_on}):

{grid}

Columns: "acc" is greedy held-out accuracy; "sampled acc" is the accuracy of one sample
at temperature 1 (what on-policy rollouts see). Teacher tokens: tokens the teacher
generated (SFT) or scored (OPD); GRPO uses none. Wall time is training plus evaluation.
"""
