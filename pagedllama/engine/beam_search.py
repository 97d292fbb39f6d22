"""Beam search over shared blocks: beams fork from each other instead of copying their past.

Every step ranks all continuations (beam, next token) of a request's live beams by
cumulative log-probability and keeps the `beam_width` best. The score is the plain sum,
not length-normalised: live beams always have the same length, so normalising would not
change which survive; finished hypotheses of different lengths are ranked by the same sum
(which favours short ones when stop tokens end beams early). A continuation ending in a
stop token finishes as a hypothesis; the others live on, so at most `beam_width` beams are
live at once. A beam chosen k times is continued by itself and k - 1 forks that share all
its blocks (a partly filled last block is copied when first written); a beam chosen by none
is pruned and its blocks go back to the pool.
"""
from __future__ import annotations

import torch

from .scheduler import Scheduler
from .sequence import Sequence


def best_continuations(scores: torch.Tensor, logprobs: torch.Tensor, width: int) -> list[tuple[int, int, float]]:
    """The `width` best (beam, token, cumulative log-prob) of beams with `scores` (B,) and `logprobs` (B, V)."""
    total = (scores[:, None] + logprobs).flatten()
    top = total.topk(min(width, total.numel()))
    vocab = logprobs.shape[1]
    return [(i // vocab, i % vocab, score) for i, score in zip(top.indices.tolist(), top.values.tolist())]


def advance_beams(scheduler: Scheduler, beams: list[Sequence], logits: torch.Tensor) -> list[tuple[Sequence, int]]:
    """One step of one request's beams, given their logits (B, V): (sequence, next token) pairs.

    Unchosen beams are pruned before chosen ones fork, so a request never holds more than
    `beam_width` block-table rows.
    """
    scores = torch.tensor([b.cum_logprob for b in beams], device=logits.device)
    chosen = best_continuations(scores, logits.log_softmax(-1), beams[0].group.beam_width)
    parents = {i for i, _, _ in chosen}
    for i, beam in enumerate(beams):
        if i not in parents:
            scheduler.prune(beam)
    picks, continued = [], set()
    for i, token, score in chosen:
        beam = beams[i] if i not in continued else scheduler.fork(beams[i], beams[i].sample_key)
        continued.add(i)
        beam.cum_logprob = score
        picks.append((beam, token))
    return picks
