"""The generation loop: schedule a step, run the model on it, sample, retire finished requests."""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .beam_search import advance_beams
from ..model.cuda_graphs import DecodeGraphs
from ..errors import OutOfKVMemory
from .block_manager import KVCache
from ..model.model import Transformer
from ..app.report import GB, MemoryTracker
from .sampling import SamplingParams, sample, sample_key
from .scheduler import MAX_PREFILL_TOKENS, Scheduler
from .sequence import Sequence, SequenceGroup
from .sharing import SharingTracker
from .swap import SwapSpace

PREEMPTION_MODES = ("recompute", "swap")


@dataclass(frozen=True)
class Request:
    """A tokenized prompt, how far to generate it, and how many sequences to run for it."""

    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    n: int = 1  # parallel samples, sharing the prompt's blocks
    beam_width: int = 1  # above 1: beam search with that many beams instead of sampling
    # Sample j draws from random stream sample_index + j, so a request with n=1 and
    # sample_index=j reproduces sample j of a request with n > j on its own.
    sample_index: int = 0

    def __post_init__(self):
        if min(self.n, self.beam_width) < 1 or min(self.n, self.beam_width) > 1:
            raise ValueError(f"request {self.request_id}: n ({self.n}) and beam_width ({self.beam_width}) must be "
                             "at least 1, and not both above 1")

    @property
    def width(self) -> int:
        return max(self.n, self.beam_width)


@dataclass
class RunResult:
    sequences: list[Sequence]
    steps: int
    interrupted: bool


class Engine:
    """Runs requests through scheduler, cache and model.

    With `model=None` it is a dry run: the same scheduler and allocator, each request
    generating exactly `max_new_tokens` placeholder tokens, no forward pass. That is how
    capacity is planned for models and GPUs that are not here (see capacity.py).
    """

    def __init__(self, model: Transformer | None, cache: KVCache, sampling: SamplingParams,
                 stop_ids: frozenset[int], ignore_eos: bool = False, max_prefill_tokens: int = MAX_PREFILL_TOKENS,
                 preemption: str = "recompute", swap_space_bytes: int = 4 * GB, prefix_caching: bool = False,
                 cuda_graphs: bool = False):
        """`preemption`: "recompute" or "swap" (to a CPU pool of `swap_space_bytes`). `cuda_graphs`:
        decode steps replay captured graphs (triton backend; on a CPU the same static-buffer forward
        runs eagerly, which is how the tests check it)."""
        if preemption not in PREEMPTION_MODES:
            raise ValueError(f"preemption must be one of {PREEMPTION_MODES}, not {preemption!r}")
        self.model = model
        self.cache = cache
        self.decode = model
        if cuda_graphs and model is not None:
            self.decode = DecodeGraphs(model, cache, cache.max_num_seqs, capture=cache.device.type == "cuda")
        self.sampling = sampling
        self.stop_ids = frozenset() if ignore_eos else stop_ids
        if prefix_caching:
            cache.enable_prefix_caching()
        swap = SwapSpace(cache, swap_space_bytes) if preemption == "swap" else None
        self.scheduler = Scheduler(cache, max_prefill_tokens, swap=swap)
        self.memory = MemoryTracker(cache)
        self.sharing = SharingTracker()
        self.max_width = 1  # the most sequences a request runs (samples or beams)

    def run(self, requests: list[Request], progress: bool = True,
            on_finish: Callable[[Sequence], None] | None = None) -> RunResult:
        """Generate every request to completion (or until Ctrl-C, which stops within a step).

        The result lists each request's output sequences in request order: its samples in
        order, or its best beams first.
        """
        groups = self.add(requests)
        bar = tqdm(total=sum(r.max_new_tokens * r.width for r in requests), unit="tok", disable=not progress,
                   file=sys.stderr, dynamic_ncols=True, desc="generating",
                   mininterval=0.1 if sys.stderr.isatty() else 5.0)
        steps, interrupted = 0, False
        try:
            while not self.scheduler.done:
                num_scheduled, finished = self.step()
                steps += 1
                bar.update(num_scheduled)
                bar.set_postfix(step=steps, running=len(self.scheduler.running),
                                waiting=len(self.scheduler.waiting), refresh=False)
                if on_finish:
                    for seq in finished:
                        on_finish(seq)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            bar.close()
        return RunResult([s for g in groups for s in g.outputs()], steps, interrupted)

    def add(self, requests: list[Request]) -> list[SequenceGroup]:
        """Queue `requests` for `step` (which `run` calls until all are done); each request's
        group collects its output sequences (`SequenceGroup.outputs`)."""
        rows = sum(r.width for r in requests)
        if rows > self.cache.max_num_seqs:
            raise ValueError(f"the requests run {rows} sequences but the cache has block-table rows for "
                             f"{self.cache.max_num_seqs}; size it for sharing.one_per_sequence(requests)")
        self.max_width = max([self.max_width] + [r.width for r in requests])
        groups = []
        for r in requests:
            seq = Sequence(seq_id=next(self.scheduler.seq_ids), request_id=r.request_id, token_ids=list(r.prompt_ids),
                           num_prompt_tokens=len(r.prompt_ids), max_new_tokens=r.max_new_tokens,
                           sample_key=sample_key(r.request_id, r.sample_index))
            seq.group = SequenceGroup(r.request_id, [seq], r.n, r.beam_width, r.sample_index)
            self.scheduler.add(seq.group)
            groups.append(seq.group)
        return groups

    def step(self) -> tuple[int, list[Sequence]]:
        """One forward pass: how many sequences it advanced, and the outputs it completed."""
        try:
            batch, is_prefill = self.scheduler.schedule()
        except MemoryError as e:
            raise OutOfKVMemory(f"{e}; raise --kv-cache-gb or lower --max-seq-len") from None
        if self.model is None:
            self.cache.commit(batch, is_prefill)
            # Placeholder tokens, every one equally likely (greedy picks 0), so samples and beams still fork.
            logits = torch.zeros(len(batch), self.max_width)
            positions = torch.tensor([len(s.token_ids) for s in batch])
        else:
            tokens, positions, meta = self.cache.prepare_step(batch, is_prefill)
            logits = (self.model if is_prefill else self.decode)(tokens, positions, self.cache, meta)
            positions = meta.context_lens  # where each new token goes
        scheduler = self.scheduler
        self.memory.record(len(scheduler.running_groups), len(scheduler.waiting) + len(scheduler.swapped))
        self.sharing.record(self.cache.allocator.num_refs)  # only running sequences hold blocks
        finished = []
        for seq, token in self._next_tokens(batch, logits, positions):
            seq.token_ids.append(token)
            reason = self._stop_reason(seq, token)
            if reason:
                self.scheduler.finish(seq, reason)
                if seq.group.beam_width == 1:
                    finished.append(seq)
                elif not seq.group.seqs:  # a beam search is over when its last beam is
                    finished += seq.group.outputs()
        return len(batch), finished

    def _next_tokens(self, batch: list[Sequence], logits: torch.Tensor,
                     positions: torch.Tensor) -> list[tuple[Sequence, int]]:
        """(sequence, next token) for the step: one per sampled sequence, beams as beam search picks.

        A request's first token comes from its prompt's logits; with n samples, that is when
        the other n - 1 fork off, each drawing its first token from the same logits row.
        """
        if self.max_width == 1:  # every request runs one sequence: row i is batch[i]'s, nothing forks
            return self._sample(batch, logits, positions)
        targets, rows, beams = [], [], {}
        for i, seq in enumerate(batch):
            group = seq.group
            if group.beam_width > 1:
                beams.setdefault(group, []).append(i)
            elif group.n > 1 and seq.num_output_tokens == 0:
                targets += [seq] + [self.scheduler.fork(seq, sample_key(group.request_id, group.sample_index + j))
                                    for j in range(1, group.n)]
                rows += [i] * group.n
            else:
                targets.append(seq)
                rows.append(i)
        picks = []
        if targets:
            rows_logits, rows_positions = logits, positions
            if beams or len(rows) != len(batch):  # not simply every row once, in order
                index = torch.tensor(rows, device=logits.device)
                rows_logits, rows_positions = logits[index], positions[index]
            picks = self._sample(targets, rows_logits, rows_positions)
        for idx in beams.values():
            picks += advance_beams(self.scheduler, [batch[i] for i in idx], logits[idx])
        return picks

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor,
                positions: torch.Tensor) -> list[tuple[Sequence, int]]:
        """The next token of each of `seqs`, from its row of `logits`."""
        keys = None if self.sampling.greedy else torch.tensor([s.sample_key for s in seqs], device=logits.device)
        return list(zip(seqs, sample(logits, self.sampling, keys, positions).tolist()))

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        if token in self.stop_ids:
            return "stop"
        num_tokens = len(seq.token_ids)  # once, not through properties: this runs per sequence per step
        if num_tokens - seq.num_prompt_tokens >= seq.max_new_tokens:
            return "length"
        if num_tokens >= self.cache.max_seq_len:
            return "max_seq_len"
        return None
