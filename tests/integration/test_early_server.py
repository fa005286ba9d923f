"""``forgeline run`` starts Prefect's temporary server before its heavy imports (flows/cli/startup.py).

Each case runs in a fresh interpreter with its own ``PREFECT_HOME``: Prefect reads its settings once per
process, and the server is a real ``uvicorn`` child that must be gone when the interpreter exits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 240  # seconds; a first start creates Prefect's database (about 36 s on a loaded 2-core machine)

PROBE = """
import json, os, urllib.request
from forgeline.flows.cli.startup import start_prefect_server_early
server = start_prefect_server_early()
if server is None:
    print(json.dumps({"server": None, "env": os.environ.get("PREFECT_API_URL")}))
    raise SystemExit(0)
server.wait_ready()
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL
with get_client(sync_client=True) as client:
    flows = client.read_flows()  # a real API call through Prefect's own client
with urllib.request.urlopen(server.api_url + "/health") as response:
    health = response.read().decode()
print(json.dumps({"server": server.api_url, "pid": server.process.pid, "setting": PREFECT_API_URL.value(),
                  "health": health, "flows": len(flows)}))
"""


def probe(tmp_path: Path, **env: str) -> dict[str, object]:
    scrub = ("PREFECT_API_URL", "PREFECT_PROFILE", "FORGELINE_EARLY_SERVER")
    base = {k: v for k, v in os.environ.items() if k not in scrub}
    base.update(
        PYTHONPATH=str(ROOT), PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false"
    )
    proc = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _alive(pid: int) -> bool:
    """Running (a zombie left for an init that does not reap counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _alive(pid)


def test_server_started_early_serves_prefect_and_stops_at_exit(tmp_path: Path) -> None:
    result = probe(tmp_path)
    url = str(result["server"])
    assert url.startswith("http://127.0.0.1:") and url.endswith("/api")
    assert result["setting"] == url  # Prefect's settings follow the variable set after its import
    assert result["health"] == "true"
    assert result["flows"] == 0
    assert _gone_within(int(result["pid"]), 10), "the temporary server outlived the command"  # type: ignore[arg-type]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_early_server_dies_with_a_killed_command(tmp_path: Path) -> None:
    script = (
        "import json, sys, time\n"
        "from forgeline.flows.cli.startup import start_prefect_server_early\n"
        "server = start_prefect_server_early()\n"
        "print(json.dumps({'pid': server.process.pid}), flush=True)\n"
        "time.sleep(600)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILE")}
    env.update(
        PYTHONPATH=str(ROOT), PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false"
    )
    command = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert command.stdout is not None
        server_pid = int(json.loads(command.stdout.readline())["pid"])
        assert _alive(server_pid)
        command.kill()  # SIGKILL: no atexit, no finally
        command.wait(timeout=30)
        assert _gone_within(server_pid, 30), "the temporary server outlived a killed command"
    finally:
        command.kill()
        command.wait(timeout=30)


@pytest.mark.slow  # a whole command; the first two tests keep the early server in the default suite
def test_no_early_server_when_an_api_url_is_configured(tmp_path: Path) -> None:
    home = tmp_path / "prefect-home"
    home.mkdir()
    (home / "profiles.toml").write_text(
        'active = "team"\n\n[profiles.team]\nPREFECT_API_URL = "http://127.0.0.1:9/api"\n', encoding="utf-8"
    )
    assert probe(tmp_path) == {"server": None, "env": None}  # the profile's server wins; nothing started
    assert probe(tmp_path, PREFECT_API_URL="http://127.0.0.1:9/api") == {
        "server": None,
        "env": "http://127.0.0.1:9/api",
    }


@pytest.mark.slow  # a whole command each; the first two tests keep the early server in the default suite
def test_early_server_can_be_turned_off(tmp_path: Path) -> None:
    assert probe(tmp_path, FORGELINE_EARLY_SERVER="0") == {"server": None, "env": None}
