import os

import pytest
import torch

torch.set_num_threads(1)  # the tiny test models gain nothing from threads; a shared machine makes them costly


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tests never touch the user's model cache."""
    os.environ["OPD_CACHE"] = str(tmp_path_factory.mktemp("opd_cache"))


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory):
    """A randomly initialized testbed-shaped student, saved like a real model."""
    from opd.testbed.builder import save_initial

    arch = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    return str(save_initial(tmp_path_factory.mktemp("student"), arch, seed=0))


@pytest.fixture
def tiny_cfg(tiny_student_dir, tmp_path):
    """A two-step testbed run with small batches."""
    from opd.config.train import TrainConfig

    def make(**changes):
        base = dict(
            student=tiny_student_dir, teacher="oracle", steps=2, prompts_per_step=4, group_size=2,
            micro_batch_size=3, max_new_tokens=40, eval_every=0, eval_size=8, eval_k=2,
            run_dir=str(tmp_path / "run"), progress=False, lr=1e-3,
        )
        base.update(changes)
        return TrainConfig(**base)

    return make


@pytest.fixture(params=["eager", "closed_form"])
def loss_kernel(request, monkeypatch):
    """Runs a lean-loss test under each chunk kernel: the eager in-place passes, and the pure
    closed form that ``kernel="compiled"`` hands to ``torch.compile`` (called uncompiled here,
    for speed; tests/test_fused_chunk.py compiles it)."""
    import opd.losses.chunked as chunked
    from opd.losses.fused_chunk import closed_form

    if request.param == "closed_form":
        monkeypatch.setenv("OPD_LOSS_KERNEL", "compiled")
        monkeypatch.setattr(chunked, "compiled_closed_form", closed_form)
    else:
        monkeypatch.setenv("OPD_LOSS_KERNEL", "eager")
    return request.param
