"""One generation request as the engine tracks it: its tokens and where its K/V live."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Prompt plus generated tokens; `block_table` lists the physical KV blocks it owns."""

    seq_id: int
    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    max_new_tokens: int
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    row: int = -1  # this sequence's row in the cache's device block-table tensor
    num_cached_tokens: int = 0  # tokens whose K/V are already in the cache
    finish_reason: str | None = None
    num_preemptions: int = 0
    sample_key: int = 0  # names the request's random stream (see sampling.py)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens
