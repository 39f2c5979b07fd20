import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
import torch
from rewriter.models import build_model, example_inputs
from rewriter.passes import eliminate_dead_code
from rewriter.passes.ffn_to_moe import MoEConfig
from rewriter.passes.lower_fp8 import FP8Config
from rewriter.targets.onnx import io as onnx_io

import rewriter
from rewriter import InputError, PassManager, capture, inspect, to_networkx
from rewriter.conversion import conversion_info
from rewriter.inspection import format_table
from rewriter.jsonable import jsonable
from tests.rewriter.test_pass_manager import _gelu_written_out


def test_report_tables_list_every_ffn_with_numbers(captured):
    case, model, gm = captured("hf:gpt2")
    report = inspect(gm)
    text = str(report)
    assert "captured GPT2LMHeadModel with torch.export" in text
    for i in range(model.config.n_layer):
        assert f"transformer.h.{i}.mlp" in report.ffn_table()
    rows = report.ffn_rows()
    d, d_ff = model.config.n_embd, model.config.n_inner
    assert rows[0]["params"] == 2 * d * d_ff + d_ff + d
    assert rows[0]["flops_per_token"] == 4 * d * d_ff
    assert "total" in report.ffn_table()
    assert "not computed from another projection" in report.rejection_table()
    json.dumps(report.to_dict())  # serialisable


def test_inspect_a_plain_model_makes_its_own_inputs():
    from rewriter import models

    report = inspect(models.build_model("bert-tiny"))
    assert len(report.ffns) == 2 and report.capture.method == "torch.export"
    with pytest.raises(InputError, match="example_inputs is required"):
        inspect(torch.nn.Linear(3, 3))
    with pytest.raises(InputError, match="got int"):
        inspect(3)


def test_to_networkx_marks_ffn_groups(captured):
    _, model, gm = captured("llama-tiny")
    g = to_networkx(gm)
    assert isinstance(g, nx.DiGraph) and nx.is_directed_acyclic_graph(g)
    assert g.number_of_nodes() == len(gm.graph.nodes)
    groups = g.graph["groups"]
    assert set(groups) == {"ffn0", "ffn1"}
    members = [n for n, a in g.nodes(data=True) if a["group"] == "ffn0"]
    assert {g.nodes[n]["label"] for n in members} >= {"linear · w1", "linear · w3",
                                                        "linear · w2", "silu", "mul"}
    for node in gm.graph.nodes:
        for src in node.all_input_nodes:
            assert g.has_edge(src.name, node.name)


def test_collapsed_graph_keeps_ffns_and_boxes_the_rest(captured):
    _, _, gm = captured("hf:llama")
    full, small = to_networkx(gm), to_networkx(gm, collapse=True)
    assert small.number_of_nodes() < full.number_of_nodes() / 2
    collapsed = {a["target"] for _, a in small.nodes(data=True) if a["op"] == "collapsed"}
    assert "model.layers.0.self_attn" in collapsed and "model.layers.1.self_attn" in collapsed
    assert not any("mlp" in c for c in collapsed)
    assert sum(1 for _, a in small.nodes(data=True) if a["group"] == "ffn1") == sum(
        1 for _, a in full.nodes(data=True) if a["group"] == "ffn1" and a["op"] != "get_attr")


def test_diff_and_picture_after_a_rewrite(tmp_path):
    from rewriter import models

    model = models.build_model("gpt-tiny")
    gm = capture(model, models.example_inputs(model, 2, 5))
    result = PassManager([_gelu_written_out, eliminate_dead_code], check_numerics=True).run(gm)
    report = inspect(result)
    assert "_gelu_written_out" in report.history_table()
    whole = report.diff("all")
    assert len(whole.removed) == 2 and len(whole.added) == 10
    with pytest.raises(KeyError, match="no pass named 'nope'"):
        report.diff("nope")
    g = report.to_networkx()
    status = nx.get_node_attributes(g, "status")
    assert sum(s == "added" for s in status.values()) == 10
    assert sum(s == "removed" for s in status.values()) == 2  # ghosts of the erased gelus
    for suffix in (".svg", ".html"):
        path = report.write_picture(tmp_path / f"graph{suffix}")
        text = path.read_text()
        assert "FFN 0" in text and "FFN 1" in text
        if suffix == ".svg":
            root = ET.fromstring(text)
            assert root.tag.endswith("svg")
        else:
            assert "<svg" in text and "https://" not in text.replace(
                "http://www.w3.org", "")


def test_diff_without_history_is_an_error(captured):
    _, _, gm = captured("gpt-tiny")
    with pytest.raises(ValueError, match="no passes have run"):
        inspect(gm).diff()


def test_format_table_aligns_numbers():
    text = format_table(["a", "n"], [["x", 5], ["yy", 12345]])
    lines = text.splitlines()
    assert lines[2].endswith("    5") and lines[3].endswith("12,345")


def test_picture_of_a_converted_fp8_model_boxes_each_moe_block():
    """FP8 MoE blocks hold no FFN pattern: the collapsed picture still opens the layers down
    to one box per converted block instead of one box for the whole model."""
    import rewriter
    from rewriter import models

    conv = rewriter.convert(models.build_model("llama-tiny", seed=0), recipe="deepseek-v3")
    g = inspect(conv).to_networkx(collapse=True)
    boxes = sorted(d["module"] for _, d in g.nodes(data=True) if d.get("op") == "collapsed")
    assert "layers.0.feed_forward" in boxes and "layers.1.feed_forward" in boxes
    assert "layers.0.attention" in boxes


# ---------------------------------------------------------------- one JSON form


@dataclass(frozen=True)
class _Cfg:
    name: str
    dtype: torch.dtype
    ks: tuple[int, ...]
    _private: int = 0


def test_jsonable_writes_plain_json_types():
    value = {"cfg": _Cfg("x", torch.bfloat16, (1, 2)), 3: {2, 1}, "nan": float("nan"),
             "inf": np.float32("inf"), "n": np.int64(7), "f": np.float64(0.5),
             "t": torch.tensor(2.5), "path": Path("out/x"), "dev": torch.device("cpu"),
             "other": object}
    got = jsonable(value)
    assert got == {"cfg": {"name": "x", "dtype": "bfloat16", "ks": [1, 2]}, "3": [1, 2],
                   "nan": None, "inf": None, "n": 7, "f": 0.5, "t": 2.5, "path": "out/x",
                   "dev": "cpu", "other": repr(object)}
    assert type(got["n"]) is int and type(got["f"]) is float
    json.dumps(got, allow_nan=False)


@pytest.mark.slow
def test_report_json_and_onnx_metadata_write_the_conversion_the_same_way():
    """One function (rewriter.jsonable) for the conversion info in report.json, the CLI's
    --json and the ONNX file's rewriter.conversion metadata (there were three)."""
    model = build_model("llama-tiny", seed=0)
    x = example_inputs(model)
    conv = rewriter.convert(model, moe=MoEConfig(num_experts=4, top_k=2), fp8=FP8Config(),
                            example_inputs=x)
    report = inspect(conv, x).to_dict()
    text = json.dumps(report, allow_nan=False)  # no default=str needed
    info = conversion_info(conv)
    assert json.loads(text)["conversion"] == jsonable(info)
    assert report["conversion"]["fp8_decisions"][0] == jsonable(info.fp8_decisions[0])
    meta = json.loads(onnx_io.metadata(conv, None, activations=None, dense_moe=False,
                                       opset=20)["rewriter.conversion"])
    assert meta["moe"] == report["conversion"]["moe"] == jsonable(info.moe)
    assert meta["fp8"] == report["conversion"]["fp8"]
