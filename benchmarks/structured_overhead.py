"""Per-token cost of structured output (llguidance masks) beside the decode step it rides on.

    python -m benchmarks.structured_overhead MODEL [--tokens 64] [--repeats 5]

For a JSON schema, a JSON object and a GBNF grammar: the median time of the constraint's work
per token (mask + advance, measured around those calls alone) and the decode tok/s of the same
greedy generation with and without the grammar."""
from __future__ import annotations

import argparse
import statistics
import time

import tinyllm
from tinyllm.generate import Decoding
from tinyllm.structured import Grammar, GrammarConstraint

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                                    "maxItems": 4}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


class Timed:
    """Wraps a GrammarConstraint and adds up the seconds spent in it."""

    def __init__(self, inner: GrammarConstraint):
        self.inner, self.seconds, self.calls = inner, 0.0, 0

    def mask(self, logits):
        t = time.perf_counter()
        out = self.inner.mask(logits)
        self.seconds += time.perf_counter() - t
        self.calls += 1
        return out

    def advance(self, token):
        t = time.perf_counter()
        self.inner.advance(token)
        self.seconds += time.perf_counter() - t


class TimedGrammar:
    def __init__(self, grammar: Grammar):
        self.grammar, self.last = grammar, None

    def constraint(self, tokenizer, stop_ids):
        self.last = Timed(self.grammar.constraint(tokenizer, stop_ids))
        return self.last


def run(model, prompt_ids, grammar, tokens):
    d = Decoding.continuing(model, prompt_ids, temperature=0, grammar=grammar)
    model.reset()
    t = time.perf_counter()
    n = sum(1 for _ in d.pieces(model, prompt_ids, tokens))
    return time.perf_counter() - t, n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    model = tinyllm.load(args.model)
    prompt = model.tokenize("Describe a person as JSON:")
    t = time.perf_counter()
    Grammar.json_object().constraint(model.tokenizer, model.tokenizer.eos_ids)
    build = time.perf_counter() - t
    print(f"{model.name}: vocab {model.tokenizer.vocab_size}; first tokenizer build + matcher {build:.3f} s")
    grammars = {"json_schema": Grammar.json_schema(SCHEMA), "json_object": Grammar.json_object(),
                "gbnf": Grammar.gbnf('root ::= "The answer is " ("yes" | "no") "." [ a-z]*')}
    free = [run(model, prompt, None, args.tokens) for _ in range(args.repeats)]
    free_tps = statistics.median(n / s for s, n in free)
    print(f"free text: {free_tps:.1f} tok/s")
    for name, g in grammars.items():
        per_token, tps = [], []
        for _ in range(args.repeats):
            timed = TimedGrammar(g)
            seconds, n = run(model, prompt, timed, args.tokens)
            per_token.append(timed.last.seconds / max(timed.last.calls, 1) * 1e6)
            tps.append(n / seconds)
        print(f"{name}: constraint {statistics.median(per_token):.0f} us/token "
              f"(min {min(per_token):.0f}, max {max(per_token):.0f}); generation {statistics.median(tps):.1f} tok/s "
              f"({len(tps)} runs, {args.tokens} tokens max)")


if __name__ == "__main__":
    main()
