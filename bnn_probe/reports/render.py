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

from ..safe_text import md_code, md_fence, md_text, safe_href
from .stats import Verdict

TEMPLATE = Path(__file__).with_name("templates") / "report.html"
MAX_TABLE_ROWS = 40
OPEN_TABLE_ROWS = 15  # longer tables are shown collapsed (caption visible, rows on a click)


@dataclass
class Block:
    kind: str  # "text", "warning", "figure", "table", "verdicts", "code", "details", "link", "list"
    text: str = ""
    path: Path | None = None  # figure file
    table: pd.DataFrame | None = None
    csv: str = ""  # relative path of the table's CSV
    verdicts: list[Verdict] = field(default_factory=list)
    lang: str = ""
    children: list[Block] = field(default_factory=list)  # "details": the collapsed blocks
    href: str = ""  # "link": the target
    open: bool = False  # "table": shown open however long
    only: str = ""  # "html" or "md": rendered in that format only


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

    def table(self, df: pd.DataFrame, caption: str, csv: str = "", open: bool = False) -> None:
        """A table; longer than OPEN_TABLE_ROWS rows it is shown collapsed unless ``open``."""
        if df is not None and len(df):
            self.blocks.append(Block("table", text=caption, table=df, csv=csv, open=open))

    def verdicts(self, vs: list[Verdict]) -> None:
        if vs:
            self.blocks.append(Block("verdicts", verdicts=list(vs)))

    def code(self, s: str, caption: str = "", lang: str = "", only: str = "") -> None:
        if s:
            self.blocks.append(Block("code", text=s, csv=caption, lang=lang, only=only))

    def details(self, summary: str) -> Section:
        """A collapsed group (HTML ``<details>``): the returned Section collects its blocks."""
        sub = Section(summary)
        self.blocks.append(Block("details", text=summary, children=sub.blocks))
        return sub

    def link(self, text: str, href: str, only: str = "") -> None:
        self.blocks.append(Block("link", text=text, href=href, only=only))

    def bullets(self, items: list[str]) -> None:
        if items:
            self.blocks.append(Block("list", text="\n".join(items)))


@dataclass
class Document:
    """What a report shows, in order: title, warnings, the answers (first screen), how to read it, the sections."""

    title: str
    subtitle: str
    warnings: list[str]
    verdicts: list[Verdict]
    sections: list[Section]
    answers: list = field(default_factory=list)  # answers.Answer: the questions first
    how_to_read: tuple[str, ...] | list[str] = ()


def fmt(x) -> str:
    """A table cell: 3 significant digits, whole numbers without a decimal point, "—" for missing."""
    if x is None:
        return "—"
    if isinstance(x, float):
        if math.isnan(x):
            return "—"
        if x == 0:
            return "0"
        a = abs(x)
        if x == int(x) and a < 1e6:
            return str(int(x))
        return f"{x:.3g}"
    return str(x)


def verdict_sentence(v: Verdict) -> str:
    ci = "—" if v.interval is None else f"[{fmt(v.interval[0])}, {fmt(v.interval[1])}]"
    stat = v.statistic_name or "statistic"
    return f"{stat} = {fmt(v.statistic)}, 95 % interval {ci}, n = {v.n}"


def _fmt_df(df: pd.DataFrame) -> pd.DataFrame:
    return df.head(MAX_TABLE_ROWS).apply(lambda col: col.map(fmt))


def _runs_list(v: Verdict, most: int = 6) -> str:
    return ", ".join(v.runs[:most]) + (f" … (+{len(v.runs) - most})" if len(v.runs) > most else "")


# ---------------------------------------------------------------- HTML

def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _html_table(df: pd.DataFrame, caption: str, open_: bool = False) -> str:
    """A table that fits the page: headers may break after ``_`` or ``.``, text cells anywhere, numbers never."""
    d = _fmt_df(df)
    head = "".join(f"<th>{html.escape(str(c)).replace('_', '_<wbr>').replace('.', '.<wbr>')}</th>"
                   for c in d.columns)
    num = df.head(MAX_TABLE_ROWS).map(_is_number).to_numpy()
    rows = "".join("<tr>" + "".join(f"<td{' class=n' if num[i, j] else ''}>{html.escape(str(v))}</td>"
                                    for j, v in enumerate(r)) + "</tr>"
                   for i, r in enumerate(d.itertuples(index=False)))
    more = f"<p class='note'>{len(df) - MAX_TABLE_ROWS} more rows in the CSV.</p>" if len(df) > MAX_TABLE_ROWS else ""
    table = f"<div class='tw'><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>{more}"
    if len(df) > OPEN_TABLE_ROWS and not open_:
        return (f"<details class='tbl'><summary class='caption'>{caption} <span class='note'>({len(df)} rows; "
                f"click to show)</span></summary>{table}</details>")
    return f"<p class='caption'>{caption}</p>{table}"


def _html_verdict(v: Verdict, compact: bool = False) -> str:
    """A verdict: badge, claim, id, then statistic and reason; ``compact`` (the answers) folds them away."""
    cls = v.verdict.replace(" ", "-")
    vid = f" <span class='vid'>{html.escape(v.id)}</span>" if v.id else ""
    stat = f"<span class='stat'>{html.escape(verdict_sentence(v))}</span>"
    detail = (f"<i>Method:</i> {html.escape(v.method)}<br><i>Runs:</i> {html.escape(_runs_list(v))}")
    if compact:
        return (f"<div class='verdict {cls}'><span class='badge'>{html.escape(v.verdict)}</span> "
                f"{html.escape(v.claim)}{vid}<details><summary>{stat}</summary>{html.escape(v.reason)}<br>"
                f"{detail}</details></div>")
    return (f"<div class='verdict {cls}'><span class='badge'>{html.escape(v.verdict)}</span> "
            f"<b>{html.escape(v.claim)}</b>{vid}<br>{stat}<br><span class='why'>{html.escape(v.reason)}</span>"
            f"<details><summary>method, runs</summary>{detail}</details></div>")


FOLD_INCONCLUSIVE = 2  # a verdict list with more inconclusive verdicts than this folds them under one line


def _html_verdicts(vs: list[Verdict], compact: bool = False) -> str:
    undecided = [v for v in vs if v.verdict == "inconclusive"]
    if compact or len(undecided) <= FOLD_INCONCLUSIVE:
        return "\n".join(_html_verdict(v, compact) for v in vs)
    decided = [v for v in vs if v.verdict != "inconclusive"]
    return ("\n".join(_html_verdict(v) for v in decided) +
            f"<details class='undecided'><summary>{len(undecided)} inconclusive verdict(s): what was tested, and why "
            f"it could not be decided</summary>{''.join(_html_verdict(v, True) for v in undecided)}</details>")


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"


def _html_block(b: Block) -> str:
    if b.only and b.only != "html":
        return ""
    if b.kind == "text":
        return f"<p>{html.escape(b.text)}</p>"
    if b.kind == "warning":
        return f"<p class='warning'>⚠ {html.escape(b.text)}</p>"
    if b.kind == "figure":
        return (f"<figure>{_img(b.path, b.text)}"
                f"<figcaption>{html.escape(b.text)} <span class='note'>(figures/{html.escape(Path(b.path).name)})"
                f"</span></figcaption></figure>")
    if b.kind == "table":
        src = f" <span class='note'>({html.escape(b.csv)})</span>" if b.csv else ""
        return _html_table(b.table, html.escape(b.text) + src, b.open)
    if b.kind == "verdicts":
        return _html_verdicts(b.verdicts)
    if b.kind == "code":
        cap = f"<p class='caption'>{html.escape(b.csv)}</p>" if b.csv else ""
        return f"{cap}<pre><code>{html.escape(b.text)}</code></pre>"
    if b.kind == "details":
        inner = "".join(_html_block(c) for c in b.children)
        return f"<details class='block'><summary>{html.escape(b.text)}</summary>{inner}</details>"
    if b.kind == "link":
        return f"<p><a href='{html.escape(safe_href(b.href))}'>{html.escape(b.text)}</a></p>"
    if b.kind == "list":
        return "<ul>" + "".join(f"<li>{html.escape(t)}</li>" for t in b.text.split("\n")) + "</ul>"
    raise ValueError(b.kind)


def _html_answers(answers) -> str:
    cards = []
    for a in answers:
        fig = ""
        if a.figure is not None:
            fig = (f"<figure class='answer-fig'>{_img(a.figure, a.figure_caption)}<figcaption>"
                   f"{html.escape(a.figure_caption)}</figcaption></figure>")
        words = "".join(f"<li>{html.escape(s)}</li>" for s in a.sentences)
        notes = "".join(f"<p class='disagree'>{html.escape(n)}</p>" for n in a.notes)
        decided = [v for v in a.verdicts if v.verdict != "inconclusive"]
        undecided = [v for v in a.verdicts if v.verdict == "inconclusive"]
        folded = (f"<details class='undecided'><summary>{len(undecided)} inconclusive verdict(s): what was tested, "
                  f"and why it could not be decided</summary>{_html_verdicts(undecided, compact=True)}</details>"
                  if undecided else "")
        cards.append(f"<div class='answer'><h3>{html.escape(a.title)}</h3><ul class='plain'>{words}</ul>{notes}"
                     f"{fig}{_html_verdicts(decided, compact=True)}{folded}</div>")
    return "<div class='answers'>" + "".join(cards) + "</div>"


def render_html(doc: Document) -> str:
    toc = "".join(f"<li><a href='#{s.anchor}'>{html.escape(s.title)}</a></li>" for s in doc.sections)
    body = [f"<h1>{html.escape(doc.title)}</h1>", f"<p class='note'>{html.escape(doc.subtitle)}</p>"]
    body += [f"<p class='warning'>⚠ {html.escape(w)}</p>" for w in doc.warnings]
    if doc.answers:
        body.append("<h2 id='answers'>Answers</h2>" + _html_answers(doc.answers))
    else:
        body.append("<h2 id='verdicts'>Verdicts</h2>" + _html_verdicts(doc.verdicts))
    if doc.how_to_read:
        body.append("<details class='howto' open><summary>How to read this report</summary><ul>"
                    + "".join(f"<li>{html.escape(t)}</li>" for t in doc.how_to_read) + "</ul></details>")
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


def _md_verdicts(vs: list[Verdict], compact: bool = False) -> str:
    e = _md_escape
    if compact:  # the answers: claim, id and statistic; reason, method and runs are in the verdict's section
        return "\n".join(f"- **{e(v.verdict)}** — {e(v.claim)}" + (f" ({md_code(v.id)})" if v.id else "") +
                         f". {e(verdict_sentence(v))}." for v in vs)
    return "\n".join(f"- **{e(v.verdict)}** — {e(v.claim)}" + (f" ({md_code(v.id)})" if v.id else "") +
                     f". {e(verdict_sentence(v))}. {e(v.reason)}. *Method:* {e(v.method)}. "
                     f"*Runs:* {e(_runs_list(v)) or '—'}" for v in vs)


def _rel(path: Path, out_dir: Path) -> str:
    p = Path(path)
    return p.relative_to(out_dir).as_posix() if p.is_relative_to(out_dir) else str(p)


def _md_blocks(blocks: list[Block], out_dir: Path) -> list[str]:
    e = _md_escape
    out: list[str] = []
    for b in blocks:
        if b.only and b.only != "md":
            continue
        if b.kind == "text":
            out += [e(b.text), ""]
        elif b.kind == "warning":
            out += [f"> **Warning:** {e(b.text)}", ""]
        elif b.kind == "figure":
            out += [f"![{e(b.text)}]({safe_href(_rel(b.path, out_dir))})", "", f"*{e(b.text)}*", ""]
        elif b.kind == "table":
            out += [f"*{e(b.text)}*" + (f" ({md_code(b.csv)})" if b.csv else ""), "", _md_table(b.table), ""]
        elif b.kind == "verdicts":
            out += [_md_verdicts(b.verdicts), ""]
        elif b.kind == "code":
            out += ([f"*{e(b.csv)}*", ""] if b.csv else []) + [md_fence(b.text, b.lang), ""]
        elif b.kind == "details":
            out += [f"<details><summary>{e(b.text)}</summary>", "", *_md_blocks(b.children, out_dir),
                    "</details>", ""]
        elif b.kind == "link":
            out += [f"[{e(b.text)}]({safe_href(b.href)})", ""]
        elif b.kind == "list":
            out += [f"- {e(t)}" for t in b.text.split("\n")] + [""]
    return out


def render_markdown(doc: Document, out_dir: Path) -> str:
    e = _md_escape
    out = [f"# {e(doc.title)}", "", f"*{e(doc.subtitle)}*", ""]
    out += [f"> **Warning:** {e(w)}\n" for w in doc.warnings]
    if doc.answers:
        out += ["## Answers", ""]
        for a in doc.answers:
            out += [f"### {e(a.title)}", ""] + [f"- {e(s)}" for s in a.sentences] + [""]
            out += [f"> {e(n)}\n" for n in a.notes]
            if a.figure is not None:
                out += [f"![{e(a.figure_caption)}]({safe_href(_rel(a.figure, out_dir))})", ""]
            decided = [v for v in a.verdicts if v.verdict != "inconclusive"]
            undecided = [v for v in a.verdicts if v.verdict == "inconclusive"]
            out += [_md_verdicts(decided, compact=True), ""] if decided else []
            if undecided:  # folded, as in the HTML
                out += [f"<details><summary>{len(undecided)} inconclusive verdict(s)</summary>", "",
                        _md_verdicts(undecided, compact=True), "", "</details>", ""]
    else:
        out += ["## Verdicts", "", _md_verdicts(doc.verdicts), ""]
    if doc.how_to_read:
        out += ["## How to read this report", ""] + [f"- {e(t)}" for t in doc.how_to_read] + [""]
    out += ["Contents: " + " · ".join(f"[{e(s.title)}](#{s.anchor})" for s in doc.sections), ""]
    for s in doc.sections:
        out += [f"<a id=\"{s.anchor}\"></a>", "", f"## {e(s.title)}", ""]
        out += _md_blocks(s.blocks, out_dir)
    return "\n".join(out)
