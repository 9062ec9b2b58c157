"""Options shared by the commands that load and run a model."""
from __future__ import annotations

import click

from ..defaults import resolve_model


def model_argument(f):
    return click.argument("model", required=False, type=click.Path(dir_okay=False))(f)


def runtime_options(f):
    """--backend, --threads, --ctx, --device: how and where the model runs."""
    f = click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
                     help="Run on the CPU (default) or an NVIDIA GPU (needs the cuda extra).")(f)
    f = click.option("--ctx", "n_ctx", type=int, default=None, help="Context length (default: the model's, at most 4096).")(f)
    f = click.option("--threads", "-t", type=int, default=None, help="CPU threads (default: all cores).")(f)
    f = click.option("--backend", type=click.Choice(["numba", "numpy"]), default=None,
                     help="Kernels: numba (fast, default) or numpy (the reference).")(f)
    return f


def sampling_options(f):
    f = click.option("--seed", type=int, default=None, help="Random seed for reproducible sampling.")(f)
    f = click.option("--repeat-penalty", type=float, default=None, help="Penalty for recently seen tokens (1.0: off).")(f)
    f = click.option("--min-p", type=float, default=None, help="Drop tokens below min_p x the top probability.")(f)
    f = click.option("--top-p", type=float, default=None, help="Nucleus sampling threshold.")(f)
    f = click.option("--top-k", type=int, default=None, help="Sample among the k most likely tokens (0: all).")(f)
    f = click.option("--temperature", type=float, default=None, help="0 = greedy; default from the model.")(f)
    return f


def load_model(model, backend, threads, n_ctx, device, announce=True, fetch=False):
    """Find the model (the default one when none is given; ``fetch``: download the default
    chat model if it is not cached yet) and load it."""
    from .. import load

    path = resolve_model(model, announce=announce, fetch=fetch)
    return load(path, backend=backend, threads=threads, n_ctx=n_ctx, device=device)
