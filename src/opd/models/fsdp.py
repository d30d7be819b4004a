"""The student sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Layout: every decoder layer is its own group; the root is a small module around the
decoder call (:class:`_Trunk`), so the embeddings, the final norm and the LM head (tied or
not) form the root group. Every student pass goes through the root
(:func:`decoder_of`), which FSDP2 does not reshard after forward: the head that the
chunked losses use outside the forward is whole there, and its gradient is reduced with
the others at the end of backward.

Gradients are averaged over ranks (FSDP2's default; gloo has no pre-scaled sum), so the
loop divides each rank's loss by ``global tokens / world size`` (:mod:`opd.run.distributed`).

Rollouts, evaluation and teacher scoring run inside :func:`gathered`: every group
unsharded once and kept whole (no resharding after forward), so the direct decoder reads
plain weights and ranks may take different numbers of decode steps without a collective
in between. Outside a process group every function here is a no-op on a plain model.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

_ROOT = "_opd_fsdp_root"  # the model's FSDP root, kept out of its module tree


class _Trunk(nn.Module):
    """The FSDP root: holds the model, runs its decoder."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **kwargs):
        return self.model.get_decoder()(**kwargs)


def _layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"cannot shard {type(model).__name__}: its decoder has no `layers` list")
    return layers


def shard(model: nn.Module, mesh=None, mp_policy=None) -> nn.Module:
    """Shard ``model`` in place (each layer, then the root); returns it. Its parameters
    become ``DTensor`` shards: build the optimizer after this."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    for layer in _layers(model):
        fully_shard(layer, **kwargs)
    root = _Trunk(model)
    fully_shard(root, **kwargs)
    object.__setattr__(model, _ROOT, root)  # not a submodule: no cycle in the module tree
    return model


def root_of(model: nn.Module) -> nn.Module | None:
    """The FSDP root of a sharded model, else None."""
    return model.__dict__.get(_ROOT)


def is_sharded(model: nn.Module) -> bool:
    return root_of(model) is not None


def decoder_of(model: nn.Module):
    """What to call for the student's final hidden states: the FSDP root of a sharded model,
    else the model's decoder (same arguments, same output)."""
    return root_of(model) or model.get_decoder()


def _fsdp_modules(model: nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    root = root_of(model)
    return [] if root is None else [m for m in root.modules() if isinstance(m, FSDPModule)]


def reshard(model: nn.Module) -> None:
    """Every group back to its shards (frees the gathered weights; no-op when unsharded)."""
    for module in _fsdp_modules(model):
        module.reshard()


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Every group whole for the block, with no collective inside it (see the module doc);
    resharded at its end. A plain model: nothing happens."""
    modules = _fsdp_modules(model)
    if not modules:
        yield
        return
    for module in modules:
        module.set_reshard_after_forward(False, recurse=False)
        module.unshard()
    try:
        yield
    finally:
        for module in modules:
            module.reshard()
            module.set_reshard_after_forward(module is not root_of(model), recurse=False)


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm as a plain tensor (``clip_grad_norm_`` of shards returns a DTensor)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
