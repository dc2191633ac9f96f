"""OpenAIPolicy against a scripted OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from retroact.models.base import GenRequest, SamplingParams, Segment
from retroact.models.openai_policy import OpenAIPolicy


@dataclass
class Reply:
    status: int = 200
    text: str = "go to desk 1"
    finish: str = "stop"
    delay: float = 0.0
    raw: bytes | None = None
    """Sent as the body instead of a well-formed completion."""


@dataclass
class Server:
    url: str
    replies: deque[Reply] = field(default_factory=deque)
    bodies: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture
def server() -> Iterator[Server]:
    """Answers each POST with the next scripted reply; with none left it answers 503."""
    state = Server(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            state.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            reply = state.replies.popleft() if state.replies else Reply(status=503)
            time.sleep(reply.delay)
            body = {
                "id": "c1",
                "object": "chat.completion",
                "created": 0,
                "model": state.bodies[-1]["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": reply.text},
                        "finish_reason": reply.finish,
                    }
                ],
            }
            data = (
                reply.raw
                or json.dumps(body if reply.status == 200 else {"error": {"message": "boom"}}).encode()
            )
            try:
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:  # the client gave up (timeout test)
                pass

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_port}/v1"
    yield state
    httpd.shutdown()
    httpd.server_close()


def policy(server: Server, **kw: Any) -> OpenAIPolicy:
    return OpenAIPolicy("expert-model", base_url=server.url, api_key="k", backoff=0.01, **kw)


def request(text: str = "You are in a room.\n> ", role: str = "planner") -> GenRequest:
    return GenRequest(role, [Segment("prompt", text)], view=None)  # type: ignore[arg-type]


def test_success_sends_sampling_parameters(server: Server) -> None:
    server.replies.append(Reply(text="go to desk 1"))
    sampling = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=32, stop=("\n",))
    (gen,) = policy(server, system={"planner": "Act well.", "reflector": "Reflect."}).generate(
        [request()], sampling
    )
    assert gen.text == "go to desk 1\n" and gen.finish_reason == "stop" and gen.token_ids is None
    (body,) = server.bodies
    assert body["model"] == "expert-model"
    assert body["messages"] == [
        {"role": "system", "content": "Act well."},
        {"role": "user", "content": "You are in a room.\n> "},
    ]
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["stop"]) == (0.7, 0.9, 32, ["\n"])


def test_length_finish_and_several_stops_keep_text_as_sent(server: Server) -> None:
    server.replies.extend([Reply(text="I failed because", finish="length"), Reply(text="Plan: open it")])
    pol = policy(server, concurrency=1)
    gens = pol.generate([request(), request()], SamplingParams(stop=("\n", "Obs")))
    assert [(g.text, g.finish_reason) for g in gens] == [
        ("I failed because", "length"),
        ("Plan: open it", "stop"),
    ]
    assert "top_p" not in server.bodies[0] and server.bodies[0]["messages"][0]["role"] == "user"


def test_server_error_is_retried(server: Server) -> None:
    server.replies.extend([Reply(status=500), Reply(status=429), Reply(text="look")])
    (gen,) = policy(server, retries=2).generate([request()], SamplingParams())
    assert gen.text == "look\n" and len(server.bodies) == 3


def test_client_error_is_not_retried(server: Server) -> None:
    server.replies.extend([Reply(status=400), Reply(text="never sent")])
    (gen,) = policy(server).generate([request()], SamplingParams())
    assert gen.finish_reason == "error" and "HTTP 400" in (gen.error or "") and len(server.bodies) == 1


def test_malformed_reply_becomes_error_generation(server: Server) -> None:
    server.replies.extend([Reply(raw=b'{"choices": []}'), Reply(raw=b"not json")])
    gens = policy(server, concurrency=1).generate([request(), request()], SamplingParams())
    assert [g.finish_reason for g in gens] == ["error", "error"] and len(server.bodies) == 2
    assert "IndexError" in (gens[0].error or "")


def test_timeout_becomes_error_generation(server: Server) -> None:
    server.replies.extend([Reply(delay=1.0), Reply(delay=1.0)])
    start = time.monotonic()
    (gen,) = policy(server, timeout=0.2, retries=1).generate([request()], SamplingParams())
    assert gen.finish_reason == "error" and gen.text == ""
    assert "2 attempts" in (gen.error or "") and "Timeout" in (gen.error or "")
    assert len(server.bodies) == 2 and time.monotonic() - start < 1.5


def test_concurrent_requests_keep_order(server: Server) -> None:
    server.replies.extend(Reply(text="ok") for _ in range(6))
    gens = policy(server, concurrency=3).generate(
        [request(f"task {i}") for i in range(6)], SamplingParams(stop=())
    )
    assert [g.text for g in gens] == ["ok"] * 6
    assert sorted(b["messages"][-1]["content"] for b in server.bodies) == [f"task {i}" for i in range(6)]


def test_needs_an_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="no endpoint"):
        OpenAIPolicy("m")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    pol = OpenAIPolicy("m")
    assert not pol.tokenized and pol.encode("x", "prompt") is None and pol.info.name == "m"
