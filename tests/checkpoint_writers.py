"""Checkpoint writers, Meta's format and Hugging Face's: what the tests (and bench/hf_compare.py)
write random weights with, to read back through the loader. The package only reads checkpoints."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pagedllama.io.checkpoint import hf_name
from pagedllama.model.parallel import SHARD_DIM
from pagedllama.model.config import ModelArgs, from_meta_params


def meta_to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta interleaves each head's q/k rotation pairs; HF stores (all real halves, all imaginary
    halves) for rotate_half: the inverse of the loader's `_hf_to_meta_rows`."""
    rows, dim_in = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, dim_in).transpose(1, 2).reshape(rows, dim_in)


def meta_params(args: ModelArgs, multiple_of: int, ffn_dim_multiplier: float | None) -> dict[str, Any]:
    """params.json for `args`. Meta stores the FFN size as a rule, so the caller gives its inputs;
    a ValueError says when they (or the RoPE scaling) do not reproduce `args`."""
    params = {
        "dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
        "vocab_size": args.vocab_size, "multiple_of": multiple_of, "ffn_dim_multiplier": ffn_dim_multiplier,
        "norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
        "use_scaled_rope": args.rope_scaling is not None,
    }
    back = replace(from_meta_params(params), tie_word_embeddings=args.tie_word_embeddings)
    if back != args:
        raise ValueError(f"params.json cannot express {args}; it would read back as {back}")
    return params


def save_meta(state_dict: dict[str, torch.Tensor], args_params: dict[str, Any], out_dir: str | Path,
              num_shards: int = 1) -> None:
    """params.json and consolidated.NN.pth, split like Meta's model-parallel shards."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "params.json").write_text(json.dumps(args_params, indent=2))
    for i in range(num_shards):
        shard = {}
        for key, t in state_dict.items():
            dim = SHARD_DIM.get(key.split(".")[-2])
            if dim is not None:
                if t.shape[dim] % num_shards:
                    raise ValueError(f"{key} {tuple(t.shape)} does not split into {num_shards} shards")
                t = t.chunk(num_shards, dim)[i]
            # A copy, so torch.save writes this slice and not the whole storage behind it.
            shard[key] = t.clone(memory_format=torch.contiguous_format)
        torch.save(shard, out_dir / f"consolidated.{i:02d}.pth")


def save_hf(state_dict: dict[str, torch.Tensor], args: ModelArgs, out_dir: str | Path,
            max_shard_bytes: int | None = None) -> None:
    """config.json and safetensors in HF's layout (rotate_half q/k rows), sharded when asked."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, t in state_dict.items():
        if key == "output.weight" and args.tie_word_embeddings:
            continue
        if key.endswith("attention.wq.weight"):
            t = meta_to_hf_rows(t, args.n_heads)
        elif key.endswith("attention.wk.weight"):
            t = meta_to_hf_rows(t, args.n_kv_heads)
        tensors[hf_name(key)] = t.contiguous()
    rs = args.rope_scaling
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": args.dim, "intermediate_size": args.hidden_dim,
        "num_attention_heads": args.n_heads, "num_hidden_layers": args.n_layers,
        "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim, "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
        "rope_scaling": None if rs is None else {
            "rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings},
        "max_position_embeddings": 131072 if rs else 8192,
        "tie_word_embeddings": args.tie_word_embeddings,
        "torch_dtype": str(state_dict["tok_embeddings.weight"].dtype).removeprefix("torch."),
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    if max_shard_bytes is None:
        save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
        return
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, out_dir / fname, metadata={"format": "pt"})
        weight_map |= {name: fname for name in group}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
