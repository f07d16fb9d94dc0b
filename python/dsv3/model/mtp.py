"""Multi-token prediction (report §2.2, eqs. 21-23): one extra block that predicts token i + 2 from the main
model's representation h_i of token i and the embedding of token i + 1:
h'_i = eh_proj([enorm(Emb(t_{i+1})); hnorm(h_i)]), then a transformer block, then its own norm + head.

h_i is the main model's last-layer output before the final norm. Stored as layer `num_hidden_layers` with
DeepSeek's checkpoint names (enorm, hnorm, eh_proj, shared_head.{norm, head}, embed_tokens)."""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .layers import RMSNorm


class SharedHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(h))


def make_mtp_layer(cfg: ModelConfig, block_cls: type[nn.Module], expert_ids=None) -> nn.Module:
    """An MTP layer: a `block_cls` block (attention + MoE, index num_hidden_layers) with the MTP parts."""

    class MTPLayer(block_cls):
        def __init__(self):
            super().__init__(cfg, cfg.num_hidden_layers, expert_ids)
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
            self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
            self.shared_head = SharedHead(cfg)

        def predict(self, h_prev, next_ids, cos, sin, cache=None) -> tuple[torch.Tensor, torch.Tensor]:
            """(hidden [b, s, H] of the block, logits [b, s, vocab]) for the token after each next_id."""
            e = self.enorm(self.embed_tokens(next_ids))
            x = self.eh_proj(torch.cat([e, self.hnorm(h_prev)], dim=-1))
            h = super().forward(x, cos, sin, cache)
            return h, self.shared_head(h)

    MTPLayer.__name__ = MTPLayer.__qualname__ = "MTPLayer"
    return MTPLayer()
