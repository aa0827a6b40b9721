"""A fake OpenAI-compatible server for scoring tests: it answers every question correctly, or always "A".

Tokens are characters (id = ord); /tokenize can be switched off to exercise the text_offset path. It knows
each question's gold answer from the fixture, finds the last question in a prompt, and answers:
- /v1/completions with echo: the continuation's characters get -0.1 when it is the chosen answer, else -5;
- /v1/chat/completions: content in a real phrasing; reasoning_content names a different (wrong) answer, so
  scoring the chain of thought would show;
- /v1/completions without echo: the answer as text (raw generation).
`fail_first` makes the first N requests fail with 503 (transient); the client must retry them.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeEndpoint:
    def __init__(self, golds: dict[str, str], behaviour: str = "correct", tokenize: bool = True, fail_first: int = 0):
        self.golds, self.behaviour, self.tokenize, self.fail_first = golds, behaviour, tokenize, fail_first
        self.requests = 0
        self.lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, payload = endpoint.handle(self.path, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def answer_for(self, prompt: str) -> str:
        if self.behaviour == "always_a":
            return "A"
        key = max((k for k in self.golds if k in prompt), key=prompt.rfind)
        return self.golds[key]

    def handle(self, path: str, body: dict) -> tuple[int, dict]:
        with self.lock:
            self.requests += 1
            if self.requests <= self.fail_first:
                return 503, {"error": {"message": "busy", "type": "service_unavailable"}}
        if body.get("model") == "reject":
            return 400, {"error": {"message": "bad model", "type": "invalid_request_error"}}
        if path == "/tokenize":
            if not self.tokenize:
                return 404, {"detail": "Not Found"}
            return 200, {"tokens": [ord(c) for c in body["prompt"]]}
        if path == "/v1/chat/completions":
            question = body["messages"][-1]["content"]
            answer = self.answer_for(question)
            wrong = "D" if answer != "D" else "C"
            content = f"答案是 {answer}" if "答案" in question else f"The answer is {answer}"
            if answer.lstrip("-").isdigit():
                content = f"So the total is \\boxed{{{answer}}}."
            message = {"role": "assistant", "reasoning_content": f"Hmm, the answer is {wrong}.", "content": content}
            return 200, {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
        if path == "/v1/completions":
            prompt = body["prompt"]
            text = "".join(map(chr, prompt)) if isinstance(prompt, list) else prompt
            if not body.get("echo"):
                answer = self.answer_for(text)
                return 200, {"choices": [{"index": 0, "text": f" {answer}\n\nQuestion: next", "finish_reason": "stop"}]}
            cue = max(text.rfind("答案："), text.rfind("Answer:"))
            cue_end = text.index("：", cue) + 1 if text[cue] == "答" else cue + len("Answer:")
            context, continuation = text[:cue_end], text[cue_end:]
            chosen = self.answer_for(context)
            scores = [None] + [-1.0] * (len(context) - 1)
            scores += [-0.1 if continuation.strip() == chosen else -5.0] * len(continuation)
            tokens = list(text) + ["\n"]
            return 200, {"choices": [{"index": 0, "text": text + "\n", "finish_reason": "length", "logprobs": {
                "tokens": tokens, "token_logprobs": scores + [-2.0], "text_offset": list(range(len(tokens))),
                "top_logprobs": [None] * len(tokens)}}]}
        return 404, {"detail": "Not Found"}
