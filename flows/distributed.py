"""Training under torchrun: the launching side (the train stage) and the entry point every rank runs.

The train stage keeps what it does for one process: it holds the lineage lock, opens the one ``train``
MLflow run and logs the model afterwards. Between those it writes a job spec into the run folder and
waits for ``python -m torch.distributed.run ... -m forgeline.flows.distributed SPEC``. Rank 0 logs the
per-step metrics to the stage's run and prints progress lines the stage feeds to its progress views.
No Prefect here: a rank is a plain process.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from forgeline.tasks.config import PipelineConfig
from forgeline.tasks.errors import StageInterrupted
from forgeline.tasks.tracking import models, records, store
from forgeline.tasks.tracking.metrics import MetricBuffer
from forgeline.tasks.train import distributed
from forgeline.tasks.train.loop import DONE_FILE, TrainCallbacks, TrainResult, train_model
from forgeline.tasks.train.tokens import prepare_tokenizer

logger = logging.getLogger(__name__)


class JobSpec(BaseModel):
    """What every rank trains and where rank 0 records it."""

    config: dict[str, Any]
    dataset_dir: str
    run_dir: str
    run_id: str
    base_dir: str


def train_in_ranks(
    cfg: PipelineConfig,
    dataset_dir: str,
    run_dir: Path,
    run_id: str,
    base_dir: Path,
    *,
    on_start: Callable[[dict[str, Any]], None],
    on_metrics: Callable[[int, dict[str, float]], None],
) -> TrainResult:
    """Train ``cfg`` in a torchrun job on this machine and wait for it (see ``tasks/train/distributed.py``).

    Args:
        cfg: The pipeline config (``train.nproc_per_node`` x ``train.nnodes`` above 1).
        dataset_dir: The cleaned dataset.
        run_dir: The lineage's checkpoint folder (the caller holds its lock).
        run_id: The ``train`` MLflow run rank 0 logs to.
        base_dir: The project folder.
        on_start: Gets rank 0's start summary (progress views only: rank 0 logs it to MLflow).
        on_metrics: Gets rank 0's per-step metrics (progress views only).

    Returns:
        Rank 0's result.

    Raises:
        StageInterrupted: this process was stopped by a signal (passed on to the ranks, which checkpointed).
        distributed.RanksFailed: a rank died or failed; the last complete checkpoint is kept for the next run.
    """
    if (run_dir / DONE_FILE).exists():  # finished before: nothing to launch
        return train_model(
            cfg.train, cfg.model, cfg.tokenizer, dataset_dir=dataset_dir, run_dir=run_dir, seed=cfg.seed,
            config_hash=cfg.config_hash(),
        )  # fmt: skip
    # Built once here, so the ranks load it instead of racing to write it.
    prepare_tokenizer(cfg.tokenizer, dataset_dir, run_dir, cfg.model.init_from, fetch=models.download_model)
    spec_path = run_dir / distributed.SPEC_FILE
    spec = JobSpec(
        config=cfg.for_flow_run().model_dump(mode="json"),
        dataset_dir=str(dataset_dir),
        run_dir=str(run_dir),
        run_id=run_id,
        base_dir=str(base_dir),
    )
    spec_path.write_text(spec.model_dump_json())
    cmd = distributed.torchrun_command(cfg.train, spec_path, run_id)
    if cfg.train.nnodes > 1:
        logger.warning("waiting for %d more node(s) to join: on each, run\n  %s", cfg.train.nnodes - 1, " ".join(cmd))

    def progress(kind: str, step: int | None, data: dict[str, Any]) -> None:
        if kind == "start":
            on_start(data)
        elif step is not None:
            on_metrics(step, data)

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    code, stopped = distributed.launch(cmd, on_progress=progress, env=env, cwd=base_dir)
    if stopped is not None:
        raise StageInterrupted(f"stopped by a signal; the ranks checkpointed and exited ({code})", stopped)
    if code != 0:
        raise distributed.RanksFailed(
            f"distributed training failed (torchrun exit {code}): a rank died or raised, see the log above; "
            f"the next run resumes from the last complete checkpoint in {run_dir / 'checkpoints'}"
        )
    return TrainResult.model_validate_json((run_dir / DONE_FILE).read_text())


def main(argv: list[str] | None = None) -> int:
    """One rank: join the job, train, and (rank 0) log metrics to the stage's MLflow run."""
    args = sys.argv[1:] if argv is None else argv
    spec = JobSpec.model_validate_json(Path(args[0]).read_text())
    cfg = PipelineConfig.model_validate(spec.config)
    rank = os.environ.get("RANK", "0")
    level = logging.INFO if rank == "0" else logging.WARNING  # the other ranks' step lines would repeat rank 0's
    logging.basicConfig(level=level, format=f"rank {rank}: %(levelname)s %(name)s: %(message)s")
    par = distributed.init_ranks(cfg.train)
    distributed.keep_faults_for_this_rank(par.rank)
    buffer: MetricBuffer | None = None
    callbacks = TrainCallbacks()
    if par.is_main:
        store.setup_tracking(cfg.tracking, Path(spec.base_dir))
        buffer = MetricBuffer(spec.run_id, flush_every=cfg.tracking.metric_flush_interval)
        callbacks = _main_callbacks(spec.run_id, buffer)
    try:
        train_model(
            cfg.train,
            cfg.model,
            cfg.tokenizer,
            dataset_dir=spec.dataset_dir,
            run_dir=spec.run_dir,
            seed=cfg.seed,
            config_hash=cfg.config_hash(),
            callbacks=callbacks,
            fetch_model=models.download_model,
            parallel=par,
        )
    except StageInterrupted as exc:
        logger.warning("%s", exc)
        return 128 + exc.signum
    finally:
        if buffer is not None:
            buffer.close()
    distributed.leave_ranks()
    return 0


def _main_callbacks(run_id: str, buffer: MetricBuffer) -> TrainCallbacks:
    def on_start(summary: dict[str, Any]) -> None:
        records.log_params(run_id, {f"summary.{k}": v for k, v in summary.items()})
        distributed.emit_progress("start", None, summary)

    def on_metrics(step: int, metrics: dict[str, float]) -> None:
        buffer.add(step, metrics)
        distributed.emit_progress("metrics", step, metrics)

    return TrainCallbacks(on_start=on_start, on_metrics=on_metrics)


if __name__ == "__main__":
    sys.exit(main())
