"""Addresses of runs and model versions in the MLflow UI."""

from __future__ import annotations

LOCAL_UI = "http://127.0.0.1:5000"


def ui_base_url(tracking_uri: str) -> str:
    """Where the MLflow UI for ``tracking_uri`` is (``forgeline ui`` serves a database store on LOCAL_UI)."""
    return (tracking_uri if tracking_uri.startswith("http") else LOCAL_UI).rstrip("/")


def ui_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The MLflow UI page of a run: the server itself, or the local UI's default address for a database store."""
    return f"{ui_base_url(tracking_uri)}/#/experiments/{experiment_id}/runs/{run_id}"


def ui_model_version_url(tracking_uri: str, model_name: str, version: str) -> str:
    """The MLflow UI page of a registered model version (same UI address as :func:`ui_run_url`)."""
    return f"{ui_base_url(tracking_uri)}/#/models/{model_name}/versions/{version}"
