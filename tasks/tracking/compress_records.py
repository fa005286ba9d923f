"""MLflow records of the compress stage: the teacher it starts from, the trade-off table, the student's card."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from forgeline.tasks.compress.measure import tradeoff_markdown
from forgeline.tasks.compress.stage import CompressResult
from forgeline.tasks.compress.student import CompressError
from forgeline.tasks.registry.versions import RegisterResult
from forgeline.tasks.tracking.classifiers import is_classifier_dir, log_classifier
from forgeline.tasks.tracking.models import log_transformers_model
from forgeline.tasks.tracking.records import log_metrics, log_text, set_tags
from forgeline.tasks.tracking.store import client, tracking_uri

logger = logging.getLogger(__name__)

TABLE_FILE = "tradeoff.json"
CARD_FILE = "model_card.md"


class TeacherRef(BaseModel):
    """The registered version a compression starts from."""

    name: str
    version: str
    uri: str
    """``models:/NAME/VERSION``: pinned, even when the caller named an alias."""


def resolve_teacher(uri: str) -> TeacherRef:
    """The registered version ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` names.

    Raises:
        CompressError: not a registry URI, or no such model, version or alias.
    """
    from mlflow.exceptions import MlflowException

    body = uri.removeprefix("models:/")
    if body == uri or not body:
        raise CompressError(f"teacher {uri!r}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    c = client()
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            mv = c.get_model_version_by_alias(name, alias)
        else:
            name, _, version = body.rstrip("/").partition("/")
            if not version.isdigit():
                raise CompressError(f"teacher {uri!r}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
            mv = c.get_model_version(name, version)
    except MlflowException:
        raise CompressError(f"teacher {uri} does not exist in this registry (see `forgeline models`)") from None
    return TeacherRef(name=mv.name, version=str(mv.version), uri=f"models:/{mv.name}/{mv.version}")


def record_compression(run_id: str, result: CompressResult) -> None:
    """Summary metrics of both sides, the trade-off as an MLflow table, and the student's shape as params."""
    import mlflow

    metrics = {f"teacher/{k}": float(v) for k, v in result.teacher.model_dump().items()}
    metrics |= {f"student/{k}": float(v) for k, v in result.student.model_dump().items()}
    metrics["steps"] = float(result.steps)
    log_metrics(run_id, metrics, step=result.steps)
    mlflow.log_table(data=result.table, artifact_file=TABLE_FILE, run_id=run_id)
    set_tags(
        run_id,
        {
            "student.layers": result.spec.layers if result.spec.layers is not None else "random init",
            "student.n_inner": result.spec.n_inner,
            "forgeline.resumed_from": result.resumed_from if result.resumed_from is not None else "none",
        },
    )


def student_card(result: CompressResult, teacher: TeacherRef, decision: RegisterResult, cfg: Any) -> str:
    """The student's model card: where it came from, how it was made, the trade-off, the gate's decision."""
    spec = result.spec
    origin = f"teacher layers {spec.layers}" if spec.layers is not None else "random initialisation"
    verdict = "champion" if decision.promoted else "registered without alias"
    return "\n".join(
        [
            f"# {decision.model_name} version {decision.version}",
            "",
            f"Compressed from **{teacher.name} version {teacher.version}** ({cfg.method}): {spec.n_layer} layers, "
            f"width {spec.n_embd}, MLP {spec.n_inner}, from {origin}; {result.steps} distillation steps at "
            f"T = {cfg.temperature}, alpha_kd = {cfg.alpha_kd}, alpha_ce = {cfg.alpha_ce}.",
            "",
            "## Teacher against student",
            "",
            tradeoff_markdown(result.table),
            "",
            _speed_note(result, cfg),
            "",
            f"## Gate: {verdict}",
            "",
            decision.reason,
            "",
        ]
    )


def _speed_note(result: CompressResult, cfg: Any) -> str:
    if result.metric == "f1_macro":
        return (
            f"Requests: CPU, one record per request, one forward pass (a classifier does not generate), "
            f"{cfg.latency_requests} requests; F1 and accuracy on the held-out split."
        )
    scored = (
        " ROUGE-L, BLEU and exact match on the same test pairs (eval.max_examples)."
        if result.metric == "rougeL"
        else ""
    )
    return (
        f"Generation: CPU, batch 1, KV cache on, {cfg.latency_new_tokens} new tokens per call, "
        f"{cfg.latency_requests} calls.{scored}"
    )


def publish_card(run_id: str, decision: RegisterResult, card: str) -> None:
    """Log the card on the compress run and set it as the student version's description."""
    log_text(run_id, card, CARD_FILE)
    c = client()
    c.update_model_version(decision.model_name, decision.version, description=card[:5000])
    c.set_model_version_tag(decision.model_name, decision.version, "forgeline.model_card_run_id", run_id)


def log_student_once(run_dir: Path, run_id: str, model_dir: str, prompt: str) -> str:
    """Log the student to ``run_id`` unless this compression already logged it to this store; its URI."""
    store = tracking_uri()
    marker = run_dir / "logged_model.json"
    if marker.exists():
        logged = json.loads(marker.read_text())
        if logged.get("tracking_uri") == store:
            return str(logged["model_uri"])
    if is_classifier_dir(model_dir):  # a compressed classifier is served as text-classification, like its teacher
        uri = log_classifier(run_id, model_dir, prompt)
    else:
        uri = log_transformers_model(run_id, model_dir, prompt)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"model_uri": uri, "run_id": run_id, "tracking_uri": store}))
    tmp.replace(marker)
    return uri
