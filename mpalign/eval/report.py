"""The evaluation report: every score as CSV and Parquet, the aggregates as CSV, and one HTML page with metric tables
(one column per adapter) and an image grid (references, the layout's boxes drawn, each adapter's outputs).

Layout of ``out_dir``::

    report.html             the page (open it in a browser; paths inside are relative)
    scores.csv / .parquet   one row per generated image: adapter, sample, seed, image, every metric, per-subject scores
    summary.csv             long form: adapter, level (overall | group | sample), key, metric, value, images
    images/<adapter>/*.png  the generated images
    report_assets/*.png     reference thumbnails and layout drawings
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
from PIL import Image

from mpalign.eval.benchmarks import BenchmarkSample
from mpalign.eval.metrics import METRIC_NAMES, aggregate, metric_columns
from mpalign.pipeline import draw_boxes

THUMB = 128


def write_scores(scores: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    """``scores.parquet`` (list columns kept), ``scores.csv`` (list columns as JSON) and ``summary.csv``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"parquet": out_dir / "scores.parquet", "csv": out_dir / "scores.csv", "summary": out_dir / "summary.csv"}
    scores.to_parquet(paths["parquet"], index=False)
    flat = scores.copy()
    for column in flat.columns:
        if flat[column].map(lambda v: isinstance(v, (list, tuple)) or hasattr(v, "tolist")).any():
            flat[column] = flat[column].map(lambda v: json.dumps(v.tolist() if hasattr(v, "tolist") else list(v)))
    flat.to_csv(paths["csv"], index=False)
    summary_frames = [
        aggregate(scores, ["adapter"]).assign(level="overall", key="all"),
        aggregate(scores, ["adapter", "group"]).rename(columns={"group": "key"}).assign(level="group"),
        aggregate(scores, ["adapter", "sample_id"]).rename(columns={"sample_id": "key"}).assign(level="sample"),
    ]
    summary = pd.concat(summary_frames, ignore_index=True).melt(
        id_vars=["adapter", "level", "key", "images"], value_vars=metric_columns(scores), var_name="metric")
    summary[["adapter", "level", "key", "metric", "value", "images"]].to_csv(paths["summary"], index=False)
    return paths


def metric_table(scores: pd.DataFrame, adapters: Sequence[str], by: str | None) -> pd.DataFrame:
    """Rows = metrics (overall, ``by=None``) or the values of ``by``, one column per adapter (means)."""
    if by is None:
        means = aggregate(scores, ["adapter"]).set_index("adapter")
        table = means[metric_columns(scores) + ["images"]].astype(object).T  # object: the image count stays an integer
    else:
        table = {metric: aggregate(scores, ["adapter", by]).pivot(index=by, columns="adapter", values=metric)
                 for metric in metric_columns(scores)}
        table = pd.concat(table, names=["metric"])
    return table.reindex(columns=list(adapters))


def _cell(value: float, bold: bool, count: bool) -> str:
    text = "" if pd.isna(value) else (f"{int(value)}" if count else f"{value:.4f}")
    return f"<td><b>{text}</b></td>" if bold else f"<td>{text}</td>"


def _html_table(table: pd.DataFrame) -> str:
    """The table with the best adapter of each metric row in bold (higher is better for every metric here)."""
    multi = isinstance(table.index, pd.MultiIndex)
    index_names = [n or "" for n in (table.index.names if multi else [table.index.name])]
    head = "".join(f"<th>{html.escape(str(n))}</th>" for n in [*index_names, *table.columns])
    rows = []
    for key, row in table.iterrows():
        keys = key if multi else (key,)
        count = keys[-1] == "images"
        best = row.max()
        cells = "".join(_cell(v, bold=not count and len(row) > 1 and v == best, count=count) for v in row)
        labels = "".join(f"<th>{html.escape(METRIC_NAMES.get(str(k), str(k)))}</th>" for k in keys)
        rows.append(f"<tr>{labels}{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def draw_layout(sample: BenchmarkSample, size: int = THUMB) -> Image.Image:
    """The sample's boxes, labelled with their phrases, on a blank canvas."""
    return draw_boxes(Image.new("RGB", (size, size), "white"), sample.boxes, sample.phrases)


def _thumbnail(path: str, target: Path) -> None:
    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((THUMB, THUMB))
        image.save(target)


def _image_grid(scores: pd.DataFrame, samples: Iterable[BenchmarkSample], adapters: Sequence[str], out_dir: Path) -> str:
    assets = out_dir / "report_assets"
    assets.mkdir(parents=True, exist_ok=True)
    head = "<th>prompt</th><th>references</th><th>layout</th>" + "".join(
        f"<th>{html.escape(a)}</th>" for a in adapters)
    rows = []
    for sample in samples:
        refs = []
        for s, (phrase, paths) in enumerate(zip(sample.phrases, sample.references)):
            thumb = assets / f"{sample.sample_id}-ref{s}.png"
            _thumbnail(paths[0], thumb)
            refs.append(f"<figure><img src='{thumb.relative_to(out_dir)}'><figcaption>{html.escape(phrase)}"
                        f"</figcaption></figure>")
        layout = assets / f"{sample.sample_id}-layout.png"
        draw_layout(sample).save(layout)
        cells = []
        for adapter in adapters:
            mine = scores[(scores["adapter"] == adapter) & (scores["sample_id"] == sample.sample_id)]
            figures = [
                f"<figure><img src='{Path(r.image_path).relative_to(out_dir)}'><figcaption>seed {r.seed} #{r.image_index}"
                f"<br>CLIP-T {r.clip_t:.3f} M-DINO {r.m_dino:.3f}</figcaption></figure>"
                for r in mine.sort_values(["seed", "image_index"]).itertuples()
            ]
            cells.append(f"<td>{''.join(figures)}</td>")
        rows.append(f"<tr><td class='prompt'>{html.escape(sample.prompt)}<br><small>{html.escape(sample.group)} · "
                    f"{html.escape(sample.sample_id)}</small></td><td>{''.join(refs)}</td>"
                    f"<td><img src='{layout.relative_to(out_dir)}'></td>{''.join(cells)}</tr>")
    return f"<table class='grid'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


STYLE = """
body { font-family: sans-serif; margin: 2em; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; vertical-align: top; }
thead th { background: #f0f0f0; }
.grid td, .grid th { text-align: left; }
figure { display: inline-block; margin: 2px; text-align: center; font-size: 11px; }
img { width: 128px; height: auto; image-rendering: pixelated; }
.prompt { max-width: 220px; }
"""


def write_report(out_dir: Path, scores: pd.DataFrame, samples: Sequence[BenchmarkSample], adapters: dict[str, str],
                 title: str, settings: dict[str, object], grid_samples: int) -> Path:
    """Write scores, summary and ``report.html``; ``adapters`` maps each column name to where it came from."""
    out_dir = Path(out_dir)
    names = list(adapters)
    paths = write_scores(scores, out_dir)
    sources = "".join(f"<li><b>{html.escape(n)}</b>: {html.escape(src)}</li>" for n, src in adapters.items())
    facts = "".join(f"<li>{html.escape(str(k))}: {html.escape(str(v))}</li>" for k, v in settings.items())
    groups = _html_table(metric_table(scores, names, "group"))
    shown = [s for s in samples if s.sample_id in set(scores["sample_id"])][:grid_samples]
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
<h2>Adapters</h2><ul>{sources}</ul>
<h2>Settings</h2><ul>{facts}</ul>
<h2>Overall</h2>
{_html_table(metric_table(scores, names, None))}
<p>Means over all generated images. CLIP-I and DINO: cosine similarity of the whole generated image with each subject's
reference images, averaged over subjects. CLIP-T: cosine similarity of the image with its prompt in CLIP space. M-DINO:
product over subjects of the DINO similarity between the image cropped to the subject's box and the subject's references
(each factor clamped at 0). Every score is in <a href="{paths['csv'].name}">{paths['csv'].name}</a> and
<a href="{paths['parquet'].name}">{paths['parquet'].name}</a>; aggregates in
<a href="{paths['summary'].name}">{paths['summary'].name}</a>.</p>
<h2>Per combination type</h2>
{groups}
<h2>Samples ({len(shown)} of {scores['sample_id'].nunique()})</h2>
{_image_grid(scores, shown, names, out_dir)}
</body></html>
"""
    report = out_dir / "report.html"
    report.write_text(page)
    return report
