"""The paged latent KV cache of decoding: per layer (main layers + the MTP layer) one tensor of 64-token
pages holding c_KV (kv_lora_rank) and the rotated k^R (qk_rope_head_dim) per token, in the model's dtype or
the packed FP8 layout (dsv3.ops.quantize_mla_kv_fp8); a pool of free pages; per request a page list."""

from __future__ import annotations

import dataclasses

import torch

from .. import ops
from ..model.config import ModelConfig

PAGE = 64


class CacheFullError(RuntimeError):
    """No free page is left for a request's next tokens."""


@dataclasses.dataclass
class StepState:
    """dsv3.model.mla.DecodeState for one forward step of a batch of requests over layers `layers`."""

    block_table: torch.Tensor
    seqlens: torch.Tensor
    slots: torch.Tensor
    schedule: tuple[torch.Tensor, torch.Tensor]
    caches: list[torch.Tensor]

    def layer_cache(self, layer: int) -> torch.Tensor:
        return self.caches[layer]


class PagedKVCache:
    def __init__(
        self,
        cfg: ModelConfig,
        num_pages: int,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        fp8: bool = False,
    ):
        if num_pages < 1:
            raise ValueError(f"PagedKVCache: num_pages must be positive, got {num_pages}")
        self.cfg, self.num_pages, self.device, self.fp8 = cfg, num_pages, torch.device(device), fp8
        self.width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
        if fp8:
            shape = (num_pages, PAGE, 1, ops.mla_fp8_token_bytes(self.width, cfg.kv_lora_rank))
            self.layers = [torch.zeros(shape, dtype=torch.uint8, device=device) for _ in range(layers)]
        else:
            shape = (num_pages, PAGE, 1, self.width)
            self.layers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.free_pages: list[int] = list(range(num_pages - 1, -1, -1))  # pop() hands out page 0 first
        self.pages: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}  # tokens stored (the main layers' length)

    @property
    def bytes_per_token_per_layer(self) -> int:
        return self.layers[0][0, 0].numel() * self.layers[0].element_size()

    def num_free_tokens(self) -> int:
        return len(self.free_pages) * PAGE

    def add_request(self, rid: int) -> None:
        if rid in self.pages:
            raise ValueError(f"PagedKVCache: request {rid} already has a cache")
        self.pages[rid], self.lengths[rid] = [], 0

    def free(self, rid: int) -> None:
        """Returns a request's pages to the pool."""
        if rid not in self.pages:
            raise ValueError(f"PagedKVCache: unknown request {rid}")
        self.free_pages.extend(reversed(self.pages.pop(rid)))
        del self.lengths[rid]

    def reserve(self, rid: int, num_tokens: int) -> None:
        """Makes room for `num_tokens` tokens in total for request rid (allocating pages as needed)."""
        pages = self.pages[rid]
        need = ops.ceil_div(num_tokens, PAGE) - len(pages)
        if need > len(self.free_pages):
            raise CacheFullError(
                f"PagedKVCache: request {rid} needs {need} more pages of {PAGE} tokens for {num_tokens} "
                f"tokens, {len(self.free_pages)} free of {self.num_pages}; free finished requests or "
                "allocate more pages"
            )
        for _ in range(max(need, 0)):
            pages.append(self.free_pages.pop())

    def step(self, rids: list[int], starts: list[int], num_new: int, h_q: int) -> StepState:
        """The state for writing `num_new` tokens per request at positions starts[i] .. + num_new - 1 (pages
        must be reserved) and attending over positions 0 .. starts[i] + num_new - 1."""
        lens = [s + num_new for s in starts]
        max_pages = max(ops.ceil_div(n, PAGE) for n in lens)
        table = torch.zeros(len(rids), max(max_pages, 1), dtype=torch.int32)
        slots = torch.empty(len(rids), num_new, dtype=torch.long)
        for i, rid in enumerate(rids):
            pages = self.pages[rid]
            if ops.ceil_div(lens[i], PAGE) > len(pages):
                raise ValueError(
                    f"PagedKVCache.step: request {rid} has no pages reserved for {lens[i]} tokens"
                )
            table[i, : len(pages[:max_pages])] = torch.tensor(pages[:max_pages], dtype=torch.int32)
            pos = torch.arange(starts[i], lens[i])
            slots[i] = table[i, pos // PAGE].long() * PAGE + pos % PAGE
        seqlens = torch.tensor(lens, dtype=torch.int32, device=self.device)
        table = table.to(self.device)
        schedule = ops.get_mla_decode_metadata(seqlens, num_new * h_q, 1)
        return StepState(table, seqlens, slots.flatten().to(self.device), schedule, self.layers)
