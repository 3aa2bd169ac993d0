"""Per-request sampling: greedy, temperature, top-k, top-p, seeds, log-probabilities."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .request import Request


@dataclass(frozen=True)
class TokenLogprobs:
    logprob: float  # of the sampled token
    top: tuple[tuple[int, float], ...]  # the `logprobs` most likely tokens, best first


class Sampler:
    def __init__(self) -> None:
        # Seeded requests draw from their own generator, so their output does not depend on
        # what else shares the batch; it lives as long as the request.
        self._generators: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    @torch.inference_mode()
    def __call__(
        self, logits: torch.Tensor, requests: list[Request]  # logits [N, vocab] fp32
    ) -> tuple[list[int], list[TokenLogprobs | None]]:
        tokens = logits.argmax(dim=-1).tolist()
        for i, req in enumerate(requests):
            if not req.params.greedy:
                tokens[i] = self._sample(logits[i], req)
        logprobs: list[TokenLogprobs | None] = [None] * len(requests)
        for i, req in enumerate(requests):
            k = req.params.logprobs
            if k is not None:
                # Log-probabilities of the model's distribution, before temperature and cuts
                # (vLLM's default and OpenAI's meaning).
                lp = torch.log_softmax(logits[i], dim=-1)
                top = torch.topk(lp, k) if k else None
                logprobs[i] = TokenLogprobs(
                    lp[tokens[i]].item(),
                    tuple(zip(top.indices.tolist(), top.values.tolist())) if top else ())
        return tokens, logprobs

    def _sample(self, logits: torch.Tensor, req: Request) -> int:  # logits [vocab]
        p = req.params
        logits = logits / p.temperature
        if p.top_k > 0 and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, idx = probs.sort(descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
            drop[0] = False  # also when top_p rounds to 0 in the logits' dtype
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_probs)
        generator = None
        if p.seed is not None:
            generator = self._generators.get(req.request_id)
            if generator is None:
                generator = torch.Generator(device=probs.device).manual_seed(p.seed)
                self._generators[req.request_id] = generator
        return int(torch.multinomial(probs, 1, generator=generator).item())
