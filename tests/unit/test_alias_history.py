"""Replaying recorded alias moves into the champion stack that `forgeline rollback` walks."""

from __future__ import annotations

from forgeline.tasks.registry.history import champion_stack, previous_champion


def move(version: str, previous: str | None, kind: str = "gate", alias: str = "champion") -> dict[str, str | None]:
    return {"alias": alias, "version": version, "previous": previous, "kind": kind, "reason": "", "at": ""}


def test_promotions_push_and_rollbacks_pop() -> None:
    entries = [move("1", None), move("2", "1"), move("3", "2", "force")]
    assert champion_stack(entries, "champion", "3") == ["1", "2", "3"]
    entries.append(move("2", "3", "rollback"))
    stack = champion_stack(entries, "champion", "2")
    assert stack == ["1", "2"]
    assert previous_champion(stack) == "1"
    entries.append(move("1", "2", "rollback"))
    stack = champion_stack(entries, "champion", "1")
    assert stack == ["1"]
    assert previous_champion(stack) is None


def test_gaps_are_patched_from_previous_and_current() -> None:
    # Recording started after version 1 was champion; version 4 was promoted by code that does not record.
    entries = [move("2", "1", "promote"), move("3", "2")]
    assert champion_stack(entries, "champion", "4") == ["1", "2", "3", "4"]
    assert previous_champion(champion_stack(entries, "champion", "4")) == "3"


def test_other_aliases_are_ignored() -> None:
    entries = [move("1", None), move("5", "4", alias="staging"), move("2", "1")]
    assert champion_stack(entries, "champion", "2") == ["1", "2"]


def test_rollback_skips_deleted_versions() -> None:
    stack = ["1", "2", "3"]
    assert previous_champion(stack, exists=lambda v: v != "2") == "1"
    assert previous_champion([], exists=None) is None
    assert previous_champion(["2", "2"]) is None
