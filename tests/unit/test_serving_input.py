"""Bad requests to ``forgeline serve`` get one line and a 400 before they reach the model (no server needed)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import scoring_server
from typer.testing import CliRunner

from forgeline.tasks.tracking.serving import BatchingModel, check_servable, takes_params
from forgeline.tasks.tracking.serving_input import MAX_REQUEST_CHARS, check_params, quote, request_texts


class Generator:
    """A stand-in text generator with 16 positions (a char tokenizer) and the real params schema."""

    def __init__(self) -> None:
        from mlflow.models import ModelSignature
        from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

        from forgeline.tasks.config import TokenizerConfig
        from forgeline.tasks.data.tokenization import build_tokenizer

        self.calls: list[Any] = []
        self.tokenized: list[str] = []
        tokenizer = build_tokenizer(TokenizerConfig(kind="char"), ["abcdefgh \n"])
        original = tokenizer.__call__

        def counting(text: str, **kwargs: Any) -> Any:
            self.tokenized.append(text)
            return original(text, **kwargs)

        self._pipeline = SimpleNamespace(
            tokenizer=_Callable(counting, tokenizer.get_vocab),
            model=SimpleNamespace(config=SimpleNamespace(n_positions=16)),
        )
        params = ParamSchema(
            [
                ParamSpec("max_new_tokens", "long", 8),
                ParamSpec("temperature", "double", 1.0),
                ParamSpec("top_k", "long", 50),
                ParamSpec("do_sample", "boolean", True),
            ]
        )
        signature = ModelSignature(Schema([ColSpec("string")]), Schema([ColSpec("string")]), params)
        self.metadata = SimpleNamespace(
            flavors={"transformers": {"task": "text-generation"}},
            get_params_schema=lambda: signature.params,
            get_input_schema=lambda: None,
        )
        self.model_config = {"max_new_tokens": 8}

    def get_raw_model(self) -> Any:
        return self._pipeline

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        self.calls.append(data)
        data = data.tolist() if isinstance(data, np.ndarray) else data
        return [f"{text}!" for text in data] if isinstance(data, list) else [f"{data}!"]


class _Callable:
    def __init__(self, call: Any, get_vocab: Any) -> None:
        self._call = call
        self.get_vocab = get_vocab

    def __call__(self, text: str, **kwargs: Any) -> Any:
        return self._call(text, **kwargs)


class Classifier:
    metadata = SimpleNamespace(flavors={"transformers": {"task": "text-classification"}})

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        self.calls.append(data)
        return pd.DataFrame({"label": ["a"] * len(data), "score": [0.5] * len(data)})


def _serve(inner: Any, **kwargs: Any) -> BatchingModel:
    return BatchingModel(inner, wait_ms=0, takes_params=takes_params(inner), **kwargs)


def _http(model: BatchingModel, body: Any) -> tuple[int, dict[str, Any]]:
    """The answer MLflow's scoring server gives ``body``: its own parsing, ``invocations`` and error handling."""
    try:
        answer = scoring_server.invocations(json.dumps(body), "application/json", model, None)
    except MlflowException as exc:
        return exc.get_http_status_code(), json.loads(exc.serialize_as_json())
    return answer.status, json.loads(answer.response)


def _assert_refused(model: BatchingModel, body: Any, pattern: str) -> str:
    status, answer = _http(model, body)
    assert status == 400, answer
    message = answer["message"]
    assert "stack_trace" not in answer and "\n" not in message and len(message) < 300, answer
    assert pattern in message, message
    return message


def test_a_huge_prompt_is_refused_before_it_is_tokenized_and_never_echoed() -> None:
    inner = Generator()
    model = _serve(inner)
    longest = max(len(token) for token in inner.get_raw_model().tokenizer.get_vocab())
    assert model.room is not None and model.room.max_chars == 16 * longest
    start = time.monotonic()
    message = _assert_refused(model, {"inputs": ["x" * 3_000_000]}, "more than the model's context can hold")
    assert time.monotonic() - start < 2 and inner.tokenized == [] and "xxxxxxxx" not in message
    # Under the bound it is tokenized and refused on its tokens, still without the prompt in the message.
    message = _assert_refused(model, {"inputs": ["abcdefgh" * 2]}, "shorten the prompt")
    assert "abcdefgh" not in message and not message.startswith("Failed to predict")
    assert inner.calls == []


@pytest.mark.parametrize(
    ("inputs", "pattern"),
    [
        ([["x" * 40]], "(got a 2-D array"),
        ([[["x"]]], "(got a 3-D array"),
        ([], "empty list"),
        ({"a": ["x"], "b": ["y"]}, "(got a dict with 2 keys)"),
    ],
)
def test_every_other_input_shape_is_refused_in_one_line(inputs: Any, pattern: str) -> None:
    for inner in (Generator(), Classifier()):
        _assert_refused(_serve(inner), {"inputs": inputs}, pattern)
        assert inner.calls == []


def test_a_two_column_frame_is_refused_and_a_one_column_frame_is_served() -> None:
    inner = Generator()
    model = _serve(inner)
    split = {"columns": ["a", "b"], "data": [["x" * 40, "y"]]}
    _assert_refused(model, {"dataframe_split": split}, "(got 2 columns)")
    status, answer = _http(model, {"dataframe_split": {"columns": ["a"], "data": [["ab"]]}})
    assert status == 200 and len(inner.calls) == 1, answer  # reaches the model, which gets its frame
    assert request_texts({"text": ["a", "b"]}) == ["a", "b"]
    assert request_texts(np.array(["a"])) == ["a"] and request_texts("a") == ["a"]
    for data, pattern in ((5, "(got int 5)"), (["def ", 5], "item 1 is int 5"), ([None], "item 0 is NoneType")):
        with pytest.raises(MlflowException, match=re.escape(pattern)):
            request_texts(data)


@pytest.mark.parametrize(
    ("params", "pattern"),
    [
        ([1, 2], '"params" must be an object'),
        ("x", '"params" must be an object'),
        ({"max_new_tokens": 0}, "params.max_new_tokens must be an integer >= 1 (got 0)"),
        ({"max_new_tokens": -3}, "params.max_new_tokens must be an integer >= 1"),
        ({"max_new_tokens": "5"}, "params.max_new_tokens must be an integer >= 1 (got '5')"),
        ({"temperature": 0}, "params.temperature must be a number > 0"),
        ({"temperature": -1.0}, "params.temperature must be a number > 0"),
        ({"temperature": float("nan")}, "params.temperature must be a number > 0 (got nan)"),
        ({"top_k": -1}, "params.top_k must be an integer >= 1"),
        ({"do_sample": "yes"}, "params.do_sample must be true or false"),
        ({"seed": 1}, "unknown params 'seed': this model takes max_new_tokens, temperature, top_k, do_sample"),
        ({"top_p": 0.5, "bogus": 1}, "unknown params 'bogus', 'top_p'"),
    ],
)
def test_bad_generation_params_are_refused_naming_the_param(params: Any, pattern: str) -> None:
    inner = Generator()
    _assert_refused(_serve(inner), {"inputs": ["ab"], "params": params}, pattern)
    assert inner.calls == []


def test_a_classifier_refuses_params_that_are_not_an_object() -> None:
    inner = Classifier()
    _assert_refused(_serve(inner), {"inputs": ["a b"], "params": [1, 2]}, '"params" must be an object')
    _assert_refused(_serve(inner), {"inputs": ["a b"], "params": {"x" * 500: 1}}, "takes no params")
    assert inner.calls == []


def test_good_params_pass_and_the_context_refusal_stays_one_clean_line() -> None:
    inner = Generator()
    model = _serve(inner)
    status, answer = _http(model, {"inputs": ["ab"], "params": {"max_new_tokens": 3, "temperature": 0.5}})
    assert status == 200 and answer == {"predictions": ["ab!"]}
    message = _assert_refused(model, {"inputs": ["abcd"], "params": {"max_new_tokens": 13}}, "ask for at most 12")
    assert message.startswith("a prompt of 4 tokens")
    check_params(None, ("max_new_tokens",))
    check_params({"anything": 1}, None)  # a model without a params schema: names are MLflow's business


def test_prompts_per_request_and_characters_per_request_are_capped() -> None:
    for inner in (Generator(), Classifier()):
        model = _serve(inner, max_prompts=4)
        _assert_refused(model, {"inputs": ["a"] * 5}, "5 inputs in one request; this server takes at most 4")
        assert inner.calls == []
        status, _ = _http(model, {"inputs": ["a"] * 4})
        assert status == 200
    model = _serve(Classifier())
    _assert_refused(model, {"inputs": ["a" * (MAX_REQUEST_CHARS + 1)]}, f"at most {MAX_REQUEST_CHARS}")


def test_quotes_are_cut() -> None:
    assert len(quote("x" * 10_000)) == 80 and quote("ab") == "'ab'"
    assert len(quote(list(range(10_000)))) == 80


def test_a_folder_without_a_model_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"is not a model MLflow can serve: .*MLmodel") as caught:
        check_servable(str(tmp_path))
    assert "\n" not in str(caught.value)


def test_generate_with_a_bare_name_while_offline_fails_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from forgeline.flows.cli.main import app

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    result = CliRunner().invoke(app, ["generate", "--model", "no-such-model-folder", "--prompt", "x"])
    assert result.exit_code == 1 and time.monotonic() - start < 10
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [
        "error: no-such-model-folder: no such model folder, and the Hugging Face Hub is offline (give a folder "
        "or a models:/ URI)"
    ], result.output


def test_the_served_app_refuses_non_text_inputs_as_sent_and_oversized_bodies() -> None:
    """Over HTTP: MLflow's parser would turn 5 or null into the prompts "5" and "None"; the raw JSON is checked."""
    from fastapi.testclient import TestClient

    from forgeline.tasks.tracking.serving_input import MAX_BODY_BYTES, InputGuard

    inner = Generator()
    client = TestClient(InputGuard(scoring_server.init(_serve(inner))))
    for inputs, pattern in (
        (5, "(got int 5)"),
        (["def ", 5], "item 1 is int 5"),
        ([None], "item 0 is NoneType"),
        ([["x" * 40]], "item 0 is list"),
    ):
        answer = client.post("/invocations", json={"inputs": inputs})
        assert answer.status_code == 400 and pattern in answer.json()["message"], answer.text
        assert "stack_trace" not in answer.json()
    big = b'{"inputs": ["' + b"x" * MAX_BODY_BYTES + b'"]}'
    answer = client.post("/invocations", content=big, headers={"Content-Type": "application/json"})
    assert answer.status_code == 400 and "request body over" in answer.json()["message"]
    assert inner.calls == []
    answer = client.post("/invocations", json={"inputs": ["ab"], "params": {"max_new_tokens": 2}})
    assert answer.status_code == 200 and answer.json() == {"predictions": ["ab!"]}
    assert client.get("/ping").status_code == 200
