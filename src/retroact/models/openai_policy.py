"""Any OpenAI-compatible chat endpoint (OpenAI, vLLM, llama.cpp, ...) as a text-only policy.

As an expert (``retroact collect --expert openai:MODEL``) it adds what paid calls need: a request
budget, a resumable cache of finished calls, and strict parsing of the reply into one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai

from retroact.models.base import Generation, GenRequest, PolicyInfo, Role, SamplingParams, SegmentKind
from retroact.models.chat import split_prefix

RETRY_STATUS = {408, 409, 429}
"""Besides every 5xx: statuses worth another try (timeouts, conflicts, rate limits)."""


class BudgetExhausted(RuntimeError):
    """The request budget is spent: the run stops here, and a rerun resumes (cached calls are free)."""


class CallCache:
    """Finished API calls in a JSONL file (one ``{"key", "text", "finish"}`` line per call).

    Each call is appended and flushed as soon as it returns, so a killed or budget-stopped run
    loses nothing it paid for; a torn last line (a kill during the write) is ignored.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._calls: dict[str, tuple[str, str]] = {}
        if self.path.exists():
            lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
            for i, line in enumerate(lines, start=1):
                try:
                    row = json.loads(line)
                    self._calls[row["key"]] = (row["text"], row["finish"])
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    if i == len(lines) and not line.endswith("\n"):
                        break
                    raise ValueError(f"{self.path}:{i}: not a cached call: {err}") from None

    def __len__(self) -> int:
        return len(self._calls)

    @staticmethod
    def key(params: Mapping[str, Any]) -> str:
        return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> tuple[str, str] | None:
        return self._calls.get(key)

    def put(self, key: str, text: str, finish: str) -> None:
        with self._lock:
            self._calls[key] = (text, finish)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "text": text, "finish": finish}) + "\n")
                f.flush()
                os.fsync(f.fileno())


class OpenAIPolicy:
    """Chat completions with the request text as the user message.

    ``system`` (one text, or one per role) is sent as the system message. Each call has a
    timeout and is retried with exponential backoff on timeouts, connection errors, 429 and 5xx;
    a call that still fails becomes an ``error`` generation. Endpoints drop the matched stop
    string, so when exactly one stop string is set and the model stopped, it is appended back:
    action lines end in "\\n" as with the other backends.

    ``cache`` (a :class:`CallCache` or its path) answers a call made before (same model,
    messages and sampling settings, and seed when sampling) without sending it. ``max_requests``
    caps the HTTP requests sent, retries included; the next one raises :class:`BudgetExhausted`.
    ``strict``: a reply that stopped must be exactly one non-empty line once an echo of the
    prompt's unfinished last line (the step prefix, e.g. ``"> "``) is removed; anything else
    becomes an ``error`` generation, so an expert's malformed step fails its episode (which is
    then not kept for IL) instead of being guessed at.
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        system: str | Mapping[Role, str] | None = None,
        timeout: float = 60.0,
        retries: int = 4,
        backoff: float = 1.0,
        concurrency: int = 4,
        name: str | None = None,
        cache: CallCache | str | Path | None = None,
        max_requests: int | None = None,
        strict: bool = False,
    ) -> None:
        base_url = base_url or os.environ.get("OPENAI_BASE_URL")
        api_key = api_key or os.environ.get("OPENAI_API_KEY")
        if api_key is None and base_url is None:
            raise ValueError(
                "OpenAIPolicy: no endpoint: pass base_url or api_key, or set OPENAI_BASE_URL/OPENAI_API_KEY"
            )
        # local servers usually need no key, but the client insists on one
        self.client = openai.OpenAI(
            base_url=base_url, api_key=api_key or "none", timeout=timeout, max_retries=0
        )
        self.model = model
        self.system = system
        self.retries = retries
        self.backoff = backoff
        self.concurrency = concurrency
        self.info = PolicyInfo(name=name or model)
        self.cache = cache if isinstance(cache, CallCache) or cache is None else CallCache(cache)
        if max_requests is not None and max_requests < 0:
            raise ValueError(f"max_requests must be >= 0, got {max_requests}")
        self.max_requests = max_requests
        self.strict = strict
        self.requests_sent = 0
        self.cache_hits = 0
        self._count_lock = threading.Lock()

    @property
    def tokenized(self) -> bool:
        return False

    def encode(self, text: str, kind: SegmentKind) -> list[int] | None:
        return None

    def generate(self, requests: Sequence[GenRequest], sampling: SamplingParams) -> list[Generation]:
        if len(requests) <= 1 or self.concurrency <= 1:
            return [self._complete(r, sampling) for r in requests]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests))) as pool:
            return list(pool.map(lambda r: self._complete(r, sampling), requests))

    def _complete(self, req: GenRequest, sampling: SamplingParams) -> Generation:
        system = self.system.get(req.role) if isinstance(self.system, Mapping) else self.system
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": req.text})
        params: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": sampling.temperature,
            "max_tokens": sampling.max_new_tokens,
        }
        if sampling.top_p < 1.0:
            params["top_p"] = sampling.top_p
        if sampling.stop:
            params["stop"] = list(sampling.stop)
        key = CallCache.key({**params, "seed": sampling.seed} if sampling.temperature > 0 else params)
        cached = self.cache.get(key) if self.cache is not None else None
        if cached is not None:
            with self._count_lock:
                self.cache_hits += 1
            return self._reply(req, sampling, *cached)
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 60.0))
            self._spend()
            try:
                choice = self.client.chat.completions.create(**params).choices[0]
                text, finish = choice.message.content or "", choice.finish_reason
            except openai.APIConnectionError as err:  # includes timeouts
                problem = f"{type(err).__name__}: {err}"
                continue
            except openai.APIStatusError as err:
                problem = f"HTTP {err.status_code}: {err.message}"
                if err.status_code >= 500 or err.status_code in RETRY_STATUS:
                    continue
                return _error(problem)
            except Exception as err:  # a malformed reply must not end the run either
                return _error(f"{type(err).__name__}: {err}")
            if self.cache is not None:
                self.cache.put(key, text, str(finish))
            return self._reply(req, sampling, text, str(finish))
        return _error(f"gave up after {self.retries + 1} attempts; last: {problem}")

    def _spend(self) -> None:
        with self._count_lock:
            if self.max_requests is not None and self.requests_sent >= self.max_requests:
                raise BudgetExhausted(
                    f"{self.info.name}: request budget of {self.max_requests} exhausted; "
                    "run again to go on (calls already answered are cached)"
                )
            self.requests_sent += 1

    def _reply(self, req: GenRequest, sampling: SamplingParams, text: str, finish: str) -> Generation:
        if finish == "length":
            return Generation(text=text, finish_reason="length")
        if self.strict:
            line = strict_line(text, split_prefix(req.text)[1])
            if line is None:
                return _error(f"expected one line of text, got {text!r}")
            text = line
        if len(sampling.stop) == 1 and not text.endswith(sampling.stop[0]):
            text += sampling.stop[0]
        return Generation(text=text, finish_reason="stop")


def strict_line(text: str, prefix: str) -> str | None:
    """The reply's only non-empty line without an echoed ``prefix``; None if there is not exactly one."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != 1:
        return None
    line, echo = lines[0], prefix.strip()
    if echo and line.startswith(echo):
        line = line[len(echo) :].strip()
    return line or None


def _error(message: str) -> Generation:
    return Generation(text="", finish_reason="error", error=message)
