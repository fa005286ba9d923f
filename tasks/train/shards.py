"""Data parallelism inside one CPU process: each batch cut into shards that run at once, one thread each.

On a CPU, PyTorch spreads every op over its intra-op threads and waits for all of them at the op's end. A
small model's ops are short (nanoGPT's Shakespeare-char model multiplies 768 x 128 matrices), so a step is a
few hundred of those barriers, and one slow core holds up the other at each (on the 2-core machine one
process's 2-thread step ran at 33 or 46 ms, by the minute). Shards take the barrier away: each runs its
slice of the batch through forward and backward on its own thread with its share of the intra-op threads,
and they meet once, when the step's gradients are summed (the same machine: 33-36 ms, steady;
BENCHMARKS.md section 2).

What is learned does not change: the same batches are drawn (on the caller's thread, from the run's
generator), each shard's loss is weighted by its share of the batch, so the shards' gradients add up to the
whole batch's mean, and they are added in shard order on the caller's thread, so a run is as deterministic
as without shards. Matrix sums over half the rows round differently, so losses match an unsharded run to
float precision, not bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

MAX_AUTO_SHARDS = 2
"""``auto`` uses at most this many: each shard's Python runs under the GIL, so more shards wait on it."""


def plan_shards(
    setting: int | str,
    *,
    device: torch.device,
    batch_size: int,
    compiled: bool,
    distributed: bool,
    random: bool = False,
) -> int:
    """How many shards a step of ``batch_size`` windows runs in (1: no shards, the step as usual).

    ``auto`` shards on a CPU with at least 2 intra-op threads, a batch of at least 2, no ``torch.compile``
    (a compiled function is not called from several threads), one process (ranks already split the batch)
    and a forward that draws no random numbers; a number is used as given, at most one shard a window, under
    the same conditions but the thread count.

    Args:
        setting: ``train.cpu_shards``: ``auto`` or a count of at least 1.
        device: Where the step runs; shards are for the CPU only.
        batch_size: Windows in one micro-batch.
        compiled: Whether the loss function is compiled.
        distributed: Whether this is one rank of several.
        random: Whether the forward draws random numbers (dropout, :func:`draws_random`): shards would draw
            them from the one global generator in whichever order their threads run, and a resumed run would
            no longer repeat an uninterrupted one bit for bit.
    """
    if device.type != "cpu" or compiled or distributed or batch_size < 2:
        return 1
    if random:
        if setting != "auto" and int(setting) > 1:
            logger.info(
                "train.cpu_shards=%s not used: the model has dropout, which shards would make irreproducible", setting
            )
        return 1
    if setting == "auto":
        return max(1, min(MAX_AUTO_SHARDS, torch.get_num_threads(), batch_size))
    return max(1, min(int(setting), batch_size))


_DROPOUTS = (
    torch.nn.Dropout,
    torch.nn.Dropout1d,
    torch.nn.Dropout2d,
    torch.nn.Dropout3d,
    torch.nn.AlphaDropout,
    torch.nn.FeatureAlphaDropout,
)


def draws_random(model: torch.nn.Module) -> bool:
    """Whether training ``model`` draws random numbers in its forward: a dropout module with ``p > 0``.

    A config's ``model.dropout`` does not say it for a pretrained model (GPT-2's own config has 0.1).
    """
    return any(isinstance(m, _DROPOUTS) and m.p > 0 for m in model.modules())


def split_rows(n: int, shards: int) -> list[slice]:
    """``shards`` contiguous slices of ``range(n)``, sizes differing by at most one, none empty."""
    shards = max(1, min(shards, n))
    base, extra = divmod(n, shards)
    out, start = [], 0
    for i in range(shards):
        stop = start + base + (1 if i < extra else 0)
        out.append(slice(start, stop))
        start = stop
    return out


class Shards:
    """A pool of ``count`` threads, each with ``threads_each`` intra-op threads, for one training run.

    Use as a context manager (the threads end with it). With ``count`` 1 nothing runs on other threads.
    """

    def __init__(self, count: int, threads_each: int | None = None) -> None:
        self.count = max(1, count)
        total = torch.get_num_threads()
        self.threads_each = threads_each or max(1, total // self.count)
        self._pool: ThreadPoolExecutor | None = None
        self._caller_threads = total
        if self.count > 1:
            self._pool = ThreadPoolExecutor(
                self.count,
                thread_name_prefix="forgeline-shard",
                initializer=torch.set_num_threads,
                initargs=(self.threads_each,),
            )
            logger.info("%d shards a step, %d intra-op threads each", self.count, self.threads_each)

    def __enter__(self) -> Shards:
        # The calling thread's own intra-op threads would spin between its small ops (the optimizer step, the
        # gradient norm) on the cores the shards need: it keeps one while the shards run (measured: a spinning
        # pool thread took a quarter of a core and the step ran 45 ms instead of 34).
        if self._pool is not None:
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the threads (waits for running work) and give the calling thread its intra-op threads back."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
            torch.set_num_threads(self._caller_threads)

    def groups(self, items: Sequence[T]) -> list[Sequence[T]]:
        """``items`` cut into at most ``count`` contiguous groups, one for each shard."""
        return [items[part] for part in split_rows(len(items), self.count)] if items else []

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``[fn(item) for item in items]``, the items run on the shards' threads at once; results in order."""
        if self._pool is None or len(items) < 2:
            return [fn(item) for item in items]
        return list(self._pool.map(fn, items))

    def backward(
        self,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        params: Sequence[torch.nn.Parameter],
        *,
        divisor: int = 1,
        context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Forward and backward of ``loss_fn(x, y) / divisor`` in shards; gradients added to ``params``' ``.grad``.

        Args:
            loss_fn: The mean loss of a batch.
            x: Inputs ``(B, ...)``, cut along the first dimension.
            y: Targets, cut the same way.
            params: The parameters whose gradients to accumulate (each once, tied weights included).
            divisor: Divides the loss before its backward (``grad_accum_steps``).
            context: Entered on each shard's thread around the forward (autocast is per thread).
            transform: Applied to each shard's loss before its backward (the NaN fault point).

        Returns:
            The batch's mean loss (unscaled, detached): the shards' losses weighted by their share.
        """
        total = int(x.shape[0])
        rows = split_rows(total, self.count)

        def loss_of(part: slice) -> torch.Tensor:
            with context():
                loss = loss_fn(x[part], y[part])
            return loss if transform is None else transform(loss)

        if len(rows) == 1:  # through backward(): DistributedDataParallel's hooks run on it
            loss = loss_of(rows[0])
            (loss / divisor).backward()
            return loss.detach()

        def one(part: slice) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
            weight = (part.stop - part.start) / total
            loss = loss_of(part)
            grads = torch.autograd.grad(loss * weight / divisor, params, allow_unused=True)
            return loss.detach() * weight, grads

        results = self.map(one, rows)
        _add_grads(params, [grads for _, grads in results])
        return torch.stack([loss for loss, _ in results]).sum()


def _add_grads(params: Sequence[torch.nn.Parameter], per_shard: list[tuple[torch.Tensor | None, ...]]) -> None:
    # In shard order on this thread: the same sum every run, whichever shard finished first.
    for i, param in enumerate(params):
        total: torch.Tensor | None = None
        for grads in per_shard:
            g = grads[i]
            if g is not None:
                total = g if total is None else total.add_(g)
        if total is None:
            continue
        if param.grad is None:
            param.grad = total
        else:
            param.grad.add_(total)


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that take gradients, each once (tied weights appear once in ``parameters()``)."""
    return [p for p in model.parameters() if p.requires_grad]
