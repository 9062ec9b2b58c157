"""Tools for the untrusted-input tests: rewriting a .q4 file's header or bytes with valid
checksums (so a mutation reaches the loader's checks, not just the CRC), a structure-aware
mutator driven by a ``random.Random``, and a child process that loads and runs files on the
Numba backend, so a native crash fails a test instead of killing pytest."""
from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np

from tinyllm.fileformat import _PREAMBLE, MAGIC, PREAMBLE_SIZE, VERSION, ModelFile, ModelWriter
from tinyllm.kernels.quant import quantize

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "tinyllm" / "data" / "stories260K.q4"


def read_q4(path: Path) -> tuple[bytes, dict]:
    """(data section bytes [0, header offset), header dict)."""
    raw = Path(path).read_bytes()
    _, _, _, h_off, h_len, _, _, _ = _PREAMBLE.unpack(raw[:_PREAMBLE.size])
    return raw[:h_off], json.loads(raw[h_off:h_off + h_len])


def write_q4(path: Path, data: bytes, header: dict, fix_crcs: bool = True) -> Path:
    """A .q4 file from a data section and a header, with the header's CRC (and, with
    ``fix_crcs``, every tensor's CRC that can be computed) made valid."""
    data = bytearray(data)
    if fix_crcs and isinstance(header.get("tensors"), list):
        for rec in header["tensors"]:
            try:
                start, end = int(rec["offset"]), int(rec["offset"]) + int(rec["nbytes"])
                if 0 <= start <= end <= len(data):
                    rec["crc32"] = zlib.crc32(data[start:end])
            except (TypeError, KeyError, ValueError, OverflowError):
                pass
    pad = -len(data) % 64
    data += b"\0" * pad
    blob = json.dumps(header, ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass")
    pre = _PREAMBLE.pack(MAGIC, VERSION, 0, len(data), len(blob), zlib.crc32(blob), 0, len(data) + len(blob))
    data[:PREAMBLE_SIZE] = pre.ljust(PREAMBLE_SIZE, b"\0")
    Path(path).write_bytes(bytes(data) + blob)
    return Path(path)


def requantized(src: Path, dst: Path, fmt: str, edge: str = "q8_0") -> Path:
    """``src`` with every matrix in ``fmt`` (the embedding table in ``edge``): the bundled f32
    model made into a quantized one, so mutations reach the quantized kernels."""
    f = ModelFile(src)
    meta = {k: v for k, v in f.metadata.items() if k not in ("tensors", "format_version")}
    with ModelWriter(dst, dict(meta, quant=fmt)) as w:
        for name, t in f.tensors.items():
            arr = t.dequantize()
            w.add(name, quantize(arr, "f32" if arr.ndim == 1 else edge if name == "tok_embeddings" else fmt))
    return dst


# -- a structure-aware mutator ---------------------------------------------------------------

INTERESTING = [0, 1, -1, 2, 3, 7, 8, 63, 64, 65, 511, 512, 513, 4096, 2**16, 2**31 - 1, 2**31, 2**32, 2**63 - 1,
               2**63, -2**63, 10**6, 10**12, 0.0, -0.0, 0.5, -1.5, 1e-320, 1e-30, 1e30, 1e308, math.inf, -math.inf,
               math.nan, True, False, None, "", "x", "q4_0", "q8_0", "f16", "<f2", "|u1", "<f8", "llama", "mpt",
               [], [0], [1, 2], [2**40, 2], [-1], {}, {"x": 1}, "\ud800"]


def _paths(node, prefix=()):
    """Every (path, value) in a JSON tree, skipping the bulk of the tokenizer's text blobs."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("model", "json") and isinstance(v, str) and len(v) > 1000:
                yield prefix + (k,), v  # the blob itself, but not character by character
                continue
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def _set(tree, path, value):
    node = tree
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value


def _delete(tree, path):
    node = tree
    for p in path[:-1]:
        node = node[p]
    del node[path[-1]]


def mutate_header(header: dict, rng: random.Random, n: int = 1) -> dict:
    """``n`` random structural mutations of a header: a value replaced by an interesting one
    (or a neighbouring number, or another node of the tree), a key deleted or added."""
    header = json.loads(json.dumps(header))
    for _ in range(n):
        paths = [p for p, _ in _paths(header) if p]
        path = rng.choice(paths)
        node = header
        for p in path:
            node = node[p]
        kind = rng.random()
        if kind < 0.55:
            value = rng.choice(INTERESTING)
        elif kind < 0.75 and isinstance(node, (int, float)) and not isinstance(node, bool):
            value = node + rng.choice([-64, -1, 1, 64, node]) if math.isfinite(node) else 0
        elif kind < 0.85:
            value = json.loads(json.dumps(rng.choice([v for _, v in _paths(header)][:2000])))
        elif kind < 0.95:
            _delete(header, path)
            continue
        else:
            parent = header
            for p in path[:-1]:
                parent = parent[p]
            if isinstance(parent, dict):
                parent[rng.choice(["extra", "n_ctx", "version", "parts"])] = rng.choice(INTERESTING)
            continue
        _set(header, path, value)
    return header


def mutate_bytes(data: bytes, rng: random.Random, n: int = 8) -> bytes:
    """``n`` random bytes of the data section (after the preamble) overwritten."""
    data = bytearray(data)
    for _ in range(n):
        i = rng.randrange(PREAMBLE_SIZE, len(data))
        data[i] = rng.choice([0x00, 0xFF, 0x7C, 0x7E, 0x80, rng.randrange(256)])  # 0x7C00/0x7E00: f16 inf/NaN
    return bytes(data)


# -- GGUF: a small file from the bundled model, and rewriting its metadata ------------------

def bundled_gguf(path: Path, tmp_dir: Path) -> Path:
    """The bundled stories260K model as an F32 GGUF file written with the gguf package, in
    llama.cpp's layout (q/k rows permuted to adjacent RoPE pairs, SentencePiece vocabulary)."""
    import base64

    import gguf

    from tests.gguf_writer import add_sentencepiece_vocab, llama_cpp_permute

    f = ModelFile(BUNDLED)
    cfg, spec = f.metadata["config"], f.metadata["tokenizer"]
    (tmp_dir / "tokenizer.model").write_bytes(base64.b64decode(spec["model"]))
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    add_sentencepiece_vocab(w, tmp_dir)
    names = {"tok_embeddings": "token_embd.weight", "norm": "output_norm.weight"}
    layer = {"attention_norm": "attn_norm", "attention.wq": "attn_q", "attention.wk": "attn_k",
             "attention.wv": "attn_v", "attention.wo": "attn_output", "ffn_norm": "ffn_norm",
             "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up"}
    for name, t in f.tensors.items():
        x = t.dequantize()
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            gname = f"blk.{i}.{layer[rest]}.weight"
            if rest in ("attention.wq", "attention.wk"):
                heads = cfg["num_attention_heads"] if rest == "attention.wq" else cfg["num_key_value_heads"]
                x = llama_cpp_permute(x, heads)
        else:
            gname = names[name]
        w.add_tensor(gname, np.ascontiguousarray(x, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_contents(path: Path) -> tuple[str, list, list]:
    """(architecture, [(key, value type, element type, value)], [(name, array, qtype)])."""
    import gguf

    r = gguf.GGUFReader(path)
    fields = []
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = f.types[1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        fields.append((key, f.types[0], sub, f.contents()))
    tensors = [(t.name, np.array(t.data), t.tensor_type) for t in r.tensors]
    return r.fields["general.architecture"].contents(), fields, tensors


def write_gguf(path: Path, arch: str, fields: list, tensors: list) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    for key, vtype, sub, value in fields:
        w.add_key_value(key, value, vtype, sub_type=sub)
    for name, data, qtype in tensors:
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_values():
    """(value type, element type, value) candidates for a mutated GGUF key."""
    import gguf

    V = gguf.GGUFValueType
    return ([(V.UINT32, None, v) for v in (0, 1, 2, 3, 7, 64, 2**31, 2**32 - 1, 10**6)]
            + [(V.INT32, None, v) for v in (-1, 0, -2**31)] + [(V.UINT64, None, v) for v in (2**63, 10**12)]
            + [(V.FLOAT32, None, v) for v in (math.nan, math.inf, 0.0, -1.0, 1e-30, 1e30)]
            + [(V.STRING, None, v) for v in ("", "x", "llama", "gpt2", "linear")] + [(V.BOOL, None, True)]
            + [(V.ARRAY, V.INT32, v) for v in ([], [1, 2, 3])] + [(V.ARRAY, V.STRING, ["a", "b"])])


def mutate_gguf_fields(fields: list, rng: random.Random) -> list:
    """One random change: a key's value (and type) replaced, a key deleted, or an unknown key added."""
    fields = list(fields)
    i = rng.randrange(len(fields))
    kind = rng.random()
    vtype, sub, value = rng.choice(gguf_values())
    if kind < 0.75:
        fields[i] = (fields[i][0], vtype, sub, value)
    elif kind < 0.9:
        del fields[i]
    else:
        fields.append((rng.choice(["llama.unknown_option", "llama.attention.sliding_window", "general.x"]),
                       vtype, sub, value))
    return fields


# -- running files on the Numba backend in a child process ----------------------------------

CHILD = r"""
import sys
import numpy as np
import tinyllm
from tinyllm.errors import TinyLLMError
for path in sys.argv[1:]:
    print("BEGIN", path, flush=True)
    try:
        m = tinyllm.load(path, backend="numba", threads=1)
        logits = m.logits([m.tokenizer.bos_id or 1, 2, 3])
        assert logits.shape == (3, m.config.vocab_size) and np.isfinite(logits).all()
        text = m.generate([1, 2], max_new_tokens=3, temperature=0, stream=False)
        print("RESULT ok", flush=True)
    except TinyLLMError as e:
        print("RESULT tinyllm-error", str(e).replace("\n", " ")[:300], flush=True)
    except BaseException as e:
        print("RESULT raw-error", type(e).__name__, str(e).replace("\n", " ")[:300], flush=True)
"""


def run_files_in_child(paths: list[Path], timeout: float = 600) -> dict:
    """Load and run each file on the Numba backend in one child process. Returns
    {path: (outcome, message)}; a child killed by a signal raises AssertionError naming the
    file it was running (a native crash), as does a child that hangs past ``timeout``."""
    env = {**os.environ, "NUMBA_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, *map(str, paths)], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired as e:
        begun = [line for line in (e.stdout or b"").decode().splitlines() if line.startswith("BEGIN")]
        raise AssertionError(f"child hung on {begun[-1] if begun else '?'}") from None
    results, current = {}, None
    for line in proc.stdout.splitlines():
        if line.startswith("BEGIN "):
            current = line[6:]
        elif line.startswith("RESULT ") and current is not None:
            outcome, _, message = line[7:].partition(" ")
            results[current] = (outcome, message)
            current = None
    if proc.returncode != 0:
        raise AssertionError(f"child exited with {proc.returncode} while running {current}: {proc.stderr[-2000:]}")
    return results


def logits_ok(path: Path, backend: str = "numpy"):
    """Load and run ``path`` in this process: the logits of a short prompt (checked finite and of
    the declared shape) after a few tokens were generated; raises whatever loading raised."""
    import tinyllm

    m = tinyllm.load(path, backend=backend)
    logits = m.logits([1, 2, 3])
    assert logits.shape == (3, m.config.vocab_size) and np.isfinite(logits).all(), "wrong output"
    m.generate([1, 2], max_new_tokens=2, temperature=0, stream=False)
    return logits


__all__ = ["BUNDLED", "read_q4", "write_q4", "requantized", "mutate_header", "mutate_bytes", "run_files_in_child",
           "logits_ok"]
