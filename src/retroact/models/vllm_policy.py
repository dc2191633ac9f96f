"""A policy on a vLLM offline engine (GPU): the frozen base once, planner and reflector as LoRA requests.

Adapters are never updated in place: each new version (a checkpoint, or weights shipped by the RL
driver and written to a scratch directory) is registered as new ``LoRARequest`` s with fresh names
and ids, and it replaces the serving ones only after a short greedy *sanity generation* through
each new adapter succeeded. Behaviour log-probs are vLLM's ``processed_logprobs``: the sampled
token under the distribution it was drawn from (after temperature and top-p), as the HF backend
records them.

:class:`VLLMPolicy` talks to an :class:`Engine`; :class:`VLLMEngine` is the vLLM one (``pip install
'retroact[vllm]'``). Everything else here is engine-agnostic and is tested on an HF engine.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import tempfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from retroact.models.base import (
    ROLES,
    Generation,
    GenRequest,
    PolicyInfo,
    Role,
    SamplingParams,
    checked_context,
)
from retroact.models.chat import PromptFormat, SegmentEncoder, TokenizerIO, drop_end_of_turn
from retroact.models.checkpoint import MANIFEST, CheckpointManifest, load_manifest

if TYPE_CHECKING:
    from retroact.agent.rollout import PolicyState

VLLM_HINT = "pip install 'retroact[vllm]' (on a machine with a GPU)"


class VLLMSettings(BaseModel):
    """Engine settings of the ``vllm`` generation backend."""

    model_config = ConfigDict(extra="forbid")

    gpu_memory_utilization: float = Field(
        0.4, gt=0, le=1, description="GPU memory share of the engine; the trainer shares the GPU with it."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one engine spans.")
    max_model_len: int | None = Field(None, ge=16, description="Longest context; null: the model's.")
    max_lora_rank: int = Field(16, ge=1, description="At least the adapters' rank `r`.")
    dtype: str = Field("auto", description="Engine weights dtype (`auto`, `bfloat16`, `float16`).")
    enforce_eager: bool = Field(False, description="Skip CUDA graphs (less memory, slower decoding).")
    sanity_prompt: str = Field("> ", description="Prompt of the greedy check run through every new adapter.")
    sanity_tokens: int = Field(8, ge=1, description="Tokens the sanity generation samples.")


@dataclass(frozen=True)
class LoRAHandle:
    """One loaded adapter version: what a ``LoRARequest`` carries."""

    name: str
    id: int
    path: Path


@dataclass(frozen=True)
class EngineRequest:
    prompt_ids: list[int]
    adapter: LoRAHandle | None
    sampling: SamplingParams
    """``seed`` is this request's own: results do not depend on the rest of the batch."""


class Engine(Protocol):
    max_positions: int | None

    def generate(self, requests: Sequence[EngineRequest]) -> list[Generation]:
        """One generation per request (token ids, behaviour log-probs, finish reason)."""
        ...

    def close(self) -> None: ...


class AdapterError(RuntimeError):
    """New adapters could not be served; the policy keeps serving the previous ones."""


class VLLMPolicy(TokenizerIO):
    """A planner/reflector backend whose roles are LoRA adapters on one engine."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: PreTrainedTokenizerBase,
        *,
        name: str = "vllm",
        version: int = 0,
        settings: VLLMSettings | None = None,
        prompt_format: PromptFormat | None = None,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.segments = SegmentEncoder(tokenizer, prompt_format)
        self.settings = settings or VLLMSettings()
        self.info = PolicyInfo(name=name, version=version)
        self.handles: dict[Role, LoRAHandle] = {}
        self._ids = itertools.count(1)  # vLLM wants a distinct positive id per adapter
        self._scratch = Path(tempfile.mkdtemp(prefix="retroact-vllm-"))
        self._written: list[Path] = []  # adapter dirs of the serving version that we wrote

    @classmethod
    def from_checkpoint(
        cls,
        ckpt: str | Path,
        settings: VLLMSettings | None = None,
        *,
        prompt_format: PromptFormat | None = None,
    ) -> VLLMPolicy:
        """A vLLM engine on the checkpoint's base model, serving its LoRA adapters."""
        ckpt = Path(ckpt)
        manifest = _lora_manifest(ckpt)
        base = ckpt / manifest.base_model  # a relative base lives beside the checkpoint
        base_src = str(base if base.exists() else manifest.base_model)
        tokenizer_src = str(ckpt / "tokenizer" if (ckpt / "tokenizer").is_dir() else base_src)
        settings = settings or VLLMSettings()
        engine = VLLMEngine(base_src, tokenizer_src, settings)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_src)
        policy = cls(engine, tokenizer, name=ckpt.name, settings=settings, prompt_format=prompt_format)
        try:
            policy.load_checkpoint(ckpt)
        except AdapterError:
            policy.close()
            raise
        return policy

    def generate(self, requests: Sequence[GenRequest], sampling: SamplingParams) -> list[Generation]:
        """One engine call for the batch; request ``i`` samples with its own seed derived from ``i``."""
        out: list[Generation | None] = [None] * len(requests)
        batch: list[tuple[int, EngineRequest]] = []
        for i, req in enumerate(requests):
            try:
                ids = self._prompt(req, sampling)
            except ValueError as err:
                out[i] = Generation.failed(err)
                continue
            seed = zlib.crc32(f"{sampling.seed}/{i}".encode())
            batch.append((i, EngineRequest(ids, self.handles.get(req.role), replace(sampling, seed=seed))))
        if batch:
            try:
                gens = self.engine.generate([r for _, r in batch])
            except Exception as err:  # noqa: BLE001 - every episode of the batch records the failure
                gens = [_error(f"engine failed: {type(err).__name__}: {err}")] * len(batch)
            for (i, _), gen in zip(batch, gens, strict=True):
                out[i] = self._finish(gen)
        return [g for g in out if g is not None]

    def _finish(self, gen: Generation) -> Generation:
        """Text decoded as the HF backend decodes it, and a chat end-of-turn token dropped as there."""
        if not gen.token_ids:
            return gen
        gen = replace(gen, text=self.decode(gen.token_ids))
        return drop_end_of_turn(gen, self.prompt_format, self.decode)

    def _prompt(self, req: GenRequest, sampling: SamplingParams) -> list[int]:
        if req.role not in ROLES:
            raise ValueError(f"unknown role {req.role!r}")
        return checked_context(req.token_ids, sampling.max_new_tokens, self.engine.max_positions, "engine")

    # -- adapter versions
    def load_checkpoint(self, ckpt: str | Path) -> None:
        """Serve the adapters of a RetroAct LoRA checkpoint (its manifest version becomes ours)."""
        ckpt = Path(ckpt)
        manifest = _lora_manifest(ckpt)
        self.load_adapters({role: ckpt / manifest.roles[role] for role in ROLES}, manifest.version)

    def load_state(self, state: PolicyState) -> None:
        """Serve adapter weights shipped by a driver: written as PEFT adapter directories, then loaded."""
        if state.finetune != "lora":
            raise ValueError(
                "the vLLM backend serves LoRA adapters only; full models need generation backend `hf`"
            )
        dirs: dict[Role, Path] = {}
        written: dict[int, Path] = {}  # roles that share an adapter share one weights dict
        for role in ROLES:
            weights = state.weights[role]
            if id(weights) not in written:
                path = self._scratch / f"v{state.version}-{next(self._ids)}-{role}"
                _write_adapter(path, weights, state.lora_configs[role])
                written[id(weights)] = path
            dirs[role] = written[id(weights)]
        try:
            self.load_adapters(dirs, state.version)
        except AdapterError:
            for path in written.values():
                shutil.rmtree(path, ignore_errors=True)
            raise
        for path in self._written:
            shutil.rmtree(path, ignore_errors=True)
        self._written = list(written.values())

    def load_adapters(self, dirs: Mapping[Role, Path], version: int) -> None:
        """Register ``dirs`` as new LoRA requests and switch to them once each passed a sanity generation."""
        paths = {role: Path(dirs[role]) for role in ROLES}
        by_path: dict[Path, LoRAHandle] = {}
        handles: dict[Role, LoRAHandle] = {}
        for role, path in paths.items():
            rank = _adapter_rank(path)
            if rank > self.settings.max_lora_rank:
                raise AdapterError(
                    f"{path}: {role} adapter rank {rank} > vllm.max_lora_rank {self.settings.max_lora_rank}"
                )
            if path not in by_path:
                label = "shared" if list(paths.values()).count(path) > 1 else role
                uid = next(self._ids)
                by_path[path] = LoRAHandle(f"{label}-v{version}-{uid}", uid, path)
            handles[role] = by_path[path]
        self._sanity_check(list(by_path.values()), version)
        self.handles = handles
        self.info.version = version

    def _sanity_check(self, handles: list[LoRAHandle], version: int) -> None:
        prompt = self.encode(self.settings.sanity_prompt, "prompt")
        sampling = SamplingParams(temperature=0.0, max_new_tokens=self.settings.sanity_tokens, stop=())
        serving = f"still serving version {self.info.version}" if self.handles else "nothing is served"
        try:
            gens = self.engine.generate([EngineRequest(prompt, h, sampling) for h in handles])
        except Exception as err:  # noqa: BLE001 - reported with the adapters that caused it
            names = ", ".join(str(h.path) for h in handles)
            raise AdapterError(
                f"adapters {names} (version {version}) failed to load: {err}; {serving}"
            ) from err
        for handle, gen in zip(handles, gens, strict=True):
            problem = _sanity_problem(gen)
            if problem:
                raise AdapterError(
                    f"adapter {handle.path} (version {version}) failed the sanity generation: {problem}; "
                    + serving
                )

    def close(self) -> None:
        self.engine.close()
        shutil.rmtree(self._scratch, ignore_errors=True)


def _sanity_problem(gen: Generation) -> str | None:
    if gen.finish_reason == "error":
        return gen.error or "generation error"
    if not gen.token_ids:
        return "no tokens"
    if len(gen.logprobs or []) != len(gen.token_ids) or not all(math.isfinite(x) for x in gen.logprobs or []):
        return "missing or non-finite log-probs"
    return None


def _error(message: str) -> Generation:
    return Generation(text="", token_ids=[], logprobs=[], finish_reason="error", error=message)


def _lora_manifest(ckpt: Path) -> CheckpointManifest:
    manifest = load_manifest(ckpt)
    if manifest.finetune != "lora":
        raise ValueError(
            f"{ckpt / MANIFEST}: finetune is {manifest.finetune!r}; the vLLM backend serves LoRA "
            "checkpoints only (it never syncs weights in place); use generation backend `hf`"
        )
    if manifest.missing_roles:
        raise ValueError(
            f"{ckpt / MANIFEST}: no {' or '.join(manifest.missing_roles)} adapter; the vLLM backend "
            "serves one per role (generation backend `hf` runs a missing role on the base model)"
        )
    return manifest


def _adapter_rank(path: Path) -> int:
    file = path / "adapter_config.json"
    try:
        return int(json.loads(file.read_text(encoding="utf-8"))["r"])
    except (OSError, ValueError, KeyError) as err:
        raise AdapterError(f"{file}: not a readable LoRA adapter config: {err}") from None


def _write_adapter(path: Path, weights: Mapping[str, Any], config: Mapping[str, object]) -> None:
    """A PEFT adapter directory (what ``save_pretrained`` writes) from a state dict and its config."""
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(json.dumps(dict(config), indent=2, default=_jsonable))


def _jsonable(value: object) -> object:
    if isinstance(value, set | frozenset):
        return sorted(value)
    if isinstance(value, Enum):
        return value.value
    raise TypeError(f"{type(value).__name__} in a LoRA config cannot be written as JSON")


class VLLMEngine:
    """The vLLM offline engine (``vllm.LLM``) with LoRA enabled, behind the :class:`Engine` protocol."""

    def __init__(self, model: str, tokenizer: str, settings: VLLMSettings) -> None:
        try:
            from vllm import LLM
        except ImportError as err:
            raise ImportError(f"the vLLM generation backend needs vLLM: {VLLM_HINT}") from err
        positions = getattr(AutoConfig.from_pretrained(model), "max_position_embeddings", None)
        self.max_positions: int | None = settings.max_model_len or positions
        self._llm: Any = LLM(
            model=model,
            tokenizer=tokenizer,
            enable_lora=True,
            max_loras=2,  # planner and reflector in one batch (the sanity check)
            max_lora_rank=settings.max_lora_rank,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            tensor_parallel_size=settings.tensor_parallel_size,
            max_model_len=self.max_positions,
            dtype=settings.dtype,
            enforce_eager=settings.enforce_eager,
            logprobs_mode="processed_logprobs",
        )

    def generate(self, requests: Sequence[EngineRequest]) -> list[Generation]:
        from vllm import SamplingParams as VLLMSampling
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest

        params = [
            VLLMSampling(
                temperature=r.sampling.temperature,
                top_p=r.sampling.top_p,
                max_tokens=r.sampling.max_new_tokens,
                stop=list(r.sampling.stop) or None,
                include_stop_str_in_output=True,
                seed=r.sampling.seed,
                logprobs=0,  # the sampled token's log-prob only
            )
            for r in requests
        ]
        loras = [
            LoRARequest(lora_name=r.adapter.name, lora_int_id=r.adapter.id, lora_path=str(r.adapter.path))
            if r.adapter
            else None
            for r in requests
        ]
        outputs = self._llm.generate(
            [TokensPrompt(prompt_token_ids=r.prompt_ids) for r in requests],
            params,
            lora_request=loras,
            use_tqdm=False,
        )
        return [_from_vllm(o.outputs[0]) for o in outputs]

    def close(self) -> None:
        del self._llm


def _from_vllm(out: Any) -> Generation:
    ids = [int(t) for t in out.token_ids]
    logprobs = [float(step[t].logprob) for step, t in zip(out.logprobs, ids, strict=True)]
    if out.finish_reason == "length":
        reason = "length"
    elif out.finish_reason == "stop":
        reason = "eos" if out.stop_reason is None else "stop"
    else:
        return _error(f"vLLM finished with {out.finish_reason!r}")
    return Generation(text=out.text, token_ids=ids, logprobs=logprobs, finish_reason=reason)  # type: ignore[arg-type]
