"""`dsserve chat`: a terminal chat that streams the reasoning (dimmed, hideable) and then the answer.

It talks to the in-process engine or to any OpenAI-compatible server (`--url`), keeps the conversation's
history without earlier reasoning (as R1 requires), and reads one user turn per line when stdin is piped.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from rich.console import Console

from dsserve.reasoning import r1

Delta = tuple[str, str]  # (reasoning text, content text)


class InProcessBackend:
    def __init__(self, model: str, **engine_options: Any):
        from dsserve.engine.engine import LLMEngine

        self.engine = LLMEngine.from_options(model, **engine_options)
        self.name = model
        self._count = 0

    def stream(self, messages: list[dict[str, str]], max_tokens: int, temperature: float | None) -> Iterator[Delta]:
        from dsserve.engine.request import SamplingParams

        tokenizer = self.engine.tokenizer
        ids = tokenizer.encode_chat(messages)
        self._count += 1
        request_id = f"chat-{self._count}"
        self.engine.add_request(request_id, {"prompt_token_ids": ids},
                                SamplingParams(max_tokens=max_tokens, temperature=temperature))
        splitter = r1.ReasoningStream()
        try:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.request_id == request_id:
                        completion = output.outputs[0]
                        yield splitter.update(completion.text, completion.finished)
        finally:
            self.engine.abort_request(request_id)


class HTTPBackend:
    """Any OpenAI-compatible server: POST /v1/chat/completions with stream=true, read the SSE lines."""

    def __init__(self, url: str, model: str | None, api_key: str | None):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.name = model or self._first_model()

    def stream(self, messages: list[dict[str, str]], max_tokens: int, temperature: float | None) -> Iterator[Delta]:
        body: dict[str, Any] = {"model": self.name, "messages": messages, "max_tokens": max_tokens, "stream": True}
        if temperature is not None:
            body["temperature"] = temperature
        request = urllib.request.Request(self.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers=self._headers(), method="POST")
        with self._open(request) as response:
            for raw in response:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"].get("message", "server error"))
                for choice in chunk.get("choices", []):
                    delta = choice.get("delta", {})
                    yield delta.get("reasoning_content") or "", delta.get("content") or ""

    def _first_model(self) -> str:
        request = urllib.request.Request(self.url + "/v1/models", headers=self._headers())
        with self._open(request) as response:
            return json.loads(response.read())["data"][0]["id"]

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _open(self, request: urllib.request.Request):
        try:
            return urllib.request.urlopen(request, timeout=600)
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            try:
                detail = json.loads(detail)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                pass
            raise RuntimeError(f"{self.url} answered {e.code}: {detail}") from None
        except urllib.error.URLError as e:
            raise RuntimeError(f"cannot reach {self.url} ({e.reason}); is the server running?") from None


def run_chat(backend, show_reasoning: bool, max_tokens: int, temperature: float | None, system: str | None = None,
             console: Console | None = None, interactive: bool | None = None) -> None:
    """The read-answer loop. Commands: /reset (new conversation), /think (show or hide reasoning), /exit."""
    console = console or Console(highlight=False)
    interactive = sys.stdin.isatty() if interactive is None else interactive
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    if interactive:
        console.print(f"[bold]dsserve chat[/bold] with {backend.name}. /think shows or hides the reasoning, "
                      "/reset starts over, /exit or Ctrl-D quits.")
    while True:
        try:
            line = console.input("[bold green]> [/bold green]") if interactive else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            break
        if not interactive and line == "":
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            history = history[:1] if system else []
            console.print("[dim](new conversation)[/dim]")
            continue
        if text == "/think":
            show_reasoning = not show_reasoning
            console.print(f"[dim](reasoning {'shown' if show_reasoning else 'hidden'})[/dim]")
            continue
        history.append({"role": "user", "content": text})
        answer = ""
        in_reasoning = False
        try:
            for reasoning, content in backend.stream(history, max_tokens, temperature):
                if reasoning and show_reasoning:
                    if not in_reasoning:
                        console.print("[dim]Thinking:[/dim]")
                        in_reasoning = True
                    console.print(reasoning, style="dim", end="")
                if content:
                    if in_reasoning:
                        console.print()
                        in_reasoning = False
                    answer += content
                    console.print(content, end="")
        except RuntimeError as e:
            console.print(f"[bold red]error:[/bold red] {e}")
            history.pop()
            continue
        console.print()
        # R1: earlier reasoning never goes back into the conversation, only the answer.
        history.append({"role": "assistant", "content": answer})
