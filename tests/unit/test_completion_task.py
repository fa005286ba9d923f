"""The completion task's data hook, training loop and evaluation on tiny data (issue 17, H5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from forgeline.tasks.config import DataConfig, PipelineConfig
from forgeline.tasks.data.cleaning import DataError, clean_dataset, load_split


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # tiny models on a busy 2-core machine: far faster than the default pool


def _pairs_file(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _rows(n: int) -> list[dict[str, str]]:
    return [{"q": f"double({i})", "a": f"{2 * i}"} for i in range(n)]


def _data(tmp_path: Path, **extra: object) -> DataConfig:
    return DataConfig.model_validate(
        {
            "sources": [{"kind": "files", "paths": ["pairs.jsonl"]}],
            "prompt_column": "q",
            "completion_column": "a",
            "cache_dir": str(tmp_path / "cache"),
            "fractions": {"train": 0.6, "validation": 0.2, "test": 0.2},
            **extra,
        }
    )


def _cfg(tmp_path: Path, **train: object) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "task": {"kind": "completion"},
            "data": _data(tmp_path).model_dump(),
            "model": {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 32},
            "train": {
                "max_steps": 6,
                "batch_size": 4,
                "eval_interval": 3,
                "checkpoint_interval": 3,
                "log_interval": 1,
                **train,
            },
            "eval": {"max_new_tokens": 6},
        }
    )


def test_text_is_prompt_newline_completion_and_empty_completions_are_dropped_and_counted(tmp_path: Path) -> None:
    rows = [*_rows(40), {"q": "f(x)", "a": "   "}, {"q": "g(x)", "a": ""}, {"q": "h(x)\r\n", "a": "ok\r\n"}]
    _pairs_file(tmp_path / "pairs.jsonl", rows)
    result = clean_dataset(_data(tmp_path), base_dir=tmp_path)
    assert result.dropped["empty_completion"] == 2
    assert result.rows_per_split["train"] + result.rows_per_split["validation"] + result.rows_per_split["test"] == 41
    records = [r for split in ("train", "validation", "test") for r in load_split(result.dataset_dir, split)]
    assert all(r["text"] == r["prompt"] + "\n" + r["completion"] for r in records)
    assert {"prompt": "h(x)", "completion": "ok"}.items() <= next(r for r in records if r["prompt"] == "h(x)").items()


def test_a_missing_prompt_column_names_it_and_lists_the_columns_found(tmp_path: Path) -> None:
    _pairs_file(tmp_path / "pairs.jsonl", [{"question": "a", "a": "b"}] * 3)
    with pytest.raises(DataError, match=r"no column 'q' \(columns: question, a\)"):
        clean_dataset(_data(tmp_path), base_dir=tmp_path)


def test_python_docstrings_records_are_pairs_with_text_and_a_stable_cache_key(tmp_path: Path) -> None:
    data = DataConfig.model_validate(
        {"sources": [{"kind": "builtin", "name": "python-docstrings", "max_bytes": 20000}], "cache_dir": "cache"}
    )
    first = clean_dataset(data, base_dir=tmp_path)
    again = clean_dataset(data, base_dir=tmp_path)
    assert again.cache_hit and again.fingerprint == first.fingerprint
    row = load_split(first.dataset_dir, "train")[0]
    assert row["text"] == row["prompt"] + "\n" + row["completion"] and "(" in row["prompt"]


def test_the_demo_test_pairs_are_out_of_the_python_docs_pretraining_text(tmp_path: Path) -> None:
    """Issue 17 point 1: a model pretrained on python-docs has not seen the docstrings demo's test references."""
    from forgeline.tasks.config import load_config
    from forgeline.tasks.data.builtin import builtin_corpus
    from forgeline.tasks.data.pairs import pretraining_corpus

    repo = Path(__file__).resolve().parents[2]
    demo = load_config(repo / "configs" / "docstrings.yaml")
    cleaned = clean_dataset(demo.data.model_copy(update={"cache_dir": str(tmp_path / "cache")}), base_dir=tmp_path)
    tests = set(load_split(cleaned.dataset_dir, "test")["completion"])
    assert len(tests) > 50
    max_bytes = load_config(repo / "configs" / "default.yaml").data.sources[0].max_bytes
    flat = " ".join(pretraining_corpus(max_bytes).split())
    assert not [t for t in tests if t in flat]
    everything = " ".join(builtin_corpus(max_bytes).split())
    assert [t for t in tests if t in everything], "the unfiltered corpus holds them: the check above means something"


def test_prompts_too_long_are_dropped_or_cut_from_the_left_never_the_completion(tmp_path: Path) -> None:
    from forgeline.tasks.config import TokenizerConfig
    from forgeline.tasks.data.tokenization import build_tokenizer
    from forgeline.tasks.train.complete import encode_split

    rows = [*_rows(30), *({"q": "x" * 60 + f"({i})", "a": f"long {i}"} for i in range(10))]
    _pairs_file(tmp_path / "pairs.jsonl", rows)
    cfg = _cfg(tmp_path)
    cleaned = clean_dataset(cfg.data, base_dir=tmp_path)
    tok = build_tokenizer(TokenizerConfig(kind="char"), [r["q"] + "\n" + r["a"] for r in rows])
    dropped = encode_split(tok, cleaned.dataset_dir, "train", cfg, train=True)
    assert dropped.prompt_too_long > 0 and dropped.truncated_prompts == 0
    cut_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"prompt_overflow": "truncate_left"})})
    cut = encode_split(tok, cleaned.dataset_dir, "train", cut_cfg, train=True)
    assert cut.prompt_too_long == 0 and cut.truncated_prompts == dropped.prompt_too_long
    assert all(len(ids) <= 32 for ids in cut.input_ids)
    tiny = cfg.model_copy(update={"model": cfg.model.model_copy(update={"block_size": 4})})
    with pytest.raises(DataError, match="none of its .* pairs fits model.block_size 4"):
        encode_split(tok, cleaned.dataset_dir, "train", tiny, train=True)


def test_train_completion_saves_an_lm_logs_val_loss_and_is_recognised_as_done(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from forgeline.tasks.evaluate.completion import evaluate_completion
    from forgeline.tasks.train.complete import train_completion
    from forgeline.tasks.train.loop import TrainCallbacks

    _pairs_file(tmp_path / "pairs.jsonl", _rows(60))
    cfg = _cfg(tmp_path)
    cleaned = clean_dataset(cfg.data, base_dir=tmp_path)
    seen: dict[int, dict[str, float]] = {}
    result = train_completion(
        cfg,
        dataset_dir=cleaned.dataset_dir,
        run_dir=tmp_path / "run",
        callbacks=TrainCallbacks(on_metrics=lambda step, m: seen.setdefault(step, m)),
    )
    assert result.steps == 6 and result.best_val_loss is not None
    assert "val/loss" in seen[3] and "val/loss" in seen[6]
    assert result.best_val_loss == min(seen[3]["val/loss"], seen[6]["val/loss"])
    model = AutoModelForCausalLM.from_pretrained(result.model_dir)
    assert model.config.n_positions == 32
    again = train_completion(cfg, dataset_dir=cleaned.dataset_dir, run_dir=tmp_path / "run")
    assert again.already_done
    scored = evaluate_completion(result.model_dir, cleaned.dataset_dir, cfg)
    for key in ("test/bleu", "test/rougeL", "test/exact_match", "test/loss", "test/perplexity"):
        assert key in scored.metrics
    assert scored.scored == len(scored.examples) == len(load_split(cleaned.dataset_dir, "test"))
    assert len(scored.samples) == len(scored.worst) + len(scored.best)
    # Re-scoring a champion (the register stage, `forgeline promote`) gives the gate metric, test/rougeL.
    from forgeline.flows.rescore import rescore_model

    assert rescore_model(result.model_dir, cfg, cleaned.dataset_dir) == scored.metrics["test/rougeL"]


def test_fine_tuning_starts_from_a_saved_language_model_and_its_tokenizer(tmp_path: Path) -> None:
    """model.init_from: a saved LM folder (a registry URI is downloaded to one first) is the starting point."""
    from forgeline.tasks.data.tokenization import load_tokenizer
    from forgeline.tasks.train.complete import train_completion

    _pairs_file(tmp_path / "pairs.jsonl", _rows(60))
    cfg = _cfg(tmp_path)
    cleaned = clean_dataset(cfg.data, base_dir=tmp_path)
    base = train_completion(cfg, dataset_dir=cleaned.dataset_dir, run_dir=tmp_path / "base")
    tuned_cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"init_from": base.model_dir})})
    tuned = train_completion(tuned_cfg, dataset_dir=cleaned.dataset_dir, run_dir=tmp_path / "tuned")
    assert tuned.history[0]["train/loss"] < base.history[0]["train/loss"]  # it starts where the base ended
    assert load_tokenizer(tuned.model_dir).get_vocab() == load_tokenizer(base.model_dir).get_vocab()


def test_resumed_training_ends_where_an_uninterrupted_run_ends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A1/D: a run stopped after its step-3 checkpoint resumes with the same batches, weights and val/loss."""
    from forgeline.tasks.train.complete import train_completion

    _pairs_file(tmp_path / "pairs.jsonl", _rows(60))
    cfg = _cfg(tmp_path)
    cleaned = clean_dataset(cfg.data, base_dir=tmp_path)
    whole = train_completion(cfg, dataset_dir=cleaned.dataset_dir, run_dir=tmp_path / "whole")
    monkeypatch.setenv("FORGELINE_FAULT_AT_STEP", "3")
    monkeypatch.setenv("FORGELINE_FAULT_KIND", "raise")
    with pytest.raises(RuntimeError, match="injected"):
        train_completion(cfg, dataset_dir=cleaned.dataset_dir, run_dir=tmp_path / "split")
    monkeypatch.delenv("FORGELINE_FAULT_AT_STEP")
    resumed = train_completion(cfg, dataset_dir=cleaned.dataset_dir, run_dir=tmp_path / "split")
    assert resumed.resumed_from == 3
    assert resumed.final_val_loss == pytest.approx(whole.final_val_loss, rel=1e-5)


def test_completion_refuses_keys_it_cannot_use() -> None:
    from forgeline.tasks.config import ConfigError, load_config

    base = {"task": {"kind": "completion"}, "data": {"sources": [{"kind": "builtin", "name": "python-docstrings"}]}}
    with pytest.raises((ConfigError, ValueError), match="tune.metric"):
        PipelineConfig.model_validate({**base, "tune": {"metric": "test/rougeL"}})
    with pytest.raises((ConfigError, ValueError), match="data.split"):
        PipelineConfig.model_validate({**base, "data": {**base["data"], "split": "tail"}})
    assert load_config  # the loader is the same schema


def test_the_held_out_set_is_kept_on_disk_so_an_lm_run_starts_no_extraction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from forgeline.tasks.data import pairs

    monkeypatch.setattr(pairs, "_HELD", [])
    first = pairs.held_out_docstrings(tmp_path)
    assert first and list(tmp_path.glob("held-out-docstrings-*.json"))
    monkeypatch.setattr(pairs, "_HELD", [])
    monkeypatch.setattr(pairs, "docstring_pairs", lambda *a: pytest.fail("extracted again"))
    assert pairs.held_out_docstrings(tmp_path) == first
