"""From --model / --tokenizer / --device / --dtype to a ready model and tokenizer."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from . import gguf_checkpoint

from .. import host_memory
from ..errors import UserError, UsageError
from ..model.config import DEFAULT_MAX_SEQ_LEN, DEMO_ARGS, DEMO_MAX_SEQ_LEN, ModelArgs
from ..model.model import Transformer
from ..model.parallel import SINGLE, TensorParallel
from ..units import human_bytes
from .checkpoint import (build_model, check_gguf_tensors, detect_format, gguf_path, load_weights, random_state_dict,
                         read_config, read_json, shard_state_dict)
from .tokenizer import Tokenizer, demo_tokenizer, find_tokenizer, load_tokenizer

DEMO = "demo"
LLAMA3_VOCAB_SIZE = 128256  # every Llama 3.x model: 128,000 BPE ranks and 256 special tokens
LLAMA_MODELS_INSTALL = "pip install llama-models==0.3.0"  # Meta's package, shipping Llama 3's tokenizer.model


@dataclass
class Loaded:
    model: Transformer
    tokenizer: Tokenizer
    args: ModelArgs
    is_demo: bool
    max_seq_len: int
    description: str


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA GPU is visible to PyTorch; use --device cpu "
                         "(or install a CUDA build of torch)")
    if name not in ("cpu", "cuda"):
        raise UsageError(f"unknown --device {name!r}; choose auto, cpu or cuda")
    return torch.device(name)


def check_weights_fit(need: int, device: torch.device, dtype: torch.dtype, tp: TensorParallel = SINGLE) -> None:
    """Fail with the fix before loading `need` bytes of weights (this rank's), not halfway through it:
    on CPU, Linux kills a process that outgrows the memory with no message at all. On CPU the ranks
    of this machine share its memory: all their shares must fit."""
    if device.type == "cuda":
        room, where = torch.cuda.mem_get_info(device)[0], "free on the GPU"
    else:
        need *= tp.local_size
        room, where = host_memory.available_bytes(), "of memory available"
        if tp.local_size > 1:
            where += f" for the {tp.local_size} ranks on it"
    if room is None or need <= room:
        return
    fix = (f"use --dtype bfloat16 ({human_bytes(need // 2)}) or a smaller model" if dtype == torch.float32
           else "use a smaller model or a machine with more memory")
    raise UserError(f"the model's weights take {human_bytes(need)} in {str(dtype).removeprefix('torch.')} but "
                    f"this machine has {human_bytes(room)} {where}; {fix}")


def installed_llama3_tokenizer() -> Path | None:
    """Llama 3's `tokenizer.model` from Meta's `llama-models` package, if it is installed.

    Found without importing the package, which would import pydantic, Pillow and more.
    """
    spec = importlib.util.find_spec("llama_models")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "llama3" / "tokenizer.model"
        if path.is_file():
            return path
    return None


def check_tokenizer_fits(tok: Tokenizer, args: ModelArgs) -> None:
    if tok.vocab_size > args.vocab_size:
        raise UserError(f"the tokenizer has {tok.vocab_size} tokens but the model only {args.vocab_size}; "
                        "they belong to different models: pass the model's own tokenizer with --tokenizer")


def checkpoint_tokenizer(model: Path, explicit: str | None) -> Tokenizer:
    """The model's tokenizer: `--tokenizer`, else the GGUF's own or the file found in the folder; with a
    Hugging Face folder's tokenizer_config.json (chat template, BOS/EOS) and generation_config.json
    (stop ids) where they exist, in the model's folder or beside the tokenizer."""
    if explicit is None and detect_format(model) == "gguf":
        return gguf_checkpoint.gguf_tokenizer(gguf_path(model))
    path = find_tokenizer(model, explicit)
    folder = model if model.is_dir() else path.parent
    configs = [folder / "tokenizer_config.json", folder / "generation_config.json"]
    tokenizer_config, generation_config = (read_json(c) if c.is_file() else {} for c in configs)
    return load_tokenizer(path).with_model_config(tokenizer_config, generation_config, str(configs[0]))


def load(model: str, tokenizer: str | None, device: torch.device, dtype: torch.dtype,
         max_seq_len: int | None, tp: TensorParallel = SINGLE) -> Loaded:
    """The demo model (random weights, made here) or a checkpoint: a directory or a GGUF file; with
    several ranks, this rank's slices of it (model/parallel.py)."""
    if model == DEMO:
        args, state = DEMO_ARGS, shard_state_dict(random_state_dict(DEMO_ARGS, seed=0), tp)
        tok = load_tokenizer(Path(tokenizer)) if tokenizer else demo_tokenizer()
        check_tokenizer_fits(tok, args)
        max_len = max_seq_len or DEMO_MAX_SEQ_LEN
        description = "built-in demo model (RANDOM WEIGHTS: answers are gibberish; memory figures are real)"
    else:
        args = read_config(model)
        tok = checkpoint_tokenizer(Path(model), tokenizer)  # before the weights: its errors come first
        check_tokenizer_fits(tok, args)
        tok.check_chat()
        weight_bytes = args.params_per_rank(tp.size) * dtype.itemsize
        check_weights_fit(weight_bytes, device, dtype, tp)
        name = str(dtype).removeprefix("torch.")
        stored = ""
        if detect_format(Path(model)) == "gguf":
            check_gguf_tensors(Path(model), args)
            stored = (f"; GGUF {gguf_checkpoint.quantization(gguf_path(Path(model)))}, dequantized to {name}: "
                      f"the KV cache and matmuls run in {name}")
        per_rank = f" per rank ({tp.size} ranks)" if tp.size > 1 else ""
        print(f"loading {model}: {args.num_params() / 1e9:.2f}B parameters, {human_bytes(weight_bytes)}{per_rank} "
              f"in {name}{stored} ...", flush=True)
        state = load_weights(model, args, dtype, tp)
        max_len = max_seq_len or DEFAULT_MAX_SEQ_LEN
        description = (f"{model} ({args.num_params() / 1e9:.2f}B parameters{stored}); prompts in "
                       f"{tok.describe_chat()}")
    if max_len < 2:
        raise UsageError(f"--max-seq-len {max_len} is too small; it must hold a prompt and an answer")
    net = build_model(args, state, device, dtype, max_positions=max_len, tp=tp)
    return Loaded(net, tok, args, model == DEMO, max_len, description)
