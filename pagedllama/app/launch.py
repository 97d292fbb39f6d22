"""Starting the tensor-parallel ranks, and stopping all of them when one fails.

On one machine the script is rank 0 and spawns ranks 1..N-1 itself (torch.multiprocessing, as
nano-vllm starts its workers); across machines `torchrun` starts every rank and says which one
this is (RANK, WORLD_SIZE, LOCAL_RANK). Ranks talk through torch.distributed: NCCL on CUDA, gloo
on CPU. A failure never leaves a rank waiting: every collective times out (`timeout_s`), rank 0
watches the ranks it spawned and stops the run with one line the moment one of them fails or dies,
and a spawned rank whose parent is gone exits.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tqdm import tqdm

from ..errors import UsageError, UserError
from ..model.parallel import TensorParallel

DEFAULT_TIMEOUT_S = 300.0
RankMain = Callable[..., int]  # main(tp, *args) -> exit status, run on every rank
INTERRUPTED = 130  # the status of a run stopped by Ctrl-C
WATCHDOG_THREAD = "rank watchdog"


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def check_torchrun_world(size: int) -> None:
    """torchrun must start exactly --tensor-parallel-size processes (else each would run alone)."""
    world = int(os.environ["WORLD_SIZE"]) if under_torchrun() else size
    if world != size:
        raise UsageError(f"torchrun started {world} processes but --tensor-parallel-size is {size}; "
                         "give torchrun --nproc-per-node x --nnodes = --tensor-parallel-size")


def run_ranks(size: int, device_type: str, timeout_s: float, main: RankMain, main_args: tuple,
              describe: Callable[[BaseException], tuple[str, int]]) -> int:
    """Run `main` on `size` ranks and return rank 0's status (or the failed rank's).
    `describe`: the one line and status a rank's exception becomes."""
    backend = "nccl" if device_type == "cuda" else "gloo"
    if under_torchrun():
        rank = int(os.environ["RANK"])
        check_torchrun_world(size)
        if rank > 0:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the whole life of this rank
        tp = TensorParallel(rank, size, int(os.environ.get("LOCAL_WORLD_SIZE", size)))
        return _as_rank(tp, int(os.environ.get("LOCAL_RANK", 0)), backend, timeout_s, main, main_args)
    os.environ["MASTER_ADDR"] = "127.0.0.1"  # every rank on this machine
    os.environ["MASTER_PORT"] = str(_free_port())
    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe(duplex=False) for _ in range(1, size)]  # each rank's one line, if it fails
    children = [ctx.Process(target=_spawned_rank, daemon=True, name=f"rank {rank}",
                            args=(rank, size, backend, timeout_s, main, main_args, describe, sender, os.getpid()))
                for rank, (_, sender) in enumerate(pipes, start=1)]
    for child in children:
        child.start()
    watchdog = _Watchdog(children, [receiver for receiver, _ in pipes], grace_s=timeout_s + 5)
    try:
        status = _as_rank(TensorParallel(0, size, size), 0, backend, timeout_s, main, main_args, watchdog.rank_failure)
        watchdog.stop()
        _stop_children(children, wait_s=0 if status == INTERRUPTED else 10)  # finishing, or waiting for rank 0
        return status
    except BaseException:
        reported = watchdog.stop()
        _stop_children(children, wait_s=0)
        if reported:  # the watchdog printed the cause: rank 0's own error is its consequence
            raise SystemExit(reported) from None
        raise
    finally:
        for receiver, sender in pipes:
            receiver.close()
            sender.close()


def _as_rank(tp: TensorParallel, local_rank: int, backend: str, timeout_s: float, main: RankMain,
             main_args: tuple, peer_failure: Callable[[], UserError | None] = lambda: None) -> int:
    """Join the process group as `tp.rank`, run `main`, leave it; a collective that fails or times out
    becomes one line naming the likely cause."""
    rank = tp.rank
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group(backend, rank=rank, world_size=tp.size, timeout=timedelta(seconds=timeout_s))
        return main(tp, *main_args)
    except (dist.DistError, RuntimeError) as e:
        if not isinstance(e, dist.DistError) and "gloo" not in str(e).lower() and "nccl" not in str(e).lower():
            raise
        raise peer_failure() or UserError(
            f"rank {rank}: a collective failed or did not complete within {timeout_s:g} s ({str(e).splitlines()[0]}): "
            "another rank died or hung; the run is stopped (--dist-timeout sets the wait)") from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawned_rank(rank: int, size: int, backend: str, timeout_s: float, main: RankMain, main_args: tuple,
                  describe: Callable[[BaseException], tuple[str, int]], failure, parent: int) -> None:
    """A rank the script spawned: silent (rank 0 reports), its failure sent to rank 0 as one line."""
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the whole life of this rank
    # Ctrl-C is rank 0's: it stops within a step and reports; the other ranks are stopped after it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # tqdm's default lock is a multiprocessing semaphore, which a rank killed outright would leak (and
    # the resource tracker would say so on rank 0's stderr); this rank shows no progress bar anyway.
    tqdm.set_lock(threading.RLock())
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    try:
        status = _as_rank(TensorParallel(rank, size, size), rank, backend, timeout_s, main, main_args)
    except BaseException as e:  # noqa: BLE001 - rank 0 prints it
        message, status = describe(e) if isinstance(e, Exception) else ("interrupted", INTERRUPTED)
        failure.send(f"rank {rank}: {message}")
    sys.stdout.flush()
    os._exit(status)


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


class _Watchdog:
    """Rank 0's watch over the ranks it spawned: when one fails or dies, print one line, kill the
    other ranks, and end rank 0 too: it stops on its own, its collective failing or timing out now
    that a peer is gone (a clean exit); should it still run `grace_s` later, it is ended there."""

    def __init__(self, children: list, failures: list, grace_s: float):
        self.children, self.failures, self.grace_s = children, failures, grace_s
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.reported = 0  # the exit status of the failure printed, once one is
        threading.Thread(target=self._watch, daemon=True, name=WATCHDOG_THREAD).start()

    def rank_failure(self) -> UserError | None:
        """The failure of a spawned rank, if one failed (checked when rank 0's own collective fails)."""
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            failed = self._failed()
            if failed:
                return UserError(failed[0], failed[1] or 1)
            time.sleep(0.05)
        return None

    def stop(self) -> int:
        """Watch no more; the status of the failure already reported (0: none)."""
        with self.lock:
            self.stopped.set()
            return self.reported

    def _failed(self) -> tuple[str, int] | None:
        for child, failure in zip(self.children, self.failures):
            code = child.exitcode
            if code not in (None, 0):
                if failure.poll():
                    return failure.recv(), code
                how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
                return f"{child.name} {how}; the run is stopped", 1
        return None

    def _watch(self) -> None:
        # Ends with the run: a process may run several (`compare`, the tests), and a watchdog left
        # polling made every later run in the process slower (measured: 0.4 s became 11 s after two).
        while not self.stopped.wait(0.1):
            failed = self._failed()
            if failed is None:
                continue
            with self.lock:
                if self.stopped.is_set():
                    return
                self.reported = failed[1] if failed[1] > 0 else 1
                print(f"error: {failed[0]}", file=sys.stderr, flush=True)
                _stop_children(self.children, wait_s=0)
            time.sleep(self.grace_s)
            os._exit(self.reported)


def _stop_children(children: list, wait_s: float) -> None:
    """Wait up to `wait_s` for ranks that are finishing, then kill what is left: no process outlives the run."""
    deadline = time.monotonic() + wait_s
    for child in children:
        child.join(timeout=max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            child.kill()
            child.join()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
