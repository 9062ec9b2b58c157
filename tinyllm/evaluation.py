"""tinyllm as an EleutherAI lm-evaluation-harness model: ``--model tinyllm``.

The three requests lm-eval makes, answered with tinyllm's Python API:

- ``loglikelihood(context, continuation)``: :meth:`Model.loglikelihood` (the pair tokenized as
  lm-eval's own Hugging Face backend does; BOS first when the model's tokenizer adds it, as
  llama.cpp scores text). Multiple-choice tasks send each question's choices in a row, so the
  KV cache computes the shared context once.
- ``loglikelihood_rolling(text)``: the text's own tokens scored in lm-eval's rolling windows
  of the context length (``lm_eval.utils.get_rolling_token_windows``), each token once.
- ``generate_until(context, gen_kwargs)``: :meth:`Model.generate`, greedy unless the task
  samples, stopping at the task's ``until`` strings.

lm-eval 0.4.13 finds models in its registry only (it has no plugin entry point), so the
registration happens when this module is imported: ``tinyllm eval`` does that, and
``python -m tinyllm.evaluation`` is lm-eval's own command line with tinyllm registered:

    python -m tinyllm.evaluation --model tinyllm --model_args path=model.q4 --tasks hellaswag
"""
from __future__ import annotations

import lm_eval.models  # noqa: F401  (lm-eval lists its own models only while its registry is empty: first)
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from tinyllm.errors import TinyLLMError

GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k", "min_p", "seed",
              "repetition_penalty", "max_tokens"}
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default
LM_EVAL_DEFAULT_DEVICE = "cuda:0"  # lm-eval's --device default, sent to every model


@register_model("tinyllm")
class TinyLLMEval(LM):
    """``model_args``: ``path`` (a .q4 or .gguf file; ``pretrained`` is accepted as its
    alias), ``backend``, ``threads``, ``n_ctx`` as :func:`tinyllm.load` takes them; lm-eval's
    ``--device`` is tinyllm's device (``cpu`` or ``cuda``; its default ``cuda:0``, sent to every
    model, counts as no choice). lm-eval's ``batch_size`` is accepted: requests run one at a
    time, so it changes nothing."""

    def __init__(self, path=None, pretrained=None, backend=None, threads=None, n_ctx=None, device=None,
                 batch_size=None, max_batch_size=None, model=None, max_gen_toks=DEFAULT_MAX_GEN_TOKS):
        super().__init__()
        if model is None:
            import tinyllm

            path = path or pretrained
            if not path:
                raise TinyLLMError("the tinyllm lm-eval model needs model_args path=<model file>")
            if device == LM_EVAL_DEFAULT_DEVICE:  # what lm-eval sends every model unless told: no choice made
                device = None
            model = tinyllm.load(path, backend=backend, threads=_int(threads, "threads"),
                                 n_ctx=_int(n_ctx, "n_ctx"), device=device)
        self.model = model
        self.max_gen_toks = _int(max_gen_toks, "max_gen_toks")

    # -- lm-eval's three requests -------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return [self.model.loglikelihood(*req.args) for req in requests]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        m = self.model
        out = []
        for (text,) in (req.args for req in requests):
            windows = map(lm_utils.make_disjoint_window,
                          lm_utils.get_rolling_token_windows(
                              token_list=m.tokenize(text, add_bos=False),
                              prefix_token=m.prefix_id, max_seq_len=m.n_ctx, context_len=1))
            total = 0.0
            for context, continuation in windows:
                entries = m.token_logprobs(context + continuation, start=len(context))
                total += sum(e.logprob for e in entries)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return [self._generate(*req.args) for req in requests]

    def _generate(self, context: str, gen_kwargs: dict) -> str:
        m = self.model
        unknown = sorted(set(gen_kwargs) - GEN_KWARGS)
        if unknown:
            raise TinyLLMError(f"generation option {unknown[0]!r} is not supported by the tinyllm backend "
                               f"(it takes {', '.join(sorted(GEN_KWARGS))})")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(gen_kwargs.get("max_gen_toks", gen_kwargs.get("max_tokens", self.max_gen_toks)))
        greedy = not gen_kwargs.get("do_sample", False) or not gen_kwargs.get("temperature", 0.0)
        ids = m.tokenize(context)  # special-token text parsed, as lm-eval's Hugging Face backend does
        ids = ids[-max(1, m.n_ctx - max_new):]  # the context's end, leaving room for the answer
        return m.generate(ids, max_new_tokens=max_new, stop=until, stream=False,
                          temperature=0.0 if greedy else float(gen_kwargs["temperature"]),
                          top_p=gen_kwargs.get("top_p"), top_k=gen_kwargs.get("top_k"),
                          min_p=gen_kwargs.get("min_p"), seed=gen_kwargs.get("seed"),
                          repeat_penalty=gen_kwargs.get("repetition_penalty"))

    # -- what lm-eval asks of a model besides the requests ----------------------------------

    @property
    def tokenizer_name(self) -> str:
        return self.model.name

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation in the model's chat template (``--apply_chat_template``); its
        special-token text becomes those tokens again when the request is tokenized."""
        from tinyllm.chat import ChatSession

        session = ChatSession(self.model)
        session.load_messages(chat_history)
        return session.render(add_generation_prompt=add_generation_prompt)


def _int(value, name: str):
    if value is None or isinstance(value, int):
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        raise TinyLLMError(f"{name} must be an integer, got {value!r}") from None


def main() -> None:
    """lm-eval's command line, with ``--model tinyllm`` available."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
