"""A search's trials grouped by variant (e.g. the ablation's arms), from its MLflow runs: the
outcome against the ranking the variant set expects, a table of mean ± std of PSNR, SSIM and
LPIPS per variant, the differences between variants paired by seed with confidence intervals,
the diagnostics of ``upsr.diagnostics`` per variant, the aux net's training, the scale of the
experiment, honest notes, and a bar plot PNG beside the Markdown file.

Everything comes from MLflow: the search's run (its resolved config, dataset manifest and
machine tags) and its child runs (final validation metrics, params, configs), so the report
can be regenerated at any time:

    upsr tune-report --parent-run RUN_ID --out docs/ablation.md
"""

from __future__ import annotations

import datetime
import json
import logging
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipelines import trials as pipeline
from pipelines.trials import Config, MlflowConfig, UserError
from tune.config import TuneConfig
from upsr.config_loader import from_dict

log = logging.getLogger(__name__)

# Metric, column title, format, whether higher is better.
METRICS = (("val_psnr", "PSNR (dB)", "{:.2f}", True), ("val_ssim", "SSIM", "{:.4f}", True),
           ("val_lpips", "LPIPS", "{:.4f}", False))
# upsr.diagnostics as the training job logs them: metric, column title, format.
DIAGNOSTICS = (("val_aux_psnr_gain", "g(y) gain over bicubic (dB)", "{:.2f}"),
               ("val_w_mean", "w mean", "{:.3f}"), ("val_w_at_floor", "w at floor", "{:.1%}"),
               ("val_w_saturated", "w at 1", "{:.1%}"),
               ("val_psnr_low_uncertainty", "PSNR, lowest third of \\|g(y)−y\\| (dB)", "{:.2f}"),
               ("val_psnr_high_uncertainty", "PSNR, highest third (dB)", "{:.2f}"))
X0_ERROR_PREFIX = "val_x0_mse_t"
CONFIG_ARTIFACT = "config/resolved.yaml"
AUX_GAIN_METRIC = "val_psnr_gain_over_bicubic"


@dataclass
class Group:
    name: str
    overrides: dict[str, Any]
    runs: list[Any]
    parameters: int | None

    def values(self, metric: str) -> list[float]:
        return [run.data.metrics[metric] for run in self.runs if metric in run.data.metrics]

    def by_pairing(self, keys: list[str], metric: str) -> dict[tuple, float]:
        """The metric of each trial, keyed by its values of the searched keys (e.g. its seed)."""
        return {tuple(run.data.params.get(key) for key in keys): run.data.metrics[metric]
                for run in self.runs if metric in run.data.metrics}


def paired_difference(better: Group, worse: Group, keys: list[str], metric: str, higher: bool):
    """``better - worse`` on the metric over the trials they share the searched values of (the same
    seed), signed so that positive means ``better`` is better; None with fewer than 2 pairs."""
    from upsr.stats import paired_t_interval

    mine, theirs = better.by_pairing(keys, metric), worse.by_pairing(keys, metric)
    shared = sorted(set(mine) & set(theirs))
    if len(shared) < 2:
        return None
    return paired_t_interval([mine[k] for k in shared], [theirs[k] for k in shared], higher_is_better=higher)


def ranking(groups: list[Group], metric: str, higher: bool) -> list[Group]:
    """Groups with at least one completed trial, best mean first."""
    scored = [group for group in groups if group.values(metric)]
    return sorted(scored, key=lambda g: statistics.mean(g.values(metric)), reverse=higher)


def write_report(settings: MlflowConfig, parent_run_id: str, out: str | Path, group_by: str | None = None,
                 expected_order: list[str] | None = None, notes: str | Path | None = None) -> Path:
    """Write the report and its plot, log both to the search's run, return the Markdown path.

    ``expected_order`` (best first) replaces the variant set's own; ``notes`` is a Markdown file
    of interpretation, written by a person, included under its own heading."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from tune.search import COMPLETED, OUTCOME_TAG
    from tune.trial import VARIANT_TAG_PREFIX

    experiment_id = pipeline.connect(settings)
    client = MlflowClient()
    try:
        parent = client.get_run(parent_run_id)
    except mlflow.exceptions.MlflowException as error:
        raise UserError(f"--parent-run {parent_run_id}: {error}") from None
    base = run_config(parent_run_id)
    search = search_settings(parent_run_id)
    group_by = choose_group(search, group_by)
    variant_set = search.variants[group_by]
    expected = list(expected_order) if expected_order is not None else variant_set.expected_order
    unknown = [name for name in expected if name not in variant_set.options]
    if unknown:
        raise UserError(f"--expected-order: {unknown[0]!r} is not a variant of {group_by} "
                        f"({', '.join(variant_set.options)})")
    interpretation = None
    if notes is not None:
        try:
            interpretation = Path(notes).read_text()
        except OSError as error:
            raise UserError(f"--notes {notes}: {error.strerror or error}") from None
    children = mlflow.search_runs(experiment_ids=[experiment_id], output_format="list",
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    current = [run for run in children if run.data.tags.get(OUTCOME_TAG) != "superseded"]
    completed = [run for run in current if run.data.tags.get(OUTCOME_TAG) == COMPLETED]
    groups = []
    for name, overrides in search.variants[group_by].options.items():
        runs = [run for run in completed if run.data.tags.get(f"{VARIANT_TAG_PREFIX}{group_by}") == name]
        groups.append(Group(name, overrides, runs, denoiser_parameters(runs)))
    out = Path(out)
    plot = out.with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    draw(groups, plot, parent.data.tags.get("ray_run_name", parent_run_id))
    aux_run = find_aux_run(client, experiment_id, base)
    out.write_text(markdown(parent, base, search, group_by, groups, current, completed, plot.name, expected,
                            aux_run, client, interpretation, Path(notes).name if notes else None))
    client.log_artifact(parent_run_id, str(out), "report")
    client.log_artifact(parent_run_id, str(plot), "report")
    log.info("report of search %s: %s and %s", parent_run_id, out, plot)
    return out


def run_config(run_id: str) -> Config:
    import mlflow

    text = mlflow.artifacts.load_text(f"runs:/{run_id}/{CONFIG_ARTIFACT}")
    return from_dict(Config, yaml.safe_load(text), source=f"run {run_id} {CONFIG_ARTIFACT}")


def search_settings(run_id: str) -> TuneConfig:
    import mlflow

    from tune.search import SEARCH_CONFIG_ARTIFACT

    text = mlflow.artifacts.load_text(f"runs:/{run_id}/{SEARCH_CONFIG_ARTIFACT}")
    return from_dict(TuneConfig, yaml.safe_load(text), source=f"run {run_id} {SEARCH_CONFIG_ARTIFACT}")


def choose_group(search: TuneConfig, group_by: str | None) -> str:
    sets = list(search.variants)
    if group_by is None:
        if len(sets) != 1:
            raise UserError(f"the search has {len(sets)} variant sets ({', '.join(sets) or 'none'}): "
                            "name one with --group-by" if sets else "the search has no variant set to group by")
        return sets[0]
    if group_by not in sets:
        raise UserError(f"--group-by {group_by}: the search's variant sets are {', '.join(sets) or 'none'}")
    return group_by


def denoiser_parameters(runs: list[Any]) -> int | None:
    """Parameters of the group's denoiser (the SR condition adds input channels), from a run's config."""
    if not runs:
        return None
    from upsr.denoiser import build_denoiser, count_parameters

    return count_parameters(build_denoiser(run_config(runs[0].info.run_id).denoiser))


def find_aux_run(client, experiment_id: str, base: Config):
    """The train-aux run whose checkpoint the search's trials used, or None (weights from elsewhere)."""
    if not base.aux.weights:
        return None
    weights = base.aux.weights.rstrip("/")
    # .../<run name>/checkpoint_N/aux.safetensors or .../<run name>/checkpoint_N
    checkpoint = weights.rsplit("/", 1)[0] if weights.endswith(".safetensors") else weights
    storage = checkpoint.rsplit("/", 1)[0]
    runs = client.search_runs([experiment_id], filter_string=f"params.checkpoint_storage = '{storage}'",
                              max_results=1)
    return runs[0] if runs else None


def aux_lines(aux_run, client) -> list[str]:
    """How the aux net was trained and whether its gain over bicubic had stopped improving."""
    if aux_run is None:
        return ["- The aux net's weights do not come from a train-aux run of this MLflow experiment; its "
                "training is not described here (the diagnostics table gives its gain on the validation images)."]
    history = client.get_metric_history(aux_run.info.run_id, AUX_GAIN_METRIC)
    params, metrics = aux_run.data.params, aux_run.data.metrics
    steps = ", ".join(f"{m.step}: {m.value:+.2f}" for m in sorted(history, key=lambda m: m.step))
    stopped = metrics.get("stopped_on_plateau_at_step")
    plateau = (f"stopped at step {int(stopped)} of {params.get('aux_train.steps', '?')} because the gain had not "
               f"improved by more than {params.get('aux_train.plateau.min_delta', '?')} dB for "
               f"{params.get('aux_train.plateau.patience', '?')} validations in a row"
               if stopped is not None else
               f"ran all {params.get('aux_train.steps', '?')} steps (no plateau stop)")
    return [f"- Aux net g: train-aux run `{aux_run.info.run_id}` ({params.get('aux.arch', '?')}, "
            f"{params.get('aux_train.num_workers', '?')} worker(s) x batch {params.get('aux_train.batch_size', '?')}, "
            f"lr {params.get('aux_train.lr', '?')}), {plateau}. Its PSNR gain over bicubic on the held-out "
            f"validation images, by step (dB): {steps or 'not measured'}."]


def mean_std(values: list[float], text: str) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{text.format(values[0])} (n = 1)"
    return f"{text.format(statistics.mean(values))} ± {text.format(statistics.stdev(values))}"


def outcome_lines(groups: list[Group], expected: list[str], keys: list[str]) -> list[str]:
    """The report's first lines: the measured ranking on the primary metric and, when the variant
    set expects one, whether it reproduced and how firmly each of its steps holds."""
    metric, title, text, higher = METRICS[0]
    unit = title.split("(")[-1].rstrip(")") if "(" in title else ""
    measured = ranking(groups, metric, higher)
    if not measured:
        return ["**Outcome: no trial completed; there is nothing to rank.**"]
    order = (" > " if higher else " < ").join(
        f"{g.name} {text.format(statistics.mean(g.values(metric)))}" for g in measured)
    spread = f"{title.split(' (')[0]}, mean over each group's trials{', ' + unit if unit else ''}"
    if not expected:
        return [f"**Outcome.** Measured ranking ({spread}): {order}."]
    by_name = {group.name: group for group in groups}
    observed = [g.name for g in measured if g.name in expected]
    missing = [name for name in expected if name not in observed]
    if missing:
        return [f"**Outcome: the expected ranking ({' > '.join(expected)}) could not be checked: no completed "
                f"trial in {', '.join(missing)}.** Measured ({spread}): {order}."]
    verdict = "reproduced" if observed == list(expected) else "did not reproduce"
    steps = []
    for better, worse in zip(expected, expected[1:]):
        difference = paired_difference(by_name[better], by_name[worse], keys, metric, higher)
        if difference is None:
            steps.append(f"{better} vs {worse}: too few paired trials")
            continue
        if difference.ci_low > 0:
            state = "holds (95 % interval above zero)"
        elif difference.ci_high < 0:
            state = "is reversed (95 % interval below zero)"
        else:
            state = ("holds in the mean, within the noise" if difference.mean_difference > 0
                     else "is reversed in the mean, within the noise")
        steps.append(f"{better} > {worse} {state}: {difference.mean_difference:+.2f} "
                     f"[{difference.ci_low:+.2f}, {difference.ci_high:+.2f}]")
    return [f"**Outcome: the expected ranking ({' > '.join(expected)}, by {title.split(' (')[0]}) {verdict}.** "
            f"Measured ({spread}): {order}. Step by step, paired by {', '.join(f'`{k}`' for k in keys) or 'nothing'} "
            f"(mean difference [95 % t-interval]{', ' + unit if unit else ''}): " + "; ".join(steps) + "."]


def comparison_lines(groups: list[Group], expected: list[str], keys: list[str]) -> list[str]:
    """Paired differences: each step of the expected ranking, then every group against the reference
    (the expected ranking's last, else the first group)."""
    by_name = {group.name: group for group in groups}
    reference = expected[-1] if expected else groups[0].name
    pairs = list(zip(expected, expected[1:]))
    pairs += [(group.name, reference) for group in groups
              if group.name != reference and (group.name, reference) not in pairs]
    lines = [
        "## Differences, paired by " + (", ".join(f"`{k}`" for k in keys) or "nothing"),
        "",
        f"Each cell: the mean over paired trials of A's score minus B's, signed so that positive means A is "
        f"better, and its 95 % Student-t interval (`scipy.stats.ttest_rel`; with n pairs it has n − 1 degrees of "
        f"freedom, so three seeds give wide intervals). **Bold**: the interval excludes zero.",
        "",
        "| A − B | pairs | " + " | ".join(f"{title} (A better: +)" for _, title, _, _ in METRICS) + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    for better, worse in pairs:
        cells, count = [], 0
        for metric, _, text, higher in METRICS:
            difference = paired_difference(by_name[better], by_name[worse], keys, metric, higher)
            if difference is None:
                cells.append("—")
                continue
            count = difference.count
            cell = (f"{text.format(difference.mean_difference)} [{text.format(difference.ci_low)}, "
                    f"{text.format(difference.ci_high)}]")
            cells.append(f"**{cell}**" if difference.excludes_zero else cell)
        lines.append(f"| {better} − {worse} | {count} | " + " | ".join(cells) + " |")
    return lines


def diagnostics_lines(groups: list[Group]) -> list[str]:
    """upsr.diagnostics per group at the last validation (means over the group's trials)."""
    steps = sorted({int(key[len(X0_ERROR_PREFIX):]) for group in groups for run in group.runs
                    for key in run.data.metrics if key.startswith(X0_ERROR_PREFIX)})
    lines = [
        "## Diagnostics",
        "",
        "What UPSR's premise needs, per group at the last validation (mean over its trials): g(y) clearly "
        "better than bicubic; w varying between its floor and 1 rather than sitting at either; the gain showing "
        "in the low-uncertainty pixels (lowest third of |g(y) − y|) where less noise keeps LR information "
        "(PSNR over those pixels in RGB, so lower than the table's PSNR, which is on Y). x0 MSE: the EMA "
        "denoiser's x0-prediction error at each diffusion step t (images in [−1, 1], one noise draw).",
        "",
        "| group | " + " | ".join(title for _, title, _ in DIAGNOSTICS)
        + (f" | x0 MSE at t = {', '.join(map(str, steps))}" if steps else "") + " |",
        "|---|" + "---|" * (len(DIAGNOSTICS) + bool(steps)),
    ]
    for group in groups:
        cells = [text.format(statistics.mean(group.values(metric))) if group.values(metric) else "—"
                 for metric, _, text in DIAGNOSTICS]
        if steps:
            cells.append(" / ".join(f"{statistics.mean(group.values(f'{X0_ERROR_PREFIX}{t}')):.4f}"
                                    if group.values(f"{X0_ERROR_PREFIX}{t}") else "—" for t in steps))
        lines.append(f"| {group.name} | " + " | ".join(cells) + " |")
    return lines


def markdown(parent, base: Config, search: TuneConfig, group_by: str, groups: list[Group], current: list[Any],
             completed: list[Any], plot_name: str, expected: list[str], aux_run, client,
             interpretation: str | None, notes_name: str | None) -> str:
    from tune.search import LPIPS_BACKBONE_TAG, OUTCOME_TAG
    from tune.trial import TRIAL_TAG, VARIANT_TAG_PREFIX

    tags, params = parent.data.tags, parent.data.params
    search_name = tags.get("ray_run_name", parent.info.run_id)
    manifest = parent_manifest(parent.info.run_id)
    example = completed[0].data.params if completed else {}
    train, denoiser = base.train, base.denoiser
    arrows = {True: "↑", False: "↓"}
    lines = [
        f"<!-- Generated by tune/report.py from MLflow run {parent.info.run_id}; do not edit by hand:",
        f"     upsr tune-report --parent-run {parent.info.run_id} --out <this file> -->",
        f"# Ablation: {group_by} (search `{search_name}`)",
        "",
        *outcome_lines(groups, expected, list(search.search_space)),
        "",
        f"Trials of the `upsr tune` search `{search_name}` (MLflow run `{parent.info.run_id}`, "
        f"{started(parent)}), grouped by `{group_by}`. Each cell is the mean ± sample standard deviation, over "
        f"the group's completed trials, of the validation score at the last step. "
        f"Arrows: {arrows[True]} higher is better, {arrows[False]} lower is better.",
        "",
        f"| {group_by} | sets | trials | denoiser parameters | "
        + " | ".join(f"{title} {arrows[higher]}" for _, title, _, higher in METRICS) + " |",
        "|---|---|---|---|" + "---|" * len(METRICS),
    ]
    for group in groups:
        sets = ", ".join(f"`{key}={json.dumps(value)}`" for key, value in group.overrides.items()) or "base config"
        cells = [mean_std(group.values(metric), text) for metric, _, text, _ in METRICS]
        parameters = f"{group.parameters:,}" if group.parameters is not None else "—"
        lines.append(f"| {group.name} | {sets} | {len(group.runs)} | {parameters} | " + " | ".join(cells) + " |")
    searched = ", ".join(f"`{key}`" for key in search.search_space) or "none"
    counts = manifest.get("counts", {})
    synth = manifest.get("config", {}).get("synth", {})
    lines += [
        "",
        f"![{group_by}: each group's mean minus {groups[0].name}'s, std whiskers, trials as dots]({plot_name})",
        "",
        *comparison_lines(groups, expected, list(search.search_space)),
        "",
        *diagnostics_lines(groups),
        "",
    ]
    if interpretation is not None:
        lines += [f"## Interpretation (written by hand: {notes_name}, not generated)", "", interpretation.strip(), ""]
    if base.train_data.val_photos:
        validation = (f"the {example.get('val_sources', '?')} held-out photographs whole (each one's largest "
                      f"centred square up to {base.train_data.val_photo_side} px, degraded once from a seed fixed "
                      "per photograph)")
    else:
        validation = f"the first {train.val_batches} batch(es) of {train.batch_size} held-out crops"
    lines += [
        "## Scale",
        "",
        f"- Training: {train.steps} steps per trial, global batch {example.get('global_batch_size', '?')} "
        f"({train.num_workers} worker(s) x {train.batch_size}"
        f"{f' x {train.grad_accum_steps} accumulated' if train.grad_accum_steps > 1 else ''}), "
        f"AdamW lr {train.lr:g}, warm-up {train.warmup_steps}, "
        f"EMA {train.ema_decay}; loss MSE + {base.loss.lpips_weight:g} x LPIPS. Also searched: {searched}.",
        f"- Data: {counts.get('rows', '?')} crops of {synth.get('crop_size', '?')}² from "
        f"{counts.get('files_processed', '?')} photographs, split by photograph: "
        f"{example.get('train_sources', '?')} for training ({example.get('train_rows', '?')} crops), "
        f"{example.get('val_sources', '?')} held out. Validation: {validation}, "
        f"{base.inference.sampler.upper()} with {base.diffusion.steps} steps from a fixed seed.",
        f"- Denoiser: Swin-UNet, model_channels {denoiser.model_channels}, channel_mult {list(denoiser.channel_mult)}, "
        f"{denoiser.num_res_blocks} res-block(s) per level, Swin dim {denoiser.swin_dim} x {denoiser.swin_heads} heads "
        f"(paper: 160, [1, 2, 2, 4], 2, 192 x 6; ~119M parameters). Aux net g: {base.aux.arch} "
        f"({json.dumps(base.aux.options)}), frozen, weights "
        f"`{Path(base.aux.weights).name if base.aux.weights else 'random'}`.",
        *aux_lines(aux_run, client),
        f"- Machine: {tags.get('machine', '?')}; Ray cluster {tags.get('ray_cluster', '?')}; "
        f"{params.get('max_concurrent_trials_resolved', '?')} trial(s) at once; search wall time {wall_time(parent)}.",
        "",
        "## Notes",
        "",
    ]
    weights = tags.get("lpips_vgg16_weights", "?")
    if tags.get(LPIPS_BACKBONE_TAG) == "pretrained":
        lines.append(f"- LPIPS uses torchvision's pretrained VGG16 weights ({weights}).")
    else:
        lines.append(f"- **LPIPS here is not the paper's metric**: there were no VGG16 weights at {weights} (none "
                     "can be downloaded on an offline machine), so its VGG16 trunk is randomly initialised. Read "
                     "the LPIPS column as a distance between random deep features, not as perceptual quality.")
    lines += [
        f"- Scale: {train.steps} steps on {counts.get('rows', '?')} crops against the paper's 200k steps on "
        "ImageNet. Differences between groups at this scale show what the code does, not whether the paper's "
        "ranking reproduces; compare them with the spread across seeds before reading anything into them.",
        "- All groups share the data, the steps, the aux net and the validation images; only the keys in "
        "the `sets` column differ (and, within a group, `train.seed`).",
    ]
    excluded = [run for run in current if run not in completed]
    if excluded:
        listed = ", ".join(f"{run.data.tags.get(TRIAL_TAG, run.info.run_id)} "
                           f"({run.data.tags.get(f'{VARIANT_TAG_PREFIX}{group_by}', '?')}: "
                           f"{run.data.tags.get(OUTCOME_TAG, run.info.status.lower())})" for run in excluded)
        lines.append(f"- Left out (not completed): {listed}.")
    else:
        lines.append("- Every trial of the search completed.")
    return "\n".join(lines) + "\n"


def parent_manifest(run_id: str) -> dict[str, Any]:
    import mlflow

    return json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/dataset/_manifest.json"))


def started(run) -> str:
    return datetime.datetime.fromtimestamp(run.info.start_time / 1000).strftime("%Y-%m-%d %H:%M")


def wall_time(run) -> str:
    if not run.info.end_time:
        return "unknown (the search has not ended)"
    minutes = (run.info.end_time - run.info.start_time) / 60_000
    return f"{minutes:.1f} min"


def draw(groups: list[Group], path: Path, title: str) -> None:
    """One panel per metric: each group's mean minus the first group's (bars from zero, so their
    lengths compare honestly), whiskers of one standard deviation, and the trials as dots."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4 * len(METRICS), 3.6))
    positions = list(range(len(groups)))
    reference = groups[0]
    for index, (metric, label, _, higher) in enumerate(METRICS):
        axes = figure.add_subplot(1, len(METRICS), index + 1)
        origin = statistics.mean(reference.values(metric)) if reference.values(metric) else 0.0
        deltas = [statistics.mean(g.values(metric)) - origin if g.values(metric) else 0.0 for g in groups]
        spreads = [statistics.stdev(g.values(metric)) if len(g.values(metric)) > 1 else 0.0 for g in groups]
        axes.bar(positions, deltas, yerr=spreads, capsize=4, color="#9ab", edgecolor="#345")
        for position, group in zip(positions, groups):
            values = [value - origin for value in group.values(metric)]
            axes.plot([position] * len(values), values, "o", color="#222", markersize=3)
        axes.axhline(0, color="#345", linewidth=0.8)
        axes.set_xticks(positions, [g.name for g in groups], rotation=20)
        axes.set_title(f"{label} minus {reference.name}'s {origin:.4g}\n({'higher' if higher else 'lower'} is better)",
                       fontsize=9)
    figure.suptitle(f"search {title}: mean and std per group, dots are trials", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
