"""Llama 3 weights from disk: Meta's `consolidated.*.pth`, Hugging Face safetensors, or a GGUF file.

Whatever the source, the state dict handed to the model uses Meta's key names and Meta's
interleaved RoPE layout of the q/k rows, so `model.py` has a single layout to support.
Every problem a user can cause (wrong directory, partial download, corrupt file, weights of
another model) becomes a one-line `UserError` that says what to do.
"""
from __future__ import annotations

import json
import math
import pickle
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..errors import UserError
from ..model.config import ModelArgs, from_hf_config, from_meta_params
from ..model.model import Transformer
from ..model.parallel import SHARD_DIM, SINGLE, TensorParallel
from . import gguf_checkpoint

# Meta name -> Hugging Face name, inside a layer and at the top level.
_LAYER_TO_HF = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_TOP_TO_HF = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
_LAYER_FROM_HF = {hf: meta for meta, hf in _LAYER_TO_HF.items()}
_TOP_FROM_HF = {hf: meta for meta, hf in _TOP_TO_HF.items()}

_HF_WEIGHTS = (("model.safetensors", "model.safetensors.index.json"),
               ("pytorch_model.bin", "pytorch_model.bin.index.json"))
_REDOWNLOAD = "download a model with `python -m pagedllama.download REPO_ID` or use --model demo"


# ---------------------------------------------------------------------------------------------
# Finding the checkpoint


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({type(e).__name__}); re-download it") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object; re-download it")
    return data


def _meta_root(model_dir: Path) -> Path | None:
    """The folder holding params.json and the consolidated shards (Meta's layout or HF's original/)."""
    for d in (model_dir, model_dir / "original"):
        if (d / "params.json").is_file() and any(d.glob("consolidated.*.pth")):
            return d
    return None


def _hf_weight_files(model_dir: Path) -> list[Path]:
    """The HF weight files, safetensors before .bin; [] when there are none."""
    for single, index_name in _HF_WEIGHTS:
        if (model_dir / single).is_file():
            return [model_dir / single]
        index = model_dir / index_name
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise UserError(f"{index} has no weight_map; re-download it")
            files = [model_dir / str(name) for name in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise UserError(f"{index} names {missing[0]}{more}, which is missing from {model_dir}; "
                                "the download is incomplete: re-download it")
            return files
    return []


def detect_format(model_dir: Path) -> str:
    """"hf", "meta" or "gguf" (a .gguf file, or a directory holding one); HF safetensors win over Meta
    pickles, and both over a GGUF, when a directory holds several."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise UserError(f"model directory {model_dir} does not exist; {_REDOWNLOAD}")
    if not model_dir.is_dir():
        if gguf_checkpoint.gguf_file(model_dir) is not None:
            return "gguf"
        raise UserError(f"--model {model_dir} is not a directory or a .gguf file; give the folder holding "
                        "the checkpoint or a GGUF file")
    if not any(model_dir.iterdir()):
        raise UserError(f"model directory {model_dir} is empty; {_REDOWNLOAD}")
    hf_files = _hf_weight_files(model_dir) if (model_dir / "config.json").is_file() else []
    if hf_files and hf_files[0].suffix == ".safetensors":
        return "hf"
    if _meta_root(model_dir) is not None:
        return "meta"
    if hf_files:
        return "hf"
    if gguf_checkpoint.gguf_file(model_dir) is not None:
        return "gguf"
    if (model_dir / "params.json").is_file() or (model_dir / "original" / "params.json").is_file():
        raise UserError(f"{model_dir} has params.json but no consolidated.*.pth weights; "
                        "the download is incomplete: re-download it")
    if (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir} has config.json but no model.safetensors (or index) weights; "
                        "the download is incomplete: re-download it")
    raise UserError(f"{model_dir} holds no Llama checkpoint: expected config.json + model.safetensors "
                    "(Hugging Face), params.json + consolidated.*.pth (Meta) or a .gguf file")


# ---------------------------------------------------------------------------------------------
# Reading files


def _load_pth(path: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict, memory-mapped; weights_only refuses arbitrary code in the pickle."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    # What a damaged pickle or zip raises (found by tests/test_fuzz.py): torch rebuilds tensors from
    # whatever arguments the flipped bytes leave, so type and index errors surface as well.
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError, KeyError, TypeError,
            IndexError, AttributeError, OverflowError, struct.error) as e:
        raise UserError(f"cannot read {path}: the file is truncated or corrupt ({type(e).__name__}); "
                        "re-download it") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                           for k, v in sd.items()):
        raise UserError(f"{path} is not a state dict of tensors; re-download it")
    return sd


def _load_safetensors(path: Path, tp: TensorParallel) -> dict[str, torch.Tensor]:
    """The file's tensors; with several ranks, only this rank's slice of each is read."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            if tp.size == 1:
                return {k: f.get_tensor(k) for k in f.keys()}
            return {k: _read_slice(f.get_slice(k), _meta_name(k) or k, tp) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot read {path}: the file is truncated or corrupt ({type(e).__name__}); "
                        "re-download it") from None


def _read_slice(sl: Any, key: str, tp: TensorParallel) -> torch.Tensor:
    """This rank's rows or columns of a safetensors tensor, read without the rest."""
    dim = SHARD_DIM.get(key.split(".")[-2]) if key.endswith(".weight") else None
    if dim is None:
        return sl[:]
    part = tp.part(sl.get_shape()[dim])
    return sl[part] if dim == 0 else sl[:, part]


def _meta_files(root: Path) -> list[Path]:
    files = sorted(root.glob("consolidated.*.pth"))
    expected = [f"consolidated.{i:02d}.pth" for i in range(len(files))]
    if [f.name for f in files] != expected:
        raise UserError(f"{root} holds {[f.name for f in files]}, expected {expected[0]} .. {expected[-1]}; "
                        "a shard is missing or misnamed: re-download it")
    return files


def _load_meta(root: Path) -> dict[str, torch.Tensor]:
    """Merge model-parallel shards back into one state dict, in file order."""
    files = _meta_files(root)
    shards = [_load_pth(f) for f in files]
    for shard in shards:
        shard.pop("rope.freqs", None)  # Meta's precomputed RoPE table; the model computes its own
    if len(shards) == 1:
        return shards[0]
    for f, shard in zip(files[1:], shards[1:]):
        if shard.keys() != shards[0].keys():
            raise UserError(f"{f} holds other tensors than {files[0].name}; the shards are of different "
                            "checkpoints: re-download them")
    merged = {}
    for key, first in shards[0].items():
        dim = SHARD_DIM.get(key.split(".")[-2])
        try:
            merged[key] = first if dim is None else torch.cat([s[key] for s in shards], dim=dim)
        except RuntimeError:
            raise UserError(f"the shards in {root} do not fit together at {key}; they are of different "
                            "checkpoints: re-download them") from None
    return merged


def _hf_to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF stores each head's q/k rows as (all real halves, all imaginary halves) for rotate_half;
    Meta interleaves the pairs."""
    rows, dim_in = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, dim_in).transpose(1, 2).reshape(rows, dim_in)


def _meta_name(hf_key: str) -> str | None:
    stem, _, leaf = hf_key.rpartition(".")
    if leaf != "weight":
        return None
    if stem in _TOP_FROM_HF:
        return f"{_TOP_FROM_HF[stem]}.weight"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", stem)
    if m and m[2] in _LAYER_FROM_HF:
        return f"layers.{m[1]}.{_LAYER_FROM_HF[m[2]]}.weight"
    return None


def hf_name(meta_key: str) -> str:
    stem = meta_key.removesuffix(".weight")
    if stem in _TOP_TO_HF:
        return f"{_TOP_TO_HF[stem]}.weight"
    _, i, rest = stem.split(".", 2)
    return f"model.layers.{i}.{_LAYER_TO_HF[rest]}.weight"


def _tie_output(sd: dict[str, torch.Tensor], tied: bool) -> None:
    """Tied models (3.2 1B/3B) may store no output matrix: it is the embedding, shared not copied."""
    if tied and "tok_embeddings.weight" in sd:
        sd["output.weight"] = sd["tok_embeddings.weight"]


def _from_hf(tensors: dict[str, torch.Tensor], args: ModelArgs, parts: int = 1) -> dict[str, torch.Tensor]:
    sd = {}
    for key, t in tensors.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        sd[_meta_name(key) or key] = t  # unknown names stay as they are, for check_state_dict to report
    _tie_output(sd, args.tie_word_embeddings)
    check_state_dict(args, sd, hf_name, parts)  # before the permutation, which needs the right shapes
    for i in range(args.n_layers):
        for name, n in (("wq", args.n_heads), ("wk", args.n_kv_heads)):
            key = f"layers.{i}.attention.{name}.weight"
            sd[key] = _hf_to_meta_rows(sd[key], n // parts)  # a rank's rows are whole heads
    return sd


def read_config(model_dir: str | Path) -> ModelArgs:
    """The model shape a checkpoint's params.json (Meta), config.json (HF) or GGUF metadata describes."""
    model_dir = Path(model_dir)
    fmt = detect_format(model_dir)
    if fmt == "gguf":
        return gguf_checkpoint.read_gguf_config(gguf_path(model_dir))
    if fmt == "meta":
        root = _meta_root(model_dir)
        assert root is not None
        args = from_meta_params(read_json(root / "params.json"))
    else:
        args = from_hf_config(read_json(model_dir / "config.json"))
    args.validate()
    return args


def check_gguf_tensors(model: Path, args: ModelArgs) -> None:
    """A GGUF's tensors, checked against its metadata (names, shapes) and for types the loader reads,
    from the file's index alone: before anything is dequantized."""
    path = gguf_path(model)
    shapes = gguf_checkpoint.tensor_shapes(path)
    _tie_output(shapes, args.tie_word_embeddings)
    check_state_dict(args, shapes, gguf_checkpoint.file_name)
    gguf_checkpoint.check_types(path)


def gguf_path(model: Path) -> Path:
    """The GGUF file of a checkpoint `detect_format` called "gguf"."""
    path = gguf_checkpoint.gguf_file(model)
    assert path is not None
    return path


def load_checkpoint(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """Config and state dict of a checkpoint folder or GGUF file."""
    args = read_config(model_dir)
    return args, load_weights(model_dir, args, dtype)


def load_weights(model_dir: str | Path, args: ModelArgs, dtype: torch.dtype = torch.float32,
                 tp: TensorParallel = SINGLE) -> dict[str, torch.Tensor]:
    """The state dict (Meta names and RoPE layout, CPU) of a checkpoint whose config `read_config`
    gave as `args`: in the stored dtype, except a GGUF's, which is dequantized to `dtype`. With
    several ranks, this rank's slices (`TensorParallel.shard`), read alone where the format allows:
    a Meta checkpoint of exactly N files gives each rank its own file; safetensors are read slice by
    slice; other Meta shard counts are merged and re-split, a GGUF dequantized and then sliced."""
    model_dir = Path(model_dir)
    fmt = detect_format(model_dir)
    if fmt == "gguf":
        check_gguf_tensors(model_dir, args)
        sd = gguf_checkpoint.dequantized_state_dict(gguf_path(model_dir), dtype)
        _tie_output(sd, args.tie_word_embeddings)
        return shard_state_dict(sd, tp)
    if fmt == "meta":
        root = _meta_root(model_dir)
        assert root is not None
        own_file = tp.size > 1 and len(_meta_files(root)) == tp.size
        sd = _own_meta_shard(root, tp) if own_file else _load_meta(root)
        # params.json cannot say whether the embedding is tied: a checkpoint without an output matrix is
        _tie_output(sd, "output.weight" not in sd)
        check_state_dict(args, sd, parts=tp.size if own_file else 1)
        return sd if own_file else shard_state_dict(sd, tp)
    tensors: dict[str, torch.Tensor] = {}
    for f in _hf_weight_files(model_dir):
        tensors.update(shard_state_dict(_load_pth(f), tp, _meta_name) if f.suffix == ".bin"
                       else _load_safetensors(f, tp))
    return _from_hf(tensors, args, tp.size)


def _own_meta_shard(root: Path, tp: TensorParallel) -> dict[str, torch.Tensor]:
    """`consolidated.NN.pth` for this rank: Meta's model-parallel shard is its tensor-parallel slice."""
    sd = _load_pth(root / f"consolidated.{tp.rank:02d}.pth")
    sd.pop("rope.freqs", None)
    return sd


def shard_state_dict(sd: dict[str, torch.Tensor], tp: TensorParallel,
                     meta_name: Callable[[str], str | None] = lambda k: k) -> dict[str, torch.Tensor]:
    """This rank's slices of a full state dict (whose keys `meta_name` gives Meta's names of), copied
    so that the full tensors can be freed."""
    if tp.size == 1:
        return sd
    out = {k: tp.shard(meta_name(k) or k, t).clone() for k, t in sd.items()}
    if "output.weight" in sd and sd["output.weight"] is sd.get("tok_embeddings.weight"):  # tied: still one tensor
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


# ---------------------------------------------------------------------------------------------
# Checking and building


def expected_shapes(args: ModelArgs, parts: int = 1) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Meta-named state dict and its shape, in a fixed order; `parts` > 1: the shapes
    of one rank's slices when the ranks are that many."""
    q, kv, d, h = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.dim, args.hidden_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (args.vocab_size, d)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes |= {
            p + "attention.wq.weight": (q, d), p + "attention.wk.weight": (kv, d),
            p + "attention.wv.weight": (kv, d), p + "attention.wo.weight": (d, q),
            p + "feed_forward.w1.weight": (h, d), p + "feed_forward.w2.weight": (d, h),
            p + "feed_forward.w3.weight": (h, d),
            p + "attention_norm.weight": (d,), p + "ffn_norm.weight": (d,),
        }
    shapes |= {"norm.weight": (d,), "output.weight": (args.vocab_size, d)}
    if parts > 1:
        for key, shape in shapes.items():
            dim = SHARD_DIM.get(key.split(".")[-2])
            if dim is not None:
                shapes[key] = tuple(n // parts if i == dim else n for i, n in enumerate(shape))
    return shapes


def check_state_dict(args: ModelArgs, state_dict: dict[str, torch.Tensor],
                     name_in_file: Callable[[str], str] | None = None, parts: int = 1) -> None:
    """Fail with a one-line UserError unless `state_dict` is exactly the model `args` describes
    (one rank's slices of it, with `parts` ranks).

    `name_in_file`: the tensors came from files that name them otherwise (HF, GGUF), so messages also
    give that name.
    """
    def show(name: str) -> str:
        return f"{name_in_file(name)} ({name})" if name_in_file else name

    expected = expected_shapes(args, parts)
    missing = [k for k in expected if k not in state_dict]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"the checkpoint lacks tensor {show(missing[0])}{more}; it is incomplete or of another "
                        "model than its config: re-download it")
    for name, shape in expected.items():
        t = state_dict[name]
        if tuple(t.shape) != shape:
            raise UserError(f"tensor {show(name)} has shape {tuple(t.shape)}, but the config implies {shape}; "
                            "the weights and the config are of different models: re-download them")
        if not t.is_floating_point():
            raise UserError(f"tensor {show(name)} has dtype {t.dtype}; only bf16/fp16/fp32 checkpoints are "
                            "supported, not quantized ones")
    extra = [k for k in state_dict if k not in expected]
    extra_layers = [int(m[1]) for k in extra if (m := re.match(r"layers\.(\d+)\.", k))]
    if extra_layers:
        raise UserError(f"the config says {args.n_layers} layers but the checkpoint also has "
                        f"layers.{min(extra_layers)}.*; the config and the weights are of different models")
    if extra:
        raise UserError(f"the checkpoint has an unexpected tensor {extra[0]}; it is not a Llama 3 checkpoint")


def random_state_dict(args: ModelArgs, seed: int, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Deterministic weights for the demo model, tests and benchmarks; residual outputs are scaled
    down by 1/sqrt(2 n_layers) so activations stay O(1) through depth. Made on `device` in `dtype`
    (an 8B-shaped model is made on the GPU it runs on, never in host memory in float32)."""
    g = torch.Generator(device).manual_seed(seed)
    out_std = 0.02 / math.sqrt(2 * args.n_layers)
    sd = {}
    for name, shape in expected_shapes(args).items():
        if len(shape) == 1:
            sd[name] = torch.ones(shape, device=device, dtype=dtype)
        elif name == "output.weight" and args.tie_word_embeddings:
            sd[name] = sd["tok_embeddings.weight"]
        else:
            std = out_std if name.endswith(("wo.weight", "w2.weight")) else 0.02
            sd[name] = torch.randn(shape, generator=g, device=device, dtype=dtype).mul_(std)
    return sd


def build_model(args: ModelArgs, state_dict: dict[str, torch.Tensor], device: torch.device,
                dtype: torch.dtype, max_positions: int, tp: TensorParallel = SINGLE) -> Transformer:
    """The model in eval mode on `device`, its weights in `dtype` and its RoPE table in float32;
    `state_dict` holds rank `tp.rank`'s slices when there are several ranks."""
    check_state_dict(args, state_dict, parts=tp.size)
    with torch.device("meta"):  # no memory for weights that load_state_dict replaces at once
        model = Transformer(args, max_positions, tp)
    model.load_state_dict(state_dict, strict=True, assign=True)
    if state_dict["output.weight"] is state_dict["tok_embeddings.weight"]:
        model.output.weight = model.tok_embeddings.weight  # one Parameter, so .to() converts it once
    model.to(device=device, dtype=dtype)
    model.rope = model.rope.to(device)  # a plain complex64 attribute, which .to() leaves alone
    return model.eval()
