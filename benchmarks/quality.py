"""Quantization quality table: every tinyllm 4-bit recipe against the unquantized model.

    python -m benchmarks.quality [--out DIR] [--ctx 512]
    python -m benchmarks.quality --source ../shared/models/smollm2-135m-instruct-q4_1-gguf/*.gguf \
        --prompt The --tokens 9000 --only q4_0 q4_k q4_k_m q6_k     # the SmolLM2 proxy

``--source`` converts another model instead (a GGUF file's weights dequantized are then the
reference: a proxy, see BENCHMARKS.md); ``--only`` keeps the recipes whose label starts with one
of the given words (and their "+ imatrix" rows).

On stories260K (../shared/models/stories260K-hf, float32): converts it with each recipe,
and reports bits per weight (file size x 8 / parameters, as the issue tables do), perplexity
and mean KL divergence against the f32 file, as `tinyllm perplexity --kl-divergence` does.

The texts: TinyStories' own validation split is not on these machines (no network), so both
are stories the f32 model writes itself from BOS at temperature 1 (no top-k/top-p/min-p, no
repeat penalty): calibration from seeds 5000..., evaluation from seeds 1000..., disjoint. Such
text is the model's own distribution (its training distribution, to the extent it learned
it), so its PPL is lower than on human text; KLD compares the two models position by
position and is the figure to read.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STORIES = REPO.parent / "shared" / "models" / "stories260K-hf"
RECIPES = [  # label, convert options (the imatrix path is filled in)
    ("f32 (reference)", ["--quant", "f32"]),
    ("q8_0", ["--quant", "q8_0"]),
    ("q4_0 (= llama.cpp Q4_0)", ["--quant", "q4_0"]),
    ("q4_0 --quantizer search", ["--quant", "q4_0", "--quantizer", "search"]),
    ("q4_0 search + imatrix", ["--quant", "q4_0", "--quantizer", "search", "--imatrix", None]),
    ("q4_1", ["--quant", "q4_1"]),
    ("q4_1 search + imatrix", ["--quant", "q4_1", "--quantizer", "search", "--imatrix", None]),
    ("q4_k", ["--quant", "q4_k"]),
    ("q4_k + imatrix", ["--quant", "q4_k", "--imatrix", None]),
    ("q4_k gptq + imatrix", ["--quant", "q4_k", "--quantizer", "gptq", "--imatrix", None]),
    ("q4_k_s", ["--quant", "q4_k_s"]),
    ("q4_k_s + imatrix", ["--quant", "q4_k_s", "--imatrix", None]),
    ("q4_k_m", ["--quant", "q4_k_m"]),
    ("q4_k_m + imatrix", ["--quant", "q4_k_m", "--imatrix", None]),
    ("q4_k_m gptq + imatrix", ["--quant", "q4_k_m", "--quantizer", "gptq", "--imatrix", None]),
    ("q6_k", ["--quant", "q6_k"]),
    ("q6_k + imatrix", ["--quant", "q6_k", "--imatrix", None]),
]


def sample_text(model, first_seed: int, n_tokens: int, prompt: str = "") -> str:
    stories, total, seed = [], 0, first_seed
    while total < n_tokens:
        story = prompt + model.generate(prompt, max_new_tokens=400, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                               repeat_penalty=1.0, seed=seed, stream=False).strip()
        stories.append(story)
        total += len(model.tokenize(story, special=False))
        seed += 1
    return "\n\n".join(stories)


def tinyllm(*args) -> str:
    return subprocess.run([sys.executable, "-c", "from tinyllm.cli import main; main()", *map(str, args)], check=True,
                          capture_output=True, text=True).stdout


def kl_report(model, held_out, reference, ctx: int = 512) -> dict[str, str]:
    """`tinyllm perplexity MODEL HELD_OUT --kl-divergence REFERENCE`'s "name: value" lines, as a dict."""
    report = tinyllm("perplexity", model, held_out, "--ctx", ctx, "--kl-divergence", reference)
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in report.splitlines() if ":" in line)}


def main() -> None:
    import tinyllm as t

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path.home() / ".cache" / "tinyllm" / "quality")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--source", type=Path, default=STORIES, help="the model to quantize (default stories260K)")
    ap.add_argument("--prompt", default="", help="what the sampled texts start from (default: BOS only)")
    ap.add_argument("--tokens", type=int, default=16000, help="evaluation text length (calibration: half)")
    ap.add_argument("--only", nargs="*", default=None, help="recipes whose label starts with one of these")
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    recipes = [r for r in RECIPES if args.only is None or r is RECIPES[0]
               or any(r[0].split()[0] == w for w in args.only)]
    files = {}
    for label, options in recipes[:1]:
        files[label] = out / "f32.q4"
        tinyllm("convert", args.source, "-o", files[label], *options)
    ref = t.load(files["f32 (reference)"])
    calib, held_out = out / "calibration.txt", out / "evaluation.txt"
    calib.write_text(sample_text(ref, 5000, args.tokens // 2, args.prompt))
    held_out.write_text(sample_text(ref, 1000, args.tokens, args.prompt))
    imatrix = out / "model.imatrix"
    tinyllm("imatrix", files["f32 (reference)"], calib, "-o", imatrix, "--covariance")  # covariances: for gptq
    params = sum(math.prod(x.shape) for x in ref.file_tensors.values())
    print(f"{args.source.name}, {params} parameters; ctx {args.ctx}; evaluation {held_out} "
          f"({len(ref.tokenize(held_out.read_text(), special=False))} tokens), calibration {calib}")
    print("| recipe | bits/weight | PPL | delta PPL | mean KLD | same top |")
    print("|---|---|---|---|---|---|")
    for i, (label, options) in enumerate(recipes):
        path = files.get(label) or out / f"recipe{i}.q4"
        if label not in files:
            tinyllm("convert", args.source, "-o", path, *[imatrix if o is None else o for o in options])
        get = kl_report(path, held_out, files["f32 (reference)"], args.ctx)
        bits = path.stat().st_size * 8 / params
        print(f"| {label} | {bits:.2f} | {get['PPL(model)']} | {get['PPL difference']} | {get['Mean KLD']} | "
              f"{get['Same top token']} |")
    print(json.dumps({"out": str(out)}))


if __name__ == "__main__":
    main()
