"""`tinyllm generate`: continue a prompt, streaming the text."""
from __future__ import annotations

from pathlib import Path

import click

from tinyllm.cli import main
from tinyllm.cli.options import (
    load_model,
    model_argument,
    read_text,
    runtime_options,
    sampling_options,
    say,
    valid_text,
    warm_up,
)
from tinyllm.generate import GenerationStats
from tinyllm.structured import grammar_from


def _to_chat(ctx, param, value):
    if value:
        raise click.UsageError("generate continues one prompt; the interactive mode is `tinyllm chat` "
                               "(llama.cpp's -i / llama-cli's conversation)")
    return value


@main.command()
@model_argument
@click.option("-p", "--prompt", default=None, callback=valid_text, help="Text to continue (default: start from BOS).")
@click.option("-f", "--file", "prompt_file", type=click.Path(dir_okay=False), default=None,
              help="Read the prompt from this file (as llama.cpp's -f).")
@click.option("-n", "--max-tokens", "--n-predict", "max_tokens", type=click.IntRange(min=1), default=256,
              show_default=True, help="Tokens to generate.")
@click.option("--stop", multiple=True, callback=valid_text, help="Stop when this string appears (repeatable).")
@click.option("-j", "--json-schema", default=None,
              help="Output JSON valid under this JSON Schema: a file, or the schema itself (as llama.cpp's -j).")
@click.option("--grammar-file", type=click.Path(dir_okay=False), default=None,
              help="Output that follows this GBNF grammar file (llama.cpp's format).")
@click.option("-i", "--interactive", is_flag=True, hidden=True, expose_value=False, callback=_to_chat)
@sampling_options
@runtime_options
def generate(model, prompt, prompt_file, max_tokens, stop, json_schema, grammar_file, temperature, top_k, top_p,
             min_p, repeat_penalty, seed, backend, threads, n_ctx, device):
    """Generate a continuation of --prompt with MODEL.

    With no MODEL: the cached SmolLM2 chat model, else the bundled story model.
    """
    if prompt is not None and prompt_file is not None:
        raise click.UsageError("give the prompt with -p or with -f, not both")
    prompt = read_text(prompt_file) if prompt_file is not None else (prompt or "")
    grammar = structured_output(json_schema, grammar_file)  # a bad schema fails before the model loads
    m = load_model(model, backend, threads, n_ctx, device)
    stats = GenerationStats()
    pieces = m.generate(prompt, max_new_tokens=max_tokens, temperature=temperature, top_k=top_k,  # checks it
                        top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty, seed=seed, stop=list(stop),
                        stats=stats, grammar=grammar)
    warm_up(m)
    click.echo(prompt, nl=False)
    for piece in pieces:
        click.echo(piece, nl=False)
    click.echo()
    if stats.finish_reason == "context":  # fewer than -n tokens: say why
        say(f"stopped after {stats.new_tokens} of {max_tokens} tokens: the context ({m.n_ctx} tokens) is full "
            "(a larger --ctx gives room, up to the model's context length)")


def structured_output(json_schema: str | None, grammar_file: str | None):
    """-j / --grammar-file as a Grammar (None: free text)."""
    if json_schema is not None and grammar_file is not None:
        raise click.UsageError("give --json-schema or --grammar-file, not both")
    if grammar_file is not None:
        return grammar_from(grammar=read_text(grammar_file))
    if json_schema is None:
        return None
    path = Path(json_schema)
    is_file = not json_schema.lstrip().startswith(("{", "true", "false")) or path.is_file()
    return grammar_from(json_schema=read_text(json_schema) if is_file else json_schema)
