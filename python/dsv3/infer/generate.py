"""Batched generation over the paged latent cache: prefill each request, then decode every active request
together, one token per step, or two with MTP speculative decoding (the MTP layer drafts the token after
next; the main model verifies both in one causal s_q = 2 `mla_decode` step; report §2.2 / speculative
sampling). Sampling: greedy, temperature, top-p, per-call seed; stop tokens; max new tokens."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import torch

from ..model.model import DeepseekV3
from .kv_cache import PAGE, PagedKVCache


@dataclasses.dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop_token_ids: Sequence[int] = ()
    seed: int | None = None

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams: max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams: temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams: top_p must be in (0, 1], got {self.top_p}")


@dataclasses.dataclass
class Completion:
    prompt: list[int]
    tokens: list[int]  # generated, without a final stop token
    finish_reason: str  # "stop" | "length"


@dataclasses.dataclass
class GenerationStats:
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    steps: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The sampling distribution over the vocabulary: softmax(logits / T), restricted to the top-p nucleus
    (the smallest set of most likely tokens whose mass reaches top_p) and renormalised. T = 0: one-hot
    argmax."""
    logits = logits.float()
    if params.temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
        outside = (
            sorted_p.cumsum(-1) - sorted_p >= params.top_p
        )  # mass before the token already reaches top_p
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def draw(probs: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def next_tokens(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> list[int]:
    """One token per row of logits [n, vocab]: the argmax when greedy, else a draw from `probabilities`."""
    if params.temperature == 0:
        return logits.argmax(-1).tolist()
    return draw(probabilities(logits, params), gen).tolist()


class Generator:
    """Generation with a DeepseekV3 model and its own paged cache of `num_pages` pages per layer."""

    def __init__(
        self,
        model: DeepseekV3,
        num_pages: int = 256,
        cache_dtype: torch.dtype | None = None,
        fp8_cache: bool = False,
    ):
        self.model = model.eval()
        self.cfg = model.config
        device = next(model.parameters()).device
        dtype = cache_dtype or model.model.embed_tokens.weight.dtype
        self.cache = PagedKVCache(self.cfg, num_pages, dtype=dtype, device=device, fp8=fp8_cache)
        self.device = device
        self.stats = GenerationStats()

    # ---- one forward step over the cache ----------------------------------------------------------------

    def _main(self, rids, starts, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Main model on tokens [b, s] at positions starts[i] + j -> (hidden [b, s, H], logits [b, s, V])."""
        b, s = tokens.shape
        for rid, start in zip(rids, starts, strict=True):
            self.cache.reserve(rid, start + s)
        state = self.cache.step(rids, starts, s, self.cfg.num_attention_heads)
        positions = torch.tensor(starts, device=self.device).unsqueeze(1) + torch.arange(
            s, device=self.device
        )
        h = self.model.hidden(tokens, positions, state)
        return h, self.model.logits(h)

    def _mtp(self, rids, starts, h: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """MTP at positions starts[i] + j (h: the main hidden there, next_ids: the tokens after) -> logits."""
        b, s = next_ids.shape
        state = self.cache.step(rids, starts, s, self.cfg.num_attention_heads)
        positions = torch.tensor(starts, device=self.device).unsqueeze(1) + torch.arange(
            s, device=self.device
        )
        return self.model.mtp_logits(h, next_ids, positions, state)[1]

    # ---- generation ---------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | None = None,
        speculative: bool = False,
        on_token: Callable[[int, int], None] | None = None,
    ) -> list[Completion]:
        """Completes every prompt (lists of token ids); `on_token(request index, token)` streams tokens."""
        params = params or SamplingParams()
        params.validate()
        self.stats = GenerationStats()  # per call
        if speculative and self.model.mtp is None:
            raise ValueError("generate: speculative decoding needs the model's MTP layer")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"generate: prompt {i} is empty")
            bad = [t for t in p if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise ValueError(
                    f"generate: prompt {i} has token ids outside [0, {self.cfg.vocab_size}): {bad[:5]}"
                )
        gen = torch.Generator(device="cpu").manual_seed(params.seed) if params.seed is not None else None
        stop = set(params.stop_token_ids)
        outs = [Completion(list(p), [], "length") for p in prompts]
        done = [False] * len(prompts)
        rids = list(range(len(prompts)))
        for rid in rids:
            self.cache.add_request(rid)
        try:
            return self._run(prompts, params, speculative, on_token, gen, stop, outs, done)
        finally:
            for rid in rids:
                self.cache.free(rid)

    def _emit(self, i, token, outs, done, stop, params, on_token) -> None:
        if done[i]:
            return
        if token in stop:
            outs[i].finish_reason, done[i] = "stop", True
            return
        outs[i].tokens.append(token)
        if on_token:
            on_token(i, token)
        if len(outs[i].tokens) >= params.max_new_tokens:
            done[i] = True

    def _run(self, prompts, params, speculative, on_token, gen, stop, outs, done):
        n = len(prompts)
        length = [0] * n  # tokens in the main layers' cache
        nxt = [0] * n  # the sampled token at position length[i], not yet run through the model
        draft = [0] * n  # MTP's draft for position length[i] + 1
        draft_q: list[torch.Tensor | None] = [None] * n  # its distribution (sampling mode)
        t0 = time.perf_counter()
        for i, p in enumerate(prompts):  # prefill, one request at a time (ragged lengths)
            ids = torch.tensor([list(p)], device=self.device)
            h, logits = self._main([i], [0], ids)
            length[i] = len(p)
            nxt[i] = next_tokens(logits[:, -1], params, gen)[0]
            if speculative:  # MTP entries 0 .. len-1: (h_j, t_{j+1}); the last one drafts position len + 1
                nexts = torch.cat([ids[:, 1:], torch.tensor([[nxt[i]]], device=self.device)], dim=1)
                q = probabilities(self._mtp([i], [0], h, nexts)[:, -1], params)[0]
                draft[i], draft_q[i] = int(draw(q.unsqueeze(0), gen)), q
            self._emit(i, nxt[i], outs, done, stop, params, on_token)
        self.stats.prefill_tokens += sum(len(p) for p in prompts)
        self.stats.prefill_s += time.perf_counter() - t0

        t0 = time.perf_counter()
        while not all(done):
            active = [i for i in range(n) if not done[i]]
            self.stats.steps += 1
            if not speculative:
                _, logits = self._main(
                    active, [length[i] for i in active], torch.tensor([[nxt[i]] for i in active])
                )
                sampled = next_tokens(logits[:, -1], params, gen)
                for row, i in enumerate(active):
                    length[i] += 1
                    nxt[i] = sampled[row]
                    self._emit(i, nxt[i], outs, done, stop, params, on_token)
                    self.stats.decode_tokens += 1
                continue
            starts = [length[i] for i in active]
            tokens = torch.tensor([[nxt[i], draft[i]] for i in active])
            h, logits = self._main(active, starts, tokens)  # verify: positions L (nxt) and L + 1 (draft)
            mtp_next = []
            for row, i in enumerate(active):
                p0 = probabilities(logits[row, 0:1], params)[0]
                self.stats.drafted += 1
                if self._accept(draft[i], p0, draft_q[i], params, gen):
                    self.stats.accepted += 1
                    accepted = draft[i]
                    nxt[i] = int(draw(probabilities(logits[row, 1:2], params), gen))
                    length[i] += 2
                    self._emit(i, accepted, outs, done, stop, params, on_token)
                    self._emit(i, nxt[i], outs, done, stop, params, on_token)
                    self.stats.decode_tokens += 2
                    mtp_next.append([accepted, nxt[i]])
                else:
                    nxt[i] = int(draw(self._residual(p0, draft_q[i], params), gen))
                    length[i] += 1
                    self._emit(i, nxt[i], outs, done, stop, params, on_token)
                    self.stats.decode_tokens += 1
                    mtp_next.append([nxt[i], nxt[i]])  # the second row is padding, overwritten next step
            # MTP at positions L, L + 1: the entry after the last accepted token drafts the next position.
            mtp_logits = self._mtp(active, starts, h, torch.tensor(mtp_next))
            for row, i in enumerate(active):
                col = 1 if length[i] == starts[row] + 2 else 0
                q = probabilities(mtp_logits[row, col : col + 1], params)[0]
                draft[i], draft_q[i] = int(draw(q.unsqueeze(0), gen)), q
        self.stats.decode_s += time.perf_counter() - t0
        return outs

    @staticmethod
    def _accept(d: int, p: torch.Tensor, q: torch.Tensor, params: SamplingParams, gen) -> bool:
        """Speculative sampling: keep the draft with probability min(1, p(d) / q(d)) (greedy: iff it is p's
        argmax), so accepted-or-resampled tokens follow p exactly."""
        if params.temperature == 0:
            return int(p.argmax()) == d
        ratio = float(p[d] / q[d]) if q[d] > 0 else 0.0
        return float(torch.rand((), generator=gen)) < min(1.0, ratio)

    @staticmethod
    def _residual(p: torch.Tensor, q: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        """After a rejection: sample from normalise(max(p - q, 0)) (greedy: p's argmax)."""
        if params.temperature == 0:
            return p.unsqueeze(0)
        r = (p - q).clamp(min=0)
        return (r / r.sum() if r.sum() > 0 else p).unsqueeze(0)


__all__ = ["Generator", "SamplingParams", "Completion", "GenerationStats", "probabilities", "PAGE"]
