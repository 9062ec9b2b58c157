"""`tinyllm bench`: prefill and decode speed of a model file on this machine."""
from __future__ import annotations

import click

from tinyllm.cli import main
from tinyllm.cli.options import load_model, model_argument, say


@main.command()
@model_argument
@click.option("--prompt-tokens", "-p", multiple=True, type=int, default=(128, 512), show_default=True,
              help="Prefill sizes to time (repeatable).")
@click.option("--gen-tokens", "-n", type=int, default=128, show_default=True, help="Decode steps to time.")
@click.option("--repeats", "-r", type=int, default=3, show_default=True, help="Timed runs of each (median shown).")
@click.option("--probe-mb", type=int, default=1024, show_default=True,
              help="Buffer size of the memory-bandwidth probe (0: skip the probe).")
@click.option("--threads", "-t", type=int, default=None,
              help="CPU threads (default: adaptive, up to all cores, fewer while other processes keep cores busy).")
@click.option("--backend", type=click.Choice(["numba", "numpy"]), default=None,
              help="Kernels: numba (fast, default) or numpy (the reference).")
def bench(model, prompt_tokens, gen_tokens, repeats, probe_mb, threads, backend):
    """Time prefill and decode of MODEL: tokens/s, and decode as GB/s of weights read next
    to the machine's measured read bandwidth."""
    from tinyllm.benchmark import run_bench
    from tinyllm.errors import TinyLLMError

    if repeats < 1 or gen_tokens < 1 or any(n < 1 for n in prompt_tokens) or probe_mb < 0:
        raise TinyLLMError("--repeats, --gen-tokens and --prompt-tokens must be at least 1, --probe-mb at least 0")
    n_ctx = max([*prompt_tokens, gen_tokens]) + 2
    m = load_model(model, backend, threads, n_ctx, None, announce=False, warn_ctx=False)
    for n in prompt_tokens:
        if n + 1 > m.n_ctx:
            say(f"prefill of {n} tokens skipped: {m.name}'s context is {m.n_ctx} tokens")
    if gen_tokens > m.n_ctx - 2:
        say(f"decode timed for {m.n_ctx - 2} steps, not {gen_tokens}: {m.name}'s context is {m.n_ctx} tokens")
    for line in run_bench(m, prompt_tokens, gen_tokens, repeats, probe_mb << 20).lines():
        click.echo(line)
