"""The `tinyllm` command line (click). Each command lives in its own module."""
from __future__ import annotations

import sys
import warnings

import click

from tinyllm.errors import TinyLLMError


def _show_warning(message, category, filename, lineno, file=None, line=None):
    click.secho(f"warning: {message}", err=True, fg="yellow")


class _Group(click.Group):
    """Bad input ends in one clear line on stderr, never a traceback: `error: ...` and exit
    status 1 for what tinyllm refuses, 2 for a command line click refuses. A warning is one
    `warning: ...` line, without the source line Python would print under it."""

    def invoke(self, ctx):
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning
                return super().invoke(ctx)
        except TinyLLMError as e:
            click.secho(f"error: {e}", err=True, fg="red")
            sys.exit(1)

    def main(self, *args, **kwargs):
        kwargs.pop("standalone_mode", None)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as e:
            where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            click.secho(f"error: {e.format_message()}{where}", err=True, fg="red")
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.secho(f"error: {e.format_message()}", err=True, fg="red")
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_Group)
@click.version_option(package_name="tinyllm")
def main():
    """tinyllm: run 4-bit quantized LLaMA, GPT-J, MPT and Falcon models."""


# command registration: one import per command module
from tinyllm.cli import bench, chat, convert, eval, generate, imatrix, info, perplexity, pull, serve  # noqa: E402,F401
