"""LoRA adapters through PEFT: base weights untouched, the loss falls, resume is exact, export."""

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from opd.cli import main
from opd.models import lora
from opd.run.metrics_log import read_metrics
from opd.run.runner import Run, train


def _lora_cfg(tiny_cfg, **kw):
    return tiny_cfg(lora_r=4, lora_alpha=8.0, **kw)


def _adapter(path) -> dict:
    return load_file(str(path / "adapter_model.safetensors"))


def test_only_the_adapters_train_and_are_saved(tiny_cfg):
    cfg = _lora_cfg(tiny_cfg, method="opd")
    run = Run(cfg)
    model = run.setup.env.student
    assert lora.is_lora(model)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    in_optimizer = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == trainable and 0 < len(trainable) < len(list(model.parameters()))
    run.fit()
    base = AutoModelForCausalLM.from_pretrained(cfg.student).state_dict()
    trained_base = model.get_base_model().state_dict()
    for name, weight in base.items():  # base weights bit-identical after training
        key = next(k for k in trained_base if k.replace(".base_layer", "") == name)
        assert torch.equal(trained_base[key], weight), name
    ckpt = next(iter(sorted((cfg.run_dir and __import__("pathlib").Path(cfg.run_dir) / "checkpoints").iterdir())))
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    assert all("lora_" in k for k in _adapter(ckpt))
    assert any(v.abs().sum() > 0 for k, v in _adapter(ckpt).items() if "lora_B" in k)  # the adapters moved


def test_the_loss_falls_with_adapters(tiny_cfg):
    cfg = _lora_cfg(tiny_cfg, method="sft", steps=12, lr=5e-2, eval_every=0)
    train(cfg)
    nll = [r["loss/nll"] for r in read_metrics(cfg.run_dir) if "loss/nll" in r]
    # a random tiny student: the adapters take the NLL from 3.22 nats towards log(21) ~ 3.04 (the
    # uniform over the live words) in 12 steps; the last three steps sit 0.1 nats below the first
    assert len(nll) == 12 and sum(nll[-3:]) / 3 < nll[0] - 0.1, nll


def test_resume_continues_exactly(tiny_cfg, tmp_path):
    straight = _lora_cfg(tiny_cfg, method="opd", steps=4, run_dir=str(tmp_path / "straight"))
    train(straight)
    split = _lora_cfg(tiny_cfg, method="opd", steps=4, run_dir=str(tmp_path / "split"))
    Run(split).fit(stop_after=2)
    train(_lora_cfg(tiny_cfg, method="opd", steps=4, run_dir=str(tmp_path / "split"), resume=True))
    a, b = (_adapter(tmp_path / d / "checkpoints/step_000004") for d in ("straight", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_adapter_and_merged(tiny_cfg, tmp_path):
    cfg = _lora_cfg(tiny_cfg, method="opd")
    train(cfg)
    assert main(["export", cfg.run_dir, str(tmp_path / "adapter")]) == 0
    assert lora.is_adapter(tmp_path / "adapter") and (tmp_path / "adapter/tokenizer.json").is_file()
    assert main(["export", cfg.run_dir, str(tmp_path / "merged"), "--merge"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()  # no PEFT needed to load it
    adapted = lora.load_adapter(AutoModelForCausalLM.from_pretrained(cfg.student), tmp_path / "adapter", trainable=False).eval()
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert main(["export", cfg.run_dir, str(tmp_path / "merged")]) == 2  # not empty: refused, nothing overwritten
