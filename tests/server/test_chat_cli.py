"""`dsserve chat` driven through piped stdin, in-process and against a running server."""

import subprocess
import sys

from dsserve.reasoning import r1


def _run(args, stdin: str, env=None):
    return subprocess.run([sys.executable, "-m", "dsserve.cli", "chat", *args], input=stdin, capture_output=True,
                          text=True, timeout=120, env=env)


def test_piped_turns_in_process(tiny_r1):
    out = _run([str(tiny_r1), "--max-tokens", "12", "--temperature", "0", "--kv-cache-memory", "16MiB"],
               "hello\n/think\nsecond turn\n/reset\n/exit\nnever read\n")
    assert out.returncode == 0, out.stderr
    assert "Thinking:" in out.stdout  # the random model's text before any </think> is reasoning
    assert "(reasoning hidden)" in out.stdout and "(new conversation)" in out.stdout


def test_against_a_server(server):
    out = _run(["--url", server.url, "--max-tokens", "8", "--hide-reasoning"], "hi\nagain\n")
    assert out.returncode == 0, out.stderr
    assert "error" not in out.stdout


def test_history_keeps_answers_not_reasoning(tiny_r1):
    from dsserve.chat import run_chat

    class Scripted:
        name = "scripted"

        def __init__(self):
            self.seen = []

        def stream(self, messages, max_tokens, temperature):
            self.seen.append([dict(m) for m in messages])
            splitter = r1.ReasoningStream()
            text = ""
            for piece in ["thinking hard", "</think>", "\n\nanswer ", f"{len(self.seen)}"]:
                text += piece
                yield splitter.update(text, False)
            yield splitter.update(text, True)

    import io

    from rich.console import Console

    backend = Scripted()
    sys_stdin = sys.stdin
    sys.stdin = io.StringIO("one\ntwo\n")
    try:
        console = Console(file=io.StringIO(), width=200)
        run_chat(backend, show_reasoning=True, max_tokens=5, temperature=0, console=console, interactive=False)
    finally:
        sys.stdin = sys_stdin
    assert backend.seen[1] == [{"role": "user", "content": "one"}, {"role": "assistant", "content": "\n\nanswer 1"},
                               {"role": "user", "content": "two"}]
    printed = console.file.getvalue()
    assert "thinking hard" in printed and "answer 2" in printed


def test_tool_calls_are_shown_and_results_go_back():
    """A server's streamed tool calls are printed; the next lines are their results, sent as tool messages."""
    import io

    from rich.console import Console

    from dsserve.chat import run_chat

    class ToolCalling:
        name = "scripted"

        def __init__(self):
            self.seen = []

        def stream(self, messages, max_tokens, temperature):
            self.seen.append([dict(m) for m in messages])
            if len(self.seen) == 1:
                yield "", "", [{"index": 0, "id": "call_a", "type": "function",
                                "function": {"name": "get_weather", "arguments": ""}}]
                yield "", "", [{"index": 0, "function": {"arguments": '{"city": '}}]
                yield "", "", [{"index": 0, "function": {"arguments": '"Paris"}'}},
                               {"index": 1, "id": "call_b", "type": "function",
                                "function": {"name": "get_time", "arguments": "{}"}}]
            else:
                yield "", "It is sunny at noon.", []

    backend = ToolCalling()
    sys_stdin = sys.stdin
    sys.stdin = io.StringIO("weather?\nsunny\n12:00\n")
    try:
        console = Console(file=io.StringIO(), width=200)
        run_chat(backend, show_reasoning=True, max_tokens=5, temperature=0, console=console, interactive=False)
    finally:
        sys.stdin = sys_stdin
    printed = console.file.getvalue()
    assert 'tool call get_weather({"city": "Paris"})' in printed and "tool call get_time({})" in printed
    assert len(backend.seen) == 2  # the first result alone does not go to the model
    assert backend.seen[1][1:] == [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_b", "content": "12:00"}]
    assert "It is sunny at noon." in printed


def test_tools_flag_needs_a_server(tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text("[]")
    out = _run(["--tools", str(tools)], "")
    assert out.returncode != 0 and "--tools" in (out.stderr + out.stdout)
