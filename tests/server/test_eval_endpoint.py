"""`dsserve eval` against dsserve's own server agrees with the in-process engine on the same model."""

import csv

import pytest

from dsserve.eval import HTTPBackend, InProcessBackend, evaluate, load


@pytest.fixture(scope="module")
def ceval_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ceval")
    for split, count in (("dev", 2), ("val", 5)):
        (root / split).mkdir()
        with open(root / split / f"logic_{split}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["id", "question", "A", "B", "C", "D", "answer"])
            for i in range(count):
                w.writerow([i, f"第{i}题 {split}：1+{i}=?", str(i), str(i + 1), str(i + 2), str(i + 3), "B"])
    return root


def test_loglikelihood_matches_in_process(server, tiny_llm, ceval_dir):
    items = load("ceval", ceval_dir, 1)
    local = InProcessBackend(tiny_llm)
    remote = HTTPBackend(server.url, "DeepSeek-R1", concurrency=4)
    requests = [(i.prompt, c) for i in items for c in i.choices]
    ours = local.loglikelihood(requests, lambda n: None)
    theirs = remote.loglikelihood(requests, lambda n: None)
    assert ours == pytest.approx(theirs, abs=1e-3)
    assert all(v < 0 for v in ours)
    a, b = (evaluate("ceval", items, backend, "loglikelihood", 1) for backend in (local, remote))
    assert [r["predicted"] for r in a.records] == [r["predicted"] for r in b.records]


def test_generation_matches_in_process(server, tiny_llm, ceval_dir):
    items = load("ceval", ceval_dir, 0)
    local = InProcessBackend(tiny_llm)
    remote = HTTPBackend(server.url, "DeepSeek-R1", concurrency=4)
    ours = local.generate([i.prompt for i in items], 12, True, None, lambda n: None)
    theirs = remote.generate([i.prompt for i in items], 12, True, None, lambda n: None)
    assert [(g.reasoning, g.content) for g in ours] == [(g.reasoning, g.content) for g in theirs]
