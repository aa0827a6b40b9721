"""Request semantics through the offline API: seeds, n, stop conditions, logprobs, bad input."""

import pytest

from dsserve import SamplingParams
from dsserve.errors import InvalidRequestError


def _ids(n: int, start: int = 10) -> dict:
    return {"prompt_token_ids": [start + (i * 7) % 200 for i in range(n)]}


def test_same_seed_same_tokens_alone_and_in_batch(tiny_llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=24, seed=1234, ignore_eos=True)
    alone = tiny_llm.generate(_ids(9), params)[0].outputs[0].token_ids
    others = [_ids(n, start=n) for n in (3, 30, 17, 5, 41)]
    noisy = SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)
    batch = tiny_llm.generate(others[:2] + [_ids(9)] + others[2:], [noisy, noisy, params, noisy, noisy, noisy])
    assert batch[2].outputs[0].token_ids == alone
    again = tiny_llm.generate(_ids(9), params)[0].outputs[0].token_ids
    assert again == alone


def test_n_samples_are_distinct_and_share_the_prompt(tiny_llm):
    out = tiny_llm.generate(_ids(40), SamplingParams(n=4, temperature=1.0, max_tokens=16, ignore_eos=True, seed=7))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    samples = {tuple(c.token_ids) for c in out.outputs}
    assert len(samples) == 4
    assert all(len(c.token_ids) == 16 for c in out.outputs)


def test_greedy_is_deterministic_and_max_tokens_is_exact(tiny_llm):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    a = tiny_llm.generate(_ids(5), params)[0].outputs[0]
    b = tiny_llm.generate(_ids(5), params)[0].outputs[0]
    assert a.token_ids == b.token_ids and len(a.token_ids) == 12 and a.finish_reason == "length"


def test_stop_token_ids_and_min_tokens(tiny_llm):
    base = tiny_llm.generate(_ids(6), SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].outputs[0]
    stop_at = base.token_ids[4]
    first = base.token_ids.index(stop_at)
    out = tiny_llm.generate(_ids(6), SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                    stop_token_ids=[stop_at]))[0].outputs[0]
    assert out.token_ids == base.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    # min_tokens masks the stop token until enough tokens exist: the output then differs from greedy.
    late = tiny_llm.generate(_ids(6), SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                     stop_token_ids=[stop_at], min_tokens=first + 2))[0].outputs[0]
    assert len(late.token_ids) >= first + 2
    assert stop_at not in late.token_ids[: first + 2]


def _clean_window(text: str, start: int, width: int) -> str:
    """A substring of `text` without U+FFFD (random byte models emit many broken characters)."""
    for i in range(start, len(text) - width):
        if "\ufffd" not in text[i : i + width]:
            return text[i : i + width]
    raise AssertionError(f"no clean window in {text!r}")


def test_stop_string_is_cut_and_never_emitted(tiny_llm):
    base = tiny_llm.generate("abc", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0].outputs[0]
    stop = _clean_window(base.text, 3, 2)
    index = base.text.find(stop)
    out = tiny_llm.generate("abc", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert out.text == base.text[:index]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    kept = tiny_llm.generate("abc", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop],
                                                   include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == base.text[: index + len(stop)]


def test_streamed_text_never_shows_a_stop_string(tiny_llm):
    base = tiny_llm.generate("xyz", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0].outputs[0]
    stop = _clean_window(base.text, 4, 2)
    engine = tiny_llm.engine
    engine.add_request("stream", "xyz", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop]))
    seen = []
    while engine.has_unfinished_requests():
        for output in engine.step():
            seen.append(output.outputs[0].text)
    assert all(stop not in text for text in seen)
    assert all(later.startswith(earlier) for earlier, later in zip(seen, seen[1:]))


def test_logprobs_and_prompt_logprobs(tiny_llm):
    out = tiny_llm.generate(_ids(12), SamplingParams(temperature=0, max_tokens=5, logprobs=3, prompt_logprobs=2,
                                                     ignore_eos=True))[0]
    completion = out.outputs[0]
    assert len(completion.logprobs) == 5
    for token, (logprob, alternatives) in zip(completion.token_ids, completion.logprobs):
        assert token in alternatives and alternatives[token] == logprob
        assert logprob == max(alternatives.values())  # greedy picks the most likely token
        assert len(alternatives) == 3
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == 12
    assert all(len(entry[1]) in (2, 3) for entry in out.prompt_logprobs[1:])


def test_prompt_logprobs_survive_chunked_prefill(tiny_r1):
    from dsserve import LLM

    whole = LLM(tiny_r1, num_kv_blocks=128, max_model_len=256)
    chunked = LLM(tiny_r1, num_kv_blocks=128, max_model_len=256, max_num_batched_tokens=5)
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0)
    a = whole.generate(_ids(23), params)[0].prompt_logprobs
    b = chunked.generate(_ids(23), params)[0].prompt_logprobs
    assert len(a) == len(b) == 23
    for x, y in zip(a[1:], b[1:]):
        assert x[0] == pytest.approx(y[0], abs=1e-4)


@pytest.mark.parametrize("kwargs,field", [
    pytest.param({"temperature": -0.5}, "temperature", id="negative-temperature"),
    pytest.param({"top_p": 0.0}, "top_p", id="top_p-zero"),
    pytest.param({"top_p": 1.5}, "top_p", id="top_p-above-one"),
    pytest.param({"top_k": -3}, "top_k", id="top_k-negative"),
    pytest.param({"min_p": 2.0}, "min_p", id="min_p"),
    pytest.param({"presence_penalty": 3.0}, "presence_penalty", id="presence"),
    pytest.param({"frequency_penalty": float("nan")}, "frequency_penalty", id="frequency-nan"),
    pytest.param({"repetition_penalty": 0.0}, "repetition_penalty", id="repetition-zero"),
    pytest.param({"max_tokens": 0}, "max_tokens", id="max_tokens-zero"),
    pytest.param({"n": 0}, "n", id="n-zero"),
    pytest.param({"min_tokens": 5, "max_tokens": 2}, "min_tokens", id="min-above-max"),
    pytest.param({"logprobs": 50}, "logprobs", id="logprobs-too-many"),
    pytest.param({"stop": [""]}, "stop", id="empty-stop"),
])
def test_invalid_sampling_values_name_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**kwargs)


def test_bad_requests_fail_alone_while_others_finish(tiny_llm):
    engine = tiny_llm.engine
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    engine.add_request("good-1", _ids(10), params)
    engine.step()
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        engine.add_request("too-long", _ids(2000), params)
    with pytest.raises(InvalidRequestError, match="token ids must be in"):
        engine.add_request("bad-ids", {"prompt_token_ids": [5, 10**9]}, params)
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("empty", {"prompt_token_ids": []}, params)
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("good-1", _ids(3), params)
    engine.add_request("good-2", _ids(4), params)
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    assert set(finished) == {"good-1", "good-2"}
    assert all(len(o.outputs[0].token_ids) == 8 for o in finished.values())
    assert engine.kv_cache.pool.num_free == engine.kv_cache.num_blocks


def test_abort_frees_blocks_and_others_continue(tiny_llm):
    engine = tiny_llm.engine
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    engine.add_request("a", _ids(20), params)
    engine.add_request("b", _ids(30), params)
    engine.step()
    engine.abort_request("a")
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert {o.request_id for o in outputs} == {"b"}
    assert engine.kv_cache.pool.num_free == engine.kv_cache.num_blocks


def test_generation_config_defaults_apply(tiny_llm):
    params = SamplingParams().with_defaults(tiny_llm.engine.sampling_defaults)
    assert params.temperature == 0.6 and params.top_p == 0.95
    explicit = SamplingParams(temperature=0.0).with_defaults(tiny_llm.engine.sampling_defaults)
    assert explicit.temperature == 0.0


def test_prompt_logprobs_bypass_the_prefix_cache_and_survive_preemption(tiny_r1):
    from dsserve import LLM

    llm = LLM(tiny_r1, num_kv_blocks=6, block_size=4, max_model_len=24, max_num_batched_tokens=6)
    params = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=1, ignore_eos=True)
    prompts = [_ids(17, start=3), _ids(17, start=3), _ids(15, start=9)]
    outs = llm.generate(prompts, params)
    assert llm.engine.scheduler.num_preemptions > 0
    reference = LLM(tiny_r1, num_kv_blocks=64, max_model_len=64).generate(prompts, params)
    for out, ref in zip(outs, reference):
        assert len(out.prompt_logprobs) == len(ref.prompt_logprobs)
        for a, b in zip(out.prompt_logprobs[1:], ref.prompt_logprobs[1:]):
            assert a[0] == pytest.approx(b[0], abs=1e-4)


def test_max_model_len_must_fit_the_cache(tiny_r1):
    from dsserve import LLM
    from dsserve.errors import ConfigError

    with pytest.raises(ConfigError, match="does not fit the KV cache"):
        LLM(tiny_r1, num_kv_blocks=4, block_size=16, max_model_len=100)
    llm = LLM(tiny_r1, num_kv_blocks=4, block_size=16)  # default: the model's 2048 positions, lowered to 64
    assert llm.engine.config.scheduler.max_model_len == 64
    out = llm.generate(_ids(10), SamplingParams(max_tokens=None, temperature=0, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 54 and out.finish_reason == "length"
