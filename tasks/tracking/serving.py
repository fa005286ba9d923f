"""The app behind ``forgeline serve``: MLflow's scoring server around a model that batches concurrent requests.

MLflow's own server (``mlflow models serve``) runs each request's ``predict`` in a thread of its own: eight
clients mean eight forwards at once, each with as many torch threads as there are cores, fighting over them.
Here the same FastAPI app (:func:`mlflow.pyfunc.scoring_server.init`: same routes, parsing, errors and
answers) gets a :class:`BatchingModel` instead of the pyfunc model. Its one inference thread runs one forward
at a time; requests that arrive meanwhile wait in a queue and go into the next forward together (one
``predict`` per group of equal ``params``, a list of prompts padded into one batch). Each worker process uses
``cores // workers`` torch threads.

A text classifier (logged as ``text-classification``) is served the same way: its answer is a frame of
``label`` and ``score`` per text, split between the requests of a shared forward row by row. It takes no
``params``: a request that sends some (``max_new_tokens``...) is refused with a 400 naming them, where
``mlflow models serve`` would drop them with a logged warning and answer as if they were not there.

uvicorn builds the app in every worker with :func:`create_app`, which reads its settings from the
``FORGELINE_SERVE_*`` environment variables that :func:`serve_environment` writes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from forgeline.tasks.errors import first_line
from forgeline.tasks.tracking.serving_input import (
    DEFAULT_MAX_PROMPTS,
    GenerationRoom,
    InputGuard,
    check_params,
    check_size,
    refuse,
    request_texts,
)

logger = logging.getLogger(__name__)

ENV_MODEL_URI = "FORGELINE_SERVE_MODEL_URI"
ENV_THREADS = "FORGELINE_SERVE_THREADS"
ENV_MAX_BATCH = "FORGELINE_SERVE_MAX_BATCH"
ENV_WAIT_MS = "FORGELINE_SERVE_BATCH_WAIT_MS"
ENV_MAX_PROMPTS = "FORGELINE_SERVE_MAX_PROMPTS"
APP_FACTORY = "forgeline.tasks.tracking.serving:create_app"

DEFAULT_MAX_BATCH = 32
"""Prompts per forward at most (the rest wait for the next one)."""
DEFAULT_WAIT_MS = 50.0
"""The longest a forward waits for the requests it expects (see :class:`BatchingModel`)."""


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity call
        return os.cpu_count() or 1


def threads_per_worker(workers: int, cores: int | None = None) -> int:
    """Torch threads per worker process: the cores but one, shared out between the workers (at least one).

    One core is left to the event loops, the clients and everything else on the machine. A forward's torch
    threads meet at a barrier after every op, so one of them losing its core stalls them all: on 2 busy
    cores a small model's request took 4 to 15 times longer with 2 threads than with 1 (BENCHMARKS.md).
    """
    return max(1, ((cores or usable_cores()) - 1) // max(1, workers))


def serve_environment(
    uri: str,
    *,
    workers: int,
    threads: int | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    wait_ms: float = DEFAULT_WAIT_MS,
    max_prompts: int = DEFAULT_MAX_PROMPTS,
) -> dict[str, str]:
    """Environment variables for the server processes: the model, thread counts, batching settings.

    ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` size the thread pools before torch starts them; :func:`create_app`
    also calls ``torch.set_num_threads`` with the same count.

    Args:
        uri: The model to serve.
        workers: Worker processes.
        threads: Torch threads per worker (default: :func:`threads_per_worker`).
        max_batch: Prompts per forward at most.
        wait_ms: The longest a forward waits for more requests.
        max_prompts: Prompts per request at most (more: HTTP 400).
    """
    threads = str(threads or threads_per_worker(workers))
    return {
        ENV_MODEL_URI: uri,
        ENV_THREADS: threads,
        ENV_MAX_BATCH: str(max_batch),
        ENV_WAIT_MS: str(wait_ms),
        ENV_MAX_PROMPTS: str(max_prompts),
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "TOKENIZERS_PARALLELISM": "false",
    }


def as_prompts(data: Any) -> list[str] | None:
    """The prompts of a parsed request when it is a plain list of strings (or a one-column frame of them).

    ``None`` for anything else (a single string, dicts, several columns): such a request runs on its own, so
    its answer keeps exactly the shape MLflow gives it.
    """
    from mlflow.exceptions import MlflowException

    if not _batchable(data):
        return None
    try:
        return list(request_texts(data))
    except MlflowException:  # not a list of strings
        return None


def _batchable(data: Any) -> bool:
    """Whether a request's answer is one output per prompt (a list), so it may share a forward with others."""
    return not isinstance(data, str | dict) and getattr(data, "ndim", 1) != 0


@dataclass
class _Request:
    data: Any
    params: dict[str, Any] | None
    prompts: list[str] | None
    future: Future[Any] = field(default_factory=Future)

    @property
    def key(self) -> str | None:
        """Requests with the same key may share a forward (``None``: never shared)."""
        if self.prompts is None:
            return None
        return json.dumps(self.params or {}, sort_keys=True, default=str)


class BatchingModel:
    """A pyfunc model whose ``predict`` calls from many threads run one at a time, batched where they can be.

    ``predict`` puts the request on a queue and waits; one inference thread takes everything queued (up to
    ``max_batch`` prompts), groups it by ``params`` and calls the wrapped model's ``predict`` once per group
    with all the group's prompts. When a shared call fails or answers with the wrong number of outputs, each
    request of the group is run again on its own, so one bad request never fails its neighbours.

    Clients that got their answers from one forward send their next requests a few milliseconds after the
    next forward has started, so without waiting they would split into cohorts that never meet. When recent
    forwards saw several requests (served, or queued while they ran), the thread waits for as many as the
    busiest of them saw, for at most a quarter of the last forward's time and ``wait_ms``. A lone client
    never waits.

    Args:
        model: The loaded ``PyFuncModel`` (anything with ``predict(data, params=...)`` and ``metadata``).
        max_batch: Prompts per forward at most.
        wait_ms: The longest wait for more requests before a forward (0: take only what is queued).
        takes_params: Whether requests may send ``params`` (not for a classifier: see :func:`takes_params`).
        max_prompts: Prompts per request at most: one request must not hold the forward for everyone.
    """

    def __init__(
        self,
        model: Any,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        wait_ms: float = DEFAULT_WAIT_MS,
        takes_params: bool = True,
        max_prompts: int = DEFAULT_MAX_PROMPTS,
    ) -> None:
        self.model = model
        self.max_prompts = max(1, max_prompts)
        self.known_params = _param_names(model) if takes_params else None
        self.metadata = model.metadata
        self.takes_params = takes_params
        self.room = GenerationRoom.of(model) if takes_params else None
        self.max_batch = max(1, max_batch)
        self.wait_s = max(0.0, wait_ms) / 1000
        self._recent: deque[int] = deque([1], maxlen=16)  # requests seen per forward: the expected concurrency
        self._last_forward_s = 0.0
        self.requests = 0
        """Requests taken off the queue so far (only the inference thread counts)."""
        self.forwards = 0
        """``predict`` calls on the wrapped model so far."""
        self._queue: queue.Queue[_Request] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="forgeline-inference", daemon=True)
        self._thread.start()

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        """Predict ``data`` with ``params`` (blocks until its batch has run; raises what the model raised).

        A request of another shape, too big, or with bad ``params`` is refused in one line before it queues.
        """
        texts = request_texts(data)
        if isinstance(data, str) and type(data) is not str:  # a numpy string ("inputs": "x"): plain for the model
            data = str(data)
        if not self.takes_params and isinstance(params, dict) and params:
            refuse_params(params)
        check_params(params, self.known_params)
        check_size(texts, self.max_prompts, self.room.max_chars if self.room is not None else None)
        if self.room is not None:
            self.room.check(texts, params)
        request = _Request(data, params, list(texts) if _batchable(data) else None)
        self._queue.put(request)
        return request.future.result()

    def stats(self) -> dict[str, int]:
        """This worker's requests and forwards so far (``GET /batching``): fewer forwards than requests is batching."""
        return {"requests": self.requests, "forwards": self.forwards, "waiting": self._queue.qsize()}

    def _take(self) -> list[_Request]:
        batch = [self._queue.get()]
        size = len(batch[0].prompts or [None])
        expected = max(self._recent)
        deadline = time.monotonic() + min(self.wait_s, self._last_forward_s / 4)
        while size < self.max_batch:
            try:
                timeout = deadline - time.monotonic()
                if len(batch) < expected and timeout > 0:
                    request = self._queue.get(timeout=timeout)
                else:
                    request = self._queue.get_nowait()
            except queue.Empty:
                break
            batch.append(request)
            size += len(request.prompts or [None])
        self.requests += len(batch)
        return batch

    def _loop(self) -> None:
        while True:
            groups: dict[str | None, list[_Request]] = {}
            alone: list[_Request] = []
            batch = self._take()
            start = time.monotonic()
            for request in batch:
                key = request.key
                (alone.append(request) if key is None else groups.setdefault(key, []).append(request))
            for group in groups.values():
                self._run_group(group)
            for request in alone:
                self._run_one(request)
            self._last_forward_s = time.monotonic() - start
            # Those served plus those that queued meanwhile: how many clients are about. Counting only the
            # served would let clients that split into two cohorts stay split.
            self._recent.append(len(batch) + self._queue.qsize())

    def _call(self, data: Any, params: dict[str, Any] | None) -> Any:
        self.forwards += 1
        return self.model.predict(data, params=params)

    def _run_one(self, request: _Request) -> None:
        try:
            request.future.set_result(self._call(request.data, request.params))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting request thread
            request.future.set_exception(exc)

    def _run_group(self, group: list[_Request]) -> None:
        if len(group) == 1:
            self._run_one(group[0])
            return
        prompts = [prompt for request in group for prompt in request.prompts or []]
        try:
            outputs = self._call(prompts, group[0].params)
        except Exception:  # noqa: BLE001 - retried one by one below, so each request gets its own error
            logger.debug("a batch of %d requests failed; running them one by one", len(group), exc_info=True)
            outputs = None
        if not _splittable(outputs, len(prompts)):
            for request in group:
                self._run_one(request)
            return
        logger.debug("one forward for %d requests (%d prompts)", len(group), len(prompts))
        start = 0
        for request in group:
            count = len(request.prompts or [])
            request.future.set_result(_rows(outputs, start, start + count))
            start += count


def _splittable(outputs: Any, count: int) -> bool:
    # A list (generated texts) or a frame (a classifier's label and score per text), one entry per prompt.
    is_frame = hasattr(outputs, "iloc") and hasattr(outputs, "columns")
    return (isinstance(outputs, list) or is_frame) and len(outputs) == count


def _rows(outputs: Any, start: int, stop: int) -> Any:
    if isinstance(outputs, list):
        return outputs[start:stop]
    return outputs.iloc[start:stop].reset_index(drop=True)


def takes_params(model: Any) -> bool:
    """Whether a loaded pyfunc model's requests may carry ``params`` (a text classifier's may not)."""
    flavor = (getattr(model.metadata, "flavors", None) or {}).get("transformers") or {}
    return flavor.get("task") != "text-classification"


def refuse_params(params: dict[str, Any]) -> None:
    """Refuse a request's ``params`` in one line (answered with HTTP 400).

    Raises:
        MlflowException: always.
    """
    names = ", ".join(sorted(str(name)[:40] for name in params)[:8])
    refuse(f'this model is a text classifier and takes no params (got {names}); send {{"inputs": [...]}} only')


def _param_names(model: Any) -> tuple[str, ...] | None:
    """The params a model's signature takes (``None``: no params schema, so no name is refused here)."""
    try:
        schema = model.metadata.get_params_schema()
    except Exception:  # noqa: BLE001 - a stand-in or a model without a signature
        return None
    return tuple(param.name for param in schema.params) if schema is not None else None


def check_servable(uri: str) -> None:
    """Check, from its ``MLmodel`` file only, that ``uri`` is a model MLflow's scoring server can load.

    Raises:
        ValueError: In one line, when the model cannot be found or has no ``python_function`` flavor.
    """
    from mlflow.models import Model

    try:
        model = Model.load(uri)
    except Exception as exc:  # noqa: BLE001 - a bad run id, a folder without MLmodel, an unreachable store
        raise ValueError(f"{uri} is not a model MLflow can serve: {first_line(exc)}") from exc
    if "python_function" not in (model.flavors or {}):
        raise ValueError(f"{uri} has no python_function flavor, so MLflow's scoring server cannot load it")


def create_app() -> Any:
    """The FastAPI app for one uvicorn worker (reads the ``FORGELINE_SERVE_*`` settings)."""
    import mlflow
    import torch
    from mlflow.pyfunc import scoring_server

    uri = os.environ[ENV_MODEL_URI]
    threads = int(os.environ.get(ENV_THREADS) or threads_per_worker(1))
    max_batch = int(os.environ.get(ENV_MAX_BATCH) or DEFAULT_MAX_BATCH)
    torch.set_num_threads(threads)
    # With a params schema MLflow fills every param, so each request would log that params override the config.
    logging.getLogger("mlflow.transformers").addFilter(_QuietParamsOverride())
    model = load_for_serving(mlflow, uri, max_batch)
    logger.info("serving %s: %d torch threads, up to %d prompts per forward", uri, threads, max_batch)
    wait_ms = float(os.environ.get(ENV_WAIT_MS) or DEFAULT_WAIT_MS)
    max_prompts = int(os.environ.get(ENV_MAX_PROMPTS) or DEFAULT_MAX_PROMPTS)
    batching = BatchingModel(
        model, max_batch=max_batch, wait_ms=wait_ms, takes_params=takes_params(model), max_prompts=max_prompts
    )
    app = scoring_server.init(batching)
    app.get("/batching")(batching.stats)
    return RequestThreads(InputGuard(app), max_batch + 4)


class RequestThreads:
    """An ASGI app with enough threads for a full batch of waiting requests.

    MLflow's app hands each ``predict`` to the event loop's default executor, which has ``cores + 4``
    threads: on 2 cores at most 6 requests could wait for a forward, so 8 clients never shared one.
    """

    def __init__(self, app: Any, threads: int) -> None:
        self.app = app
        self.threads = threads
        self._ready = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if not self._ready:  # the first call (uvicorn's lifespan start) runs inside the server's event loop
            asyncio.get_running_loop().set_default_executor(
                ThreadPoolExecutor(self.threads, thread_name_prefix="forgeline-request")
            )
            self._ready = True
        await self.app(scope, receive, send)


class _QuietParamsOverride(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "will override the inference configuration" not in record.getMessage()


def load_for_serving(mlflow: Any, uri: str, max_batch: int) -> Any:
    """``pyfunc.load_model`` with the pipeline's ``batch_size`` raised to ``max_batch`` where the model allows.

    A model logged before its config had ``batch_size`` (pyfunc lets load time override only logged keys)
    still serves, one prompt per forward, but still one forward at a time.
    """
    model = mlflow.pyfunc.load_model(uri, model_config={"batch_size": max_batch})
    if (model.model_config or {}).get("batch_size") != max_batch:
        logger.warning("%s was logged without a batch_size: each prompt gets a forward of its own", uri)
    return model
