"""Where the testbed's student bases make their first mistake (the instrument check for E3).

    python experiments/first_mistakes.py [--prompts 256] [--only STUDENT ...]

For each student base below, greedy rollouts on held-out test prompts, and the step of
each rollout's first deviation from the oracle (:mod:`opd.diagnostics.mistakes`; the
measure of the "First mistakes" section of ``opd diagnose``, which samples at the run's
temperature instead). Horizon decay needs mistakes spread along the
rollout; a base whose first mistakes pile up in one step cannot show it. Writes
``docs/results/first_mistakes.md`` and ``docs/results/first_mistakes/results.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from opd.config.train import TrainConfig
from opd.diagnostics.diagnose import mistakes_section
from opd.models.sampler import sample
from opd.report import markdown_table
from opd.run.setup import build_setup
from opd.testbed.builder import eval_tokens

ROOT = Path(__file__).resolve().parents[1]
# (student, task, horizon): the bases of the published comparisons
BASES = [
    ("testbed", "addition", 4), ("testbed-d128", "addition", 4),
    ("testbed", "modchain", 4), ("testbed-d128", "modchain", 4),
    ("testbed", "modchain", 8), ("testbed-d128", "modchain", 8), ("testbed-d128", "modchain", 16),
    ("testbed-d64", "ring", 8), ("testbed-d128x4", "ring", 8), ("testbed-d64", "ring", 16), ("testbed-d64", "ring", 32),
    ("testbed-x4", "modchain", 4), ("testbed-x4", "modchain", 8),
    ("testbed-x4", "modchain_labeled", 16), ("testbed-x4", "modchain_labeled", 32),
]


def measure(student: str, task: str, horizon: int, prompts: int) -> dict:
    cfg = TrainConfig(method="sft", student=student, teacher=None, task=task, horizon=horizon, seed=0, eval_size=prompts,
                      eval_split="test", max_new_tokens=eval_tokens(horizon) + 8, progress=False)
    setup = build_setup(cfg)
    env, tok = setup.env, setup.tokenizer
    x = [env.encode_prompt(p) for p in setup.eval_problems]
    out = sample(env.student, x, max_new_tokens=cfg.max_new_tokens, eos_id=env.eos_id, pad_id=env.pad_id,
                 temperature=0.0, top_p=1.0)
    ys = out.batch.completions()
    shares = mistakes_section(cfg, env, tok, x, ys)
    shares["accuracy"] = sum(env.verify(p, y) for p, y in zip(setup.eval_problems, ys)) / len(ys)
    return shares


def row(key: str, m: dict) -> list[str]:
    h = len(m["by_step"])
    head = ", ".join(f"{v:.2f}" for v in m["by_step"][:8]) + (", ..." if h > 8 else "")
    return [key, f"{m['accuracy']:.3f}", f"{1 - m['none']:.3f}", str(m["mode_step"]), f"{m['mode_share']:.2f}",
            f"{1 / h:.2f}", head, f"{m['answer']:.3f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--only", nargs="+", metavar="BASE", help="measure only these bases (a student, e.g. testbed-x4, "
                    "or one row's key, e.g. 'testbed-x4 modchain_labeled h32'); keep the committed numbers of the "
                    "others (each base not in the cache is built first, minutes each)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = ROOT / "docs" / "results"
    saved = json.loads((out / "first_mistakes" / "results.json").read_text()) if args.only else {"bases": {}}
    if args.only and saved["prompts"] != args.prompts:
        raise SystemExit(f"--only keeps the committed rows, measured on {saved['prompts']} prompts; pass that --prompts")
    results = saved["bases"]
    for s, t, h in BASES:
        if not args.only or s in args.only or f"{s} {t} h{h}" in args.only:
            results[f"{s} {t} h{h}"] = measure(s, t, h, args.prompts)
    results = {f"{s} {t} h{h}": results[f"{s} {t} h{h}"] for s, t, h in BASES}
    (out / "first_mistakes").mkdir(exist_ok=True)
    (out / "first_mistakes" / "results.json").write_text(json.dumps({"prompts": args.prompts, "bases": results}, indent=1))
    table = markdown_table(["base", "greedy accuracy", "rollouts with a mistake", "modal step", "its share of first mistakes",
                            "1/h", "share of rollouts by first-mistake step (0, 1, ...)", "answer only"],
                           [row(k, m) for k, m in results.items()])
    intro = ("For each student base, greedy rollouts on held-out test prompts, and the step of each rollout's first "
             "deviation from the oracle (`opd.diagnostics.mistakes`; the measure of the \"First mistakes\" section of "
             "`opd diagnose`, which samples at the run's temperature instead). Horizon decay needs mistakes spread along "
             "the rollout; a base whose first mistakes pile up in one step cannot show it.")
    doc = ["# First mistakes of the student bases", "", intro, "",
           f"Regenerate: `python experiments/first_mistakes.py --prompts {args.prompts}`; numbers in "
           "[first_mistakes/results.json](first_mistakes/results.json). Greedy rollouts on "
           f"{args.prompts} test prompts per base; step 0 is the first. With one error rate e at every step the "
           "shares would fall geometrically, e(1 - e)^k, so the modal step would be step 0 with a share of first "
           "mistakes of about 1/h or more.", "", table, ""]
    (out / "first_mistakes.md").write_text("\n".join(doc))
    print("\n".join(doc))


if __name__ == "__main__":
    main()
