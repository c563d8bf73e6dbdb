"""The report's index.html: header, tables, notes and figures, every attribute escaped."""
from __future__ import annotations

import html
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..runtime.fileio import atomic_write_text
from .tables import _html_table

if TYPE_CHECKING:
    from .build import ReportInputs

WIDE_FIGURES = ("overlay_", "sparse_images", "postprocess", "detections")

CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#222;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.3rem}
table{border-collapse:collapse;font-size:.8rem;margin:.5rem 0;display:block;overflow-x:auto}
th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:right;white-space:nowrap}th{background:#f4f4f4}
tr:nth-child(even) td{background:#fafafa}.figs{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:1.2rem}
figure{margin:0;border:1px solid #eee;padding:.6rem;border-radius:6px}figure img{width:100%}figcaption{font-size:.8rem;color:#555}figure.wide{grid-column:1/-1}
.meta{font-size:.8rem;color:#666}.note{font-size:.8rem;color:#555;max-width:60rem}
tr.noisy td{color:#999;background:#f0f0f0}"""


def _write_index(out: Path, tables: dict, figs: list, inp: ReportInputs, meta: dict, notes=None, greys=None) -> None:
    from .. import __version__

    notes, greys = notes or {}, greys or {}
    opts = meta.get("options", {})
    what = ""
    if meta:
        data = opts.get("root") or opts.get("ann") or "-"
        split = f" / {opts['split']}" if opts.get("split") else ""
        size = meta.get("detector_size") or opts.get("detector_size")
        proto = (meta.get("input_protocol") or {}).get("description")
        at = f", input {proto}" if proto else (" at " + "x".join(map(str, size)) if size else "")
        what = (f" · detector: {html.escape(str(opts.get('detector', '-')))}{html.escape(at)}"
                f" · dataset: {html.escape(str(meta.get('dataset', '-')))} {html.escape(str(data))}{html.escape(split)}")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>bavit report</title><style>{CSS}</style></head><body>",
             "<h1>BAViT token pruning report</h1>",
             f"<p class='meta'>bavit {__version__} · {time.strftime('%Y-%m-%d %H:%M')} · results: "
             f"{html.escape(str(inp.results))}{what} · images evaluated: {meta.get('n_images', '-')}</p>"]
    for title, rows in tables.items():
        parts.append(f"<h2>{html.escape(title)}</h2>{_html_table(rows, greys.get(title))}")
        if title in notes:
            parts.append(f"<p class='note'>{html.escape(notes[title])}</p>")
    if figs:
        parts.append("<h2>Figures</h2><div class='figs'>")
        for f, t, c in figs:
            wide = " class='wide'" if f.startswith(WIDE_FIGURES) else ""
            parts.append(f"<figure{wide}><img src='{html.escape(f, quote=True)}' alt='{html.escape(t, quote=True)}'>"
                         f"<figcaption><b>{html.escape(t)}.</b> {html.escape(c)}</figcaption></figure>")
        parts.append("</div>")
    parts.append("</body></html>")
    atomic_write_text(out / "index.html", "\n".join(parts))
