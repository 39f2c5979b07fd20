"""bench/support_matrix.py: the sweep over transformers' architectures.

The slow CI step runs the whole sweep (every causal-LM and masked-LM architecture of the
installed transformers, two at a time, ~50 min on 2 cores) and checks it against the committed
table (bench/results/support_matrix.jsonl -> docs/support.md): no step the table marks passing
fails now, at least 90% of the dense architectures pass every step, every failure says why,
and each FFN form and failure kind is reported as such.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

_ROOT = Path(__file__).resolve().parents[2]
_SCRIPT = _ROOT / "bench" / "support_matrix.py"
_COMMITTED = _ROOT / "bench" / "results" / "support_matrix.jsonl"


def _rows(path: Path) -> dict[tuple[str, str], dict]:
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            rows[(r["task"], r["model_type"])] = r
    return rows


@pytest.mark.slow
def test_whole_sweep_keeps_every_committed_pass(tmp_path):
    import transformers

    jsonl, doc = tmp_path / "rows.jsonl", tmp_path / "support.md"
    proc = subprocess.run(  # the committed run's seconds order the work (longest first)
        [sys.executable, str(_SCRIPT), "--jobs", "2", "--timeout", "900", "--jsonl",
         str(jsonl), "--doc", str(doc), "--order-from", str(_COMMITTED)],
        capture_output=True, text=True, timeout=4 * 3600, cwd=_ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows, committed = _rows(jsonl), _rows(_COMMITTED)
    assert set(rows) == {(t, m) for t, m, _ in _architectures()}  # every one, once
    same_version = all(r.get("transformers") == transformers.__version__
                       for r in committed.values())
    if same_version:  # another transformers adds and drops architectures: regenerate then
        assert set(rows) == set(committed)
    for key, row in rows.items():
        before = committed.get(key, {"steps": {}})
        regressed = [s for s, state in before["steps"].items()
                     if state in ("ok", "n/a") and row["steps"].get(s) != state]
        assert not regressed, (key, regressed, row["reasons"])
        unexplained = [s for s, state in row["steps"].items()
                       if state in ("fail", "partial") and not row["reasons"].get(s)]
        assert not unexplained, (key, unexplained)
    built = [r for r in rows.values() if r["steps"].get("config") == "ok"]
    dense = [r for r in built if not r.get("already_moe")]
    full = [r for r in dense if all(r["steps"][s] in ("ok", "n/a") for s in r["steps"])]
    assert len(full) >= 0.9 * len(dense), (len(full), len(dense))
    for r in built:  # exact where it passes: every expert on = the dense model
        if r["steps"].get("moe_exact") == "ok":
            assert r["moe_rel"] <= 1e-5, r["model_type"]
        if r["steps"].get("moe_graph") == "ok":
            assert r["moe_graph_rel"] <= 1e-5, r["model_type"]
    by_type = {t: r for (task, t), r in rows.items() if task == "causal"}
    assert "mlp/captured" in by_type["apertus"]["kinds"]  # an activation no rule names
    assert "glu_fused/silu" in by_type["moshi"]["kinds"]  # fused gate_up split by view
    assert by_type["hrm_text"]["steps"]["moe_exact"] == "ok"  # one FFN called in a loop
    assert by_type["mixtral"]["already_moe"] and \
        "already MoE" in by_type["mixtral"]["reasons"]["ffns"]
    assert by_type["mixtral"]["steps"]["onnx"] == "ok"  # fused experts exported
    assert "not independent" in by_type["bitnet"]["reasons"]["ffns"]  # sub-norm FFN
    text = doc.read_text()
    assert "| causal | llama | LlamaForCausalLM |" in text and "## Why a step failed" in text


def _script():
    sys.path.insert(0, str(_SCRIPT.parent))
    try:
        import support_matrix
    finally:
        sys.path.remove(str(_SCRIPT.parent))
    return support_matrix


def _architectures() -> list[tuple[str, str, str]]:
    return _script()._architectures()


def test_render_counts_and_reasons(tmp_path):
    sm = _script()
    ok = dict.fromkeys(sm.STEPS, "ok") | {"generate": "n/a"}
    rows = {
        ("encoder", "a"): {"task": "encoder", "model_type": "a", "class": "A", "steps": ok,
                           "reasons": {}, "kinds": ["mlp/gelu"], "ffns": 2, "layers": 2},
        ("causal", "b"): {"task": "causal", "model_type": "b", "class": "B",
                          "steps": ok | {"onnx": "partial"},
                          "reasons": {"onnx": "fixed sequence"}, "kinds": ["glu/silu"]},
        ("causal", "c"): {"task": "causal", "model_type": "c", "class": "C",
                          "steps": {"config": "fail"}, "reasons": {"config": "no tiny config"}},
    }
    counts = sm.render(rows, tmp_path / "s.md")
    assert (counts["architectures"], counts["tiny_config_builds"], counts["dense"],
            counts["dense_all_steps"]) == (3, 2, 2, 1)
    text = (tmp_path / "s.md").read_text()
    assert "- **b** (causal) onnx: fixed sequence" in text
    assert "- c (causal, C): no tiny config" in text
