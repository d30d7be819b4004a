"""``python -m opd.testbed.ship``: build the bases of :data:`opd.testbed.shipped.SHIPPED_RECIPES`
anew and ship them (maintainers, from a source checkout, after a recipe change).

Each base is built from its recipe on one torch thread into a temporary cache (shipping
off, so nothing is copied from the old shipped files), then its clean and damaged folders
are copied into ``src/opd/testbed/bases/`` with their sha256. On this project's 2-core CPU
that takes about 80 minutes, most of it the two horizon-16 bases.
"""

from __future__ import annotations

import os
import tempfile

from opd.testbed.builder import prepare_student_base
from opd.testbed.shipped import SHIPPED_RECIPES, ship


def main() -> None:
    import torch

    torch.set_num_threads(1)
    os.environ["OPD_SHIPPED_BASES"] = "0"
    with tempfile.TemporaryDirectory() as cache:
        os.environ["OPD_CACHE"] = cache
        for recipe in SHIPPED_RECIPES:
            for folder in (prepare_student_base(**recipe, target_accuracy=None), prepare_student_base(**recipe)):
                print(f"shipped {folder.name}: {ship(folder)['model.safetensors'][:12]} (model sha256)")


if __name__ == "__main__":
    main()
