"""``forgeline predict``: label texts with a registered classifier (by default the champion) and print them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from forgeline.flows.cli import console, lookup
from forgeline.flows.cli.console import EXIT_BAD_INPUT, Output, fail
from forgeline.flows.cli.format import Column, Listing, emit, num, short
from forgeline.flows.cli.options import ConfigOpt, OutputOpt, SetOpt, VerboseOpt, find_config, load

CLASSIFICATION_TASK = "text-classification"


def predict(
    text: Annotated[list[str] | None, typer.Option("--text", "-t", help="A text to classify. Repeatable.")] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="A UTF-8 file of texts to classify, one per line.")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model", "-m", help="Model URI or saved folder (default: models:/<registry.model_name>@champion)."
        ),
    ] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    output: OutputOpt = Output.TABLE,
    verbose: VerboseOpt = False,
) -> None:
    """Classify texts with a registered text classifier: one label and its score per text.

    The answers are those `forgeline serve` and `mlflow models serve` give for the same model. Language
    models generate instead: use `forgeline generate`.

    Examples:

        forgeline predict --config configs/ml_projects.yaml --text "A pipeline that deploys models"

        forgeline predict --model models:/forgeline-ml-projects/2 --file titles.txt --output csv
    """
    console.quiet_logging(verbose)
    texts = read_texts(text, file)
    cfg = load(config, overrides) if config is not None or overrides else find_config(None, required=False)
    if model is None and cfg is None:
        fail("no --model given and no config to find the champion in; pass --model URI or --config", EXIT_BAD_INPUT)
    uri = model or f"models:/{cfg.registry.model_name}@{cfg.registry.champion_alias}"
    check_classifier(uri, cfg)
    from forgeline.tasks.tracking.classifiers import predict_labels

    try:
        predictions = predict_labels(uri, texts)
    except Exception as exc:  # noqa: BLE001 - one line for any load or inference failure
        fail(f"cannot classify with {uri}: {console.one_line(exc)}")
    emit(output, predictions_listing(uri, texts, predictions))


def read_texts(texts: list[str] | None, file: Path | None) -> list[str]:
    """The ``--text`` values, then the non-blank lines of ``--file``; one error line when there are none.

    Raises:
        typer.Exit: No text given, an unreadable file, or a file with no text in it (exit 2).
    """
    found = [t for t in texts or [] if t.strip()]
    if texts and not found:
        fail("--text is empty: give the text to classify", EXIT_BAD_INPUT)
    if file is not None:
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            fail(f"{file}: no such file", EXIT_BAD_INPUT)
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"{file}: cannot read it ({console.one_line(exc)})", EXIT_BAD_INPUT)
        from_file = [line for line in lines if line.strip()]
        if not from_file:
            fail(f"{file}: empty: no text to classify (one text per line)", EXIT_BAD_INPUT)
        found += from_file
    if not found:
        fail("nothing to classify: give --text TEXT (repeatable) or --file FILE (one text per line)", EXIT_BAD_INPUT)
    return found


def check_classifier(uri: str, cfg: Any) -> None:
    """End the command in one line unless ``uri`` names a text classifier that exists."""
    from forgeline.tasks.tracking.classifiers import model_task

    path = Path(uri).expanduser()
    if uri.startswith((".", "/", "~")) and not path.exists():
        fail(f"{uri}: no such model folder", EXIT_BAD_INPUT)
    if not path.exists():
        lookup.open_store(cfg)
        if uri.startswith("models:/"):
            lookup.resolve_model_uri(uri)
    try:
        task = model_task(str(path) if path.exists() else uri)
    except Exception as exc:  # noqa: BLE001 - MLflow raises several kinds for "not there"
        fail(f"cannot read the model {uri}: {console.one_line(exc)}")
    if task != CLASSIFICATION_TASK:
        kind = "a language model" if task in (None, "text-generation") else f"a {task} model"
        fail(f"{uri} is {kind}: predict is for text classifiers; use `forgeline generate`", EXIT_BAD_INPUT)


def predictions_listing(uri: str, texts: list[str], predictions: list[dict[str, Any]]) -> Listing:
    """One row per text: the text (cut to 60 characters in the table), its label and score."""
    columns = [
        Column("text", "text", lambda r: short(" ".join(r["text"].split()), 60)),
        Column("label", "label"),
        Column("score", "score", lambda r: num(r["score"]), right=True),
    ]
    rows = [
        {"text": text, "label": p["label"], "score": float(p["score"])}
        for text, p in zip(texts, predictions, strict=True)
    ]
    return Listing("predictions", f"{uri}: {len(rows)} text{'s' * (len(rows) != 1)}", columns, rows)
