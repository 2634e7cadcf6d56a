"""The page every `clipx report` is rendered into: one template and style, images inlined as data: URIs,
titled sections, and the file written atomically.

A script on the page records whether every image decoded (``data-images-rendered`` on <body>, and
``data-image-count``), which the browser tests read.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>clipx report: {title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
h1 {{ font-size: 1.5em; }} h2 {{ border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.6em; }}
h3 {{ font-size: 1em; margin: 1em 0 .4em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ddd; padding: .25em .6em; text-align: left; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
tr.total {{ font-weight: bold; }} tr.capped td {{ background: #fdf1e7; }}
.plots img {{ width: 48%; margin: .5%; border: 1px solid #eee; }}
img.plot {{ max-width: 640px; width: 100%; border: 1px solid #eee; }}
.query {{ margin: 1em 0; }} .hits {{ display: flex; gap: .6em; }}
.hit {{ width: 110px; font-size: .75em; text-align: center; }}
.hit img {{ width: 96px; height: 96px; image-rendering: pixelated; border: 3px solid #ccc; }}
.hit.right img {{ border-color: #2a9d2a; }} .hit.right {{ font-weight: bold; color: #2a7a2a; }}
.cards {{ display: flex; flex-wrap: wrap; gap: .6em; }}
.card {{ width: 150px; font-size: .75em; overflow-wrap: anywhere; }}
.card img, .card .noimg {{ width: 96px; height: 96px; object-fit: contain; image-rendering: pixelated;
  border: 3px solid #ccc; display: block; }}
.card.kept img {{ border-color: #2a9d2a; }} .card.removed img {{ border-color: #d0543a; }}
.card .noimg {{ background: #f0f0f0; color: #777; display: flex; align-items: center; justify-content: center;
  text-align: center; box-sizing: border-box; padding: .3em; }}
.card .key {{ color: #666; }} .card .meta {{ color: #555; }}
.pair {{ display: flex; gap: 1.2em; align-items: flex-start; margin: .8em 0; }}
.pair .arrow {{ align-self: center; color: #888; font-size: 1.4em; }}
pre {{ background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: .8em; }}
</style></head>
<body data-images-rendered="pending">
<h1>clipx report: {title}</h1>
{sections}
<script>
window.addEventListener("load", () => {{
  const images = Array.from(document.images);
  document.body.dataset.imagesRendered = String(images.length > 0 && images.every(i => i.complete && i.naturalWidth > 0));
  document.body.dataset.imageCount = String(images.length);
}});
</script>
</body></html>
"""


def data_uri(data: bytes, mime: str = "image/png") -> str:
    """``data:MIME;base64,...`` of ``data``: an image the page carries itself."""
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def section(title: str, body: str) -> str:
    """An <h2> titled section; ``title`` is escaped, ``body`` is HTML already."""
    return f"<h2>{html.escape(title)}</h2>\n{body}\n"


def write_page(out: Path, title: str, sections: str) -> Path:
    """Write the page (``title`` escaped here) to ``out`` through a temporary file; returns ``out``."""
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(PAGE.format(title=html.escape(title), sections=sections), encoding="utf-8")
    tmp.replace(out)
    return out
