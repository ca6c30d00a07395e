"""Renderers: a :class:`Document` (sections of text, figures, tables, verdicts) → HTML or Markdown.

The renderer computes nothing: it formats what the build step prepared. The HTML embeds every figure as a base64
PNG and its CSS inline, so ``report.html`` is one file that opens offline.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..safe_text import md_code, md_fence, md_link_target, md_text
from .stats import Verdict

TEMPLATE = Path(__file__).with_name("templates") / "report.html"
MAX_TABLE_ROWS = 40


@dataclass
class Block:
    kind: str  # "text", "warning", "figure", "table", "verdicts", "code"
    text: str = ""
    path: Path | None = None  # figure file
    table: pd.DataFrame | None = None
    csv: str = ""  # relative path of the table's CSV
    verdicts: list[Verdict] = field(default_factory=list)
    lang: str = ""


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)
    anchor: str = ""

    def text(self, s: str) -> None:
        self.blocks.append(Block("text", text=s))

    def warning(self, s: str) -> None:
        self.blocks.append(Block("warning", text=s))

    def figure(self, path: Path | None, caption: str) -> None:
        if path is not None:
            self.blocks.append(Block("figure", text=caption, path=path))

    def table(self, df: pd.DataFrame, caption: str, csv: str = "") -> None:
        if df is not None and len(df):
            self.blocks.append(Block("table", text=caption, table=df, csv=csv))

    def verdicts(self, vs: list[Verdict]) -> None:
        if vs:
            self.blocks.append(Block("verdicts", verdicts=list(vs)))

    def code(self, s: str, caption: str = "", lang: str = "") -> None:
        if s:
            self.blocks.append(Block("code", text=s, csv=caption, lang=lang))


@dataclass
class Document:
    title: str
    subtitle: str
    warnings: list[str]
    verdicts: list[Verdict]
    sections: list[Section]


def fmt(x) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        if math.isnan(x):
            return "—"
        if x == 0:
            return "0"
        a = abs(x)
        return f"{x:.3g}" if 1e-3 <= a < 1e4 else f"{x:.2e}"
    return str(x)


def verdict_sentence(v: Verdict) -> str:
    ci = "—" if v.interval is None else f"[{fmt(v.interval[0])}, {fmt(v.interval[1])}]"
    stat = v.statistic_name or "statistic"
    return f"{stat} = {fmt(v.statistic)}, 95 % interval {ci}, n = {v.n}"


def _fmt_df(df: pd.DataFrame) -> pd.DataFrame:
    return df.head(MAX_TABLE_ROWS).apply(lambda col: col.map(fmt))


# ---------------------------------------------------------------- HTML

def _html_table(df: pd.DataFrame) -> str:
    d = _fmt_df(df)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in d.columns)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>"
                   for r in d.itertuples(index=False))
    more = f"<p class='note'>{len(df) - MAX_TABLE_ROWS} more rows in the CSV.</p>" if len(df) > MAX_TABLE_ROWS else ""
    return f"<div class='tw'><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>{more}"


def _html_verdicts(vs: list[Verdict]) -> str:
    items = []
    for v in vs:
        cls = v.verdict.replace(" ", "-")
        runs = ", ".join(v.runs[:6]) + (f" … (+{len(v.runs) - 6})" if len(v.runs) > 6 else "")
        items.append(
            f"<div class='verdict {cls}'><span class='badge'>{html.escape(v.verdict)}</span> "
            f"<b>{html.escape(v.claim)}</b><br><span class='stat'>{html.escape(verdict_sentence(v))}</span>"
            f"<br><span class='why'>{html.escape(v.reason)}</span>"
            f"<details><summary>method, runs</summary>{html.escape(v.method)}<br>runs: {html.escape(runs)}"
            f"</details></div>")
    return "\n".join(items)


def _html_block(b: Block) -> str:
    if b.kind == "text":
        return f"<p>{html.escape(b.text)}</p>"
    if b.kind == "warning":
        return f"<p class='warning'>⚠ {html.escape(b.text)}</p>"
    if b.kind == "figure":
        data = base64.b64encode(Path(b.path).read_bytes()).decode("ascii")
        return (f"<figure><img alt='{html.escape(b.text)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{html.escape(b.text)} <span class='note'>(figures/{html.escape(Path(b.path).name)})"
                f"</span></figcaption></figure>")
    if b.kind == "table":
        src = f" <span class='note'>({html.escape(b.csv)})</span>" if b.csv else ""
        return f"<p class='caption'>{html.escape(b.text)}{src}</p>{_html_table(b.table)}"
    if b.kind == "verdicts":
        return _html_verdicts(b.verdicts)
    if b.kind == "code":
        cap = f"<p class='caption'>{html.escape(b.csv)}</p>" if b.csv else ""
        return f"{cap}<pre><code>{html.escape(b.text)}</code></pre>"
    raise ValueError(b.kind)


def render_html(doc: Document) -> str:
    toc = "".join(f"<li><a href='#{s.anchor}'>{html.escape(s.title)}</a></li>" for s in doc.sections)
    body = [f"<h1>{html.escape(doc.title)}</h1>", f"<p class='note'>{html.escape(doc.subtitle)}</p>"]
    body += [f"<p class='warning'>⚠ {html.escape(w)}</p>" for w in doc.warnings]
    body.append("<h2 id='verdicts'>Verdicts</h2>" + _html_verdicts(doc.verdicts))
    body.append(f"<nav><ul>{toc}</ul></nav>")
    for s in doc.sections:
        body.append(f"<section><h2 id='{s.anchor}'>{html.escape(s.title)}</h2>")
        body += [_html_block(b) for b in s.blocks]
        body.append("</section>")
    try:
        tpl = TEMPLATE.read_text(encoding="utf-8")
    except OSError:  # package installed without its data files: a plain page
        tpl = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>{{title}}</title></head>"
               "<body>{{body}}</body></html>")
    return tpl.replace("{{title}}", html.escape(doc.title)).replace("{{body}}", "\n".join(body))


# ---------------------------------------------------------------- Markdown

def _md_escape(s: str) -> str:
    """Every string shown in report.md is literal text (run names, tags, config values and layer names are untrusted
    input): :func:`bnn_probe.safe_text.md_text`."""
    return md_text(s)


def _md_table(df: pd.DataFrame) -> str:
    d = _fmt_df(df)
    lines = ["| " + " | ".join(_md_escape(c) for c in d.columns) + " |", "|" + "---|" * len(d.columns)]
    lines += ["| " + " | ".join(_md_escape(v) for v in r) + " |" for r in d.itertuples(index=False)]
    if len(df) > MAX_TABLE_ROWS:
        lines.append(f"\n*{len(df) - MAX_TABLE_ROWS} more rows in the CSV.*")
    return "\n".join(lines)


def _md_verdicts(vs: list[Verdict]) -> str:
    e = _md_escape
    return "\n".join(f"- **{e(v.verdict)}** — {e(v.claim)}. {e(verdict_sentence(v))}. {e(v.reason)}. "
                     f"*Method:* {e(v.method)}. *Runs:* {e(', '.join(v.runs)) or '—'}" for v in vs)


def render_markdown(doc: Document, out_dir: Path) -> str:
    e = _md_escape
    out = [f"# {e(doc.title)}", "", f"*{e(doc.subtitle)}*", ""]
    out += [f"> **Warning:** {e(w)}\n" for w in doc.warnings]
    out += ["## Verdicts", "", _md_verdicts(doc.verdicts), ""]
    for s in doc.sections:
        out += [f"## {e(s.title)}", ""]
        for b in s.blocks:
            if b.kind == "text":
                out += [e(b.text), ""]
            elif b.kind == "warning":
                out += [f"> **Warning:** {e(b.text)}", ""]
            elif b.kind == "figure":
                rel = Path(b.path).relative_to(out_dir) if Path(b.path).is_relative_to(out_dir) else Path(b.path)
                out += [f"![{e(b.text)}]({md_link_target(rel.as_posix())})", "", f"*{e(b.text)}*", ""]
            elif b.kind == "table":
                out += [f"*{e(b.text)}*" + (f" ({md_code(b.csv)})" if b.csv else ""), "", _md_table(b.table), ""]
            elif b.kind == "verdicts":
                out += [_md_verdicts(b.verdicts), ""]
            elif b.kind == "code":
                out += ([f"*{e(b.csv)}*", ""] if b.csv else []) + [md_fence(b.text, b.lang), ""]
    return "\n".join(out)
