"""The generation loop: schedule a step, run the model on it, sample, retire finished requests."""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..errors import OutOfKVMemory
from ..model.attention import AttentionBackend
from ..model.model import Transformer
from ..model.model_runner import ModelRunner
from ..units import human_bytes
from .beam_search import advance_beams
from .block_manager import BlockManager
from .budget import cache_layout, check_host_memory
from .config import CacheLayout, EngineConfig
from .memory import MemoryTracker
from .reservation import reservation_slots
from .sampling import sample, sample_key
from .scheduler import Scheduler
from .sequence import Request, Sequence, SequenceGroup
from .sharing import SharingTracker, one_per_sequence
from .swap import SwapSpace
from .waste import WasteBreakdown, WasteRecorder


@dataclass
class RunResult:
    sequences: list[Sequence]
    steps: int
    interrupted: bool


def build_engine(config: EngineConfig, budget_bytes: int, requests: list[Request], model: Transformer | None = None,
                 backend: AttentionBackend | None = None, record_waste: bool = True) -> Engine:
    """The engine a twin runs `requests` with within the KV budget: the composition root that the
    command line, the comparison and the benchmarks share. No model: a dry run. `record_waste`:
    keep the four-way breakdown's trace over the whole budget (`Engine.waste`)."""
    seqs = one_per_sequence(requests)
    layout = cache_layout(config, budget_bytes, len(seqs), max(len(r.prompt_ids) + r.max_new_tokens for r in seqs))
    budget_slots = max(budget_bytes // config.bytes_per_slot, layout.capacity_tokens) if record_waste else None
    if model is None:
        return Engine(config, layout, len(seqs), budget_slots=budget_slots)
    check_host_memory(config, layout)
    try:
        return Engine(config, layout, len(seqs), model, backend, budget_slots)
    except torch.cuda.OutOfMemoryError:
        raise OutOfKVMemory(f"CUDA could not allocate the {human_bytes(layout.capacity_tokens * config.bytes_per_slot)} "
                            "KV cache; lower --kv-cache-gb, the batch size or --gpu-memory-utilization") from None


class Engine:
    """Runs requests through scheduler, block manager and model runner.

    With no model it is a dry run: the scheduler and the block manager alone, each request
    generating exactly `max_new_tokens` placeholder tokens, no forward pass and no KV tensors.
    That is how capacity is planned for models and GPUs that are not here (app/capacity.py).
    """

    def __init__(self, config: EngineConfig, layout: CacheLayout, max_num_seqs: int,
                 model: Transformer | None = None, backend: AttentionBackend | None = None,
                 budget_slots: int | None = None):
        """`max_num_seqs`: block-table rows, one per sequence that may run at once. `budget_slots`:
        record the waste trace over a KV budget of that many slots (at least the pool's)."""
        self.config = config
        self.recorder = None
        if budget_slots is not None:
            assert budget_slots >= layout.capacity_tokens, "the pool is cut from the budget"
            self.recorder = WasteRecorder(budget_slots, config.bytes_per_slot, layout.num_blocks)
        self.block_manager = BlockManager(layout, config.max_seq_len, max_num_seqs, self.recorder)
        if config.prefix_caching:
            self.block_manager.enable_prefix_caching()
        swap = SwapSpace(self.block_manager, config.swap_blocks(layout)) if config.preemption == "swap" else None
        self.scheduler = Scheduler(self.block_manager, config.max_prefill_tokens, swap=swap)
        self.runner = None if model is None else ModelRunner(config, model, layout, max_num_seqs, backend)
        self.tp = config.tensor_parallel
        self.sampling = config.sampling
        self.stop_ids = frozenset() if config.ignore_eos else config.stop_ids
        self.memory = MemoryTracker(self.block_manager, config.bytes_per_slot)
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
        if rows > self.block_manager.max_num_seqs:
            raise ValueError(f"the requests run {rows} sequences but the cache has block-table rows for "
                             f"{self.block_manager.max_num_seqs}; size it for sharing.one_per_sequence(requests)")
        self.max_width = max([self.max_width] + [r.width for r in requests])
        groups = []
        for r in requests:
            seq = Sequence(seq_id=next(self.scheduler.seq_ids), request_id=r.request_id, token_ids=list(r.prompt_ids),
                           num_prompt_tokens=len(r.prompt_ids), max_new_tokens=r.max_new_tokens,
                           sample_key=sample_key(r.request_id, r.sample_index))
            seq.group = SequenceGroup(r.request_id, [seq], r.n, r.beam_width, r.sample_index)
            if self.block_manager.layout.contiguous:
                seq.group.reserve_slots = self._reservation(r)
            self.scheduler.add(seq.group)
            groups.append(seq.group)
        return groups

    def _reservation(self, r: Request) -> int:
        """The slots the naive twin's policy reserves for `r`: its true answer length is given, or is
        `max_new_tokens` when nothing stops it earlier (the demo; dry runs)."""
        if r.width > 1:
            raise ValueError(f"request {r.request_id}: --reserve {self.config.reserve} runs one sequence per request")
        output_len = r.output_len
        if output_len is None and not self.stop_ids:  # it generates exactly max_new_tokens
            output_len = r.max_new_tokens
        return reservation_slots(self.config.reserve, len(r.prompt_ids), output_len, self.config.max_seq_len)

    @property
    def waste(self) -> WasteBreakdown | None:
        """Where the KV budget went, step by step, in the paper's four parts (None if not recorded)."""
        return self.recorder.breakdown() if self.recorder else None

    def step(self) -> tuple[int, list[Sequence]]:
        """One forward pass: how many sequences it advanced, and the outputs it completed."""
        try:
            batch, is_prefill = self.scheduler.schedule()
        except MemoryError as e:
            raise OutOfKVMemory(f"{e}; raise --kv-cache-gb or lower --max-seq-len") from None
        ops = self.block_manager.take_ops()
        if self.runner is None:
            # Placeholder tokens, every one equally likely (greedy picks 0), so samples and beams still fork.
            logits = torch.zeros(len(batch), self.max_width)
            positions = torch.tensor([len(s.token_ids) for s in batch])
        else:  # positions: where each new token goes
            logits, positions = self.runner.run(batch, is_prefill, ops, self.block_manager.block_tables)
        self.block_manager.commit(batch, is_prefill)
        scheduler = self.scheduler
        self.memory.record(len(scheduler.running_groups), len(scheduler.waiting) + len(scheduler.swapped))
        if self.recorder:
            manager = self.block_manager
            keys, written = manager.units_written(scheduler.running)
            free = self.recorder.budget_slots - manager.allocator.num_used * manager.block_size
            head = scheduler.waiting[0] if scheduler.waiting else None
            self.recorder.step(keys, written, free, manager.external_fragmentation_slots(head))
        self.sharing.record(self.block_manager.allocator.num_refs)  # only running sequences hold blocks
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
            picks += advance_beams(self.scheduler, [batch[i] for i in idx], self.tp.from_rank0(logits[idx]))
        return picks

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor,
                positions: torch.Tensor) -> list[tuple[Sequence, int]]:
        """The next token of each of `seqs`, from its row of `logits`."""
        keys = None if self.sampling.greedy else torch.tensor([s.sample_key for s in seqs], device=logits.device)
        tokens = self.tp.from_rank0(sample(logits, self.sampling, keys, positions))
        return list(zip(seqs, tokens.tolist()))

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        if token in self.stop_ids:
            return "stop"
        num_tokens = len(seq.token_ids)  # once, not through properties: this runs per sequence per step
        if num_tokens - seq.num_prompt_tokens >= seq.max_new_tokens:
            return "length"
        if num_tokens >= self.config.max_seq_len:
            return "max_seq_len"
        return None
