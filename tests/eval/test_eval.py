"""`dsserve eval`: official file layouts, exact scores against a fake endpoint, answer extraction, retries."""

import csv
import json

import pytest
from fake_endpoint import FakeEndpoint
from typer.testing import CliRunner

from dsserve.cli import app
from dsserve.errors import ConfigError, DsserveError
from dsserve.eval import HTTPBackend, evaluate, load
from dsserve.eval.extract import extract_choice, extract_number

CEVAL = {"computer_network": "ABCD", "art_studies": "AAB"}
MMLU = {"astronomy": "BAC", "college_mathematics": "DD"}
GSM8K = ["1,234", "-7", "12", "3.5"]


def _write_csv(path, rows, header=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaldata")
    golds = {}
    header = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    for subject, answers in CEVAL.items():
        _write_csv(root / "ceval" / "dev" / f"{subject}_dev.csv",
                   [[i, f"示例-{subject}-{i} 哪个对？", "甲", "乙", "丙", "丁", "ABCDA"[i], "因为"] for i in range(5)], header)
        rows = []
        for i, gold in enumerate(answers):
            question = f"考题-{subject}-{i}：下列哪个正确？"
            golds[question] = gold
            rows.append([i, question, "一", "二", "三", "四", gold])
        _write_csv(root / "ceval" / "val" / f"{subject}_val.csv", rows, header[:-1])
    (root / "ceval" / "subject_mapping.json").write_text(json.dumps(
        {"computer_network": ["Computer Network", "计算机网络", "STEM"], "art_studies": ["Art Studies", "艺术学", "Humanities"]},
        ensure_ascii=False))
    for subject, answers in MMLU.items():
        _write_csv(root / "mmlu" / "data" / "dev" / f"{subject}_dev.csv",
                   [[f"Example {subject} {i}?", "w", "x", "y", "z", "BCDAB"[i]] for i in range(5)])
        rows = []
        for i, gold in enumerate(answers):
            question = f"Test question {subject} {i}: which holds?"
            golds[question] = gold
            rows.append([question, "one", "two", "three", "four", gold])
        _write_csv(root / "mmlu" / "data" / "test" / f"{subject}_test.csv", rows)
    gsm = root / "gsm8k"
    gsm.mkdir()
    with open(gsm / "train.jsonl", "w") as f:
        for i in range(5):
            f.write(json.dumps({"question": f"Shot problem {i}?", "answer": f"Work {i}.\n#### {i}"}) + "\n")
    with open(gsm / "test.jsonl", "w") as f:
        for i, answer in enumerate(GSM8K):
            question = f"Word problem number {i}: how many?"
            golds[question] = answer.replace(",", "")
            f.write(json.dumps({"question": question, "answer": f"Steps <<1+1=2>>.\n#### {answer}"}) + "\n")
    return root, golds


def _expected_always_a(task):
    if task == "ceval":
        answers = "".join(CEVAL.values())
    elif task == "mmlu":
        answers = "".join(MMLU.values())
    else:
        return 0.0
    return answers.count("A") / len(answers)


@pytest.mark.parametrize("task, mode", [("ceval", "loglikelihood"), ("ceval", "generate"), ("mmlu", "loglikelihood"),
                                        ("mmlu", "generate"), ("gsm8k", "generate")])  # GSM8K answers are free-form
@pytest.mark.parametrize("behaviour", ["correct", "always_a"])
def test_scores_against_a_fake_endpoint(data, task, mode, behaviour):
    root, golds = data
    items = load(task, root / task, shots=5)
    with FakeEndpoint(golds, behaviour) as fake:
        backend = HTTPBackend(fake.url, "m", concurrency=3)
        report = evaluate(task, items, backend, mode, 5)
    assert report.total == len(items) == {"ceval": 7, "mmlu": 5, "gsm8k": 4}[task]
    expected = 1.0 if behaviour == "correct" else _expected_always_a(task)
    assert report.accuracy == pytest.approx(expected)
    if task == "gsm8k" and behaviour == "always_a":
        assert report.unparseable == 4  # "The answer is A" names no number
    else:
        assert report.unparseable == 0
    if task == "ceval" and behaviour == "always_a":
        by_subject = {s.subject: s for s in report.subjects}
        assert by_subject["computer_network"].accuracy == 0.25 and by_subject["art_studies"].correct == 2
        assert report.macro_accuracy == pytest.approx((0.25 + 2 / 3) / 2)


def test_reasoning_content_is_never_scored(data):
    """The fake's reasoning_content always names a wrong letter; only content may count."""
    root, golds = data
    with FakeEndpoint(golds) as fake:
        report = evaluate("ceval", load("ceval", root / "ceval", 0), HTTPBackend(fake.url, "m"), "generate", 0)
    assert report.accuracy == 1.0


def test_text_offsets_when_the_server_has_no_tokenize(data):
    root, golds = data
    with FakeEndpoint(golds, tokenize=False) as fake:
        report = evaluate("mmlu", load("mmlu", root / "mmlu", 5), HTTPBackend(fake.url, "m"), "loglikelihood", 5)
    assert report.accuracy == 1.0


def test_raw_completion_generation(data):
    root, golds = data
    with FakeEndpoint(golds) as fake:
        report = evaluate("gsm8k", load("gsm8k", root / "gsm8k", 5), HTTPBackend(fake.url, "m"), "generate", 5,
                          chat=False)
    assert report.accuracy == 1.0


def test_transient_failures_are_retried_and_others_reported(data):
    root, golds = data
    items = load("mmlu", root / "mmlu", 0)
    with FakeEndpoint(golds, fail_first=4) as fake:
        report = evaluate("mmlu", items, HTTPBackend(fake.url, "m", concurrency=2, max_retries=3), "generate", 0)
        assert report.accuracy == 1.0 and fake.requests == 4 + len(items)
    with FakeEndpoint(golds) as fake, pytest.raises(DsserveError, match="rejected the request.*HTTP 400"):
        evaluate("mmlu", items, HTTPBackend(fake.url, "reject"), "generate", 0)
    with FakeEndpoint(golds, fail_first=100) as fake, pytest.raises(DsserveError, match="failed 2 times.*503"):
        evaluate("mmlu", items, HTTPBackend(fake.url, "m", max_retries=1), "generate", 0)


def test_official_layouts_and_prompts(data, tmp_path):
    root, _ = data
    ceval = load("ceval", root / "ceval", 5)
    assert [i.subject for i in ceval] == ["art_studies"] * 3 + ["computer_network"] * 4  # sorted, file order
    prompt = ceval[3].prompt
    assert prompt.startswith("以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n\n示例-computer_network-0 哪个对？\nA. 甲")
    assert prompt.count("\n答案： ") == 5 and prompt.endswith("考题-computer_network-0：下列哪个正确？\nA. 一\nB. 二\nC. 三\nD. 四\n答案：")
    assert ceval[3].choices == (" A", " B", " C", " D") and ceval[3].gold == "A"
    mmlu = load("mmlu", root / "mmlu", 1, limit=1)
    assert len(mmlu) == 2 and mmlu[0].prompt.startswith(
        "The following are multiple choice questions (with answers) about astronomy.\n\nExample astronomy 0?\nA. w")
    assert mmlu[0].prompt.endswith("\nD. four\nAnswer:") and "\nAnswer: B\n\n" in mmlu[0].prompt
    gsm = load("gsm8k", root / "gsm8k" / "test.jsonl", 2)
    assert gsm[0].gold == "1234" and gsm[0].prompt.startswith("Question: Shot problem 0?\nAnswer: Work 0.\n#### 0\n\n")
    assert gsm[0].prompt.endswith("Question: Word problem number 0: how many?\nAnswer:")
    with pytest.raises(ConfigError, match="6-shot needs 6 examples"):
        load("ceval", root / "ceval", 6)
    with pytest.raises(ConfigError, match="no .*_val.csv files"):
        load("ceval", tmp_path, 0)
    bad = tmp_path / "bad" / "test"
    _write_csv(bad / "x_test.csv", [["q", "a", "b", "c", "d", "E"]])
    with pytest.raises(ConfigError, match="answer 'E' is not one of"):
        load("mmlu", tmp_path / "bad", 0)
    with pytest.raises(ConfigError, match="free-form answers"):
        evaluate("gsm8k", gsm, None, "loglikelihood", 0)


@pytest.mark.parametrize("text, letter", [
    ("答案是 B", "B"), ("答案：C", "C"), ("答案为（A）", "A"), ("正确答案是D。", "D"), ("我选B", "B"),
    ("The answer is (D)", "D"), ("the correct answer is B.", "B"), ("Answer: C", "C"), ("\\boxed{A}", "A"),
    ("<think>\n答案是 A 吗？不对。\n</think>\n\n答案是 C", "C"), ("B", "B"), ("(C)", "C"), ("A. 甲", "A"),
    ("经过分析，答案应该是 B，因为……", "B"), ("I think it is either A or B.", None), ("", None), ("无法确定", None),
])
def test_choice_extraction(text, letter):
    assert extract_choice(text) == letter


@pytest.mark.parametrize("text, number", [
    ("#### 42", "42"), ("so she has \\boxed{1,234} apples", "1234"), ("The answer is $18.", "18"),
    ("The final answer is 3.50", "3.5"), ("答案是 -7", "-7"), ("<think>maybe 5</think>\n\nThe answer is 6", "6"),
    ("First 3 then 4, total 7", "7"), ("no digits", None), ("#### 12.0", "12"),
])
def test_number_extraction(text, number):
    assert extract_number(text) == number


def test_cli_writes_markdown_and_json(data, tmp_path):
    root, golds = data
    out = tmp_path / "result.json"
    with FakeEndpoint(golds, "always_a") as fake:
        result = CliRunner().invoke(app, ["eval", "--task", "mmlu", "--data", str(root / "mmlu"), "--base-url",
                                          fake.url + "/v1", "--model", "m", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "accuracy 0.2000 (1/5), unparseable 0" in result.output and "astronomy" in result.output
    report = json.loads(out.read_text())
    assert report["mode"] == "loglikelihood" and report["shots"] == 5 and report["accuracy"] == 0.2
    assert [s["subject"] for s in report["subjects"]] == ["astronomy", "college_mathematics"]
    assert len(report["records"]) == 5 and report["records"][0] == {"subject": "astronomy", "gold": "B", "predicted": "A",
                                                                     "correct": False}
