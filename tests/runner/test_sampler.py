"""The sampler on hand-made logits: distribution, truncation (top-k / top-p / min-p), penalties, seeds."""

import math
from types import SimpleNamespace

import pytest
import torch

from dsserve import SamplingParams
from dsserve.runner.sampler import SamplingMetadata, sample

PROBS = torch.tensor([0.05, 0.0, 0.5, 0.3, 0.15])


def _rows(count: int, **params):
    p = SamplingParams(**{"temperature": 1.0, "top_p": 1.0, "top_k": 0, **params})
    return [SimpleNamespace(params=p, output_token_ids=[], all_token_ids=[0], eos_token_ids=(1,), generator=None,
                            num_output_tokens=0) for _ in range(count)]


def _draw(rows, logits, seed=0):
    meta = SamplingMetadata.from_requests(rows, logits.shape[1], torch.device("cpu"))
    return sample(logits.clone(), meta, torch.Generator().manual_seed(seed)).token_ids


def _frequencies(tokens, vocab):
    return torch.bincount(tokens, minlength=vocab).float() / len(tokens)


def test_samples_follow_the_distribution():
    n = 40000
    freq = _frequencies(_draw(_rows(n), PROBS.log().repeat(n, 1)), 5)
    torch.testing.assert_close(freq, PROBS, atol=0.01, rtol=0)


@pytest.mark.parametrize("params,allowed", [
    pytest.param({"top_k": 2}, {2, 3}, id="top_k"),
    pytest.param({"top_p": 0.7}, {2, 3}, id="top_p"),  # 0.5 < 0.7 needs the second token, not the third
    pytest.param({"top_p": 0.5}, {2}, id="top_p-exact-mass"),
    pytest.param({"min_p": 0.4}, {2, 3}, id="min_p"),  # 0.4 * 0.5 = 0.2 drops 0.15 and 0.05
    pytest.param({"temperature": 0.0}, {2}, id="greedy"),
])
def test_truncation(params, allowed):
    n = 4000
    tokens = set(_draw(_rows(n, **params), PROBS.log().repeat(n, 1)).tolist())
    assert tokens == allowed


def test_temperature_sharpens():
    n = 20000
    freq = _frequencies(_draw(_rows(n, temperature=0.5), PROBS.log().repeat(n, 1)), 5)
    expected = PROBS**2 / (PROBS**2).sum()
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)


def test_penalties():
    logits = torch.tensor([[2.0, -1.0, 1.0, 0.5]])
    rows = _rows(1, temperature=0.0, presence_penalty=1.5, frequency_penalty=0.5)
    rows[0].output_token_ids = [0, 0, 2]
    rows[0].all_token_ids = [3, 0, 0, 2]
    meta = SamplingMetadata.from_requests(rows, 4, torch.device("cpu"))
    # token 0: 2 - 1.5 - 2 * 0.5 = -0.5; token 2: 1 - 1.5 - 0.5 = -1.0; token 3 unseen in the output: 0.5
    assert sample(logits.clone(), meta).token_ids.tolist() == [3]
    rep = _rows(1, temperature=0.0, repetition_penalty=4.0)
    rep[0].all_token_ids = [0, 3]  # 2.0 / 4 = 0.5, 0.5 / 4: token 2 (1.0) now wins
    meta = SamplingMetadata.from_requests(rep, 4, torch.device("cpu"))
    assert sample(logits.clone(), meta).token_ids.tolist() == [2]


def test_min_tokens_bans_eos_and_stop_ids():
    logits = torch.tensor([[0.0, 9.0, 8.0, 1.0]])
    rows = _rows(1, temperature=0.0, min_tokens=2, stop_token_ids=[2])
    meta = SamplingMetadata.from_requests(rows, 4, torch.device("cpu"))
    assert sample(logits.clone(), meta).token_ids.tolist() == [3]


def test_seeded_rows_ignore_their_neighbours():
    n = 6
    rows = _rows(n)
    for i, row in enumerate(rows):
        row.generator = torch.Generator().manual_seed(100 + i) if i % 2 == 0 else None
    logits = torch.randn(1, 50).repeat(n, 1)
    a = _draw(rows, logits, seed=1)
    for i, row in enumerate(rows):
        if row.generator is not None:
            row.generator.manual_seed(100 + i)
    b = _draw(rows, logits, seed=2)  # other rows' randomness changes
    assert a[0::2].tolist() == b[0::2].tolist()


def test_logprobs_are_of_the_raw_distribution():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    rows = _rows(1, temperature=0.5, logprobs=2)
    meta = SamplingMetadata.from_requests(rows, 3, torch.device("cpu"))
    out = sample(logits.clone(), meta, torch.Generator().manual_seed(0))
    expected = torch.log_softmax(logits, -1)[0]
    assert out.top_ids.tolist() == [[2, 1]]
    assert out.logprobs.item() == pytest.approx(expected[out.token_ids.item()].item())
    assert math.isclose(out.top_logprobs[0, 0].item(), expected[2].item(), rel_tol=1e-6)


def test_greedy_is_argmax_with_its_tie_rule():
    """The blocked CPU argmax picks what max(dim) picks: the first maximum, across and within blocks, NaN first."""
    from dsserve.runner.sampler import _greedy

    torch.manual_seed(0)
    logits = torch.randn(7, 32000)
    logits[1, 300] = logits[1, 40] = logits[1].max() + 1  # a tie across blocks: 40 wins
    logits[2, 129] = logits[2, 130] = logits[2].max() + 1  # a tie within a block: 129 wins
    logits[3] = float("-inf")  # every token banned
    logits[4, 31999] = logits[4].max() + 1  # the last index
    logits[5, 5000] = float("nan")
    logits[6] = 0.0  # all equal
    expected = logits.max(dim=-1).indices
    assert torch.equal(_greedy(logits), expected)
    assert expected[1] == 40 and expected[2] == 129 and expected[3] == 0 and expected[5] == 5000
    for vocab in (100, 128, 200):  # not a multiple of the block, or a single block: the plain path
        odd = torch.randn(3, vocab)
        assert torch.equal(_greedy(odd), odd.argmax(dim=-1))


def test_top_k_past_the_vocabulary_keeps_all_of_it():
    """top_k 2^63 means the whole vocabulary (and must not overflow the int64 column the sampler builds)."""
    n = 4000
    tokens = set(_draw(_rows(n, top_k=2**63), PROBS.log().repeat(n, 1)).tolist())
    assert tokens == {0, 2, 3, 4}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logit_bias_forces_and_bans(temperature):
    """OpenAI's logit_bias: +100 makes a token certain, -100 bans it; logprobs stay those of the raw model."""
    n = 2000
    forced = _draw(_rows(n, temperature=temperature, logit_bias={4: 100.0}), PROBS.log().repeat(n, 1))
    assert set(forced.tolist()) == {4}
    banned = _draw(_rows(n, temperature=temperature, logit_bias={2: -100.0}), PROBS.log().repeat(n, 1))
    assert 2 not in set(banned.tolist())
    rows = _rows(2, temperature=temperature, logit_bias={4: 100.0}, logprobs=1)
    out = sample(PROBS.log().repeat(2, 1), SamplingMetadata.from_requests(rows, 5, torch.device("cpu")))
    torch.testing.assert_close(out.logprobs, PROBS.log()[[4, 4]])


def _bitmask(allowed_per_row, vocab):
    mask = torch.zeros(len(allowed_per_row), (vocab + 31) // 32, dtype=torch.int32)
    for row, allowed in enumerate(allowed_per_row):
        for token in allowed:
            word, bit = divmod(token, 32)
            mask[row, word] |= torch.tensor(1 << bit).to(torch.int32) if bit < 31 else torch.tensor(-2**31,
                                                                                                     dtype=torch.int32)
    return mask


def test_grammar_mask_limits_its_rows_and_leaves_the_others_alone():
    """Rows 1 and 3 follow a grammar (allowed tokens 33, 40 and 31 only, across 32-bit words); rows 0 and 2 sample
    exactly as they do without any grammar in the batch."""
    vocab, n = 70, 4
    logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(1))
    rows = _rows(n)
    meta = SamplingMetadata.from_requests(rows, vocab, torch.device("cpu"))
    free = sample(logits.clone(), meta, torch.Generator().manual_seed(3)).token_ids
    for seed in range(50):
        meta = SamplingMetadata.from_requests(rows, vocab, torch.device("cpu"))
        meta.grammar = (torch.tensor([1, 3]), _bitmask([[33, 40], [31]], vocab))
        tokens = sample(logits.clone(), meta, torch.Generator().manual_seed(seed)).token_ids
        assert int(tokens[1]) in (33, 40) and int(tokens[3]) == 31
        if seed == 3:
            assert tokens[0] == free[0] and tokens[2] == free[2]


def test_grammar_mask_wins_over_logit_bias():
    vocab = 40
    rows = _rows(1, logit_bias={5: 100.0}, temperature=0.0)
    meta = SamplingMetadata.from_requests(rows, vocab, torch.device("cpu"))
    meta.grammar = (torch.tensor([0]), _bitmask([[7, 9]], vocab))
    assert int(sample(torch.zeros(1, vocab), meta).token_ids[0]) in (7, 9)


def test_logit_bias_forces_and_bans():
    vocab = 50
    logits = torch.randn(64, vocab, generator=torch.Generator().manual_seed(0))
    forced = _draw(_rows(64, logit_bias={17: 100.0}), logits)
    assert (forced == 17).all()
    best = logits.argmax(dim=-1)
    banned = _draw(_rows(64, temperature=0.0, logit_bias={int(t): -100.0 for t in best.unique()}), logits)
    assert not torch.isin(banned, best.unique()).any()
