"""The serving pieces that need no server: request batching, threads per worker, the uvicorn command, the signature."""

from __future__ import annotations

import threading
import time
from typing import Any

import pandas as pd
import pytest

from forgeline.flows.cli.serving import serve_command
from forgeline.tasks.tracking.serving import (
    APP_FACTORY,
    BatchingModel,
    as_prompts,
    serve_environment,
    threads_per_worker,
)


class SlowEcho:
    """A stand-in pyfunc model: answers ``prompt + "|" + str(params)`` after a forward-like pause."""

    metadata = object()

    def __init__(self, seconds: float = 0.1) -> None:
        self.seconds = seconds
        self.calls: list[tuple[Any, dict[str, Any] | None]] = []
        self.active = 0
        self.most_active = 0
        self._lock = threading.Lock()

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        with self._lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            self.calls.append((data, params))
            time.sleep(self.seconds)
            if isinstance(data, list) and "boom" in data:
                raise ValueError("boom is not a prompt")
            if isinstance(data, list):
                return [f"{prompt}|{params}" for prompt in data]
            return {"whole": data}
        finally:
            with self._lock:
                self.active -= 1


def _fire(model: BatchingModel, requests: list[tuple[Any, dict[str, Any] | None]]) -> list[Any]:
    """Send every request from a thread of its own at once; the answers (or exceptions) in order."""
    answers: list[Any] = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def send(i: int) -> None:
        start.wait()
        try:
            answers[i] = model.predict(requests[i][0], params=requests[i][1])
        except Exception as exc:  # noqa: BLE001 - the test compares it
            answers[i] = exc

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return answers


def test_concurrent_requests_share_forwards_and_each_gets_its_own_answer() -> None:
    inner = SlowEcho()
    model = BatchingModel(inner)
    requests = [([f"p{i}a", f"p{i}b"], None) for i in range(8)]
    answers = _fire(model, requests)
    assert answers == [[f"p{i}a|None", f"p{i}b|None"] for i in range(8)]
    # One forward at a time, and fewer forwards than requests: those that waited went in together.
    assert inner.most_active == 1
    assert model.forwards == len(inner.calls) < 8
    assert model.stats() == {"requests": 8, "forwards": len(inner.calls), "waiting": 0}
    assert max(len(data) for data, _ in inner.calls) > 2


def test_clients_sending_back_to_back_stay_in_one_batch() -> None:
    """Answered clients resend a moment after the next forward started: the forward waits for them."""
    inner = SlowEcho()
    model = BatchingModel(inner, wait_ms=1000)
    stop = time.monotonic() + 2.5

    def client(c: int) -> None:
        while time.monotonic() < stop:
            assert model.predict([f"c{c}"]) == [f"c{c}|None"]
            time.sleep(0.005)  # the client's own turnaround

    threads = [threading.Thread(target=client, args=(c,)) for c in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    sizes = [len(data) for data, _ in inner.calls]
    # Without the wait, 4 clients settle into two cohorts of 2 that alternate forever.
    assert max(set(sizes), key=sizes.count) == 4, sizes


def test_requests_with_different_params_never_share_a_forward() -> None:
    inner = SlowEcho()
    model = BatchingModel(inner)
    requests = [([f"p{i}"], {"max_new_tokens": i % 2 + 1}) for i in range(8)]
    answers = _fire(model, requests)
    assert answers == [[f"p{i}|{{'max_new_tokens': {i % 2 + 1}}}"] for i in range(8)]
    for data, params in inner.calls:
        assert {int(prompt[1:]) % 2 + 1 for prompt in data} == {params["max_new_tokens"]}  # type: ignore[index]


def test_a_failing_request_does_not_fail_the_requests_batched_with_it() -> None:
    model = BatchingModel(SlowEcho())
    requests = [(["fine"], None), (["boom"], None), (["also fine"], None), (["fine too"], None)]
    answers = _fire(model, requests)
    assert isinstance(answers[1], ValueError) and "boom" in str(answers[1])
    assert [answers[0], answers[2], answers[3]] == [["fine|None"], ["also fine|None"], ["fine too|None"]]


def test_other_inputs_run_alone_and_keep_their_shape() -> None:
    inner = SlowEcho()
    model = BatchingModel(inner)
    answers = _fire(model, [("one string", None), ({"text": ["x"]}, None), (["a"], None)])
    assert answers[0] == {"whole": "one string"}
    assert answers[1] == {"whole": {"text": ["x"]}}
    assert answers[2] == ["a|None"]


def test_max_batch_caps_the_prompts_per_forward() -> None:
    inner = SlowEcho()
    model = BatchingModel(inner, max_batch=3)
    answers = _fire(model, [([f"p{i}"], None) for i in range(9)])
    assert answers == [[f"p{i}|None"] for i in range(9)]
    assert max(len(data) for data, _ in inner.calls) <= 3


@pytest.mark.parametrize(
    ("data", "prompts"),
    [
        (["a", "b"], ["a", "b"]),
        (pd.DataFrame({0: ["a", "b"]}), ["a", "b"]),
        (pd.DataFrame({"x": ["a"], "y": ["b"]}), None),
        ("a", None),
        ([{"a": "b"}], None),
        ([], None),
    ],
)
def test_as_prompts(data: Any, prompts: list[str] | None) -> None:
    assert as_prompts(data) == prompts


def test_workers_share_the_cores_out() -> None:
    assert threads_per_worker(1, cores=1) == 1
    assert threads_per_worker(1, cores=2) == 1  # one core left to the event loop and the clients
    assert threads_per_worker(4, cores=2) == 1
    assert threads_per_worker(1, cores=16) == 15
    assert threads_per_worker(2, cores=16) == 7
    env = serve_environment("models:/m@champion", workers=2)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == env["FORGELINE_SERVE_THREADS"]
    assert serve_environment("m", workers=1, threads=3)["OMP_NUM_THREADS"] == "3"
    assert env["FORGELINE_SERVE_MODEL_URI"] == "models:/m@champion"


def test_serve_command_runs_the_batching_app_under_uvicorn() -> None:
    cmd = serve_command(host="127.0.0.1", port=5001, workers=2)
    assert cmd[1:5] == ["-m", "uvicorn", "--factory", APP_FACTORY]
    assert cmd[cmd.index("--workers") + 1] == "2" and cmd[cmd.index("--port") + 1] == "5001"


def test_signature_params_schema_carries_the_generation_defaults() -> None:
    from forgeline.tasks.tracking.models import GENERATION_PARAMS, generation_defaults, generation_signature

    defaults = generation_defaults(64)
    assert defaults["max_new_tokens"] == 32
    schema = generation_signature(defaults).params  # type: ignore[attr-defined]
    assert [p.name for p in schema.params] == list(GENERATION_PARAMS)
    assert {p.name: p.default for p in schema.params} == {name: defaults[name] for name in GENERATION_PARAMS}
    assert {p.name: p.dtype.name for p in schema.params} == {
        "max_new_tokens": "long",
        "temperature": "double",
        "top_k": "long",
        "do_sample": "boolean",
    }


class _Pipeline:
    def __init__(self, positions: int) -> None:
        from forgeline.tasks.config import TokenizerConfig
        from forgeline.tasks.data.tokenization import build_tokenizer

        self.tokenizer = build_tokenizer(TokenizerConfig(kind="char"), ["abcdefgh \n"])
        self.model = type("Model", (), {"config": type("Config", (), {"n_positions": positions})()})()


class _Generator(SlowEcho):
    """A text generator with 16 positions whose logged default is 8 new tokens."""

    model_config = {"max_new_tokens": 8}  # noqa: RUF012

    def __init__(self) -> None:
        super().__init__(0.0)

    def get_raw_model(self) -> _Pipeline:
        return _Pipeline(16)


def test_a_request_that_would_run_past_the_models_positions_is_refused_in_one_line() -> None:
    from mlflow.exceptions import MlflowException

    model = _Generator()
    serving = BatchingModel(model, wait_ms=0)
    assert serving.predict(["abcd"], {"max_new_tokens": 12}) == ["abcd|{'max_new_tokens': 12}"]  # 4 + 12 = 16 fits
    with pytest.raises(
        MlflowException, match=r"prompt of 10 tokens plus max_new_tokens 7 .* 16 positions: ask for at most 6"
    ):
        serving.predict(["abcd", "abcdefgh\n "], {"max_new_tokens": 7})
    with pytest.raises(MlflowException, match="max_new_tokens 8 .*: ask for at most 6"):  # the logged default
        serving.predict("abcdefgh\n ", None)
    with pytest.raises(MlflowException, match="shorten the prompt"):
        serving.predict(["abcdefgh" * 2], {"max_new_tokens": 1})
    assert len(model.calls) == 1  # nothing refused reached the model
    assert BatchingModel(SlowEcho(0.0)).room is None  # another flavor: not checked
