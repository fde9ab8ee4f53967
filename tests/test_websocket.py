"""Chat completions over a WebSocket, with the `websockets` client package, against a
real server and a real gateway in front of it: the same answer as SSE, cancellation by
a client message or a disconnect (the engine stops generating), errors that keep the
socket open, and keys checked at the handshake."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest
from server_utils import ServerProcess, free_port, wait_healthy
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

QUESTION = [{"role": "user", "content": "Name the capital city of France."}]
AUTH = {"Authorization": "Bearer sk-ws"}


@pytest.fixture(scope="module")
def front(tmp_path_factory):
    d = tmp_path_factory.mktemp("ws")
    srv = ServerProcess("--served-model-name", "lite", log_dir=d)
    port = free_port()
    (d / "keys.toml").write_text('[[keys]]\nid = "ws"\nkey = "sk-ws"\n')
    (d / "gw.toml").write_text(f'[gateway]\nport = {port}\napi_keys = "{d / "keys.toml"}"\n'
                               f'[tiers.lite]\nmodels = ["lite"]\nbackends = ["{srv.url}"]\n')
    gw = subprocess.Popen([sys.executable, "-m", "deepserve.cli", "gateway", "--config",
                           str(d / "gw.toml")], stdout=open(d / "gw.log", "w"),
                          stderr=subprocess.STDOUT)
    assert wait_healthy(f"http://127.0.0.1:{port}", gw, 60), (d / "gw.log").read_text()
    yield srv, f"http://127.0.0.1:{port}"
    gw.terminate()
    gw.wait(30)
    srv.stop()


def ws_url(http: str) -> str:
    return http.replace("http://", "ws://") + "/v1/chat/completions/ws"


def receive_answer(ws) -> tuple[str, list[dict]]:
    """Messages up to [DONE]: the text of the deltas, and every message."""
    messages = []
    while (msg := ws.recv(timeout=120)) != "[DONE]":
        messages.append(json.loads(msg))
    text = "".join((m.get("choices") or [{}])[0].get("delta", {}).get("content") or ""
                   for m in messages if m.get("object") == "chat.completion.chunk")
    return text, messages


def running(srv) -> float:
    for line in httpx.get(f"{srv.url}/metrics").text.splitlines():
        if line.startswith("deepserve_num_requests_running{"):
            return float(line.split()[-1])
    raise AssertionError("no running gauge")


@pytest.mark.parametrize("through", ["server", "gateway"])
def test_a_chat_streams_over_a_websocket_as_over_sse(front, through):
    srv, gw = front
    base = srv.url if through == "server" else gw
    sse = httpx.post(f"{srv.url}/v1/chat/completions", timeout=120, json={
        "model": "lite", "messages": QUESTION, "max_tokens": 12, "temperature": 0})
    expected = sse.json()["choices"][0]["message"]["content"]
    with connect(ws_url(base), additional_headers=AUTH) as ws:  # the key: for the gateway
        for _ in range(2):  # one socket, several requests
            ws.send(json.dumps({"model": "lite", "messages": QUESTION, "max_tokens": 12,
                                "temperature": 0}))
            text, messages = receive_answer(ws)
            assert text == expected and "Paris" in text
            assert messages[-1]["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("through", ["server", "gateway"])
def test_a_client_message_cancels_and_the_socket_goes_on(front, through):
    srv, gw = front
    base = srv.url if through == "server" else gw
    with connect(ws_url(base), additional_headers=AUTH) as ws:
        ws.send(json.dumps({"model": "lite", "messages": QUESTION, "max_tokens": 2000,
                            "ignore_eos": True}))
        for _ in range(3):
            assert json.loads(ws.recv(timeout=120))["object"] == "chat.completion.chunk"
        ws.send(json.dumps({"type": "cancel"}))
        rest = []
        while (msg := ws.recv(timeout=60)) != "[DONE]":
            rest.append(json.loads(msg))
        assert rest[-1] == {"type": "cancelled"} and len(rest) < 200
        deadline = time.time() + 10
        while running(srv) and time.time() < deadline:
            time.sleep(0.1)
        assert running(srv) == 0  # the engine stopped generating
        ws.send(json.dumps({"model": "lite", "messages": QUESTION, "max_tokens": 4}))
        text, _ = receive_answer(ws)
        assert text


def test_a_disconnect_cancels(front):
    srv, _ = front
    ws = connect(ws_url(srv.url), additional_headers=AUTH)
    ws.send(json.dumps({"model": "lite", "messages": QUESTION, "max_tokens": 2000,
                        "ignore_eos": True}))
    for _ in range(3):
        ws.recv(timeout=120)
    assert running(srv) == 1
    ws.close()
    deadline = time.time() + 10
    while running(srv) and time.time() < deadline:
        time.sleep(0.1)
    assert running(srv) == 0


def test_errors_keep_the_socket_open_and_keys_are_checked(front, tmp_path):
    srv, gw = front
    with connect(ws_url(srv.url)) as ws:
        ws.send("not json")
        err = json.loads(ws.recv(timeout=30))
        assert "JSON object" in err["error"]["message"]
        assert ws.recv(timeout=30) == "[DONE]"
        ws.send(json.dumps({"model": "lite", "messages": QUESTION, "temperature": -1}))
        err = json.loads(ws.recv(timeout=30))
        assert err["error"]["param"] == "temperature" and ws.recv(timeout=30) == "[DONE]"
    for url, headers in ((srv.url, {}), (gw, AUTH)):  # a binary frame: the same in-band error
        with connect(ws_url(url), additional_headers=headers) as ws:
            ws.send(b'{"messages": []}')
            err = json.loads(ws.recv(timeout=30))
            assert "binary frame" in err["error"]["message"]
            assert ws.recv(timeout=30) == "[DONE]"
            ws.send(json.dumps({"model": "lite", "messages": QUESTION, "max_tokens": 3}))
            assert receive_answer(ws)[0]  # the socket goes on
    with connect(ws_url(gw)) as ws:  # the gateway checks the key per request
        ws.send(json.dumps({"model": "lite", "messages": QUESTION}))
        err = json.loads(ws.recv(timeout=30))
        assert err["error"]["code"] == "invalid_api_key" and ws.recv(timeout=30) == "[DONE]"
    keyed = ServerProcess("--api-key", "sk-ws", "--no-warmup", log_dir=tmp_path)
    try:  # a server with a key refuses the handshake itself
        with pytest.raises(InvalidStatus) as refused:
            connect(ws_url(keyed.url))
        assert refused.value.response.status_code == 403
        with connect(ws_url(keyed.url), additional_headers=AUTH) as ws:
            ws.send(json.dumps({"messages": QUESTION, "max_tokens": 3}))
            assert receive_answer(ws)[0]
    finally:
        keyed.stop()
