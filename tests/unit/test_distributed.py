"""Data-parallel pieces without torchrun: rank seeding, the global batch, the launch command, and DDP's averaging."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

from forgeline.tasks.config import ConfigError, PipelineConfig, TrainConfig, load_config
from forgeline.tasks.train import distributed
from forgeline.tasks.train.batches import sample_batch
from forgeline.tasks.train.distributed import Parallel, global_batch, rank_seed, resolve_nproc, torchrun_command

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"


def test_rank_zero_draws_like_one_process_and_other_ranks_draw_their_own() -> None:
    data = torch.arange(10_000)
    draws = {}
    for rank in range(3):
        gen = torch.Generator().manual_seed(rank_seed(7, rank))
        draws[rank] = sample_batch(data, 4, 8, gen)[0]
    one_process = sample_batch(data, 4, 8, torch.Generator().manual_seed(7))[0]
    assert torch.equal(draws[0], one_process)
    assert not torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[1], draws[2])
    assert len({rank_seed(7, r) for r in range(64)}) == 64


def test_resumed_rank_redraws_deterministically_per_step() -> None:
    par = Parallel(rank=1, world_size=2)
    a, b, c = torch.Generator(), torch.Generator(), torch.Generator()
    par.reseed(a, 7, 10)
    par.reseed(b, 7, 10)
    par.reseed(c, 7, 20)
    assert torch.equal(torch.randint(100, (5,), generator=a), torch.randint(100, (5,), generator=b))
    assert not torch.equal(torch.randint(100, (5,), generator=b), torch.randint(100, (5,), generator=c))


@pytest.mark.parametrize(
    ("batch", "accum", "ranks", "expected"), [(8, 1, 1, 8), (8, 2, 1, 16), (8, 1, 2, 16), (4, 3, 4, 48)]
)
def test_global_batch_is_batch_x_accumulation_x_world(batch: int, accum: int, ranks: int, expected: int) -> None:
    assert global_batch(TrainConfig(batch_size=batch, grad_accum_steps=accum), ranks) == expected


def test_auto_processes_is_one_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_nproc(TrainConfig(nproc_per_node="auto")) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert resolve_nproc(TrainConfig(nproc_per_node="auto")) == 4
    assert resolve_nproc(TrainConfig(nproc_per_node="auto", device="cpu")) == 1
    assert distributed.world_size(TrainConfig(nproc_per_node="auto", nnodes=2, rdzv_endpoint="a:29400")) == 8


def test_world_size_keys_leave_the_config_hash_alone() -> None:
    base = load_config(SMOKE)
    wide = load_config(SMOKE, ["train.nproc_per_node=2", "train.nnodes=2", "train.rdzv_endpoint=host:29400"])
    assert wide.config_hash() == base.config_hash()  # a checkpoint resumes under any world size
    assert PipelineConfig().config_hash() == PipelineConfig(train=TrainConfig(dist_timeout_s=5)).config_hash()


def test_bad_world_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="rdzv_endpoint"):
        load_config(SMOKE, ["train.nnodes=2"])
    with pytest.raises(ConfigError, match="nproc_per_node"):
        load_config(SMOKE, ["train.nproc_per_node=0"])


def test_torchrun_command_standalone_and_multi_node(tmp_path: Path) -> None:
    one = torchrun_command(TrainConfig(nproc_per_node=2), tmp_path / "spec.json", "run1")
    assert one[1:3] == ["-m", "torch.distributed.run"]
    assert "--standalone" in one and "--nproc-per-node=2" in one and "--max-restarts=0" in one
    assert one[-3:] == ["-m", "forgeline.flows.distributed", str(tmp_path / "spec.json")]
    multi = torchrun_command(
        TrainConfig(nproc_per_node=2, nnodes=2, rdzv_endpoint="gpu-a:29400"), tmp_path / "spec.json", "run1"
    )
    assert "--standalone" not in multi
    assert {"--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=gpu-a:29400", "--rdzv-id=run1"} <= set(multi)


def test_one_process_agrees_with_itself() -> None:
    loss, stop = Parallel().agree(torch.tensor(6.0), 3, stopping=True)
    assert (loss, stop) == (2.0, True)


def test_only_the_chosen_rank_keeps_the_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGELINE_FAULT_RANK", "1")
    monkeypatch.setenv("FORGELINE_FAULT_KIND", "sigkill")
    distributed.keep_faults_for_this_rank(1)
    assert os.environ["FORGELINE_FAULT_KIND"] == "sigkill"
    distributed.keep_faults_for_this_rank(0)
    assert "FORGELINE_FAULT_KIND" not in os.environ


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_grads(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    par = distributed.init_ranks(TrainConfig(device="cpu", dist_timeout_s=60))
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    wrapped = par.wrap(model, torch.device("cpu"))
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))  # (4 micro-batches x 2 ranks) rows
    for micro in range(2):  # rank r, micro m takes rows 2*(2r+m) ... +2
        rows = x[2 * (2 * rank + micro) : 2 * (2 * rank + micro) + 2]
        with par.micro_batch(last=micro == 1):
            (wrapped(rows).pow(2).mean() / 2).backward()
    loss, stop = par.agree(torch.tensor(float(rank + 1)), 1, stopping=rank == 1)
    torch.save({"grad": model.weight.grad.clone(), "loss": loss, "stop": stop}, f"{out}-{rank}.pt")
    distributed.leave_ranks()


def test_ddp_averages_accumulated_gradients_like_one_big_batch(tmp_path: Path) -> None:
    out = str(tmp_path / "grads")
    torch.multiprocessing.spawn(_rank_grads, args=(_free_port(), out), nprocs=2, join=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    model(x).pow(2).mean().backward()
    for rank in (0, 1):
        got = torch.load(f"{out}-{rank}.pt")
        torch.testing.assert_close(got["grad"], model.weight.grad)
        assert got["loss"] == 1.5  # mean of the ranks' 1.0 and 2.0
        assert got["stop"] is True  # rank 1 alone was asked to stop: both stop


_CHILD = """
import pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
signal.signal(signal.SIGTERM, lambda *_: (out.write_text("terminated"), sys.exit(0)))
out.with_suffix(".started").write_text("1")
time.sleep(60)
"""

_LAUNCHER = """
import sys
from forgeline.tasks.train.distributed import launch
launch([sys.executable, "-c", sys.argv[1], sys.argv[2]], on_progress=lambda *a: None)
"""


def test_a_launcher_killed_outright_still_stops_torchrun(tmp_path: Path) -> None:
    """The lineage lock dies with the launcher: what it launched must not keep training (SIGKILL included)."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "child.txt"
    launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER, _CHILD, str(out)])
    deadline = time.monotonic() + 60
    while not out.with_suffix(".started").exists():
        assert launcher.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    while not out.exists():
        assert time.monotonic() < deadline, "the launched process outlived its launcher"
        time.sleep(0.1)
    assert out.read_text() == "terminated"
