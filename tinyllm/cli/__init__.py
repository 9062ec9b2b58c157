"""The `tinyllm` command line (click). Each command lives in its own module."""
from __future__ import annotations

import sys

import click

from ..errors import TinyLLMError


class _Group(click.Group):
    """Bad input ends in one clear line on stderr, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TinyLLMError as e:
            click.secho(f"error: {e}", err=True, fg="red")
            sys.exit(1)


@click.group(cls=_Group)
@click.version_option(package_name="tinyllm")
def main():
    """tinyllm: run 4-bit quantized LLaMA, GPT-J, MPT and Falcon models."""


# command registration: one import per command module
from . import convert  # noqa: E402,F401
from . import generate  # noqa: E402,F401
from . import chat  # noqa: E402,F401
from . import info  # noqa: E402,F401
from . import serve  # noqa: E402,F401
from . import perplexity  # noqa: E402,F401
from . import pull  # noqa: E402,F401
from . import bench  # noqa: E402,F401
