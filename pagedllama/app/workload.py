"""ShareGPT conversations to tokenized requests with their generation limits."""
from __future__ import annotations

from ..engine.sequence import Request
from ..errors import UserError, UsageError
from ..io.data import Conversation
from ..io.tokenizer import Tokenizer


def build_requests(conversations: list[Conversation], tokenizer: Tokenizer, batch_size: int,
                   max_seq_len: int, max_new_tokens: int | None, reference_lengths: bool,
                   system_prompt: str | None = None) -> list[Request]:
    """The first `batch_size` conversations as chat prompts.

    Each request may generate up to `max_new_tokens`, or, with `reference_lengths` (the
    demo), exactly as many tokens as the dataset's answer has, so memory follows real
    traffic; always capped by the context.
    """
    if batch_size < 1:
        raise UsageError(f"batch size must be a positive integer, not {batch_size}")
    if batch_size > len(conversations):
        raise UsageError(f"batch size {batch_size} exceeds the {len(conversations)} usable conversations in "
                         "the data file; use a smaller batch or a larger --data file")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, not {max_new_tokens}")
    requests = []
    for conv in conversations[:batch_size]:
        messages = [{"role": "user", "content": conv.prompt}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        prompt_ids = tokenizer.encode_chat(messages)
        room = max_seq_len - len(prompt_ids)
        if room < 1:
            raise UserError(f"request {conv.id}: its prompt has {len(prompt_ids)} tokens and leaves no room to "
                            f"answer within --max-seq-len {max_seq_len}; raise --max-seq-len or drop that "
                            "conversation from the data file")
        if max_new_tokens is not None:
            limit = max_new_tokens
        elif reference_lengths:
            limit = max(1, len(tokenizer.encode(conv.reference_answer)))
        else:
            limit = room
        requests.append(Request(conv.id, prompt_ids, min(limit, room)))
    return requests
