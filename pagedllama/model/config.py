"""Model shapes: Llama 3 hyper-parameters from Meta's params.json, HF's config.json or a name."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1/3.2 frequency scaling ("rope_type": "llama3")."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    hidden_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    # GGUF's `rope_freqs` tensor: each channel pair's frequency is divided by its factor (how llama.cpp
    # stores Llama 3.1's scaling); None when the file has none.
    rope_freq_factors: tuple[float, ...] | None = None

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of one token across all layers."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * dtype_bytes

    def num_params(self) -> int:
        hd = self.head_dim
        attn = self.dim * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
        ffn = 3 * self.dim * self.hidden_dim
        per_layer = attn + ffn + 2 * self.dim
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.dim
        return self.n_layers * per_layer + self.vocab_size * self.dim + head + self.dim

    def params_per_rank(self, tensor_parallel_size: int) -> int:
        """The parameters one of `tensor_parallel_size` ranks holds: every matrix split (the embedding
        and the output layer by vocabulary), the norms copied (model/parallel.py)."""
        norms = (2 * self.n_layers + 1) * self.dim
        return norms + -(-(self.num_params() - norms) // tensor_parallel_size)

    def validate(self) -> None:
        if min(self.dim, self.n_layers, self.n_heads, self.n_kv_heads, self.vocab_size, self.hidden_dim) <= 0:
            raise UserError(f"model config has a non-positive size: {self}; check the config file")
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise UserError(
                f"model config is inconsistent: dim {self.dim}, n_heads {self.n_heads}, n_kv_heads "
                f"{self.n_kv_heads} (dim must divide by n_heads, n_heads by n_kv_heads)")
        if self.head_dim % 2:
            raise UserError(f"model config has an odd head_dim {self.head_dim}; RoPE needs an even one")
        if self.rope_freq_factors is not None and len(self.rope_freq_factors) != self.head_dim // 2:
            raise UserError(f"the model has {len(self.rope_freq_factors)} RoPE frequency factors but head_dim "
                            f"{self.head_dim} needs {self.head_dim // 2}; the file is damaged: re-download it")


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's rule: 2/3 of 4*dim, times the multiplier, rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def from_meta_params(params: dict) -> ModelArgs:
    """Parse Meta's `params.json`."""
    try:
        dim, n_heads = int(params["dim"]), int(params["n_heads"])
        scaling = None
        if params.get("use_scaled_rope"):
            # params.json carries no factor: 3.2 1B/3B (dim 2048/3072) use 32, 3.1 uses 8.
            scaling = RopeScaling(factor=32.0 if dim in (2048, 3072) else 8.0)
        return ModelArgs(
            dim=dim,
            n_layers=int(params["n_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(params.get("n_kv_heads") or n_heads),
            vocab_size=int(params["vocab_size"]),
            hidden_dim=ffn_hidden_dim(dim, int(params.get("multiple_of", 256)),
                                      params.get("ffn_dim_multiplier")),
            norm_eps=float(params.get("norm_eps", 1e-5)),
            rope_theta=float(params.get("rope_theta", 500000.0)),
            rope_scaling=scaling,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"params.json is not a Llama params file (missing or bad field {e}); "
                        "point --model at a Llama 3 checkpoint directory") from None


def from_hf_config(cfg: dict) -> ModelArgs:
    """Parse a Hugging Face `config.json` of a LlamaForCausalLM."""
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type", "llama")
    if model_type != "llama" or (archs and "LlamaForCausalLM" not in archs):
        raise UserError(f"config.json describes a {model_type!r} model {archs}, not Llama; "
                        "point --model or --simulate at a Llama 3 checkpoint")
    try:
        dim, n_heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        if cfg.get("head_dim") not in (None, dim // n_heads):
            raise UserError(f"config.json head_dim {cfg['head_dim']} != hidden_size/num_attention_heads; "
                            "such models are not Llama 3 shaped")
        rope_theta, scaling = _hf_rope(cfg)
        return ModelArgs(
            dim=dim,
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            vocab_size=int(cfg["vocab_size"]),
            hidden_dim=int(cfg["intermediate_size"]),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"config.json is not a Llama config (missing or bad field {e}); "
                        "point --model or --simulate at a Llama 3 checkpoint directory") from None


# transformers' LlamaConfig default, for a config.json that names no base.
HF_DEFAULT_ROPE_THETA = 10000.0
ROPE_TYPES = ("default", "llama3")


def _hf_rope(cfg: dict) -> tuple[float, RopeScaling | None]:
    """RoPE base and scaling of a config.json in either form transformers writes.

    transformers 4 writes top-level `rope_theta` and `rope_scaling`; transformers 5 writes one
    `rope_parameters` dict holding both. Reading only the old form runs a checkpoint saved by
    transformers 5 with the default base and no scaling, wrong positions without a word; so both
    are read, and a RoPE type this engine does not implement is an error.
    """
    params, legacy = cfg.get("rope_parameters"), cfg.get("rope_scaling")
    if params is None:
        return _rope_from(legacy or {}, cfg.get("rope_theta"))
    if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
        raise UserError("config.json rope_parameters is not one {rope_type, rope_theta, ...} object (per-layer "
                        "RoPE is not Llama's); point --model at a Llama checkpoint")
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    rope = _rope_from(params, theta)
    top_theta = cfg.get("rope_theta")
    if (top_theta is not None and float(top_theta) != rope[0]) or (legacy and _rope_from(legacy, theta) != rope):
        raise UserError(f"config.json gives RoPE both as rope_parameters and as rope_theta/rope_scaling, and the "
                        f"two disagree; keep the one the model was trained with (rope_parameters: {params})")
    return rope


def _rope_from(spec: dict, theta: object) -> tuple[float, RopeScaling | None]:
    """(base, scaling) from a rope_scaling or rope_parameters dict and the base found beside it."""
    if not isinstance(spec, dict):
        raise UserError(f"config.json rope_scaling {spec!r} is not an object; re-download the config")
    kind = spec.get("rope_type", spec.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise UserError(f"config.json asks for RoPE type {kind!r}, which this engine does not implement "
                        f"({', '.join(map(repr, ROPE_TYPES))}); running it anyway would put every token at the "
                        "wrong position: use a Llama 3 checkpoint")
    base = float(HF_DEFAULT_ROPE_THETA if theta is None else theta)
    if kind == "default":
        return base, None
    return base, RopeScaling(
        factor=float(spec["factor"]),
        low_freq_factor=float(spec.get("low_freq_factor", 1.0)),
        high_freq_factor=float(spec.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(spec.get("original_max_position_embeddings", 8192)),
    )


_LLAMA3 = dict(vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0)
NAMED_SHAPES: dict[str, ModelArgs] = {
    "llama3-8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, **_LLAMA3),
    "llama3-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672, **_LLAMA3),
    "llama3.1-8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                             rope_scaling=RopeScaling(factor=8.0), **_LLAMA3),
    "llama3.2-1b": ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192,
                             rope_scaling=RopeScaling(factor=32.0), tie_word_embeddings=True, **_LLAMA3),
    "llama3.2-3b": ModelArgs(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, hidden_dim=8192,
                             rope_scaling=RopeScaling(factor=32.0), tie_word_embeddings=True, **_LLAMA3),
}


# The built-in demo: Llama 3's architecture at a size that runs a batch of 16 ShareGPT
# requests on 2 CPU cores in seconds. Its vocabulary is the demo tokenizer's (4096 + 256).
DEMO_ARGS = ModelArgs(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=4352,
                      hidden_dim=ffn_hidden_dim(256, 256, None), rope_theta=500000.0)
DEMO_MAX_SEQ_LEN = 4096
DEFAULT_MAX_SEQ_LEN = 8192  # real models, as in the original scripts
MAX_SEQ_LEN_LIMIT = 1 << 20  # 8x Llama 3.1's 131072; the RoPE table and a naive row grow with it


def load_config_file(path: str | Path) -> ModelArgs:
    """A `params.json` (Meta) or `config.json` (HF) file, told apart by their keys."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist; give a params.json or config.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"config file {path} is not valid JSON ({e}); re-download it") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} is not a JSON object; give a params.json or config.json")
    is_hf = any(key in data for key in ("hidden_size", "model_type", "architectures"))
    args = from_hf_config(data) if is_hf else from_meta_params(data)
    args.validate()
    return args


CONFIG_FILES = ("params.json", "original/params.json", "config.json")  # where a checkpoint folder keeps its shape


def resolve_shape(name_or_path: str) -> ModelArgs:
    """A named shape (`llama3-8b`, ...) or a path to a params.json / config.json."""
    if name_or_path in NAMED_SHAPES:
        return NAMED_SHAPES[name_or_path]
    if Path(name_or_path).is_dir():
        for fname in CONFIG_FILES:
            if (Path(name_or_path) / fname).is_file():
                return load_config_file(Path(name_or_path) / fname)
    if Path(name_or_path).suffix == ".json" or Path(name_or_path).exists():
        return load_config_file(name_or_path)
    raise UserError(f"unknown model shape {name_or_path!r}; use one of {', '.join(NAMED_SHAPES)} "
                    "or a path to a params.json / config.json")


