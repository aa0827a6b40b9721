"""Grammar libraries on the demo model's tokenizer: time to compile a typical tool schema, and per-token mask time.

Compares llguidance (what dsserve uses) with xgrammar, on one CPU thread each, when both are installed:

    nice -n 19 python benchmarks/grammar_backends.py

Figures go in docs/benchmarks.md ("Structured outputs").
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from dsserve.assets import demo_model_dir
from dsserve.engine.tokenizer import Tokenizer

TOOL_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "details": {"type": "object", "properties": {"hourly": {"type": "boolean"}, "fields": {
            "type": "array", "items": {"enum": ["temp", "wind", "rain"]}, "maxItems": 3}},
            "required": ["hourly"], "additionalProperties": False},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
ANSWER = '{"city": "Paris", "unit": "celsius", "days": 3, "details": {"hourly": true, "fields": ["temp", "wind"]}}'
REPEATS = 20


def main() -> None:
    tokenizer = Tokenizer(demo_model_dir())
    tokens = tokenizer.encode(ANSWER, add_special_tokens=False)
    vocab = tokenizer.vocab_size
    print(f"vocabulary {vocab} tokens; answer {len(tokens)} tokens; {REPEATS} repeats")
    _llguidance(tokenizer, tokens, vocab)
    try:
        _xgrammar(tokens, vocab)
    except ImportError:
        print("xgrammar: not installed")


def _llguidance(tokenizer, tokens, vocab) -> None:
    import llguidance

    ll_tok = llguidance.LLTokenizer(tokenizer.to_json(), n_vocab=vocab, eos_token=[tokenizer.eos_token_id])
    compile_s, mask_s = [], []
    mask = torch.full((1, (vocab + 31) // 32), -1, dtype=torch.int32)
    for _ in range(REPEATS):
        start = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(TOOL_SCHEMA)
        matcher = llguidance.LLMatcher(ll_tok, grammar)
        matcher.compute_bitmask()  # the lexer is built lazily: the first mask is part of compiling
        compile_s.append(time.perf_counter() - start)
        for token in tokens:
            start = time.perf_counter()
            matcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.shape[1] * 4)
            mask_s.append(time.perf_counter() - start)
            assert matcher.consume_token(token), matcher.get_error()
    _report("llguidance 1.9.1", compile_s, mask_s)


def _xgrammar(tokens, vocab) -> None:
    import xgrammar
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_file(str(demo_model_dir() / "tokenizer.json"))
    encoded = [hf.id_to_token(i) for i in range(vocab)]
    info = xgrammar.TokenizerInfo(encoded, vocab_type=xgrammar.VocabType.BYTE_LEVEL, vocab_size=vocab,
                                  stop_token_ids=[1])
    compile_s, mask_s = [], []
    bitmask = xgrammar.allocate_token_bitmask(1, vocab)
    for _ in range(REPEATS):
        compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        start = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(TOOL_SCHEMA), any_whitespace=False)
        matcher = xgrammar.GrammarMatcher(compiled)
        compile_s.append(time.perf_counter() - start)
        for token in tokens:
            start = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask)
            mask_s.append(time.perf_counter() - start)
            assert matcher.accept_token(token)
    _report("xgrammar 0.2.8", compile_s, mask_s)


def _report(name, compile_s, mask_s) -> None:
    print(f"{name}: compile {statistics.median(compile_s) * 1e3:.2f} ms (median), per-token mask "
          f"{statistics.median(mask_s) * 1e6:.1f} us median, {sorted(mask_s)[int(len(mask_s) * 0.99)] * 1e6:.1f} us p99")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
