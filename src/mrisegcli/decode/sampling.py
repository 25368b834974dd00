"""Token sampling as small pure functions: logits -> probabilities -> indices.

Temperature 0 means greedy (argmax). Sampling draws with the exponential-race trick
(argmax of p / E, E ~ Exp(1)), which equals a categorical draw and needs no host sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def logits_to_probs(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None
) -> torch.Tensor:
    """(..., K) logits -> (..., K) probabilities after temperature and optional top-k cut."""
    if temperature <= 0:
        raise ValueError("logits_to_probs needs temperature > 0 (use sample() for greedy)")
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k <= 0:
            raise ValueError(f"top_k must be positive, got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.softmax(logits, dim=-1)


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(..., K) logits -> (...) int64 indices; greedy when ``temperature == 0``."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = logits_to_probs(logits, temperature, top_k)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(dim=-1)


@dataclass(frozen=True)
class Sampler:
    """How the decoders draw tokens: temperature (0 = greedy), optional top-k, random generator.

    The decoders' ``temperature=``, ``top_k=`` and ``generator=`` options end up here, so the
    cached decoders and their uncached references draw with one piece of code.
    """

    temperature: float = 0.0
    top_k: int | None = None
    generator: torch.Generator | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., K) logits -> (...) int64 indices."""
        return sample(logits, self.temperature, self.top_k, self.generator)
