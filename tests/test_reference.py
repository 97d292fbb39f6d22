"""The model and its checkpoint loader against Llama 3 written out again from its formulas.

The float64 reference (llama_reference.py) shares no code with the package; here it is itself
checked against Hugging Face transformers' LlamaForCausalLM on the same weights, at every shape
in `REFERENCE_SHAPES` and from both styles of config.json. The engine's cached forward passes are
compared with it in test_engine_reference.py.
"""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from checkpoint_writers import save_hf
from conftest import CPU, REFERENCE_SHAPES, TINY, hf_config, lively_state_dict
from full_forward import full_forward
from llama_reference import reference_logits, rope_frequency
from pagedllama.io.checkpoint import build_model, load_checkpoint
from pagedllama.model.config import ModelArgs, RopeScaling
from pagedllama.model.model import rope_frequencies

# Logits agree to this fraction of their largest magnitude. The package and transformers compute
# in float32 (RoPE angles too), which leaves errors around 1e-6 of it; the smallest change the
# tests below must notice (RoPE scaling at these lengths) is above 3e-2 of it.
TOLERANCE = 1e-4
SCALED = [name for name, args in REFERENCE_SHAPES.items() if args.rope_scaling]
NOT_LLAMA3_DEFAULTS = SCALED + [n for n, a in REFERENCE_SHAPES.items() if a.rope_theta != 500000.0]


def tokens(args: ModelArgs, length: int, seed: int) -> list[int]:
    return torch.randint(0, args.vocab_size, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def assert_logits_close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got.double(), want, atol=TOLERANCE * want.abs().max().item(), rtol=0)


def write_hf_checkpoint(path, args: ModelArgs, sd: dict[str, torch.Tensor], style: str) -> dict:
    """Safetensors in Hugging Face's layout (no lm_head when tied), and a config.json of `style`."""
    save_hf(sd, args, path)
    cfg = hf_config(args, style)
    (path / "config.json").write_text(json.dumps(cfg))
    return cfg


@pytest.fixture(scope="module")
def llama_for_causal_lm():
    """transformers' Llama, imported when a test first needs it: importing it imports triton, which
    must wait until test_triton_attention.py has set TRITON_INTERPRET (at its collection)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers.LlamaForCausalLM


@pytest.mark.parametrize("style", ["transformers-4", "transformers-5"])
@pytest.mark.parametrize("name", REFERENCE_SHAPES)
def test_reference_equals_transformers(tmp_path, llama_for_causal_lm, name, style):
    """The formulas give transformers' logits: the reference is Llama 3, RoPE scaling, GQA and tied
    output included, whichever way the config says it."""
    args = REFERENCE_SHAPES[name]
    sd = lively_state_dict(args, seed=11)
    cfg = write_hf_checkpoint(tmp_path, args, sd, style)
    hf = llama_for_causal_lm.from_pretrained(tmp_path, dtype=torch.float64).eval()
    ids = tokens(args, 96, seed=12)
    with torch.no_grad():
        got = hf(torch.tensor([ids])).logits[0]
    assert_logits_close(got, reference_logits(sd, cfg, ids))


@pytest.mark.parametrize("name", NOT_LLAMA3_DEFAULTS)
def test_the_rope_configuration_moves_the_logits_checked(name):
    """The tests can fail: at the lengths they use, ignoring RoPE scaling, or reading Llama 3's
    theta for another, changes the logits far beyond the tolerance."""
    args = REFERENCE_SHAPES[name]
    sd, ids = lively_state_dict(args, seed=11), tokens(args, 96, seed=12)
    cfg = hf_config(args, "transformers-4")
    want = reference_logits(sd, cfg, ids)
    wrong = cfg | ({"rope_scaling": None} if args.rope_scaling else {"rope_theta": 500000.0})
    assert (reference_logits(sd, wrong, ids) - want).abs().max() > 300 * TOLERANCE * want.abs().max()


def quiet_state_dict(args: ModelArgs, seed: int) -> dict[str, torch.Tensor]:
    """Lively weights, but a residual stream of magnitude 1e-3: every RMSNorm's input is small
    enough that its eps (1e-5 against a mean square of about 1e-6) shapes its output."""
    sd = lively_state_dict(args, seed)
    for name in sd:
        if name == "tok_embeddings.weight" or name.endswith(("wo.weight", "w2.weight")):
            sd[name] = sd[name] * 1e-3
    return sd


@pytest.mark.parametrize("args,weights", [
    (TINY, lively_state_dict), (replace(TINY, n_kv_heads=1, tie_word_embeddings=True, rope_theta=10000.0),
                                lively_state_dict),
    (TINY, quiet_state_dict), *((args, lively_state_dict) for args in REFERENCE_SHAPES.values())],
    ids=["gqa-2-hd16", "mqa-tied-hd16", "gqa-2-hd16-quiet", *REFERENCE_SHAPES])
def test_full_forward_equals_the_formulas(args, weights):
    """`full_forward`, the quick ground truth of the hypothesis tests, is itself Llama 3."""
    sd = weights(args, seed=5)
    model = build_model(args, sd, CPU, torch.float32, max_positions=128)
    batch = torch.tensor([tokens(args, 80, seed=6), tokens(args, 80, seed=7)])
    got = full_forward(model, batch)
    cfg = hf_config(args, "transformers-4")
    for b in range(2):
        assert_logits_close(got[b], reference_logits(sd, cfg, batch[b].tolist()))


@pytest.mark.parametrize("scaling", [RopeScaling(8.0), RopeScaling(32.0, 2.0, 8.0, 4096),
                                     RopeScaling(4.0, 0.5, 3.0, 2048)], ids=["3.1", "other-factors", "low-below-1"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rope_frequencies_equal_the_formulas(head_dim, scaling):
    """The package's RoPE frequencies, for Llama 3.1's scaling and for other factors, windows and
    original contexts than the ones the reference shapes use."""
    cfg = {k: getattr(scaling, k) for k in ("factor", "low_freq_factor", "high_freq_factor",
                                            "original_max_position_embeddings")}
    want = [rope_frequency(i, head_dim, 500000.0, cfg) for i in range(head_dim // 2)]
    torch.testing.assert_close(rope_frequencies(head_dim, 500000.0, scaling).double(),  # float32: one unit 2^-23
                               torch.tensor(want, dtype=torch.float64), rtol=2 ** -23, atol=0)


@pytest.mark.parametrize("style", ["transformers-4", "transformers-5"])
@pytest.mark.parametrize("name", NOT_LLAMA3_DEFAULTS)
def test_loaded_checkpoint_equals_the_formulas(tmp_path, name, style):
    """A Hugging Face checkpoint read from disk by the package (config parsed, q/k rows permuted
    back, a tied output taken from the embedding) is the model its config describes, in either
    config style."""
    args = REFERENCE_SHAPES[name]
    sd = lively_state_dict(args, seed=13)
    cfg = write_hf_checkpoint(tmp_path, args, sd, style)
    loaded_args, loaded = load_checkpoint(tmp_path)
    model = build_model(loaded_args, loaded, CPU, torch.float32, max_positions=128)
    ids = tokens(args, 96, seed=14)
    assert_logits_close(full_forward(model, torch.tensor([ids]))[0], reference_logits(sd, cfg, ids))
