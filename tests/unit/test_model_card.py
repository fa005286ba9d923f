"""Model card rendering (pure): sections, champion comparison, lineage links, description size."""

from __future__ import annotations

from types import SimpleNamespace

from forgeline.tasks.config import PipelineConfig, dump_config
from forgeline.tasks.registry.model_card import DESCRIPTION_LIMIT, build_model_card, card_facts, description_text
from forgeline.tasks.tracking.links import ui_run_url

FACTS = {
    "model_name": "demo-lm",
    "version": "3",
    "model_uri": "models:/demo-lm/3",
    "promoted": True,
    "decision": "better: 2.3000 vs champion 2.4000 bits/byte (improvement 0.1000)",
    "previous_champion": "2",
    "fingerprint": "ab" * 32,
    "sources": ["builtin:python-docs"],
    "split": "hash",
    "rows_per_split": {"train": 10, "validation": 2, "test": 2},
    "bytes_per_split": {"train": 1000, "validation": 200, "test": 210},
    "config_yaml": "name: demo\nseed: 1\n",
    "config_hash": "0123456789abcdef",
    "metrics": {"test/bits_per_byte": 2.3, "test/loss": 1.6, "test/perplexity": 4.95},
    "champion_metrics": {"test/bits_per_byte": 2.4},
    "samples": [{"prompt": "def ", "text": "main():\n    pass"}],
    "lineage": {
        "mlflow_run_id": "r" * 32,
        "mlflow_run_url": "http://127.0.0.1:5000/#/experiments/1/runs/" + "r" * 32,
        "pipeline_run_id": "p" * 32,
        "prefect_flow_run_id": "f-1",
        "prefect_flow_run_url": "http://127.0.0.1:4200/runs/flow-run/f-1",
        "git_commit": "c" * 40,
        "git_dirty": "true",
    },
}


def test_card_has_every_section() -> None:
    card = build_model_card(FACTS)
    assert card.startswith("# demo-lm version 3\n")
    for heading in ("## Metrics", "## Data", "## Sample generations", "## Lineage", "## Resolved config"):
        assert heading in card
    assert "promoted to champion (better: 2.3000" in card
    assert "ab" * 32 in card and "`builtin:python-docs`" in card
    assert "| test | 2 | 210 |" in card
    assert "```yaml\nname: demo\nseed: 1\n```" in card
    assert "def main():\n    pass" in card  # prompt plus continuation
    assert f"[`{'r' * 32}`](http://127.0.0.1:5000/#/experiments/1/runs/{'r' * 32})" in card
    assert "[`f-1`](http://127.0.0.1:4200/runs/flow-run/f-1)" in card
    assert f"`{'c' * 40}` (with uncommitted changes)" in card
    assert card.endswith("\n")


def test_metrics_table_puts_champion_beside_candidate() -> None:
    card = build_model_card(FACTS)
    assert "| metric | this version | champion (v2) | difference |" in card
    assert "| test/bits_per_byte | 2.3000 | 2.4000 | -0.1000 (better) |" in card
    assert "| test/loss | 1.6000 | - | - |" in card
    # bits per byte comes first whatever the dict order
    assert card.index("test/bits_per_byte |") < card.index("test/loss |")


def test_only_web_addresses_become_links() -> None:
    lineage = {"prefect_flow_run_id": "f-2", "prefect_flow_run_url": "None/flow-runs/flow-run/f-2"}
    card = build_model_card({"model_name": "m", "version": "1", "lineage": lineage})
    assert "- **Prefect flow run:** `f-2`" in card and "None/" not in card


def test_minimal_facts_render_without_optional_sections() -> None:
    card = build_model_card({"model_name": "m", "version": "1"})
    assert card == "# m version 1\n"


def test_worse_candidate_and_not_promoted() -> None:
    facts = {**FACTS, "promoted": False, "decision": "not better", "metrics": {"test/bits_per_byte": 2.5}}
    card = build_model_card(facts)
    assert "not promoted (not better)" in card
    assert "+0.1000 (worse)" in card


def test_code_fences_in_samples_do_not_break_the_card() -> None:
    facts = {"model_name": "m", "version": "1", "samples": [{"prompt": "x", "text": "```\nrm -rf"}]}
    card = build_model_card(facts)
    assert card.count("```") == 2


def test_description_is_cut_to_fit_and_closes_code_blocks() -> None:
    long = {**FACTS, "config_yaml": "\n".join(f"key{i}: {i}" for i in range(2000))}
    card = build_model_card(long)
    assert len(card) > DESCRIPTION_LIMIT
    text = description_text(card)
    assert len(text) <= DESCRIPTION_LIMIT
    assert text.count("```") % 2 == 0
    assert "model_card.md" in text
    assert description_text("short") == "short"


def test_card_facts_from_stage_results(tmp_path) -> None:  # noqa: ANN001 - pytest fixture
    cfg = PipelineConfig()
    (tmp_path / "report.json").write_text(
        '{"rows_per_split": {"train": 5}, "bytes_per_split": {"train": 50}, "sources": ["a.txt"]}'
    )
    result = SimpleNamespace(
        model_name="demo-lm",
        version="4",
        model_uri="models:/demo-lm/4",
        promoted=False,
        reason="not better",
        previous_champion="3",
        champion_bits_per_byte=2.0,
    )
    evaluation = SimpleNamespace(bits_per_byte=2.1, loss=1.5, perplexity=4.48, samples=[{"prompt": "a", "text": "b"}])
    facts = card_facts(
        cfg.data,
        result,
        evaluation,
        config_yaml=dump_config(cfg),
        config_hash=cfg.config_hash(),
        fingerprint="f" * 64,
        train_run_id="t" * 32,
        pipeline_run_id="p" * 32,
        tags={"forgeline.git_commit": "abc", "prefect.flow_run_id": "fr"},
        dataset_dir=str(tmp_path),
        run_url=lambda run_id: ui_run_url("sqlite:////x/mlflow.db", "7", run_id),
    )
    assert facts["champion_metrics"] == {"test/bits_per_byte": 2.0}
    assert facts["sources"] == ["a.txt"] and facts["rows_per_split"] == {"train": 5}
    assert facts["lineage"]["mlflow_run_url"] == f"http://127.0.0.1:5000/#/experiments/7/runs/{'t' * 32}"
    assert facts["lineage"]["git_commit"] == "abc" and facts["lineage"]["prefect_flow_run_id"] == "fr"
    assert "name: forgeline-demo" in facts["config_yaml"]
    card = build_model_card(facts)
    assert "| test/bits_per_byte | 2.1000 | 2.0000 | +0.1000 (worse) |" in card
