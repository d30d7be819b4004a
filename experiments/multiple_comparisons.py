"""How many published "beats" verdicts stay under the t rule and under a multiple-comparison
correction (an instrument check of the protocol's verdict rule).

    python experiments/multiple_comparisons.py

Each comparison judges every pair of its labels by one rule, so a report with 6 pairs makes 6
tests. For every ``docs/results/<name>/results.json`` with verdicts, from its committed
per-seed final test accuracies: the verdicts recomputed under the rule the report states
(the published ones: a 95% percentile bootstrap interval; checked against the committed
ones), each pair's p-value, Holm's step-down correction over the report's pairs
(:func:`opd.compare.verdicts.holm`; ``opd compare`` states the same in each report), the
verdicts under the protocol's rule now (the paired t interval, whose level is the stated
one; the bootstrap's at 5 seeds is about 16%: ``experiments/rule_level.py``), and the exact
paired sign-flip test's p. With 5 seeds that test cannot go below 2/32 = 0.0625.
Only the accuracy verdicts (the rule's family); the further metrics' verdicts are left out.
Reads committed files only; runs nothing. Writes ``docs/results/multiple_comparisons.md``
and ``docs/results/multiple_comparisons/results.json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from opd.compare import shared_runs, verdicts
from opd.report import markdown_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"


def finals_of(results: dict, metric: str = "accuracy") -> dict[str, dict[str, float]]:
    """``{label: {seed: final metric}}`` (test accuracy by default) from a ``results.json``."""
    out = {}
    for label, entry in results["labels"].items():
        out[label] = {seed: math.nan if f.get(metric) is None else f[metric] for seed, f in entry["final"].items()}
    return out


def _short(v: dict) -> str:
    return v["sentence"].split(" (")[0]


def both_rules(finals: dict, committed: list[dict], rule: str, beats: str = "beats") -> dict:
    """One family of verdicts recomputed under the report's ``rule`` and under the t rule:
    ``found`` and ``by_t`` (every pair), ``decided`` (the pairs the report's rule decides),
    ``mismatched`` (pairs whose recomputed verdict differs from the committed one) and
    ``t_go`` (decided verdicts the t rule does not give)."""
    kinds = {(v["a"], v["b"]): v["verdict"] for v in committed}
    found, by_t = verdicts.all_verdicts(finals, beats, rule), verdicts.all_verdicts(finals, beats, "t")
    t_kind = {(v["a"], v["b"]): v["verdict"] for v in by_t}
    decided = [v for v in found if v["verdict"] != "none"]
    return {"found": found, "by_t": by_t, "decided": decided,
            "mismatched": [f"{v['a']} vs {v['b']}" for v in found if kinds.get((v["a"], v["b"])) != v["verdict"]],
            "t_go": [_short(v) for v in decided if t_kind[(v["a"], v["b"])] != v["verdict"]],
            "t_new": [_short(v) for v in by_t if v["verdict"] != "none" and kinds.get((v["a"], v["b"])) != v["verdict"]]}


def metric_check(results: dict, rule: str, own=lambda v: True) -> dict:
    """The further metrics' "is above" verdicts (probes, pass@k, subsets) recomputed under the
    report's rule (checked against the committed ones) and under the t rule; the counts only
    over the pairs ``own`` keeps (those whose home is this report)."""
    out = {"above": 0, "t_above": 0, "mismatched": [], "t_go": []}
    for metric, committed in results.get("metric_verdicts", {}).items():
        got = both_rules(finals_of(results, metric), committed, rule, "is above")
        out["mismatched"] += [f"{metric}: {m}" for m in got["mismatched"]]
        decided = [v for v in got["decided"] if own(v)]
        t_go = [_short(v) for v in decided if _short(v) in got["t_go"]]
        out["above"] += len(decided)
        out["t_above"] += len(decided) - len(t_go)
        out["t_go"] += [f"{metric}: {g}" for g in t_go]
    return out


def counts(found: list[dict], by_t: list[dict]) -> dict:
    """Pairs, "beats" verdicts, those Holm keeps and those of the same sign on every seed, under
    the report's rule (``found``) and the t rule (``by_t``)."""
    summary, t_summary = verdicts.holm_summary(found), verdicts.holm_summary(by_t)
    decided = [v for v in found if v["verdict"] != "none"]
    return {"pairs": summary["pairs"], "beats": summary["beats"], "holm_stay": summary["stay"],
            "same_sign_all_seeds": sum(v.get("sign_flip_p", 1.0) <= 2 / 2 ** len(v["seeds"]) + 1e-12 for v in decided),
            "t_beats": t_summary["beats"], "t_holm_stay": t_summary["stay"]}


def rule_of(results: dict) -> str:
    """The key of :data:`opd.compare.verdicts.RULES` a committed ``results.json`` was judged by
    (the reports before the t rule state the bootstrap's)."""
    return "bootstrap" if "bootstrap" in results.get("rule", "bootstrap") else "t"


def check(name: str, results: dict, homes: dict | None = None) -> dict:
    """One comparison's verdicts recomputed under its own rule (checked against the committed
    ones) and under the t rule, each with Holm's correction, and the sign-flip p's. ``homes``
    (:func:`opd.compare.shared_runs.pair_homes`) marks the pairs another report holds too
    (``repeated``); ``own`` counts the rest."""
    homes = homes or {}
    own = lambda v: homes.get((name, v["a"], v["b"]), name) == name  # noqa: E731
    finals, rule = finals_of(results), rule_of(results)
    got = both_rules(finals, results["verdicts"], rule)
    found, by_t = got["found"], got["by_t"]
    for v in found:
        if v["interval"] is not None:
            v["sign_flip_p"] = verdicts.sign_flip_p([finals[v["a"]][s] - finals[v["b"]][s] for s in v["seeds"]])
    keep = ("a", "b", "verdict", "mean_diff", "interval", "p", "holm", "sign_flip_p")
    return {"name": name, "rule": rule, "seeds": len(results["seeds"]), **counts(found, by_t),
            "holm_go": verdicts.holm_summary(found)["go"], "mismatched": got["mismatched"],
            "min_sign_flip_p": min((v["sign_flip_p"] for v in found if "sign_flip_p" in v), default=None),
            "t_go": got["t_go"], "t_new": got["t_new"], "metrics": metric_check(results, rule, own),
            "own": counts([v for v in found if own(v)], [v for v in by_t if own(v)]),  # each pair's runs once
            "repeated": sorted({homes[name, v["a"], v["b"]] for v in found if not own(v)}),
            "verdicts": [{k: v.get(k) for k in keep} for v in found],
            "t_verdicts": [{k: v.get(k) for k in keep[:-1]} for v in by_t]}  # fmt: skip


def _table(rows: list[dict]) -> str:
    return markdown_table(
        ["comparison", "rule", "seeds", "pairs", "beats (its rule)", "stay under Holm", "every seed the same sign",
         "beats under the t rule", "t rule + Holm", "verdicts the t rule does not give", "pairs counted at another report"],
        [[r["name"], r["rule"], *map(str, (r["seeds"], r["pairs"], r["beats"], r["holm_stay"], r["same_sign_all_seeds"],
                                r["t_beats"], r["t_holm_stay"])), "; ".join(r["t_go"]) or "-",
          f"{r['pairs'] - r['own']['pairs']} ({', '.join(r['repeated'])})" if r["repeated"] else "-"] for r in rows],
    )  # fmt: skip


def _metric_table(rows: list[dict]) -> str:
    rows = [r for r in rows if r["metrics"]["above"]]
    return markdown_table(
        ["comparison", "\"is above\" (its rule)", "under the t rule", "verdicts the t rule does not give"],
        [[r["name"], str(r["metrics"]["above"]), str(r["metrics"]["t_above"]), "; ".join(r["metrics"]["t_go"]) or "-"]
         for r in rows],
    )


def report(rows: list[dict]) -> str:
    total = lambda key, rs=rows: sum(r["own"][key] for r in rs)  # noqa: E731  each pair's runs once
    beats, stay, same = total("beats"), total("holm_stay"), total("same_sign_all_seeds")
    boot = [r for r in rows if r["rule"] == "bootstrap"]  # judged by the old rule: what the t rule keeps of them
    boot_first = [r for r in boot if not r["name"].endswith("_tune2")]
    judged_t = [r["name"] for r in rows if r["rule"] == "t"]
    mism = [f"{r['name']}: {', '.join(r['mismatched'] + r['metrics']['mismatched'])}" for r in rows
            if r["mismatched"] or r["metrics"]["mismatched"]]
    m_above, m_t = sum(r["metrics"]["above"] for r in rows), sum(r["metrics"]["t_above"] for r in rows)
    new = [f"{r['name']}: {'; '.join(r['t_new'])}" for r in rows if r["t_new"]]
    return f"""# Multiple comparisons and the rule's level: which "beats" verdicts stay

Generated by `python experiments/multiple_comparisons.py` from the committed
`docs/results/*/results.json` (final test accuracy per seed); it runs nothing.

The comparisons published before the rule changed were judged by the bootstrap rule: "A beats
B" when the 95% percentile bootstrap interval of the mean per-seed difference excludes 0
({len(boot)} of the {len(rows)} here; the other {len(judged_t)}, published since, by the t rule: the table says which). Each report's
verdicts (and those on its further metrics) are recomputed here under the rule it states;
every one matched the committed verdict{'' if not mism else ' except: ' + '; '.join(mism)}.

**Each pair's runs counted once.** A report can reuse another's runs, gather several
reports' labels side by side or run a config again to the same numbers on every seed, so
the same pair of runs can be judged in several reports. The
totals below count each such pair once, at its home: of the reports that hold both runs, the
one with the fewest labels (`opd.compare.shared_runs`; the table's last column names the
pairs left to another report: {sum(r["pairs"] - r["own"]["pairs"] for r in rows)} of {sum(r["pairs"] for r in rows)}). The
table's other columns count each report's own family, the one its Holm correction ran over.

**The bootstrap rule's level.** At 5 seeds that interval is about `mean ± 1.75 sd/√5`, and
it excludes 0 in about 16% of comparisons where nothing differs, not 5%
([rule_level.md](rule_level.md) measures it). The protocol's rule is now the paired Student t
interval at 95% (`mean ± 2.78 sd/√5` at 5 seeds), whose level is 5% for normal differences.
**Under the t rule {total("t_beats", boot)} of the {total("beats", boot)} "beats" verdicts the
bootstrap rule published stay** ({total("t_beats", boot_first)} of {total("beats", boot_first)} over
the {len(boot_first)} of those comparisons that are not `_tune2` reruns); with Holm's correction
over each comparison's pairs as well, {total("t_holm_stay", boot)} ({total("t_holm_stay", boot_first)}).
The t rule gives no verdict the bootstrap did not{'' if not new else ', except: ' + '; '.join(new)}.

**Many pairs.** A comparison of 4 labels makes 6 tests. Holm's step-down correction over a
comparison's pairs at the same 5% level, on the p-values of each report's rule (the
bootstrap's: twice the smaller share of the 10,000 resampled means on either side of 0): over
the {len(boot)} bootstrap-judged comparisons {total("holm_stay", boot)} of the {total("beats", boot)} "beats"
verdicts stay ({total("holm_stay", boot_first)} of {total("beats", boot_first)} without the `_tune2` reruns);
over all {len(rows)}, {stay} of {beats}. In {same} of the {beats} the difference has the same sign on
every seed.
With 5 seeds an exact paired sign-flip test cannot give p below 2/32 = 0.0625, so no verdict
here passes it at 5%; the t-test goes below it by assuming normal differences.

{_table(rows)}

**The further metrics** (probes, pass@k, evaluation subsets: "A is above B", same rule):
{m_t} of the {m_above} published "is above" verdicts stay under the t rule (the counts include the
reports judged by the t rule, where every one stays).

{_metric_table(rows)}
"""


def quoted(out: dict) -> list[str]:
    """The phrases of this check that findings 9 and 10 of ``docs/results/README.md`` quote,
    from the check's ``results.json`` (``tests/test_shared_runs.py`` holds the prose to them)."""
    rows = out["comparisons"]
    boot = [r for r in rows if r["rule"] == "bootstrap"]
    first, judged_t = [r for r in boot if not r["name"].endswith("_tune2")], [r for r in rows if r["rule"] == "t"]
    n = lambda key, rs: sum(r["own"][key] for r in rs)  # noqa: E731
    above = lambda key, rs: sum(r["metrics"][key] for r in rs)  # noqa: E731
    return [f"{n('holm_stay', first)} of the {n('beats', first)} \"beats\" verdicts of the {len(first)} first-run comparisons stay",
            f"({n('holm_stay', boot)} of {n('beats', boot)} with the `_tune2` reruns",
            f"In {n('same_sign_all_seeds', first)} of the {n('beats', first)} the difference has the same sign",
            f"Over all {len(rows)} published comparisons, the {len(judged_t)} judged by the t rule",
            f"{n('holm_stay', rows)} of the {n('beats', rows)} \"beats\" verdicts stay under Holm's correction",
            f"{n('holm_stay', boot)} of the {n('beats', boot)} bootstrap-judged ones and "
            f"{n('holm_stay', judged_t)} of the {n('beats', judged_t)} t-judged ones",
            f"{n('t_beats', first)} of the {n('beats', first)} \"beats\" verdicts of the {len(first)} first-run comparisons stay",
            f"({n('t_beats', boot)} of {n('beats', boot)} with the `_tune2` reruns",
            f"{n('t_holm_stay', first)} and {n('t_holm_stay', boot)} with Holm's correction",
            f"{above('t_above', boot)} of the {above('above', boot)} \"is above\" verdicts"]


def main() -> None:
    found = {}
    for path in sorted(RESULTS.glob("*/results.json")):
        results = json.loads(path.read_text())
        if "labels" in results and any(v.get("interval") for v in results.get("verdicts", [])):
            found[path.parent.name] = results
    homes = shared_runs.pair_homes(found)
    rows = [check(name, results, homes) for name, results in found.items()]
    out = RESULTS / "multiple_comparisons"
    out.mkdir(exist_ok=True)
    (out / "results.json").write_text(json.dumps({"comparisons": rows}, indent=1) + "\n")
    (RESULTS / "multiple_comparisons.md").write_text(report(rows))
    boot = [r for r in rows if r["rule"] == "bootstrap"]
    beats, t_beats = sum(r["own"]["beats"] for r in boot), sum(r["own"]["t_beats"] for r in boot)
    print(f"{t_beats} of the bootstrap rule's {beats} beats verdicts stay under the t rule over {len(boot)} comparisons; "
          f"wrote {RESULTS / 'multiple_comparisons.md'}")


if __name__ == "__main__":
    main()
