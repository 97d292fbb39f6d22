"""One KV memory budget for both twins, and what it buys each of them.

On CUDA the default budget is what vLLM gives its cache: total memory x utilization, minus
the weights and the peak of a warm-up forward. A GPU that is not there can be planned
for: weights and activations are computed from the model's shape. On CPU the default
scales the demo to the classic case, Llama 3 8B on a 24 GB GPU, so the demo runs out of
memory where that GPU would: it buys the same number of max_seq_len-long preallocations.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import host_memory
from ..errors import OutOfKVMemory, UsageError
from ..model.config import DEFAULT_MAX_SEQ_LEN, NAMED_SHAPES, ModelArgs
from ..model.parallel import check_divides
from ..units import GB, human_bytes
from .config import MAX_PREFILL_TOKENS, PAGED_BLOCK_SIZE, CacheLayout, EngineConfig

DEFAULT_GPU_MEMORY_UTILIZATION = 0.9


@dataclass(frozen=True)
class Budget:
    """Where the KV budget came from, line by line, so the user can check it."""

    kv_bytes: int
    explanation: str


def weights_bytes(args: ModelArgs, dtype_bytes: int, tensor_parallel_size: int = 1) -> int:
    """The weights one GPU holds: Megatron-style tensor parallelism splits every matrix (and the
    embedding and output layer by vocabulary) across the GPUs and copies only the norms."""
    return args.params_per_rank(tensor_parallel_size) * dtype_bytes


def activation_allowance(args: ModelArgs, dtype_bytes: int, tokens: int = MAX_PREFILL_TOKENS,
                         tensor_parallel_size: int = 1) -> int:
    """Peak activations of one prefill step on one GPU: residual and norms (~2 x dim) on every GPU;
    attention's q/k/v/o (~2 x dim) and SwiGLU's (3 x hidden) split across the GPUs."""
    split = (2 * args.dim + 3 * args.hidden_dim) // tensor_parallel_size
    return tokens * (2 * args.dim + split) * dtype_bytes


def simulated_budget(args: ModelArgs, gpu_memory_gb: float, utilization: float, dtype_bytes: int,
                     tensor_parallel_size: int = 1) -> Budget:
    """The KV budget `tensor_parallel_size` GPUs of `gpu_memory_gb` each would leave after weights
    and activations, vLLM's rule applied to each GPU.

    Each GPU holds 1/N of every block's KV heads, so N GPUs with B bytes left each hold as many
    blocks as one cache of N x B bytes: that is the budget returned.
    """
    check_utilization(utilization)
    if not 0 < gpu_memory_gb <= 100_000:
        raise UsageError(f"--gpu-memory-gb {gpu_memory_gb} is not a plausible GPU size; give it in GB, e.g. 24")
    check_divides(args, tensor_parallel_size)
    tp = tensor_parallel_size
    usable = int(gpu_memory_gb * GB * utilization)
    weights = weights_bytes(args, dtype_bytes, tp)
    acts = activation_allowance(args, dtype_bytes, tensor_parallel_size=tp)
    kv = usable - weights - acts
    share = f" / {tp} GPUs" if tp > 1 else ""
    explanation = (f"{gpu_memory_gb:g} GB x {utilization:g} utilization = {human_bytes(usable)}, minus weights "
                   f"{human_bytes(weights)} ({args.num_params() / 1e9:.2f}B params x {dtype_bytes} bytes{share}), "
                   f"minus activations {human_bytes(acts)} ({MAX_PREFILL_TOKENS}-token prefill step"
                   + (", per GPU)" if tp > 1 else ")"))
    if kv <= 0:
        where = "on each GPU" if tp > 1 else "on the GPU"
        raise OutOfKVMemory(f"no memory left for the KV cache {where}: {explanation} leaves {human_bytes(kv)}; "
                            "use a larger GPU, more GPUs (--tensor-parallel-size) or a smaller model")
    if tp > 1:
        explanation = f"{tp} GPUs x {human_bytes(kv)} each: {explanation}"
    return Budget(kv * tp, explanation)


def reference_preallocations() -> float:
    """How many 8192-token preallocations Llama 3 8B (bf16) fits on a 24 GB GPU."""
    args = NAMED_SHAPES["llama3-8b"]
    budget = simulated_budget(args, 24, DEFAULT_GPU_MEMORY_UTILIZATION, 2)
    return budget.kv_bytes / (DEFAULT_MAX_SEQ_LEN * args.kv_bytes_per_token(2))


def cpu_default_budget(bytes_per_token: int, max_seq_len: int) -> Budget:
    rows = reference_preallocations()
    kv = int(rows * max_seq_len * bytes_per_token)
    return Budget(kv, f"CPU default: room for {rows:.2f} preallocations of {max_seq_len} tokens, as Llama 3 8B "
                      f"has on a 24 GB GPU (see --simulate llama3-8b --gpu-memory-gb 24)")


def cuda_default_budget(utilization: float, peak_after_warmup: int, total: int) -> Budget:
    """vLLM's rule, from the peak memory PyTorch saw during a warm-up at the largest step."""
    check_utilization(utilization)
    kv = int(total * utilization) - peak_after_warmup
    explanation = (f"GPU {human_bytes(total)} x {utilization:g} utilization minus {human_bytes(peak_after_warmup)} "
                   "peak for weights and a warm-up forward")
    if kv <= 0:
        raise OutOfKVMemory(f"no GPU memory left for the KV cache: {explanation}; raise "
                            "--gpu-memory-utilization or use a smaller model")
    return Budget(kv, explanation)


def per_rank_budget(budget: Budget, tensor_parallel_size: int) -> Budget:
    """`budget` on each of `tensor_parallel_size` GPUs: as with `simulated_budget`, N ranks holding 1/N
    of every block each hold as many blocks as one cache N times as large, the total returned."""
    if tensor_parallel_size == 1:
        return budget
    return Budget(budget.kv_bytes * tensor_parallel_size,
                  f"{tensor_parallel_size} ranks x {human_bytes(budget.kv_bytes)} each: {budget.explanation}")


def user_budget(kv_cache_gb: float) -> Budget:
    if not 0 < kv_cache_gb <= 100_000:
        raise UsageError(f"--kv-cache-gb {kv_cache_gb} is not a usable budget; give a positive size in GB")
    return Budget(int(kv_cache_gb * GB), f"--kv-cache-gb {kv_cache_gb:g}")


def check_utilization(utilization: float) -> None:
    if not 0 < utilization <= 1:
        raise UsageError(f"--gpu-memory-utilization {utilization} must be in (0, 1], e.g. 0.9")


def cache_layout(config: EngineConfig, budget_bytes: int, num_seqs: int | None = None,
                 longest: int = 0) -> CacheLayout:
    """The KV pool a twin cuts from the budget: the one place the twins differ, and the only one
    where the words naive and paged decide anything.

    naive, `--reserve max`: blocks of max_seq_len slots, one per sequence, all reserved at admission;
    for a batch of `num_seqs` sequences exactly that many, and a batch that does not fit is an error
    that names the largest batch that does. naive, `--reserve pow2 | oracle`: one region the size of
    the budget, cut into 16-slot blocks (the paged twin's default), from which each sequence reserves
    a run of consecutive blocks at admission (rounding up to 16 slots is internal fragmentation);
    consecutive ids are one contiguous range, so every attention backend reads it unchanged.
    paged: `block_size` blocks, as many as the budget holds (or `config.num_blocks`), handed out as
    sequences grow. A pool of blocks must hold the `longest` request.
    Without `num_seqs`: the whole pool the budget buys, unchecked (a budget of 0 still gives the
    block size, which choosing the attention backend needs before the budget is known).
    """
    bytes_per_token = config.bytes_per_slot
    if config.twin == "naive" and config.reserve != "max":
        layout = CacheLayout(PAGED_BLOCK_SIZE, budget_bytes // (PAGED_BLOCK_SIZE * bytes_per_token), contiguous=True)
    elif config.twin == "naive":
        row_bytes = config.max_seq_len * bytes_per_token
        rows = budget_bytes // row_bytes
        if num_seqs is None:
            return CacheLayout(config.max_seq_len, rows, preallocated=True)
        if rows == 0:
            raise OutOfKVMemory(f"the KV budget {human_bytes(budget_bytes)} is too small for even one "
                                f"{config.max_seq_len}-token preallocation ({human_bytes(row_bytes)}); raise "
                                "--kv-cache-gb or lower --max-seq-len")
        if num_seqs > rows:
            raise OutOfKVMemory(f"out of KV memory: {num_seqs} requests x {config.max_seq_len} preallocated slots "
                                f"need {human_bytes(num_seqs * row_bytes)} but the budget is "
                                f"{human_bytes(budget_bytes)}; the largest batch that fits is {rows} "
                                "(or run llama3-paged.py)")
        return CacheLayout(config.max_seq_len, num_seqs, preallocated=True)
    else:
        num_blocks = config.num_blocks or budget_bytes // (config.block_size * bytes_per_token)
        layout = CacheLayout(config.block_size, num_blocks)
    if num_seqs is not None and layout.capacity_tokens < longest:
        raise OutOfKVMemory(f"the KV pool ({layout.num_blocks} blocks x {layout.block_size} slots = "
                            f"{human_bytes(layout.capacity_tokens * bytes_per_token)}) cannot hold even the "
                            f"longest request ({longest} tokens); raise --kv-cache-gb"
                            + (" or --num-blocks" if config.twin == "paged" else ""))
    return layout


def check_host_memory(config: EngineConfig, layout: CacheLayout) -> None:
    """On CPU, fail with a clear message before allocating a pool that, with a prefill step's
    activations, the machine cannot hold (see `host_memory.available_bytes`)."""
    available = host_memory.available_bytes() if config.device.type == "cpu" else None
    pool_bytes = layout.capacity_tokens * config.bytes_per_slot
    activations = activation_allowance(config.model_args, config.dtype.itemsize)
    if available is not None and pool_bytes + activations > available:
        raise OutOfKVMemory(f"the {human_bytes(pool_bytes)} KV cache and {human_bytes(activations)} of prefill "
                            f"activations do not fit in the {human_bytes(available)} of memory this machine has "
                            "available; lower --kv-cache-gb, --num-blocks or the batch size")
