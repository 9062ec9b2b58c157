"""Tiny random Hugging Face models built from config alone, saved as checkpoint folders,
and their logits: the oracle tinyllm's architectures are tested against."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

SHARED_MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"


def save_random_model(model, directory: Path, tokenizer_files: list[Path], seed: int = 0) -> Path:
    """Save ``model`` (random weights, scaled up a little so logits are not all ~0)
    with the given tokenizer files as a checkpoint folder."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.08)            # matrices and embeddings
            elif "bias" in name:
                p.normal_(0.0, 0.05)
            else:
                p.uniform_(0.8, 1.2)            # norm gains
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    for f in tokenizer_files:
        shutil.copy(f, directory / f.name)
    return directory


def hf_logits(model, tokens: list[int]) -> np.ndarray:
    """Full-sequence logits (T, vocab) from transformers in float32."""
    import torch

    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


def hf_greedy(model, tokens: list[int], n: int) -> list[int]:
    """n argmax steps, recomputing the whole sequence each time (no eos handling)."""
    tokens = list(tokens)
    for _ in range(n):
        tokens.append(int(hf_logits(model, tokens)[-1].argmax()))
    return tokens[-n:]
