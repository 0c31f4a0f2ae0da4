"""How packed rows are fed to a causal LM: with document masking, attention stays inside each packed document.

A shard row holds several documents, each followed by EOS (sharding.tokenize.Packer). Fed as one sequence, every
token attends to the documents before it in the row, which nothing at inference resembles. With
`model.document_mask` the position ids restart at 0 after every EOS (the EOS ends its document), and the model's
forward pass is given those position ids and no attention mask: transformers then builds a block-diagonal causal
mask from where the positions restart (its packed-sequence path, for eager and sdpa attention) or, with
flash-attention 2, runs its variable-length kernel over the documents. RoPE positions restart with them. The
labels are unchanged: an EOS still predicts the next document's first token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


def document_positions(input_ids: Tensor, eos_id: int) -> Tensor:
    """(B, T) position ids counting from 0 at every row start and after every EOS."""
    index = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[:, 1:] = input_ids[:, :-1] == eos_id
    last_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - last_start


@dataclass(frozen=True)
class Feed:
    """The keyword arguments of a forward pass over packed rows: the same for the student, a live teacher, the
    teacher-logits cache and evaluation, so that all of them see the same attention."""

    eos_id: int  # the shards' end-of-document token (their manifest's eos_id)
    document_mask: bool  # keep attention inside each document (position ids restart after EOS)

    def __call__(self, input_ids: Tensor) -> dict[str, Any]:
        if not self.document_mask:
            return {"input_ids": input_ids}  # as before: one causal sequence per row
        # No cache: transformers looks for restarting positions only without one (a training forward pass).
        return {"input_ids": input_ids, "position_ids": document_positions(input_ids, self.eos_id),
                "use_cache": False}
