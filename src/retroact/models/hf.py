"""Local Hugging Face causal LMs as policies: one base with per-role LoRA adapters, or full models.

Generation is our own sampling loop (not ``model.generate``) so the behaviour log-probs are
recorded from exactly the distribution each token was drawn from: log-softmax(logits / T)
after the top-p cut, renormalised; at T = 0 (greedy) those of the untempered model.

Texts become ids through the tokenizer's prompt format (``raw`` or ``chat``, see models/chat.py);
nothing here assumes one architecture or tokenizer: any causal LM that transformers loads works.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Literal, cast

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

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
from retroact.models.checkpoint import MANIFEST, is_checkpoint, load_manifest
from retroact.models.prefix_cache import CachedRow, PrefixCache, assemble, cacheable, extract

log = logging.getLogger(__name__)


class HFPolicy(TokenizerIO):
    """A planner/reflector backend on local HF models.

    ``model`` is one causal LM shared by both roles (optionally a ``PeftModel``; ``adapters``
    then names the adapter each role uses, a role left out uses the base with adapters off),
    or a role -> model mapping (full fine-tuning; the shared ablation maps both roles to one
    object). RL trainers may update the adapters or models in place between calls.
    ``prompt_format`` None uses the format stored with the tokenizer (``raw`` if none is).
    ``prefix_cache_bytes`` bounds the keys and values kept per role between calls (0: none).
    """

    def __init__(
        self,
        model: torch.nn.Module | Mapping[Role, torch.nn.Module],
        tokenizer: PreTrainedTokenizerBase,
        adapters: Mapping[Role, str] | None = None,
        *,
        name: str = "hf",
        version: int = 0,
        batch_size: int = 16,
        prompt_format: PromptFormat | None = None,
        prefix_cache_bytes: int = 1 << 30,
    ) -> None:
        self.models: dict[Role, torch.nn.Module] = (
            {r: model[r] for r in ROLES} if isinstance(model, Mapping) else dict.fromkeys(ROLES, model)
        )
        self.adapters: dict[Role, str] = dict(adapters or {})
        for role, adapter in self.adapters.items():
            peft = self.models[role]
            if not isinstance(peft, PeftModel) or adapter not in peft.peft_config:
                raise ValueError(f"role {role}: adapter {adapter!r} is not loaded on its model")
        self.tokenizer = tokenizer
        self.segments = SegmentEncoder(tokenizer, prompt_format)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id: int = pad if pad is not None else 0
        self.batch_size = batch_size
        self.prefix_cache = {role: PrefixCache(prefix_cache_bytes) for role in ROLES}
        self.info = PolicyInfo(name=name, version=version)

    @classmethod
    def load(
        cls,
        source: str | Path,
        *,
        trainable: bool = False,
        batch_size: int = 16,
        prompt_format: PromptFormat | None = None,
    ) -> HFPolicy:
        """A model directory, a hub name, or a RetroAct checkpoint (``trainable``: adapters get grads)."""
        if is_checkpoint(source):
            return _load_checkpoint(Path(source), trainable, batch_size, prompt_format)
        model = load_causal_lm(source)
        return cls(
            model,
            load_tokenizer(source),
            name=Path(source).name,
            batch_size=batch_size,
            prompt_format=prompt_format,
        )

    def generate(self, requests: Sequence[GenRequest], sampling: SamplingParams) -> list[Generation]:
        """Batched sampling per role; a request that cannot run gets a ``context`` (it does not fit) or
        ``error`` generation.

        A request that extends an earlier one (the same episode, one step later) reuses the
        earlier keys and values (:mod:`retroact.models.prefix_cache`) and feeds only its new tokens.
        """
        out: list[Generation | None] = [None] * len(requests)
        prompts: dict[int, list[int]] = {}
        for i, req in enumerate(requests):
            try:
                prompts[i] = self._prompt(req, sampling)
            except ValueError as err:
                out[i] = Generation.failed(err)
        generator = torch.Generator().manual_seed(sampling.seed)
        for role in ROLES:
            # by length (less padding), and not by what is cached: the samples must not depend on it
            todo = sorted((i for i in prompts if requests[i].role == role), key=lambda i: len(prompts[i]))
            if not todo:
                continue
            with self._role_model(role) as model:
                eos = _eos_ids(model, self.tokenizer)
                cache = self.prefix_cache[role]
                owner = (self.adapters.get(role), self.info.version, id(model))
                past = {i: cache.take(owner, prompts[i]) for i in todo}
                for start in range(0, len(todo), self.batch_size):
                    chunk = todo[start : start + self.batch_size]
                    gens, rows = _sample(
                        model,
                        [prompts[i] for i in chunk],
                        [past[i] for i in chunk],
                        sampling,
                        generator,
                        eos,
                        self.pad_id,
                        self.decode,
                    )
                    for row in rows:
                        cache.put(row)
                    for i, gen in zip(chunk, gens, strict=True):
                        out[i] = drop_end_of_turn(gen, self.prompt_format, self.decode)
        return cast(list[Generation], out)

    def clear_cache(self) -> None:
        """Forget the carried key/value caches (they also reset by themselves when the version changes)."""
        for cache in self.prefix_cache.values():
            cache.clear()

    def _prompt(self, req: GenRequest, sampling: SamplingParams) -> list[int]:
        """The request's input ids, or a ValueError saying why it cannot run."""
        if req.role not in self.models:
            raise ValueError(f"unknown role {req.role!r}")
        limit = getattr(self.models[req.role].config, "max_position_embeddings", None)
        return checked_context(req.token_ids, sampling.max_new_tokens, limit, "model")

    @contextmanager
    def _role_model(self, role: Role) -> Iterator[torch.nn.Module]:
        """The role's model in eval mode with its adapter active; all state restored afterwards.

        PEFT's ``set_adapter`` also flips ``requires_grad`` of the adapters, which would silently
        freeze one role's adapter for a trainer that shares this model, so the flags are restored.
        """
        model = self.models[role]
        with ExitStack() as stack:
            stack.callback(model.train, model.training)
            model.eval()
            if isinstance(model, PeftModel):
                grads = [(p, p.requires_grad) for p in model.parameters()]
                stack.callback(_restore_adapters, model, list(model.active_adapters), grads)
                adapter = self.adapters.get(role)
                if adapter is None:
                    stack.enter_context(model.disable_adapter())
                else:
                    model.set_adapter(adapter)
            yield model


@torch.inference_mode()
def _sample(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    past: Sequence[CachedRow | None],
    sampling: SamplingParams,
    generator: torch.Generator,
    eos_ids: set[int],
    pad_id: int,
    decode: Callable[[Sequence[int]], str],
) -> tuple[list[Generation], list[CachedRow]]:
    """Sample continuations of ``prompts`` with a KV cache, one forward per new token.

    A prompt with a cached prefix in ``past`` feeds only the rest. Finished rows are dropped from
    the batch (and the cache) as soon as they stop; their cache rows (prompt and sampled tokens
    but the last) are returned for the next call.
    """
    device = next(model.parameters()).device
    cache, past_mask = assemble(past, device)
    suffixes = [p[len(r.ids) :] if r is not None else p for p, r in zip(prompts, past, strict=True)]
    width = max(len(s) for s in suffixes)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    new_mask = torch.zeros_like(ids)
    for row, s in enumerate(suffixes):
        ids[row, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
        new_mask[row, width - len(s) :] = 1
    ids = ids.to(device)
    mask = torch.cat([past_mask, new_mask.to(device)], dim=-1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -width:]
    next_pos = mask.sum(-1)
    res = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    reuse = cacheable(res.past_key_values)
    new: list[list[int]] = [[] for _ in prompts]
    logps: list[list[float]] = [[] for _ in prompts]
    reasons: list[Literal["stop", "length", "eos"]] = ["length"] * len(prompts)
    carried: list[CachedRow] = []
    rows = list(range(len(prompts)))  # batch slot -> original row
    # A stop string first appears in text ending with the newest token, and every token is at least
    # one byte: so it lies within the last (its bytes + 1) tokens, and only those need decoding.
    window = max((len(s.encode()) for s in sampling.stop), default=0) + 1
    for step in range(sampling.max_new_tokens):
        token, logp = _pick(res.logits[:, -1].float().cpu(), sampling, generator)  # the generator is on CPU
        keep = []
        for slot, row in enumerate(rows):
            new[row].append(int(token[slot]))
            logps[row].append(float(logp[slot]))
            if new[row][-1] in eos_ids:
                reasons[row] = "eos"
            elif sampling.stop and any(s in decode(new[row][-window:]) for s in sampling.stop):
                reasons[row] = "stop"
            else:
                keep.append(slot)
        last = not keep or step == sampling.max_new_tokens - 1
        cache = res.past_key_values
        if reuse:
            kept = set() if last else set(keep)
            carried += [
                extract(cache, slot, mask[slot], [*prompts[row], *new[row][:-1]])
                for slot, row in enumerate(rows)
                if slot not in kept
            ]
        if last:
            break
        if len(keep) < len(rows):
            index = torch.tensor(keep)
            token = token[index]
            index = index.to(device)
            cache.batch_select_indices(index)
            mask, next_pos = mask[index], next_pos[index]
            rows = [rows[k] for k in keep]
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=-1)
        res = model(
            input_ids=token[:, None].to(device),
            attention_mask=mask,
            position_ids=next_pos[:, None],
            past_key_values=cache,
            use_cache=True,
        )
        next_pos = next_pos + 1
    gens = [
        Generation(text=decode(n), token_ids=n, logprobs=lp, finish_reason=r)
        for n, lp, r in zip(new, logps, reasons, strict=True)
    ]
    return gens, carried


def _pick(
    logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token per row and its log-prob under the distribution it was drawn from."""
    if sampling.temperature <= 0:
        logp = torch.log_softmax(logits, dim=-1)
        token = logp.argmax(-1)
    else:
        logp = torch.log_softmax(logits / sampling.temperature, dim=-1)
        if sampling.top_p < 1.0:
            sorted_logp, order = logp.sort(dim=-1, descending=True)
            probs = sorted_logp.exp()
            # drop a token when the more likely ones already reach top_p (the top one always stays)
            cut = (probs.cumsum(-1) - probs) >= sampling.top_p
            logp = torch.log_softmax(logp.masked_fill(cut.scatter(-1, order, cut), float("-inf")), dim=-1)
        token = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
    return token, logp.gather(-1, token[:, None]).squeeze(-1)


def _eos_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = {tokenizer.eos_token_id}
    config = getattr(model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    ids.update(extra if isinstance(extra, list) else [extra])
    return {i for i in ids if i is not None}


def _restore_adapters(
    model: PeftModel, active: list[str], grads: list[tuple[torch.nn.Parameter, bool]]
) -> None:
    model.base_model.set_adapter(active)
    for param, flag in grads:
        param.requires_grad_(flag)


def default_device() -> torch.device:
    """Where models run: ``$RETROACT_DEVICE`` (e.g. ``cpu``, ``cuda:1``), else the first GPU if any."""
    return torch.device(os.environ.get("RETROACT_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))


class ModelPathError(ValueError):
    """A model path or hub name that does not give a causal language model (the message says why)."""


def load_causal_lm(source: str | Path, *, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """``AutoModelForCausalLM`` from a local directory or a hub name on :func:`default_device`, in
    ``dtype`` (None: the checkpoint's own), with errors that say what is wrong."""
    local = Path(source).expanduser()
    if local.exists():
        if is_checkpoint(local):
            raise ModelPathError(
                f"{source} is a RetroAct checkpoint, not a base model; pass its base model "
                f"({load_manifest(local).base_model})"
            )
        if not (local / "config.json").is_file():
            raise ModelPathError(f"{source}: not a Hugging Face model directory (no config.json)")
    elif local.is_absolute() or str(source).startswith((".", "~")):
        raise ModelPathError(f"{source}: model directory not found")
    try:
        model = AutoModelForCausalLM.from_pretrained(local if local.exists() else str(source), dtype=dtype)
    except ValueError as err:
        raise ModelPathError(f"{source}: not a causal language model: {_first_line(err)}") from None
    except OSError as err:
        where = "cannot load model weights" if local.exists() else "no such directory, nor a hub model"
        raise ModelPathError(f"{source}: {where}: {_first_line(err)}") from None
    return model.to(default_device())


def load_tokenizer(source: str | Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as err:
        raise ModelPathError(f"{source}: cannot load the tokenizer: {_first_line(err)}") from None


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _load_checkpoint(
    path: Path, trainable: bool, batch_size: int, prompt_format: PromptFormat | None
) -> HFPolicy:
    """A checkpoint (see :mod:`retroact.models.checkpoint`) as a policy.

    LoRA adapters are named after their role, or ``shared`` when both roles use one directory. A
    role the checkpoint has no directory for (``retroact il`` with ``roles: [planner]``) runs the
    base model, with a warning.
    """
    manifest = load_manifest(path)
    where = path / MANIFEST
    if not manifest.roles:
        raise ValueError(f"{where}: roles: no role directory at all")
    missing = manifest.missing_roles
    if missing:
        log.warning("%s: no directory for %s; that role runs the base model", where, ", ".join(missing))
    for role, sub in manifest.roles.items():
        if not (path / sub).is_dir():
            raise FileNotFoundError(f"{where}: roles.{role}: directory {path / sub} does not exist")
    base = path / manifest.base_model  # a relative base is looked up beside the checkpoint first
    base_src = base if base.exists() else manifest.base_model
    tokenizer = load_tokenizer(path / "tokenizer" if (path / "tokenizer").is_dir() else base_src)
    policy = partial(
        HFPolicy,
        tokenizer=tokenizer,
        name=path.name,
        version=manifest.version,
        batch_size=batch_size,
        prompt_format=prompt_format,
    )
    if manifest.finetune == "full":
        by_dir = {sub: load_causal_lm(path / sub) for sub in set(manifest.roles.values())}
        models = {role: by_dir[sub] for role, sub in manifest.roles.items()}
        if missing:
            models |= dict.fromkeys(missing, load_causal_lm(base_src))
        return policy(models)
    subs = list(manifest.roles.values())
    names = {role: "shared" if subs.count(sub) > 1 else role for role, sub in manifest.roles.items()}
    model: torch.nn.Module = load_causal_lm(base_src)
    for adapter, sub in {names[role]: sub for role, sub in manifest.roles.items()}.items():
        try:
            if isinstance(model, PeftModel):
                model.load_adapter(path / sub, adapter_name=adapter, is_trainable=trainable)
            else:
                model = PeftModel.from_pretrained(
                    model, path / sub, adapter_name=adapter, is_trainable=trainable
                )
        except (OSError, ValueError) as err:
            raise ValueError(f"{where}: {path / sub}: cannot load the LoRA adapter: {err}") from err
    return policy(model, adapters=names)
