"""Mutation testing (mutmut) of the model and engine modules that decide what the engine computes.

Each module is mutated one small change at a time (an operator, a number, a condition, a
string...), and each mutant is run against the tests that judge that module, only those of them
that execute the mutated function. A mutant the tests let through ("survived") is a change to the
code that no test notices. docs/mutation.md records the scores and explains every survivor.

    pip install mutmut==3.8.1                 # not in requirements-dev.txt: CI does not run this
    python tools/mutation.py                  # all seven modules, one worker: about 35 minutes on 2 cores
    python tools/mutation.py engine/scheduler # one module

Each module runs in its own copy of the repository under --workdir (default build/mutation), with
mutmut's configuration written there, so the checkout is left as it was. The hypothesis tests run
with the `mutation` profile (tests/conftest.py): fixed examples, failures not shrunk. Writes
WORKDIR/summary.json and, per module, WORKDIR/MODULE/survivors.txt with each survivor's diff.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTMUT_VERSION = "3.8.1"

# The one test of the warm-up forward that sizes the CUDA KV budget (the rest of its file is capacity arithmetic).
WARMUP_TEST = "tests/test_capacity.py::test_budget_warm_up_runs_the_backend_and_block_size_that_will_run"
# The naive twin's reservation policies run by the engine (contiguous pools, the waste trace); not their CLI.
RESERVE_TESTS = [f"tests/test_reserve.py::{name}" for name in (
    "test_a_hole_that_fits_no_request_is_external_fragmentation",
    "test_reservation_and_internal_fragmentation_per_policy", "test_paged_twin_reserves_only_inside_its_last_block",
    "test_parts_sum_to_the_budget_and_agree_with_the_memory_tracker",
    "test_paged_units_count_a_shared_block_once", "test_a_dry_run_equals_the_real_run_step_for_step",
    "test_tokens_are_the_same_under_every_policy", "test_a_request_outgrowing_its_reservation_is_an_error")]
# The tests that judge each module: those written for it, and the engine runs that exercise it
# against the float64 reference. The slow hypothesis sweeps of test_engine.py are left out (the same
# paths are in test_engine_reference.py and the per-module tests), as is anything about the CLI,
# checkpoints or benchmarks beyond what the module is used for there.
TESTS = {
    "model/kv_cache": ["tests/test_model_runner.py", "tests/test_attention.py", "tests/test_swap.py",
                       "tests/test_sharing.py", "tests/test_scheduler_state_machine.py",
                       "tests/test_engine_reference.py", WARMUP_TEST],
    "engine/block_allocator": ["tests/test_block_allocator.py", "tests/test_swap.py", "tests/test_sharing.py",
                               "tests/test_prefix_cache.py", "tests/test_scheduler_state_machine.py"],
    "model/model": ["tests/test_reference.py", "tests/test_engine_reference.py", "tests/test_checkpoint.py",
                    "tests/test_gguf.py::test_rope_freqs_tensor_is_llama31_scaling",
                    "tests/test_tensor_parallel.py::"
                    "test_a_rank_embeds_the_ids_of_its_vocabulary_range_and_zeros_for_the_others"],
    "model/model_runner": ["tests/test_model_runner.py", "tests/test_attention.py", "tests/test_attention_rows.py",
                           "tests/test_engine_reference.py", "tests/test_prefix_cache.py", "tests/test_swap.py",
                           "tests/test_cuda_graphs.py", WARMUP_TEST],
    "engine/scheduler": ["tests/test_scheduler_policy.py", "tests/test_scheduler_state_machine.py",
                         "tests/test_swap.py", "tests/test_sharing.py", "tests/test_prefix_cache.py",
                         "tests/test_beam_search.py", "tests/test_engine_reference.py"],
    "engine/block_manager": ["tests/test_block_allocator.py", "tests/test_attention.py",
                             "tests/test_engine_reference.py", "tests/test_sharing.py", "tests/test_prefix_cache.py",
                             "tests/test_swap.py", "tests/test_beam_search.py", "tests/test_scheduler_policy.py",
                             "tests/test_scheduler_state_machine.py", "tests/test_waste.py", *RESERVE_TESTS],
    "model/attention": ["tests/test_attention.py", "tests/test_attention_rows.py", "tests/test_engine_reference.py",
                        "tests/test_triton_attention.py"],
}
KILLED = {1, 3}  # pytest failed (3: an internal error, as a mutant may cause)
SURVIVED = {0}
NO_TESTS = {5, 33}  # no selected test runs the function
TIMEOUT = {-24, 24, 152, 255, 36}


def status(exit_code: int | None) -> str:
    for name, codes in (("killed", KILLED), ("survived", SURVIVED), ("no tests", NO_TESTS), ("timeout", TIMEOUT)):
        if exit_code in codes:
            return name
    return f"other ({exit_code})"


def copy_repository(dest: Path) -> None:
    """The working tree's files that git tracks or would track (untracked, not ignored) into `dest`."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def configure(dest: Path, module: str) -> None:
    config = {
        "source_paths": ["pagedllama"],
        "only_mutate": [f"pagedllama/{module}.py"],
        "pytest_add_cli_args_test_selection": TESTS[module],
        "pytest_add_cli_args": ["--hypothesis-profile=mutation"],
        "also_copy": ["bench", "tools", "sharegpt-filtered.json"],
        "process_isolation": "fork",  # torch runs single-threaded (OMP_NUM_THREADS=1): safe to fork
        "timeout_multiplier": 3.0,  # a mutant looping forever is stopped at 6x its tests' CPU time
    }
    lines = ["", "[tool.mutmut]"] + [f"{key} = {json.dumps(value)}" for key, value in config.items()]
    with open(dest / "pyproject.toml", "a") as f:
        f.write("\n".join(lines) + "\n")


def run_module(module: str, workdir: Path) -> dict:
    dest = workdir / module
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    copy_repository(dest)
    configure(dest, module)
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    mutmut = Path(sys.executable).parent / "mutmut"
    start = time.monotonic()
    with open(dest / "mutmut.log", "w") as log:
        done = subprocess.run([str(mutmut), "run", "--max-children", "1"], cwd=dest, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    seconds = time.monotonic() - start
    meta = dest / "mutants" / "pagedllama" / f"{module}.py.meta"
    if done.returncode or not meta.is_file():
        sys.exit(f"mutmut failed on {module} (exit {done.returncode}); see {dest / 'mutmut.log'}")
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    counts: dict[str, int] = {}
    for code in codes.values():
        counts[status(code)] = counts.get(status(code), 0) + 1
    not_killed = sorted(name for name, code in codes.items() if status(code) not in ("killed", "timeout"))
    write_survivors(dest, module, not_killed, codes)
    killed = counts.get("killed", 0) + counts.get("timeout", 0)
    return {"mutants": len(codes), "counts": counts, "killed_share": killed / len(codes) if codes else 1.0,
            "not_killed": not_killed, "seconds": round(seconds), "tests": TESTS[module]}


def write_survivors(dest: Path, module: str, names: list[str], codes: dict) -> None:
    """Each mutant the tests did not kill, with its diff (mutmut's own rendering)."""
    os.chdir(dest)  # mutmut reads its configuration and mutants from the working directory
    try:
        from mutmut.configuration import reset_config
        from mutmut.mutation.diff_apply import get_diff_for_mutant

        reset_config()
        with open("survivors.txt", "w") as f:
            for name in names:
                f.write(f"# {name}: {status(codes[name])}\n")
                f.write(get_diff_for_mutant(name, path=Path("pagedllama") / f"{module}.py") + "\n\n")
    finally:
        os.chdir(ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", default=list(TESTS), help=f"any of {', '.join(TESTS)} (default: all)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "build" / "mutation")
    args = parser.parse_args()
    unknown = [m for m in args.modules if m not in TESTS]
    if unknown:
        parser.error(f"unknown module {unknown[0]!r}; choose from {', '.join(TESTS)}")
    if importlib.util.find_spec("mutmut") is None:
        sys.exit(f"mutmut is not installed: pip install mutmut=={MUTMUT_VERSION}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    summary_path = args.workdir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    for module in args.modules:
        print(f"{module}: mutating pagedllama/{module}.py against {len(TESTS[module])} test files ...", flush=True)
        summary[module] = result = run_module(module, args.workdir)
        print(f"  {result['mutants']} mutants, {result['counts']}, killed {100 * result['killed_share']:.1f}% "
              f"in {result['seconds']} s; survivors: {args.workdir / module / 'survivors.txt'}", flush=True)
        summary_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
