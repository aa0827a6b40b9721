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
