"""Teacher-forced token log-probs of outputs given prompts, straight from token ids.

Prompts are left-padded and outputs right-padded so every output starts at the same column;
only the output columns' logits are materialised (``logits_to_keep``), which keeps memory at
B x T x V instead of B x L x V. Padding is explicit (attention mask), never inferred from ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class TokenBatch:
    input_ids: torch.Tensor
    """[B, L] prompt (left-padded) then output (right-padded)."""
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    """[B, T] output ids, right-padded with 0."""
    target_mask: torch.Tensor
    """[B, T] 1 on real output tokens."""

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(*(t.to(device) for t in vars(self).values()))


def collate(prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]], pad_id: int) -> TokenBatch:
    if len(prompts) != len(outputs) or not prompts:
        raise ValueError("need one output per prompt and at least one pair")
    p_len = max(len(p) for p in prompts)
    t_len = max(max(len(o) for o in outputs), 1)
    batch = len(prompts)
    input_ids = torch.full((batch, p_len + t_len), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, p_len + t_len), dtype=torch.long)
    targets = torch.zeros((batch, t_len), dtype=torch.long)
    target_mask = torch.zeros((batch, t_len), dtype=torch.long)
    for i, (p, o) in enumerate(zip(prompts, outputs, strict=True)):
        if not p:
            raise ValueError("a prompt needs at least one token (e.g. BOS) to condition on")
        input_ids[i, p_len - len(p) : p_len] = torch.tensor(list(p), dtype=torch.long)
        attention[i, p_len - len(p) : p_len + len(o)] = 1
        if o:
            out = torch.tensor(list(o), dtype=torch.long)
            input_ids[i, p_len : p_len + len(o)] = out
            targets[i, : len(o)] = out
            target_mask[i, : len(o)] = 1
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    return TokenBatch(input_ids, attention, position_ids, targets, target_mask)


def token_logprobs(
    model: torch.nn.Module,
    batch: TokenBatch,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [B, T] of ``batch.targets`` (0 where masked), and optionally the entropy [B, T].

    The batch runs on the model's device; the results come back on the CPU (gradients flow through
    the copy when the caller has them enabled), so the losses never care where the model lives.
    """
    home = batch.targets.device
    batch = batch.to(next(model.parameters()).device)
    t_len = batch.targets.shape[1]
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=t_len + 1,
        use_cache=False,
    )
    logits = out.logits[:, :-1, :].float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1) * batch.target_mask
    entropy = None
    if with_entropy:
        entropy = (-(logp_all.exp() * logp_all).sum(-1) * batch.target_mask).to(home)
    return logp.to(home), entropy
