"""Shards: each CPU batch cut into slices that run forward and backward at once on their own threads."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from forgeline.tasks.config import TrainConfig, load_config
from forgeline.tasks.train import batches, loop
from forgeline.tasks.train.kinds import train_task_model
from forgeline.tasks.train.loop import TrainCallbacks
from forgeline.tasks.train.shards import Shards, draws_random, plan_shards, split_rows, trainable

from .test_train_speed_levers import BASE
from .test_train_speed_levers import dataset_dir as dataset_dir  # noqa: F401  (the module's fixture)

CPU = torch.device("cpu")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    emb = torch.nn.Embedding(11, 8)
    head = torch.nn.Linear(8, 11, bias=False)
    head.weight = emb.weight  # tied, as a GPT's: its gradient comes from two places
    return torch.nn.Sequential(emb, torch.nn.Linear(8, 8), torch.nn.GELU(), head)


def _loss_fn(model: torch.nn.Module):  # noqa: ANN202
    return lambda x, y: torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())


@pytest.mark.parametrize(("n", "k"), [(12, 2), (7, 2), (5, 3), (3, 8), (1, 2)])
def test_split_rows_covers_every_row_once_in_near_equal_slices(n: int, k: int) -> None:
    parts = split_rows(n, k)
    rows = [i for part in parts for i in range(n)[part]]
    assert rows == list(range(n))
    sizes = [part.stop - part.start for part in parts]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1 and len(parts) == min(n, k)


def test_auto_shards_only_an_uncompiled_single_process_cpu_step(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert plan_shards("auto", device=CPU, batch_size=12, compiled=False, distributed=False) == 2
    assert plan_shards("auto", device=CPU, batch_size=1, compiled=False, distributed=False) == 1
    assert plan_shards("auto", device=CPU, batch_size=12, compiled=True, distributed=False) == 1
    assert plan_shards("auto", device=CPU, batch_size=12, compiled=False, distributed=True) == 1
    assert plan_shards("auto", device=torch.device("cuda"), batch_size=12, compiled=False, distributed=False) == 1
    assert plan_shards(4, device=CPU, batch_size=3, compiled=False, distributed=False) == 3
    assert plan_shards(1, device=CPU, batch_size=12, compiled=False, distributed=False) == 1
    # Dropout draws from one global generator: shards would draw in whichever order their threads run.
    assert plan_shards("auto", device=CPU, batch_size=12, compiled=False, distributed=False, random=True) == 1
    assert plan_shards(2, device=CPU, batch_size=12, compiled=False, distributed=False, random=True) == 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert plan_shards("auto", device=CPU, batch_size=12, compiled=False, distributed=False) == 1


@pytest.mark.parametrize("count", [2, 3])
def test_sharded_gradients_are_the_whole_batchs_and_the_same_every_run(count: int) -> None:
    x = torch.randint(0, 11, (7, 5), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 11, (7, 5), generator=torch.Generator().manual_seed(2))
    whole = _model()
    expected_loss = _loss_fn(whole)(x, y)
    (expected_loss / 2).backward()  # as one micro-batch of two
    runs = []
    for _ in range(2):
        model = _model()
        seen: set[str] = set()

        def loss_fn(
            a: torch.Tensor, b: torch.Tensor, model: torch.nn.Module = model, seen: set[str] = seen
        ) -> torch.Tensor:
            seen.add(threading.current_thread().name)
            return _loss_fn(model)(a, b)

        with Shards(count) as pool:
            loss = pool.backward(loss_fn, x, y, trainable(model), divisor=2)
        assert seen and all(name.startswith("forgeline-shard") for name in seen)  # none on the caller's thread
        assert torch.allclose(loss, expected_loss, atol=1e-6)
        for p, q in zip(model.parameters(), whole.parameters(), strict=True):
            assert torch.allclose(p.grad, q.grad, atol=1e-6)
        runs.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))  # summed in shard order: bit for bit


def test_sharded_gradients_add_to_those_already_there() -> None:
    x, y = torch.randint(0, 11, (4, 3)), torch.randint(0, 11, (4, 3))
    model, whole = _model(), _model()
    for m in (model, whole):
        _loss_fn(m)(x, y).backward()  # a first micro-batch
    _loss_fn(whole)(x, y).backward()
    with Shards(2) as pool:
        pool.backward(_loss_fn(model), x, y, trainable(model))
    for p, q in zip(model.parameters(), whole.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)


def test_the_transform_reaches_every_shards_loss() -> None:
    x, y = torch.randint(0, 11, (4, 3)), torch.randint(0, 11, (4, 3))
    model = _model()
    with Shards(2) as pool:
        loss = pool.backward(_loss_fn(model), x, y, trainable(model), transform=lambda loss: loss * float("nan"))
    assert torch.isnan(loss) and all(torch.isnan(p.grad).all() for p in model.parameters())


def test_the_caller_keeps_one_intra_op_thread_while_shards_run_and_gets_its_own_back() -> None:
    before = torch.get_num_threads()
    with Shards(2):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with Shards(1):  # no shards: nothing changes
        assert torch.get_num_threads() == before


def test_sharded_validation_loss_is_the_unsharded_one() -> None:
    model = _model()
    data = torch.randint(0, 11, (500,))
    val = batches.fixed_batches(data, TrainConfig(eval_batches=5, batch_size=3), 6, 4)
    loss_fn = _loss_fn(model)
    plain = batches.estimate_loss(model, val, CPU, TrainConfig(), loss_fn)
    with Shards(2) as pool:
        assert batches.estimate_loss(model, val, CPU, TrainConfig(), loss_fn, pool) == pytest.approx(plain, rel=1e-9)


def test_dropout_is_what_makes_a_forward_random() -> None:
    assert not draws_random(_model())
    assert draws_random(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1)))
    assert not draws_random(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.0)))


def test_cpu_shards_keep_the_config_hash() -> None:
    assert load_config(None, ["train.cpu_shards=1"]).config_hash() == load_config(None, []).config_hash()


def _collect(seen: list[float]):  # noqa: ANN202
    return lambda step, metrics: seen.append(metrics["train/loss"])


def test_a_sharded_run_learns_what_an_unsharded_one_does(
    dataset_dir: str,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    counts: list[int] = []

    class Counted(Shards):
        def __init__(self, count: int, threads_each: int | None = None) -> None:
            counts.append(count)
            super().__init__(count, threads_each)

    monkeypatch.setattr(loop, "Shards", Counted)
    losses = {}
    for setting in ("1", "2"):
        cfg = load_config(None, [*BASE, f"train.cpu_shards={setting}"])
        seen: list[float] = []
        result = train_task_model(cfg, dataset_dir, tmp_path / setting, TrainCallbacks(on_metrics=_collect(seen)))
        assert result.steps == 20
        losses[setting] = (seen, result.final_val_loss)
    assert losses["1"][0] == pytest.approx(losses["2"][0], rel=1e-4)  # the same batches, the same updates
    assert losses["1"][1] == pytest.approx(losses["2"][1], rel=1e-4)
    assert counts == [1, 2]
