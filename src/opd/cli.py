"""The ``opd`` command line: ``quickstart``, ``train``, ``compare``, ``diagnose``, ``export``, ``serve``, ``methods``, ``config``, ``prepare``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from opd.errors import UserError


def _threads() -> None:
    import torch

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 16)))


def cmd_train(args) -> int:
    from opd.config.train import train_config
    from opd.run import distributed
    from opd.run.runner import train

    cfg, recipe = train_config(args.config, args.overrides)
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 alone prints
    if recipe and main:
        shown = " ".join(f"{k}={v}" for k, v in recipe.items())
        print(f"method {cfg.method}: {shown} (its recipe under your settings; override with key=value)")
    distributed.init(cfg.device)  # several ranks under torchrun; else nothing
    try:
        history = train(cfg)
    except BaseException:
        distributed.finish(ok=False)
        raise
    distributed.finish()
    if main:
        print(f"done: {cfg.run_dir}{_measured(history[-1] if history else {})}")
    if distributed.launched():  # every file is written and synced; skip the interpreter's teardown, where a
        sys.stdout.flush()      # rank could abort on a C++ thread left joinable after the process group ended
        sys.stderr.flush()
        os._exit(0)
    return 0


def _measured(row: dict) -> str:
    """The last evaluation's accuracy, or (prompt-only data: nothing to check) its mean length."""
    if "eval/accuracy" in row:
        return f"  accuracy={row['eval/accuracy']:.3f}"
    if "eval/length" in row:
        return f"  mean_length={row['eval/length']:.1f} tokens (no answers to check accuracy against)"
    return ""


def cmd_methods(args) -> int:
    from opd.methods import describe_methods, methods_table

    print(methods_table() if args.markdown else describe_methods())
    return 0


def cmd_config(args) -> int:
    from opd.config.loader import describe_config
    from opd.config.train import TrainConfig

    print(json.dumps(TrainConfig.model_json_schema(), indent=1) if args.schema else describe_config(TrainConfig))
    return 0


def cmd_quickstart(args) -> int:
    from opd.compare.quickstart import quickstart

    quickstart(out_dir=args.out, tune_lrs=args.tune, jobs=args.jobs)
    return 0


def cmd_compare(args) -> int:
    from opd.compare.driver import compare

    compare(args.spec, out_dir=args.out, overrides=args.overrides, force=args.force, jobs=args.jobs)
    return 0


def cmd_prepare(args) -> int:
    from opd.testbed.builder import prepare

    if args.build:
        os.environ["OPD_SHIPPED_BASES"] = "0"

    print(prepare(args.task, args.horizon, teacher=args.teacher, student=args.student, base_seed=args.base_seed))
    return 0


def cmd_diagnose(args) -> int:
    from opd.diagnostics.diagnose import diagnose

    print(f"report: {diagnose(args.path, args.out, prompts=args.prompts, seed=args.seed)}")
    return 0


def cmd_export(args) -> int:
    from opd.run.export import export

    print(f"exported: {export(args.path, args.out, merge=args.merge)}")
    return 0


def cmd_serve(args) -> int:
    from opd.models.server import serve

    serve(args.model, host=args.host, port=args.port, max_batch=args.max_batch, device=args.device, dtype=args.dtype)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="opd", description="On-policy distillation of language models.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train with one method (key=value overrides; see `opd config`)")
    t.add_argument("--config", help="YAML file with a flat mapping of config keys")
    t.add_argument("overrides", nargs="*", help="key=value, e.g. method=opd lr=3e-4")
    t.set_defaults(func=cmd_train)
    c = sub.add_parser("compare", help="several method configs x seeds under one budget; writes report.md + plots")
    c.add_argument("spec", help="YAML spec: base, methods, seeds, budget_kind, budget, lr_grid, eval_every")
    c.add_argument("--out", help="where runs and the report go (default runs/compare/SPEC_NAME)")
    c.add_argument("--force", action="store_true", help="recompute runs instead of reusing finished ones")
    c.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own worker process (and its own GPU when CUDA sees several; default 1)")
    c.add_argument("overrides", nargs="*", help="key=value: spec keys (seeds=3, budget=512) or config keys for every run")
    c.set_defaults(func=cmd_compare)
    methods = sub.add_parser("methods", help="list the methods, the pitfall each fixes, their knobs")
    methods.add_argument("--markdown", action="store_true", help="print the README's table")
    methods.set_defaults(func=cmd_methods)
    cf = sub.add_parser("config", help="list every config key with its type, default and range")
    cf.add_argument("--schema", action="store_true", help="print the config's JSON schema instead")
    cf.set_defaults(func=cmd_config)
    pr = sub.add_parser("prepare", help="build and cache the testbed's tiny student base (and learned teacher)")
    pr.add_argument("--task", default="addition")
    pr.add_argument("--horizon", type=int, default=4)
    pr.add_argument("--student", default="testbed", help="which testbed student: testbed, testbed-x4, testbed-wait, testbed-d32 ...")
    pr.add_argument("--base-seed", type=int, default=0, help="the student's base_seed (0: the bases shipped with opd)")
    pr.add_argument("--teacher", action="store_true", help="also train the learned teacher")
    pr.add_argument("--build", action="store_true",
                    help="build what is not cached from scratch instead of copying a base shipped with opd "
                         "(as OPD_SHIPPED_BASES=0; a base already cached stays: point OPD_CACHE elsewhere to rebuild)")
    pr.set_defaults(func=cmd_prepare)
    q = sub.add_parser("quickstart", help="SFT vs GRPO vs OPD on the synthetic testbed (a few minutes on a CPU)")
    q.add_argument("--out", default="runs/quickstart", help="where the runs and report.md go")
    q.add_argument("--tune", action="store_true", help="re-run the learning-rate grid on the validation split")
    q.add_argument("--jobs", type=int, default=None,
                   help="runs at a time, one worker process (one thread) each; default: one a core, at most 8")
    q.set_defaults(func=cmd_quickstart)
    d = sub.add_parser("diagnose", help="measure the pitfalls on a run or checkpoint (report.md + plots)")
    d.add_argument("path", metavar="RUN_OR_CHECKPOINT", help="a run directory (its latest checkpoint) or a checkpoint")
    d.add_argument("--out", help="report folder (default: RUN/diagnose)")
    d.add_argument("--prompts", type=int, default=16, help="held-out prompts to measure on")
    d.add_argument("--seed", type=int, default=0, help="sampling seed")
    d.set_defaults(func=cmd_diagnose)
    e = sub.add_parser("export", help="write a run's checkpoint as a plain model directory (save_pretrained)")
    e.add_argument("path", metavar="RUN_OR_CHECKPOINT", help="a run directory (its latest checkpoint) or a checkpoint")
    e.add_argument("out", help="an empty or new directory")
    e.add_argument("--merge", action="store_true", help="a LoRA run: fold the adapters into the base weights")
    e.set_defaults(func=cmd_export)
    s = sub.add_parser("serve", help="serve a teacher model over vLLM's /v1/completions protocol (prompt_logprobs)")
    s.add_argument("model", help="model directory or hub id")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--max-batch", type=int, default=64, help="requests scored in one forward pass at most")
    s.add_argument("--device", default="cpu")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    s.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    args, extra = parser().parse_known_args(argv)
    if extra:  # key=value after an option (``opd compare SPEC --out DIR k=v``) are overrides too
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser().error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    _threads()
    try:
        return args.func(args)
    except (UserError, FileNotFoundError) as err:  # the user can fix it: one line, no traceback
        print(f"opd: error: {' '.join(str(err).splitlines())}", file=sys.stderr)
        return 2
    except Exception:  # a bug: keep the traceback
        traceback.print_exc()
        print("opd: internal error (a bug): please report it with the traceback above", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
