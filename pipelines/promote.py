"""Promote a registered model version to the registry's champion alias when it wins on a frozen eval set.

``upsr promote --candidate models:/upsr@challenger --eval EVAL``:

1. resolve the candidate to a version and the champion (alias ``promote.champion_alias``)
   of the same registered model;
2. evaluate both on the same eval set (``upsr evaluate``), reusing an earlier complete
   evaluation of a version when one exists for the same eval-set content and metric settings;
3. pair the two per-image tables by image id and compute the mean per-image difference of
   ``promote.primary_metric`` (positive: the candidate is better) with a paired bootstrap
   confidence interval;
4. move the alias only when the mean difference exceeds ``promote.margin`` and the interval
   lies above zero. Without a champion the candidate becomes the first one.

The decision, its reason, the comparison and the eval-set hash are written as
``upsr.promote.*`` tags on both versions; a new champion records the one it replaced, which
``upsr promote --rollback`` restores. An evaluation that failed or missed any image decides
nothing: the aliases stay as they were.

Exit status: 0 when a decision was made (promoted or kept), 1 when an evaluation failed or
was partial, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from mlflow.exceptions import MlflowException

from pipelines import config as config_module
from pipelines import registry, tracking
from pipelines.entry import run_job
from pipelines.errors import UserError
from pipelines.config import Config, PromoteConfig
from pipelines.eval_set import EvalSet, open_eval_set
from pipelines.eval_contract import (
    FULL_REFERENCE,
    METRICS,
    Evaluation,
    completeness_problems,
    lpips_setting,
    no_reference_setting,
    settings_hash,
    table_content_hash,
)
from pipelines.evaluate import evaluate
from pipelines.synth import add_config_arguments
from upsr.stats import PairedComparison, paired_bootstrap

log = logging.getLogger(__name__)

PROMOTED = "promoted"
KEPT = "kept"
EVALUATION_FAILED = "evaluation_failed"
ROLLED_BACK = "rolled_back"
RESTORED = "restored"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--candidate", metavar="URI",
                        help="the version to promote: models:/NAME@ALIAS or models:/NAME/VERSION "
                             "(e.g. models:/upsr@challenger)")
    parser.add_argument("--eval", metavar="EVAL", help="the frozen eval set, as for `upsr evaluate --data`")
    parser.add_argument("--rollback", action="store_true",
                        help="point the champion alias back at the version the current champion replaced; the "
                             "registered model is --candidate's, else mlflow.registered_model")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    config = config_module.load(args.config, args.set)
    if args.rollback:
        if args.eval:
            raise UserError("--rollback compares nothing: leave out --eval")
        name = config.mlflow.registered_model
        if args.candidate:
            match = registry.MODEL_URI.match(args.candidate)
            if not match:
                raise UserError(f"--candidate {args.candidate}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
            name = match.group("name")
        rollback(name, config)
        return 0
    if not args.candidate or not args.eval:
        raise UserError("give --candidate and --eval (or --rollback)")
    decision = promote(args.candidate, args.eval, config)
    return 1 if decision.outcome == EVALUATION_FAILED else 0


@dataclass
class Decision:
    outcome: str  # PROMOTED, KEPT or EVALUATION_FAILED
    reason: str
    candidate: registry.ModelRef
    champion: registry.ModelRef | None
    comparison: PairedComparison | None = None


def decide(comparison: PairedComparison, settings: PromoteConfig) -> tuple[bool, str]:
    """Promote only when the mean gain exceeds the margin and the interval lies above zero."""
    metric = settings.primary_metric
    interval = (f"{comparison.confidence:.0%} CI [{comparison.ci_low:+.4g}, {comparison.ci_high:+.4g}] "
                f"over {comparison.count} images")
    gain = f"mean {metric} gain {comparison.mean_difference:+.4g}"
    if comparison.mean_difference <= settings.margin:
        return False, f"{gain} does not exceed the margin {settings.margin:g} ({interval})"
    if comparison.ci_low <= 0:
        return False, f"{gain} exceeds the margin {settings.margin:g} but the {interval} does not exclude zero"
    return True, f"{gain} exceeds the margin {settings.margin:g} and the {interval} excludes zero"


def promote(candidate_uri: str, eval_uri: str, config: Config) -> Decision:
    settings = config.promote
    mlflow_client = tracking.client(config.mlflow)
    candidate = registry.version_ref(registry.resolve_version(mlflow_client, candidate_uri), candidate_uri)
    current = registry.alias_version(mlflow_client, candidate.name, settings.champion_alias)
    champion = registry.version_ref(current) if current else None
    if champion and champion.version == candidate.version:
        log.info("promote: %s is already @%s: nothing to decide", candidate.label, settings.champion_alias)
        return Decision(KEPT, "already the champion", candidate, champion)

    eval_set = open_eval_set(eval_uri, config.storage)
    check_primary_metric(eval_set, config)
    set_hash = eval_set.content_hash()
    log.info("eval set %s: %s layout, %d images, content hash %s", eval_uri, eval_set.layout, len(eval_set.ids),
             set_hash)
    candidate_eval = evaluation_of(candidate, eval_set, set_hash, config)
    champion_eval = evaluation_of(champion, eval_set, set_hash, config) if champion and candidate_eval.complete \
        else None
    failed = [(ref, e) for ref, e in ((candidate, candidate_eval), (champion, champion_eval)) if e and not e.complete]
    if failed:
        reason = "; ".join(f"the evaluation of {ref.label} failed or was partial: {' / '.join(e.problems)}"
                           for ref, e in failed)
        return finish(mlflow_client, Decision(EVALUATION_FAILED, reason, candidate, champion), config, set_hash,
                      eval_uri, candidate_eval, champion_eval)
    if champion is None:
        decision = Decision(PROMOTED, f"first champion: no version held @{settings.champion_alias}", candidate, None)
        return finish(mlflow_client, decision, config, set_hash, eval_uri, candidate_eval, None)

    try:
        scores = paired_scores(candidate_eval.table, champion_eval.table, settings.primary_metric)
        comparison = paired_bootstrap(*scores, METRICS[settings.primary_metric], settings.bootstrap_samples,
                                      settings.confidence, settings.seed)
    except ValueError as error:
        decision = Decision(EVALUATION_FAILED, f"the two evaluations cannot be compared: {error}", candidate, champion)
        return finish(mlflow_client, decision, config, set_hash, eval_uri, candidate_eval, champion_eval)
    wins, reason = decide(comparison, settings)
    decision = Decision(PROMOTED if wins else KEPT, reason, candidate, champion, comparison)
    return finish(mlflow_client, decision, config, set_hash, eval_uri, candidate_eval, champion_eval)


def check_primary_metric(eval_set: EvalSet, config: Config) -> None:
    metric = config.promote.primary_metric
    if metric in FULL_REFERENCE and not eval_set.has_reference:
        raise UserError(f"promote.primary_metric {metric} needs HR references; eval set {eval_set.uri} has LR "
                        "images only: promote on a set of LR/HR pairs")
    if metric == "lpips" and lpips_setting(config.loss).mode == "off":
        raise UserError(f"promote.primary_metric lpips: {lpips_setting(config.loss).description}")


def evaluation_of(model: registry.ModelRef, eval_set: EvalSet, set_hash: str, config: Config) -> Evaluation:
    """A stored complete evaluation of this version on this content and settings, else a fresh one."""
    settings = settings_hash(config, lpips_setting(config.loss), no_reference_setting(config.evaluate))
    run_id = tracking.find_evaluation(config.mlflow, model, set_hash, settings)
    if run_id:
        table = tracking.load_evaluation_table(config.mlflow, run_id)
        problems = completeness_problems(table, eval_set.ids)
        if not problems and table_content_hash(table) == set_hash:
            log.info("reusing evaluation run %s of %s: same eval-set content (%s) and metric settings", run_id,
                     model.label, set_hash[:16])
            return Evaluation(table, {"eval_set": {"hash": set_hash}}, True, run_id, reused=True)
        log.warning("evaluation run %s of %s does not match its tags (%s): evaluating again", run_id, model.label,
                    "; ".join(problems) or "content hash differs")
    evaluation = evaluate(model, eval_set, config)
    if evaluation.complete and evaluation.set_hash != set_hash:
        evaluation.complete = False
        evaluation.problems.append(f"the eval set changed while it was evaluated (content hash {evaluation.set_hash}, "
                                   f"{set_hash} before)")
    return evaluation


def paired_scores(candidate: pa.Table, champion: pa.Table, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The metric of both models per image, in one id order; ValueError unless both scored the same images."""
    def by_id(table: pa.Table) -> dict[str, tuple]:
        return {row["id"]: (row["lr_sha256"], row["hr_sha256"], row[metric])
                for row in table.select(["id", "lr_sha256", "hr_sha256", metric]).to_pylist()}

    ours, theirs = by_id(candidate), by_id(champion)
    if ours.keys() != theirs.keys():
        differing = sorted(ours.keys() ^ theirs.keys())
        raise ValueError(f"{len(differing)} image id(s) appear in only one evaluation: {', '.join(differing[:5])}")
    ids = sorted(ours)
    changed = [i for i in ids if ours[i][:2] != theirs[i][:2]]
    if changed:
        raise ValueError(f"{len(changed)} image(s) differ in content between the evaluations: {', '.join(changed[:5])}")
    missing = [i for i in ids if ours[i][2] is None or theirs[i][2] is None]
    if missing:
        raise ValueError(f"{len(missing)} image(s) have no {metric}: {', '.join(missing[:5])}")
    return np.array([ours[i][2] for i in ids]), np.array([theirs[i][2] for i in ids])


def finish(mlflow_client, decision: Decision, config: Config, set_hash: str, eval_uri: str,
           candidate_eval: Evaluation, champion_eval: Evaluation | None) -> Decision:
    """Move the alias when promoted, tag both versions, log the decision line."""
    settings = config.promote
    candidate, champion = decision.candidate, decision.champion
    tags: dict[str, object] = {
        "decision": decision.outcome, "reason": decision.reason, "primary_metric": settings.primary_metric,
        "margin": settings.margin, "eval_set_hash": set_hash, "eval_set": eval_uri,
        "candidate_version": candidate.version, "champion_version": champion.version if champion else "none",
        "candidate_evaluation_run": candidate_eval.run_id,
        "decided_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if champion_eval is not None:
        tags["champion_evaluation_run"] = champion_eval.run_id
    for role, evaluation in (("candidate", candidate_eval), ("champion", champion_eval)):
        if evaluation is not None and evaluation.complete:
            tags[f"{role}_mean"] = pc.mean(evaluation.table[settings.primary_metric]).as_py()
    if decision.comparison is not None:
        comparison = decision.comparison
        tags |= {"mean_difference": comparison.mean_difference, "ci_low": comparison.ci_low,
                 "ci_high": comparison.ci_high, "confidence": comparison.confidence,
                 "bootstrap_samples": comparison.samples, "images": comparison.count}
    if decision.outcome == PROMOTED:
        # MLflow has no compare-and-set for aliases: re-reading it just before the move narrows a
        # concurrent promotion's window from the evaluations' minutes to one round trip.
        now = registry.alias_version(mlflow_client, candidate.name, settings.champion_alias)
        holder = registry.version_ref(now) if now else None
        if (holder.version if holder else None) != (champion.version if champion else None):
            raise UserError(f"@{settings.champion_alias} of {candidate.name} moved to "
                            f"v{holder.version if holder else 'none'} while {candidate.label} was compared with "
                            f"{champion.label if champion else 'no champion'}: nothing changed; run promote again")
        # The predecessor is recorded before the alias moves, so that an interruption between the
        # two calls cannot leave a champion that --rollback does not know how to undo.
        previous = champion.version if champion else None
        registry.set_version_tags(mlflow_client, candidate.name, candidate.version,
                                  {registry.TAG_PREVIOUS_CHAMPION: previous} if previous else {})
        if previous is None:
            # A version that once replaced another and is now the first champion again has no predecessor.
            delete_tag(mlflow_client, candidate, registry.TAG_PREVIOUS_CHAMPION)
        mlflow_client.set_registered_model_alias(candidate.name, settings.champion_alias, candidate.version)
    for role, ref in (("candidate", candidate), ("champion", champion)):
        if ref is not None:
            registry.set_version_tags(mlflow_client, ref.name, ref.version,
                                      {registry.PROMOTE_TAG + key: value
                                       for key, value in (tags | {"role": role}).items()})
    alias = f"@{settings.champion_alias}"
    if decision.outcome == PROMOTED:
        log.info("promote: PROMOTED %s to %s (was %s): %s", candidate.label, alias,
                 champion.label if champion else "unset", decision.reason)
    elif decision.outcome == KEPT:
        log.info("promote: KEPT %s as %s, %s not promoted: %s", champion.label, alias, candidate.label, decision.reason)
    else:
        log.error("promote: NOTHING PROMOTED, %s unchanged (%s): %s", alias, champion.label if champion else "unset",
                  decision.reason)
    return decision


def delete_tag(mlflow_client, ref: registry.ModelRef, key: str) -> None:
    version = mlflow_client.get_model_version(ref.name, ref.version)
    if key in version.tags:
        mlflow_client.delete_model_version_tag(ref.name, ref.version, key)


def rollback(name: str, config: Config) -> str:
    """Point the champion alias at the version the current champion replaced; returns that version."""
    alias = config.promote.champion_alias
    mlflow_client = tracking.client(config.mlflow)
    current = registry.alias_version(mlflow_client, name, alias)
    if current is None:
        raise UserError(f"{name} has no @{alias}: nothing to roll back")
    previous = current.tags.get(registry.TAG_PREVIOUS_CHAMPION)
    if not previous:
        raise UserError(f"{name} v{current.version} became @{alias} without replacing another version: "
                        "nothing to roll back to")
    try:
        mlflow_client.get_model_version(name, previous)
    except MlflowException as error:
        raise UserError(f"{name} v{previous}, the champion before v{current.version}, is gone: {error.message}") \
            from None
    mlflow_client.set_registered_model_alias(name, alias, previous)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for version, outcome, reason in (
            (current.version, ROLLED_BACK, f"rolled back: @{alias} returned to v{previous}"),
            (previous, RESTORED, f"@{alias} again, rolled back from v{current.version}")):
        registry.set_version_tags(mlflow_client, name, version, {
            registry.PROMOTE_TAG + "decision": outcome, registry.PROMOTE_TAG + "reason": reason,
            registry.PROMOTE_TAG + "decided_at": now})
    log.info("promote --rollback: %s @%s moved from v%s back to v%s", name, alias, current.version, previous)
    return previous


if __name__ == "__main__":
    sys.exit(run_job(sys.modules[__name__]))
