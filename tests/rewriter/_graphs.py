"""Small hand-made graphs in the picture's input format (see rewriter.picture), for tests."""

from __future__ import annotations

from collections.abc import Iterable

import networkx as nx


def example_graph(n_layers: int = 2, *, moe_layers: Iterable[int] = (1,)) -> nx.DiGraph:
    """A small transformer-like graph (embedding, attention, GLU FFN / MoE) for demos and tests.

    Layers listed in ``moe_layers`` show an FFN -> MoE rewrite: the dense projections are
    ``removed``, the router / experts are ``added``, and the attention output projection is
    ``changed`` to FP8.
    """
    moe_layers = set(moe_layers)
    g = nx.DiGraph()
    g.graph["title"] = f"toy transformer · {n_layers} layers"
    groups: dict[str, dict] = {}
    g.graph["groups"] = groups
    d, f_ = 64, 172

    def node(name, label, op="call_function", target="", module="", group=None, **kw):
        g.add_node(
            name,
            label=label,
            op=op,
            target=target or label,
            module=module,
            group=group,
            status=kw.pop("status", "unchanged"),
            **kw,
        )
        return name

    def fn(name, label, target, inputs, module="", group=None, **kw):
        node(name, label, "call_function", target, module, group, **kw)
        for i in inputs:
            g.add_edge(i, name)
        return name

    def param(name, module, group=None, **kw):
        return node(
            name,
            name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1],
            "get_attr",
            name,
            module,
            group,
            **kw,
        )

    act = "(s0, s1, 64)"
    x = node(
        "input_ids", "input_ids", "placeholder", "input_ids", shape="(s0, s1)", dtype="torch.int64"
    )
    emb_w = param("model.embed_tokens.weight", "model.embed_tokens")
    h = fn(
        "embedding",
        "embedding",
        "aten.embedding.default",
        [emb_w, x],
        "model.embed_tokens",
        shape=act,
        dtype="torch.float32",
    )
    for i in range(n_layers):
        pre = f"model.layers.{i}"
        ag = f"attn{i}"
        groups[ag] = {"label": f"attention {i} · {pre}.self_attn", "kind": "attention"}
        n1w = param(f"{pre}.input_layernorm.weight", f"{pre}.input_layernorm")
        n1 = fn(
            f"rms_norm_{i}a",
            "rms_norm",
            "aten.rms_norm.default",
            [h, n1w],
            f"{pre}.input_layernorm",
            shape=act,
        )
        qkv = []
        for p in "qkv":
            w_ = param(f"{pre}.self_attn.{p}_proj.weight", f"{pre}.self_attn.{p}_proj", ag)
            lin = fn(
                f"{p}_proj_{i}",
                "linear",
                "aten.linear.default",
                [n1, w_],
                f"{pre}.self_attn.{p}_proj",
                ag,
                shape=act,
            )
            vw = fn(
                f"{p}_view_{i}",
                "view",
                "aten.view.default",
                [lin],
                f"{pre}.self_attn",
                ag,
                shape="(s0, s1, 4, 16)",
            )
            qkv.append(vw)
        att = fn(
            f"sdpa_{i}",
            "scaled_dot_product_attention",
            "aten.scaled_dot_product_attention.default",
            qkv,
            f"{pre}.self_attn",
            ag,
            shape="(s0, 4, s1, 16)",
        )
        rs = fn(
            f"attn_reshape_{i}",
            "reshape",
            "aten.reshape.default",
            [att],
            f"{pre}.self_attn",
            ag,
            shape=act,
        )
        ow = param(f"{pre}.self_attn.o_proj.weight", f"{pre}.self_attn.o_proj", ag)
        if i in moe_layers:
            o = fn(
                f"o_proj_{i}",
                "fp8_linear",
                "rewriter.fp8_linear",
                [rs, ow],
                f"{pre}.self_attn.o_proj",
                ag,
                shape=act,
                status="changed",
            )
        else:
            o = fn(
                f"o_proj_{i}",
                "linear",
                "aten.linear.default",
                [rs, ow],
                f"{pre}.self_attn.o_proj",
                ag,
                shape=act,
            )
        h = fn(f"add_{i}a", "add", "aten.add.Tensor", [h, o], pre, shape=act)
        n2w = param(f"{pre}.post_attention_layernorm.weight", f"{pre}.post_attention_layernorm")
        n2 = fn(
            f"rms_norm_{i}b",
            "rms_norm",
            "aten.rms_norm.default",
            [h, n2w],
            f"{pre}.post_attention_layernorm",
            shape=act,
        )
        mlp = f"{pre}.mlp"
        if i not in moe_layers:
            fg = f"ffn{i}"
            groups[fg] = {"label": f"FFN {i} · {mlp} · GLU/silu · {d}→{f_}→{d}", "kind": "ffn"}
            gw = param(f"{mlp}.gate_proj.weight", f"{mlp}.gate_proj", fg)
            gate = fn(
                f"gate_proj_{i}",
                "linear",
                "aten.linear.default",
                [n2, gw],
                f"{mlp}.gate_proj",
                fg,
                shape=f"(s0, s1, {f_})",
            )
            silu = fn(
                f"silu_{i}",
                "silu",
                "aten.silu.default",
                [gate],
                f"{mlp}.act_fn",
                fg,
                shape=f"(s0, s1, {f_})",
            )
            uw = param(f"{mlp}.up_proj.weight", f"{mlp}.up_proj", fg)
            upp = fn(
                f"up_proj_{i}",
                "linear",
                "aten.linear.default",
                [n2, uw],
                f"{mlp}.up_proj",
                fg,
                shape=f"(s0, s1, {f_})",
            )
            mul = fn(
                f"mul_{i}", "mul", "aten.mul.Tensor", [silu, upp], mlp, fg, shape=f"(s0, s1, {f_})"
            )
            dw = param(f"{mlp}.down_proj.weight", f"{mlp}.down_proj", fg)
            out = fn(
                f"down_proj_{i}",
                "linear",
                "aten.linear.default",
                [mul, dw],
                f"{mlp}.down_proj",
                fg,
                shape=act,
            )
        else:
            fg = f"moe{i}"
            groups[fg] = {
                "label": f"MoE {i} · {mlp} · 1 shared + 8 routed experts, top-2 · FP8",
                "kind": "moe",
            }
            st = {"status": "removed"}
            gw = param(f"{mlp}.gate_proj.weight", f"{mlp}.gate_proj", fg, **st)
            gate = fn(
                f"gate_proj_{i}",
                "linear",
                "aten.linear.default",
                [n2, gw],
                f"{mlp}.gate_proj",
                fg,
                shape=f"(s0, s1, {f_})",
                **st,
            )
            silu = fn(f"silu_{i}", "silu", "aten.silu.default", [gate], f"{mlp}.act_fn", fg, **st)
            uw = param(f"{mlp}.up_proj.weight", f"{mlp}.up_proj", fg, **st)
            upp = fn(
                f"up_proj_{i}",
                "linear",
                "aten.linear.default",
                [n2, uw],
                f"{mlp}.up_proj",
                fg,
                shape=f"(s0, s1, {f_})",
                **st,
            )
            mul = fn(f"mul_{i}", "mul", "aten.mul.Tensor", [silu, upp], mlp, fg, **st)
            dw = param(f"{mlp}.down_proj.weight", f"{mlp}.down_proj", fg, **st)
            dense = fn(
                f"down_proj_{i}",
                "linear",
                "aten.linear.default",
                [mul, dw],
                f"{mlp}.down_proj",
                fg,
                shape=act,
                **st,
            )
            ad = {"status": "added"}
            q = fn(
                f"quant_{i}",
                "quantize_fp8",
                "rewriter.quantize_fp8",
                [n2],
                mlp,
                fg,
                shape=act,
                dtype="torch.float8_e4m3fn",
                **ad,
            )
            rw = param(f"{mlp}.router.weight", f"{mlp}.router", fg, **ad)
            router = fn(
                f"router_{i}",
                "linear",
                "aten.linear.default",
                [n2, rw],
                f"{mlp}.router",
                fg,
                shape="(s0, s1, 8)",
                **ad,
            )
            sm = fn(
                f"softmax_{i}", "softmax", "aten.softmax.int", [router], f"{mlp}.router", fg, **ad
            )
            tk = fn(
                f"topk_{i}",
                "topk",
                "aten.topk.default",
                [sm],
                f"{mlp}.router",
                fg,
                shape="(s0, s1, 2)",
                **ad,
            )
            sh = fn(
                f"shared_{i}",
                "fp8_linear",
                "rewriter.fp8_linear",
                [q],
                f"{mlp}.shared_expert",
                fg,
                shape=act,
                **ad,
            )
            node(
                f"experts_{i}",
                "routed experts ×8",
                "collapsed",
                "experts",
                f"{mlp}.experts",
                fg,
                count=48,
                status="added",
            )
            g.add_edge(q, f"experts_{i}")
            g.add_edge(tk, f"experts_{i}")
            out = fn(
                f"combine_{i}",
                "add",
                "aten.add.Tensor",
                [sh, f"experts_{i}"],
                mlp,
                fg,
                shape=act,
                **ad,
            )
            g.add_edge(dense, f"add_{i}b")
        h = fn(f"add_{i}b", "add", "aten.add.Tensor", [h, out], pre, shape=act)
    nw = param("model.norm.weight", "model.norm")
    hn = fn("final_norm", "rms_norm", "aten.rms_norm.default", [h, nw], "model.norm", shape=act)
    lw = param("lm_head.weight", "lm_head")
    logits = fn(
        "lm_head", "linear", "aten.linear.default", [hn, lw], "lm_head", shape="(s0, s1, 49152)"
    )
    node("output", "output", "output", "output")
    g.add_edge(logits, "output")
    return g
