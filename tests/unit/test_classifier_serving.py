"""Serving a classifier without a server: a frame of labels split between batched requests, params refused."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest

from forgeline.tasks.tracking.classifiers import as_predictions, is_classifier_dir
from forgeline.tasks.tracking.serving import BatchingModel, takes_params


class SlowClassifier:
    """A stand-in classifier pyfunc: a ``label``/``score`` frame, the label being the text's first word."""

    metadata = SimpleNamespace(flavors={"transformers": {"task": "text-classification"}})

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        self.calls.append(data)
        time.sleep(0.1)
        return pd.DataFrame({"label": [text.split()[0] for text in data], "score": [0.5] * len(data)})


def test_concurrent_requests_share_a_forward_and_get_their_own_rows() -> None:
    inner = SlowClassifier()
    model = BatchingModel(inner, takes_params=takes_params(inner))
    requests = [["a x"], ["b y", "c z"], ["d w"], ["e v", "f u", "g t"]]
    answers: list[Any] = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def send(i: int) -> None:
        start.wait()
        answers[i] = model.predict(requests[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    for texts, answer in zip(requests, answers, strict=True):
        assert isinstance(answer, pd.DataFrame) and list(answer.index) == list(range(len(texts)))
        assert as_predictions(answer) == [{"label": t.split()[0], "score": 0.5} for t in texts]
    assert len(inner.calls) < len(requests)  # some requests shared a forward


def test_a_classifier_refuses_params_and_a_language_model_takes_them() -> None:
    from mlflow.exceptions import MlflowException

    inner = SlowClassifier()
    model = BatchingModel(inner, takes_params=takes_params(inner))
    with pytest.raises(MlflowException, match=r"takes no params \(got max_new_tokens, temperature\)"):
        model.predict(["a b"], params={"temperature": 1.0, "max_new_tokens": 3})
    assert inner.calls == []
    assert as_predictions(model.predict(["a b"], params={})) == [{"label": "a", "score": 0.5}]
    lm = SimpleNamespace(metadata=SimpleNamespace(flavors={"transformers": {"task": "text-generation"}}))
    assert takes_params(lm) and takes_params(SimpleNamespace(metadata=object()))


def test_classifier_folders_are_told_by_their_architecture(tmp_path: Any) -> None:
    (tmp_path / "config.json").write_text('{"architectures": ["BertForSequenceClassification"]}')
    assert is_classifier_dir(tmp_path)
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    assert not is_classifier_dir(tmp_path)
    assert not is_classifier_dir(tmp_path / "missing")
