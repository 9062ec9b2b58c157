"""Decode speed on a busy machine: the same decode quiet and beside one competing CPU-bound
process (pinned to the last core, or left to the scheduler), for tinyllm's thread settings and,
when given, llama.cpp's llama-bench in the same run.

    python -m benchmarks.busy_machine MODEL.q4 [--gguf MODEL.gguf --llama-bench PATH] [-n 32] [-r 3]

Each configuration runs in a fresh process (`tinyllm bench -p 0`-like: decode only), first quiet,
then with the competitor started just before it and stopped after. tinyllm rows: the default
(adaptive threads), ``-t`` every core (fixed) and ``-t 1``. llama-bench rows: ``-t`` every core
and ``-t 1`` (its default is every core). Prints tokens/s medians with the range.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SPIN = "while True: pass"


def competitor(pinned: bool) -> subprocess.Popen:
    """One CPU-bound process; pinned to the last core this process may use, or free."""
    p = subprocess.Popen([sys.executable, "-c", SPIN])
    if pinned:
        os.sched_setaffinity(p.pid, {max(os.sched_getaffinity(0))})
    time.sleep(0.5)   # running before the measurement starts
    return p


def tinyllm_decode(model: str, threads: int | None, n: int, repeats: int) -> dict:
    code = f"""
import json, tinyllm
from tinyllm.benchmark import time_decode, threads_in_words
m = tinyllm.load({model!r}, threads={threads!r})
s = time_decode(m, {n}, {repeats})
print(json.dumps({{"tps": [s.tokens / x for x in s.seconds], "threads": threads_in_words(m.ops)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def llama_decode(llama_bench: str, gguf: str, threads: int, n: int, repeats: int) -> dict:
    out = subprocess.run([llama_bench, "-m", gguf, "-p", "0", "-n", str(n), "-r", str(repeats), "-t", str(threads),
                          "-o", "json"], capture_output=True, text=True, check=True).stdout
    row = json.loads(out)[0]
    return {"tps": row.get("samples_ts") or [row["avg_ts"]], "threads": f"{threads} threads"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--llama-bench", default=None)
    ap.add_argument("-n", type=int, default=32, help="decode steps per run")
    ap.add_argument("-r", type=int, default=3, help="runs per configuration")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    runs = [("tinyllm default (adaptive)", lambda: tinyllm_decode(args.model, None, args.n, args.r)),
            (f"tinyllm -t {cores}", lambda: tinyllm_decode(args.model, cores, args.n, args.r)),
            ("tinyllm -t 1", lambda: tinyllm_decode(args.model, 1, args.n, args.r))]
    if args.llama_bench and args.gguf:
        runs += [(f"llama-bench -t {cores} (its default)",
                  lambda: llama_decode(args.llama_bench, args.gguf, cores, args.n, args.r)),
                 ("llama-bench -t 1", lambda: llama_decode(args.llama_bench, args.gguf, 1, args.n, args.r))]
    print(f"{cores} cores, load average before: {os.getloadavg()[0]:.2f}; decode {args.n} tokens x {args.r} runs")
    print("| engine, threads | quiet tok/s | one competitor, pinned | one competitor, free |")
    print("|---|---|---|---|")
    for label, run in runs:
        cells, note = [], ""
        for load in (None, True, False):
            p = competitor(load) if load is not None else None
            try:
                r = run()
            finally:
                if p is not None:
                    p.kill()
                    p.wait()
            tps = r["tps"]
            cells.append(f"{statistics.median(tps):.1f} ({min(tps):.1f}-{max(tps):.1f})")
            if load is False and "adaptive" in (r["threads"] or ""):
                note = f" [{r['threads']}]"
        print(f"| {label}{note} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
