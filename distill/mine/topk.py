"""The running top-k per class: memory grows with classes x k, never with the pool.
"""
from __future__ import annotations

import math

import torch


NO_ID = torch.iinfo(torch.int64).max    # an empty top-k slot: sorts after every real image


class TopKPerClass:
    """For every class, the k best (score, id) pairs absorbed so far: score descending, then id ascending.

    The order is total and ids are unique, so absorbing candidates in any grouping (batch by batch, shard
    by shard, rank by rank) gives the same result as sorting everything at once. Memory: classes x k.
    """

    def __init__(self, num_classes: int, k: int, device="cpu"):
        self.k = k
        self.scores = torch.full((num_classes, k), -math.inf, device=device)
        self.ids = torch.full((num_classes, k), NO_ID, dtype=torch.int64, device=device)

    def add_batch(self, probs: torch.Tensor, ids: torch.Tensor, top1_only: bool = False) -> None:
        """probs (B, classes), ids (B,). top1_only: an image competes only for its highest class."""
        scores = probs.detach().float().to(self.scores.device).T.contiguous()
        ids = ids.to(self.ids.device).view(1, -1).expand_as(scores)
        if top1_only:
            other = torch.ones_like(scores, dtype=torch.bool)
            other[scores.argmax(0), torch.arange(scores.shape[1])] = False
            scores, ids = scores.masked_fill(other, -math.inf), ids.masked_fill(other, NO_ID)
        self.absorb(scores, ids)

    def absorb(self, scores: torch.Tensor, ids: torch.Tensor) -> None:
        """Candidates as (classes, M) score and id matrices (another TopKPerClass's tensors, for a merge)."""
        scores, ids = scores.to(self.scores.device), ids.to(self.ids.device)
        kth_score, kth_id = self.scores[:, -1:], self.ids[:, -1:]
        better = (scores > kth_score) | ((scores == kth_score) & (ids < kth_id))
        rows = better.any(1).nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        s = torch.cat([self.scores[rows], scores[rows]], 1)
        i = torch.cat([self.ids[rows], ids[rows]], 1)
        by_id = i.sort(dim=1, stable=True).indices            # ties: pool order ...
        s, i = s.gather(1, by_id), i.gather(1, by_id)
        best = s.sort(dim=1, descending=True, stable=True).indices[:, :self.k]  # ... under score descending
        self.scores[rows], self.ids[rows] = s.gather(1, best), i.gather(1, best)

    def state_dict(self) -> dict:
        return {"scores": self.scores.cpu().clone(), "ids": self.ids.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        self.scores = state["scores"].to(self.scores.device).clone()
        self.ids = state["ids"].to(self.ids.device).clone()

    def entries(self):
        """(class, id, score) for every filled slot, class by class, best first."""
        for c, (scores, ids) in enumerate(zip(self.scores.tolist(), self.ids.tolist())):
            for s, i in zip(scores, ids):
                if i != NO_ID:
                    yield c, i, s


