"""bench/gpu.py at its cpu size: it runs end to end and writes every section with finite numbers.

Correctness only (no timing is asserted): the three loss methods agree, greedy sampling
agrees with ``generate``, and the FLOP count follows the formula in the script's docstring.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_bench_gpu_cpu_size(tmp_path):
    out = tmp_path / "gpu_results.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    cmd = [sys.executable, str(ROOT / "bench" / "gpu.py"), "--size", "cpu", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["meta"]["budgets_s"]["train"] == 600.0  # the GPU budget x 4: a loaded CPU still finishes
    for section in ("meta", "mfu", "loss", "rollout", "summary"):
        assert section in res and "error" not in res[section], res.get(section)

    mfu = res["mfu"]
    assert all(_finite(mfu[k]) and mfu[k] > 0 for k in ("fwd_bwd_ms", "optimizer_ms", "achieved_flops_per_s"))
    assert mfu["mfu"] is None  # no peak FLOP/s on the CPU
    f, B, S = mfu["flops_per_step"], mfu["batch"], mfu["seq"]
    a = mfu["arch"]
    assert f["dense"] == 6 * mfu["params_nonembed"] * B * S
    assert f["attention"] == 6 * a["layers"] * a["hidden"] * S**2 * B
    assert f["head"] == 6 * B * (S - mfu["prompt"]) * a["vocab"] * a["hidden"]
    assert f["total"] == f["dense"] + f["attention"] + f["head"]

    methods = res["loss"]["methods"]
    assert set(methods) == {"naive", "lean-fused", "lean-recompute"}  # no Liger on the CPU
    for name, r in methods.items():
        assert _finite(r["ms"]) and _finite(r["loss"]) and r["loss"] > 0, (name, r)
        assert r["compared_to"] == "naive"
        assert r["loss_rel_diff"] < 1e-5 and r["grad_h_rel_err"] < 1e-4, (name, r)

    roll = res["rollout"]
    assert roll["greedy_agreement"]["fraction"] == 1.0
    for side in ("opd_sampler", "generate_default"):
        assert _finite(roll[side]["tokens_per_s"]) and roll[side]["tokens_per_s"] > 0, roll[side]
    assert _finite(roll["ratio_sampler_vs_generate_default"])
    assert "generate_static" not in roll  # compiled static cache: gpu size only

    train = res["train"]
    for method in ("opd", "gkd"):
        run = train[method]
        assert run["returncode"] == 0 and run["steps_done"] == 3, run
        split = run["split_s"]
        assert all(_finite(split[k]) and split[k] > 0 for k in ("sample", "score", "update")), split
        assert _finite(run["tokens_per_s"]) and all(_finite(x) for x in run["loss"]), run
    assert res["summary"]["train_tokens_per_s"]["opd"] == train["opd"]["tokens_per_s"]


def test_non_embedding_parameter_formula_matches_the_model():
    sys.path.insert(0, str(ROOT / "bench"))
    import torch

    import gpu_common as gpu  # the models and their shapes (bench/gpu.py imports them)

    arch = gpu.SIZES["cpu"]["teacher"]
    for family, o_bias in (("llama", True), ("qwen2", False)):
        model = gpu.build_model(arch, torch.float32, torch.device("cpu"), family=family)
        real = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
        assert gpu.non_embedding_params(arch, o_bias=o_bias) == real
