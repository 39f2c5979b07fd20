"""A self-contained HTML page around the SVG: header (title, counts, legend) and pan / zoom."""

from __future__ import annotations

import networkx as nx

from .layout import Layout, compute_layout
from .svg import counts, legend_entries, svg_document, title_of, xml

__all__ = ["render_html"]

_HTML_CSS = """
*{box-sizing:border-box}
html,body{margin:0;height:100%;font-family:'DejaVu Sans',Verdana,'Segoe UI',Helvetica,Arial,
sans-serif;color:#0f172a;background:#f8fafc}
body{display:flex;flex-direction:column}
header{padding:10px 16px;background:#fff;border-bottom:1px solid #e2e8f0;
display:flex;flex-wrap:wrap;align-items:center;gap:6px 18px}
h1{font-size:17px;margin:0}
.counts{font-size:12px;color:#475569}
.counts b{color:#0f172a}
.counts .added{color:#16a34a}.counts .removed{color:#dc2626}.counts .changed{color:#ea580c}
.legend{display:flex;flex-wrap:wrap;gap:4px 14px;font-size:11px;color:#334155;width:100%}
.legend span{display:inline-flex;align-items:center;gap:6px}
.legend i{display:inline-block;width:20px;height:12px;border-radius:3px;border:1.5px solid}
.legend i.group{border-radius:5px;height:14px}
.controls{margin-left:auto;display:flex;gap:6px}
button{font:inherit;font-size:12px;padding:3px 10px;border:1px solid #cbd5e1;
border-radius:6px;background:#fff;cursor:pointer}
button:hover{background:#f1f5f9}
#viewport{flex:1;overflow:hidden;position:relative;cursor:grab;background:#fff}
#viewport.dragging{cursor:grabbing}
#viewport svg{position:absolute;left:0;top:0;width:100%;height:100%;user-select:none}
.hint{font-size:11px;color:#94a3b8}
"""

_HTML_JS = """
(function(){
  var vp=document.getElementById('viewport'), svg=vp.querySelector('svg');
  var W=parseFloat(svg.getAttribute('width')), H=parseFloat(svg.getAttribute('height'));
  svg.removeAttribute('width'); svg.removeAttribute('height');
  svg.setAttribute('preserveAspectRatio','none');
  var s=1, tx=0, ty=0;
  function apply(){
    var cw=vp.clientWidth||1, ch=vp.clientHeight||1;
    svg.setAttribute('viewBox',tx+' '+ty+' '+(cw/s)+' '+(ch/s));
  }
  function fit(){
    var cw=vp.clientWidth||1, ch=vp.clientHeight||1;
    s=Math.min(cw/W, ch/H); tx=-(cw/s-W)/2; ty=-(ch/s-H)/2; apply();
  }
  function fitWidth(){
    var cw=vp.clientWidth||1;
    s=Math.min(cw/W, 1); tx=-(cw/s-W)/2; ty=0; apply();
  }
  function actual(){
    var cw=vp.clientWidth||1; s=1; tx=-(cw-W)/2; ty=0; apply();
  }
  function zoomAt(f, cx, cy){
    var r=vp.getBoundingClientRect(), px=cx-r.left, py=cy-r.top;
    var sx=tx+px/s, sy=ty+py/s;
    s=Math.max(0.02, Math.min(8, s*f)); tx=sx-px/s; ty=sy-py/s; apply();
  }
  vp.addEventListener('wheel', function(e){
    e.preventDefault();
    var d=e.deltaMode===1?e.deltaY*16:e.deltaY;
    zoomAt(Math.exp(-d*0.0015), e.clientX, e.clientY);
  }, {passive:false});
  var drag=null;
  vp.addEventListener('pointerdown', function(e){
    if(e.button!==0) return;
    drag={x:e.clientX, y:e.clientY, tx:tx, ty:ty};
    vp.classList.add('dragging'); vp.setPointerCapture(e.pointerId);
  });
  vp.addEventListener('pointermove', function(e){
    if(!drag) return;
    tx=drag.tx-(e.clientX-drag.x)/s; ty=drag.ty-(e.clientY-drag.y)/s; apply();
  });
  function end(){ drag=null; vp.classList.remove('dragging'); }
  vp.addEventListener('pointerup', end); vp.addEventListener('pointercancel', end);
  document.getElementById('fit').onclick=fit;
  document.getElementById('fitw').onclick=fitWidth;
  document.getElementById('one').onclick=actual;
  window.addEventListener('keydown', function(e){
    if(e.target.tagName==='INPUT') return;
    if(e.key==='f') fit(); else if(e.key==='w') fitWidth(); else if(e.key==='1') actual();
    else if(e.key==='+'||e.key==='=') zoomAt(1.25, innerWidth/2, innerHeight/2);
    else if(e.key==='-') zoomAt(0.8, innerWidth/2, innerHeight/2);
  });
  window.addEventListener('resize', apply);
  if(Math.min((vp.clientWidth||1)/W, (vp.clientHeight||1)/H) >= 0.5) fit(); else fitWidth();
})();
"""


def _legend_html(lay: Layout) -> str:
    items = []
    for kind, fill, stroke, dash, text in legend_entries(lay):
        style = f"background:{fill};border-color:{stroke}"
        if dash:
            style += ";border-style:dashed"
        if kind == "status":
            style += ";border-width:2px"
        cls = ' class="group"' if kind == "group" else ""
        items.append(f'<span><i{cls} style="{style}"></i>{xml(text)}</span>')
    return '<div class="legend">' + "".join(items) + "</div>"


def render_html(g: nx.DiGraph, *, title: str | None = None) -> str:
    """A self-contained HTML page: header (title, counts, legend) and the SVG with pan / zoom."""
    t = title_of(g, title)
    lay = compute_layout(g)
    c = counts(g)
    svg = svg_document(g, lay, t, header=False)
    hidden = f" (+{c['hidden']} hidden)" if c["hidden"] else ""
    summary = (
        f'<span class="counts"><b>{c["nodes"]}</b> nodes{hidden} · <b>{c["edges"]}</b> edges · '
        f'<b>{c["groups"]}</b> groups · <span class="added"><b>{c["added"]}</b> added</span> · '
        f'<span class="removed"><b>{c["removed"]}</b> removed</span> · '
        f'<span class="changed"><b>{c["changed"]}</b> changed</span></span>'
    )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{xml(t)}</title>\n<style>{_HTML_CSS}</style>\n</head>\n<body>\n"
        f"<header><h1>{xml(t)}</h1>{summary}"
        '<span class="controls"><span class="hint">wheel: zoom · drag: pan</span>'
        '<button id="fit" title="whole graph (f)">Fit</button>'
        '<button id="fitw" title="fit width (w)">Width</button>'
        '<button id="one" title="actual size (1)">1:1</button></span>'
        f"{_legend_html(lay)}</header>\n"
        f'<div id="viewport">\n{svg}</div>\n'
        f"<script>{_HTML_JS}</script>\n</body>\n</html>\n"
    )


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------
