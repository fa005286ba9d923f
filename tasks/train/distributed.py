"""Data-parallel training: what each torchrun rank does differently, and how the train stage launches them.

One process per rank. Every rank draws its own windows (its batch generator is seeded by rank), gradients
are averaged by ``DistributedDataParallel`` (``no_sync`` on all but the last micro-batch of a step), so one
optimizer step sees ``batch_size x grad_accum_steps x world_size`` sequences. Rank 0 alone writes
checkpoints (the unwrapped model: a single process loads them), the metric journal and the finished model,
and reports progress. Free of Prefect and MLflow like the rest of ``tasks/train``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from forgeline.tasks.config import TrainConfig

logger = logging.getLogger(__name__)

RANK_SEED_STRIDE = 1_000_003
"""Rank ``r`` seeds its batch generator with ``seed + r * RANK_SEED_STRIDE`` (rank 0: ``seed``, as one process)."""
PROGRESS_PREFIX = "forgeline-progress "
"""Rank 0's progress lines on stdout start with this, then one JSON object."""
SPEC_FILE = "distributed-job.json"
"""What the ranks train, written by the launching process into the run folder."""
FAULT_RANK_ENV = "FORGELINE_FAULT_RANK"
"""Tests: the only rank that keeps the ``FORGELINE_FAULT_*`` variables (the others drop them)."""
EXIT_GRACE_S = 60.0
"""How long the launcher waits for torchrun after its output closes, and after forwarding a stop signal."""


def resolve_nproc(cfg: TrainConfig) -> int:
    """Processes per machine: ``auto`` is one per visible GPU (1 on CPU-only machines or with ``device: cpu``)."""
    if cfg.nproc_per_node != "auto":
        return int(cfg.nproc_per_node)
    if cfg.device == "cpu" or not torch.cuda.is_available():
        return 1
    return max(1, torch.cuda.device_count())


def world_size(cfg: TrainConfig) -> int:
    """Ranks in the whole job: processes per machine x machines."""
    return resolve_nproc(cfg) * cfg.nnodes


def rank_seed(seed: int, rank: int) -> int:
    """The batch generator's seed of ``rank``: distinct per rank, and rank 0's equals a one-process run's."""
    return seed + rank * RANK_SEED_STRIDE


def global_batch(cfg: TrainConfig, ranks: int) -> int:
    """Sequences per optimizer step over all ranks."""
    return cfg.batch_size * cfg.grad_accum_steps * ranks


@dataclass
class Parallel:
    """This process's place in the job; the default is a single process (every method then a no-op)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    _ddp: Any = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes and reports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """``model`` in ``DistributedDataParallel`` when there are several ranks (rank 0's weights win)."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index if device.index is not None else self.local_rank] if device.type == "cuda" else None
        # No buffers change while training (no batch norm): skip the per-forward broadcast.
        self._ddp = DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
        return self._ddp

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        """Gradients stay local (``no_sync``) until the step's last micro-batch, whose backward averages them."""
        if self._ddp is None or last:
            return contextlib.nullcontext()
        return self._ddp.no_sync()

    def agree(self, loss_sum: torch.Tensor, micro_batches: int, stopping: bool) -> tuple[float, bool]:
        """The step's mean loss over all ranks, and whether any rank was asked to stop.

        Every rank decides from the same two numbers, so all skip a non-finite step, checkpoint and stop
        at the same step (a rank that stopped alone would leave the others waiting in a collective).
        """
        if not self.distributed:
            return (loss_sum / micro_batches).item(), stopping
        both = torch.stack([loss_sum.detach().float(), torch.tensor(float(stopping), device=loss_sum.device)])
        torch.distributed.all_reduce(both)
        return (both[0] / (micro_batches * self.world_size)).item(), bool(both[1].item() > 0)

    def reseed(self, gen: torch.Generator, seed: int, step: int) -> None:
        """A non-zero rank's draw after a resume: the checkpoint holds rank 0's generator only."""
        gen.manual_seed(rank_seed(seed, self.rank) + step)


def init_ranks(cfg: TrainConfig) -> Parallel:
    """Join the torchrun job this process was started in (``RANK``/``WORLD_SIZE`` set): gloo on CPU, nccl on CUDA."""
    from forgeline.tasks.train.batches import resolve_device

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if resolve_device(cfg).type == "cuda":
        torch.cuda.set_device(local)  # before any CUDA tensor: torch.device("cuda") is now this rank's GPU
        backend = "nccl"
    else:
        backend = "gloo"
    torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.dist_timeout_s))
    logger.info("rank %d of %d (local %d) joined with %s", rank, size, local, backend)
    return Parallel(rank=rank, world_size=size, local_rank=local)


def leave_ranks() -> None:
    """Leave the process group (after a finished run; a failing rank just exits)."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def keep_faults_for_this_rank(rank: int) -> None:
    """Tests arm one rank with ``FORGELINE_FAULT_RANK``; every other rank drops the fault variables."""
    chosen = os.environ.get(FAULT_RANK_ENV)
    if chosen is not None and int(chosen) != rank:
        for name in [n for n in os.environ if n.startswith("FORGELINE_FAULT_")]:
            del os.environ[name]


def emit_progress(kind: str, step: int | None, payload: dict[str, Any]) -> None:
    """Rank 0: one progress line on stdout for the launching process (``kind``: ``start`` or ``metrics``)."""
    line = json.dumps({"kind": kind, "step": step, "data": payload}, default=str)
    sys.stdout.write(PROGRESS_PREFIX + line + "\n")
    sys.stdout.flush()


def torchrun_command(cfg: TrainConfig, spec_path: Path, run_id: str) -> list[str]:
    """The ``python -m torch.distributed.run`` command of this job (on this machine)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={resolve_nproc(cfg)}"]
    if cfg.nnodes > 1:
        cmd += [
            f"--nnodes={cfg.nnodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={cfg.rdzv_endpoint}",
            f"--rdzv-id={run_id}",
        ]
    else:
        cmd.append("--standalone")
    # One dead rank ends the job: no restarts, and the agent stops the others.
    cmd += ["--max-restarts=0", "-m", "forgeline.flows.distributed", str(spec_path)]
    return cmd


class RanksFailed(RuntimeError):
    """The torchrun job ended with an error (a rank died or raised); its checkpoints are kept."""


def launch(
    cmd: list[str],
    *,
    on_progress: Callable[[str, int | None, dict[str, Any]], None],
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> tuple[int, int | None]:
    """Run torchrun and wait for it: rank 0's progress lines go to ``on_progress``, the rest to the log.

    SIGTERM or SIGINT sent to this process is passed on to torchrun, which passes it to every rank: they
    agree on the step, rank 0 checkpoints, and all stop.

    Returns:
        torchrun's exit code, and the signal this process was stopped by (``None`` when it was not).
    """
    logger.info("launching: %s", " ".join(cmd))
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=cwd,
        start_new_session=True,  # a terminal's Ctrl-C reaches us once; we forward it once
        preexec_fn=_stop_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509 - no threads yet there
    )
    stopped: list[int] = []
    with _forward_stops(proc, stopped):
        assert proc.stdout is not None
        for line in _lines(proc.stdout):
            if line.startswith(PROGRESS_PREFIX):
                item = json.loads(line[len(PROGRESS_PREFIX) :])
                on_progress(item["kind"], item["step"], item["data"])
            else:
                logger.info("[torchrun] %s", line)
        try:
            code = proc.wait(timeout=EXIT_GRACE_S)
        except subprocess.TimeoutExpired:
            logger.error("torchrun did not exit %.0f s after its output closed; killing it", EXIT_GRACE_S)
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
    return code, (stopped[0] if stopped else None)


def _stop_with_parent() -> None:
    # Our death (even SIGKILL) sends torchrun SIGTERM: no ranks left writing after the lineage lock is gone.
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))


def _lines(stream: Any) -> Iterator[str]:
    for raw in stream:
        yield raw.rstrip("\n")


@contextlib.contextmanager
def _forward_stops(proc: subprocess.Popen[str], stopped: list[int]) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _forward(signum: int, _frame: object) -> None:
        stopped.append(signum)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)  # torchrun passes it to every rank
        # A rank that never answers must not keep this process forever.
        timer = threading.Timer(EXIT_GRACE_S * 2, _kill_group, args=(proc,))
        timer.daemon = True
        timer.start()

    for sig in previous:
        signal.signal(sig, _forward)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
