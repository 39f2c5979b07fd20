"""Support matrix: every causal-LM and masked-LM (encoder) architecture of the installed
transformers whose tiny config builds offline from its config class, through every step.

Per architecture (one child process each, forked from a parent that imported everything once,
with a time budget): tiny config (hidden 64, 2 layers, vocab 256, no hub) -> model -> capture ->
FFNs found (count vs layers, kind, activation) -> MoE at top_k = E, hard gates, exact vs dense
(module mode, fresh odd-shaped input; then graph mode) -> FP8 lowering of the MoE model -> ONNX
export + onnxruntime parity (check_parity: valid for W8A8) -> generate after conversion (causal
LMs: greedy tokens equal the dense model's). Each failing step records its reason; later steps
then say which step they needed. Each row keeps its seconds per step (``timings``).

    python bench/support_matrix.py                  # all (resumes: rows kept in --jsonl)
    python bench/support_matrix.py --only llama,opt --timeout 300
    python bench/support_matrix.py --jobs 2          # two architectures at a time
    python bench/support_matrix.py --render         # docs/support.md from the JSONL only

Rows go to bench/results/support_matrix.jsonl as they finish; docs/support.md is rewritten after
every row, so a killed sweep keeps what it had.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import multiprocessing
import multiprocessing.connection
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import onnxruntime  # noqa: F401  (imported once here, not in every child)
import onnxscript  # noqa: F401
import torch
import torch.onnx  # noqa: F401
import transformers
from rewriter.targets.onnx_runtime import check_parity
from transformers import CONFIG_MAPPING
from transformers.models.auto import modeling_auto

import rewriter
from rewriter import FP8Config, MoEConfig
from rewriter.capture import first_float_output
from rewriter.patterns import analyze_ffns

ROOT = Path(__file__).resolve().parents[1]
JSONL = ROOT / "bench" / "results" / "support_matrix.jsonl"
DOC = ROOT / "docs" / "support.md"
STEPS = ("config", "capture", "ffns", "moe_exact", "moe_graph", "fp8", "onnx", "generate")
EXACT_TOL = 1e-5  # fp32 whole model, every expert on (summation order only)
# W8A8 E4M3 (3 mantissa bits: <= 2^-4 relative rounding, ~3.6% rms, on weights and activations
# of every matmul) through a 2-layer model: a few matmuls' worth of rounding, not a blow-up ...
FP8_BAND = 0.25
# ... or, for a tiny random model that amplifies any rounding (init std 1: CPM-Ant), what its
# own sensitivity predicts: E4M3's unit roundoff is 16x bf16's (2^-4 vs 2^-8), and W8A8 rounds
# weights and activations, so 2 x 16 x the error of rounding its weights to bf16
FP8_VS_BF16 = 32.0

MAX_PARAMS = 60_000_000  # a tiny config that keeps more than this is not tiny
TINY = {  # attribute -> value, set where the config class has the attribute
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "dim": 64, "embed_dim": 64,
    "intermediate_size": 128, "ffn_dim": 128, "n_inner": 128, "d_ff": 128,
    "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "hidden_dim": 128, "inner_hidden_size": 128,
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2, "decoder_layers": 2,
    "encoder_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "num_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "kv_channels": 16, "rotary_dim": 16,
    "vocab_size": 256, "max_position_embeddings": 128, "n_positions": 128,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "n_shared_experts": 1,
    "first_k_dense_replace": 0, "use_cache": False,
    # multi-head latent attention (DeepSeek-V2/V3 style) and linear-attention head sizes
    "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "qk_head_dim": 16, "v_head_dim": 16,
    "kv_lora_rank": 16, "q_lora_rank": 32, "linear_key_head_dim": 16,
    "linear_value_head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
}
TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "sep_token_id": 2,
             "cls_token_id": 1, "decoder_start_token_id": 1, "mask_token_id": 3}


# ----------------------------------------------------------------------------- one architecture


def _architectures() -> list[tuple[str, str, str]]:
    """(task, model_type, class name) for every causal-LM and masked-LM mapping entry."""
    out = []
    for task, mapping in (("causal", modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
                          ("encoder", modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES)):
        for model_type, cls in mapping.items():
            cls = cls[0] if isinstance(cls, (tuple, list)) else cls
            out.append((task, model_type, cls))
    return sorted(out)


# Tiers of overrides, tried in order until the model runs: every width, then without the
# head sizes (models that derive them: MLA, partial rotary), then layers / vocab / experts only.
_HEAD_KEYS = ("head_dim", "kv_channels", "num_key_value_heads")
_TIERS = (
    TINY,
    {k: v for k, v in TINY.items() if k not in _HEAD_KEYS},
    # multi-head latent attention (one kv head per query head) with grouped routing
    {**{k: v for k, v in TINY.items() if k not in _HEAD_KEYS}, "num_key_value_heads": 4,
     "n_group": 1, "topk_group": 1},
    {**TINY, "num_key_value_heads": 4},  # models that require kv heads == query heads
    {k: v for k, v in TINY.items() if k in ("num_hidden_layers", "n_layer", "num_layers",
                                            "n_layers", "decoder_layers", "encoder_layers",
                                            "vocab_size", "num_experts", "num_local_experts",
                                            "n_routed_experts", "num_experts_per_tok",
                                            "use_cache")},
)


def _tiny_model(model_type: str, class_name: str):
    """The first tier of overrides whose model builds and runs a forward; the errors of each."""
    errors = []
    for tier in _TIERS:
        try:
            torch.manual_seed(0)
            config = _tiny_config(model_type, tier)
            cls = getattr(transformers, class_name)
            _check_size(cls, config)
            model = cls(config).eval()
            if sum(p.numel() for p in model.parameters()) > MAX_PARAMS:
                raise RuntimeError("default widths too large for a tiny model")
            with torch.no_grad():  # a zero-initialised router ties every expert score, which
                for p in model.parameters():  # no trained model does: give weights values
                    if p.dim() >= 2 and p.is_floating_point() and not p.any():
                        p.normal_(0.0, 0.02)
            with torch.no_grad():
                model(input_ids=torch.randint(4, 200, (1, 5)))
            return config, model
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    raise RuntimeError(" | ".join(dict.fromkeys(errors)))


def _check_size(cls, config) -> None:
    """Refuse a config whose model is not tiny before building it for real (on the meta
    device: no memory, no initialisation; a class that cannot build there is built as usual)."""
    try:
        with torch.device("meta"):
            n = sum(p.numel() for p in cls(config).parameters())
    except Exception:
        return
    if n > MAX_PARAMS:
        raise RuntimeError(f"default widths too large for a tiny model ({n / 1e6:.0f}M "
                           "parameters)")


def _tiny_config(model_type: str, tiny: dict):
    cls = CONFIG_MAPPING[model_type]
    default = cls()
    known = set(vars(default)) | set(getattr(cls, "attribute_map", {}))
    if any(k in known for k in ("text_config", "vision_config", "audio_config")) and \
            not any(k in known for k in ("hidden_size", "n_embd", "d_model")):
        raise RuntimeError("composite config (text + other modalities): no tiny text model")
    kw = {k: v for k, v in tiny.items() if k in known}
    for k, v in TOKEN_IDS.items():
        if k in known and isinstance(getattr(default, k, None), int):
            kw[k] = v
    config = cls(**kw)
    for k, v in kw.items():  # some classes ignore a keyword or derive it: set it again
        with contextlib.suppress(Exception):
            if getattr(config, k, v) != v:
                setattr(config, k, v)
    lt = getattr(config, "layer_types", None)
    if isinstance(lt, list) and len(lt) != 2:
        config.layer_types = lt[:2]
    if hasattr(config, "_attn_implementation"):
        with contextlib.suppress(Exception):
            config._attn_implementation = "eager"
    return config


def _moe_params(model) -> list[str]:
    """Parameters that hold several experts at once (3-D, or named experts.*)."""
    return [n for n, p in model.named_parameters()
            if p.dim() == 3 and "expert" in n.lower()]


def _divisor(widths: list[int]) -> int:
    for e in (4, 8, 2, 3, 5, 6, 7):
        if all(w % e == 0 for w in widths):
            return e
    return 1


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def _feed(fixed: list[int], fresh: dict, ids: torch.Tensor, vocab: int,
          g: torch.Generator) -> dict:
    """``fresh``, or a fresh input of the example's size on the axes the graph fixes."""
    if not fixed:
        return fresh
    shape = tuple(ids.shape[a] if a in fixed else fresh["input_ids"].shape[a] for a in (0, 1))
    return {"input_ids": torch.randint(4, min(vocab, 256), shape, generator=g)}


def _axes(fixed: list[int]) -> str:
    return " and ".join(("batch size", "sequence length")[a] for a in fixed)


def _logits(out):
    return first_float_output(out)


def run_one(task: str, model_type: str, class_name: str, row_path: Path) -> None:
    """Fill the row step by step (written after each step, so a timeout keeps it)."""
    row: dict = {"task": task, "model_type": model_type, "class": class_name, "steps": {},
                 "reasons": {}, "timings": {}, "transformers": transformers.__version__}
    clock = [time.perf_counter()]

    def save():  # the seconds since the last save go to the step(s) it first records
        new = [s for s in row["steps"] if s not in row["timings"]]
        if new:
            now = time.perf_counter()
            row["timings"].update({s: 0.0 for s in new[1:]}, **{new[0]: round(now - clock[0], 2)})
            clock[0] = now
        row_path.write_text(json.dumps(row))

    def fail(step: str, exc: BaseException | str) -> None:
        text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        row["steps"][step] = "fail"
        row["reasons"][step] = " ".join(text.split())[:300]
        save()

    def skip(from_step: str, because: str) -> None:
        for s in STEPS[STEPS.index(from_step):]:
            row["steps"].setdefault(s, "skip")
            row["reasons"].setdefault(s, because)
        save()

    torch.manual_seed(0)
    warnings.simplefilter("ignore")
    try:
        config, model = _tiny_model(model_type, class_name)
        row["steps"]["config"] = "ok"
        row["params"] = sum(p.numel() for p in model.parameters())
    except Exception as exc:
        fail("config", exc)
        return skip("capture", "no tiny model")
    save()
    layers = next((getattr(config, k) for k in ("num_hidden_layers", "n_layer", "num_layers",
                                                 "decoder_layers") if hasattr(config, k)), None)
    vocab = getattr(config, "vocab_size", 256) or 256
    row["hidden"] = next((getattr(config, k) for k in ("hidden_size", "n_embd", "d_model")
                          if isinstance(getattr(config, k, None), int)), None)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, min(vocab, 256), (2, 9), generator=g)
    fresh = {"input_ids": torch.randint(4, min(vocab, 256), (3, 11), generator=g)}
    inputs = {"input_ids": ids}

    try:
        gm = rewriter.capture(model, inputs)
        row["steps"]["capture"] = "ok"
        row["capture_method"] = rewriter.capture_info(gm).method
        # the model's own code may fix the batch or sequence size (a list built from it)
        row["fixed_axes"] = sorted({0, 1} - set(
            rewriter.capture_info(gm).dynamic_dims.get("input_ids", (0, 1))))
    except Exception as exc:
        fail("capture", exc)
        return skip("ffns", "capture failed")
    save()

    analysis = analyze_ffns(gm)
    experts = _moe_params(model)
    row["ffns"] = len(analysis.matches)
    row["layers"] = layers
    row["kinds"] = sorted({f"{m.kind}/{m.activation}" for m in analysis.matches})
    row["already_moe"] = bool(experts)
    if analysis.matches:
        row["steps"]["ffns"] = "ok" if layers is None or len(analysis.matches) >= layers \
            else "partial"
        if row["steps"]["ffns"] == "partial":
            near = [r.describe() for r in analysis.rejections if r.near_miss][:2]
            row["reasons"]["ffns"] = (f"{len(analysis.matches)} FFNs for {layers} layers"
                                      + (f"; rejected: {'; '.join(near)}" if near else ""))
    else:
        near = [r.describe() for r in analysis.rejections if r.near_miss][:2]
        if not near:  # no FFN-like candidate at all: say what the matcher saw at the outputs
            near = [r.describe() for r in analysis.rejections][-2:]
            near = [f"no linear reads an elementwise function of other linears ({n})"
                    for n in near[:1]] + near[1:]
        why = ("already MoE: experts are 3-D parameters (" + experts[0] + "), not dense FFNs"
               if experts else "no FFN matched"
               + (f"; rejected: {'; '.join(near)}" if near else ""))
        fail("ffns", why)
    save()

    moe_model = None
    if analysis.matches:
        widths = [m.d_ff for m in analysis.matches]
        e = _divisor(widths)
        try:
            moe_model = rewriter.convert(model, moe=MoEConfig(num_experts=e, top_k=e,
                                                              gate="hard"),
                                         example_inputs=inputs)
            with torch.no_grad():
                rel = _rel(_logits(moe_model(**fresh)), _logits(model(**fresh)))
            row["moe_rel"] = rel
            row["experts"] = e
            if rel <= EXACT_TOL:
                row["steps"]["moe_exact"] = "ok"
            else:
                fail("moe_exact", f"all experts on differs from dense: rel {rel:.2e}")
        except Exception as exc:
            fail("moe_exact", exc)
            moe_model = None
    else:
        row["steps"]["moe_exact"] = "skip"
        row["reasons"]["moe_exact"] = "no FFN to split"
    save()

    if analysis.matches:  # graph mode: the same split on the captured graph itself
        try:
            moe_graph = rewriter.convert(model, moe=MoEConfig(num_experts=e, top_k=e,
                                                              gate="hard"),
                                         example_inputs=inputs, mode="graph")
            feed = _feed(row["fixed_axes"], fresh, ids, vocab, g)  # the graph takes no other
            with torch.no_grad():
                rel = _rel(_logits(moe_graph(**feed)), _logits(model(**feed)))
            row["moe_graph_rel"] = rel
            if rel <= EXACT_TOL and row["fixed_axes"]:
                row["steps"]["moe_graph"] = "partial"
                row["reasons"]["moe_graph"] = (
                    f"exact at the captured {_axes(row['fixed_axes'])}; the model's own code "
                    "fixes it (torch.export specialised it; upstream), so the graph takes no "
                    "other")
            elif rel <= EXACT_TOL:
                row["steps"]["moe_graph"] = "ok"
            else:
                fail("moe_graph", f"graph mode, all experts on, differs from dense: rel {rel:.2e}")
        except Exception as exc:
            fail("moe_graph", exc)
    else:
        row["steps"]["moe_graph"] = "skip"
        row["reasons"]["moe_graph"] = "no FFN to split"
    save()

    base = moe_model if moe_model is not None else model
    fp8_model = None
    try:
        fp8_model = rewriter.convert(base, fp8=FP8Config(), example_inputs=inputs)
        info = rewriter.conversion_info(fp8_model)
        row["fp8_lowered"] = sum(d.lowered for d in info.fp8_decisions)
        row["fp8_moe_blocks"] = sum(type(m).__name__ == "FP8MoEFFN"
                                    for m in fp8_model.modules())
        with torch.no_grad():
            row["fp8_rel"] = _rel(_logits(fp8_model(**fresh)), _logits(model(**fresh)))
        # how sensitive is this random tiny model to rounding at all: its weights to bf16
        rounded = copy.deepcopy(base)
        with torch.no_grad():
            for p in rounded.parameters():
                if p.is_floating_point():
                    p.copy_(p.to(torch.bfloat16).to(p.dtype))
            row["bf16_rel"] = _rel(_logits(rounded(**fresh)), _logits(base(**fresh)))
        band = max(FP8_BAND, FP8_VS_BF16 * row["bf16_rel"])
        if row["fp8_rel"] <= band:
            row["steps"]["fp8"] = "ok"
        else:
            row["steps"]["fp8"] = "partial"
            row["reasons"]["fp8"] = (
                f"W8A8 logits differ from the dense model's by rel {row['fp8_rel']:.3f}, above "
                f"its band {band:.3f} (max of {FP8_BAND} and {FP8_VS_BF16}x the rel "
                f"{row['bf16_rel']:.1e} that rounding its weights to bf16 alone gives)")
    except Exception as exc:
        fail("fp8", exc)
    save()

    target = fp8_model if fp8_model is not None else base
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            report = rewriter.export_onnx(target, path, example_inputs=inputs)
            fixed = sorted({0, 1} - set(report.dynamic_axes.get("input_ids", {0: 0, 1: 1})))
            parity = check_parity(target, path, _feed(fixed, fresh, ids, vocab, g))
        row["onnx_rel"] = parity.get("rel")
        row["onnx_mode"] = parity.get("mode")
        if parity.get("passed") and fixed:
            row["steps"]["onnx"] = "partial"
            row["reasons"]["onnx"] = (
                f"the model's own code fixes the {_axes(fixed)} when exported (torch.export "
                "specialised it; upstream): parity holds at the example's size only")
        elif parity.get("passed"):
            row["steps"]["onnx"] = "ok"
        else:
            fail("onnx", "onnxruntime parity: " + "; ".join(parity.get("failures", []))[:250])
    except Exception as exc:
        fail("onnx", exc)
    save()

    if task != "causal":
        row["steps"]["generate"] = "n/a"
    elif moe_model is None:
        row["steps"]["generate"] = "skip"
        row["reasons"]["generate"] = "no MoE model"
    else:
        try:
            prompt = ids[:1, :5]
            kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
            with torch.no_grad():
                dense = model.generate(prompt, **kw)
                moe = moe_model.generate(prompt, **kw)
            if torch.equal(dense, moe):
                row["steps"]["generate"] = "ok"
            else:
                fail("generate", f"greedy tokens differ: {dense.tolist()} vs {moe.tolist()}")
        except Exception as exc:
            fail("generate", exc)
    save()


# ----------------------------------------------------------------------------- the sweep


def _load(path: Path) -> dict[tuple[str, str], dict]:
    rows = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                rows[(r["task"], r["model_type"])] = r
    return rows


def _cell(row: dict, step: str) -> str:
    state = row["steps"].get(step, "—")
    return {"ok": "✅", "fail": "❌", "partial": "⚠️", "skip": "–", "n/a": "n/a"}.get(state, state)


def render(rows: dict[tuple[str, str], dict], doc: Path) -> dict[str, int]:
    ordered = sorted(rows.values(), key=lambda r: (r["task"], r["model_type"]))
    built = [r for r in ordered if r["steps"].get("config") == "ok"]
    dense = [r for r in built if not r.get("already_moe")]
    full = [r for r in dense if all(r["steps"].get(s) in ("ok", "n/a") for s in STEPS)]
    counts = {"architectures": len(ordered), "tiny_config_builds": len(built),
              "dense": len(dense), "dense_all_steps": len(full),
              "already_moe": sum(bool(r.get("already_moe")) for r in built)}
    for s in STEPS:
        counts[f"{s}_ok"] = sum(r["steps"].get(s) in ("ok", "n/a") for r in built)
    lines = [
        "# Supported architectures",
        "",
        f"Generated by `bench/support_matrix.py` against transformers {transformers.__version__} "
        "(CPU). Every causal-LM and masked-LM architecture whose tiny config (hidden 64, 2 "
        "layers, vocab 256) builds offline from its config class is one row. Steps: **capture** "
        "(one FX graph), **FFNs** (found vs layers; kind/activation; `captured`: an "
        "activation no rule names, kept as the block's own elementwise graph), **MoE exact** "
        "(module mode, the default: every FFN split into E experts, top_k = E, hard gates; "
        f"logits equal the dense model's to rel <= {EXACT_TOL:g} on a fresh (3, 11) input), "
        "**graph** (the same in `mode='graph'`), **FP8** (the MoE model lowered, W8A8 1x128 / "
        f"128x128; logits within rel {FP8_BAND} of the dense model's, a few matmuls' worth of "
        f"E4M3 rounding, or within {FP8_VS_BF16:g}x what rounding the weights to bf16 alone "
        "moves them for a tiny random model that amplifies any rounding), **ONNX** (export "
        "of the FP8 MoE model + onnxruntime parity, judged with activation quantization "
        "bypassed), **generate** "
        "(greedy tokens after the MoE conversion equal the dense model's, KV cache on). "
        "⚠️ marks a step that ran with a caveat (the reason below).",
        "",
        "Architectures that are already MoE (3-D expert weights: Mixtral, Qwen-MoE, DeepSeek, "
        "...) are rows too: their experts are not dense FFNs, so the toolkit does not split "
        "them again (the FFNs column says why); FP8 lowers their dense linears (attention, "
        "shared experts) and keeps the fused experts in their dtype, and the ONNX export runs "
        "transformers' exact batched-matmul experts in place of its fused kernel.",
        "",
        "Regenerate: `python bench/support_matrix.py --jobs 2` (resumes; `--redo-failed` "
        "runs again the rows that did not pass every step; `--redo` all of them). The slow CI "
        "step runs the whole sweep (`tests/bench/test_support_matrix.py`) and fails when a "
        "step this table marks passing fails, or a failure has no reason.",
        "",
        f"- architectures tried: {counts['architectures']}; tiny config builds: "
        f"{counts['tiny_config_builds']} ({counts['dense']} dense, {counts['already_moe']} "
        "already MoE)",
        f"- dense architectures passing every step: {counts['dense_all_steps']} / "
        f"{counts['dense']}",
        "- per step (of those that build): " + ", ".join(
            f"{s} {counts[f'{s}_ok']}" for s in STEPS[1:]),
        "",
        "| task | model_type | class | capture | FFNs | kinds | MoE exact | graph | FP8 | ONNX "
        "| generate |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in built:
        ffns = f"{r.get('ffns', '—')}/{r.get('layers', '—')}"
        lines.append(
            f"| {r['task']} | {r['model_type']} | {r['class']} | {_cell(r, 'capture')} | "
            f"{_cell(r, 'ffns')} {ffns} | {', '.join(r.get('kinds', [])) or '—'}"
            f"{' (MoE)' if r.get('already_moe') else ''} | {_cell(r, 'moe_exact')} | "
            f"{_cell(r, 'moe_graph')} | {_cell(r, 'fp8')} | {_cell(r, 'onnx')} | "
            f"{_cell(r, 'generate')} |")
    lines += ["", "## Why a step failed", ""]
    for r in built:
        reasons = {s: t for s, t in r["reasons"].items() if r["steps"].get(s) in
                   ("fail", "partial")}
        for s, t in reasons.items():
            lines.append(f"- **{r['model_type']}** ({r['task']}) {s}: {t}")
    no_config = [r for r in ordered if r["steps"].get("config") != "ok"]
    lines += ["", "## Architectures without a tiny config", "",
              "Their config class does not build a small model offline (composite multimodal "
              "configs, required sub-configs, hub-only assets):", ""]
    for r in no_config:
        lines.append(f"- {r['model_type']} ({r['task']}, {r['class']}): "
                     f"{r['reasons'].get('config', 'not run')}")
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines) + "\n")
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated model_types")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per architecture")
    ap.add_argument("--jobs", type=int, default=1,
                    help="architectures run at once (one forked child each, one thread each)")
    ap.add_argument("--jsonl", type=Path, default=JSONL)
    ap.add_argument("--doc", type=Path, default=DOC)
    ap.add_argument("--render", action="store_true", help="only write the doc from the JSONL")
    ap.add_argument("--redo", action="store_true", help="run rows already in the JSONL again")
    ap.add_argument("--redo-failed", action="store_true",
                    help="run again the rows that built but did not pass every step")
    ap.add_argument("--order-from", type=Path, default=JSONL,
                    help="a JSONL of an earlier run: its seconds order the work, longest first")
    args = ap.parse_args(argv)
    rows = _load(args.jsonl)
    if args.render:
        print(json.dumps(render(rows, args.doc)))
        return 0
    only = {s for s in args.only.split(",") if s}

    def passed(row: dict) -> bool:
        return row["steps"].get("config") != "ok" or all(
            row["steps"].get(s) in ("ok", "n/a") for s in STEPS)

    todo = [a for a in _architectures() if (not only or a[1] in only)
            and (args.redo or (a[0], a[1]) not in rows
                 or (args.redo_failed and not passed(rows[(a[0], a[1])])))]
    # longest first (an earlier run's seconds), so the jobs finish together
    before = rows | (_load(args.order_from) if args.order_from.exists() else {})
    todo.sort(key=lambda a: -before.get((a[0], a[1]), {}).get("seconds", 60.0))
    args.jsonl.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    for i, row in enumerate(_sweep(todo, args.jobs, args.timeout)):
        rows[(row["task"], row["model_type"])] = row
        with args.jsonl.open("a") as out:
            out.write(json.dumps(row) + "\n")
        render(rows, args.doc)
        print(f"[{i + 1}/{len(todo)}, {time.time() - t_start:.0f} s] {row['task']} "
              f"{row['model_type']}: " + " ".join(f"{s}={row['steps'][s]}" for s in STEPS)
              + f" ({row['seconds']} s)", flush=True)
    if todo:  # one line per architecture: the latest run of each
        args.jsonl.write_text("".join(json.dumps(rows[k]) + "\n" for k in sorted(rows)))
    print(json.dumps(render(rows, args.doc) | {"seconds": round(time.time() - t_start)}))
    return 0


def _child(arch: tuple[str, str, str], row_path: Path) -> None:
    """One architecture in a forked child: its own copy of the parent's imports and state;
    one thread, offline, quiet."""
    torch.set_num_threads(1)
    os.environ["HF_HUB_OFFLINE"] = "1"
    transformers.logging.set_verbosity_error()
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            run_one(*arch, row_path)
        except Exception:
            traceback.print_exc()


def _finish(arch: tuple[str, str, str], row_path: Path, seconds: float,
            timed_out: bool, timeout: float) -> dict:
    """The row the child wrote; the first step it did not record fails with why."""
    task, model_type, cls = arch
    text = row_path.read_text() if row_path.exists() else ""
    row_path.unlink(missing_ok=True)
    row = json.loads(text) if text.strip() else {
        "task": task, "model_type": model_type, "class": cls, "steps": {}, "reasons": {}}
    missing = [s for s in STEPS if s not in row["steps"]]
    for s in missing:
        row["steps"][s] = "fail" if s == missing[0] else "skip"
        row["reasons"][s] = (f"over the {timeout:.0f} s budget" if timed_out
                             else "the run crashed") if s == missing[0] else \
            f"{missing[0]} did not finish"
    row["seconds"] = round(seconds, 1)
    return row


def _sweep(todo: list[tuple[str, str, str]], jobs: int, timeout: float):
    """Yield each architecture's row as it finishes, ``jobs`` of them at once.

    Each architecture runs in a child forked from this process, which imported torch,
    transformers, onnxruntime and the project once (~8 s a subprocess would pay per row): a
    crash or hang costs one row, and the parent stays single-threaded, so forking is safe."""
    ctx = multiprocessing.get_context("fork")
    pending, running = list(todo), {}
    while pending or running:
        while pending and len(running) < max(1, jobs):
            arch = pending.pop(0)
            with tempfile.NamedTemporaryFile("w+", suffix=".json", delete=False) as f:
                row_path = Path(f.name)
            proc = ctx.Process(target=_child, args=(arch, row_path), daemon=True)
            proc.start()
            running[proc.sentinel] = (proc, arch, row_path, time.time())
        ready = set(multiprocessing.connection.wait(list(running), timeout=1.0))
        for sentinel, (proc, arch, row_path, t0) in list(running.items()):
            killed = sentinel not in ready and time.time() - t0 > timeout
            if sentinel not in ready and not killed:
                continue
            if killed:
                proc.kill()
            proc.join()
            del running[sentinel]
            yield _finish(arch, row_path, time.time() - t0, killed, timeout)


if __name__ == "__main__":
    sys.exit(main())
