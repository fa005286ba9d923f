"""Figures and the Prefect summary markdown: what a person looks at instead of reading numbers."""

from __future__ import annotations

from forgeline.tasks.tracking import figures


def test_loss_curve_has_a_wall_time_panel_when_history_is_timed() -> None:
    import matplotlib.pyplot as plt

    history = [
        {"step": 10, "train/loss": 3.0, "time": 1.0},
        {"step": 20, "train/loss": 2.5, "time": 2.1},
        {"step": 20, "val/loss": 2.6, "time": 2.3},
    ]
    fig = figures.loss_curve_figure(history)
    assert [ax.get_xlabel() for ax in fig.axes] == ["step", "wall time (s since training started)"]
    assert all(len(ax.get_lines()) == 2 for ax in fig.axes)
    plt.close(fig)
    old = figures.loss_curve_figure([{"step": 10, "train/loss": 3.0}])  # a history from before "time"
    assert len(old.axes) == 1
    plt.close(old)


def test_cleaning_report_figure() -> None:
    import matplotlib.pyplot as plt

    fig = figures.cleaning_report_figure(
        {"empty": 0, "duplicate": 5}, {"train": 90, "validation": 5, "test": 5}, rows_in=105
    )
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["Dropped per rule (105 read)", "Records per split"]
    plt.close(fig)


def test_summary_markdown_links_run_and_version() -> None:
    from forgeline.flows.pipeline import PipelineResult, summary_markdown

    summary = PipelineResult(
        experiment_name="demo",
        experiment_id="3",
        run_id="abc123",
        tracking_uri="sqlite:////tmp/mlflow.db",
        fingerprint="f" * 64,
        model_name="demo-lm",
        version="4",
        promoted=True,
        decision="better: 2.1 vs champion 2.3 bits/byte",
        metrics={"test/bits_per_byte": 2.1},
    )
    text = summary_markdown(summary)
    assert "| `test/bits_per_byte` | 2.1000 |" in text
    assert "promoted to champion: better: 2.1 vs champion 2.3 bits/byte" in text
    assert "http://127.0.0.1:5000/#/experiments/3/runs/abc123" in text
    assert "http://127.0.0.1:5000/#/models/demo-lm/versions/4" in text
