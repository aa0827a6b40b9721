"""`dsserve chat`: a terminal chat that streams the reasoning (dimmed, hideable) and then the answer.

It talks to the in-process engine or to any OpenAI-compatible server (`--url`), keeps the conversation's
history without earlier reasoning (as R1 requires), and reads one user turn per line when stdin is piped. With
`--tools FILE` (OpenAI tool definitions, against a server) it shows the model's tool calls and takes the next
lines as their results, one per call.
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

Delta = tuple[str, str]  # (reasoning text, content text); a server's stream may add a third item, tool-call deltas


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

    def __init__(self, url: str, model: str | None, api_key: str | None, tools: list[dict] | None = None):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.tools = tools
        self.name = model or self._first_model()

    def stream(self, messages: list[dict[str, str]], max_tokens: int, temperature: float | None) -> Iterator[Delta]:
        body: dict[str, Any] = {"model": self.name, "messages": messages, "max_tokens": max_tokens, "stream": True}
        if temperature is not None:
            body["temperature"] = temperature
        if self.tools:
            body["tools"] = self.tools
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
                    yield delta.get("reasoning_content") or "", delta.get("content") or "", delta.get("tool_calls") or []

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
    history: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    pending_calls: list[dict] = []  # tool calls of the last answer still waiting for their results
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
            pending_calls = []
            console.print("[dim](new conversation)[/dim]")
            continue
        if text == "/think":
            show_reasoning = not show_reasoning
            console.print(f"[dim](reasoning {'shown' if show_reasoning else 'hidden'})[/dim]")
            continue
        if pending_calls:  # this line is the result of the next tool call
            call = pending_calls.pop(0)
            history.append({"role": "tool", "tool_call_id": call["id"], "content": text})
            if pending_calls:
                console.print(f"[dim](result of {pending_calls[0]['function']['name']}:)[/dim]")
                continue
        else:
            history.append({"role": "user", "content": text})
        answer = ""
        in_reasoning = False
        calls: list[dict] = []
        try:
            for reasoning, content, *rest in backend.stream(history, max_tokens, temperature):
                for delta in rest[0] if rest else []:
                    if "id" in delta:
                        calls.append({"id": delta["id"], "type": "function",
                                      "function": {"name": delta["function"]["name"], "arguments": ""}})
                    calls[delta["index"]]["function"]["arguments"] += delta["function"].get("arguments", "")
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
        history.append({"role": "assistant", "content": answer, **({"tool_calls": calls} if calls else {})})
        for call in calls:
            console.print(f"[bold cyan]tool call[/bold cyan] {call['function']['name']}({call['function']['arguments']})")
        if calls:
            pending_calls = list(calls)
            console.print(f"[dim](result of {calls[0]['function']['name']}:)[/dim]")
