"""lm-evaluation-harness, run for real on two small tasks this file writes (lm-eval's YAML
and local JSONL): through tinyllm's lm-eval backend (`tinyllm eval`, and lm-eval's own command
line via `python -m tinyllm.evaluation`) and through `tinyllm serve` with lm-eval's
local-completions and local-chat-completions models. Every score is checked against the same
computation done directly with tinyllm's Python API."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import tinyllm
from tinyllm.cli import main
from tinyllm.server import create_app

from .server_helpers import serving

lm_eval = pytest.importorskip("lm_eval")

MC_DOCS = [
    {"question": "Once upon a time, there was a little", "choices": ["girl", "rock", "seven"], "answer": 0},
    {"question": "Lily went to the", "choices": ["park", "ocean floor", "sky"], "answer": 0},
    {"question": "The dog was very", "choices": ["happy", "purple", "loud"], "answer": 2},
    {"question": "She wanted to play with her", "choices": ["friends", "toys", "mountain"], "answer": 1},
]
GEN_DOCS = [
    {"prompt": "Once upon a time", "target": ", there was a little girl named Lily"},
    {"prompt": "One day, Tom went to", "target": " the park"},
    {"prompt": "The cat", "target": " was happy"},
]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A multiple-choice and a generation task in lm-eval's format, over local JSONL files."""
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    for name, docs in (("mc", MC_DOCS), ("gen", GEN_DOCS)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = "dataset_path: json\ntest_split: test\n"
    (root / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n    aggregation: mean\n"
        "    higher_is_better: true\n")
    (root / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
        "target_delimiter: ''\n"
        "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 10\n  do_sample: false\n  temperature: 0\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    return root


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """lm-eval reads the local files through `datasets`: keep its caches here and off the network."""
    for key, value in {"HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                       "TOKENIZERS_PARALLELISM": "false"}.items():
        monkeypatch.setenv(key, value)


def expected_accuracy(score) -> float:
    """lm-eval's acc: the choice with the highest loglikelihood of " " + choice, per document."""
    hits = [int(np.argmax([score(d["question"], " " + c) for c in d["choices"]])) == d["answer"] for d in MC_DOCS]
    return float(np.mean(hits))


def expected_exact_match(generate) -> float:
    return float(np.mean([generate(d["prompt"]) == d["target"] for d in GEN_DOCS]))


def table_value(table: str, task: str, metric: str) -> float:
    cells = [c.strip() for c in next(line for line in table.splitlines() if f"|{task}" in line).split("|")]
    return float(cells[cells.index(metric) + 2])  # | metric | ↑ | value |


def test_tinyllm_eval_runs_lm_eval_with_the_backend(model, model_path, tasks, tmp_path):
    out = tmp_path / "results.json"
    r = CliRunner().invoke(main, ["eval", str(model_path), "--tasks", "tiny_mc,tiny_gen", "--include-path",
                                  str(tasks), "--backend", "numpy", "--output-path", str(out)])
    assert r.exit_code == 0, r.output
    results = json.loads(out.read_text())["results"]
    acc = expected_accuracy(lambda ctx, cont: model.loglikelihood(ctx, cont)[0])
    match = expected_exact_match(lambda p: model.generate(model.tokenize(p), max_new_tokens=10, temperature=0,
                                                          stop=["."], stream=False))
    assert results["tiny_mc"]["acc,none"] == pytest.approx(acc)
    assert results["tiny_gen"]["exact_match,none"] == pytest.approx(match)
    assert 0 < acc < 1 and match > 0  # the tasks tell a good answer from a bad one on this model
    assert table_value(r.output, "tiny_mc", "acc") == pytest.approx(acc, abs=1e-4)


def test_lm_eval_command_line_finds_the_tinyllm_model(model_path, tasks, tmp_path):
    r = subprocess.run([sys.executable, "-m", "tinyllm.evaluation", "run", "--model", "tinyllm", "--model_args",
                        f"path={model_path},backend=numpy", "--tasks", "tiny_mc", "--include_path", str(tasks)],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tiny_mc" in r.stdout and "acc" in r.stdout


def test_loglikelihood_rolling_scores_every_token_once(model):
    from lm_eval.api.instance import Instance

    backend = tinyllm.evaluation.TinyLLMEval(model=model)
    text = "Once upon a time there was a little girl. She liked to play outside with her dog."
    request = Instance("loglikelihood_rolling", {}, (text,), 0)
    (total,) = backend.loglikelihood_rolling([request])
    ids = [model.prefix_id] + model.tokenize(text, add_bos=False)
    assert total == pytest.approx(sum(e.logprob for e in model.token_logprobs(ids)), abs=1e-4)


def test_lm_eval_through_the_server(model, model_path, tasks):
    """local-completions (loglikelihood from echo + logprobs, tokenized by the server's
    /tokenize) and local-chat-completions (generation through the chat template)."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks))
    with serving(create_app(tinyllm.load(model_path, backend="numpy"))) as server:
        completions = lm_eval.simple_evaluate(
            model="local-completions", model_args=f"base_url={server.url}/v1/completions,model=tinyllm,"
                                                  "max_retries=1,tokenized_requests=True",
            tasks=["tiny_mc", "tiny_gen"], task_manager=manager)["results"]
        chat = lm_eval.simple_evaluate(
            model="local-chat-completions", model_args=f"base_url={server.url}/v1/chat/completions,model=tinyllm,"
                                                       "max_retries=1",
            tasks=["tiny_gen"], task_manager=manager, apply_chat_template=True)["results"]

    def score_without_bos(context, continuation):  # lm-eval's remote tokenizer adds no special tokens
        ctx = model.tokenize(context, add_bos=False)
        whole = model.tokenize(context + continuation, add_bos=False)
        return sum(e.logprob for e in model.token_logprobs(whole, start=len(ctx)))

    assert completions["tiny_mc"]["acc,none"] == pytest.approx(expected_accuracy(score_without_bos))
    assert completions["tiny_gen"]["exact_match,none"] == pytest.approx(expected_exact_match(
        lambda p: model.generate(model.tokenize(p, add_bos=False), max_new_tokens=10, temperature=0, stop=["."],
                                 stream=False)))
    answers = [model.chat([{"role": "user", "content": d["prompt"]}], max_new_tokens=10, temperature=0, stop=["."])
               for d in GEN_DOCS]
    assert chat["tiny_gen"]["exact_match,none"] == pytest.approx(
        np.mean([a == d["target"] for a, d in zip(answers, GEN_DOCS)]))


def test_backend_bad_input_is_one_clear_error(model, model_path, tasks):
    from lm_eval.api.instance import Instance

    from tinyllm.errors import TinyLLMError
    from tinyllm.evaluation import TinyLLMEval

    backend = TinyLLMEval(model=model)
    with pytest.raises(TinyLLMError, match="'num_beams' is not supported"):
        backend.generate_until([Instance("generate_until", {}, ("Once", {"num_beams": 4}), 0)])
    with pytest.raises(TinyLLMError, match="needs model_args path"):
        TinyLLMEval()
    with pytest.raises(TinyLLMError, match="n_ctx must be an integer"):
        TinyLLMEval(path=str(model_path), n_ctx="many")
    r = CliRunner().invoke(main, ["eval", str(model_path), "--tasks", "no_such_task", "--include-path", str(tasks)])
    assert r.exit_code == 1 and "unknown lm-eval task 'no_such_task'" in r.output


def test_long_contexts_keep_their_end(model):
    """A context longer than the window loses its start, as lm-eval's Hugging Face backend does."""
    from lm_eval.api.instance import Instance

    from tinyllm.evaluation import TinyLLMEval

    long_context = "Once upon a time there was a girl. " * 80  # > 512 tokens
    (text,) = TinyLLMEval(model=model).generate_until(
        [Instance("generate_until", {}, (long_context, {"until": ["."], "max_gen_toks": 600}), 0)])
    assert isinstance(text, str)
    total, _ = model.loglikelihood(long_context, " She")
    assert total < 0
