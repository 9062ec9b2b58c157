"""Print, for every case of test_architectures, tinyllm's logit error against transformers
per weight format: max |error| and RMS(error) / std(logits).

    python -m tests.logit_errors          (from the repository root; about a minute)
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers

import tinyllm
from tinyllm.converters.convert import convert_hf

from .hf_oracle import hf_logits, save_random_model
from .test_architectures import CASES, PROMPT, tokenizer_files

FORMATS = ("f32", "q8_0", "q4_0")


def main():
    torch.set_num_threads(1)
    print(f"{'case':34s} {'std':>5s}  " + "  ".join(f"{q + ' max (rms/std)':>22s}" for q in FORMATS))
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model_class, config, tokenizer) in CASES.items():
            cls = getattr(transformers, model_class)
            model = cls(cls.config_class(**config)).eval()
            folder = save_random_model(model, Path(tmp) / name, tokenizer_files(tokenizer))
            expected = hf_logits(model, PROMPT)
            cells = []
            for quant in FORMATS:
                path = convert_hf(folder, Path(tmp) / f"{name}-{quant}.q4", quant=quant)
                err = tinyllm.load(path, backend="numpy").logits(PROMPT) - expected
                cells.append(f"{np.abs(err).max():10.2e} ({np.sqrt(np.mean(err ** 2)) / expected.std():.3f})")
            print(f"{name:34s} {expected.std():5.3f}  " + "  ".join(f"{c:>22s}" for c in cells))


if __name__ == "__main__":
    main()
