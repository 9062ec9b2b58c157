"""What is inside a model file, read from its header and tensor table: no weights prepared,
no KV cache allocated (`tinyllm info` and `tinyllm show` print this)."""
from __future__ import annotations

from collections import defaultdict
from math import prod
from pathlib import Path

from tinyllm.errors import reading
from tinyllm.fileformat import ModelFile, file_kind
from tinyllm.tokenizer import Tokenizer
from tinyllm.validate import check_source


def describe_file(path, progress=None) -> list[tuple[str, object]]:
    """(label, value) rows describing the model file at ``path``, validated as the loader
    validates it (a file `info` describes is a file `load` accepts). ``progress(done, total)``:
    while a GGUF file's tensors are read."""
    path = Path(path)
    with reading(path):
        if file_kind(path) == "gguf":
            from tinyllm.converters.gguf import open_gguf

            # GGUF tensors are regrouped in memory: there is no table to read alone
            source = open_gguf(path, progress=progress)
        else:
            source = ModelFile(path, verify=False)
        arch, cfg = check_source(source, str(path))
        meta = source.metadata
        tok = Tokenizer.from_spec(meta["tokenizer"])
    by_format = defaultdict(lambda: [0, 0, 0])  # tensors, bytes, weights
    for t in source.tensors.values():
        by_format[t.format][0] += 1
        by_format[t.format][1] += t.nbytes
        by_format[t.format][2] += prod(t.shape)
    n_params = sum(w for _, _, w in by_format.values())
    n_bytes = sum(b for _, b, _ in by_format.values())
    rows = [
        ("file", f"{path} ({path.stat().st_size / 2**20:.2f} MiB)"),
        ("architecture", meta["architecture"]),
        ("parameters", f"{n_params:,}"),
        ("bits per weight", f"{8 * n_bytes / n_params:.2f} (tensor bytes; "
                            f"file {8 * path.stat().st_size / n_params:.2f})"),
        ("quant", meta.get("quant", "?")),
        ("layers", cfg.num_hidden_layers),
        ("hidden size", cfg.hidden_size),
        ("heads", f"{cfg.num_attention_heads} (head dim {cfg.head_dim})"),
        ("context length", cfg.context_length),
        ("vocabulary", cfg.vocab_size),
        *arch.describe(cfg).items(),
        *[(f"tensors {fmt}", f"{n} tensor{'' if n == 1 else 's'}, {size / 2**20:.2f} MiB, "
                             f"{8 * size / w:.2f} bits/weight")
          for fmt, (n, size, w) in sorted(by_format.items())],
        ("tokenizer", f"{_tokenizer_kind(tok, meta)}, {tok.vocab_size} tokens, bos={tok.bos_id}, eos={tok.eos_ids}"),
        ("chat template", "yes" if meta.get("chat_template") else "none"),
        ("generation defaults", dict(meta.get("generation") or {}) or "none"),
    ]
    return rows


def _tokenizer_kind(tok, meta: dict) -> str:
    """What kind of tokenizer, in words a user knows: SentencePiece, or BPE (tokenizer.json),
    and where it came from when that is not the file's own tokenizer files."""
    kind = "SentencePiece" if tok.spec["kind"] == "sentencepiece" else "BPE (tokenizer.json)"
    origin = (meta.get("source") or {}).get("format")
    return kind + {"gguf": ", from the GGUF metadata", "llama2.c": ", from the llama2.c tokenizer.bin"}.get(origin, "")
