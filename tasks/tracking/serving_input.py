"""What ``forgeline serve`` checks in a request before it reaches the model: its shape, its size, its params.

Every refusal is one :class:`MlflowException` line with ``INVALID_PARAMETER_VALUE`` (HTTP 400) raised from
the model's ``predict``, where MLflow's scoring server answers it without a stack trace. That server prefixes
the message of such an exception with the whole request (``Failed to predict data '...'``): a 30 MB prompt
came back in the 400. The exceptions made here keep their own one-line message instead, and quote at most
:data:`QUOTE_CHARS` characters of any input. :class:`InputGuard` checks what only the raw body shows
(its size, numbers among the inputs) before MLflow parses it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cache
from typing import Any

QUOTE_CHARS = 80
"""The most characters of a request's input that a refusal quotes."""
MAX_REQUEST_CHARS = 1_000_000
"""Characters of text in one request at most, checked before anything is tokenized (a bound for any model)."""
DEFAULT_MAX_PROMPTS = 128
"""Prompts (or texts) in one request at most (``forgeline serve --max-prompts``): four forwards of 32."""
SHAPE_HINT = 'send {"inputs": ["text", ...]}: a string or a list of strings (or one string column)'


def quote(value: Any) -> str:
    """``repr(value)`` cut to :data:`QUOTE_CHARS` characters (``...`` marks a cut)."""
    text = repr(value) if not isinstance(value, str) else repr(value[: QUOTE_CHARS + 1])
    return text if len(text) <= QUOTE_CHARS else text[: QUOTE_CHARS - 3] + "..."


@cache
def _input_error_class() -> type[Exception]:
    from mlflow.exceptions import MlflowException

    class InputError(MlflowException):
        """An ``MlflowException`` whose message MLflow's scoring server cannot overwrite with the request."""

        @property  # type: ignore[override]
        def message(self) -> str:
            return self._own_message

        @message.setter
        def message(self, value: str) -> None:
            if not hasattr(self, "_own_message"):  # the scoring server's rewrite quotes the whole request
                self._own_message = value

    return InputError


def refuse(message: str) -> None:
    """Answer the request with HTTP 400 and ``message`` (one line), never with the request in it.

    Raises:
        MlflowException: always (``INVALID_PARAMETER_VALUE``, no stack trace).
    """
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    raise _input_error_class()(" ".join(message.split()), error_code=INVALID_PARAMETER_VALUE)


def request_texts(data: Any) -> list[str]:
    """The texts of a parsed request, refusing any other shape in one line.

    Accepted: a string, a non-empty list (or 1-D array) of strings, a frame or dict with one column of strings.

    Raises:
        MlflowException: For anything else (a list of lists, several columns, numbers, ``None`` items...).
    """
    if isinstance(data, dict):
        if len(data) != 1:
            refuse(f"{SHAPE_HINT} (got a dict with {len(data)} keys)")
        data = next(iter(data.values()))
    if hasattr(data, "columns") and hasattr(data, "iloc"):  # a pandas DataFrame
        if len(data.columns) != 1:
            refuse(f"{SHAPE_HINT} (got {len(data.columns)} columns)")
        data = data.iloc[:, 0].tolist()
    elif hasattr(data, "tolist") and hasattr(data, "ndim"):  # a numpy array (a list of lists parses into 2-D)
        if data.ndim > 1:
            refuse(f"{SHAPE_HINT} (got a {data.ndim}-D array of shape {tuple(data.shape)})")
        data = data.tolist()
    if isinstance(data, str):
        return [data]
    if not isinstance(data, list):
        refuse(f"{SHAPE_HINT} (got {type(data).__name__} {quote(data)})")
    if not data:
        refuse(f"{SHAPE_HINT} (got an empty list)")
    for i, item in enumerate(data):
        if not isinstance(item, str):
            refuse(f"{SHAPE_HINT} (item {i} is {type(item).__name__} {quote(item)})")
    return data


def check_size(texts: list[str], max_prompts: int, max_chars: int | None = None) -> None:
    """Refuse more than ``max_prompts`` texts, or more text than can be read, before anything is tokenized.

    Args:
        texts: The request's texts.
        max_prompts: Texts per request at most.
        max_chars: Characters per text at most (``None``: only the request's :data:`MAX_REQUEST_CHARS`).

    Raises:
        MlflowException: In one line naming the limit.
    """
    if len(texts) > max_prompts:
        refuse(f"{len(texts)} inputs in one request; this server takes at most {max_prompts} (split the request)")
    total = 0
    for i, text in enumerate(texts):
        if max_chars is not None and len(text) > max_chars:
            refuse(
                f"input {i} has {len(text)} characters, more than the model's context can hold (at most "
                f"{max_chars}): shorten it"
            )
        total += len(text)
    if total > MAX_REQUEST_CHARS:
        refuse(f"{total} characters of text in one request; this server takes at most {MAX_REQUEST_CHARS}")


def longest_token_chars(tokenizer: Any) -> int | None:
    """The most characters one token of ``tokenizer`` stands for (from its vocabulary); ``None`` if unreadable.

    Marker characters (``Ġ``, ``##``) only make the count larger, which keeps the bound it gives safe: a text
    of more than ``positions * longest`` characters has more than ``positions`` tokens.
    """
    try:
        vocab = tokenizer.get_vocab()
        return max((len(token) for token in vocab), default=0) or None
    except Exception:  # noqa: BLE001 - a stand-in or odd tokenizer: only the request bound applies
        return None


_RULES: dict[str, tuple[str, Any]] = {
    "max_new_tokens": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "temperature": ("a number > 0", lambda v: _is_number(v) and math.isfinite(v) and v > 0),
    "top_k": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "top_p": ("a number in (0, 1]", lambda v: _is_number(v) and 0 < v <= 1),
    "do_sample": ("true or false", lambda v: isinstance(v, bool)),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_params(params: Any, known: tuple[str, ...] | None) -> None:
    """Refuse ``params`` that are not an object, name a param the model does not take, or are out of range.

    Args:
        params: The request's ``"params"`` as parsed (``None`` when it sent none).
        known: The params the model takes (its params schema); ``None``: any name passes.

    Raises:
        MlflowException: In one line naming the param and what it must be.
    """
    if params is None:
        return
    if not isinstance(params, dict):
        refuse(f'"params" must be an object such as {{"max_new_tokens": 30}} (got {type(params).__name__})')
    if known is not None and (unknown := sorted(set(params) - set(known))):
        refuse(f"unknown params {', '.join(map(quote, unknown))}: this model takes {', '.join(known)}")
    for name, value in params.items():
        rule = _RULES.get(name)
        if rule is not None and not rule[1](value):
            refuse(f"params.{name} must be {rule[0]} (got {quote(value)})")


@dataclass
class GenerationRoom:
    """A text generator's positions, its tokenizer and its default ``max_new_tokens``: what a request must fit."""

    tokenizer: Any
    positions: int
    default_new_tokens: int | None
    max_chars: int | None = None
    """Characters a prompt that fits has at most (positions times the longest token), checked before tokenizing."""

    @classmethod
    def of(cls, model: Any) -> GenerationRoom | None:
        """The room of a loaded pyfunc ``transformers`` text generator; ``None`` where it cannot be read."""
        try:
            pipeline = model.get_raw_model()
            config = pipeline.model.config
            positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
            tokenizer = pipeline.tokenizer
        except Exception:  # noqa: BLE001 - another flavor or a stand-in: requests are not checked
            return None
        if not isinstance(positions, int) or tokenizer is None:
            return None
        default = (getattr(model, "model_config", None) or {}).get("max_new_tokens")
        longest = longest_token_chars(tokenizer)
        max_chars = positions * longest if longest else None
        return cls(tokenizer, positions, int(default) if isinstance(default, int) else None, max_chars)

    def check(self, prompts: list[str], params: dict[str, Any] | None) -> None:
        """Refuse prompts that, with the new tokens asked for, would run past the model's positions.

        Without this the model indexes past its position table and the request fails with a traceback.

        Raises:
            MlflowException: In one line, with the prompt's tokens and the most new tokens that fit (HTTP 400).
        """
        new = (params or {}).get("max_new_tokens", self.default_new_tokens)
        if not prompts or not isinstance(new, int) or isinstance(new, bool):
            return
        longest = max(len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"]) for prompt in prompts)
        if longest + new <= self.positions:
            return
        room = self.positions - longest
        fix = f"ask for at most {room} new tokens" if room > 0 else "shorten the prompt"
        refuse(
            f"a prompt of {longest} tokens plus max_new_tokens {new} does not fit the model's {self.positions} "
            f"positions: {fix}"
        )


MAX_BODY_BYTES = 8 * MAX_REQUEST_CHARS
"""Bytes of request body at most (room for :data:`MAX_REQUEST_CHARS` characters, JSON-escaped), read before parsing."""


def raw_problem(body: bytes) -> str | None:
    """Why a JSON body's ``"inputs"`` is not a string or a list of strings, as sent; ``None`` when it is.

    MLflow's parser makes a numpy array of ``"inputs"``, which turns ``5``, ``null`` or ``true`` into the strings
    ``"5"``, ``"None"``, ``"True"``: only the raw JSON still tells them from text.
    """
    from mlflow.exceptions import MlflowException

    try:
        payload = json.loads(body)
    except ValueError:  # MLflow's parser answers malformed JSON itself
        return None
    if not isinstance(payload, dict) or "inputs" not in payload:
        return None
    try:
        request_texts(payload["inputs"])
    except MlflowException as exc:
        return exc.message
    return None


class InputGuard:
    """ASGI middleware: refuses an oversized ``POST /invocations`` body, or non-text ``"inputs"``, with a 400.

    Args:
        app: The scoring server's app.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/invocations":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > MAX_BODY_BYTES:
                await _answer_400(send, f"request body over {MAX_BODY_BYTES} bytes: split the request")
                return
            more = message.get("more_body", False)
        body = b"".join(chunks)
        content_type = dict(scope.get("headers") or []).get(b"content-type", b"").decode("latin-1")
        problem = raw_problem(body) if content_type.split(";")[0].strip() == "application/json" else None
        if problem is not None:
            await _answer_400(send, problem)
            return
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def _answer_400(send: Any, message: str) -> None:
    body = json.dumps({"error_code": "INVALID_PARAMETER_VALUE", "message": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 400, "headers": headers})
    await send({"type": "http.response.body", "body": body})
