"""`tinyllm info`: what is inside a model file."""
from __future__ import annotations

from collections import defaultdict

import click

from tinyllm.cli import main
from tinyllm.cli.options import model_argument


@main.command()
@model_argument
def info(model):
    """Describe MODEL: architecture, sizes, quant formats, tokenizer, context."""
    from tinyllm import load
    from tinyllm.defaults import resolve_model

    m = load(resolve_model(model, announce=False), backend="numpy")
    cfg = m.config
    n_params = sum(int(__import__("numpy").prod(t.shape)) for t in m.file_tensors.values())
    by_format = defaultdict(lambda: [0, 0])
    for t in m.file_tensors.values():
        by_format[t.format][0] += 1
        by_format[t.format][1] += t.nbytes
    tok = m.tokenizer
    rows = [
        ("file", f"{m.path} ({m.path.stat().st_size / 2**20:.2f} MiB)"),
        ("architecture", m.metadata["architecture"]),
        ("parameters", f"{n_params:,}"),
        ("layers", cfg.num_hidden_layers),
        ("hidden size", cfg.hidden_size),
        ("heads", f"{cfg.num_attention_heads} (head dim {cfg.head_dim})"),
        ("context length", cfg.context_length),
        ("vocabulary", cfg.vocab_size),
    ]
    rows += list(m.arch.describe(cfg).items())
    rows += [(f"tensors {fmt}", f"{n} tensors, {size / 2**20:.2f} MiB") for fmt, (n, size) in sorted(by_format.items())]
    rows += [("tokenizer", f"{tok.spec['kind']}, {tok.vocab_size} tokens, bos={tok.bos_id}, eos={tok.eos_ids}"),
             ("chat template", "yes" if m.chat_template else "none"),
             ("generation defaults", m.generation_defaults or "none")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")
