"""Output layers shared by every language model: a full softmax or an adaptive softmax.

The adaptive softmax (Grave et al., 2017) gives frequent words a small full softmax and routes rare
words through low-rank clusters; it is an exact distribution over the whole vocabulary, so its
perplexity is comparable with a full softmax, at a fraction of the cost for 10k+ word vocabularies.
It assumes ids are sorted by frequency, which the word tokenizer guarantees.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class OutputHead(nn.Module):
    """Maps features (..., C) to next-token scores and computes the token loss."""

    def __init__(
        self,
        in_features: int,
        vocab_size: int,
        *,
        adaptive_cutoffs: list[int] | None = None,
        div_value: float = 4.0,
        bias: bool = True,
        reserved: int = 0,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.reserved = reserved  # ids 0 .. reserved-1 are never predicted: their logit is the lowest value
        self.in_features = in_features  # the width of the hidden state it reads
        self.adaptive = bool(adaptive_cutoffs)
        if self.adaptive:
            cutoffs = sorted(adaptive_cutoffs or [])
            if cutoffs[-1] >= vocab_size or cutoffs[0] <= 0:
                raise ValueError(
                    f"adaptive_cutoffs {cutoffs} must lie strictly between 0 and the vocabulary size "
                    f"{vocab_size}; use softmax: full for small vocabularies"
                )
            self.adaptive_softmax = nn.AdaptiveLogSoftmaxWithLoss(
                in_features, vocab_size, cutoffs, div_value=div_value, head_bias=bias
            )
        else:
            self.proj = nn.Linear(in_features, vocab_size, bias=bias)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Unnormalised scores (log-probabilities for the adaptive softmax), shape (..., V)."""
        if not self.adaptive:
            return self._project(h)
        flat = h.reshape(-1, h.shape[-1]).float()
        return self.adaptive_softmax.log_prob(flat).view(*h.shape[:-1], self.vocab_size)

    def _project(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.proj(h)  # (..., V)
        if self.reserved:  # in place: a linear layer's backward does not read its output
            logits[..., : self.reserved] = torch.finfo(logits.dtype).min
        return logits

    def loss(
        self,
        h: torch.Tensor,
        targets: torch.Tensor,
        *,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
    ) -> torch.Tensor:
        """Mean negative log-likelihood of `targets` (…,) given features `h` (…, C)."""
        flat_h, flat_t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        if not self.adaptive:
            logits = self._project(flat_h).float()
            return F.cross_entropy(logits, flat_t, ignore_index=ignore_index, label_smoothing=label_smoothing)
        if label_smoothing:
            raise ValueError(
                "label smoothing needs softmax: full (an adaptive softmax scores only the target)"
            )
        keep = flat_t != ignore_index
        if not bool(keep.all()):
            flat_h, flat_t = flat_h[keep], flat_t[keep]
        return self.adaptive_softmax(flat_h.float(), flat_t).loss

    def sequence_logprobs(self, h: torch.Tensor, targets: torch.Tensor, *, ignore_index: int) -> torch.Tensor:
        """Each row's summed log p(target) over the positions whose target is not `ignore_index`: (B,), fp32.

        Only those positions go through the output layer: a DPO pair's prompt and padding never do, which
        saves most of the vocabulary projection and its (positions, V) scores.
        """
        keep = targets != ignore_index  # (B, T)
        rows = keep.nonzero()[:, 0]  # (N,) the row of each kept position
        chosen, wanted = h[keep], targets[keep]  # (N, C), (N,)
        if self.adaptive:
            scores = self.adaptive_softmax.log_prob(chosen.float())  # (N, V) log-probabilities
            picked = scores.gather(-1, wanted[:, None])[:, 0]
        else:
            picked = -F.cross_entropy(self._project(chosen).float(), wanted, reduction="none")  # (N,)
        return picked.new_zeros(targets.shape[0]).index_add(0, rows, picked)  # (B,)

    def flops_per_token(self, targets: torch.Tensor | None = None) -> float:
        """Matmul FLOPs per token: the projection, or an adaptive softmax's head plus each tail cluster
        for the share of `targets` that reaches it (none without targets)."""
        if not self.adaptive:
            return 2.0 * self.proj.in_features * self.proj.out_features
        softmax = self.adaptive_softmax
        total = 2.0 * softmax.head.in_features * softmax.head.out_features
        flat = targets.reshape(-1) if targets is not None else None
        for index, cluster in enumerate(softmax.tail):
            low, high = softmax.cutoffs[index], softmax.cutoffs[index + 1]
            share = float(((flat >= low) & (flat < high)).float().mean()) if flat is not None else 0.0
            total += share * sum(
                2 * m.in_features * m.out_features for m in cluster.modules() if isinstance(m, nn.Linear)
            )
        return total

    def tie_to(self, embedding: nn.Embedding) -> None:
        """Share the output projection with the input embedding (Press & Wolf, 2017)."""
        if self.adaptive:
            raise ValueError(
                "tie_weights needs softmax: full (an adaptive softmax has no single matrix to tie)"
            )
        self.proj.weight = embedding.weight
