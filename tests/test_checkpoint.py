"""Checkpoint loading: both formats give the same model, bad inputs give one-line errors."""
from __future__ import annotations

import json
import math
import os
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoint_writers import meta_params, save_hf, save_meta
from full_forward import full_forward
from pagedllama.errors import UserError
from pagedllama.io.checkpoint import build_model, check_state_dict, detect_format, load_checkpoint, random_state_dict
from pagedllama.model.config import NAMED_SHAPES, ModelArgs, RopeScaling, from_hf_config, load_config_file
from pagedllama.model.model import apply_rope, rope_freqs_cis, rope_frequencies

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, hidden_dim=192)
PARAMS = meta_params(ARGS, multiple_of=32, ffn_dim_multiplier=None)
PROMPT = torch.tensor([[1, 17, 42, 299, 5, 8], [3, 3, 250, 7, 0, 11]])


@pytest.fixture(scope="module")
def sd() -> dict[str, torch.Tensor]:
    return random_state_dict(ARGS, seed=0)


def build(args: ModelArgs, state_dict: dict, dtype: torch.dtype = torch.float32):
    return build_model(args, state_dict, torch.device("cpu"), dtype, max_positions=32)


def greedy(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    toks = prompt
    for _ in range(steps):
        toks = torch.cat([toks, full_forward(model, toks)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return toks[:, prompt.shape[1]:]


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def user_error(fn, *args) -> str:
    with pytest.raises(UserError) as e:
        fn(*args)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,shards", [("meta", 1), ("meta", 2), ("meta", 4), ("hf", None), ("hf", 30_000)])
def test_round_trip_gives_same_weights_and_outputs(tmp_path, sd, fmt, shards):
    if fmt == "meta":
        save_meta(sd, PARAMS, tmp_path, num_shards=shards)
        assert len(list(tmp_path.glob("consolidated.*.pth"))) == shards
    else:
        save_hf(sd, ARGS, tmp_path, max_shard_bytes=shards)
        if shards:
            assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
            assert (tmp_path / "model.safetensors.index.json").is_file()
    assert detect_format(tmp_path) == fmt
    args, loaded = load_checkpoint(str(tmp_path))
    assert args == ARGS
    assert_same_state(loaded, sd)

    ref, got = build(ARGS, sd), build(args, loaded)
    assert torch.equal(full_forward(ref, PROMPT), full_forward(got, PROMPT))
    assert torch.equal(greedy(ref, PROMPT, 8), greedy(got, PROMPT, 8))


def test_meta_shards_merge_as_tensor_parallel_ranks_hold_them(tmp_path, sd):
    """Shards written by hand, as each of 2 model-parallel ranks holds its part (not by save_meta, so a
    wrong split rule in both directions cannot hide): column-parallel weights (wq, wk, wv, w1, w3,
    output) and Llama 3's vocab-parallel embedding keep a slice of the rows, row-parallel ones (wo,
    w2) a slice of the columns, and every rank has the norms whole."""
    columns_split = ("attention.wo.weight", "feed_forward.w2.weight")
    for rank in range(2):
        shard = {}
        for key, t in sd.items():
            if t.dim() == 1:
                part = t
            elif key.endswith(columns_split):
                part = t[:, rank * t.shape[1] // 2:(rank + 1) * t.shape[1] // 2]
            else:
                part = t[rank * t.shape[0] // 2:(rank + 1) * t.shape[0] // 2]
            shard[key] = part.clone()
        torch.save(shard, tmp_path / f"consolidated.0{rank}.pth")
    (tmp_path / "params.json").write_text(json.dumps(PARAMS))
    assert_same_state(load_checkpoint(tmp_path)[1], sd)


def test_hf_bin_weights_load_when_no_safetensors(tmp_path, sd):
    save_hf(sd, ARGS, tmp_path)
    torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    assert detect_format(tmp_path) == "hf"
    assert_same_state(load_checkpoint(tmp_path)[1], sd)


def test_hf_preferred_over_meta_and_original_subdir_found(tmp_path, sd):
    save_meta(sd, PARAMS, tmp_path / "original")
    (tmp_path / "config.json").write_text("{}")  # an HF repo downloaded with original/ only
    assert detect_format(tmp_path) == "meta"
    assert_same_state(load_checkpoint(tmp_path)[1], sd)
    save_hf(sd, ARGS, tmp_path)
    assert detect_format(tmp_path) == "hf"


def test_stored_dtype_kept_and_built_model_casts_but_keeps_rope_in_float32(tmp_path, sd):
    bf16 = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    save_meta(bf16, PARAMS, tmp_path / "meta", num_shards=2)
    save_hf(bf16, ARGS, tmp_path / "hf")
    for d in ("meta", "hf"):
        _, loaded = load_checkpoint(tmp_path / d)
        assert all(t.dtype == torch.bfloat16 for t in loaded.values())
    model = build(ARGS, sd, torch.bfloat16)
    assert model.layers[0].attention.wq.weight.dtype == torch.bfloat16
    assert model.rope.dtype == torch.complex64 and model.rope.shape[0] == 32
    assert not model.training


def test_hf_q_k_permutation_is_undone(tmp_path, sd):
    """Loading HF rows as they are stored (no un-permutation) must change the model's output."""
    save_hf(sd, ARGS, tmp_path)
    raw = load_file(tmp_path / "model.safetensors")
    wrong = dict(sd)
    for i in range(ARGS.n_layers):
        for meta, hf in (("wq", "q_proj"), ("wk", "k_proj")):
            stored = raw[f"model.layers.{i}.self_attn.{hf}.weight"]
            assert not torch.equal(stored, sd[f"layers.{i}.attention.{meta}.weight"])
            wrong[f"layers.{i}.attention.{meta}.weight"] = stored
    ref = full_forward(build(ARGS, sd), PROMPT)
    assert not torch.allclose(ref, full_forward(build(ARGS, wrong), PROMPT), atol=1e-4)


def test_hf_layout_matches_rotate_half_rope(tmp_path, sd):
    """The stored HF q/k rows, rotated HF's way (rotate_half), give the same attention scores as
    Meta's rows rotated Meta's way: an independent check of the permutation's direction."""
    save_hf(sd, ARGS, tmp_path)
    raw = load_file(tmp_path / "model.safetensors")
    hd, S = ARGS.head_dim, 7
    x = torch.randn(S, ARGS.dim, generator=torch.Generator().manual_seed(1))
    angles = torch.outer(torch.arange(S, dtype=torch.float32), rope_frequencies(hd, ARGS.rope_theta, None))
    cos, sin = torch.cat([angles, angles], -1).cos()[:, None], torch.cat([angles, angles], -1).sin()[:, None]

    def hf_rope(t):
        t1, t2 = t[..., : hd // 2], t[..., hd // 2:]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    freqs_cis = rope_freqs_cis(ARGS, S, "cpu")
    q_hf = hf_rope((x @ raw["model.layers.0.self_attn.q_proj.weight"].T).unflatten(-1, (ARGS.n_heads, hd)))
    k_hf = hf_rope((x @ raw["model.layers.0.self_attn.k_proj.weight"].T).unflatten(-1, (ARGS.n_kv_heads, hd)))
    q_m = apply_rope((x @ sd["layers.0.attention.wq.weight"].T).unflatten(-1, (ARGS.n_heads, hd)), freqs_cis)
    k_m = apply_rope((x @ sd["layers.0.attention.wk.weight"].T).unflatten(-1, (ARGS.n_kv_heads, hd)), freqs_cis)
    rep = ARGS.n_heads // ARGS.n_kv_heads
    scores_hf = torch.einsum("qhd,khd->hqk", q_hf, k_hf.repeat_interleave(rep, 1))
    scores_m = torch.einsum("qhd,khd->hqk", q_m, k_m.repeat_interleave(rep, 1))
    torch.testing.assert_close(scores_hf, scores_m, atol=1e-6, rtol=1e-4)


def rope_real_halves(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """RoPE with real cos and sin over the even and odd channels, stacked back (the model's first version)."""
    cos_sin = torch.view_as_real(freqs_cis)  # (T, D/2, 2): the cos and sin table it used
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos_sin[:, None, :, 0], cos_sin[:, None, :, 1]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).type_as(x)


def rms_norm_by_hand(norm, x: torch.Tensor) -> torch.Tensor:
    """`model.RMSNorm.forward` as first written, op by op."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)
    return xf.type_as(x) * norm.weight


def test_rope_rms_norm_and_greedy_pick_equal_their_first_versions(sd):
    """RoPE as one complex multiply, RMSNorm through `F.rms_norm` and the greedy pick through numpy
    replaced straightforward versions for speed (BENCHMARKS.md, changelog): they must compute the
    same, RMSNorm bit for bit, the pick the first maximum as `max(-1).indices` does."""
    from pagedllama.engine.sampling import first_argmax

    gen = torch.Generator().manual_seed(3)
    freqs_cis = rope_freqs_cis(ARGS, 32, "cpu")[torch.randint(32, (9,), generator=gen)]
    for dtype in (torch.float32, torch.bfloat16):
        model = build(ARGS, sd, dtype)
        x = torch.randn(9, ARGS.n_heads, ARGS.head_dim, generator=gen).to(dtype)
        torch.testing.assert_close(apply_rope(x, freqs_cis), rope_real_halves(x, freqs_cis))
        h = torch.randn(9, ARGS.dim, generator=gen).to(dtype)
        norm = model.layers[1].ffn_norm
        torch.testing.assert_close(norm(h), rms_norm_by_hand(norm, h), rtol=0, atol=0)
    logits = torch.randn(9, ARGS.vocab_size, generator=gen)
    logits[2, [4, 9]] = 50.0
    assert torch.equal(first_argmax(logits), logits.max(-1).indices)


def test_tied_embeddings(tmp_path):
    args = ModelArgs(**{**ARGS.__dict__, "tie_word_embeddings": True})
    sd = random_state_dict(args, seed=3)
    assert sd["output.weight"] is sd["tok_embeddings.weight"]
    save_hf(sd, args, tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    loaded_args, loaded = load_checkpoint(tmp_path)
    assert loaded_args.tie_word_embeddings
    assert torch.equal(loaded["output.weight"], loaded["tok_embeddings.weight"])
    model = build(loaded_args, loaded, torch.bfloat16)
    assert model.output.weight is model.tok_embeddings.weight

    save_meta({k: v for k, v in sd.items() if k != "output.weight"}, PARAMS, tmp_path / "meta")
    _, loaded = load_checkpoint(tmp_path / "meta")
    assert loaded["output.weight"] is loaded["tok_embeddings.weight"]

    # a tied checkpoint that stores lm_head as well (a copy of the embedding) still loads one tensor
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, tmp_path / "model.safetensors")
    _, loaded = load_checkpoint(tmp_path)
    assert loaded["output.weight"] is loaded["tok_embeddings.weight"]


def test_random_state_dict_is_deterministic_and_scaled():
    a, b, c = random_state_dict(ARGS, 5), random_state_dict(ARGS, 5), random_state_dict(ARGS, 6)
    assert_same_state(a, b)
    assert not torch.equal(a["layers.0.attention.wq.weight"], c["layers.0.attention.wq.weight"])
    assert all(t.dtype == torch.float32 for t in a.values())
    assert torch.equal(a["norm.weight"], torch.ones(ARGS.dim))
    assert abs(a["tok_embeddings.weight"].std().item() - 0.02) < 0.002
    assert abs(a["layers.1.feed_forward.w2.weight"].std().item() - 0.02 / math.sqrt(4)) < 0.001
    check_state_dict(ARGS, a)


# --- configs -----------------------------------------------------------------------------------


def test_hf_rope_scaling_parsed(tmp_path, sd):
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
           "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0,
           "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    assert from_hf_config(cfg) == NAMED_SHAPES["llama3.1-8b"]
    scaled = ModelArgs(**{**ARGS.__dict__, "rope_scaling": RopeScaling(32.0, 1.0, 4.0, 8192)})
    save_hf(sd, scaled, tmp_path)
    assert load_checkpoint(tmp_path)[0].rope_scaling == RopeScaling(32.0, 1.0, 4.0, 8192)


@pytest.mark.parametrize("name,multiple_of,mult,hidden,factor", [
    ("llama3.1-8b", 1024, 1.3, 14336, 8.0), ("llama3-70b", 4096, 1.3, 28672, None),
    ("llama3.2-1b", 256, 1.5, 8192, 32.0), ("llama3.2-3b", 256, 1.0, 8192, 32.0)])
def test_meta_params_ffn_size_and_rope_factor(tmp_path, name, multiple_of, mult, hidden, factor):
    shape = NAMED_SHAPES[name]
    params = {"dim": shape.dim, "n_layers": shape.n_layers, "n_heads": shape.n_heads,
              "n_kv_heads": shape.n_kv_heads, "vocab_size": 128256, "multiple_of": multiple_of,
              "ffn_dim_multiplier": mult, "norm_eps": 1e-05, "rope_theta": 500000.0,
              "use_scaled_rope": factor is not None}
    (tmp_path / "params.json").write_text(json.dumps(params))
    args = load_config_file(tmp_path / "params.json")
    assert args.hidden_dim == hidden
    assert (args.rope_scaling and args.rope_scaling.factor) == factor
    assert meta_params(shape, multiple_of, mult) == params
    with pytest.raises(ValueError):
        meta_params(shape, multiple_of, 2.0)


@pytest.mark.parametrize("fmt", ["meta", "hf"])
def test_config_fields_away_from_llama3_defaults_are_read(tmp_path, sd, fmt):
    """norm_eps and rope_theta other than Llama 3's come back as written, in both formats (a parser
    that fell back to the defaults would pass with Llama 3's own values)."""
    odd = replace(ARGS, norm_eps=1e-6, rope_theta=10000.0)
    if fmt == "meta":
        save_meta(sd, meta_params(odd, multiple_of=32, ffn_dim_multiplier=None), tmp_path)
    else:
        save_hf(sd, odd, tmp_path)
    assert load_checkpoint(tmp_path)[0] == odd


@pytest.mark.parametrize("fields,words", [
    ({"dim": 66, "n_heads": 4}, ["dim 66", "n_heads 4", "must divide"]),
    ({"n_heads": 4, "n_kv_heads": 3}, ["n_kv_heads 3", "must divide"]),
    ({"dim": 66, "n_heads": 2, "n_kv_heads": 1}, ["odd head_dim 33", "RoPE"]),
    ({"n_layers": 0}, ["non-positive", "check the config"])])
def test_inconsistent_config_is_a_one_line_error(tmp_path, fields, words):
    params = {**meta_params(ARGS, multiple_of=32, ffn_dim_multiplier=None), **fields}
    (tmp_path / "params.json").write_text(json.dumps(params))
    msg = user_error(load_config_file, tmp_path / "params.json")
    assert all(w in msg for w in words), msg


@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_rope_scaling_matches_published_rule(factor):
    hd, theta, old_ctx, low_ff, high_ff = 128, 500000.0, 8192, 1.0, 4.0
    got = rope_frequencies(hd, theta, RopeScaling(factor, low_ff, high_ff, old_ctx))
    expected = []
    for i in range(0, hd, 2):
        f = 1.0 / theta ** (i / hd)
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high_ff:
            expected.append(f)
        elif wavelen > old_ctx / low_ff:
            expected.append(f / factor)
        else:
            smooth = (old_ctx / wavelen - low_ff) / (high_ff - low_ff)
            expected.append((1 - smooth) * f / factor + smooth * f)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32), rtol=1e-6, atol=0)
    assert got[0] == 1.0 and got[-1] < rope_frequencies(hd, theta, None)[-1]


# --- errors ------------------------------------------------------------------------------------


def test_directory_errors(tmp_path, sd):
    assert "does not exist" in user_error(detect_format, tmp_path / "nope")
    assert "pagedllama.download" in user_error(load_checkpoint, tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    assert "not a directory" in user_error(load_checkpoint, tmp_path / "file")
    (tmp_path / "empty").mkdir()
    assert "empty" in user_error(load_checkpoint, tmp_path / "empty")
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "params.json").write_text(json.dumps(PARAMS))
    assert "params.json but no consolidated" in user_error(load_checkpoint, tmp_path / "params")
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.json").write_text("{}")
    assert "config.json but no model.safetensors" in user_error(load_checkpoint, tmp_path / "config")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "README.md").write_text("hi")
    assert "no Llama checkpoint" in user_error(load_checkpoint, tmp_path / "other")


def test_missing_shards(tmp_path, sd):
    save_hf(sd, ARGS, tmp_path / "hf", max_shard_bytes=30_000)
    second = sorted((tmp_path / "hf").glob("model-*.safetensors"))[1]
    second.unlink()
    msg = user_error(load_checkpoint, tmp_path / "hf")
    assert second.name in msg and "re-download" in msg
    save_meta(sd, PARAMS, tmp_path / "meta", num_shards=4)
    (tmp_path / "meta" / "consolidated.01.pth").unlink()
    assert "shard is missing" in user_error(load_checkpoint, tmp_path / "meta")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_pth(tmp_path, sd, damage):
    save_meta(sd, PARAMS, tmp_path, num_shards=2)
    f = tmp_path / "consolidated.01.pth"
    data = f.read_bytes()
    f.write_bytes({"truncate": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[damage])
    msg = user_error(load_checkpoint, tmp_path)
    assert "consolidated.01.pth" in msg and "re-download" in msg


def test_pth_that_is_not_a_state_dict(tmp_path, sd):
    save_meta(sd, PARAMS, tmp_path)
    torch.save([1, 2, 3], tmp_path / "consolidated.00.pth")
    assert "not a state dict" in user_error(load_checkpoint, tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "lying_header"])
def test_corrupt_safetensors(tmp_path, sd, damage):
    save_hf(sd, ARGS, tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = os.urandom(4096)
    else:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8: 8 + n])
        header["model.norm.weight"]["shape"] = [ARGS.dim * 4]
        new = json.dumps(header).encode()
        data = len(new).to_bytes(8, "little") + new + data[8 + n:]
    f.write_bytes(data)
    msg = user_error(load_checkpoint, tmp_path)
    assert "model.safetensors" in msg and "re-download" in msg


def test_bad_state_dicts(sd):
    missing = {k: v for k, v in sd.items() if k != "layers.1.attention.wq.weight"}
    msg = user_error(check_state_dict, ARGS, missing)
    assert "layers.1.attention.wq.weight" in msg and "incomplete" in msg

    wrong = {**sd, "layers.0.feed_forward.w2.weight": torch.zeros(64, 100)}
    msg = user_error(check_state_dict, ARGS, wrong)
    assert "layers.0.feed_forward.w2.weight" in msg and "(64, 100)" in msg and "(64, 192)" in msg

    extra = {**sd, "layers.2.attention_norm.weight": torch.ones(64)}
    msg = user_error(check_state_dict, ARGS, extra)
    assert "2 layers" in msg and "layers.2." in msg

    assert "unexpected tensor" in user_error(check_state_dict, ARGS, {**sd, "lm_head.bias": torch.ones(3)})
    quantized = {**sd, "norm.weight": torch.ones(64, dtype=torch.int8)}
    assert "quantized" in user_error(check_state_dict, ARGS, quantized)
    assert "layers.1.attention.wq.weight" in user_error(build, ARGS, missing)


def test_checkpoint_of_another_shape(tmp_path, sd):
    save_meta(sd, {**PARAMS, "n_layers": 1}, tmp_path / "fewer")
    assert "says 1 layers" in user_error(load_checkpoint, tmp_path / "fewer")
    save_meta(sd, {**PARAMS, "n_layers": 3}, tmp_path / "more")
    assert "layers.2." in user_error(load_checkpoint, tmp_path / "more")
    save_hf(sd, ARGS, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": 4}))
    assert "layers.0.attention.wk.weight" in user_error(load_checkpoint, tmp_path / "hf")


def test_config_of_another_architecture(tmp_path):
    save_file({"wte.weight": torch.zeros(10, 4)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 768}))
    assert "gpt2" in user_error(load_checkpoint, tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    assert "config.json" in user_error(load_checkpoint, tmp_path)


# --- RoPE in config.json: transformers 4 writes rope_theta + rope_scaling, transformers 5 rope_parameters ---

SCALED = replace(ARGS, rope_theta=10000.0, rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0,
                                                                     high_freq_factor=4.0,
                                                                     original_max_position_embeddings=16))


def as_transformers5(config: dict) -> dict:
    """A transformers 4-style config.json rewritten as transformers 5 writes it."""
    config = dict(config)
    config["rope_parameters"] = {**(config.pop("rope_scaling") or {"rope_type": "default"}),
                                 "rope_theta": config.pop("rope_theta")}
    return config


@pytest.mark.parametrize("form", ["transformers4", "transformers5"])
def test_rope_read_in_both_config_forms_as_transformers_reads_it(tmp_path, form):
    """Base 10,000 and llama3 scaling (from position 16 on, so short prompts feel it) in either form:
    the logits and greedy tokens equal transformers' on the same folder; the silent default (base
    500,000, no scaling) would not."""
    transformers = pytest.importorskip("transformers")
    sd = random_state_dict(SCALED, seed=5)
    save_hf(sd, SCALED, tmp_path)
    if form == "transformers5":
        config = as_transformers5(json.loads((tmp_path / "config.json").read_text()))
        assert "rope_theta" not in config and "rope_scaling" not in config
        (tmp_path / "config.json").write_text(json.dumps(config))
    args, state = load_checkpoint(tmp_path)
    assert args == SCALED
    tokens = torch.randint(0, ARGS.vocab_size, (1, 30), generator=torch.Generator().manual_seed(1))
    model = build_model(args, state, torch.device("cpu"), torch.float32, max_positions=64)
    ours = full_forward(model, tokens)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        theirs = reference(tokens).logits
        their_tokens = reference.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=8,
                                          do_sample=False)[:, tokens.shape[1]:]
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert torch.equal(greedy(model, tokens, 8), their_tokens)
    default = build_model(replace(args, rope_theta=500000.0, rope_scaling=None), state, torch.device("cpu"),
                          torch.float32, max_positions=64)
    assert not torch.allclose(full_forward(default, tokens), theirs, atol=1e-3)


def test_transformers5_config_object_reads_back():
    """What transformers 5 itself writes for a Llama 3.1-style config reads back as the same RoPE."""
    transformers = pytest.importorskip("transformers")
    rs = SCALED.rope_scaling
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        vocab_size=300, rope_theta=10000.0, rope_scaling={
            "rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings}).to_dict()
    assert "rope_parameters" in config and config.get("rope_scaling") is None
    args = from_hf_config(config)
    assert (args.rope_theta, args.rope_scaling) == (10000.0, rs)


def hf_config(**rope) -> dict:
    return {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 300,
            "intermediate_size": 192, **rope}


def test_rope_forms_and_their_errors():
    assert from_hf_config(hf_config()).rope_theta == 10000.0  # transformers' default where none is named
    plain = from_hf_config(hf_config(rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    assert (plain.rope_theta, plain.rope_scaling) == (1e6, None)
    assert from_hf_config(hf_config(rope_theta=1e6, rope_scaling={"rope_type": "default"})).rope_scaling is None
    both = hf_config(rope_theta=1e6, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    assert from_hf_config(both).rope_theta == 1e6  # the same value twice is fine
    for rope in ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
                 {"rope_scaling": {"type": "linear", "factor": 2.0}}):
        msg = user_error(from_hf_config, hf_config(**rope))
        assert "does not implement" in msg and "wrong position" in msg
    msg = user_error(from_hf_config, hf_config(rope_theta=5e5, rope_parameters={"rope_type": "default",
                                                                                "rope_theta": 1e4}))
    assert "disagree" in msg
    assert "not one {rope_type" in user_error(from_hf_config, hf_config(rope_parameters=[1, 2]))
    assert "'factor'" in user_error(from_hf_config, hf_config(rope_parameters={"rope_type": "llama3"}))
