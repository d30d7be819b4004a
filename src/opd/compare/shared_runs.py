"""Runs that more than one comparison reports. A comparison can reuse another's finished
runs (its spec copies them, a gathering report puts several reports' labels side by side, a
seed-subset report takes some of a label's seeds), or run a label's config again and land on
the same numbers, so the same evidence (lr choices, per-seed results, verdicts) appears in
several ``results.json`` files. A check that counts over every published comparison counts
each of them once, at its *home*.

A label's runs are recognised by their fingerprint: method, overrides, lr, student base and
every seed's final metrics, less the wall time. So two reports share a fingerprint when
they report the same run files, and also when one ran the same config again and got the
same metrics on every seed (an exact rerun: the testbed's runs are deterministic on one
machine, and such a rerun adds no evidence; only its wall times differ). The lr counts
once, as the runs used it: a report that fixes it in the label's overrides holds the same
runs as one whose grid chose it.

A label *contains* another when both have the same config and every seed of the other is
one of its seeds with the same metrics (a report of seeds 0-4 of a ten-seed label is
contained in it). A label's home is, of the labels that contain it, one with the most seeds;
among those, the one in the report with the fewest labels (the one that ran it, or the
narrowest family it was judged in), ties broken by name. A pair of labels is matched by
exact fingerprints only: a verdict over a subset of the seeds is another verdict."""

from __future__ import annotations

import json

UNTIMED = ("wall_s",)  # final metrics that differ between runs of one config on one machine


def _config(entry: dict) -> str:
    keep = {k: entry.get(k) for k in ("method", "lr", "student_base")}
    keep["overrides"] = {k: v for k, v in (entry.get("overrides") or {}).items() if k != "lr"}
    return json.dumps(keep, sort_keys=True)


def _finals(entry: dict) -> dict[str, str]:
    """``{seed: its final metrics}`` as text, less the wall time and the probe's metrics
    (``probe/*``, measured on the runs' checkpoints after training: ``experiments/probed.py``;
    a report that probes the runs holds the same runs as one that does not)."""
    return {seed: json.dumps({k: v for k, v in f.items() if k not in UNTIMED and not k.startswith("probe/")}, sort_keys=True)
            for seed, f in entry.get("final", {}).items()}


def fingerprint(entry: dict) -> str:
    """The identity of a label's runs, from its ``results.json`` entry (module doc)."""
    return json.dumps([_config(entry), _finals(entry)], sort_keys=True)


def contains(big: dict, small: dict) -> bool:
    """Whether the label ``big`` holds every run of ``small``: the same config, and each of
    ``small``'s seeds among ``big``'s with the same final metrics."""
    if _config(big) != _config(small):
        return False
    mine, theirs = _finals(big), _finals(small)
    return all(mine.get(seed) == f for seed, f in theirs.items())


def _home(holders: list[tuple]) -> str:
    return min(holders)[-1]


def label_homes(reports: dict[str, dict], with_tuning: bool = False) -> dict[tuple[str, str], str]:
    """``{(report, label): home report}`` over ``{report name: results}``. ``with_tuning``:
    the label's lr tuning (``lr_tuning``) is part of its identity too, so a comparison tuned
    again (``NAME_tune2``) that chose the same lr, and so reused the same final runs, still
    holds its own lr choice."""
    def tuning(results: dict, label: str) -> str:
        return json.dumps(results.get("lr_tuning", {}).get(label) if with_tuning else None, sort_keys=True)

    by_config: dict[tuple[str, str], list[tuple[int, int, str, dict]]] = {}
    for name, results in reports.items():
        for label, entry in results.get("labels", {}).items():
            key = (_config(entry), tuning(results, label))
            by_config.setdefault(key, []).append((-len(entry.get("final", {})), len(results["labels"]), name, entry))
    homes = {}
    for name, results in reports.items():
        for label, entry in results.get("labels", {}).items():
            rivals = by_config[_config(entry), tuning(results, label)]
            homes[name, label] = _home([(n, size, where) for n, size, where, big in rivals if contains(big, entry)])
    return homes


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
