"""The MLflow model registry: versions, aliases, version tags and the alias history, behind one small class.

The registry stage (:mod:`forgeline.tasks.registry.versions`) decides; :class:`MlflowRegistry` carries out
what it decides against MLflow. Promotions are serialized by a host-wide file lock, because MLflow aliases
have no compare-and-set.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from forgeline.tasks.locks import LockTimeout, host_lock
from forgeline.tasks.registry.history import ALIAS_HISTORY_TAG, alias_move, history_blob, parse_history
from forgeline.tasks.registry.versions import LINEAGE_TAG
from forgeline.tasks.tracking.models import logged_model_status
from forgeline.tasks.tracking.store import client, tracking_uri


@contextlib.contextmanager
def registry_lock(model_name: str, timeout: float = 600.0) -> Iterator[None]:
    """A host-wide lock around registry read-compare-write (MLflow aliases have no compare-and-set).

    It serializes promotions from every process on this machine; teams promoting from several machines
    should run promotions from one deployment (the ``pipeline`` flow on one pool with concurrency 1).

    Raises:
        TimeoutError: another process held it for more than ``timeout`` seconds.
    """
    path = Path(_lock_root()) / f"registry-{model_name}.lock"
    try:
        with host_lock(path, timeout):
            yield
    except LockTimeout:
        raise TimeoutError(f"registry lock {path} held for more than {timeout:.0f}s") from None


def _lock_root() -> str:
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        return str(Path(uri.removeprefix("sqlite:///")).parent / "locks")
    return os.environ.get("FORGELINE_HOME", ".forgeline") + "/locks"


def find_lineage_version(model_name: str, lineage: str) -> Any | None:
    """The registered version of a training lineage, if it exists (retries must not add another)."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client().search_model_versions(f"name = '{model_name}' and tags.`{LINEAGE_TAG}` = '{lineage}'")
    except MlflowException:
        return None
    return min(versions, key=lambda v: int(v.version)) if versions else None


def champion_version(model_name: str, alias: str) -> Any | None:
    """The version ``alias`` points to, or ``None`` (no such alias or model)."""
    from mlflow.exceptions import MlflowException

    try:
        return client().get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None


def alias_history(model_name: str) -> list[dict[str, Any]]:
    """The recorded alias moves of a registered model, oldest first (see :func:`parse_history`)."""
    raw = client().get_registered_model(model_name).tags.get(ALIAS_HISTORY_TAG)
    return parse_history(raw, model_name)


def record_alias_move(
    model_name: str,
    alias: str,
    version: str | int,
    reason: str,
    *,
    previous: str | int | None = None,
    kind: str = "gate",
) -> dict[str, Any]:
    """Append one alias move to the model's ``forgeline.alias_history`` tag.

    Call it right after moving the alias while holding :func:`registry_lock` (it reads, appends and writes
    the tag; the lock is not re-entrant, so it does not take it itself). The oldest entries are dropped when
    the JSON would exceed the tag size databases other than SQLite enforce.

    Args:
        model_name: Registered model.
        alias: The alias that moved (``champion``).
        version: The version it now points to.
        reason: Why (the gate's decision, ``manual promote``, ``rollback from 3``).
        previous: The version that held the alias before, if any.
        kind: ``gate``, ``promote``, ``force`` or ``rollback``.

    Returns:
        The entry recorded.
    """
    entry = alias_move(alias, version, reason, previous=previous, kind=kind)
    blob = history_blob([*alias_history(model_name), entry])
    client().set_registered_model_tag(model_name, ALIAS_HISTORY_TAG, blob)
    return entry


class MlflowRegistry:
    """What :mod:`forgeline.tasks.registry.versions` needs from a registry, done with ``MlflowClient``."""

    def lock(self, model_name: str) -> contextlib.AbstractContextManager[None]:
        """:func:`registry_lock`."""
        return registry_lock(model_name)

    def find_lineage_version(self, model_name: str, lineage: str) -> Any | None:
        """:func:`find_lineage_version`."""
        return find_lineage_version(model_name, lineage)

    def logged_model_status(self, model_uri: str) -> str | None:
        """``READY``/``PENDING``/``FAILED`` for a logged model URI, ``None`` for any other source."""
        return logged_model_status(model_uri)

    def create_version(self, model_name: str, model_uri: str, tags: dict[str, str]) -> Any:
        """Register ``model_uri`` as a new version of ``model_name`` with ``tags``."""
        import mlflow

        return mlflow.register_model(model_uri, model_name, tags=tags)

    def wait_ready(self, model_name: str, version: str, attempts: int = 50) -> Any:
        """The version once MLflow reports it ``READY`` (or as it is after ``attempts`` looks 0.1 s apart)."""
        c = client()
        mv = c.get_model_version(model_name, version)
        for _ in range(attempts - 1):
            if mv.status == "READY":
                break
            time.sleep(0.1)
            mv = c.get_model_version(model_name, version)
        return mv

    def champion(self, model_name: str, alias: str) -> Any | None:
        """:func:`champion_version`."""
        return champion_version(model_name, alias)

    def set_alias(self, model_name: str, alias: str, version: str) -> None:
        """Point ``alias`` at ``version``."""
        client().set_registered_model_alias(model_name, alias, version)

    def set_version_tags(self, model_name: str, version: str, tags: dict[str, str]) -> None:
        """Set tags on a model version."""
        c = client()
        for key, value in tags.items():
            c.set_model_version_tag(model_name, version, key, value)

    def record_alias_move(
        self, model_name: str, alias: str, version: str, reason: str, *, previous: str | None, kind: str
    ) -> None:
        """:func:`record_alias_move`."""
        record_alias_move(model_name, alias, version, reason, previous=previous, kind=kind)


def get_model_version(model_name: str, version: str) -> Any:
    """One model version (tags, source, status)."""
    return client().get_model_version(model_name, version)


def describe_version(model_name: str, version: str, description: str, tags: dict[str, str]) -> None:
    """Set a model version's description and tags (the model card)."""
    c = client()
    c.update_model_version(model_name, version, description=description)
    for key, value in tags.items():
        c.set_model_version_tag(model_name, version, key, value)
