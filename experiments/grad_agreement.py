"""How much of a method's gradient is signal: agreement between independent batches.

    python experiments/grad_agreement.py NAME [NAME ...] [--batches 8]

For each label of ``experiments/NAME.yaml``, at the experiment's student base (no update
applied), the gradient ``g_i`` of the label's loss on ``--batches`` independent batches
(each the label's own step: its prompts per step and group size, its rollouts and
teacher), and their mean pairwise cosine

    A = mean over pairs i < j of  g_i · g_j / (|g_i| |g_j|)

A is near 0 when a batch's gradient is mostly sampling noise and near 1 when every batch
points the same way. Under AdamW a step moves every weight by about the learning rate
whatever the gradient's scale, so at equal learning rate a label with a lower A takes a
larger share of its step at random. Where the experiment has an ``sft`` label, ``C`` is the
cosine between a label's mean gradient and SFT's mean gradient (the direction of imitating
the teacher's samples). Writes ``docs/results/grad_agreement.md`` and
``docs/results/grad_agreement/results.json`` (the experiments given in one call).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
from pathlib import Path

import torch

from opd.compare.driver import load_spec, run_config
from opd.report import markdown_table
from opd.run.loop import pick_problems, step_generator, train_step
from opd.run.setup import build_setup

ROOT = Path(__file__).resolve().parents[1]
SEED = 1000  # the batches' seed: none of the runs' seeds (0-5)


def gradients(setup, cfg, batches: int) -> list[torch.Tensor]:
    """The flattened gradient of ``batches`` independent steps at the student of ``setup``
    (its weights are left as they were)."""
    model = setup.env.student
    params = [p for p in model.parameters() if p.requires_grad]
    frozen = torch.optim.SGD(params, lr=0.0)  # update() computes the gradient; this step changes nothing
    out = []
    for b in range(batches):
        generator = step_generator(SEED, b)
        problems = pick_problems(setup.train_pool, cfg.prompts_per_step, generator)
        train_step(setup.env, setup.method, problems, generator, frozen, micro_batch_size=cfg.micro_batch_size,
                   max_grad_norm=0.0, ppo_epochs=1)
        out.append(torch.cat([p.grad.flatten() for p in params]).clone())
    return out


def agreement(grads: list[torch.Tensor]) -> dict:
    cos = [float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in itertools.combinations(grads, 2)]
    norms = [float(g.norm()) for g in grads]
    return {"agreement": statistics.mean(cos), "agreement_std": statistics.stdev(cos), "pairs": len(cos),
            "grad_norm": statistics.mean(norms)}


def measure(name: str, batches: int) -> dict:
    spec = load_spec(str(ROOT / "experiments" / f"{name}.yaml"))
    results = json.loads((ROOT / "docs" / "results" / name / "results.json").read_text())
    out, means = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for label in spec.methods:
            cfg = run_config(spec, label, SEED, results["chosen_lr"][label], Path(tmp) / label, tune=True)
            grads = gradients(build_setup(cfg), cfg, batches)
            means[label] = torch.stack(grads).mean(0)
            out[label] = {**agreement(grads), "chosen_lr": results["chosen_lr"][label],
                          "lr_tuning": results["lr_tuning"][label], "sequences_per_step": cfg.prompts_per_step * cfg.group_size}
    for label in out:
        out[label]["cos_sft"] = float(torch.nn.functional.cosine_similarity(means[label], means["sft"], dim=0)) if "sft" in means else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="+")
    ap.add_argument("--batches", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = {name: measure(name, args.batches) for name in args.names}
    docs = ROOT / "docs" / "results"
    (docs / "grad_agreement").mkdir(exist_ok=True)
    (docs / "grad_agreement" / "results.json").write_text(json.dumps({"batches": args.batches, "seed": SEED, "experiments": results}, indent=1))
    rows = []
    for name, labels in results.items():
        for label, m in labels.items():
            tuning = ", ".join(f"{float(lr):g}: {acc:.3f}" for lr, acc in sorted(m["lr_tuning"].items(), key=lambda kv: float(kv[0])))
            cos_sft = "-" if m["cos_sft"] is None else f"{m['cos_sft']:.3f}"
            rows.append([name, label, f"{m['agreement']:.3f} ± {m['agreement_std']:.3f}", cos_sft, f"{m['grad_norm']:.3g}",
                         str(m["sequences_per_step"]), f"{m['chosen_lr']:g}", tuning])
    table = markdown_table(["experiment", "label", "agreement A (mean ± std over pairs)", "C: cos(mean g, mean g of sft)", "mean gradient norm", "sequences per step",
                            "chosen lr", "validation accuracy by lr (tuning seed)"], rows)
    intro = ("For each label of an experiment, at its student base (no update applied), the gradient g_i of the label's "
             "loss on independent batches (each the label's own step: its prompts per step and group size, its rollouts "
             "and teacher), and their mean pairwise cosine, the agreement A = mean over pairs i < j of cos(g_i, g_j). A is "
             "near 0 when a batch's gradient is mostly sampling noise and near 1 when every batch points the same way. "
             "Under AdamW a step moves every weight by about the learning rate whatever the gradient's scale, so at equal "
             "learning rate a label with a lower A takes a larger share of its step at random. C is the cosine between "
             "a label's mean gradient and the sft label's mean gradient (the direction of imitating the teacher's "
             "samples); the mean of noisy gradients keeps some of their noise, so a low A also pulls C toward 0. These "
             "are measurements at the base on one set of batches, not verdicts.")
    doc = ["# Gradient agreement between independent batches", "", intro, "",
           f"Regenerate: `python experiments/grad_agreement.py {' '.join(args.names)} --batches {args.batches}`; numbers in "
           f"[grad_agreement/results.json](grad_agreement/results.json). {args.batches} batches per label "
           f"({args.batches * (args.batches - 1) // 2} pairs), batch seed {SEED}, at each experiment's base with its chosen "
           "learning rate's config (the gradient does not depend on the rate); the tuning column is the experiment's.", "", table, ""]
    (docs / "grad_agreement.md").write_text("\n".join(doc))
    print("\n".join(doc))


if __name__ == "__main__":
    main()
