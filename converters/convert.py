"""Hugging Face directory -> one .q4 file, streamed tensor by tensor.

The architecture's converter table (converters/<arch>.py) names every tensor and any
reshaping; this driver validates the config, quantizes each tensor as it is read, and
writes through ModelWriter (temporary file, renamed only on success).
"""
from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path

import numpy as np

from tinyllm.arch import arch_from_hf_config, get_arch
from tinyllm.converters.hf import Checkpoint, generation_defaults, read_json
from tinyllm.converters.hf_tokenizer import chat_template_from_hf_dir, tokenizer_spec_from_hf_dir
from tinyllm.converters.recipe import MIXES, Recipe
from tinyllm.errors import TinyLLMError, reading
from tinyllm.fileformat import ModelWriter, file_kind
from tinyllm.tokenizer import Tokenizer
from tinyllm.validate import check_metadata


def refuse_overwriting_input(src: Path, out: Path) -> None:
    """A conversion never writes over what it reads: not the source file, nor any existing
    file inside the source directory (its weights, its tokenizer, its configs). A new file
    there is fine (``convert DIR -o DIR/model.q4``)."""
    s, o = Path(src).resolve(), Path(out).resolve()
    inside = s.is_dir() and s in o.parents and o.exists()
    same = o == s or (o.exists() and s.exists() and o.samefile(s))
    if inside or same:
        raise TinyLLMError(f"output {str(out)!r} would overwrite the input {str(src)!r}: write it somewhere else")


def check_checkpoint_shapes(ckpt, plan, expected: dict, where: str) -> None:
    """Before anything is written: every tensor the plan reads exists, and those taken as they
    are have the shape the config implies (the fused ones are checked after their split)."""
    names = set(ckpt.names())
    missing = sorted({hf for _, hf, _ in plan if hf not in names})
    if missing:
        raise TinyLLMError(f"{where}: checkpoint lacks tensor(s) {', '.join(missing[:8])}")
    for name, hf_name, transform in plan:
        shape = tuple(ckpt.shape(hf_name))
        if transform is None and shape != tuple(expected[name]):
            raise TinyLLMError(f"{where}: tensor {hf_name} has shape {shape} but config.json implies "
                               f"{tuple(expected[name])} (config and weights disagree)")


def config_dict(cfg) -> dict:
    """The dataclass's init fields, as stored in the .q4 header."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.init}


DEFAULT_QUANT = "q4_0"  # for a Hugging Face checkpoint; a GGUF file keeps its own formats by default


def convert(src, out, quant: str | None = None, progress=None, quantizer: str = "nearest",
            imatrix=None, tokenizer=None, learn_rounding=None, learn_steps: int | None = None,
            learn_progress=None) -> Path:
    """Convert ``src`` (a Hugging Face checkpoint directory, a GGUF file or a llama2.c
    checkpoint, told by their contents) into the .q4 file ``out``; ``progress(done, total)``
    after each tensor written. ``quantizer`` ("nearest", "search" or "gptq") and ``imatrix``
    (an importance matrix file, or a {tensor name: values} dict) choose how 4-bit matrices are
    encoded (converters/recipe.py; gptq: a file with covariances); ``tokenizer``: a llama2.c
    checkpoint's tokenizer.bin; ``learn_rounding``: a calibration text file to fit the quantized result
    to ``src`` on, for ``learn_steps`` steps, ``learn_progress(step, steps)`` after each
    (converters/learned_rounding.py)."""
    from tinyllm.converters.gguf import convert_gguf
    from tinyllm.converters.llama2c import is_llama2c
    from tinyllm.imatrix import read_covariances, read_imatrix

    src = Path(src)
    if not src.exists():
        raise TinyLLMError(f"{str(src)!r} does not exist")
    gguf = src.is_file() and file_kind(src) == "gguf"
    llama2c = src.is_file() and not gguf and is_llama2c(src)
    if src.is_file() and not (gguf or llama2c):
        raise TinyLLMError(f"{str(src)!r} is neither a GGUF file, a llama2.c checkpoint nor a Hugging Face "
                           "checkpoint directory")
    if tokenizer is not None and not llama2c:
        raise TinyLLMError("--tokenizer names a llama2.c checkpoint's tokenizer.bin; this source has its own")
    importance = imatrix if isinstance(imatrix, dict) or imatrix is None else read_imatrix(imatrix)
    covariance = read_covariances(imatrix, importance) if quantizer == "gptq" and isinstance(imatrix, (str, Path)) \
        else {}
    if gguf and quant is None and (quantizer != "nearest" or importance):
        raise TinyLLMError("--quantizer and --imatrix choose how to requantize: give --quant too "
                           "(without it a GGUF file keeps its own formats)")
    recipe = Recipe(quant or DEFAULT_QUANT, quantizer, importance or {}, covariance)  # imatrix: GGUF tensor names
    if learn_rounding is not None or learn_steps is not None:
        if learn_rounding is None:
            raise TinyLLMError("--learn-steps sets how long --learn-rounding runs: give --learn-rounding TEXT too")
        if gguf or llama2c:
            raise TinyLLMError("--learn-rounding fits the conversion to its original, read by transformers: "
                               "give a Hugging Face checkpoint directory")
        return _convert_learned(src, Path(out), recipe, Path(learn_rounding), learn_steps, progress, learn_progress)
    if gguf:
        return convert_gguf(src, out, quant=quant, progress=progress, recipe=recipe)
    if llama2c:
        return convert_llama2c(src, out, tokenizer, progress=progress, recipe=recipe)
    return convert_hf(src, out, recipe=recipe, progress=progress)


def _convert_learned(src: Path, out: Path, recipe: Recipe, text: Path, steps: int | None, progress,
                     learn_progress) -> Path:
    """convert_hf into a temporary file, then learned rounding from it into ``out``."""
    import tempfile

    from tinyllm.converters import learned_rounding as lr

    steps = lr.STEPS if steps is None else steps
    if recipe.quant not in lr.LEARNED + MIXES:
        raise TinyLLMError("--learn-rounding fits block-quantized matrices: give --quant q4_0, q4_1, q4_k, q6_k, "
                           "q4_k_s or q4_k_m")
    lr.check_settings(steps)
    with reading(src / "config.json"):
        if arch_from_hf_config(read_json(src / "config.json")) != "llama":
            raise TinyLLMError(f"--learn-rounding reads LLaMA-family checkpoints; {src} is another architecture")
    _check_output(src, out)
    lr.check_torch()
    with reading(text):
        try:
            calibration = text.read_text(encoding="utf-8")
        except OSError as e:
            raise TinyLLMError(f"cannot read the calibration text {str(text)!r}: {e.strerror}") from None
    with tempfile.TemporaryDirectory(prefix="tinyllm-learn-") as tmp:
        start = convert_hf(src, Path(tmp) / "start.q4", recipe=recipe, progress=progress)
        return lr.learn_rounding(src, start, calibration, out, steps=steps,
                                 progress=learn_progress and (lambda step, steps, kld: learn_progress(step, steps)))


def convert_hf(src, out, quant: str = DEFAULT_QUANT, progress=None, recipe: Recipe | None = None) -> Path:
    """Convert the checkpoint directory ``src`` into ``out`` (``quant``, or the full ``recipe``).
    ``progress(done, total)`` is called after each tensor written. Returns the output path."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise TinyLLMError(f"{str(src)!r} is not a Hugging Face checkpoint directory")
    _check_output(src, out)
    with reading(src / "config.json"):
        hf_config = read_json(src / "config.json")
        if not isinstance(hf_config, dict):
            raise TinyLLMError(f"{src / 'config.json'}: must hold a JSON object, not {type(hf_config).__name__}")
        arch_name, cfg, recipe = _architecture(hf_config, recipe or Recipe(quant))
    with reading(src):
        tokenizer = tokenizer_spec_from_hf_dir(src, hf_config)
        source = {"format": "huggingface", "name": str(hf_config.get("_name_or_path") or src.name)}
        return _write(src, out, Checkpoint(src), arch_name, cfg, recipe, tokenizer, chat_template_from_hf_dir(src),
                      generation_defaults(src), source, progress)


def convert_llama2c(src, out, tokenizer=None, quant: str = DEFAULT_QUANT, progress=None,
                    recipe: Recipe | None = None) -> Path:
    """Convert the llama2.c checkpoint ``src`` (legacy, version 1 or int8 version 2) with its
    tokenizer.bin (``tokenizer``; default: tokenizer.bin or the one tok*.bin beside it)."""
    from tinyllm.converters.llama2c import Llama2cCheckpoint, find_tokenizer, tokenizer_spec_from_llama2c

    src, out = Path(src), Path(out)
    _check_output(src, out)
    with reading(src):
        ckpt = Llama2cCheckpoint(src)
        arch_name, cfg, recipe = _architecture(ckpt.hf_config, recipe or Recipe(quant))
    tok_path = Path(tokenizer) if tokenizer is not None else find_tokenizer(src)
    with reading(tok_path):
        spec = tokenizer_spec_from_llama2c(tok_path)
    n_pieces = Tokenizer.from_spec(spec).vocab_size
    if n_pieces != cfg.vocab_size:
        raise TinyLLMError(f"{tok_path} has {n_pieces} tokens but {src} was trained with {cfg.vocab_size}: "
                           "not its tokenizer")
    with reading(src):
        return _write(src, out, ckpt, arch_name, cfg, recipe, spec, None, {}, {"format": "llama2.c", "name": src.stem},
                      progress)


def _check_output(src: Path, out: Path) -> None:
    if not out.parent.is_dir():
        raise TinyLLMError(f"output directory {str(out.parent)!r} does not exist")
    refuse_overwriting_input(src, out)


def _architecture(hf_config: dict, recipe: Recipe):
    """The architecture a config.json names, its validated config, and the recipe bound to it."""
    arch_name = arch_from_hf_config(hf_config)
    cfg = get_arch(arch_name).Config.from_hf(hf_config)
    return arch_name, cfg, recipe.bind(arch_name, cfg)


def _write(src: Path, out: Path, ckpt, arch_name: str, cfg, recipe: Recipe, tokenizer: dict, chat_template,
           generation: dict, source: dict, progress) -> Path:
    """Check ``ckpt`` (tensors under Hugging Face names) against the architecture's plan, then
    stream it into ``out``, one tensor at a time."""
    arch = get_arch(arch_name)
    table = importlib.import_module(f"{__package__}.{arch_name}")
    expected = arch.weights(cfg)
    plan = table.tensor_plan(cfg)
    check_checkpoint_shapes(ckpt, plan, expected, str(src))
    metadata = {"architecture": arch_name, "config": config_dict(cfg), "tokenizer": tokenizer,
                "chat_template": chat_template, "generation": generation, "quant": recipe.quant, "source": source}
    check_metadata(metadata, str(src))

    used = {hf for _, hf, _ in plan}
    ignored = [re.compile(p) for p in table.IGNORED]
    unexpected = [n for n in ckpt.names() if n not in used and not any(p.search(n) for p in ignored)
                  and not (n == "lm_head.weight" and getattr(cfg, "tie_word_embeddings", False))]
    if unexpected:
        raise TinyLLMError(f"checkpoint has tensors tinyllm's {arch_name} does not use "
                           f"(an unsupported variant?): {', '.join(unexpected[:8])}")

    with ModelWriter(out, metadata) as writer, reading(src):
        for done, (name, hf_name, transform) in enumerate(plan, 1):
            w = ckpt.get(hf_name)
            if transform is not None:
                w = transform(w)
            if tuple(w.shape) != tuple(expected[name]):
                raise TinyLLMError(f"{src}: tensor {hf_name} gives {name} of shape {tuple(w.shape)}, but config.json "
                                   f"implies {tuple(expected[name])} (config and weights disagree)")
            if not np.isfinite(w).all():
                raise TinyLLMError(f"{src}: tensor {hf_name} holds NaN or infinite values")
            writer.add(name, recipe.encode(name, w))
            if progress:
                progress(done, len(plan))
    return out
