"""Reliability row E3: the servers ``forgeline up`` starts listen on loopback only and refuse foreign hosts.

``forgeline up`` -> every listening socket of the stack is on 127.0.0.1 (and the servers' ports cannot be
reached on any other address of this machine) -> raw HTTP requests: the stack's own ``Host`` and
``Origin`` are answered, a foreign ``Host`` (DNS rebinding) is refused by both servers, a foreign
``Origin`` is refused by Prefect for every request (websocket handshakes included) and by MLflow for
state-changing requests, while MLflow answers a foreign-Origin read without CORS headers, so a browser
hides it from the page -> ``forgeline down`` -> no process left. About 40 s on 2 cores.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket

import psutil
import pytest

from tests.e2e.conftest import Project, stack_family

pytestmark = pytest.mark.e2e

EVIL = "evil.example"


def _request(
    port: int, method: str, path: str, headers: dict[str, str], body: dict | None = None
) -> tuple[int, dict[str, str], str]:
    """One raw request to 127.0.0.1:port with exactly these headers (``Host`` included)."""
    con = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        con.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in {**headers, **({"Content-Type": "application/json"} if payload else {})}.items():
            con.putheader(name, value)
        if payload is not None:
            con.putheader("Content-Length", str(len(payload)))
        con.endheaders(payload)
        resp = con.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read().decode(errors="replace")
    finally:
        con.close()


def _other_addresses() -> list[str]:
    """This machine's IPv4 addresses other than loopback."""
    return sorted(
        {
            addr.address
            for addrs in psutil.net_if_addrs().values()
            for addr in addrs
            if addr.family == socket.AF_INET and not addr.address.startswith("127.")
        }
    )


def _refused(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=3):
            return False
    except OSError:
        return True


def test_servers_bind_loopback_and_refuse_foreign_hosts(project: Project) -> None:
    pp, mp = project.prefect_port, project.mlflow_port
    project.forgeline("up", "--prefect-port", str(pp), "--mlflow-port", str(mp), "--pool", "cpu")
    family = stack_family(project.home)
    try:
        _check_listening(family, pp, mp)
        _check_prefect(pp)
        _check_mlflow(mp)
    finally:
        down = project.forgeline("down")
    assert "prefect-server" in down.stdout and "mlflow-server" in down.stdout
    gone, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, [p.pid for p in alive]


def _check_listening(family: list[psutil.Process], pp: int, mp: int) -> None:
    listening = [
        (conn.laddr.ip, conn.laddr.port)
        for proc in family
        for conn in proc.net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN
    ]
    assert {("127.0.0.1", pp), ("127.0.0.1", mp)} <= set(listening), listening
    assert all(ip == "127.0.0.1" for ip, _ in listening), listening
    for address in _other_addresses():
        assert _refused(address, pp) and _refused(address, mp), address


def _check_prefect(port: int) -> None:
    own = f"127.0.0.1:{port}"
    for host in (own, f"localhost:{port}"):
        assert _request(port, "GET", "/api/health", {"Host": host})[0] == 200
    for path in ("/api/health", "/", "/api/flows/filter"):
        method = "POST" if path.endswith("filter") else "GET"
        for host in (EVIL, f"{EVIL}:{port}", f"192.168.0.10:{port}"):
            status, _, text = _request(port, method, path, {"Host": host}, {} if method == "POST" else None)
            assert status == 403, (path, host, status, text)
            assert "not allowed" in text
    # Origin: the server's own page passes (with CORS headers naming it); anything else is refused,
    # reads included, and so is another program on this machine (another port).
    status, headers, _ = _request(port, "POST", "/api/flows/filter", {"Host": own, "Origin": f"http://{own}"}, {})
    assert status == 200 and headers.get("access-control-allow-origin") == f"http://{own}"
    for origin in (f"http://{EVIL}", f"https://{EVIL}", "http://localhost:9999", "null"):
        for method, path in (("GET", "/api/health"), ("POST", "/api/flows/filter")):
            status, headers, _ = _request(
                port, method, path, {"Host": own, "Origin": origin}, {} if method == "POST" else None
            )
            assert status == 403, (origin, method, path, status)
            assert "access-control-allow-origin" not in headers
    asyncio.run(_check_prefect_websocket(port))


async def _check_prefect_websocket(port: int) -> None:
    import websockets

    url = f"ws://127.0.0.1:{port}/api/events/out"
    async with websockets.connect(url, open_timeout=30):
        pass  # a Python client (no Origin) connects
    with pytest.raises(websockets.exceptions.InvalidStatus, match="403"):
        async with websockets.connect(url, additional_headers={"Origin": f"http://{EVIL}"}, open_timeout=30):
            pass


def _check_mlflow(port: int) -> None:
    own = f"127.0.0.1:{port}"
    search = "/api/2.0/mlflow/experiments/search"
    body = {"max_results": 1}
    assert _request(port, "GET", f"{search}?max_results=1", {"Host": own})[0] == 200
    assert _request(port, "POST", search, {"Host": f"localhost:{port}"}, body)[0] == 200
    for host in (EVIL, f"{EVIL}:{port}", f"192.168.0.10:{port}"):
        for method, path in (("GET", f"{search}?max_results=1"), ("POST", search), ("GET", "/")):
            status, _, _ = _request(port, method, path, {"Host": host}, body if method == "POST" else None)
            assert status == 403, (host, method, path, status)
    # A cross-site write is refused; a cross-site read is answered without CORS headers, so the browser
    # does not hand it to the page (MLflow's own rule: it blocks only state-changing requests).
    status, headers, _ = _request(port, "POST", search, {"Host": own, "Origin": f"http://{own}"}, body)
    assert status == 200 and headers.get("access-control-allow-origin") == f"http://{own}"
    status, _, _ = _request(port, "POST", search, {"Host": own, "Origin": f"http://{EVIL}"}, body)
    assert status == 403
    status, headers, _ = _request(port, "GET", f"{search}?max_results=1", {"Host": own, "Origin": f"http://{EVIL}"})
    assert status == 200 and "access-control-allow-origin" not in headers
