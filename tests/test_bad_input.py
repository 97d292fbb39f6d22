"""Bad input of every kind ends in one `error:` line that names the problem and the fix.

The table runs each command's `main` in-process (fast); a few cases then go through a real
`llama3-paged.py` subprocess to show that no traceback reaches the terminal (and that
`--debug` does show one). Exit status: 2 for command-line usage errors (a bad flag or value),
1 for everything else (missing or damaged files, data, memory). The last section holds the
safety checks: pickles are loaded with `weights_only=True`, safetensors beat pickles, and the
Hugging Face token never appears in the download command's output.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from huggingface_hub import errors as hub_errors
from safetensors.torch import load_file, save_file

import flash_attn_standin
from conftest import chats, write_byte_checkpoint
from pagedllama import host_memory
from pagedllama.app import cli
from pagedllama.errors import UserError
from pagedllama.io import download
from pagedllama.io.checkpoint import detect_format, load_checkpoint
from pagedllama.model.backends import select_backend
from pagedllama.model.config import NAMED_SHAPES

ROOT = Path(__file__).resolve().parent.parent
GPT2_CONFIG = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 64, "n_head": 4,
               "n_layer": 2, "vocab_size": 512, "n_positions": 1024}  # as GPT-2's config.json has it


class NotOneLine(AssertionError):
    """stderr is not exactly one `error: ...` line."""


class WrongMessage(AssertionError):
    """The error line lacks a word naming the problem or the fix."""


@dataclass
class Workspace:
    """Tiny valid inputs, made once; cases copy and damage them under their own tmp_path."""

    root: Path
    meta: Path  # params.json + consolidated.00.pth + tokenizer.model
    hf: Path  # config.json + model.safetensors + tokenizer.model
    data: Path  # 4 short conversations

    def copy(self, src: Path, dest: Path) -> Path:
        dest.mkdir(parents=True)
        for f in src.iterdir():
            (dest / f.name).write_bytes(f.read_bytes())
        return dest


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("bad_input")
    for fmt in ("meta", "hf"):
        write_byte_checkpoint(root / fmt, fmt)
    (root / "data.json").write_text(json.dumps(chats(("hi", "ok"), ("hello there", "yes"), ("why?", "because"),
                                                     ("2+2?", "4"))))
    return Workspace(root, root / "meta", root / "hf", root / "data.json")


@dataclass
class Env:
    ws: Workspace
    tmp: Path
    monkeypatch: pytest.MonkeyPatch

    def run_flags(self, model: Path | str, *extra: str) -> list[str]:
        """A tiny generation run: what the model-loading cases add to their own flags."""
        return ["--model", str(model), "--data", str(self.ws.data), "--max-seq-len", "64", "--max-new-tokens", "2",
                "--no-progress", "--no-answers", *extra]


@dataclass
class Case:
    id: str
    command: str  # "paged", "naive", "compare", "download", or "call" (build returns a function to run)
    build: Callable[[Env], list[str] | Callable[[], int]]
    status: int
    keywords: list[str]
    marks: list = field(default_factory=list)


# --- the inputs each case damages ----------------------------------------------------------------

def damaged(env: Env, src: str, name: str, edit: Callable[[Path], None]) -> Path:
    d = env.ws.copy(getattr(env.ws, src), env.tmp / name)
    edit(d)
    return d


def truncate_pth(d: Path) -> None:
    f = d / "consolidated.00.pth"
    f.write_bytes(f.read_bytes()[:2000])


def corrupt_safetensors(d: Path) -> None:
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\xff" * 32  # the JSON header
    f.write_bytes(bytes(data))


def wrong_shape(d: Path) -> None:
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 100)
    save_file(tensors, d / "model.safetensors")


def drop_lm_head(d: Path) -> None:
    """An untied model's output matrix missing: not to be replaced by the embedding."""
    assert json.loads((d / "config.json").read_text())["tie_word_embeddings"] is False
    tensors = load_file(d / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, d / "model.safetensors")


def drop_layer(d: Path) -> None:
    sd = torch.load(d / "consolidated.00.pth", weights_only=True)
    torch.save({k: v for k, v in sd.items() if not k.startswith("layers.1.")}, d / "consolidated.00.pth")


def gpt2_dir(env: Env) -> Path:
    d = env.tmp / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(GPT2_CONFIG))
    save_file({"wte.weight": torch.zeros(512, 64)}, d / "model.safetensors")
    return d


def little_host_memory(env: Env, argv: list[str], available: int = 2**20) -> list[str]:
    """`argv`, run on a machine said to have `available` bytes of memory available."""
    env.monkeypatch.setattr(host_memory, "available_bytes", lambda: available)
    return argv


def write(env: Env, name: str, content: str | bytes) -> Path:
    path = env.tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


# A sentencepiece model (Llama 1/2) starts with protobuf bytes like these.
SENTENCEPIECE = b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02\n\x0c\n\x03<s>\x15\x00\x00\x00\x00\x18\x03\x80\xfe"


def flash_attn_block_size_16(env: Env) -> Callable[[], int]:
    """flash-attn's page-size rule, checked where the backend is picked: a fake CUDA device and the
    stand-in `flash_attn` module (the real one needs a GPU), through the CLI's error reporting."""
    env.monkeypatch.setitem(sys.modules, "flash_attn", flash_attn_standin)
    return lambda: cli.run_reporting_errors(
        lambda: select_backend("flash-attn", torch.device("cuda"), torch.bfloat16, 16, 8192), debug=False)


K = "--kv-cache-gb"
LONG = ("w" * 99, "a")  # 99 bytes, 99 tokens of the byte-level tokenizer: more than --max-seq-len 64
CASES = [
    # checkpoint directory
    Case("model-dir-missing", "paged", lambda e: ["2", *e.run_flags(e.tmp / "nope")], 1,
         ["does not exist", "python -m pagedllama.download"]),
    Case("model-dir-missing-naive", "naive", lambda e: ["2", *e.run_flags(e.tmp / "nope")], 1,
         ["does not exist", "--model demo"]),
    Case("model-dir-empty", "paged", lambda e: ["2", *e.run_flags(e.tmp)], 1, ["is empty", "download"]),
    Case("model-is-a-file", "paged", lambda e: ["2", *e.run_flags(e.ws.data)], 1,
         ["not a directory", "folder holding the checkpoint"]),
    Case("params-json-but-no-weights", "paged",
         lambda e: ["2", *e.run_flags(damaged(e, "meta", "m", lambda d: (d / "consolidated.00.pth").unlink()))], 1,
         ["params.json but no consolidated", "re-download"]),
    Case("truncated-pth", "paged", lambda e: ["2", *e.run_flags(damaged(e, "meta", "m", truncate_pth))], 1,
         ["consolidated.00.pth", "truncated or corrupt", "re-download"]),
    Case("corrupt-safetensors", "paged", lambda e: ["2", *e.run_flags(damaged(e, "hf", "m", corrupt_safetensors))],
         1, ["model.safetensors", "truncated or corrupt", "re-download"]),
    Case("tensor-of-wrong-shape", "paged", lambda e: ["2", *e.run_flags(damaged(e, "hf", "m", wrong_shape))], 1,
         ["model.layers.0.mlp.down_proj.weight", "(64, 100)", "(64, 192)", "re-download"]),
    Case("missing-lm-head-untied", "paged", lambda e: ["2", *e.run_flags(damaged(e, "hf", "m", drop_lm_head))], 1,
         ["lacks tensor lm_head.weight", "incomplete", "re-download"]),
    Case("missing-layer", "naive", lambda e: ["2", *e.run_flags(damaged(e, "meta", "m", drop_layer))], 1,
         ["lacks tensor layers.1.", "incomplete", "re-download"]),
    Case("config-of-gpt2", "paged", lambda e: ["2", *e.run_flags(gpt2_dir(e))], 1, ["gpt2", "not Llama", "--model"]),
    # tokenizer
    Case("tokenizer-not-found", "paged",
         lambda e: ["2", *e.run_flags(damaged(e, "hf", "m", lambda d: (d / "tokenizer.model").unlink()))], 1,
         ["no tokenizer found", "--tokenizer PATH"]),
    Case("tokenizer-file-missing", "paged", lambda e: ["2", *e.run_flags(e.ws.meta, "--tokenizer", "nope.model")], 1,
         ["nope.model does not exist", "--tokenizer"]),
    Case("tokenizer-not-tiktoken", "paged",
         lambda e: ["2", *e.run_flags(e.ws.meta, "--tokenizer", str(write(e, "sp.model", SENTENCEPIECE)))], 1,
         ["not a Llama 3 tiktoken", "sentencepiece", "--tokenizer"]),
    Case("tokenizer-larger-than-model", "paged",
         lambda e: ["2", *e.run_flags(e.ws.meta, "--tokenizer", str(ROOT / "pagedllama/io/demo/tokenizer.model"))], 1,
         ["4352 tokens", "only 512", "the model's own tokenizer"]),
    # data
    Case("data-missing", "paged", lambda e: ["2", *e.run_flags(e.ws.meta), "--data", str(e.tmp / "no.json")], 1,
         ["no.json does not exist", "--data PATH"]),
    Case("data-missing-naive", "naive", lambda e: ["2", "--data", str(e.tmp / "no.json")], 1,
         ["does not exist", "pagedllama.download --sharegpt"]),
    Case("data-not-json", "paged", lambda e: ["2", "--data", str(write(e, "d.json", "[{oops"))], 1,
         ["not valid JSON", "line 1 column", "--data"]),
    Case("data-json-not-a-list", "paged", lambda e: ["2", "--data", str(write(e, "d.json", '{"a": 1}'))], 1,
         ["dict, not a list", "--data"]),
    Case("data-without-human-turn", "paged",
         lambda e: ["1", "--data", str(write(e, "d.json", json.dumps(
             [{"conversations": [{"from": "gpt", "value": "hello"}]}, {"conversations": []}])))], 1,
         ["no usable conversation", "human", "--data"]),
    Case("prompt-longer-than-max-seq-len", "paged",
         lambda e: ["1", *e.run_flags(e.ws.meta), "--data", str(write(e, "d.json", json.dumps(chats(LONG))))],
         1, ["leaves no room", "--max-seq-len 64", "raise --max-seq-len"]),
    # batch size
    Case("batch-size-0", "paged", lambda e: ["0"], 2, ["BATCH_SIZE", "positive"]),
    Case("batch-size-negative", "naive", lambda e: ["-3"], 2, ["BATCH_SIZE", "positive"]),
    Case("batch-size-not-a-number", "paged", lambda e: ["many"], 2, ["'many'", "whole number"]),
    Case("batch-size-missing", "paged", lambda e: [], 2, ["give BATCH_SIZE", "--find-max-batch"]),
    Case("batch-larger-than-dataset", "paged", lambda e: ["5", *e.run_flags(e.ws.meta)], 2,
         ["batch size 5 exceeds the 4 usable", "smaller batch", "larger --data"]),
    Case("batch-larger-than-dataset-naive", "naive", lambda e: ["9", *e.run_flags(e.ws.hf)], 2,
         ["exceeds the 4 usable"]),
    Case("n-and-beam-width", "paged", lambda e: ["2", "--n", "2", "--beam-width", "2"], 2,
         ["--n and --beam-width", "exclude"]),
    # block size and backend
    Case("block-size-0", "paged", lambda e: ["2", "--block-size", "0"], 2, ["--block-size", "positive"]),
    Case("block-size-above-max-seq-len", "paged", lambda e: ["2", *e.run_flags(e.ws.meta, "--block-size", "128")],
         2, ["--block-size 128", "--max-seq-len 64", "at most 64"]),
    Case("flash-attn-on-cpu", "paged", lambda e: ["2", *e.run_flags(e.ws.meta, "--attention", "flash-attn",
                                                                      "--device", "cpu")], 2,
         ["needs a CUDA GPU", "--attention torch"]),
    Case("flash-attn-block-size-16", "call", flash_attn_block_size_16, 2,
         ["multiple of 256", "not 16", "--block-size 256", "--attention triton"]),
    Case("attention-unknown", "paged", lambda e: ["2", *e.run_flags(e.ws.meta, "--attention", "xformers")], 2,
         ["'xformers'", "choose one of"]),
    Case("device-cuda-without-gpu", "paged", lambda e: ["2", "--device", "cuda"], 2,
         ["no CUDA GPU", "--device cpu"],
         [pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible here")]),
    Case("device-unknown", "paged", lambda e: ["2", "--device", "tpu"], 2, ["'tpu'", "auto, cpu or cuda"]),
    Case("cuda-graphs-on-cpu", "paged", lambda e: ["2", *e.run_flags(e.ws.meta, "--cuda-graphs", "--device", "cpu")],
         2, ["--cuda-graphs needs a CUDA GPU", "--attention triton"]),
    Case("threads-0", "paged", lambda e: ["2", "--threads", "0"], 2, ["--threads", "positive integer"]),
    Case("threads-negative", "naive", lambda e: ["2", "--threads", "-2"], 2, ["--threads", "positive integer"]),
    # KV budget
    Case("kv-budget-too-small-paged", "paged", lambda e: ["2", *e.run_flags(e.ws.meta, K, "0.00001")], 1,
         ["cannot hold even the longest request", K]),
    Case("kv-budget-too-small-naive", "naive", lambda e: ["2", *e.run_flags(e.ws.meta, K, "0.00001")], 1,
         ["too small for even one 64-token preallocation", K, "--max-seq-len"]),
    Case("kv-budget-negative", "paged", lambda e: ["2", K, "-1"], 2, ["-1", "positive size in GB"]),
    Case("kv-budget-absurd", "naive", lambda e: ["2", K, "1e9"], 2, ["not a usable budget", "GB"]),
    Case("kv-budget-nan", "paged", lambda e: ["2", K, "nan"], 2, ["nan", "positive size in GB"]),
    # capacity planning
    Case("simulate-unknown-name", "paged", lambda e: ["2", "--simulate", "llama9-1t", "--gpu-memory-gb", "24"], 1,
         ["unknown model shape 'llama9-1t'", *NAMED_SHAPES, "params.json / config.json"]),
    Case("simulate-config-of-gpt2-dir", "paged",
         lambda e: ["2", "--simulate", str(gpt2_dir(e)), "--gpu-memory-gb", "24"], 1, ["gpt2", "not Llama"]),
    Case("simulate-config-not-llama-file", "naive",
         lambda e: ["2", "--simulate", str(write(e, "config.json", json.dumps(
             {**GPT2_CONFIG, "hidden_size": 64, "num_attention_heads": 4}))), "--gpu-memory-gb", "24"], 1,
         ["gpt2", "not Llama"]),
    Case("simulate-without-gpu-size", "paged", lambda e: ["2", "--simulate", "llama3-8b"], 2,
         ["--gpu-memory-gb", "--kv-cache-gb"]),
    Case("gpu-memory-gb-without-simulate", "paged", lambda e: ["2", "--gpu-memory-gb", "24"], 2,
         ["--gpu-memory-gb", "only applies with --simulate"]),
    Case("gpu-memory-gb-absurd", "paged", lambda e: ["2", "--simulate", "llama3-8b", "--gpu-memory-gb", "-8"], 2,
         ["--gpu-memory-gb -8", "e.g. 24"]),
    Case("tensor-parallel-size-0", "paged", lambda e: ["2", "--simulate", "llama3-70b", "--gpu-memory-gb", "80",
                                                      "--tensor-parallel-size", "0"], 2,
         ["--tensor-parallel-size", "positive integer"]),
    Case("tensor-parallel-size-negative", "naive", lambda e: ["2", "--simulate", "llama3-70b", "--gpu-memory-gb", "80",
                                                             "--tensor-parallel-size", "-4"], 2,
         ["--tensor-parallel-size", "positive integer"]),
    Case("tensor-parallel-size-not-dividing-kv-heads", "paged",
         lambda e: ["2", "--simulate", "llama3-70b", "--gpu-memory-gb", "80", "--tensor-parallel-size", "3"], 2,
         ["--tensor-parallel-size 3 does not divide", "8 KV heads", "1, 2, 4, 8"]),
    Case("tensor-parallel-budget-per-gpu-negative", "paged",
         lambda e: ["2", "--simulate", "llama3-70b", "--gpu-memory-gb", "24", "--tensor-parallel-size", "2"], 1,
         ["no memory left for the KV cache on each GPU", "more GPUs (--tensor-parallel-size)"]),
    Case("tensor-parallel-not-dividing-the-demo-heads", "paged", lambda e: ["2", "--tensor-parallel-size", "4"], 2,
         ["--tensor-parallel-size 4 does not divide", "2 KV heads", "use one of 1, 2"]),
    Case("tensor-parallel-nccl-without-cuda", "naive",
         lambda e: ["2", "--tensor-parallel-size", "2", "--device", "cuda"], 2, ["no CUDA GPU is visible"],
         [pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")]),
    Case("max-seq-len-absurd", "paged", lambda e: ["2", "--max-seq-len", "1000000000"], 2,
         ["--max-seq-len 1000000000", "at most 1048576"]),
    # the tiny model's prefill activations are allowed 13 MiB: 16 MiB holds them, not a 10 MiB pool beside them
    Case("kv-pool-beyond-host-memory", "paged", lambda e: little_host_memory(e, ["2", *e.run_flags(e.ws.meta),
                                                                                "--kv-cache-gb", "0.01"], 2**24), 1,
         ["MB KV cache and 13.00 MB of prefill activations do not fit in the 16.00 MB", "--kv-cache-gb"]),
    Case("weights-beyond-host-memory", "paged",
         lambda e: little_host_memory(e, ["2", *e.run_flags(e.ws.meta)], available=1000), 1,
         ["weights take", "in float32", "1000 B of memory available", "--dtype bfloat16"]),
    Case("bf16-weights-beyond-host-memory", "naive",
         lambda e: little_host_memory(e, ["2", *e.run_flags(e.ws.hf), "--dtype", "bfloat16"], available=1000), 1,
         ["weights take", "in bfloat16", "a smaller model"]),
    Case("naive-rows-beyond-host-memory", "naive", lambda e: little_host_memory(e, ["3", *e.run_flags(e.ws.meta),
                                                                                   "--max-seq-len", "4096"], 2**24), 1,
         ["6.00 MB KV cache and", "do not fit", "the batch size"]),
    # output paths
    Case("output-dir-missing", "paged", lambda e: ["2", *e.run_flags(e.ws.meta, "--output", str(e.tmp / "x/o.jsonl"))],
         1, ["--output", "does not exist"]),
    Case("json-dir-missing", "paged", lambda e: ["2", *e.run_flags(e.ws.meta, "--json", str(e.tmp / "x/o.json"))],
         1, ["--json", "does not exist"]),
    Case("json-is-a-directory", "paged", lambda e: ["2", *e.run_flags(e.ws.meta, "--json", str(e.tmp))],
         1, ["--json", "cannot write it", "is a directory"]),
    Case("output-parent-is-a-file", "naive",
         lambda e: ["2", *e.run_flags(e.ws.meta, "--output", str(write(e, "f", "") / "o.jsonl"))],
         1, ["--output", "is a file, not a directory"]),
    # download
    Case("download-no-repo-id", "download", lambda e: [], 2, ["REPO_ID", "--sharegpt", "--help"]),
    Case("download-repo-id-and-sharegpt", "download", lambda e: ["meta-llama/x", "--sharegpt"], 2,
         ["either REPO_ID or --sharegpt"]),
    Case("download-num-not-a-number", "download", lambda e: ["--sharegpt", "--num", "lots"], 2,
         ["--num", "'lots' is not a whole number"]),
    # compare
    Case("compare-no-batch-size", "compare", lambda e: ["--no-plots"], 2, ["give BATCH_SIZE"]),
    Case("compare-batch-size-0", "compare", lambda e: ["0", "--no-plots"], 2, ["BATCH_SIZE", "positive"]),
    Case("compare-model-dir-missing", "compare", lambda e: ["2", *e.run_flags(e.tmp / "nope"), "--no-plots"], 1,
         ["does not exist", "--model demo"]),
    Case("compare-data-not-json", "compare", lambda e: ["2", "--data", str(write(e, "d.json", "nope")), "--no-plots"],
         1, ["not valid JSON", "--data"]),
    Case("compare-plots-dir-is-a-file", "compare",
         lambda e: ["2", "--dry-run", "--plots-dir", str(write(e, "plots", ""))], 1,
         ["--plots-dir", "cannot create it", "--no-plots"]),
    Case("compare-simulate-unknown-name", "compare", lambda e: ["2", "--simulate", "gpt-5", "--no-plots"], 1,
         ["unknown model shape", "llama3-8b"]),
]


def run_main(command: str, args) -> int:
    """A command's main in-process; argparse's exit becomes the status."""
    try:
        if command == "call":
            return args()
        if command == "download":
            return download.main(args)
        if command == "compare":
            from pagedllama.app import compare
            return compare.main(args)
        return cli.main(command, args)
    except SystemExit as e:
        return e.code


def check_error_output(out: str, err: str, status: int, expected_status: int, keywords: list[str]) -> str:
    assert "Traceback" not in out + err
    assert status == expected_status, (status, err)
    lines = err.splitlines()
    if len(lines) != 1 or not lines[0].startswith("error: "):
        raise NotOneLine(f"stderr is not one 'error: ' line:\n{err}")
    missing = [k for k in keywords if k.lower() not in lines[0].lower()]
    if missing:
        raise WrongMessage(f"{missing} not in: {lines[0]}")
    return lines[0]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_is_one_error_line(case: Case, ws, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # nothing a case writes lands in the repo
    (tmp_path / "case").mkdir()
    args = case.build(Env(ws, tmp_path / "case", monkeypatch))
    status = run_main(case.command, args)
    out, err = capsys.readouterr()
    check_error_output(out, err, status, case.status, case.keywords)


def test_enough_cases():
    assert len(CASES) >= 24 and len({c.id for c in CASES}) == len(CASES)
    assert {c.command for c in CASES} >= {"paged", "naive", "download", "compare"}


def test_unwritable_output_fails_before_the_run_and_spares_existing_files(ws, tmp_path, monkeypatch, capsys):
    env = Env(ws, tmp_path, monkeypatch)
    assert cli.main("paged", ["2", *env.run_flags(ws.meta, "--json", str(tmp_path))]) == 1
    out, err = capsys.readouterr()
    assert "report" not in out and "generating" not in err  # nothing ran
    # the check writes nothing: an existing file keeps its content when the run then fails
    old = tmp_path / "old.json"
    old.write_text("keep me")
    assert cli.main("naive", ["99", *env.run_flags(ws.meta, "--json", str(old))]) == 2
    assert "usable conversations" in capsys.readouterr().err and old.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"]  # no probe file left behind


def test_a_checkpoint_run_says_what_it_loads_before_loading(ws, tmp_path, monkeypatch, capsys):
    from pagedllama.io import loading

    printed_before = []
    load_weights = loading.load_weights
    monkeypatch.setattr(loading, "load_weights",
                        lambda *a: (printed_before.append(capsys.readouterr().out), load_weights(*a))[1])
    assert cli.main("paged", ["2", *Env(ws, tmp_path, monkeypatch).run_flags(ws.hf)]) == 0
    assert printed_before[0].startswith(f"loading {ws.hf}: 0.00B parameters, ") and "in float32" in printed_before[0]


def test_weights_checked_against_free_gpu_memory(monkeypatch):
    """On CUDA the weights are checked against the GPU's free memory (torch.cuda.mem_get_info)."""
    from pagedllama.io.loading import check_weights_fit

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (12 * 2**30, 24 * 2**30))
    def bf16_bytes(shape: str) -> int:
        return NAMED_SHAPES[shape].num_params() * 2

    check_weights_fit(bf16_bytes("llama3.2-3b"), torch.device("cuda"), torch.bfloat16)  # 6.4 GB: fits
    with pytest.raises(UserError, match=r"take 14\.96 GB in bfloat16 but this machine has 12\.00 GB free on the GPU"):
        check_weights_fit(bf16_bytes("llama3-8b"), torch.device("cuda"), torch.bfloat16)


def test_a_failed_host_allocation_is_one_line():
    with pytest.raises(RuntimeError) as info:  # PyTorch's CPU allocator refuses 4 EiB on any machine
        torch.empty(2**62, dtype=torch.uint8)
    message, status = cli.describe_error(info.value)
    assert status == 1 and message.startswith("out of memory: could not allocate") and "--max-seq-len" in message


def test_debug_reraises_for_the_traceback(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        cli.main("paged", ["2", "--model", str(tmp_path / "nope"), "--debug"])


@pytest.mark.parametrize("block_size", ["3", "5", "48"])
def test_block_size_need_not_be_a_power_of_two(ws, tmp_path, capsys, block_size):
    """Not an error: the paged cache, the torch backend and the Triton kernel take any block size;
    only flash-attn restricts it (multiples of 256, the case above)."""
    env = Env(ws, tmp_path, None)
    status = cli.main("paged", ["3", *env.run_flags(ws.hf, "--block-size", block_size, "--json",
                                                     str(tmp_path / "o.json"))])
    out, err = capsys.readouterr()
    assert status == 0 and err == "", err
    assert f"blocks of {block_size}" in out and "Fragmented Memory:" in out
    doc = json.loads((tmp_path / "o.json").read_text())
    assert len(doc["requests"]) == 3 and all(r["output_tokens"] == 2 for r in doc["requests"])


# --- through a real terminal-facing process ----------------------------------------------------

SUBPROCESS = {
    "model-dir-missing": (["2", "--model", "{tmp}/nope"], 1, "does not exist"),
    "data-not-json": (["2", "--data", "{tmp}/bad.json"], 1, "not valid JSON"),
    "kv-budget-negative": (["2", "--kv-cache-gb", "-1"], 2, "positive size in GB"),
    "debug": (["2", "--model", "{tmp}/nope", "--debug"], 1, None),
}


@pytest.fixture(scope="module")
def subprocess_results(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every subprocess case at once: the cost is Python and torch starting up, which overlaps."""
    tmp = tmp_path_factory.mktemp("subprocess")
    (tmp / "bad.json").write_text("{not json")
    procs = {}
    for name, (argv, _, _) in SUBPROCESS.items():
        argv = [a.replace("{tmp}", str(tmp)) for a in argv]
        procs[name] = subprocess.Popen([sys.executable, str(ROOT / "llama3-paged.py"), *argv, "--no-progress"],
                                       cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    for name, p in procs.items():
        out, err = p.communicate(timeout=120)
        results[name] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    return results


@pytest.mark.parametrize("name", [n for n in SUBPROCESS if n != "debug"])
def test_no_traceback_reaches_the_terminal(subprocess_results, name):
    _, status, keyword = SUBPROCESS[name]
    r = subprocess_results[name]
    check_error_output(r.stdout, r.stderr, r.returncode, status, [keyword])


def test_debug_traceback_reaches_the_terminal(subprocess_results):
    r = subprocess_results["debug"]
    assert r.returncode == 1
    assert "Traceback (most recent call last)" in r.stderr
    assert "UserError: model directory" in r.stderr.splitlines()[-1]


# --- safety --------------------------------------------------------------------------------------

def test_torch_load_always_uses_weights_only():
    """A pickle can run code when loaded; weights_only=True refuses anything but tensors and containers."""
    calls = []
    for path in sorted((ROOT / "pagedllama").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "torch":
                assert "load" not in {a.name for a in node.names}, f"{path.name}: import torch.load by name"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr == "load" and isinstance(node.func.value, ast.Name):
                assert node.func.value.id not in ("pickle", "dill", "cPickle"), f"{path.name}:{node.lineno}"
                if node.func.value.id == "torch":
                    kw = {k.arg: k.value for k in node.keywords}
                    assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, \
                        f"{path.name}:{node.lineno}: torch.load without weights_only=True"
                    calls.append(f"{path.name}:{node.lineno}")
    assert calls, "no torch.load found: the check looks in the wrong place"


def test_safetensors_preferred_over_pth_in_the_same_directory(tmp_path):
    meta_sd, hf_sd = write_byte_checkpoint(tmp_path, "meta", seed=1), write_byte_checkpoint(tmp_path, "hf", seed=2)
    assert (tmp_path / "consolidated.00.pth").is_file() and (tmp_path / "model.safetensors").is_file()
    assert detect_format(tmp_path) == "hf"
    _, loaded = load_checkpoint(tmp_path)
    assert torch.equal(loaded["tok_embeddings.weight"], hf_sd["tok_embeddings.weight"])
    assert not torch.equal(loaded["tok_embeddings.weight"], meta_sd["tok_embeddings.weight"])


@pytest.mark.parametrize("fmt", ["meta", "hf"])
def test_shape_mismatch_names_the_tensor(ws, tmp_path, fmt):
    d = ws.copy(getattr(ws, fmt), tmp_path / fmt)
    if fmt == "hf":
        wrong_shape(d)
        names = ["model.layers.0.mlp.down_proj.weight", "layers.0.feed_forward.w2.weight"]
    else:
        sd = torch.load(d / "consolidated.00.pth", weights_only=True)
        sd["layers.1.attention.wk.weight"] = torch.zeros(8, 64)
        torch.save(sd, d / "consolidated.00.pth")
        names = ["layers.1.attention.wk.weight"]
    with pytest.raises(UserError) as e:
        load_checkpoint(d)
    assert all(n in str(e.value) for n in names) and "has shape" in str(e.value)


TOKEN = "hf_secretSecretDoNotPrint0123456789"


def _hub_error(cls, status: int | None = None) -> Exception:
    """A huggingface_hub error whose message quotes the token, as a careless one might."""
    error = cls.__new__(cls)
    Exception.__init__(error, f"{status} Client Error for url (Authorization: Bearer {TOKEN})")
    error.response = SimpleNamespace(status_code=status, headers={"authorization": f"Bearer {TOKEN}"})
    return error


TOKEN_ERRORS = {
    "gated": _hub_error(hub_errors.GatedRepoError, 403),
    "not-found": _hub_error(hub_errors.RepositoryNotFoundError, 404),
    "http-401": _hub_error(hub_errors.HfHubHTTPError, 401),
    "http-403": _hub_error(hub_errors.HfHubHTTPError, 403),
    "http-500": _hub_error(hub_errors.HfHubHTTPError, 500),
    "entry-not-found": _hub_error(hub_errors.EntryNotFoundError),
    "offline": hub_errors.LocalEntryNotFoundError(f"not cached; token {TOKEN}"),
    "connection": ConnectionError(f"connection reset (token {TOKEN})"),
    "http-dropped": hub_errors.HTTPError(f"read timed out with token {TOKEN}"),
    "bad-repo-id": hub_errors.HFValidationError(f"bad id, token {TOKEN}"),
    "oserror-no-strerror": OSError(f"disk trouble near {TOKEN}"),
    "unexpected": RuntimeError(f"something odd happened with {TOKEN}"),
}


@pytest.mark.parametrize("target", ["model", "sharegpt"])
@pytest.mark.parametrize("error", list(TOKEN_ERRORS.values()), ids=list(TOKEN_ERRORS))
def test_hf_token_never_printed_by_download(monkeypatch, capsys, tmp_path, target, error):
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    def fail(*args, **kwargs):
        raise error
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    argv = ["meta-llama/Meta-Llama-3-8B", "--dir", str(tmp_path / "m")] if target == "model" else \
        ["--sharegpt", "--out", str(tmp_path / "s.json")]
    status = run_main("download", argv)
    out, err = capsys.readouterr()
    assert TOKEN not in out + err
    check_error_output(out, err, status, 1, [])


@pytest.mark.parametrize("argv", [[], ["--format", "gguf", "x/y"], ["--num", "0", "--sharegpt"]])
def test_hf_token_never_printed_by_download_usage_errors(monkeypatch, capsys, argv):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    status = run_main("download", argv)
    out, err = capsys.readouterr()
    assert TOKEN not in out + err
    check_error_output(out, err, status, 2, ["--help"])
