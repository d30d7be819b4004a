"""The ``opd diagnose`` report: ``report.md``, ``results.json`` and PNG plots.

Takes the results dict of :func:`opd.diagnostics.diagnose.diagnose` (plain numbers and
lists) and writes one Markdown file with a section per pitfall, each with its plot.
Plot style follows :mod:`opd.report` (Agg backend, small figures, light grid).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from opd.diagnostics.coverage import CURVES
from opd.report import markdown_table

COLORS = {"student": "tab:blue", "teacher": "tab:orange"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)
    return path.name


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3g}"


def plot_coverage(cov: dict, path: Path) -> str:
    plt = _pyplot()
    keys = [k for k in CURVES if k in cov["student"]]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.4 * len(keys), 3.2), dpi=120, squeeze=False)
    axes = list(axes[0])
    labels = {"logp": "teacher log p(token)", "entropy": "teacher entropy (nats)", "overlap": "top-8 overlap", "agree": "argmax agreement"}
    for ax, key in zip(axes, keys):
        for who in ("student", "teacher"):
            if who in cov and key in cov[who]:
                pts = [(t, v) for t, v in enumerate(cov[who][key]) if v is not None]
                ax.plot([t for t, _ in pts], [v for _, v in pts], color=COLORS[who], lw=1.2, label=f"{who} rollouts")
        ax.set_xlabel("completion position")
        ax.set_title(labels[key], fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(frameon=False, fontsize=7)
    return _save(fig, path)


def plot_entropy(values: list[float], path: Path) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=120)
    ax.hist(values, bins=40, color=COLORS["student"], alpha=0.8)
    ax.set_xlabel("teacher entropy on student prefixes (nats)")
    ax.set_ylabel("positions")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_variance(var: dict, path: Path) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.4), dpi=120)
    pts = var["points"]
    lengths = [p["length"] for p in pts.values()]
    for g, label in (("0", "per-token (gamma=0)"), ("1", "reward-to-go (gamma=1)")):
        ys = [p[f"var@{g}"] for p in pts.values()]
        ax.plot(lengths, ys, marker="o", label=f"{label}, slope {_fmt(var['slopes'][g])}")
    for h, p in pts.items():
        ax.annotate(f"h={h}", (p["length"], p["var@1"]), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("mean rollout length (tokens)")
    ax.set_ylabel("tr Cov of the gradient estimate")
    ax.grid(alpha=0.3, which="both")
    ax.legend(frameon=False, fontsize=7)
    return _save(fig, path)


def plot_probe(depths: dict, path: Path) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=120)
    ks = list(depths)
    for key, label in (("p_wait", "P(wait | wrong prefix)"), ("onset", "greedy emits wait"),
                       ("recovery", "greedy recovery rate"),
                       ("clean_recovery", "greedy accuracy, clean prefix")):
        ax.plot(ks, [depths[k][key] for k in ks], marker="o", label=label)
    ax.set_xlabel("depth of the planted wrong step")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(ks)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=7)
    return _save(fig, path)


def coverage_md(cov: dict, out_dir: Path) -> str:
    if "skipped" in cov:
        return cov["skipped"]
    rows = []
    for who, s in cov["summary"].items():
        for key in CURVES:
            if f"{key}/all" in s:
                rows.append([f"{who} rollouts", key, *(_fmt(s.get(f"{key}/{p}")) for p in ("all", "first", "last"))])
    table = markdown_table(["rollouts", "curve", "mean", "first half", "second half"], rows)
    note = "" if "teacher" in cov else "\n\nThe teacher cannot generate, so only the student's rollouts are shown."
    return (
        "Teacher log-likelihood of each rollout's own tokens, teacher entropy, teacher-student top-8 overlap and "
        "argmax agreement, "
        "averaged over rollouts at each completion position (halves: positions before/after the midpoint of the "
        f"longest rollout).\n\n{table}{note}\n\n![coverage]({plot_coverage(cov, out_dir / 'coverage.png')})"
    )


def noise_md(nz: dict, out_dir: Path) -> str:
    if "skipped" in nz:
        return nz["skipped"]
    st = nz["entropy_stats"]
    text = "Teacher next-token entropy (nats) at every position of the student's rollouts:\n\n" + markdown_table(
        list(st), [[_fmt(v) for v in st.values()]])
    if nz["entropy"]:
        text += f"\n\n![teacher entropy]({plot_entropy(nz['entropy'], out_dir / 'noise.png')})"
    if "after_wrong" not in nz:
        return text + "\n\nAfter a wrong step: " + nz["after_wrong_skipped"]
    aw = nz["after_wrong"]
    return text + (
        "\n\nAfter a wrong step (positions whose prefix holds an uncorrected wrong word, found by the oracle's "
        f"trace): {int(aw['positions'])} positions in {int(aw['rollouts'])} rollouts. The teacher's argmax there:\n\n"
        + markdown_table(["corrects (wait)", "continues the wrong prefix", "other"],
                         [[_fmt(aw["corrects"]), _fmt(aw["continues"]), _fmt(aw["other"])]])
    )


def variance_md(var: dict, out_dir: Path) -> str:
    if "skipped" in var:
        return var["skipped"]
    rows = [[str(h), _fmt(p["length"]), _fmt(p["var@0"]), _fmt(p["var@1"])] for h, p in var["points"].items()]
    table = markdown_table(["horizon", "mean length", "tr Cov, gamma=0", "tr Cov, gamma=1"], rows)
    return (
        f"Per-rollout gradient of the OPD surrogate w.r.t. the LM head, {var['repeats']} rollouts for each of "
        f"{var['prompts']} prompts per horizon; total variance = trace of the covariance across a prompt's rollouts, "
        f"averaged over prompts.\n\n{table}\n\nFitted growth exponent (log-log slope of variance vs length): "
        f"per-token **{_fmt(var['slopes']['0'])}**, reward-to-go **{_fmt(var['slopes']['1'])}**."
        f"\n\n![gradient variance]({plot_variance(var, out_dir / 'variance.png')})"
    )


def probe_md(pr: dict, out_dir: Path) -> str:
    if "skipped" in pr:
        return pr["skipped"]
    d = pr["depths"]
    rows = [[str(k), *(_fmt(v[c]) for c in ("p_wait", "onset", "recovery", "clean_recovery")), str(int(v["n"]))]
            for k, v in d.items()]
    table = markdown_table(["depth k", "student P(wait)", "greedy emits wait", "recovery rate", "clean-prefix accuracy",
                            "prefixes"], rows)
    return (
        "Held-out reference solutions cut after step k, step k's result replaced by a plausible wrong digit; the "
        "right next token is the correction onset `wait`. Recovery: the greedy continuation's final answer verifies "
        "(with or without a `wait`; recovery above the wait rate is a silent recovery)."
        f"\n\n{table}\n\n![correction probe]({plot_probe(d, out_dir / 'probe.png')})"
    )


def detour_md(dt: dict) -> str:
    if "skipped" in dt:
        return dt["skipped"]
    rows = [[str(k), *(_fmt(v[c]) for c in ("back", "recovery", "stops_short", "clean_recovery")), str(int(v["n"]))]
            for k, v in dt["depths"].items()]
    table = markdown_table(["depth k", "turns back", "recovery rate", "stops short", "clean-prefix accuracy", "prefixes"], rows)
    return (
        "Held-out ring walks cut after move k - 1, then the other move (legal, written right): the best walk turns "
        "back. Turns back: the greedy continuation's first move is the best one; recovery: the whole walk verifies "
        "(h + 2 moves are allowed); stops short: it answers before it reaches the target, every state written right "
        f"(counting moves).\n\n{table}"
    )


def mistakes_md(mk: dict) -> str:
    if "skipped" in mk:
        return mk["skipped"]
    steps = [str(k) for k in range(len(mk["by_step"]))]
    table = markdown_table(["", *steps, "answer", "none"], [["share of rollouts", *map(_fmt, mk["by_step"]),
                                                             _fmt(mk["answer"]), _fmt(mk["none"])]])
    return (
        "The step (0-based) of each student rollout's first deviation from the oracle, as shares of the "
        f"{mk['n']} rollouts (none: no deviation). Step {mk['mode_step']} holds {_fmt(mk['mode_share'])} of the "
        f"first mistakes; with the same error rate at every step the shares would fall geometrically.\n\n{table}"
    )


def write_report(out_dir: str | Path, results: dict) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    secs = ", ".join(f"{k} {v:.1f}" for k, v in results.get("seconds", {}).items())
    sections = [
        ("First mistakes", mistakes_md(results.get("mistakes", {"skipped": "not measured"}))),
        ("Coverage decay", coverage_md(results["coverage"], out_dir)),
        ("Local noise", noise_md(results["noise"], out_dir)),
        ("Gradient variance vs horizon", variance_md(results["variance"], out_dir)),
        ("Correction path probe", probe_md(results["probe"], out_dir)),
        ("Detour probe", detour_md(results.get("detour", {"skipped": "not measured"}))),
    ]
    head = (
        f"# opd diagnose: {results['checkpoint']}\n\nMethod `{results['method']}`, task {results['task']}, "
        f"teacher `{results['teacher']}`; {results['prompts']} held-out prompts, seed {results['seed']}. "
        f"Seconds: {secs}.\n"
    )
    path = out_dir / "report.md"
    path.write_text(head + "".join(f"\n## {title}\n\n{body}\n" for title, body in sections))
    return path
