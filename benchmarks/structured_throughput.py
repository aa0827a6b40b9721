"""Throughput of N concurrent json_schema requests against the same N unconstrained, on a running server.

    dsserve serve --max-num-seqs 64 &            # the demo model
    nice -n 19 python benchmarks/structured_throughput.py --url http://127.0.0.1:8000 --concurrency 64

Both runs send the same prompts with the same seeds, ignore_eos and max_tokens, so they generate the same number
of tokens; thinking is off so that the grammar applies from the first token. Prints generated tokens per second
of each run (best of --rounds, the two alternated) and the constrained run's share of the unconstrained one.
Figures go in docs/benchmarks.md ("Structured outputs").
"""

from __future__ import annotations

import argparse
import asyncio
import time

import httpx

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}}},
    },
}


async def run(url: str, model: str, concurrency: int, max_tokens: int, constrained: bool) -> float:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 1.0, "ignore_eos": True,
            "chat_template_kwargs": {"thinking": False}}
    if constrained:
        # ignore_eos with a grammar: once the answer is complete only EOS is allowed, so the row stops there; the
        # schema is open (free strings and arrays) so that answers run to max_tokens as the unconstrained ones do
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(i: int) -> int:
            r = await client.post(url + "/v1/chat/completions", json={
                **body, "seed": i, "messages": [{"role": "user", "content": f"Describe person {i}."}]})
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        tokens = await asyncio.gather(*(one(i) for i in range(concurrency)))
        return sum(tokens) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="default: the server's first model")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = args.model or httpx.get(args.url + "/v1/models").json()["data"][0]["id"]
    best = {False: 0.0, True: 0.0}
    for _ in range(args.rounds):
        for constrained in (False, True):
            rate = asyncio.run(run(args.url, model, args.concurrency, args.max_tokens, constrained))
            best[constrained] = max(best[constrained], rate)
            print(f"{'json_schema' if constrained else 'unconstrained'}: {rate:.1f} tokens/s")
    print(f"best: unconstrained {best[False]:.1f} tokens/s, json_schema {best[True]:.1f} tokens/s "
          f"({best[True] / best[False]:.1%})")


if __name__ == "__main__":
    main()
