"""`tinyllm convert --learn-rounding` measured on stories260K (issue 16's q4_k + imatrix target).

    python -m benchmarks.quality --only q4_0 q4_k --out DIR     # the texts, reference and imatrix
    python -m benchmarks.learned_rounding --quality DIR [--tokens 64000] [--steps 400]   # ~30 min

For q4_0 (plain, and search + imatrix), q4_k and q4_k_m (gptq + imatrix, the best shipped
recipes): the file as converted, then the same with its codes, scales and norm gains learned end to end
(converters/learned_rounding.py), each scored as benchmarks.quality scores files, on its
held-out text. The learning text is the f32 model's own stories from seeds 5000.. (the imatrix's
calibration text is its first 8k tokens), disjoint from the evaluation stories (seeds 1000..).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.fold_and_tune import score
from benchmarks.quality import STORIES, sample_text, tinyllm

RECIPES = {  # label: convert options (DIR/model.imatrix filled in for None)
    "q4_0": ["--quant", "q4_0"],
    "q4_0 search + imatrix": ["--quant", "q4_0", "--quantizer", "search", "--imatrix", None],
    "q4_k gptq + imatrix": ["--quant", "q4_k", "--quantizer", "gptq", "--imatrix", None],
    "q4_k_m gptq + imatrix": ["--quant", "q4_k_m", "--quantizer", "gptq", "--imatrix", None],
}


def main() -> None:
    import tinyllm as t

    ap = argparse.ArgumentParser()
    ap.add_argument("--quality", type=Path, required=True, help="a benchmarks.quality --out directory")
    ap.add_argument("--tokens", type=int, default=64000, help="learning text length")
    ap.add_argument("--steps", type=int, default=400)
    args = ap.parse_args()
    d = args.quality
    text = d / f"learn{args.tokens}.txt"
    if not text.exists():
        text.write_text(sample_text(t.load(d / "f32.q4"), 5000, args.tokens))
    for i, (label, options) in enumerate(RECIPES.items()):
        recipe = [d / "model.imatrix" if o is None else o for o in options]
        plain, learned = d / f"learn_start{i}.q4", d / f"learned{i}.q4"
        tinyllm("convert", STORIES, "-o", plain, *recipe)
        print(f"{label}: {score(plain, d)}", flush=True)
        start = time.perf_counter()
        tinyllm("convert", STORIES, "-o", learned, *recipe, "--learn-rounding", text, "--learn-steps", args.steps)
        print(f"{label}, learned rounding ({args.steps} steps, {args.tokens} tokens, "
              f"{time.perf_counter() - start:.0f} s): {score(learned, d)}", flush=True)


if __name__ == "__main__":
    main()
