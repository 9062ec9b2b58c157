"""The `tinyllm` command line (click)."""
import click


@click.group()
def main():
    """tinyllm: run 4-bit quantized LLaMA, GPT-J, MPT and Falcon models."""
