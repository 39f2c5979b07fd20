"""Tests for rewriter.picture: layout (igraph Sugiyama + groups), SVG / HTML, file writing."""

from __future__ import annotations

import json
import os
import pathlib
import re
import time
import xml.etree.ElementTree as ET

import networkx as nx
import pytest
import torch

import rewriter
import rewriter.picture
from rewriter.errors import InputError
from rewriter.picture import (
    compute_layout,
    layout,
    node_data,
    render_html,
    render_svg,
    write_picture,
)
from rewriter.picture.explorer import OVERLAYS
from rewriter.picture.style import category
from tests.rewriter._graphs import example_graph

SVG_NS = "{http://www.w3.org/2000/svg}"


# --------------------------------------------------------------------------------------------
# graph builders
# --------------------------------------------------------------------------------------------


def _add(g: nx.DiGraph, name: str, label: str, inputs=(), op="call_function", **attrs) -> str:
    g.add_node(name, label=label, op=op, target=attrs.pop("target", label), module="", **attrs)
    for i in inputs:
        g.add_edge(i, name)
    return name


def synthetic_transformer(n_layers: int = 30) -> nx.DiGraph:
    """A decomposed-aten-like transformer: ~100 nodes and ~130 edges per layer.

    Rotary cos/sin and the attention mask are computed once at the top and consumed by every
    layer (long edges), weights are get_attr nodes, attention and MoE blocks are groups.
    """
    g = nx.DiGraph()
    groups: dict[str, dict] = {}
    g.graph.update(title="synthetic", groups=groups)
    ids = _add(g, "input_ids", "input_ids", op="placeholder")
    pos = _add(g, "position_ids", "position_ids", op="placeholder")
    mask_in = _add(g, "attention_mask", "attention_mask", op="placeholder")
    emb_w = _add(g, "emb_w", "embed.weight", op="get_attr")
    h = _add(g, "emb", "embedding", [emb_w, ids])
    inv = _add(g, "inv_freq", "inv_freq", op="get_attr")
    fr = _add(g, "freqs", "matmul", [inv, pos])
    cat = _add(g, "freqs_cat", "cat", [fr])
    cos = _add(g, "cos", "cos", [cat])
    sin = _add(g, "sin", "sin", [cat])
    mask = _add(g, "mask", "where", [_add(g, "mask_cmp", "eq", [mask_in])])

    def norm(p: str, x: str, group=None) -> str:
        a = _add(g, f"{p}_pow", "pow", [x], group=group)
        b = _add(g, f"{p}_mean", "mean", [a], group=group)
        c = _add(g, f"{p}_eps", "add", [b], group=group)
        d = _add(g, f"{p}_rsqrt", "rsqrt", [c], group=group)
        e = _add(g, f"{p}_mul", "mul", [x, d], group=group)
        w = _add(g, f"{p}_w", f"{p}.weight", op="get_attr", group=group)
        return _add(g, f"{p}_scale", "mul", [w, e], group=group)

    def linear(p: str, x: str, group: str, **attrs) -> str:
        w = _add(g, f"{p}_w", f"{p}.weight", op="get_attr", group=group)
        return _add(g, p, "linear", [x, w], group=group, shape="(s0, s1, 576)", **attrs)

    def rope(p: str, x: str, group: str) -> str:
        a = _add(g, f"{p}_mc", "mul", [x, cos], group=group)
        s1 = _add(g, f"{p}_s1", "slice", [x], group=group)
        s2 = _add(g, f"{p}_s2", "slice", [x], group=group)
        ng = _add(g, f"{p}_neg", "neg", [s2], group=group)
        ct = _add(g, f"{p}_cat", "cat", [ng, s1], group=group)
        ms = _add(g, f"{p}_ms", "mul", [ct, sin], group=group)
        return _add(g, f"{p}_add", "add", [a, ms], group=group)

    for i in range(n_layers):
        ag, mg = f"attn{i}", f"moe{i}"
        groups[ag] = {"label": f"attention {i} · model.layers.{i}.self_attn", "kind": "attention"}
        groups[mg] = {"label": f"MoE {i} · model.layers.{i}.mlp · 3 experts", "kind": "moe"}
        x = norm(f"l{i}_in", h)
        qkv = []
        for p in "qkv":
            lin = linear(f"l{i}_{p}", x, ag)
            vw = _add(g, f"l{i}_{p}_view", "view", [lin], group=ag)
            qkv.append(_add(g, f"l{i}_{p}_tr", "transpose", [vw], group=ag))
        q = rope(f"l{i}_qr", qkv[0], ag)
        k = rope(f"l{i}_kr", qkv[1], ag)
        kv = []
        for p, t in (("k", k), ("v", qkv[2])):
            u = _add(g, f"l{i}_{p}_unsq", "unsqueeze", [t], group=ag)
            e = _add(g, f"l{i}_{p}_exp", "expand", [u], group=ag)
            kv.append(_add(g, f"l{i}_{p}_rep", "reshape", [e], group=ag))
        att = _add(g, f"l{i}_sdpa", "scaled_dot_product_attention", [q, *kv, mask], group=ag)
        tr = _add(g, f"l{i}_att_tr", "transpose", [att], group=ag)
        rs = _add(g, f"l{i}_att_rs", "reshape", [tr], group=ag)
        o = linear(f"l{i}_o", rs, ag)
        h = _add(g, f"l{i}_add1", "add", [h, o])
        x = norm(f"l{i}_post", h)
        rl = linear(f"l{i}_router", x, mg, status="added")
        sm = _add(g, f"l{i}_softmax", "softmax", [rl], group=mg, status="added")
        tk = _add(g, f"l{i}_topk", "topk", [sm], group=mg, status="added")
        idx = _add(g, f"l{i}_topk_idx", "getitem", [tk], group=mg, status="added")
        wts = _add(g, f"l{i}_topk_w", "getitem", [tk], group=mg, status="added")
        acc = None
        for e in range(4):  # expert 0 is the shared expert
            p = f"l{i}_e{e}"
            xin = x
            if e:
                xin = _add(g, f"{p}_sel", "index", [x, idx], group=mg)
            gt = linear(f"{p}_gate", xin, mg)
            sl = _add(g, f"{p}_silu", "silu", [gt], group=mg)
            up = linear(f"{p}_up", xin, mg)
            ml = _add(g, f"{p}_mul", "mul", [sl, up], group=mg)
            dn = linear(f"{p}_down", ml, mg, status="changed" if e else "unchanged")
            if e:
                dn = _add(g, f"{p}_scale", "mul", [dn, wts], group=mg)
            acc = dn if acc is None else _add(g, f"{p}_acc", "add", [acc, dn], group=mg)
        h = _add(g, f"l{i}_add2", "add", [h, acc])
    x = norm("final", h)
    lm = linear("lm_head", x, None)
    g.nodes[lm]["group"] = None
    _add(g, "output", "output", [lm], op="output")
    return g


def diamond_with_groups() -> nx.DiGraph:
    g = nx.DiGraph()
    g.graph["groups"] = {
        "A": {"label": "block A", "kind": "ffn"},
        "B": {"label": "block B · second", "kind": "attention"},
    }
    _add(g, "x", "x", op="placeholder")
    _add(g, "a1", "linear", ["x"], group="A")
    _add(g, "a2", "gelu", ["a1"], group="A")
    _add(g, "b1", "linear", ["x"], group="B")
    _add(g, "b2", "relu", ["b1"], group="B")
    _add(g, "c", "add", ["a2", "b2"])
    _add(g, "out", "output", ["c"], op="output")
    return g


# --------------------------------------------------------------------------------------------
# layout
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make", [example_graph, diamond_with_groups, lambda: synthetic_transformer(2)]
)
def test_layering_respects_edges(make):
    g = make()
    pos = layout(g)
    assert set(pos) == set(g.nodes)
    for u, v in g.edges():
        assert pos[v][1] > pos[u][1], (u, v, pos[u], pos[v])


def test_layout_is_deterministic():
    a = compute_layout(example_graph(2))
    b = compute_layout(example_graph(2))
    assert a.pos == b.pos
    assert [(e.u, e.v, e.points) for e in a.edges] == [(e.u, e.v, e.points) for e in b.edges]
    assert render_svg(example_graph(2)) == render_svg(example_graph(2))


def test_group_boxes_contain_their_nodes_and_not_others():
    g = synthetic_transformer(3)
    lay = compute_layout(g)
    assert set(lay.groups) == {d["group"] for _, d in g.nodes(data=True) if d.get("group")}
    for gid, gb in lay.groups.items():
        for k, b in lay.nodes.items():
            inside = (
                gb.x <= b.x - b.w / 2
                and b.x + b.w / 2 <= gb.x + gb.w
                and gb.y <= b.y - b.h / 2
                and b.y + b.h / 2 <= gb.y + gb.h
            )
            if g.nodes[k].get("group") == gid:
                assert inside, (gid, k)
            else:
                assert not gb.contains(b.x, b.y), (gid, k)
    boxes = list(lay.groups.values())
    for i, p in enumerate(boxes):
        for q in boxes[i + 1 :]:
            overlap = p.x < q.x + q.w and q.x < p.x + p.w and p.y < q.y + q.h and q.y < p.y + p.h
            assert not overlap, (p.gid, q.gid)


def test_nodes_do_not_overlap():
    lay = compute_layout(example_graph(2))
    items = list(lay.nodes.values())
    for i, p in enumerate(items):
        for q in items[i + 1 :]:
            assert (
                abs(p.x - q.x) >= (p.w + q.w) / 2 - 0.5 or abs(p.y - q.y) >= (p.h + q.h) / 2 - 0.5
            )


def test_edges_start_and_end_at_their_nodes():
    lay = compute_layout(diamond_with_groups())
    for e in lay.edges:
        bu, bv = lay.nodes[e.u], lay.nodes[e.v]
        (x0, y0), (x1, y1) = e.points[0], e.points[-1]
        assert abs(y0 - (bu.y + bu.h / 2)) < 0.6 and abs(x0 - bu.x) <= bu.w / 2
        assert abs(y1 - (bv.y - bv.h / 2)) < 0.6 and abs(x1 - bv.x) <= bv.w / 2


def test_long_edges_are_routed_through_points():
    g = nx.DiGraph()
    prev = _add(g, "x", "x", op="placeholder")
    for i in range(6):
        prev = _add(g, f"n{i}", "relu", [prev])
    g.add_edge("x", "n5")  # spans 6 layers
    lay = compute_layout(g)
    (long,) = [e for e in lay.edges if (e.u, e.v) == ("x", "n5")]
    assert len(long.points) >= 6
    ys = [p[1] for p in long.points]
    assert ys == sorted(ys)
    # the long edge keeps clear of the chain's boxes
    for px, py in long.points[1:-1]:
        for k, b in lay.nodes.items():
            if k in ("x", "n5"):
                continue
            assert not (abs(px - b.x) < b.w / 2 and abs(py - b.y) < b.h / 2), k


def test_disconnected_nodes_cycles_and_self_loops():
    g = nx.DiGraph()
    _add(g, "a", "a")
    _add(g, "b", "b", ["a"])
    _add(g, "c", "c", ["b"])
    g.add_edge("c", "a")  # cycle
    g.add_edge("b", "b")  # self loop
    _add(g, "lonely", "lonely")
    _add(g, "lonely2", "lonely2", op="get_attr")
    lay = compute_layout(g)
    assert set(lay.nodes) == set(g.nodes)
    assert len(lay.edges) == g.number_of_edges()
    assert sum(e.reversed for e in lay.edges) == 1
    ET.fromstring(render_svg(g))


def test_empty_and_attribute_less_graphs():
    ET.fromstring(render_svg(nx.DiGraph()))
    g = nx.DiGraph()
    g.add_edge(1, 2)
    g.add_edge((3, "tuple"), 2)
    svg = render_svg(g)
    root = ET.fromstring(svg)
    assert len(root.findall(f".//{SVG_NS}g[@class='node']")) == 3


def test_group_with_cycle_through_outside_node_does_not_hang():
    g = nx.DiGraph()
    g.graph["groups"] = {"G": {"label": "G", "kind": "module"}}
    _add(g, "x", "x", op="placeholder")
    _add(g, "g1", "linear", ["x"], group="G")
    _add(g, "o", "relu", ["g1"])  # outside node between two group members
    _add(g, "g2", "linear", ["o"], group="G")
    _add(g, "out", "output", ["g2"], op="output")
    lay = compute_layout(g)
    assert set(lay.nodes) == set(g.nodes)
    ET.fromstring(render_svg(g))


# --------------------------------------------------------------------------------------------
# SVG
# --------------------------------------------------------------------------------------------


def test_svg_structure_one_box_per_node():
    g = example_graph(2)
    svg = render_svg(g)
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG_NS}svg"
    nodes = root.findall(f".//{SVG_NS}g[@class='node']")
    assert len(nodes) == g.number_of_nodes()
    for n in nodes:
        assert len(n.findall(f"{SVG_NS}rect[@class='box']")) == 1
        assert n.find(f"{SVG_NS}title") is not None
    assert {n.get("data-node") for n in nodes} == {str(k) for k in g.nodes}
    groups = root.findall(f".//{SVG_NS}rect[@class='group-box']")
    assert len(groups) == len(g.graph["groups"])
    edges = root.findall(f".//{SVG_NS}g[@class='edge']")
    assert len(edges) == g.number_of_edges()
    for e in edges:
        assert e.find(f"{SVG_NS}polygon") is not None  # arrowhead
    assert root.find(f".//{SVG_NS}g[@class='legend']") is not None
    # tooltips carry target / module / shape
    titles = [n.find(f"{SVG_NS}title").text for n in nodes]
    assert any("aten.linear.default" in t and "shape: (s0, s1, 64)" in t for t in titles)
    assert any("module: model.layers.0.mlp.gate_proj" in t for t in titles)


def test_svg_status_and_category_styles():
    svg = render_svg(example_graph(2))
    root = ET.fromstring(svg)
    by_status: dict[str, int] = {}
    for n in root.findall(f".//{SVG_NS}g[@class='node']"):
        by_status[n.get("data-status")] = by_status.get(n.get("data-status"), 0) + 1
        ring = n.find(f"{SVG_NS}rect[@class='status-ring']")
        assert (ring is not None) == (n.get("data-status") != "unchanged")
        if n.get("data-status") == "removed":
            assert ring.get("stroke-dasharray")
    assert by_status["added"] and by_status["removed"] and by_status["changed"]
    # matmul-like boxes stand out from plain ops
    fills = {}
    for n in root.findall(f".//{SVG_NS}g[@class='node']"):
        box = n.find(f"{SVG_NS}rect[@class='box']")
        fills.setdefault(n.find(f"{SVG_NS}text").text, box.get("fill"))
    assert fills["linear"] != fills["add"]
    assert fills["fp8_linear"] != fills["add"]


def test_svg_escapes_text():
    g = nx.DiGraph()
    g.graph["title"] = 'title <&> "q"'
    g.graph["groups"] = {"g<1>": {"label": 'grp <b> & "x"', "kind": "we'ird"}}
    _add(g, "a<b>", '<script>alert("x")</script> & co', target='t<&>"', group="g<1>")
    _add(g, 'c"&', "x\x00y\x07", ["a<b>"], shape="(<s0>, &)", dtype="<f32>")
    svg = render_svg(g)
    assert "<script>" not in svg
    root = ET.fromstring(svg)  # well-formed
    texts = " ".join(t.text or "" for t in root.iter(f"{SVG_NS}text"))
    assert '<script>alert("x")</script> & co'[:29] in texts
    assert 'title <&> "q"' in texts
    nodes = root.findall(f".//{SVG_NS}g[@class='node']")
    assert {n.get("data-node") for n in nodes} == {"a<b>", 'c"&'}
    html = render_html(g)
    assert "<script>alert" not in html


@pytest.mark.parametrize(
    ("op", "label", "target", "expected"),
    [
        ("call_function", "linear", "aten.linear.default", "matmul"),
        ("call_function", "mm", "aten.mm.default", "matmul"),
        ("call_function", "addmm", "aten.addmm.default", "matmul"),
        ("call_function", "_scaled_mm", "aten._scaled_mm.default", "matmul"),
        ("call_function", "matmul", "aten.matmul.default", "matmul"),
        ("call_function", "fp8_linear", "rewriter.fp8_linear", "fp8"),
        ("call_function", "sdpa", "aten.scaled_dot_product_attention.default", "attention"),
        ("call_function", "cummax", "aten.cummax.default", "compute"),
        ("call_function", "add", "aten.add.Tensor", "compute"),
        ("call_module", "proj", "model.layers.0.mlp.down_proj", "compute"),
        ("placeholder", "x", "x", "input"),
        ("get_attr", "w", "model.w", "param"),
        ("output", "output", "output", "output"),
        ("collapsed", "12 nodes", "", "collapsed"),
    ],
)
def test_op_categories(op, label, target, expected):
    assert category(op, label, target) == expected


def test_text_outside_xml_is_dropped():
    g = nx.DiGraph()
    _add(g, "a", "bad \ud800 \ufffe \x01 chars")
    root = ET.fromstring(render_svg(g).encode("utf-8"))
    assert root.find(f".//{SVG_NS}g[@class='node']") is not None


def test_title_argument_overrides_graph_title():
    g = example_graph(1, moe_layers=())
    assert "my picture" in render_svg(g, title="my picture")
    assert g.graph["title"] in render_svg(g)


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------


def test_html_is_self_contained():
    g = example_graph(2)
    html = render_html(g)
    assert html.startswith("<!DOCTYPE html>")
    assert "<svg" in html and "<script>" in html and 'id="fit"' in html
    urls = re.findall(r"https?://[^\s\"'<>)]*", html)
    assert set(urls) <= {"http://www.w3.org/2000/svg"}, urls
    for bad in ("src=", "<link", "@import", "url("):
        assert bad not in html
    # header: title, counts, legend
    assert g.graph["title"] in html
    assert f"<b>{g.number_of_nodes()}</b> nodes" in html
    assert "added" in html and "removed" in html and "changed" in html
    assert 'class="legend"' in html
    # the embedded SVG is well-formed
    svg = html[html.index("<svg") : html.index("</svg>") + len("</svg>")]
    root = ET.fromstring(svg)
    assert len(root.findall(f".//{SVG_NS}g[@class='node']")) == g.number_of_nodes()


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


def test_write_picture_svg_and_html(tmp_path):
    g = example_graph(1)
    p = write_picture(g, tmp_path / "deep" / "dir" / "pic.svg")
    assert p == tmp_path / "deep" / "dir" / "pic.svg"
    ET.fromstring(p.read_text(encoding="utf-8"))
    q = write_picture(g, str(tmp_path / "pic.HTML"), title="t")
    assert q.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert sorted(os.listdir(tmp_path)) == ["deep", "pic.HTML"]


def test_write_picture_rejects_unknown_suffix(tmp_path):
    with pytest.raises(InputError, match=r"\.png"):
        write_picture(example_graph(1), tmp_path / "pic.png")
    with pytest.raises(ValueError, match="''"):
        write_picture(example_graph(1), tmp_path / "pic")
    assert os.listdir(tmp_path) == []


def test_write_picture_is_atomic(tmp_path, monkeypatch):
    g = example_graph(1)
    target = tmp_path / "pic.svg"
    target.write_text("old", encoding="utf-8")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(rewriter.picture.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_picture(g, target)
    assert target.read_text(encoding="utf-8") == "old"
    assert os.listdir(tmp_path) == ["pic.svg"]
    monkeypatch.undo()

    def broken(*args, **kwargs):
        raise RuntimeError("render failed")

    monkeypatch.setattr(rewriter.picture, "render_svg", broken)
    with pytest.raises(RuntimeError):
        write_picture(g, tmp_path / "new.svg")
    assert os.listdir(tmp_path) == ["pic.svg"]


# --------------------------------------------------------------------------------------------
# size
# --------------------------------------------------------------------------------------------


def test_large_graph_renders():
    g = synthetic_transformer(30)
    assert g.number_of_nodes() >= 3000 and g.number_of_edges() >= 3800
    t0 = time.perf_counter()
    lay = compute_layout(g)
    t1 = time.perf_counter()
    html = render_html(g)  # lays out again, then draws
    t2 = time.perf_counter()
    print(
        f"\n{g.number_of_nodes()} nodes / {g.number_of_edges()} edges: "
        f"layout {t1 - t0:.2f}s, html page {t2 - t1:.2f}s ({len(html) / 1e6:.1f} MB)"
    )
    assert len(lay.nodes) == g.number_of_nodes()
    assert len(lay.groups) == 60
    for u, v in g.edges():
        assert lay.nodes[v].y > lay.nodes[u].y
    svg = html[html.index("<svg") : html.index("</svg>") + len("</svg>")]
    root = ET.fromstring(svg)
    assert len(root.findall(f".//{SVG_NS}g[@class='node']")) == g.number_of_nodes()


# --------------------------------------------------------------------------------------------
# Model Explorer node-data overlays
# --------------------------------------------------------------------------------------------


class _Decision:
    def __init__(self, fqn: str, lowered: bool, reason: str):
        self.fqn, self.lowered, self.reason = fqn, lowered, reason


class _Conversion:
    blocks = [{"module": "mlp", "experts": 6, "top_k": 2, "shared_dim": 10}]
    fp8_decisions = [_Decision("attn.q", True, "linear -> FP8Linear"),
                     _Decision("head", False, "lm head: kept in high precision")]


def _module_graph(statuses: dict[str, str] | None = None) -> nx.DiGraph:
    g = nx.DiGraph()
    mods = {"x": "", "q": "attn.q", "q_add": "attn.q.inner", "router": "mlp.router",
            "expert_mm": "mlp", "mlpx": "mlpx", "head": "head"}
    prev = None
    for name, module in mods.items():
        g.add_node(name, label=name, op="call_function", module=module,
                   status=(statuses or {}).get(name, "unchanged"))
        if prev:
            g.add_edge(prev, name)
        prev = name
    return g


def test_node_data_from_conversion_info():
    data = node_data(_module_graph(), conversion=_Conversion())
    assert set(data) == {"rewriter: pass", "rewriter: FP8", "rewriter: MoE block"}
    status = {k: v["value"] for k, v in data["rewriter: pass"]["results"].items()}
    # module mode: no history, so MoE block nodes are added, FP8-lowered nodes changed
    assert status == {"x": "unchanged", "q": "changed", "q_add": "changed", "router": "added",
                      "expert_mm": "added", "mlpx": "unchanged", "head": "unchanged"}
    fp8 = {k: v["value"] for k, v in data["rewriter: FP8"]["results"].items()}
    assert fp8 == {"q": "FP8", "q_add": "FP8", "head": "kept: lm head: kept in high precision"}
    moe = data["rewriter: MoE block"]["results"]
    assert set(moe) == {"router", "expert_mm"}  # "mlpx" is not inside "mlp"
    assert moe["router"]["value"] == "mlp · 6 experts, top-2, shared 10"


def test_node_data_prefers_pass_history_and_rejects_collapsed_graphs():
    g = _module_graph({"router": "added", "q": "changed", "mlpx": "removed"})
    status = {k: v["value"] for k, v in node_data(g)["rewriter: pass"]["results"].items()}
    assert status["mlpx"] == "removed" and status["expert_mm"] == "unchanged"
    assert node_data(g)["rewriter: pass"]["results"]["mlpx"]["bgColor"] == "#fee2e2"
    g.add_node("c", label="12 ops", op="collapsed", module="attn")
    with pytest.raises(InputError, match="collapse"):
        node_data(g)


@pytest.mark.slow
def test_node_data_of_a_converted_llama_tiny(tmp_path):
    model = rewriter.convert(rewriter.models.build_model("llama-tiny", seed=0),
                             recipe="deepseek-v3")
    ids = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(1))
    model(ids)  # the expert load of this forward goes into the overlay
    report = rewriter.inspect(model, ids, dynamic=False)
    infos = report.write_node_data(tmp_path, model=model)
    files = {i["name"]: json.loads(pathlib.Path(i["node_data_path"]).read_text()) for i in infos}
    assert set(files) == set(OVERLAYS)
    data = {name: d["graph"]["results"] for name, d in files.items()}
    g = report.to_networkx()
    module = {k: d["module"] for k, d in g.nodes(data=True)}
    conv = report.conversion
    blocks = [b["module"] for b in conv.blocks]
    assert blocks == ["layers.0.feed_forward", "layers.1.feed_forward"]
    for node, r in data["rewriter: MoE block"].items():
        (block,) = [b for b in blocks if module[node].startswith(b)]
        info = next(b for b in conv.blocks if b["module"] == block)
        assert r["value"].startswith(f"{block} · {info['experts']} experts, top-{info['top_k']}")
        load = model.get_submodule(block).load_stats()["max_over_mean"]
        assert data["rewriter: expert load"][node]["value"] == pytest.approx(load, abs=1e-4)
        assert data["rewriter: pass"][node]["value"] == "added"
    assert len(data["rewriter: MoE block"]) > 100
    lowered = {d.fqn for d in conv.fp8_decisions if d.lowered}
    kept = {d.fqn: d.reason for d in conv.fp8_decisions if not d.lowered}
    assert "layers.0.attention.wq" in lowered and "tok_embeddings" in kept
    for node, r in data["rewriter: FP8"].items():
        owner = max((f for f in lowered | set(kept)
                     if module[node] == f or module[node].startswith(f + ".")), key=len)
        assert r["value"] == ("FP8" if owner in lowered else f"kept: {kept[owner]}")
    # the keys are the node names Model Explorer's PyTorch adapter uses for this model
    exported = {n.name for n in torch.export.export(model, (ids,)).graph.nodes}
    calls = {k for k, d in g.nodes(data=True) if d["op"] == "call_function"}
    assert calls <= exported and calls <= set(data["rewriter: pass"])


def test_collapsed_nodes_show_what_they_hide():
    g = example_graph(2)
    hidden = {k: d["count"] for k, d in g.nodes(data=True) if d.get("op") == "collapsed"}
    assert hidden
    root = ET.fromstring(render_svg(g))
    for n in root.findall(f".//{SVG_NS}g[@class='node']"):
        texts = [t.text for t in n.findall(f"{SVG_NS}text")]
        if n.get("data-op") == "collapsed":
            count = hidden[n.get("data-node")]
            assert f"{count} nodes hidden" in texts
            assert len(n.findall(f"{SVG_NS}rect")) >= 3  # a stack of boxes
    assert f"(+{sum(hidden.values())} hidden)" in render_html(g)


def test_written_picture_is_readable_by_others(tmp_path):
    umask = os.umask(0o022)
    try:
        p = write_picture(example_graph(1), tmp_path / "pic.svg")
    finally:
        os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o644
