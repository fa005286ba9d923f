"""Building GPT-2 family causal LMs, and loading pretrained ones safely (safetensors only, no remote code).

Sources accepted by :func:`load_pretrained_model`:

* a local directory written by ``save_pretrained`` (transformers 5 writes ``model.safetensors``);
* a registered MLflow model URI, ``models:/NAME@alias`` or ``models:/NAME/3``, when the caller passes a
  ``fetch`` function (``forgeline.tasks.tracking.models.download_model``) that downloads it to a temporary
  directory; it is checked and loaded like a local one, then the download is deleted;
* a hub id (loaded with the same flags).

Refused with ``ValueError``: a directory with no safetensors weights (a pickled ``pytorch_model.bin`` is never
unpickled) and a config with ``auto_map`` (custom code).
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from forgeline.tasks.config import ModelConfig
from forgeline.tasks.data.tokenization import load_tokenizer

log = logging.getLogger(__name__)

Fetch = Callable[[str, Path], Path]
"""Downloads a registry URI into a folder and returns the artifact folder (the tracking package has one)."""

SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.ckpt", "pytorch_model.pt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, *, fetch: Fetch | None = None) -> PreTrainedModel:
    """Build a fresh GPT-2 LM sized by ``cfg`` for ``tokenizer``, or load ``cfg.init_from``.

    With ``init_from`` set, the size fields of ``cfg`` are ignored (the checkpoint decides), the token
    embeddings are grown if the tokenizer has more tokens than the model, and ``block_size`` must fit the
    model's positions.

    Args:
        cfg: Model sizes, dropout, context length, optional ``init_from``.
        tokenizer: The tokenizer; its length is the vocabulary size and its eos id the bos/eos id.
        fetch: Downloads ``init_from`` when it is a registry URI.

    Returns:
        The model (in training mode, on CPU).

    Raises:
        ValueError: If ``block_size`` exceeds a pretrained model's positions, or the source is refused.
    """
    if cfg.init_from:
        model, _ = load_pretrained_model(cfg.init_from, fetch=fetch)
        positions = n_positions(model)
        if positions is not None and cfg.block_size > positions:
            raise ValueError(f"model.block_size ({cfg.block_size}) exceeds {cfg.init_from}'s positions ({positions})")
        vocab = model.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > vocab:
            log.warning("resizing %s token embeddings %d -> %d", cfg.init_from, vocab, len(tokenizer))
            model.resize_token_embeddings(len(tokenizer))
        model.train()
        return model
    model = GPT2LMHeadModel(gpt2_config(cfg, tokenizer))
    if not cfg.bias:
        hold_biases_at_zero(model)
    log.info(
        "built GPT-2: %d layers, %d heads, width %d, context %d, vocab %d, %s, %s: %d trained parameters",
        cfg.n_layer,
        cfg.n_head,
        cfg.n_embd,
        cfg.block_size,
        len(tokenizer),
        "biases" if cfg.bias else "no biases",
        cfg.activation,
        count_parameters(model),
    )
    return model


def gpt2_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, **extra: Any) -> GPT2Config:
    """The GPT-2 config the model section's sizes describe, for ``tokenizer``'s vocabulary.

    Args:
        cfg: Model sizes, dropout, context length, bias and activation.
        tokenizer: Its length is the vocabulary size, its eos id the bos/eos id, its pad id the pad id.
        **extra: Further config fields (a classifier's ``num_labels``, ``id2label``...).

    Returns:
        The config (no weights).
    """
    return GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=cfg.block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        activation_function=_ACTIVATIONS[cfg.activation],
        **extra,
    )


@contextlib.contextmanager
def resolved_source(source: str, *, fetch: Fetch | None = None) -> Iterator[tuple[str, str | None]]:
    """A ``model.init_from`` as something ``from_pretrained`` loads, with where its tokenizer is.

    A registry URI is downloaded into a temporary folder (deleted on exit); a local folder is checked
    (:func:`check_model_dir`); anything else is taken for a hub id.

    Args:
        source: Local directory, ``models:/NAME@alias`` / ``models:/NAME/VERSION``, or a hub id.
        fetch: Downloads a ``models:/`` URI into a folder (required for those URIs).

    Yields:
        ``(model folder or hub id, tokenizer folder or hub id, or None when there is no tokenizer)``.

    Raises:
        ValueError: a registry URI without ``fetch``, a path that is not a model folder, or an unsafe folder.
    """
    if source.startswith("models:/"):
        if fetch is None:
            raise ValueError(f"{source}: a registry URI needs a fetch function (forgeline.tasks.tracking.models)")
        with tempfile.TemporaryDirectory(prefix="forgeline-model-") as dst:
            root = fetch(source, Path(dst))
            model_dir = find_model_dir(root)
            check_model_dir(model_dir)
            tok_dir = find_tokenizer_dir(root, model_dir)
            yield str(model_dir), str(tok_dir) if tok_dir is not None else None
        return
    path = Path(source)
    if path.is_dir():
        check_model_dir(path)
        yield str(path), str(path) if has_tokenizer(path) else None
        return
    if path.exists():
        raise ValueError(f"{source}: not a model directory")
    yield source, source


def load_pretrained_model(
    source: str, *, fetch: Fetch | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load a causal LM (and its tokenizer, when one is stored with it) from safetensors only.

    Args:
        source: Local directory, ``models:/NAME@alias`` / ``models:/NAME/VERSION``, or a hub id.
        fetch: Downloads a ``models:/`` URI into a folder (required for those URIs).

    Returns:
        ``(model, tokenizer or None)``.

    Raises:
        ValueError: If the weights are not safetensors (pickle is never loaded) or the config asks for
            custom code (``auto_map``).
    """
    if source.startswith("models:/"):
        if fetch is None:
            raise ValueError(f"{source}: a registry URI needs a fetch function (forgeline.tasks.tracking.models)")
        with tempfile.TemporaryDirectory(prefix="forgeline-model-") as dst:
            root = fetch(source, Path(dst))
            model_dir = find_model_dir(root)
            tok_dir = find_tokenizer_dir(root, model_dir)
            model = _load_local(model_dir)
            tokenizer = load_tokenizer(tok_dir) if tok_dir is not None else None
        return model, tokenizer
    path = Path(source)
    if path.is_dir():
        model = _load_local(path)
        tokenizer = load_tokenizer(path) if has_tokenizer(path) else None
        return model, tokenizer
    if path.exists():
        raise ValueError(f"{source}: not a model directory")
    log.info("loading %s from the hub (safetensors only, no remote code)", source)
    model = AutoModelForCausalLM.from_pretrained(source, use_safetensors=True, trust_remote_code=False)
    try:
        tokenizer = load_tokenizer(source)
    except (OSError, ValueError) as exc:
        log.warning("%s: no usable tokenizer (%s)", source, exc)
        tokenizer = None
    return model, tokenizer


def count_parameters(model: PreTrainedModel) -> int:
    """Number of distinct trained parameters (tied weights counted once, biases held at zero not counted).

    Args:
        model: Any torch module.

    Returns:
        The parameter count.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_model_dir(path: str | Path) -> None:
    """Refuse a local model directory that is unsafe to load.

    Args:
        path: Directory holding ``config.json`` and weights.

    Raises:
        ValueError: No ``config.json``, custom code (``auto_map``), or no safetensors weights.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path}: no config.json; not a saved model directory")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable config.json ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: config.json is not a mapping")
    if config.get("auto_map"):
        raise ValueError(f"{path}: config.json has auto_map (custom code); refusing to load remote code")
    if not any((path / name).is_file() for name in SAFETENSORS_FILES):
        pickled = [name for name in PICKLE_FILES if (path / name).is_file()]
        if pickled:
            raise ValueError(f"{path}: no safetensors weights; refusing to unpickle {pickled[0]}")
        raise ValueError(f"{path}: no safetensors weights")


def find_model_dir(root: str | Path) -> Path:
    """Find the saved-model directory (``config.json`` plus weights) inside a downloaded artifact tree.

    MLflow's transformers flavor stores the model under ``<root>/model/`` and the tokenizer under
    ``<root>/components/tokenizer/``; the shallowest directory with a ``config.json`` next to weights wins.

    Args:
        root: Downloaded artifact directory.

    Returns:
        The model directory (not yet checked; :func:`check_model_dir` does that on load).

    Raises:
        ValueError: If no directory holds a ``config.json`` with weights.
    """
    root = Path(root)
    candidates = []
    for config in root.rglob("config.json"):
        folder = config.parent
        if any((folder / name).is_file() for name in SAFETENSORS_FILES + PICKLE_FILES):
            candidates.append(folder)
    if not candidates:
        raise ValueError(f"{root}: no saved model (config.json with weights) inside")
    return min(candidates, key=lambda p: (len(p.relative_to(root).parts), str(p)))


def hold_biases_at_zero(model: PreTrainedModel) -> None:
    """Zero every bias and freeze it (``model.bias: false``)."""
    # nanoGPT's bias=False: a zero bias that never trains is no bias, and the saved model stays a plain GPT-2
    # that any transformers install loads. Their gradients and optimizer updates are skipped.
    for name, param in model.named_parameters():
        if name.endswith(".bias"):
            param.data.zero_()
            param.requires_grad_(False)


def has_tokenizer(path: Path) -> bool:
    """Whether a folder holds a saved tokenizer."""
    return any((path / name).is_file() for name in TOKENIZER_FILES)


def find_tokenizer_dir(root: Path, model_dir: Path) -> Path | None:
    """The tokenizer folder of a downloaded artifact tree: the model's own, else the shallowest."""
    if has_tokenizer(model_dir):
        return model_dir
    found = sorted(
        {p.parent for name in TOKENIZER_FILES for p in root.rglob(name)},
        key=lambda p: (len(p.relative_to(root).parts), str(p)),
    )
    return found[0] if found else None


def n_positions(model: PreTrainedModel) -> int | None:
    """The positions (context length) a model was built for, when its config says."""
    config = model.config
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


# ------------------------------------------------------------------------------------------- private
# GPT-2's "gelu_new" is five elementwise ops in Python; "gelu_pytorch_tanh" is the same function as one fused
# op (max difference 2e-7), about 17% of a step at nanoGPT's CPU size. The saved config names it, so any
# transformers install loads the model.
_ACTIVATIONS = {"gelu_new": "gelu_pytorch_tanh", "gelu": "gelu"}


def _load_local(path: Path) -> PreTrainedModel:
    check_model_dir(path)
    model = AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True, trust_remote_code=False)
    log.info("loaded model from %s (%d parameters)", path, count_parameters(model))
    return model
