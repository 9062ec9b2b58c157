"""Options shared by the commands that load and run a model."""
from __future__ import annotations

import functools
import os

import click

from tinyllm.defaults import resolve_model
from tinyllm.errors import TinyLLMError
from tinyllm.kernels import BACKENDS
from tinyllm.kernels.backend import CACHE_TYPES, DEFAULT_CACHE_TYPE

CPU_BACKENDS = [name for name in BACKENDS if name != "cuda"]  # cuda is chosen with --device


def model_argument(f):
    """MODEL as an argument, or as llama.cpp spells it, -m/--model (not both)."""
    @functools.wraps(f)
    def merged(*args, model=None, model_flag=None, **kwargs):
        if model and model_flag and model != model_flag:
            raise click.UsageError(f"two models given: {model!r} and -m {model_flag!r}")
        return f(*args, model=model or model_flag, **kwargs)

    # any text: a path, a library name or a Hugging Face repo id; a directory gets its own hint
    merged = click.option("-m", "--model", "model_flag", type=click.Path(), default=None,
                          help="The model (the same as the MODEL argument, as llama.cpp spells it).")(merged)
    return click.argument("model", required=False, type=click.Path())(merged)


def _no_layer_offload(ctx, param, value):
    if value is not None:
        raise click.UsageError("tinyllm does not split layers between CPU and GPU: --device cuda runs the whole "
                               "model on an NVIDIA GPU, the default runs it on the CPU")
    return value


def _remember_cache_type(ctx, param, value):
    # --cache-type reaches load_model through the command's click context, so that every command
    # taking the runtime options has it without one more parameter to pass along
    ctx.meta["tinyllm.cache_type"] = value
    return value


def runtime_options(f=None, ctx_help: str = "Context length (default: the model's, at most 4096)."):
    """--backend, --threads, --ctx, --device, --cache-type: how and where the model runs. ``ctx_help``: for a
    command whose --ctx means something else (perplexity's window)."""
    if f is None:
        return lambda g: runtime_options(g, ctx_help)
    f = click.option("-ngl", "--n-gpu-layers", "--gpu-layers", "gpu_layers", default=None, hidden=True,
                     expose_value=False, callback=_no_layer_offload)(f)
    f = click.option("--cache-type", type=click.Choice(list(CACHE_TYPES)), default=None, expose_value=False,
                     callback=_remember_cache_type,
                     help=f"How the KV cache stores keys and values (default {DEFAULT_CACHE_TYPE}, f32 on cuda; f16: "
                     "half the memory of f32 and faster decode at long context, for a float16 rounding of "
                     "keys and values).")(f)
    f = click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
                     help="Run on the CPU (default) or an NVIDIA GPU (needs the cuda extra).")(f)
    f = click.option("--ctx", "-c", "n_ctx", type=click.IntRange(min=1), default=None, help=ctx_help)(f)
    f = click.option("--threads", "-t", type=click.IntRange(min=1), default=None,
                     help="CPU threads (default: adaptive, up to all cores, fewer while other "
                     "processes keep cores busy).")(f)
    f = click.option("--backend", type=click.Choice(CPU_BACKENDS), default=None,
                     help="Kernels: numba (fast, default) or numpy (the reference).")(f)
    return f


def sampling_options(f):
    f = click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=None,
                     help="Random seed for reproducible sampling.")(f)
    f = click.option("--repeat-penalty", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Penalty for recently seen tokens (1.0: off).")(f)
    f = click.option("--min-p", type=click.FloatRange(0, 1, max_open=True), default=None,
                     help="Drop tokens below min_p x the top probability.")(f)
    f = click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=None,
                     help="Nucleus sampling threshold.")(f)
    f = click.option("--top-k", type=click.IntRange(min=0), default=None,
                     help="Sample among the k most likely tokens (0: all).")(f)
    f = click.option("--temperature", "--temp", type=click.FloatRange(min=0, max=1e6), default=None,
                     help="0 = greedy; default from the model.")(f)
    return f


def valid_text(ctx, param, value):
    """Click callback: text options must be valid Unicode (undecodable command-line bytes are
    refused here, before anything is loaded or echoed)."""
    texts = value if isinstance(value, tuple) else (value,)
    for text in texts:
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise click.BadParameter("is not valid UTF-8 text") from None
    return value


def say(text: str) -> None:
    """A notice on stderr, in the CLI's colour for them."""
    click.secho(text, err=True, fg="yellow")


def load_model(model, backend, threads, n_ctx, device, announce=True, fetch=False, warn_ctx=True):
    """Find the model (the default one when none is given; ``fetch``: download the default
    chat model if it is not cached yet) and load it."""
    from tinyllm import load

    path = resolve_model(model, announce=announce, fetch=fetch, notice=say)
    if model is None and os.environ.get("TINYLLM_MODEL") and not path.exists():
        raise TinyLLMError(f"$TINYLLM_MODEL is {str(path)!r}, which does not exist: "
                           "set it to a model file, or unset it")
    ctx = click.get_current_context(silent=True)
    cache_type = ctx.meta.get("tinyllm.cache_type") if ctx else None
    m = load(path, backend=backend, threads=threads, n_ctx=n_ctx, device=device, cache_type=cache_type,
             progress=progress_bar(f"reading {path.name}", only_on_terminal=True) if _is_gguf(path) else None)
    if warn_ctx and n_ctx is not None and n_ctx > m.n_ctx:  # the model clamps it: say so, never silently
        say(f"--ctx {n_ctx} is more than {m.name}'s context length: using {m.n_ctx}")
    return m


def plural(n: int, word: str) -> str:
    """ "1 chunk", "2 chunks" """
    return f"{n} {word}{'' if n == 1 else 's'}"


def _is_gguf(path) -> bool:
    from tinyllm.fileformat import file_kind

    return file_kind(path) == "gguf"


def read_text(file) -> str:
    """A UTF-8 text file (perplexity, imatrix calibration), or a one-line error."""
    from pathlib import Path

    try:
        return Path(file).read_text(encoding="utf-8")
    except OSError as e:
        raise TinyLLMError(f"cannot read {file!r}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise TinyLLMError(f"{file!r} is not UTF-8 text: {e}") from None


def _interactive() -> bool:
    import sys

    return sys.stderr.isatty()


COMPILE_NOTICE_AFTER = 2.5  # seconds: loading cached kernels takes about one (README), compiling much longer


def warm_up(model, background: bool = False):
    """Compile (or load) the model's kernels now, saying so when that takes long: the first
    run on a machine compiles them for its CPU. ``background``: in a thread (returned; join
    it before using the model) so that a REPL can wait for its first message meanwhile."""
    import threading

    if not model.compiles:
        return None

    def run():
        if not _interactive():  # a script reading stderr gets no progress chatter
            return model.warm_up()
        timer = threading.Timer(COMPILE_NOTICE_AFTER, say, ["compiling the Numba kernels for this machine, once "
                                                            "(later runs load them from the cache)"])
        timer.daemon = True
        timer.start()
        try:
            model.warm_up()
        finally:
            timer.cancel()

    if not background:
        run()
        return None
    errors = []

    def guarded():
        try:
            run()
        except Exception as e:  # reported when joined: the first answer then fails with it
            errors.append(e)

    thread = threading.Thread(target=guarded, name="tinyllm-warmup", daemon=True)
    thread.errors = errors
    thread.start()
    return thread


def progress_bar(label: str, only_on_terminal: bool = False):
    """A ``progress(done, total)`` callback that draws a bar on stderr (click's: a terminal
    gets the bar, anything else the label once); ``only_on_terminal``: None off a terminal."""
    import sys

    if only_on_terminal and not _interactive():
        return None
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = click.progressbar(length=total, label=label, file=sys.stderr)
        bar.update(done - bar.pos)
        if done >= total:
            bar.render_finish()

    return progress
