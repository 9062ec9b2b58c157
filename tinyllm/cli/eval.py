"""`tinyllm eval`: lm-evaluation-harness tasks on a model, through tinyllm's lm-eval backend."""
from __future__ import annotations

import json

import click

from tinyllm.cli import main
from tinyllm.cli.options import load_model, model_argument, runtime_options
from tinyllm.errors import TinyLLMError


@main.command(name="eval")
@model_argument
@click.option("--tasks", required=True, help="lm-eval task names or groups, comma-separated (e.g. arc_easy,piqa).")
@click.option("--num-fewshot", type=click.IntRange(min=0), default=None, help="Examples in each prompt.")
@click.option("--limit", type=float, default=None, help="At most this many documents per task (<1: a fraction).")
@click.option("--include-path", type=click.Path(file_okay=False, exists=True), default=None,
              help="A folder of your own task YAML files.")
@click.option("--apply-chat-template", is_flag=True, help="Prompts in the model's chat template.")
@click.option("--output-path", type=click.Path(dir_okay=False), default=None, help="Write lm-eval's results JSON here.")
@click.option("--seed", type=int, default=1234, show_default=True, help="lm-eval's random, numpy and fewshot seed.")
@runtime_options
def eval_(model, tasks, num_fewshot, limit, include_path, apply_chat_template, output_path, seed, backend, threads,
          n_ctx, device):
    """Evaluate MODEL on lm-evaluation-harness TASKS and print lm-eval's table.

    The seed paper's seven zero-shot tasks: --tasks boolq,piqa,hellaswag,winogrande,arc_easy,
    arc_challenge,openbookqa (lm-eval downloads their datasets from the Hugging Face Hub)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table
    except ImportError:
        raise TinyLLMError("tinyllm eval needs lm-evaluation-harness: pip install 'tinyllm[eval]'") from None
    from tinyllm.evaluation import TinyLLMEval

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise TinyLLMError(f"unknown lm-eval task {unknown[0]!r} (`python -m lm_eval ls tasks` lists them; "
                           "--include-path adds your own)")
    lm = TinyLLMEval(model=load_model(model, backend, threads, n_ctx, device))
    results = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, apply_chat_template=apply_chat_template,
                                      random_seed=seed, numpy_random_seed=seed, fewshot_random_seed=seed)
    click.echo(make_table(results))
    if output_path:
        with open(output_path, "w", encoding="utf-8") as f:
            json.dump({k: results[k] for k in ("results", "configs", "versions", "n-shot") if k in results}, f,
                      indent=2, default=str)
