"""GGUF checkpoints made on the fly: every supported quantization against Hugging Face transformers
loading the same file, the tokenizer from the metadata, RoPE frequency factors, and bad files."""
from __future__ import annotations

import json
import math
import struct
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from checkpoint_writers import save_hf
from conftest import BYTE_ARGS, CPU, chats, tokenizer_bytes
from full_forward import full_forward
from pagedllama.app import cli
from pagedllama.errors import UserError
from pagedllama.io import gguf_checkpoint
from pagedllama.io.checkpoint import build_model, load_checkpoint, random_state_dict
from pagedllama.io.gguf_checkpoint import SUPPORTED_TYPES, file_name, gguf_tokenizer
from pagedllama.io.tokenizer import Tokenizer, _bytes_to_unicode, _special_token_names
from pagedllama.model.config import ModelArgs, RopeScaling
from pagedllama.model.model import rope_frequencies

Q = gguf.GGMLQuantizationType
# Row lengths of 256: every type's block fits (the K-quants' blocks hold 256 values).
QUANT_ARGS = ModelArgs(dim=256, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=512,
                       rope_theta=10000.0)
# gguf has no quantizer for the K-quants: their blocks are random bytes with small scales, at these
# byte offsets (float16 d, and dmin where there is one) in each block.
K_SCALES = {Q.Q2_K: ((80, 82), 1e-3), Q.Q3_K: ((108,), 5e-4), Q.Q4_K: ((0, 2), 1e-4), Q.Q5_K: ((0, 2), 5e-5),
            Q.Q6_K: ((208,), 1e-5)}


def byte_vocabulary() -> tuple[list[str], list[int]]:
    """The byte-level tokenizer of conftest.tokenizer_bytes as GGUF tokens: 256 bytes, then Llama 3's specials."""
    to_unicode = _bytes_to_unicode()
    tokens = [to_unicode[b] for b in range(256)] + _special_token_names()
    return tokens, [gguf.TokenType.NORMAL] * 256 + [gguf.TokenType.CONTROL] * 256


def encode_tensor(t: torch.Tensor, qtype: Q, gen: np.random.Generator) -> np.ndarray:
    values = t.float().numpy()
    if qtype == Q.F32:
        return values
    if qtype == Q.F16:
        return values.astype(np.float16)
    if qtype in K_SCALES:
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        offsets, scale = K_SCALES[qtype]
        blocks = gen.integers(0, 256, (values.size // block, type_size), dtype=np.uint8)
        for offset in offsets:
            blocks[:, offset:offset + 2] = np.frombuffer(np.float16(scale).tobytes(), np.uint8)
        return blocks.reshape(values.shape[0], -1)
    return gguf.quants.quantize(values, qtype)


def write_gguf(path: Path, args: ModelArgs, sd: dict[str, torch.Tensor], qtype: Q = Q.F32, *,
               arch: str = "llama", tokenizer: str = "gpt2", pre: str = "llama-bpe", template: str | None = None,
               rope_factors: list[float] | None = None, metadata: dict | None = None, seed: int = 0) -> Path:
    """A GGUF as llama.cpp writes one: llama.* metadata, the byte tokenizer, 2-D weights in `qtype`, norms
    in F32, no output.weight when the embedding is tied. `metadata` adds or replaces uint32 keys."""
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(args.n_layers)
    w.add_context_length(2048)
    w.add_embedding_length(args.dim)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_rope_freq_base(args.rope_theta)
    w.add_rope_dimension_count(args.head_dim)
    w.add_vocab_size(args.vocab_size)
    w.add_tokenizer_model(tokenizer)
    w.add_tokenizer_pre(pre)
    tokens, types = byte_vocabulary()
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_bos_token_id(256)
    w.add_eos_token_id(256 + 9)  # <|eot_id|>, as Llama 3 Instruct GGUFs say
    if template:
        w.add_chat_template(template)
    for key, value in (metadata or {}).items():
        w.add_uint32(key, value)
    gen = np.random.default_rng(seed)
    for name, t in sd.items():
        if name == "output.weight" and args.tie_word_embeddings:
            continue
        data = encode_tensor(t, qtype if t.dim() == 2 else Q.F32, gen)
        w.add_tensor(file_name(name), data, raw_dtype=None if data.dtype != np.uint8 else qtype)
    if rope_factors is not None:
        w.add_tensor("rope_freqs.weight", np.array(rope_factors, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def transformers_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        return model(tokens).logits


def our_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    args, sd = load_checkpoint(path)
    return full_forward(build_model(args, sd, CPU, torch.float32, max_positions=256), tokens)


PROMPT = torch.tensor([[256, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 10, 10, 300, 5]])


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda q: q.name)
def test_each_quantization_equals_transformers_on_the_same_file(tmp_path, qtype):
    """transformers dequantizes with the same package but maps names and un-permutes Q/K its own way."""
    args = replace(QUANT_ARGS, tie_word_embeddings=qtype not in (Q.Q4_1, Q.Q6_K))  # both, across the types
    path = write_gguf(tmp_path / "m.gguf", args, random_state_dict(args, seed=3), qtype)
    ours, theirs = our_logits(path, PROMPT), transformers_logits(path, PROMPT)
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4), (ours - theirs).abs().max()
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.parametrize("qtype, tolerance", [(Q.F32, 0), (Q.F16, 1e-3), (Q.BF16, 8e-3), (Q.Q8_0, 1e-2),
                                              (Q.Q5_0, 6e-2), (Q.Q5_1, 6e-2), (Q.Q4_0, 0.12), (Q.Q4_1, 0.12)],
                         ids=lambda v: getattr(v, "name", ""))
def test_dequantized_weights_are_the_quantized_ones(tmp_path, qtype, tolerance):
    """Independently of transformers: each tensor comes back in its place and orientation, within the
    quantization's error (relative to the tensor's norm)."""
    sd = random_state_dict(QUANT_ARGS, seed=4)
    for name in sd:  # norms that differ from ones, so a misplaced norm shows
        if sd[name].dim() == 1:
            sd[name] = torch.rand(sd[name].shape) + 0.5
    _, loaded = load_checkpoint(write_gguf(tmp_path / "m.gguf", QUANT_ARGS, sd, qtype))
    assert loaded.keys() == sd.keys()
    for name, t in sd.items():
        error = (loaded[name] - t).norm() / t.norm()
        assert loaded[name].dtype == torch.float32 and error <= tolerance, (name, float(error))


def test_dequantized_straight_to_the_dtype(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", QUANT_ARGS, random_state_dict(QUANT_ARGS, seed=5), Q.Q8_0)
    _, sd = load_checkpoint(path, torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in sd.values())


def test_tied_embedding_is_shared(tmp_path):
    args = replace(BYTE_ARGS, tie_word_embeddings=True)
    path = write_gguf(tmp_path / "m.gguf", args, random_state_dict(args, seed=6))
    loaded_args, sd = load_checkpoint(path)
    assert loaded_args.tie_word_embeddings and sd["output.weight"] is sd["tok_embeddings.weight"]
    untied = write_gguf(tmp_path / "u.gguf", BYTE_ARGS, random_state_dict(BYTE_ARGS, seed=6))
    assert load_checkpoint(untied)[0] == replace(BYTE_ARGS, norm_eps=float(np.float32(BYTE_ARGS.norm_eps)))


def llama3_factors(head_dim: int, theta: float, s: RopeScaling) -> list[float]:
    """What llama.cpp's converter stores as rope_freqs for Llama 3.1 scaling, from the published rule."""
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        old = s.original_max_position_embeddings
        low, high = old / s.low_freq_factor, old / s.high_freq_factor
        if wavelen < high:
            factors.append(1.0)
        elif wavelen > low:
            factors.append(s.factor)
        else:
            smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
            factors.append(1 / ((1 - smooth) / s.factor + smooth))
    return factors


def test_rope_freqs_tensor_is_llama31_scaling(tmp_path):
    """A Llama 3.1-style GGUF (rope_freqs) runs as the same weights in HF format with rope_scaling llama3."""
    scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)
    scaled = replace(BYTE_ARGS, rope_theta=10000.0, rope_scaling=scaling)
    sd = random_state_dict(scaled, seed=7)
    save_hf(sd, scaled, tmp_path / "hf")
    path = write_gguf(tmp_path / "m.gguf", scaled, sd, rope_factors=llama3_factors(scaled.head_dim, 10000.0, scaling))
    args = load_checkpoint(path)[0]
    assert args.rope_scaling is None and len(args.rope_freq_factors) == scaled.head_dim // 2
    assert torch.allclose(rope_frequencies(args.head_dim, args.rope_theta, None) / torch.tensor(args.rope_freq_factors),
                          rope_frequencies(args.head_dim, 10000.0, scaling), rtol=1e-6)
    tokens = torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(our_logits(path, tokens), our_logits(tmp_path / "hf", tokens), atol=1e-5)
    unscaled = write_gguf(tmp_path / "plain.gguf", scaled, sd)
    assert not torch.allclose(our_logits(unscaled, tokens), our_logits(tmp_path / "hf", tokens), atol=1e-3)


def test_tokenizer_from_metadata_equals_the_tiktoken_file(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", BYTE_ARGS, random_state_dict(BYTE_ARGS, seed=8))
    (tmp_path / "tokenizer.model").write_bytes(tokenizer_bytes())
    ours, reference = gguf_tokenizer(path), Tokenizer.from_file(tmp_path / "tokenizer.model")
    for text in ["hello world", "héllo\n\nwörld 🙂 123", "<|eot_id|> stays text"]:
        assert ours.encode(text) == reference.encode(text)
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert ours.encode_chat(chat) == reference.encode_chat(chat)  # no template in the file: Llama 3's format
    assert ours.stop_ids == reference.stop_ids and ours.bos_id == reference.bos_id


def test_chat_template_from_metadata(tmp_path):
    template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}<|eot_id|>{% endfor %}"
                "{% if add_generation_prompt %}[assistant]{% endif %}")
    path = write_gguf(tmp_path / "m.gguf", BYTE_ARGS, random_state_dict(BYTE_ARGS, seed=8), template=template)
    tok = gguf_tokenizer(path)
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert ids == [256, *b"[user]hi", 256 + 9, *b"[assistant]"]


def write_data(path: Path) -> Path:
    path.write_text(json.dumps(chats(("Hello there, how are you?", "Fine."), ("Name a colour.", "Blue."))))
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli.main("paged", list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_runs_a_gguf_as_the_same_weights_in_hf_format(tmp_path, capsys):
    sd = random_state_dict(BYTE_ARGS, seed=9)
    (tmp_path / "model").mkdir()
    gguf_path = write_gguf(tmp_path / "model" / "m.gguf", BYTE_ARGS, sd)
    save_hf(sd, BYTE_ARGS, tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.model").write_bytes(tokenizer_bytes())
    data = write_data(tmp_path / "data.json")
    texts = []
    for model in (gguf_path, tmp_path / "model", tmp_path / "hf"):  # the file, the folder holding it, HF
        out_json = tmp_path / f"{model.name}.json"
        status, out, err = run_cli(capsys, "2", "--model", str(model), "--data", str(data), "--max-new-tokens", "5",
                                   "--json", str(out_json), "--no-progress")
        assert status == 0, err
        texts.append([r["text"] for r in json.loads(out_json.read_text())["requests"]])
        if model != tmp_path / "hf":
            assert "GGUF F32 100%, dequantized to float32: the KV cache and matmuls run in float32" in out
    assert texts[0] == texts[1] == texts[2]


def test_simulate_plans_for_a_gguf_from_its_metadata(tmp_path, capsys, monkeypatch):
    """--simulate takes a GGUF, the file or its folder, as it takes a config: the shape from the
    metadata (no tensor read), the prompts measured with the GGUF's own tokenizer."""
    sd = random_state_dict(BYTE_ARGS, seed=9)
    (tmp_path / "model").mkdir()
    gguf_path = write_gguf(tmp_path / "model" / "m.gguf", BYTE_ARGS, sd)
    save_hf(sd, BYTE_ARGS, tmp_path / "hf")
    data = write_data(tmp_path / "data.json")
    monkeypatch.setattr(gguf_checkpoint, "dequantized_state_dict", lambda *a: pytest.fail("a tensor was read"))
    plans = []
    for target in (gguf_path, tmp_path / "model"):
        out_json = tmp_path / f"{target.name}.json"
        status, out, err = run_cli(capsys, "2", "--simulate", str(target), "--kv-cache-gb", "0.0001", "--data",
                                   str(data), "--json", str(out_json), "--no-progress")
        assert status == 0, err
        assert "lengths measured with the GGUF's own tokenizer" in out
        doc = json.loads(out_json.read_text())
        plans.append((doc["memory"], doc["scheduler"], doc["timeline"]))
    assert plans[0] == plans[1]
    status, out, err = run_cli(capsys, "2", "--simulate", str(tmp_path / "hf" / "config.json"), "--kv-cache-gb",
                               "0.0001", "--data", str(data), "--no-progress")
    assert status == 0 and "lengths measured with the demo tokenizer" in out  # a config alone: the stand-in


def one_line_error(capsys, model: Path, tmp_path: Path, *keywords: str) -> str:
    status, out, err = run_cli(capsys, "1", "--model", str(model), "--data", str(write_data(tmp_path / "d.json")),
                               "--max-new-tokens", "2", "--no-progress")
    assert status == 1 and "Traceback" not in out + err and "loading" not in out, (status, out, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for keyword in keywords:
        assert keyword in err, err
    return err


def test_bad_gguf_files_are_one_line(tmp_path, capsys):
    sd = random_state_dict(BYTE_ARGS, seed=10)
    good = write_gguf(tmp_path / "good.gguf", BYTE_ARGS, sd).read_bytes()
    one_line_error(capsys, write_gguf(tmp_path / "q.gguf", BYTE_ARGS, sd, arch="qwen2"), tmp_path,
                   "is a 'qwen2' model", "llama architecture")
    (tmp_path / "cut.gguf").write_bytes(good[:len(good) // 2])
    one_line_error(capsys, tmp_path / "cut.gguf", tmp_path, "truncated or corrupt", "re-download")
    (tmp_path / "cut2.gguf").write_bytes(good[:200])
    one_line_error(capsys, tmp_path / "cut2.gguf", tmp_path, "truncated or corrupt")
    (tmp_path / "text.gguf").write_text("not a model")
    one_line_error(capsys, tmp_path / "text.gguf", tmp_path, "is not a GGUF file")
    one_line_error(capsys, write_gguf(tmp_path / "spm.gguf", BYTE_ARGS, sd, tokenizer="llama"), tmp_path,
                   "'llama' tokenizer (SentencePiece", "byte-level BPE")
    one_line_error(capsys, write_gguf(tmp_path / "pre.gguf", BYTE_ARGS, sd, pre="deepseek-coder"), tmp_path,
                   "'deepseek-coder' pre-tokenizer")
    one_line_error(capsys, write_gguf(tmp_path / "moe.gguf", BYTE_ARGS, sd, metadata={"llama.expert_count": 8}),
                   tmp_path, "mixture-of-experts")
    one_line_error(capsys, write_gguf(tmp_path / "split.gguf", BYTE_ARGS, sd, metadata={"split.count": 3}),
                   tmp_path, "split GGUF", "llama-gguf-split --merge")
    wrong = write_gguf(tmp_path / "heads.gguf", BYTE_ARGS, sd, metadata={"llama.attention.head_count_kv": 4})
    one_line_error(capsys, wrong, tmp_path, "blk.0.attn_k.weight (layers.0.attention.wk.weight) has shape (32, 64)",
                   "the config implies (64, 64)")
    several = tmp_path / "several"
    several.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (several / name).write_bytes(good)
    one_line_error(capsys, several, tmp_path, "holds 2 GGUF files", "--model")


def test_unsupported_quantization_is_one_line(tmp_path, capsys):
    """IQ2_XXS, which gguf can read, and a type number gguf does not know at all."""
    args = QUANT_ARGS
    sd = random_state_dict(args, seed=11)
    path = write_gguf(tmp_path / "iq.gguf", args, sd, Q.Q8_0)
    blob = bytearray(path.read_bytes())
    name = b"blk.0.attn_q.weight"
    at = blob.index(name) + len(name)  # then: n_dims (u32), dims (u64 each), type (u32)
    type_at = at + 4 + 8 * struct.unpack_from("<I", blob, at)[0]
    assert struct.unpack_from("<I", blob, type_at)[0] == Q.Q8_0
    struct.pack_into("<I", blob, type_at, 99)
    (tmp_path / "unknown.gguf").write_bytes(bytes(blob))
    one_line_error(capsys, tmp_path / "unknown.gguf", tmp_path, "quantization type 99", "does not know")
    iq = write_iq_gguf(tmp_path / "iq2.gguf", args, sd)
    one_line_error(capsys, iq, tmp_path, "IQ2_XXS", "does not dequantize", "Q8_0")


def write_iq_gguf(path: Path, args: ModelArgs, sd: dict[str, torch.Tensor]) -> Path:
    """The attention's wq as IQ2_XXS bytes (zeros: the check refuses the type before reading them)."""
    path = write_gguf(path, args, sd)
    reader_path = path.with_name("iq_src.gguf")
    path.rename(reader_path)
    r = gguf.GGUFReader(reader_path)
    w = gguf.GGUFWriter(path, "llama")
    for field in r.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value, vtype = field.contents(), field.types
        if vtype[0] == gguf.GGUFValueType.ARRAY:
            w.add_array(field.name, value)
        else:
            w.add_key_value(field.name, value, vtype[0])
    for t in r.tensors:
        if t.name == "blk.0.attn_q.weight":
            block, size = gguf.GGML_QUANT_SIZES[Q.IQ2_XXS]
            rows, cols = int(t.shape[1]), int(t.shape[0])
            w.add_tensor(t.name, np.zeros((rows, cols // block * size), np.uint8), raw_dtype=Q.IQ2_XXS)
        else:
            w.add_tensor(t.name, np.asarray(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_chat_template_that_fails_is_one_line(tmp_path, capsys):
    sd = random_state_dict(BYTE_ARGS, seed=12)
    refusing = "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    one_line_error(capsys, write_gguf(tmp_path / "r.gguf", BYTE_ARGS, sd, template=refusing), tmp_path,
                   "chat template", "failed to render", "roles must alternate")
    one_line_error(capsys, write_gguf(tmp_path / "s.gguf", BYTE_ARGS, sd, template="{% for m in messages %}"),
                   tmp_path, "chat template", "not valid jinja2")


def test_missing_metadata_names_the_key(tmp_path):
    sd = random_state_dict(BYTE_ARGS, seed=13)
    path = write_gguf(tmp_path / "m.gguf", BYTE_ARGS, sd, tokenizer="gpt2")
    blob = path.read_bytes().replace(b"llama.block_count", b"llama.blockXcount")
    (tmp_path / "n.gguf").write_bytes(blob)
    with pytest.raises(UserError, match="lacks the metadata key llama.block_count"):
        load_checkpoint(tmp_path / "n.gguf")
