"""Runs that more than one comparison reports. A comparison can reuse another's finished
runs (its spec copies them, or a gathering report puts several reports' labels side by side),
so the same runs, lr choices and verdicts appear in several ``results.json`` files. A check
that counts over every published comparison counts each of them once, at its *home*: of the
reports that hold it, the one with the fewest labels (the one that ran it, or the narrowest
family it was judged in), ties broken by name.

A label's runs are recognised by their fingerprint: method, overrides, lr, student base and
every seed's final metrics, wall time included, so two reports share a fingerprint only
when they report the same run files (a rerun, even one that lands on the same accuracies,
has other wall times). The lr counts once, as the runs used it: a report that fixes it in
the label's overrides holds the same runs as one whose grid chose it."""

from __future__ import annotations

import json


def fingerprint(entry: dict) -> str:
    """The identity of a label's runs, from its ``results.json`` entry. A probe's metrics
    (``probe/*``, measured on the runs' checkpoints after training: ``experiments/probed.py``)
    are left out: a report that probes the runs holds the same runs as one that does not."""
    keep = {k: entry.get(k) for k in ("method", "lr", "student_base")}
    keep["overrides"] = {k: v for k, v in (entry.get("overrides") or {}).items() if k != "lr"}
    keep["final"] = {seed: {k: v for k, v in f.items() if not k.startswith("probe/")} for seed, f in entry.get("final", {}).items()}
    return json.dumps(keep, sort_keys=True)


def _home(holders: list[tuple[int, str]]) -> str:
    return min(holders)[1]


def label_homes(reports: dict[str, dict], with_tuning: bool = False) -> dict[tuple[str, str], str]:
    """``{(report, label): home report}`` over ``{report name: results}``. ``with_tuning``:
    the label's lr tuning (``lr_tuning``) is part of its identity too, so a comparison tuned
    again (``NAME_tune2``) that chose the same lr, and so reused the same final runs, still
    holds its own lr choice."""
    def key(results: dict, label: str) -> str:
        tuning = results.get("lr_tuning", {}).get(label) if with_tuning else None
        return fingerprint(results["labels"][label]) + json.dumps(tuning, sort_keys=True)

    holders: dict[str, list[tuple[int, str]]] = {}
    for name, results in reports.items():
        for label in results.get("labels", {}):
            holders.setdefault(key(results, label), []).append((len(results["labels"]), name))
    return {(name, label): _home(holders[key(results, label)])
            for name, results in reports.items() for label in results.get("labels", {})}


def pair_homes(reports: dict[str, dict]) -> dict[tuple[str, str, str], str]:
    """``{(report, a, b): home report}`` for every pair of labels of every report: the pair's
    runs are the same in every report that holds both labels' runs (in either order)."""
    holders: dict[frozenset, list[tuple[int, str]]] = {}
    keys = {}
    for name, results in reports.items():
        prints = {label: fingerprint(entry) for label, entry in results.get("labels", {}).items()}
        for a in prints:
            for b in prints:
                if a < b:
                    key = frozenset((prints[a], prints[b]))
                    holders.setdefault(key, []).append((len(prints), name))
                    keys[name, a, b] = keys[name, b, a] = key
    return {where: _home(holders[key]) for where, key in keys.items()}
