"""``python -m opd.testbed.ship``: build the bases of :data:`opd.testbed.shipped.SHIPPED_RECIPES`
anew and ship them (maintainers, from a source checkout, after a recipe change).

    python -m opd.testbed.ship [--only NAME ...] [--list]

Each base is built from its recipe on one torch thread into a temporary cache (shipping
off, so nothing is copied from the old shipped files; a recipe that starts from another
base, :func:`start_recipe`, starts from that base as shipped), then its clean and damaged folders
are copied into ``src/opd/testbed/bases/`` with their sha256. On this project's 2-core CPU
that takes about 80 minutes for all three, most of it the two horizon-16 bases (34–41
minutes each); ``--only`` names the recipes to ship (``--list`` prints their names, the ids
of the failing ``test_every_shipped_base_is_the_current_recipe_and_intact``), the others
stay as shipped.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from opd.errors import UserError
from opd.testbed.builder import prepare_student_base, student_warmup
from opd.testbed.shipped import SHIPPED_RECIPES, recipe_id, ship


def chosen(only: list[str] | None) -> list[dict]:
    """The recipes named by ``only`` (every one when None), in :data:`SHIPPED_RECIPES`' order."""
    names = [recipe_id(r) for r in SHIPPED_RECIPES]
    unknown = sorted(set(only or ()) - set(names))
    if unknown:
        raise UserError(f"no shipped recipe is named {', '.join(unknown)}: the names are {', '.join(names)} "
                        "(python -m opd.testbed.ship --list)")
    return [r for r, name in zip(SHIPPED_RECIPES, names) if only is None or name in only]


def start_recipe(recipe: dict) -> dict | None:
    """The recipe of the base whose SFT ``recipe``'s starts from (``from_horizon`` in its
    warm-up, :data:`opd.testbed.builder.LONG_WARMUP`), or None: that base is taken as shipped
    (or as built earlier in the same invocation), not rebuilt."""
    start = student_warmup(recipe["task"], horizon=recipe["horizon"]).get("from_horizon")
    return None if start is None else {**recipe, "horizon": start}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", metavar="NAME", help="ship this recipe only (repeatable)")
    ap.add_argument("--list", action="store_true", help="print the recipes' names and exit")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(recipe_id(r) for r in SHIPPED_RECIPES))
        return
    try:
        recipes = chosen(args.only)
    except UserError as err:
        ap.error(str(err))
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["OPD_CACHE"] = cache
        for recipe in recipes:
            if (start := start_recipe(recipe)) is not None:  # the chain starts from the base users get
                os.environ["OPD_SHIPPED_BASES"] = "1"
                prepare_student_base(**start, target_accuracy=None)
            os.environ["OPD_SHIPPED_BASES"] = "0"
            for folder in (prepare_student_base(**recipe, target_accuracy=None), prepare_student_base(**recipe)):
                print(f"shipped {folder.name}: {ship(folder)['model.safetensors'][:12]} (model sha256)")


if __name__ == "__main__":
    main()
