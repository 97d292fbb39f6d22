"""A generation request, and the sequences the engine runs for it: their tokens and where their K/V live."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum


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
    # Its true answer length, when known ahead of generating it (--oracle-lengths): what the naive
    # twin's pow2 and oracle policies reserve for. None: max_new_tokens when nothing stops it early.
    output_len: int | None = None

    def __post_init__(self):
        if min(self.n, self.beam_width) < 1 or min(self.n, self.beam_width) > 1:
            raise ValueError(f"request {self.request_id}: n ({self.n}) and beam_width ({self.beam_width}) must be "
                             "at least 1, and not both above 1")

    @property
    def width(self) -> int:
        return max(self.n, self.beam_width)


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"  # preempted with its K/V copied to the CPU swap space
    FINISHED = "finished"


@dataclass(eq=False, slots=True)
class Sequence:
    """Prompt plus generated tokens; `block_table` lists the physical KV blocks it holds."""

    seq_id: int
    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    max_new_tokens: int
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    row: int = -1  # this sequence's row in the block manager's block-table array (-1: none)
    num_cached_tokens: int = 0  # tokens whose K/V are already in the cache
    finish_reason: str | None = None
    num_preemptions: int = 0
    sample_key: int = 0  # names the sequence's random stream (see sampling.py)
    cum_logprob: float = 0.0  # beam search: the sum of its output tokens' log-probabilities
    prefix_ids: list[int] = field(default_factory=list)  # prefix caching: each full block's prefix id
    group: SequenceGroup | None = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def fork(self, seq_id: int, sample_key: int) -> Sequence:
        """A copy that goes on by itself from here; `BlockManager.fork` gives it the same blocks."""
        return replace(self, seq_id=seq_id, sample_key=sample_key, token_ids=list(self.token_ids),
                       prefix_ids=list(self.prefix_ids), block_table=[], row=-1, num_cached_tokens=0)


@dataclass(eq=False, slots=True)
class SequenceGroup:
    """The sequences of one request, its parallel samples or its beams.

    They share KV blocks, so the scheduler admits, preempts and resumes them together
    (gang scheduling): preempting one alone would free nothing its siblings still hold.
    """

    request_id: str
    seqs: list[Sequence]  # the live ones: waiting, running or swapped
    n: int = 1
    beam_width: int = 1
    sample_index: int = 0  # sample j draws from stream sample_index + j
    finished: list[Sequence] = field(default_factory=list)
    reserve_slots: int = 0  # a contiguous pool: the slots its reservation policy holds for it, once, at admission
    stalls_seen: int = 0  # the scheduler's memory_stalls when the request last joined the queue
    waited_for_memory: bool = False  # queued at some step when admission stopped for lack of KV blocks

    @property
    def width(self) -> int:
        """How many sequences the request runs at most."""
        return max(self.n, self.beam_width)

    def outputs(self) -> list[Sequence]:
        """Samples in order; beams best first by cumulative log-probability (not length-normalised)."""
        done = self.finished + self.seqs
        if self.beam_width > 1:
            return sorted(done, key=lambda s: -s.cum_logprob)[:self.beam_width]
        return sorted(done, key=lambda s: s.seq_id)
