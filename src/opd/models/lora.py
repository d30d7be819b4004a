"""LoRA adapters on the student through PEFT.

With ``lora_r > 0`` the student is wrapped by ``peft.get_peft_model`` with a ``LoraConfig``
(rank ``lora_r``, scale ``lora_alpha / lora_r``, ``lora_dropout``, ``lora_target_modules``:
``all-linear`` or comma-separated module names); the base weights are frozen, so the
optimizer holds the adapters only and a checkpoint is the adapter (``adapter_model.safetensors``
+ ``adapter_config.json``, PEFT's own format). A run resumes by loading the base student
again and the adapter on top (:func:`load_adapter`); ``opd export`` writes the adapter, or
with ``--merge`` the merged full model. The sampler's direct decoder reads plain linear
layers only, so an adapted student samples through the Hugging Face decoder.
"""

from __future__ import annotations

from pathlib import Path

import torch

from opd.errors import UserError

ADAPTER_CONFIG = "adapter_config.json"


def target_modules(spec: str) -> str | list[str]:
    """``all-linear`` as PEFT spells it, else the comma-separated module names."""
    spec = spec.strip()
    return "all-linear" if spec == "all-linear" else [name.strip() for name in spec.split(",") if name.strip()]


def _peft():
    try:
        import peft
    except ImportError:
        raise UserError("lora_r > 0 needs PEFT: pip install 'opd[lora]' (or pip install peft), or set lora_r=0") from None
    return peft


def add_lora(model, *, r: int, alpha: float, dropout: float, targets: str, seed: int):
    """``model`` with trainable LoRA adapters and frozen base weights (a ``PeftModel``); the
    adapters' random initialization comes from ``seed`` (the global random state is left as
    it was), so a run and its rerun start from the same adapters."""
    LoraConfig, get_peft_model = _peft().LoraConfig, _peft().get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules(targets),
                        task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def load_adapter(base, path: str | Path, *, trainable: bool = True):
    """The base model with the adapter saved at ``path`` (trainable for a resumed run)."""
    return _peft().PeftModel.from_pretrained(base, str(path), is_trainable=trainable)


def is_lora(model) -> bool:
    return hasattr(model, "peft_config")


def merged(model):
    """A plain model with the adapters folded into its weights (``merge_and_unload``)."""
    return model.merge_and_unload() if is_lora(model) else model


def dropout_modules(model) -> list[torch.nn.Module]:
    """The adapters' dropout layers (active in the update only, as the student stays in eval mode)."""
    return [m for name, m in model.named_modules() if ".lora_dropout." in f".{name}." and isinstance(m, torch.nn.Dropout)]
