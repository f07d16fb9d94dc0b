"""Inference on the paged latent cache: batched generation, MTP speculative decoding."""

from .generate import Completion, GenerationStats, Generator, SamplingParams
from .kv_cache import CacheFullError, PagedKVCache

__all__ = ["Generator", "SamplingParams", "Completion", "GenerationStats", "PagedKVCache", "CacheFullError"]
