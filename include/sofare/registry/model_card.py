"""The model card of a registered version, generated from its MLflow run (no hand-typed numbers)."""

from __future__ import annotations

import html
import logging
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from sofare.contracts import PREDICTORS, EvaluationReport, MetricCI, PolicyResult
from sofare.explain import global_view as gv

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

    from sofare.config import Config

log = logging.getLogger(__name__)

METRIC_NAMES = {
    "accuracy": "accuracy",
    "precision": "precision",
    "recall": "recall",
    "f1": "F1",
    "roc_auc": "ROC-AUC",
    "mcc": "MCC",
    "brier": "Brier score (lower is better)",
    "mae": "MAE (log return)",
    "rmse": "RMSE (log return)",
    "r2": "R²",
    "ic": "information coefficient",
}
PREDICTOR_NAMES = {
    "sofare_m3": "SofareM3",
    "persistence": "persistence",
    "majority": "majority class",
    "linear": "logistic / ridge",
    "gbm": "gradient-boosted trees",
}
PLOTS = ("walk_forward.png", "reliability.png", "policy_equity.png", gv.PLOT)
PLOT_DIR = "model_card_plots"  # beside the card


def _cell(s: MetricCI) -> str:
    return f"{s.value:.4f} [{s.ci_low:.4f}, {s.ci_high:.4f}]"


def _table(scores: dict[str, dict[str, MetricCI]], first: str) -> str:
    """Metrics (rows) by predictor (columns), value [95% CI]; predictors a report lacks are left out."""
    present = [p for p in PREDICTORS if p in scores]
    rows = [f"| {first} | " + " | ".join(PREDICTOR_NAMES[p] for p in present) + " |", "|---|" + "---|" * len(present)]
    rows += [
        f"| {METRIC_NAMES[m]} | " + " | ".join(_cell(scores[p][m]) if m in scores[p] else "–" for p in present) + " |"
        for m in METRIC_NAMES
        if any(m in scores[p] for p in present)
    ]
    return "\n".join(rows)


def _result_row(name: str, r: PolicyResult) -> str:
    return (
        f"| {name} | {r.total_return:.2%} | {r.sharpe:.2f} | {r.max_drawdown:.2%} | {r.exposure:.1%} | {r.trades} | "
        f"{r.turnover:.0f} | {r.fees_paid:.2%} |"
    )


POLICY_HEADER = [
    "| | return | Sharpe (ann.) | max drawdown | exposure | trades | turnover / year | fees + slippage paid |",
    "|---|---:|---:|---:|---:|---:|---:|---:|",
]


def _plainly(mine: str, a: PolicyResult, theirs: str, b: PolicyResult) -> str:
    """One sentence a reader cannot misread: did the policy beat the alternative after costs?"""
    verdict = "beat" if a.total_return > b.total_return else "did **not** beat"
    return (
        f"Plainly: {mine} {verdict} {theirs} after costs ({a.total_return:+.2%} vs {b.total_return:+.2%}; "
        f"costs took {a.fees_paid:.2%} over {a.trades} position changes)."
    )


def _calibration(report: EvaluationReport) -> list[str]:
    c, r = report.calibration, report.reliability
    if r is None:
        return []
    return [
        "## Calibration",
        "",
        f"P(up) = sigmoid({c.scale:.3f} · margin + {c.bias:+.3f}) ({c.method}; fitted on validation {c.fitted_on}),",
        "margin = the classification head's logit difference. Monotone: ROC-AUC is unchanged, probabilities get honest.",
        "",
        "| test window | Brier | ECE (10 quantile bins) |",
        "|---|---:|---:|",
        f"| raw head | {r.brier_raw:.4f} | {r.ece_raw:.4f} |",
        f"| calibrated | {r.brier:.4f} | {r.ece:.4f} |",
        "| coin (0.5) | 0.2500 | – |",
        "",
        "| mean predicted P(up) | " + " | ".join(f"{v:.3f}" for v in r.predicted) + " |",
        "|---|" + "---:|" * len(r.predicted),
        "| observed up-rate | " + " | ".join(f"{v:.3f}" for v in r.observed) + " |",
        "| hours | " + " | ".join(str(n) for n in r.count) + " |",
        "",
        "![reliability](model_card_plots/reliability.png)",
        "",
    ]


def _policy(report: EvaluationReport) -> list[str]:
    p = report.policy
    if p is None or report.policy_test is None or report.policy_buy_and_hold is None:
        return []
    rule = (
        "always flat: no threshold beat staying out after costs on validation"
        if p.threshold is None
        else f"long when calibrated P(up) > {p.threshold:.2f}, then held at least {p.min_hold} decision(s)"
    )
    return [
        "## Decision policy (served as `signal`)",
        "",
        f"Policy `{p.id}`: {rule}. Chosen on validation ({p.chosen_on}) by after-cost return among the thresholds and",
        f"holding times in config (staying flat included); costs {p.fee_bps:g} bps fee + {p.slippage_bps:g} bps slippage per",
        "side. On the untouched test window:",
        "",
        *POLICY_HEADER,
        _result_row("SofareM3 policy", report.policy_test),
        _result_row("buy and hold", report.policy_buy_and_hold),
        "",
        _plainly("the SofareM3 policy", report.policy_test, "buy and hold", report.policy_buy_and_hold),
        "",
        "![policy equity](model_card_plots/policy_equity.png)",
        "",
    ]


def _walk_forward(report: EvaluationReport) -> list[str]:
    wf = report.wf
    if wf is None or not wf.folds:
        return ["## Walk-forward", "", "Not run for this version (`training.walk_forward.folds: 0`).", ""]
    metric = report.primary_metric
    baselines = list(wf.folds[0].baselines)
    lines = [
        "## Walk-forward evidence (what the promotion gate decides on)",
        "",
        f"{len(wf.folds)} {wf.mode} folds: each retrained with the tuned hyper-parameters on every row before it"
        f" ({report.purge_rows} rows purged), early-stopped, calibrated and given its policy on its own validation part,",
        f"then scored on its test part; {wf.seconds / 60:.1f} min. {METRIC_NAMES[metric]} [95% CI] per fold:",
        "",
        "| fold | test window | train rows | epochs | SofareM3 | "
        + " | ".join(PREDICTOR_NAMES[b] for b in baselines)
        + " |",
        "|---|---|---:|---:|---|" + "---|" * len(baselines),
        *[
            f"| {f.fold} | {f.test_start[:10]} .. {f.test_end[:10]} | {f.train_rows:,} | {f.epochs} | {_cell(f.score)} | "
            + " | ".join(_cell(f.baselines[b]) for b in baselines)
            + " |"
            for f in wf.folds
        ],
        "",
        "Pooled over the folds' test windows:",
        "",
        _table(wf.pooled, "metric (pooled)"),
        "",
        f"Paired moving-block bootstrap of {METRIC_NAMES[metric]}, SofareM3 minus each baseline on the same hours:",
        "",
        *[
            f"- vs {PREDICTOR_NAMES[p.baseline]}: {p.difference.value:+.4f} [{p.difference.ci_low:+.4f}, "
            f"{p.difference.ci_high:+.4f}] — **{_verdict(p.verdict, p.baseline)}** "
            f"({p.share_not_better:.0%} of resamples not better)"
            for p in wf.paired
        ],
        "",
    ]
    if wf.policy:
        lines += [
            "Decision policies walk-forward (each fold's policy chosen on its own validation part, traded on its"
            " test part, folds back to back, after fees + slippage):",
            "",
            *POLICY_HEADER,
            *[_result_row(name.replace("_", " "), r) for name, r in wf.policy.items()],
            "",
        ]
        if "sofare_m3" in wf.policy and "buy_and_hold" in wf.policy:
            lines += [
                _plainly(
                    "walk-forward, the SofareM3 policy",
                    wf.policy["sofare_m3"],
                    "buy and hold",
                    wf.policy["buy_and_hold"],
                ),
                "",
            ]
    if wf.reliability is not None:
        r = wf.reliability
        lines += [
            f"Calibration pooled: Brier {r.brier_raw:.4f} raw → {r.brier:.4f} calibrated; ECE {r.ece_raw:.4f} → "
            f"{r.ece:.4f}.",
            "",
        ]
    if wf.ablations:
        full = wf.ablations.get("micro+safe+macro")
        lines += [
            "### Ablations: is the multi-modal design earning its cost?",
            "",
            f"Pooled walk-forward {METRIC_NAMES[metric]} with only some modalities reaching the model (the others'"
            " inputs held at their training mean; same folds, same hyper-parameters):",
            "",
            "| inputs | " + METRIC_NAMES[metric] + " |",
            "|---|---|",
            *[f"| {k} | {_cell(v)} |" for k, v in wf.ablations.items()],
            "",
        ]
        if full is not None:
            micro = wf.ablations.get("micro")
            if micro is not None:
                overlap = micro.ci_low <= full.value <= micro.ci_high or full.ci_low <= micro.value <= full.ci_high
                lines += [
                    f"All three modalities vs micro only: {full.value - micro.value:+.4f}"
                    + (" — within the intervals: no evidence that the extra modalities help." if overlap else "."),
                    "",
                ]
    lines += ["![walk-forward](model_card_plots/walk_forward.png)", ""]
    return lines


def _signed(value: float | None, sd: float | None = None) -> str:
    if value is None:
        return "–"
    return f"{value:+.4f}" + (f" ± {sd:.4f}" if sd is not None else "")


def _share(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


Table = tuple[list[str], list[list[str]]]  # header, rows: what the card (markdown) and the plugin (HTML) print


def global_view_tables(view: gv.GlobalView, top: int = 10) -> tuple[Table, Table]:
    """Both views per modality, and the `top` features by either view (half from each view's top, then by
    attribution) with their ranks in both."""
    metric = METRIC_NAMES.get(view.metric, view.metric)
    modalities = (
        [
            "modality",
            "features",
            "attribution share",
            f"{metric} drop when shuffled",
            "per fold",
            "carries signal",
        ],
        [
            [
                gv.MODALITY_NAMES[m.name],
                str(sum(f.modality == m.name for f in view.features)),
                _share(m.attribution_share),
                _signed(m.permutation, m.permutation_sd),
                ", ".join(f"{d:+.4f}" for d in m.permutation_folds) or "–",
                "yes" if m.carries_signal else "no",
            ]
            for m in view.modalities
        ],
    )

    def order(key: str) -> list[str]:
        have = [f for f in view.features if getattr(f, key) is not None]
        return [f.name for f in sorted(have, key=lambda f: -getattr(f, key))]

    by_attr, by_perm = order("attribution"), order("permutation")
    names = list(dict.fromkeys(by_attr[: top // 2] + by_perm[: top // 2] + by_attr + by_perm))[:top]
    features = {f.name: f for f in view.features}

    def rank(name: str, ranks: list[str]) -> str:
        return f" ({ranks.index(name) + 1})" if name in ranks else ""

    top_features = (
        ["feature", "modality", "attribution share (rank)", f"{metric} drop (rank)"],
        [
            [
                n,
                gv.MODALITY_NAMES[features[n].modality],
                _share(features[n].attribution_share) + rank(n, by_attr),
                _signed(features[n].permutation, features[n].permutation_sd) + rank(n, by_perm),
            ]
            for n in names
        ],
    )
    return modalities, top_features


def _markdown(table: Table) -> list[str]:
    header, rows = table
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def global_view_section(view: gv.GlobalView | None) -> list[str]:
    """What the model relies on: both views per modality and for the top features, and where they disagree."""
    head = ["## What the model relies on (global view)", ""]
    if view is None:
        return head + [
            "Not computed for this version (trained before the global view existed, or with "
            "`evaluation.global_view: false`).",
            "",
        ]
    metric = METRIC_NAMES.get(view.metric, view.metric)
    modalities, features = global_view_tables(view)
    windows = "/".join(f"{n:,}" for n in view.permutation_windows) or "0"
    lines = head + [
        f"Two independent views, computed at training time (`sofare.explain.global_view`, logged as `{gv.ARTIFACT}`):",
        "",
        f"- **attributions**: {view.attribution_method}, for the final model on {view.attribution_windows:,} evenly"
        f" spaced test windows ({view.test_window}); per feature the mean over windows of |its attributions summed"
        " over the lookback|, as a share of all features (per modality likewise)."
        if view.attribution_method
        else "- **attributions**: not computed for this version.",
        f"- **permutation importance**: on each of the {view.permutation_folds} walk-forward folds' own model and"
        f" {windows} of its test windows, one feature's whole lookback history (or one modality's features, with one"
        f" shuffle) is shuffled across the windows, {view.permutation_repeats} time(s) with seeded permutations, and"
        f" the drop of {metric} is measured (positive: the model relied on it); mean ± sd over folds × repeats, and"
        " the mean per fold. A modality carries signal when shuffling it lowered the metric in every fold and the"
        " mean of the fold means exceeds twice their standard error.",
        "",
        *_markdown(modalities),
        "",
        *[f"- {sentence}" for sentence in gv.findings(view, metric)],
        "",
        f"Top {len(features[1])} features by either view (rank 1 = the most important in that view):",
        "",
        *_markdown(features),
        "",
        "The views need not agree: attributions measure the final model's sensitivity on the test window,"
        f" permutation each fold model's skill on its test part. Computed in {view.seconds:.0f} s.",
        "",
        f"![global view]({PLOT_DIR}/{gv.PLOT})",
        "",
    ]
    return lines


def _verdict(verdict: str, baseline: str) -> str:
    return {
        "better": f"SofareM3 beats {PREDICTOR_NAMES[baseline]}",
        "worse": f"SofareM3 is worse than {PREDICTOR_NAMES[baseline]}",
        "no significant difference": f"no significant difference from {PREDICTOR_NAMES[baseline]}",
    }[verdict]


def render(
    report: EvaluationReport,
    model: str,
    version: str,
    tags: dict[str, str],
    run_id: str,
    view: gv.GlobalView | None = None,
) -> str:
    scores = report.scores
    h = report.hyper
    bt = report.backtest
    trials = report.trials
    states = {s: sum(t.state == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
    lines = [
        f"# Model card: {model} version {version} (semver {tags.get('semver', '?')})",
        "",
        f"Generated by `sofare model-card` from MLflow run `{run_id}` (git {tags.get('git_commit', '?')}). Every number",
        f"below is read from that run's `evaluation.json` and `{gv.ARTIFACT}`; regenerate, never edit.",
        "",
        "## Data",
        "",
        f"- Market: {report.symbol} {report.interval} candles, horizon {report.horizon} bar(s); safe-haven",
        "  daily bars and FRED macro series aligned as-of (no look-ahead), feature set "
        f"`{report.feature_set_version}`.",
        f"- Window: {report.data_window.label} (validated days only), {report.rows:,} rows; temporal split "
        f"{report.parts['train']:,} / {report.parts['validation']:,} / {report.parts['test']:,} rows "
        f"(train / validation / test) with {report.purge_rows} rows purged between parts.",
        f"- Test window: {report.test_window} ({report.test_windows:,} windows); the final model was fitted "
        f"on train ({report.train_windows:,} windows), early-stopped on validation after {report.epochs} epoch(s); "
        "P(up) calibrated and the decision policy chosen on validation; nothing was tuned on the test window.",
        "",
        "## Architecture",
        "",
        f"{report.architecture}: micro Transformer encoder (candles + TA features), macro TCN encoder (FRED),",
        "safe-haven Transformer encoder, attention fusion over the three modality embeddings, classification head",
        "(up/down) and regression head (standardised log return); loss w·CE + (1−w)·Huber; AdamW with warm-up + cosine",
        "schedule, gradient clipping, seeded and deterministic on CPU.",
        "",
        "| hyper-parameter | value |",
        "|---|---|",
        *[f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in h.items()],
        "",
        f"Optuna: {len(trials)} trial(s) — {states['COMPLETE']} complete, {states['PRUNED']} pruned, "
        f"{states['FAIL']} failed; best trial #{report.best_trial} (validation loss {report.best_val_loss:.4f}); "
        + (
            f"the study took **{report.study_seconds / 60:.1f} min** (first trial start to last trial end, measured), "
            f"{sum(t.epochs or 0 for t in trials)} epochs run."
            if report.study_seconds is not None
            else "study time not recorded (trained before it was)."
        ),
        "",
        "## Test metrics next to the baselines",
        "",
        f"Value [95% CI] on the held-out test window; moving-block bootstrap ({report.bootstrap_samples} resamples,"
        f" blocks of {report.bootstrap_block_bars} bars). Direction: up when P(up) > {report.threshold}.",
        f"Primary metric: **{METRIC_NAMES[report.primary_metric]}**.",
        "",
        _table(scores, "metric"),
        "",
        "## Backtest (test window, long/flat)",
        "",
        f"Long when P(up) > {report.threshold}, else flat; {report.fee_bps} bps per side on each position change;",
        f"{bt.trades} position change(s), exposure {bt.exposure:.1%}.",
        "",
        "| | total return | Sharpe (annualised) | max drawdown |",
        "|---|---:|---:|---:|",
        *[
            f"| {name} | {getattr(bt, key).total_return:.2%} | {getattr(bt, key).sharpe:.2f} | {getattr(bt, key).max_drawdown:.2%} |"
            for name, key in (("SofareM3 (after fees)", "strategy"), ("buy and hold", "buy_and_hold"))
        ],
        "",
    ]
    lines += _calibration(report) + _policy(report) + _walk_forward(report) + global_view_section(view)
    if report.walk_forward and report.wf is None:
        metric = report.primary_metric
        lines += [
            "## Walk-forward",
            "",
            f"| fold | test window | {METRIC_NAMES[metric]} |",
            "|---|---|---|",
            *[f"| {f.fold} | {f.test_start} .. {f.test_end} | {_cell(f.score)} |" for f in report.walk_forward],
            "",
        ]
    lines += [
        "## Limits",
        "",
        "- One symbol, one interval, one 2.5-year history: walk-forward folds are consecutive quarters of it, not",
        "  independent markets; intervals overlapping a baseline's mean the model has not shown an edge over it;",
        "  hourly crypto direction is close to a coin flip.",
        "- The policy is chosen on one validation period per fold; a small edge in direction (ROC-AUC a few points",
        "  above 0.5) is easily eaten by 24 bps per round trip.",
        "- Backtests charge fee + slippage per side but ignore funding and market impact, and trade at the close that",
        "  produced the signal.",
        "- Trained on the embedded 2023-01 .. 2025-06 data; market regimes outside it are untested.",
        "- Macro series with quarterly releases change rarely; their features are mostly constant within a window.",
        "- Two heads: `direction`/`prob_up` (classification) and `expected_return` (regression) are trained together",
        "  but can disagree in sign; every answer says whether they do (`heads_agree`).",
        "",
    ]
    return "\n".join(lines)


def write(cfg: Config, version: str, out: Path | None = None) -> Path:
    """Render the card of a registered version to `out` (default var/reports/model_card.md)."""
    from sofare.registry import versions

    mv = versions.resolve(cfg, version)
    out = out or cfg.var_dir / "reports" / "model_card.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    plots = out.parent / PLOT_DIR
    plots.mkdir(exist_ok=True)
    run_id = mv.run_id or mv.tags.get("training_run_id", "")
    for name in PLOTS:  # the card's pictures, from the same run (versions trained before them have none)
        try:
            local = versions.client(cfg).download_artifacts(run_id, f"plots/{name}", str(plots.parent / ".download"))
            Path(local).replace(plots / name)
        except Exception:  # noqa: BLE001 - an older run without the plot: the card still renders
            (plots / name).unlink(missing_ok=True)
    shutil.rmtree(plots.parent / ".download", ignore_errors=True)
    out.write_text(
        render(
            versions.report(cfg, mv),
            cfg.mlflow.model_name,
            str(mv.version),
            dict(mv.tags),
            mv.run_id or mv.tags.get("training_run_id", ""),
            global_view(cfg, mv),
        )
    )
    return out


def _artifact(cfg: Config, mv: ModelVersion, path: str) -> bytes | None:
    """A file of a version's training run, or None when the run has none (a version trained before it existed)."""
    from mlflow.exceptions import MlflowException

    from sofare.registry import versions

    run_id = mv.run_id or mv.tags.get("training_run_id", "")
    with tempfile.TemporaryDirectory(prefix="sofare-artifact-") as scratch:
        try:
            local = versions.client(cfg).download_artifacts(run_id, path, scratch)
        except (MlflowException, OSError) as missing:
            log.info("version %s has no %s: %s", mv.version, path, missing)
            return None
        return Path(local).read_bytes()


def global_view(cfg: Config, mv: ModelVersion) -> gv.GlobalView | None:
    """A version's global view (`global_view.json` of its training run), None when it has none."""
    raw = _artifact(cfg, mv, gv.ARTIFACT)
    return gv.GlobalView.model_validate_json(raw) if raw is not None else None


def global_view_plot(cfg: Config, alias: str) -> bytes | None:
    """The global view's picture of the version `alias` names; None when the alias is unset or the run has none."""
    from sofare.errors import NotFoundError
    from sofare.registry import versions

    try:
        mv = versions.resolve(cfg, alias)
    except NotFoundError:
        return None
    return _artifact(cfg, mv, f"plots/{gv.PLOT}")


def _html_table(table: Table) -> str:
    header, rows = table
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _html_sentence(sentence: str) -> str:
    """A finding's markdown (**bold**) as HTML, the rest escaped."""
    parts = html.escape(sentence).split("**")
    return "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(parts))


def global_view_html(cfg: Config, aliases: tuple[str, ...] = ("champion", "challenger")) -> str:
    """The global view of each alias's version, side by side (the plugin's /sofare/explain page); an alias that
    is unset or a version without a global view says so."""
    from sofare.errors import NotFoundError
    from sofare.registry import versions

    columns = []
    for alias in aliases:
        title = f"<h2>{html.escape(alias)}</h2>"
        try:
            mv = versions.resolve(cfg, alias)
        except NotFoundError:
            columns.append(
                f'{title}<p class="empty">No version has the alias <code>{html.escape(alias)}</code> yet '
                "(<code>sofare promote</code> and a finished canary set it).</p>"
            )
            continue
        semver = html.escape(mv.tags.get("semver", "?"))
        title = f"<h2>{html.escape(alias)}: version {html.escape(str(mv.version))} (semver {semver})</h2>"
        view = global_view(cfg, mv)
        if view is None:
            columns.append(
                f'{title}<p class="empty">This version has no global view: its training run holds no '
                f"<code>{gv.ARTIFACT}</code> (trained before the global view existed, or with "
                "<code>evaluation.global_view: false</code>).</p>"
            )
            continue
        modalities, features = global_view_tables(view)
        metric = METRIC_NAMES.get(view.metric, view.metric)
        windows = "/".join(str(n) for n in view.permutation_windows) or "0"
        about = (
            f"Attributions: {view.attribution_windows} test windows ({html.escape(view.test_window)}). Permutation:"
            f" {view.permutation_folds} walk-forward folds, {windows} test windows each, {view.permutation_repeats}"
            f" shuffle(s) per feature; drop of {html.escape(metric)}."
        )
        columns.append(
            f"{title}<p>{about}</p>{_html_table(modalities)}<ul>"
            + "".join(f"<li>{_html_sentence(s)}</li>" for s in gv.findings(view, metric))
            + f"</ul>{_html_table(features)}"
            + f'<img alt="global view of version {html.escape(str(mv.version))}" '
            f'src="explain/{html.escape(alias)}/{gv.PLOT}">'
        )
    return '<div class="side-by-side">' + "".join(f"<section>{c}</section>" for c in columns) + "</div>"
