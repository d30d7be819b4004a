"""Testbed bases that ship with ``opd``, so a fresh machine need not build them.

Building the quickstart's student base (1,000 SFT steps, then the damage search) took 285 s
of CPU on this project's 2-core machine, more than the quickstart's 15 runs on both cores;
the 4-layer horizon-16 base of the ``modchain_labeled`` experiments took 41 minutes, and its
seed-1 twin (``base_seed: 1``, the base of ``horizon_labeled_h16_base1``) 34, and the 4-layer
horizon-32 base (its SFT from the horizon-16 one) 56 minutes beside other work. ``opd`` ships
all four (:data:`SHIPPED_RECIPES`), clean and damaged, as built once there
(``bases/<cache name>/``: weights, config, tokenizer and ``READY.json``, without the
optimizer state), with every file's sha256 in ``bases/SHA256SUMS.json``. On a cache
miss the builder first looks here (:func:`restore`): a shipped folder of the same cache name
(the same recipe, key and version) is copied into the cache, verified, and used as if built.
A recipe change gives a new cache name, so a stale shipped base is never used, and
``tests/test_shipped_bases.py`` fails until it is shipped again.

Shipping a base also fixes where every user starts: a base built anew depends on the CPU
through floating-point order (another CPU lands the damage elsewhere), a shipped one does not.
``OPD_SHIPPED_BASES=0`` (or ``opd prepare --build``) builds from scratch instead.

Maintainers ship again with ``python -m opd.testbed.ship`` (from a source checkout): it
builds each base in :data:`SHIPPED_RECIPES` (or only those named by ``--only``, see
:func:`recipe_id`) anew, one torch thread, into a temporary cache, and copies it here
(:func:`ship`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from opd.errors import UserError
from opd.run.checkpoint import file_sha256

ROOT = Path(__file__).with_name("bases")
SUMS = "SHA256SUMS.json"
FILES = ("config.json", "config.yaml", "generation_config.json", "model.safetensors", "tokenizer.json",
         "tokenizer_config.json", "READY.json")
SHIPPED_RECIPES = (
    {"task": "addition", "horizon": 4},  # the quickstart's base (student=testbed)
    {"task": "modchain_labeled", "horizon": 16, "layers": 4},  # student=testbed-x4 at horizon 16: 41 minutes to build here
    {"task": "modchain_labeled", "horizon": 16, "layers": 4, "seed": 1},  # the same with base_seed=1: 34 minutes
    {"task": "modchain_labeled", "horizon": 32, "layers": 4},  # from the horizon-16 one: 56 minutes beside other work
)  # prepare_student_base's arguments


def recipe_id(recipe: dict) -> str:
    """A shipped recipe's short name, e.g. ``modchain_labeled-h16-x4-seed1`` (the shipped-base
    test's id and ``python -m opd.testbed.ship --only``'s argument)."""
    return f"{recipe['task']}-h{recipe['horizon']}-x{recipe.get('layers', 2)}-seed{recipe.get('seed', 0)}"


def enabled() -> bool:
    return os.environ.get("OPD_SHIPPED_BASES", "1").strip().lower() not in ("0", "false", "no", "off")


def shipped_sums(root: Path | None = None) -> dict[str, dict[str, str]]:
    """``{cache name: {file: sha256}}`` of the shipped bases (empty when none are)."""
    sums = (root or ROOT) / SUMS
    return json.loads(sums.read_text()) if sums.is_file() else {}


def restore(path: Path, root: Path | None = None) -> bool:
    """Copy the shipped base named ``path.name`` to ``path`` (the cache), verified file by
    file; False when none is shipped under that name or shipping is off. The caller holds
    the builder's lock on ``path``."""
    root = root or ROOT
    sums = shipped_sums(root).get(path.name)
    if not enabled() or sums is None:
        return False
    work = path.with_name(path.name + ".shipped")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for name in sums:  # into a work folder, renamed into place once every file is verified
        source = root / path.name / name
        if not source.is_file() or file_sha256(source) != sums[name]:
            shutil.rmtree(work)
            raise UserError(
                f"the shipped testbed base file {source} is missing or does not match its sha256 in {root / SUMS}: "
                "reinstall opd, or set OPD_SHIPPED_BASES=0 to build the base from scratch")
        shutil.copyfile(source, work / name)
    shutil.rmtree(path, ignore_errors=True)
    work.rename(path)
    return True


def ship(source: Path, root: Path | None = None) -> dict[str, str]:
    """Copy a built base folder ``source`` into the shipped bases (its cache name kept) and
    record its files' sha256; returns them."""
    root = root or ROOT
    target = root / source.name
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    sums = {}
    for name in FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
            sums[name] = file_sha256(target / name)
    everything = shipped_sums(root)
    everything[source.name] = sums
    (root / SUMS).write_text(json.dumps(everything, indent=1, sort_keys=True) + "\n")
    return sums
