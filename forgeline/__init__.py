"""Forgeline: an experiment-tracking pipeline for training and fine-tuning transformer models.

The Python API, for notebooks and scripts (the ``forgeline`` command does the same from a shell)::

    import forgeline

    cfg = forgeline.load_config("configs/smoke.yaml", overrides={"train.max_steps": 20})
    summary = forgeline.run(cfg)            # or forgeline.run("configs/smoke.yaml", overrides={...})
    print(summary.version, summary.metrics["test/bits_per_byte"])
    student = forgeline.compress(cfg)       # the champion distilled into <model>-small, with its trade-off

Importing this package is cheap and has no side effects: Prefect, MLflow and torch load on the first
:func:`run` (or :func:`compress`).
"""

from forgeline.api import ConfigError, compress, load_config, run

__all__ = ["ConfigError", "compress", "load_config", "run"]
