"""`tinyllm bench` and the measurement helpers behind it (tinyllm/benchmark.py)."""
from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

import tinyllm
from tinyllm.benchmark import memory_bandwidth, prompt_ids, weight_bytes_per_token
from tinyllm.cli import main

STORIES = Path(tinyllm.__file__).parent / "data" / "stories260K.q4"


def test_bench_prints_prefill_decode_and_bandwidth():
    result = CliRunner().invoke(main, ["bench", str(STORIES), "-p", "8", "-p", "16", "-n", "4", "-r", "2",
                                       "--probe-mb", "8", "--threads", "1"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("model      stories260K") and "1 threads" in lines[0]
    assert [ln.split()[1] for ln in lines[1:3]] == ["8", "16"] and all("tok/s" in ln for ln in lines[1:3])
    assert lines[3].startswith("decode") and "GB/s of weights" in lines[3] and "read bandwidth" in lines[3]


def test_bench_refuses_nonsense_counts():
    result = CliRunner().invoke(main, ["bench", str(STORIES), "-r", "0"])
    assert result.exit_code == 1 and "--repeats" in result.output


def test_weight_bytes_per_token_counts_one_embedding_row():
    m = tinyllm.load(STORIES)
    emb = m.file_tensors["tok_embeddings"]
    total = sum(t.nbytes for t in m.file_tensors.values())
    if "output" in m.file_tensors:   # untied: the table is read one row at a time
        assert weight_bytes_per_token(m) == total - emb.nbytes + emb.nbytes // emb.shape[0]
    else:                            # tied: the table is the output head, read whole
        assert weight_bytes_per_token(m) == total


def test_probe_and_prompt_ids():
    s = memory_bandwidth(1 << 20, repeats=2)
    assert len(s.seconds) == 2 and s.bytes_read == 1 << 20 and s.gb_per_second > 0
    ids = prompt_ids(50, 512)
    assert ids == prompt_ids(50, 512) and min(ids) >= 3 and max(ids) < 512 and len(set(ids)) > 10


def test_probe_kernel_sums_every_word():
    # Whole lines go to eight sums per thread, the last partial line to a tail loop: none skipped.
    import numpy as np

    from tinyllm.kernels.numba_bench import sum_words
    for n in (0, 1, 7, 8, 9, 1001, 12345):
        words = np.arange(1, n + 1, dtype=np.uint64)
        assert int(sum_words(words)) == n * (n + 1) // 2, n
