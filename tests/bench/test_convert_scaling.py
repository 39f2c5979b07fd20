"""bench/convert_scaling.py on the tiny size: one row, with sane sizes, times and memory."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

_SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "convert_scaling.py"


@pytest.mark.slow  # ~60-90 s (a subprocess that measures memory phase by phase): the slow CI step
def test_tiny_row(tmp_path):
    out = tmp_path / "x.json"
    proc = subprocess.run([sys.executable, str(_SCRIPT), "--sizes", "tiny", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| tiny |" in proc.stdout  # the Markdown table

    rows = json.loads(out.read_text())
    assert len(rows) == 1
    row = rows[0]
    assert row["size"] == "tiny"

    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=False,
                                   use_cache=False)
    expected = sum(p.numel() for p in transformers.LlamaForCausalLM(cfg).parameters())
    assert row["params"] == expected > 0
    assert row["model_bytes"] >= 4 * row["params"]  # fp32 parameters, plus buffers

    assert row["convert_s"] > 0
    assert row["rss_peak_bytes"] >= row["rss_baseline_bytes"] >= row["rss_runtime_bytes"] > 0
    assert row["calib_tokens"] == 16 * 128
    assert row["calib_activation_bytes"] == 16 * 128 * (2 * 64 + 160) * 4 * 2

    phases = row["phases_s"]
    assert set(phases) == {"capture", "calibration", "build", "fp8_lowering", "other"}
    assert all(v >= 0 for v in phases.values())
    assert phases["calibration"] > 0 and phases["capture"] > 0 and phases["build"] > 0
    measured = sum(v for k, v in phases.items() if k != "other")
    assert measured <= row["convert_s"] * 1.01 + 0.01  # the phases do not overlap
    assert row["steps"] and row["steps"][0]["s"] <= row["convert_s"] * 1.01
    assert "rss_peak_sample" not in row  # the sampler thread is opt-in (--memory-trace)
