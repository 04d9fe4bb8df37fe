"""A report to read: one self-contained HTML file of the queries, their most influential training examples, the
LDS with its plots and, when given, the training rows with the largest self-influence.

    python report.py --scores scores/demo/scores_ekfac_nall_qall                # -> <scores>/report.html
    python report.py --scores scores/demo/scores_ekfac_nall_qall --best_worst 20 --top_k 5 \\
        --self_scores scores/demo/scores_self_ekfac_nall --output demo_report.html

The text comes from the data files the scores name in their metadata (checked against the scores' fingerprint),
the model's choice per query from `query_fit.safetensors` (analyze.py writes it beside the scores), the LDS from
`lds.json` and its plots beside the scores (evaluate_lds.py). Images and styles are inlined and nothing is fetched,
so the file opens from disk and can be sent as it is; queries come in pages of --page_size, each collapsible.
"""

import argparse
import base64
import datetime
import logging
from pathlib import Path

import jinja2
import torch
from safetensors.torch import load_file

from formats import (
    CONTEXT_COLUMN,
    ENDING_COLUMNS,
    HEADER_COLUMN,
    HISTOGRAM_FILE,
    LABEL_COLUMN,
    METADATA_FILE,
    QUERY_FIT_FILE,
    REPORT_FILE,
    RESULTS_FILE,
    SCATTER_FILE,
    load_scores,
    load_self_scores,
    scores_directory,
)
from pipeline import load_raw, raw_fingerprint, resolve_data_args, select_rows
from utils import (
    ArgumentParser,
    UserError,
    at_least,
    atomic_output,
    read_json,
    run_script,
    setup_logging,
)

logger = logging.getLogger(__name__)


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--scores", type=Path, required=True, help="A pairwise scores directory (analyze.py).")
    parser.add_argument("--lds", type=Path, default=None,
                        help=f"evaluate_lds.py's {RESULTS_FILE} (default: the one beside the scores, if any).")
    parser.add_argument("--self_scores", type=Path, default=None,
                        help="An analyze.py --self_influence directory of the same training rows: adds the most "
                             "suspicious rows.")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--queries", type=at_least(0), nargs="+", default=None, metavar="INDEX",
                       help="Only these queries (default: all).")
    which.add_argument("--best_worst", type=at_least(1), default=None, metavar="N",
                       help="Only the N queries with the highest and the N with the lowest LDS (needs the LDS).")
    parser.add_argument("--top_k", type=at_least(1), default=5, help="Proponents and opponents shown per query.")
    parser.add_argument("--num_suspicious", type=at_least(1), default=20, help="Suspicious training rows shown.")
    parser.add_argument("--page_size", type=at_least(1), default=50, help="Queries per page.")
    parser.add_argument("--output", type=Path, default=None, help=f"The HTML file (default <scores>/{REPORT_FILE}).")
    return parser.parse_args(argv)


def training_text(row: dict) -> dict:
    label = int(row[LABEL_COLUMN])
    return {"context": row[CONTEXT_COLUMN], "ending": f"{row[HEADER_COLUMN]} {row[ENDING_COLUMNS[label]]}",
            "label": label}


def image_uri(path: Path):
    return f"data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}" if path.is_file() else None


def load_rows(meta: dict, scores_dir: Path) -> tuple:
    """The raw training rows and queries the scores were computed on, or one line saying why they cannot be had."""
    if meta is None or "data" not in meta:
        raise UserError(f"{scores_dir} has no {METADATA_FILE} naming its data; report on scores written by analyze.py")
    args = resolve_data_args(argparse.Namespace(**meta["data"]))
    train, queries, corrupted, _ = select_rows(args, load_raw(args))
    for what, rows in (("train", train), ("queries", queries)):
        if raw_fingerprint(rows) != meta["data_fingerprint"][what]:
            raise UserError(f"the {what} rows read from {meta['data']} differ from those {scores_dir} was computed "
                            f"on (the files changed?); report from the data the scores were computed on")
    return train, queries, corrupted


def select_queries(args, num_queries: int, per_query_lds) -> list:
    if args.queries is not None:
        outside = [q for q in args.queries if q >= num_queries]
        if outside:
            raise UserError(f"--queries {outside[0]} is outside the {num_queries} queries; pass 0 to {num_queries - 1}")
        return list(dict.fromkeys(args.queries))
    if args.best_worst is not None:
        if per_query_lds is None:
            raise UserError(f"--best_worst needs the per-query LDS: run evaluate_lds.py on these scores, or pass "
                            f"--lds {RESULTS_FILE}")
        known = [(v, q) for q, v in enumerate(per_query_lds) if v is not None]
        best = [q for _, q in sorted(known, key=lambda vq: (-vq[0], vq[1]))[:args.best_worst]]
        worst = [q for _, q in sorted(known)[:args.best_worst]][::-1]  # the lowest last
        return list(dict.fromkeys(best + worst))
    return list(range(num_queries))


def build_context(args) -> dict:
    """Everything the template shows, as plain Python values (the template escapes every string)."""
    scores, meta = load_scores(args.scores)
    scores_dir = scores_directory(args.scores)
    train, queries, corrupted = load_rows(meta, scores_dir)
    lds_file, lds = load_lds(args.lds, scores_dir, scores.shape[0])
    fit_file = scores_dir / QUERY_FIT_FILE
    fit = load_file(str(fit_file)) if fit_file.is_file() else None
    per_query_lds = lds["per_query"] if lds else None
    chosen = select_queries(args, scores.shape[0], per_query_lds)
    moved = set(corrupted)

    def example(i: int, score: float) -> dict:
        return {"index": i, "score": score, "moved": i in moved, **training_text(train[i])}

    k = min(args.top_k, scores.shape[1])
    query_views = [query_view(q, scores[q], queries[q], fit, per_query_lds, k, example) for q in chosen]
    suspicious = None if args.self_scores is None else suspicious_rows(args, meta, scores_dir, train, example)
    return {"summary": scores_summary(meta, scores_dir, scores.shape, corrupted),
            "evaluation": lds_view(lds, lds_file), "queries": query_views, "suspicious": suspicious,
            "page_size": args.page_size, "top_k": k, "choices": "ABCD",
            "generated": datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}


def load_lds(lds_arg, scores_dir: Path, num_queries: int) -> tuple:
    """The LDS results file (--lds, or the one beside the scores) and its contents, None when there is none."""
    lds_file = lds_arg or scores_dir / RESULTS_FILE
    if lds_arg is not None and not lds_arg.is_file():
        raise UserError(f"--lds {lds_arg} does not exist; run evaluate_lds.py first or drop --lds")
    lds = read_json(lds_file, "LDS results") if lds_file.is_file() else None
    if lds is not None and len(lds["per_query"]) != num_queries:
        raise UserError(f"{lds_file} holds {len(lds['per_query'])} queries, the scores {num_queries}; "
                        f"pass the --lds of these scores")
    return lds_file, lds


def query_view(q: int, row, query: dict, fit, per_query_lds, k: int, example) -> dict:
    """Query q's text, the model's choice, its LDS and its k strongest proponents and opponents (`row`: its scores)."""
    top, bottom = torch.topk(row, k), torch.topk(-row, k)
    return {
        "index": q, "context": query[CONTEXT_COLUMN], "header": query[HEADER_COLUMN],
        "endings": [query[c] for c in ENDING_COLUMNS], "label": int(query[LABEL_COLUMN]),
        "choice": int(fit["prediction"][q]) if fit is not None else None,
        "margin_loss": float(fit["loss"][q]) if fit is not None else None,
        "lds": per_query_lds[q] if per_query_lds else None,
        "proponents": [example(i, v) for v, i in zip(top.values.tolist(), top.indices.tolist())],
        "opponents": [example(i, -v) for v, i in zip(bottom.values.tolist(), bottom.indices.tolist())]}


def suspicious_rows(args, meta: dict, scores_dir: Path, train, example) -> dict:
    """The --num_suspicious training rows with the largest self-influence (--self_scores), with the model's choice."""
    self_scores, self_fit, self_meta = load_self_scores(args.self_scores)
    if self_meta["data_fingerprint"]["train"] != meta["data_fingerprint"]["train"]:
        raise UserError(f"{args.self_scores} scores other training rows than {scores_dir}; pass self-influence "
                        f"scores of the same data")
    order = torch.argsort(self_scores, descending=True)[:args.num_suspicious].tolist()
    return {"strategy": self_meta["factor_strategy"], "rows": [{
        **example(i, float(self_scores[i])), "loss": float(self_fit["loss"][i]),
        "preferred": int(self_fit["prediction"][i]),
        "preferred_ending": f"{train[i][HEADER_COLUMN]} {train[i][ENDING_COLUMNS[int(self_fit['prediction'][i])]]}"}
        for i in order]}


def scores_summary(meta: dict, scores_dir: Path, shape, corrupted: list) -> dict:
    """What the scores are: their model, data, method and size (`shape`: queries × train)."""
    return {
        "scores": str(scores_dir), "checkpoint": meta.get("checkpoint"), "model": (meta.get("recipe") or {}).get("model"),
        "data": {k: v for k, v in meta["data"].items() if v not in (None, False, 0, 0.0)},
        "strategy": meta.get("factor_strategy", "ensemble" if meta.get("members") else None),
        "scoring": meta.get("scoring"), "half_precision": meta.get("use_half_precision"),
        "damping": None if meta.get("source_horizon") else meta.get("damping_factor"),  # SOURCE has none
        "members": len(meta.get("members") or []) or None,
        "dropout": (meta.get("dropout_ensemble"), meta.get("dropout_rate")) if meta.get("dropout_ensemble") else None,
        "source": (meta["source_horizon"], meta.get("source_segments", 1)) if meta.get("source_horizon") else None,
        "num_train": shape[1], "num_queries": shape[0], "label_noise_rows": len(corrupted)}


def lds_view(lds, lds_file: Path):
    """The LDS, its interval and noise ceiling, and its plots inlined; None without LDS results."""
    if lds is None:
        return None
    plots = lds_file.parent
    evaluation = {key: lds.get(key) for key in ("lds", "ci95", "num_queries", "num_masks", "repeats")}
    evaluation["noise_ceiling"] = (lds.get("noise_ceiling") or {}).get("ceiling")
    evaluation["histogram"], evaluation["scatter"] = image_uri(plots / HISTOGRAM_FILE), image_uri(plots / SCATTER_FILE)
    return evaluation


TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>Influence report: {{ summary.scores }}</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1100px; padding: 1em 2em; color: #222; }
h1 { font-size: 1.4em; margin-bottom: .2em; } h2 { font-size: 1.15em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; } td, th { padding: .15em .6em; vertical-align: top; text-align: left; }
.facts th { color: #555; font-weight: normal; } .num { text-align: right; font-variant-numeric: tabular-nums; }
.plots { display: flex; gap: 1%; align-items: flex-start; } .plots img { max-width: 49.5%; border: 1px solid #eee; }
details.query { border: 1px solid #ddd; border-radius: 6px; margin: .5em 0; padding: .3em .8em; }
details.query summary { cursor: pointer; } .ctx { color: #333; } .muted { color: #777; }
ol.endings { list-style: upper-alpha; margin: .3em 0; } .gold { font-weight: 600; }
.tag { font-size: .8em; padding: 0 .4em; border-radius: 3px; margin-left: .3em; }
.tag.gold { background: #d6f5d6; } .tag.choice { background: #dde8ff; } .tag.wrong { background: #ffe0e0; }
.tag.moved { background: #fff1c2; } .pos { color: #176f2c; } .neg { color: #a0241b; }
.examples td.text { max-width: 780px; } nav { margin: .8em 0; } nav button { margin-right: .4em; }
</style></head>
<body data-js="pending">
<h1>Influence report</h1>
<p class="muted">{{ summary.scores }} · generated {{ generated }}</p>
<h2>Summary</h2>
<table class="facts">
<tr><th>model</th><td>{{ summary.model or "unknown" }}{% if summary.checkpoint %} <span class="muted">({{ summary.checkpoint }})</span>{% endif %}</td></tr>
<tr><th>data</th><td>{% for k, v in summary.data.items() %}{{ k }}={{ v }}{% if not loop.last %}, {% endif %}{% endfor %}</td></tr>
<tr><th>sizes</th><td>{{ summary.num_queries }} queries × {{ summary.num_train }} training rows{% if summary.label_noise_rows %} ({{ summary.label_noise_rows }} labels moved by --label_noise){% endif %}</td></tr>
<tr><th>strategy</th><td>{{ summary.strategy }}{% if summary.members %} of {{ summary.members }} models{% endif %}{% if summary.scoring %}, {{ summary.scoring }} scoring{% endif %}{% if summary.half_precision %}, bf16{% endif %}{% if summary.damping %}, damping {{ summary.damping }}{% endif %}{% if summary.dropout %}, dropout ensemble of {{ summary.dropout[0] }} (rate {{ summary.dropout[1] }}){% endif %}{% if summary.source %}, SOURCE (horizon {{ summary.source[0] }}, {{ summary.source[1] }} segment{{ "s" if summary.source[1] > 1 }}){% endif %}</td></tr>
{% if evaluation %}<tr><th>LDS</th><td><b>{{ "%.4f"|format(evaluation.lds) }}</b> (95% CI {{ "%.4f"|format(evaluation.ci95[0]) }}–{{ "%.4f"|format(evaluation.ci95[1]) }}) over {{ evaluation.num_queries }} queries and {{ evaluation.num_masks }} masks{% if evaluation.noise_ceiling %}; noise ceiling {{ "%.4f"|format(evaluation.noise_ceiling) }}{% endif %}</td></tr>
{% else %}<tr><th>LDS</th><td class="muted">not evaluated (run evaluate_lds.py on these scores)</td></tr>{% endif %}
</table>
{% if evaluation and (evaluation.histogram or evaluation.scatter) %}<div class="plots">
{% if evaluation.histogram %}<img alt="histogram of per-query LDS" src="{{ evaluation.histogram }}">{% endif %}
{% if evaluation.scatter %}<img alt="predicted against actual margins for the median query" src="{{ evaluation.scatter }}">{% endif %}
</div>{% endif %}

{% macro examples(rows, sign) %}<table class="examples">
{% for e in rows %}<tr><td class="num {{ sign }}">{{ "%+.4g"|format(e.score) }}</td><td class="num muted">#{{ e.index }}</td>
<td class="text"><span class="ctx">{{ e.context }}</span> | {{ e.ending }} <span class="muted">(label {{ "ABCD"[e.label] }})</span>{% if e.moved %}<span class="tag moved">label moved by --label_noise</span>{% endif %}</td></tr>
{% endfor %}</table>{% endmacro %}


<h2>Queries ({{ queries|length }}) and their top {{ top_k }} proponents and opponents</h2>
<nav><button id="prev">◀ previous</button><span id="where"></span> <button id="next">next ▶</button>
<label>query # <input id="jump" type="number" min="0" style="width:6em"></label></nav>
{% for q in queries %}<details class="query" data-page="{{ loop.index0 // page_size }}" data-query="{{ q.index }}"{% if loop.index0 >= page_size %} hidden{% endif %}{% if loop.first %} open{% endif %}>
<summary><b>#{{ q.index }}</b> {{ q.context }} <span class="muted">{{ q.header }} …</span>
{% if q.lds is not none %}<span class="tag">LDS {{ "%.3f"|format(q.lds) }}</span>{% endif %}
{% if q.choice is not none %}<span class="tag {{ 'choice' if q.choice == q.label else 'wrong' }}">{{ "correct" if q.choice == q.label else "wrong" }}</span>{% endif %}</summary>
<ol class="endings">{% for ending in q.endings %}<li{% if loop.index0 == q.label %} class="gold"{% endif %}>{{ q.header }} {{ ending }}
{% if loop.index0 == q.label %}<span class="tag gold">gold</span>{% endif %}{% if loop.index0 == q.choice %}<span class="tag choice">model's choice</span>{% endif %}</li>{% endfor %}</ol>
<b>Proponents</b> <span class="muted">(upweighting them raises this query's margin)</span>{{ examples(q.proponents, "pos") }}
<b>Opponents</b> <span class="muted">(upweighting them lowers it)</span>{{ examples(q.opponents, "neg") }}
</details>
{% endfor %}

{% if suspicious %}<h2>Most suspicious training rows (largest {{ suspicious.strategy }} self-influence)</h2>
<table class="examples">
{% for e in suspicious.rows %}<tr><td class="num">{{ "%.4g"|format(e.score) }}</td><td class="num muted">#{{ e.index }}</td>
<td class="text"><span class="ctx">{{ e.context }}</span> | {{ e.ending }}{% if e.moved %}<span class="tag moved">label moved by --label_noise</span>{% endif %}
<br><span class="muted">loss {{ "%.3f"|format(e.loss) }}; {% if e.preferred == e.label %}the model prefers the label{% else %}the model prefers: {{ e.preferred_ending }}{% endif %}</span></td></tr>
{% endfor %}</table>{% endif %}
<script>
(function () {
  var errors = [];
  window.addEventListener("error", function (e) { errors.push(String(e.message)); document.body.dataset.errors = errors.join(" | "); });
  var items = Array.prototype.slice.call(document.querySelectorAll("details.query"));
  var pages = items.length ? Number(items[items.length - 1].dataset.page) + 1 : 1, page = 0;
  function show(p) {
    page = Math.max(0, Math.min(pages - 1, p));
    items.forEach(function (d) { d.hidden = Number(d.dataset.page) !== page; });
    document.getElementById("where").textContent = " page " + (page + 1) + " of " + pages + " ";
  }
  document.getElementById("prev").addEventListener("click", function () { show(page - 1); });
  document.getElementById("next").addEventListener("click", function () { show(page + 1); });
  document.getElementById("jump").addEventListener("change", function (e) {
    var hit = items.filter(function (d) { return d.dataset.query === e.target.value; })[0];
    if (hit) { show(Number(hit.dataset.page)); hit.open = true; hit.scrollIntoView(); }
  });
  show(0);
  document.body.dataset.js = "ready";
})();
</script>
</body></html>
"""


def render(context: dict) -> str:
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True)
    return environment.from_string(TEMPLATE).render(**context)


def main(argv=None):
    args = parse_args(argv)
    setup_logging(args.verbose)
    context = build_context(args)
    scores_dir = scores_directory(args.scores)
    output = args.output or scores_dir / REPORT_FILE
    if output.is_dir():
        raise UserError(f"--output {output} is a directory; pass a file name such as {output / REPORT_FILE}")
    output.parent.mkdir(parents=True, exist_ok=True)
    html = render(context)
    with atomic_output(output) as tmp:
        tmp.write_text(html, encoding="utf-8")
    print(f"report of {len(context['queries'])} queries ({len(html) / 2**20:.1f} MiB) in {output}")
    return output


if __name__ == "__main__":
    run_script(main)
