"""Llama-architecture GGUF files (llama.cpp's format, as Ollama and LM Studio keep models): the
model's shape, its weights dequantized, and its tokenizer, all from the one file.

Read with `gguf`, llama.cpp's own reader. Weights are dequantized to the run's dtype, so the
KV cache and every matmul run in that dtype, never in the quantized format. llama.cpp's converter
has already permuted Q and K into Meta's interleaved rotary layout, the model's own, so tensors
are only renamed. Every problem a user can cause is a one-line `UserError`.
"""
from __future__ import annotations

import functools
import re
from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from ..errors import UserError
from ..model.config import ModelArgs
from .chat_template import ChatTemplate
from .tokenizer import GGUF_PRE_TOKENIZERS, Tokenizer

Q = gguf.GGMLQuantizationType
# What this loader dequantizes (through gguf.quants), each checked by tests/test_gguf.py.
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K,
                   Q.Q5_K, Q.Q6_K)
_FIX_FILE = "re-download it, or convert the model again with llama.cpp's convert_hf_to_gguf.py"

# GGUF name -> the model's (Meta's) name, at the top level and inside a block.
_TOP = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
_LAYER = {"attn_norm": "attention_norm", "attn_q": "attention.wq", "attn_k": "attention.wk",
          "attn_v": "attention.wv", "attn_output": "attention.wo", "ffn_norm": "ffn_norm",
          "ffn_gate": "feed_forward.w1", "ffn_up": "feed_forward.w3", "ffn_down": "feed_forward.w2"}
_TOP_BACK = {v: k for k, v in _TOP.items()}
_LAYER_BACK = {v: k for k, v in _LAYER.items()}
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1's scaled RoPE, as llama.cpp stores it: one divisor per channel pair


def gguf_file(path: Path) -> Path | None:
    """The GGUF file `--model` names: the file itself, or the one .gguf in a directory; None if there is none."""
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        raise UserError(f"{path} holds {len(found)} GGUF files ({', '.join(f.name for f in found[:3])}"
                        f"{', ...' if len(found) > 3 else ''}); pass the one to run: --model {found[0]}")
    return found[0] if found else None


def open_gguf(path: Path) -> gguf.GGUFReader:
    """The parsed file, read once per run: the config, the tokenizer and the weights all come from it,
    and parsing a 128k-token vocabulary takes seconds."""
    stat = path.stat()
    return _open(path.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1)
def _open(path: Path, size: int, mtime_ns: int) -> gguf.GGUFReader:
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}); check the path and its permissions") from None
    if magic != b"GGUF":
        raise UserError(f"{path} is not a GGUF file (it does not start with 'GGUF'); give a .gguf model file, or "
                        "the folder of a Meta or Hugging Face checkpoint")
    try:
        return gguf.GGUFReader(path)
    except ValueError as e:
        unknown = re.search(r"(\d+)\)? is not a valid GGMLQuantizationType", str(e))
        if unknown:
            raise UserError(f"{path} stores tensors in quantization type {unknown[1]}, which the gguf reader "
                            f"{_version()} does not know; use a GGUF quantized as one of "
                            f"{_type_names(SUPPORTED_TYPES)}") from None
        raise UserError(f"cannot read {path}: the file is truncated or corrupt ({e}); {_FIX_FILE}") from None
    except (IndexError, KeyError, OverflowError, UnicodeDecodeError, MemoryError, TypeError) as e:
        raise UserError(f"cannot read {path}: the file is truncated or corrupt ({type(e).__name__}); "
                        f"{_FIX_FILE}") from None


def _version() -> str:
    from importlib.metadata import version
    return version("gguf")


def _type_names(types: tuple) -> str:
    return ", ".join(t.name for t in types)


_MISSING: Any = object()


def _value(reader: gguf.GGUFReader, path: Path, key: str, kind: type, default: Any = _MISSING) -> Any:
    """Metadata `key` as a `kind`; `default` where it is absent (an error where there is none)."""
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise UserError(f"{path} lacks the metadata key {key}; the file is incomplete: {_FIX_FILE}")
        return default
    value = field.contents()
    if kind is float and isinstance(value, int):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"{path}: metadata {key} is {value!r:.60}, not one {kind.__name__}; this is not a Llama "
                        "model llama.cpp wrote")
    return value


def read_gguf_config(path: Path) -> ModelArgs:
    """The model's shape from the `llama.*` metadata, checked; the tensors are checked against it later."""
    r = open_gguf(path)
    arch = _value(r, path, "general.architecture", str)
    if arch != "llama":
        raise UserError(f"{path} is a {arch!r} model; this engine runs the llama architecture (Llama 3, SmolLM2, "
                        "DeepSeek-R1-Distill-Llama, ...): use a GGUF of one of those")
    if _value(r, path, "split.count", int, 1) > 1:
        raise UserError(f"{path} is one part of a split GGUF; merge the parts into one file with "
                        "`llama-gguf-split --merge FIRST_PART OUT.gguf` and pass that")
    if _value(r, path, "llama.expert_count", int, 0):
        raise UserError(f"{path} is a mixture-of-experts model (Mixtral style), not a dense Llama; use a dense "
                        "Llama GGUF")
    scaling = _value(r, path, "llama.rope.scaling.type", str, "none")
    if scaling != "none":
        raise UserError(f"{path} scales RoPE by {scaling!r}, which this engine does not implement; running it "
                        "anyway would put every token at the wrong position: use a Llama 3 GGUF")
    dim = _value(r, path, "llama.embedding_length", int)
    n_heads = _value(r, path, "llama.attention.head_count", int)
    head_dim = dim // n_heads if n_heads > 0 else 0
    for key in ("llama.rope.dimension_count", "llama.attention.key_length", "llama.attention.value_length"):
        size = _value(r, path, key, int, head_dim)
        if size != head_dim:
            raise UserError(f"{path}: {key} is {size} but embedding_length/head_count is {head_dim}; models with "
                            "other head sizes or partial RoPE are not Llama shaped")
    tensors = {t.name: t for t in r.tensors}
    tokens = r.fields.get("tokenizer.ggml.tokens")  # llama.vocab_size is optional: the vocabulary's size
    args = ModelArgs(
        dim=dim,
        n_layers=_value(r, path, "llama.block_count", int),
        n_heads=n_heads,
        n_kv_heads=_value(r, path, "llama.attention.head_count_kv", int, n_heads),
        vocab_size=_value(r, path, "llama.vocab_size", int, _MISSING if tokens is None else len(tokens.data)),
        hidden_dim=_value(r, path, "llama.feed_forward_length", int),
        norm_eps=_value(r, path, "llama.attention.layer_norm_rms_epsilon", float),
        rope_theta=_value(r, path, "llama.rope.freq_base", float, 10000.0),  # llama.cpp's default
        tie_word_embeddings="output.weight" not in tensors,
        rope_freq_factors=_rope_freq_factors(tensors.get(ROPE_FREQS), path),
    )
    args.validate()
    return args


def _rope_freq_factors(tensor: Any, path: Path) -> tuple[float, ...] | None:
    if tensor is None:
        return None
    if tensor.tensor_type != Q.F32 or len(tensor.shape) != 1:
        raise UserError(f"{path}: {ROPE_FREQS} is {tensor.tensor_type.name} {list(tensor.shape)}, not one float32 "
                        f"per channel pair; {_FIX_FILE}")
    factors = tuple(float(x) for x in np.asarray(tensor.data))
    if not all(np.isfinite(factors)) or min(factors) <= 0:
        raise UserError(f"{path}: {ROPE_FREQS} holds factors that are not positive numbers; {_FIX_FILE}")
    return factors


def model_name(name: str) -> str:
    """The model's name for a GGUF tensor name; names it does not know are kept, for the check to report."""
    stem = name.removesuffix(".weight")
    if name.endswith(".weight") and stem in _TOP:
        return f"{_TOP[stem]}.weight"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if m and m[2] in _LAYER:
        return f"layers.{m[1]}.{_LAYER[m[2]]}.weight"
    return name


def file_name(name: str) -> str:
    """The GGUF name of one of the model's tensors (for messages): the inverse of `model_name`."""
    stem = name.removesuffix(".weight")
    if stem in _TOP_BACK:
        return f"{_TOP_BACK[stem]}.weight"
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", stem)
    return f"blk.{m[1]}.{_LAYER_BACK[m[2]]}.weight" if m and m[2] in _LAYER_BACK else name


def tensor_shapes(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor under the model's name, as a shape-only (meta) tensor: checked before any
    dequantizing. GGUF lists dimensions innermost first, PyTorch outermost first."""
    return {model_name(t.name): torch.empty(tuple(int(d) for d in reversed(t.shape)), device="meta")
            for t in open_gguf(path).tensors if t.name != ROPE_FREQS}


def check_types(path: Path) -> None:
    """Fail unless every tensor is of a type this loader dequantizes."""
    unsupported = [t for t in open_gguf(path).tensors if t.tensor_type not in SUPPORTED_TYPES]
    if unsupported:
        kinds = sorted({t.tensor_type.name for t in unsupported})
        raise UserError(f"{path} stores {unsupported[0].name} (and {len(unsupported) - 1} more) as {', '.join(kinds)}, "
                        f"which this engine does not dequantize; use a GGUF quantized as one of "
                        f"{_type_names(SUPPORTED_TYPES)} (Q4_K_M, Q8_0 and F16 files are common)")


def dequantized_state_dict(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The weights under the model's names, dequantized one tensor at a time straight to `dtype`, so
    memory holds the model in `dtype` plus one tensor in float32, never the whole model in float32."""
    check_types(path)
    state = {}
    for t in open_gguf(path).tensors:
        if t.name == ROPE_FREQS:
            continue
        shape = tuple(int(d) for d in reversed(t.shape))
        try:
            values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        except ValueError as e:
            raise UserError(f"cannot dequantize {t.name} of {path} ({e}); the file is truncated or corrupt: "
                            f"{_FIX_FILE}") from None
        if not values.flags.writeable:  # a view of the read-only file (F32 tensors): copy it into memory
            values = values.copy()
        state[model_name(t.name)] = torch.from_numpy(values).to(dtype)
    return state


def quantization(path: Path) -> str:
    """What the file stores, by tensor type and share of the parameters: "Q4_1 80%, Q8_0 20%, F32 0.03%"."""
    counts: Counter[str] = Counter()
    for t in open_gguf(path).tensors:
        counts[t.tensor_type.name] += int(t.n_elements)
    total = sum(counts.values())
    return ", ".join(f"{name} {100 * n / total:.3g}%" for name, n in counts.most_common())


def gguf_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer the file carries: byte-level BPE (`tokenizer.ggml.model` "gpt2") with the
    pre-tokenizer `tokenizer.ggml.pre` names, its special tokens, BOS/EOS/EOT/EOM ids and chat template."""
    r = open_gguf(path)
    fix = "pass --tokenizer with the model's tokenizer.json, or use a GGUF of a Llama 3 or SmolLM2 model"
    kind = _value(r, path, "tokenizer.ggml.model", str)
    if kind != "gpt2":
        spm = " (SentencePiece, as Llama 1/2 and Mistral use)" if kind == "llama" else ""
        raise UserError(f"{path} has a {kind!r} tokenizer{spm}; this engine runs byte-level BPE ('gpt2': Llama 3, "
                        f"SmolLM2); {fix}")
    pre = _value(r, path, "tokenizer.ggml.pre", str, "default")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise UserError(f"{path} splits text with llama.cpp's {pre!r} pre-tokenizer; this engine knows "
                        f"{', '.join(GGUF_PRE_TOKENIZERS)}; {fix}")
    tokens = _value(r, path, "tokenizer.ggml.tokens", list)
    types = _value(r, path, "tokenizer.ggml.token_type", list, [gguf.TokenType.NORMAL] * len(tokens))
    if len(types) != len(tokens) or gguf.TokenType.BYTE in types:
        raise UserError(f"{path}: tokenizer.ggml.token_type does not describe byte-level BPE tokens; {fix}")
    vocab = {tok: i for i, (tok, kind_) in enumerate(zip(tokens, types)) if kind_ == gguf.TokenType.NORMAL}
    specials = {tok: i for i, (tok, kind_) in enumerate(zip(tokens, types)) if kind_ != gguf.TokenType.NORMAL}
    ids = {}
    for name in ("bos", "eos", "eot", "eom"):
        ids[name] = _value(r, path, f"tokenizer.ggml.{name}_token_id", int, None)
        if ids[name] is not None and not 0 <= ids[name] < len(tokens):
            raise UserError(f"{path}: tokenizer.ggml.{name}_token_id {ids[name]} is not one of its "
                            f"{len(tokens)} tokens; {_FIX_FILE}")
    template = _value(r, path, "tokenizer.chat_template", str, None)
    return Tokenizer.from_byte_level(
        vocab, specials, _value(r, path, "tokenizer.ggml.merges", list, None), GGUF_PRE_TOKENIZERS[pre],
        where=str(path), fix=fix, bos_id=ids["bos"], eos_id=ids["eos"],
        stop_ids=[i for i in (ids["eot"], ids["eom"]) if i is not None],
        chat_template=ChatTemplate(template, f"{path} (tokenizer.chat_template)", "tokenizer.chat_template")
        if template else None)
