"""A longer fuzz run than CI's, with figures: ``python -m tests.fuzz_long --seconds 600``.

Runs the structure-aware mutators of tests/untrusted.py for the given time against the .q4
loader (header and byte mutations, f32 / q4_0 / q8_0 bases) and GGUF import on the NumPy
backend in this process, then a sample of the same files on the Numba backend in a child
process. Prints inputs tried, how each ended (ok / refused with a TinyLLMError / raw
exception / native crash), the most common refusals, and every failure. Exit status 1 if
anything but ok or refused happened."""
from __future__ import annotations

import argparse
import collections
import json
import random
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

from tinyllm.errors import TinyLLMError

from .untrusted import (
    BUNDLED,
    bundled_gguf,
    gguf_contents,
    logits_ok,
    mutate_bytes,
    mutate_gguf_fields,
    mutate_header,
    read_q4,
    requantized,
    run_files_in_child,
    write_gguf,
    write_q4,
)


def outcome(path: Path) -> tuple[str, str]:
    try:
        logits_ok(path)
        return "ok", ""
    except AssertionError as e:
        return "wrong-output", str(e)
    except TinyLLMError as e:
        return "refused", str(e)
    except Exception as e:  # what the fuzzer is looking for
        return "raw-error", f"{type(e).__name__}: {e} | {traceback.format_exc(limit=-2)}"


def shape_of(message: str) -> str:
    """A refusal's message without paths and numbers: groups refusals of one kind."""
    message = re.sub(r"\S*/\S*", "<path>", message)
    return re.sub(r"-?\d+(\.\d+)?(e-?\d+)?", "N", message)[:90]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--numba-sample", type=int, default=300, help="files also run on the Numba backend")
    ap.add_argument("--no-net", action="store_true",
                    help="let errors.reading pass raw exceptions through, to find the checks it stands in for")
    args = ap.parse_args()
    if args.no_net:
        from tinyllm.errors import reading
        reading.__exit__ = lambda self, *exc: False
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="tinyllm-fuzz-"))
    bases = [read_q4(p) for p in (BUNDLED, requantized(BUNDLED, work / "q4_0.q4", "q4_0"),
                                  requantized(BUNDLED, work / "q8_0.q4", "q8_0"))]
    g_arch, g_fields, g_tensors = gguf_contents(bundled_gguf(work / "base.gguf", work))
    counts = collections.Counter()
    refusals = collections.Counter()
    failures = []
    numba_paths = []
    start, i = time.monotonic(), 0
    while time.monotonic() - start < args.seconds:
        kind = ("header", "bytes", "gguf")[i % 3]
        if kind == "gguf":
            fields = g_fields
            for _ in range(rng.randint(1, 3)):
                fields = mutate_gguf_fields(fields, rng)
            try:
                path = write_gguf(work / f"g{i % 50}.gguf", g_arch, fields, g_tensors)
            except Exception:
                i += 1
                continue  # a value the gguf package cannot write
        else:
            data, header = bases[rng.randrange(3)]
            header = json.loads(json.dumps(header))
            if kind == "header":
                header = mutate_header(header, rng, rng.randint(1, 3))
            else:
                data = mutate_bytes(data, rng, rng.randint(1, 64))
            path = write_q4(work / f"f{i % 50}.q4", data, header)
        result, message = outcome(path)
        counts[kind, result] += 1
        if result == "refused":
            refusals[shape_of(message)] += 1
        elif result != "ok":
            failures.append((kind, result, message))
        if kind != "gguf" and len(numba_paths) < args.numba_sample and rng.random() < 0.2:
            keep = work / f"numba{len(numba_paths)}.q4"
            keep.write_bytes(path.read_bytes())
            numba_paths.append(keep)
        i += 1
    elapsed = time.monotonic() - start
    numba = collections.Counter()
    if numba_paths:
        try:
            for result, message in run_files_in_child(numba_paths, timeout=3600).values():
                numba[result] += 1
                if result not in ("ok", "tinyllm-error"):
                    failures.append(("numba", result, message))
        except AssertionError as e:  # a native crash or a hang
            numba["crash"] += 1
            failures.append(("numba", "crash", str(e)))
    print(f"{i} inputs in {elapsed:.0f} s (seed {args.seed})")
    for kind in ("header", "bytes", "gguf"):
        row = {r: counts[kind, r] for r in ("ok", "refused", "raw-error", "wrong-output") if counts[kind, r]}
        print(f"  {kind:7s} {row}")
    print(f"  numba   {dict(numba)} (of {len(numba_paths)} files in a child process)")
    print("most common refusals:")
    for message, n in refusals.most_common(15):
        print(f"  {n:6d}  {message}")
    print(f"failures: {len(failures)}")
    for f in failures[:50]:
        print("  ", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
