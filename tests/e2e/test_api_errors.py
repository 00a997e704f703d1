"""Error shapes and info routes a new user meets first: unknown routes and wrong models in
OpenAI's error shape, max_tokens 0, /model_info and /server_info, and a non-streaming
client that disconnects logging one INFO line (no ASGI traceback)."""

import socket
import subprocess
import sys
import time

import httpx

from pdserve.launch.cli import wait_healthy
from pdserve.net import free_port
from tests.conftest import stop_group

Q = [{"role": "user", "content": "hi"}]


def assert_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    return err


def test_unknown_route_is_openai_404(server):
    err = assert_openai_error(httpx.get(server.url + "/v1/nope", timeout=10), 404)
    assert "/v1/nope" in err["message"]
    assert "detail" not in httpx.post(server.url + "/nope", timeout=10).json()


def test_wrong_model_is_404_model_not_found(server):
    for path, body in (
        ("/v1/chat/completions", {"model": "gpt-4", "messages": Q}),
        ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}),
    ):
        err = assert_openai_error(httpx.post(server.url + path, json=body, timeout=30), 404)
        assert err["code"] == "model_not_found" and err["param"] == "model" and "gpt-4" in err["message"]


def test_max_tokens_zero_is_400(server):
    for path, body in (
        ("/v1/chat/completions", {"messages": Q, "max_tokens": 0}),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}),
    ):
        err = assert_openai_error(httpx.post(server.url + path, json=body, timeout=30), 400)
        assert err["param"] == "max_tokens" and "at least 1" in err["message"]


def test_info_aliases_and_served_model_name(server):
    for a, b in (("/get_model_info", "/model_info"), ("/get_server_info", "/server_info")):
        ra, rb = httpx.get(server.url + a, timeout=10), httpx.get(server.url + b, timeout=10)
        assert ra.status_code == rb.status_code == 200
        assert ra.json().keys() == rb.json().keys()
    info = httpx.get(server.url + "/get_server_info", timeout=10).json()
    assert info["served_model_name"] == httpx.get(server.url + "/v1/models").json()["data"][0]["id"]


def test_non_streaming_disconnect_logs_one_info_line(tmp_path):
    port = free_port()
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pdserve.cli",
            "serve",
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--max-total-tokens",
            "4096",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, time.time() + 180)
        body = b'{"text": "Story:", "sampling_params": {"max_new_tokens": 2000, "ignore_eos": true}}'
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(
                b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            time.sleep(1.0)
        deadline = time.time() + 20
        while time.time() < deadline:
            ld = httpx.get(url + "/get_load", timeout=10).json()
            if (
                ld["num_running_reqs"] == 0
                and ld["num_used_pages"] == 0
                and "client disconnected" in (tmp_path / "server.log").read_text()
            ):
                break
            time.sleep(0.2)
        text = (tmp_path / "server.log").read_text()
        assert ld["num_running_reqs"] == 0 and ld["num_used_pages"] == 0, ld  # the abort still works
        assert "Exception in ASGI application" not in text and "Traceback" not in text, text[-3000:]
        lines = [ln for ln in text.splitlines() if "client disconnected" in ln]
        assert len(lines) == 1 and "INFO" in lines[0], text[-3000:]
    finally:
        stop_group(proc)
        log.close()
