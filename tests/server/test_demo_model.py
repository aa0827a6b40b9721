"""The built-in demo model behind `dsserve serve` with no model: it reasons, answers, and scores >= 95%."""

import subprocess
import sys


def test_answers_a_task_with_reasoning(demo_server):
    client = demo_server.client()
    assert [m.id for m in client.models.list().data] == ["dsserve-demo-r1"]
    for question, answer in [("Which is larger, 9.11 or 9.8?", "9.8"), ("计算 478 + 596 等于多少？", "1074"),
                             ("How many times does the letter 'r' appear in 'strrawr'?", "3")]:
        r = client.chat.completions.create(model="dsserve-demo-r1", messages=[{"role": "user", "content": question}],
                                           temperature=0, max_tokens=400)
        message = r.choices[0].message
        assert message.content.strip() == answer, (question, message)
        assert message.reasoning_content and "</think>" not in message.reasoning_content


def test_demo_task_through_the_server(demo_server, tmp_path):
    out = subprocess.run([sys.executable, "-m", "dsserve.cli", "eval", "--task", "demo", "--base-url",
                          demo_server.url, "--model", "dsserve-demo-r1", "--concurrency", "32",
                          "--output", str(tmp_path / "demo.json")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    import json

    report = json.loads((tmp_path / "demo.json").read_text())
    assert report["total"] >= 500 and report["mode"] == "generate"
    assert report["accuracy"] >= 0.95, out.stdout
