"""Whether a gain in greedy accuracy is a gain in sampled accuracy too (an instrument check of
what the verdicts measure).

    python experiments/greedy_vs_sampled.py

Every comparison's verdicts are on greedy test accuracy (the argmax answer); most also record
pass@1 (one sample at temperature 1, on the same 500 prompts). A method can raise the argmax
without raising the mass on the right answer. For every
``docs/results/<name>/results.json`` whose runs all record pass@1, each pair of labels is judged
on both metrics by the protocol's rule (the paired t interval at 95%, whatever rule the report
was published under) and put in one class: the same winner on both, a winner on greedy alone,
on pass@1 alone, opposite winners, or neither. For each greedy "beats", the same rule on the
per-seed difference of the two gains,

    Δ_greedy(s) − Δ_pass@1(s) = (greedy − pass@1)_A(s) − (greedy − pass@1)_B(s),

says whether the winner's gain is larger on greedy than on pass@1 (the winner's
greedy − pass@1 gap is the wider). ``experiments/reference_fit.py`` probes where along the
solution such a gap comes from. Each pair of runs is counted once, at its home
(:func:`opd.compare.shared_runs.pair_homes`). Reads committed files only; runs nothing. Writes
``docs/results/greedy_vs_sampled.md`` and ``docs/results/greedy_vs_sampled/results.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from opd.compare import shared_runs, verdicts
from opd.report import markdown_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
QUOTED_METHODS = {"opd": "OPD", "sft": "SFT", "suffix_fade": "suffix fade", "stable_opd": "StableOPD"}
CLASSES = ("same winner", "greedy only", "pass@1 only", "opposite", "neither")


def _metric(entry: dict, metric: str) -> dict[str, float]:
    return {seed: f[metric] for seed, f in entry["final"].items()}


def records_pass1(results: dict) -> bool:
    return "labels" in results and all(f.get("pass@1") is not None and f.get("accuracy") is not None
                                       for e in results["labels"].values() for f in e["final"].values())


def kind(greedy: str, sampled: str) -> str:
    """The class of a pair from its two verdicts (``"a"``, ``"b"`` or ``"none"`` each)."""
    if greedy == "none":
        return "neither" if sampled == "none" else "pass@1 only"
    return "greedy only" if sampled == "none" else "same winner" if sampled == greedy else "opposite"


def judge_pair(labels: dict, a: str, b: str) -> dict:
    """Both metrics' verdicts on ``a`` vs ``b``, oriented so that ``winner`` is the greedy one
    (``a`` when greedy decides nothing), and the verdict on the difference of their gains."""
    g = verdicts.verdict(a, b, _metric(labels[a], "accuracy"), _metric(labels[b], "accuracy"))
    p = verdicts.verdict(a, b, _metric(labels[a], "pass@1"), _metric(labels[b], "pass@1"))
    win, lose = (b, a) if (g["verdict"] if g["verdict"] != "none" else p["verdict"]) == "b" else (a, b)
    sign = 1 if win == a else -1
    out = {"winner": win, "loser": lose, "class": kind(g["verdict"], p["verdict"]), "seeds": len(g["seeds"]),
           "greedy_gain": sign * g["mean_diff"], "pass1_gain": sign * p["mean_diff"]}
    if g["verdict"] != "none":
        gap = lambda label: {s: f["accuracy"] - f["pass@1"] for s, f in labels[label]["final"].items()}  # noqa: E731
        wider = verdicts.verdict(win, lose, gap(win), gap(lose), "is above")
        out["wider_gap"] = {"a": "winner", "b": "loser", "none": "no difference measured"}[wider["verdict"]]
        out["gap_gain"] = wider["mean_diff"]
    return out


def pairs_of(name: str, results: dict, homes: dict) -> list[dict]:
    labels = results["labels"]
    pairs = [{"report": name, **judge_pair(labels, a, b)}
             for i, a in enumerate(labels) for b in list(labels)[i + 1:] if homes.get((name, a, b), name) == name]
    return [{**p, "winner_method": labels[p["winner"]]["method"]} for p in pairs]


def by_method(pairs: list[dict]) -> dict[str, dict]:
    """The greedy "beats" grouped by the winner's method: how many hold on pass@1, how many
    reverse, and in how many the winner's greedy − pass@1 gap is measured the wider."""
    out: dict[str, dict] = {}
    for p in (p for p in pairs if "wider_gap" in p):
        row = out.setdefault(p["winner_method"], {"greedy_beats": 0, **dict.fromkeys(CLASSES[:2] + CLASSES[3:4], 0),
                                                   "winner_gap_wider": 0})
        row["greedy_beats"] += 1
        row[p["class"]] += 1
        row["winner_gap_wider"] += p["wider_gap"] == "winner"
    return dict(sorted(out.items(), key=lambda kv: (-kv[1]["greedy_beats"], kv[0])))


def summary(pairs: list[dict]) -> dict:
    by_class = {c: sum(p["class"] == c for p in pairs) for c in CLASSES}
    greedy = [p for p in pairs if "wider_gap" in p]
    wider = {s: sum(p["wider_gap"] == s for p in greedy) for s in ("winner", "loser", "no difference measured")}
    return {"pairs": len(pairs), "classes": by_class, "greedy_beats": len(greedy), "wider_gap": wider,
            "by_winner_method": by_method(pairs)}


def _fmt(p: dict) -> list[str]:
    return [p["report"], f"{p['winner']} over {p['loser']}", f"{p['greedy_gain']:+.3f}", f"{p['pass1_gain']:+.3f}",
            p.get("wider_gap", "-")]


def report(pairs: list[dict], reports: list[str], s: dict) -> str:
    """The markdown of the check, ``s`` the :func:`summary` of ``pairs``."""
    c = s["classes"]
    parted = [p for p in pairs if p["class"] in ("greedy only", "pass@1 only", "opposite")]
    methods = markdown_table(["winner's method", "greedy \"beats\"", "same winner on pass@1", "greedy only", "opposite",
                              "winner's gap the wider"],
                             [[m, *map(str, r.values())] for m, r in s["by_winner_method"].items()])
    header = ["comparison", "pair (winner first: greedy's, else pass@1's)", "greedy gain", "pass@1 gain", "wider greedy − pass@1 gap"]
    tables = "\n\n".join(f"### {k.capitalize()} ({c[k]})\n\n" + markdown_table(header, [_fmt(p) for p in parted if p["class"] == k])
                         for k in ("greedy only", "opposite", "pass@1 only") if c[k])
    return f"""# Greedy and sampled accuracy: which gains are both

Generated by `python experiments/greedy_vs_sampled.py` from the committed
`docs/results/*/results.json`; it runs nothing. {len(reports)} comparisons record pass@1 (one
sample at temperature 1) beside greedy accuracy for every run; their {s['pairs']} pairs of labels
(each pair of runs once, at its home) are judged on both by the protocol's rule, the paired t
interval at 95% (a report published under the bootstrap rule is judged again here by this one).

| class | pairs |
|---|---|
""" + "\n".join(f"| {k} | {c[k]} |" for k in CLASSES) + f"""

**Of the {s['greedy_beats']} greedy "beats", {c['same winner']} hold on pass@1, {c['greedy only']} are not told
apart on pass@1 and {c['opposite']} reverse.** {c['pass@1 only']} pairs are told apart on pass@1 alone.

**Wider gaps.** For each greedy "beats", the rule on the per-seed difference of the two
gains (the winner's greedy − pass@1 gap less the loser's): the winner's gap is the wider in
{s['wider_gap']['winner']}, the narrower in {s['wider_gap']['loser']}, no difference measured in
{s['wider_gap']['no difference measured']}. A wider gap means the winner gained more on its argmax
answer than on the mass it puts on the right answer. This counts pairs in each report as they
were planned and gathered, so it says how often the two metrics part; the tables name the
pairs. By the winner's method (a method's count depends on which rivals its reports hold):

{methods}

{tables}
"""


def quoted(out: dict) -> list[str]:
    """The phrases of this check that finding 11 of ``docs/results/README.md`` quotes, from the
    check's ``results.json`` (``tests/test_shared_runs.py`` holds the prose to them)."""
    s, c = out["summary"], out["summary"]["classes"]
    m = s["by_winner_method"]
    return [f"{len(out['reports'])} comparisons that record pass@1", f"{s['pairs']} pairs of labels",
            f"{c['same winner']} of the {s['greedy_beats']} greedy \"beats\" hold on pass@1",
            f"{c['greedy only']} are not told apart on pass@1 and {c['opposite']} reverse", f"{c['pass@1 only']} pairs are told apart on pass@1 alone",
            f"it is in {s['wider_gap']['winner']} pairs, the narrower in {s['wider_gap']['loser']}",
            *(f"{m[method]['same winner']} of {name}'s {m[method]['greedy_beats']}" for method, name in QUOTED_METHODS.items()
              if method in m)]


def main() -> None:
    found = {}
    for path in sorted(RESULTS.glob("*/results.json")):
        results = json.loads(path.read_text())
        if records_pass1(results):
            found[path.parent.name] = results
    homes = shared_runs.pair_homes(found)
    pairs = [p for name, results in found.items() for p in pairs_of(name, results, homes)]
    s = summary(pairs)
    out = RESULTS / "greedy_vs_sampled"
    out.mkdir(exist_ok=True)
    (out / "results.json").write_text(json.dumps({"reports": sorted(found), "summary": s, "pairs": pairs}, indent=1) + "\n")
    (RESULTS / "greedy_vs_sampled.md").write_text(report(pairs, sorted(found), s))
    print(f"{s['classes']['same winner']} of {s['greedy_beats']} greedy beats hold on pass@1 over {len(found)} "
          f"comparisons; wrote {RESULTS / 'greedy_vs_sampled.md'}")


if __name__ == "__main__":
    main()
