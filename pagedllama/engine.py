"""The generation loop: schedule a step, run the model on it, sample, retire finished requests."""
from __future__ import annotations

import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .errors import OutOfKVMemory
from .kv_cache import KVCache
from .model import Transformer
from .report import MemoryTracker
from .sampling import SamplingParams, sample
from .scheduler import Scheduler
from .sequence import Sequence


@dataclass(frozen=True)
class Request:
    """A tokenized prompt and how far to generate it."""

    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int


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
                 stop_ids: frozenset[int], ignore_eos: bool = False, max_prefill_tokens: int = 16384):
        self.model = model
        self.cache = cache
        self.sampling = sampling
        self.stop_ids = frozenset() if ignore_eos else stop_ids
        self.scheduler = Scheduler(cache, max_prefill_tokens)
        self.memory = MemoryTracker(cache)

    def run(self, requests: list[Request], progress: bool = True,
            on_finish: Callable[[Sequence], None] | None = None) -> RunResult:
        """Generate every request to completion (or until Ctrl-C, which stops within a step)."""
        seqs = []
        for i, r in enumerate(requests):
            seq = Sequence(seq_id=i, request_id=r.request_id, token_ids=list(r.prompt_ids),
                           num_prompt_tokens=len(r.prompt_ids), max_new_tokens=r.max_new_tokens,
                           sample_key=zlib.crc32(r.request_id.encode()))
            self.scheduler.add(seq)
            seqs.append(seq)
        bar = tqdm(total=sum(r.max_new_tokens for r in requests), unit="tok", disable=not progress,
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
        return RunResult(seqs, steps, interrupted)

    def step(self) -> tuple[int, list[Sequence]]:
        """One forward pass: how many sequences it advanced, and those that finished."""
        try:
            batch, is_prefill = self.scheduler.schedule()
        except MemoryError as e:
            raise OutOfKVMemory(f"{e}; raise --kv-cache-gb or lower --max-seq-len") from None
        if self.model is None:
            self.cache.commit(batch, is_prefill)
            next_ids = [0] * len(batch)
        else:
            tokens, positions, meta = self.cache.prepare_step(batch, is_prefill)
            logits = self.model(tokens, positions, self.cache, meta)
            keys = torch.tensor([s.sample_key for s in batch], device=logits.device)
            next_ids = sample(logits, self.sampling, keys, meta.context_lens.long()).tolist()
        self.memory.record()
        finished = []
        for seq, token in zip(batch, next_ids):
            seq.token_ids.append(token)
            reason = self._stop_reason(seq, token)
            if reason:
                self.scheduler.finish(seq, reason)
                finished.append(seq)
        return len(batch), finished

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        if token in self.stop_ids:
            return "stop"
        if seq.num_output_tokens >= seq.max_new_tokens:
            return "length"
        if seq.num_tokens >= self.cache.max_seq_len:
            return "max_seq_len"
        return None
