"""The one sequence layout every stage shares.

A batch of B sequences is stored as ``[left-padded prompt | right-padded completion]``:

    input_ids_BL = [pad .. pad p_1 .. p_m | y_1 .. y_n pad .. pad]
                    <-------- P -------->   <------- T -------->

so every completion starts at column ``P``. The logits that predict completion token
``t`` sit at column ``P - 1 + t``. ``completion_mask_BT`` marks real completion tokens
(it stops after EOS). Position ids are ``cumsum(attention_mask) - 1``, so left padding
does not shift positions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class SeqBatch:
    input_ids_BL: torch.Tensor  # long [B, P+T]
    attention_mask_BL: torch.Tensor  # long [B, P+T], 1 on real tokens
    prompt_len: int  # P
    completion_mask_BT: torch.Tensor  # bool [B, T]

    @property
    def completion_ids_BT(self) -> torch.Tensor:
        return self.input_ids_BL[:, self.prompt_len :]

    @property
    def position_ids_BL(self) -> torch.Tensor:
        return (self.attention_mask_BL.cumsum(-1) - 1).clamp(min=0)

    @property
    def num_tokens(self) -> int:
        return int(self.completion_mask_BT.sum())

    def prompts(self) -> list[list[int]]:
        """Each row's prompt ids without padding."""
        mask = self.attention_mask_BL[:, : self.prompt_len].bool()
        return [row[m].tolist() for row, m in zip(self.input_ids_BL[:, : self.prompt_len], mask)]

    def completions(self) -> list[list[int]]:
        """Each row's completion ids without padding."""
        return [row[m].tolist() for row, m in zip(self.completion_ids_BT, self.completion_mask_BT)]

    @property
    def device(self) -> torch.device:
        return self.input_ids_BL.device

    def to(self, device: torch.device | str) -> "SeqBatch":
        """The batch on ``device`` (itself when it is there already)."""
        if self.input_ids_BL.device == torch.device(device):
            return self
        return replace(
            self,
            input_ids_BL=self.input_ids_BL.to(device),
            attention_mask_BL=self.attention_mask_BL.to(device),
            completion_mask_BT=self.completion_mask_BT.to(device),
        )

    def select(self, rows: torch.Tensor | list[int]) -> "SeqBatch":
        return replace(
            self,
            input_ids_BL=self.input_ids_BL[rows],
            attention_mask_BL=self.attention_mask_BL[rows],
            completion_mask_BT=self.completion_mask_BT[rows],
        )


def make_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int, *, width: int = 1) -> SeqBatch:
    """Build a :class:`SeqBatch` from ragged prompt and completion id lists; the completion
    block is at least ``width`` columns wide (to align with another batch's columns)."""
    P = max(len(p) for p in prompts)
    T = max(width, max(len(c) for c in completions))
    B = len(prompts)
    ids = torch.full((B, P + T), pad_id, dtype=torch.long, device="cpu")  # built on the host, moved once
    attn = torch.zeros((B, P + T), dtype=torch.long, device="cpu")
    cmask = torch.zeros((B, T), dtype=torch.bool, device="cpu")
    for b, (p, c) in enumerate(zip(prompts, completions)):
        ids[b, P - len(p) : P] = torch.tensor(p, dtype=torch.long, device="cpu")
        attn[b, P - len(p) : P] = 1
        if c:
            ids[b, P : P + len(c)] = torch.tensor(c, dtype=torch.long, device="cpu")
            attn[b, P : P + len(c)] = 1
            cmask[b, : len(c)] = True
    return SeqBatch(ids, attn, P, cmask)
