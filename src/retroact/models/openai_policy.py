"""Any OpenAI-compatible chat endpoint (OpenAI, vLLM, llama.cpp, ...) as a text-only policy."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai

from retroact.models.base import Generation, GenRequest, PolicyInfo, Role, SamplingParams

RETRY_STATUS = {408, 409, 429}
"""Besides every 5xx: statuses worth another try (timeouts, conflicts, rate limits)."""


class OpenAIPolicy:
    """Chat completions with the request text as the user message.

    ``system`` (one text, or one per role) is sent as the system message, e.g. instructions
    plus few-shot exemplars for an expert. Each call has a timeout and is retried with
    exponential backoff on timeouts, connection errors, 429 and 5xx; a call that still fails
    becomes an ``error`` generation. Endpoints drop the matched stop string, so when exactly one
    stop string is set and the model stopped, it is appended back: action lines end in "\\n" as
    with the other backends.
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

    @property
    def tokenized(self) -> bool:
        return False

    def encode(self, text: str, *, first: bool = False) -> list[int] | None:
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
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 60.0))
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
            if finish == "length":
                return Generation(text=text, finish_reason="length")
            if len(sampling.stop) == 1 and not text.endswith(sampling.stop[0]):
                text += sampling.stop[0]
            return Generation(text=text, finish_reason="stop")
        return _error(f"gave up after {self.retries + 1} attempts; last: {problem}")


def _error(message: str) -> Generation:
    return Generation(text="", finish_reason="error", error=message)
