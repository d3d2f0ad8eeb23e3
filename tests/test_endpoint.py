"""Tests of endpoint.py over real HTTP against a small standard-library server started here: request body and key,
retries on 429/5xx/timeouts/garbage, no retry on other 4xx, concurrency, order, and unreachable endpoints.
Run: .venv/bin/python -m pytest tests/test_endpoint.py -x -q
"""
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import endpoint

FAST = dict(backoff=0.01, timeout=2)


class Handler(BaseHTTPRequestHandler):
    """Behaves by the last message's text: 'e429'/'e500' fail on the first call, 'e400' and 'always500' always fail,
    'slow' sleeps 4 s on the first call, 'garbage' answers non-JSON, 'null' answers content null, 'gate' waits
    (up to 5 s) until server.gate_n requests are in flight at once, then 0.1 s more; anything else is echoed back
    upper-cased."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._send(404, b"{}")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        text = body["messages"][-1]["content"]
        with server.lock:
            server.bodies.append(body)
            server.headers.append(dict(self.headers))
            server.calls[text] = calls = server.calls.get(text, 0) + 1
            server.in_flight += 1
            server.peak = max(server.peak, server.in_flight)
            if server.in_flight >= server.gate_n:
                server.gate.set()
        self.counted = True
        try:
            if text == "gate":
                server.gate.wait(5)  # concurrency is counted, not timed: a loaded machine only makes this slower
                time.sleep(0.1)  # held open a moment so a request over the cap would be counted in the peak
            if text == "slow" and calls == 1:
                time.sleep(4.0)  # far past the client's timeout, so a loaded machine cannot blur the two
            if text in ("e429", "e500") and calls == 1:
                return self._send(int(text[1:]), b'{"error": "try later"}', {"Retry-After": "0"})
            if text in ("e400", "always500"):
                return self._send(400 if text == "e400" else 500, b'{"error": "bad model"}')
            if text == "garbage":
                return self._send(200, b"<html>not json</html>")
            content = None if text == "null" else text.upper()
            reply = {"choices": [{"message": {"role": "assistant", "content": content}}]}
            self._send(200, json.dumps(reply).encode())
        finally:
            self._done()

    def _done(self):
        """The request stops counting as in flight BEFORE its reply is written: once the client has the reply it
        may send the next request while this thread is still unwinding, which would count twice."""
        if getattr(self, "counted", False):
            with self.server.lock:
                self.server.in_flight -= 1
            self.counted = False

    def _send(self, status, data, headers=None):
        self._done()
        try:
            self.send_response(status)
            for key, value in {"Content-Type": "application/json", "Content-Length": str(len(data)),
                               **(headers or {})}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and left


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.lock, srv.bodies, srv.headers, srv.calls, srv.in_flight, srv.peak = threading.Lock(), [], [], {}, 0, 0
    srv.gate, srv.gate_n = threading.Event(), 1
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    yield srv
    srv.shutdown()
    srv.server_close()


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_completions_url():
    assert endpoint.completions_url("http://h:8000/v1") == "http://h:8000/v1/chat/completions"
    assert endpoint.completions_url("http://h:8000/v1/") == "http://h:8000/v1/chat/completions"
    assert endpoint.completions_url("http://h:8000") == "http://h:8000/v1/chat/completions"
    assert endpoint.completions_url("https://api.x.com/v1/chat/completions") == \
        "https://api.x.com/v1/chat/completions"
    with pytest.raises(ValueError, match="'localhost:8000' is not an http"):
        endpoint.completions_url("localhost:8000")


def test_chat_body_and_key(server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert endpoint.chat(server.url, "m1", user("hello"), temperature=0.7, max_tokens=5, extra={"top_p": 0.9},
                         **FAST) == "HELLO"
    body = server.bodies[-1]
    assert body == {"model": "m1", "messages": user("hello"), "temperature": 0.7, "max_tokens": 5, "top_p": 0.9}
    assert "Authorization" not in server.headers[-1]
    monkeypatch.setenv("MY_KEY", "abc")
    endpoint.chat(server.url, "m1", user("x"), api_key_env="MY_KEY", **FAST)
    assert server.headers[-1]["Authorization"] == "Bearer abc"
    assert endpoint.chat(server.url, "m1", user("null"), **FAST) == ""


def test_retries_on_429_500_timeout_and_garbage(server):
    assert endpoint.chat(server.url, "m", user("e429"), **FAST) == "E429"
    assert endpoint.chat(server.url, "m", user("e500"), **FAST) == "E500"
    assert server.calls["e429"] == 2 and server.calls["e500"] == 2
    assert endpoint.chat(server.url, "m", user("slow"), retries=1, backoff=0.01, timeout=1.5) == "SLOW"
    assert server.calls["slow"] == 2
    with pytest.raises(endpoint.EndpointError, match=r"failed after 3 tries: malformed reply"):
        endpoint.chat(server.url, "m", user("garbage"), retries=2, **FAST)
    assert server.calls["garbage"] == 3
    with pytest.raises(endpoint.EndpointError, match=r"failed after 2 tries: HTTP 500"):
        endpoint.chat(server.url, "m", user("always500"), retries=1, **FAST)


def test_client_errors_are_not_retried(server):
    with pytest.raises(endpoint.EndpointError, match=r"/v1/chat/completions: HTTP 400 .*bad model.*not retried"):
        endpoint.chat(server.url, "m", user("e400"), **FAST)
    assert server.calls["e400"] == 1


def open_gate_at(server, n: int):
    """'gate' requests now wait until n are in flight at once; the peak count starts again."""
    with server.lock:
        server.gate.clear()
        server.gate_n, server.peak = n, 0


def test_chat_many_order_concurrency_and_failures(server, capsys):
    open_gate_at(server, 4)
    texts = endpoint.chat_many(server.url, "m", [user("gate")] * 8 + [user(f"t{i}") for i in range(4)],
                               concurrency=4, backoff=0.01, timeout=10)
    assert texts == ["GATE"] * 8 + [f"T{i}" for i in range(4)]
    assert server.peak == 4, f"expected exactly 4 parallel requests, saw {server.peak}"
    open_gate_at(server, 8)
    endpoint.chat_many(server.url, "m", [user("gate")] * 8, concurrency=8, backoff=0.01, timeout=10)
    assert server.peak == 8, f"8 threads should have 8 requests in flight at once, saw {server.peak}"
    assert server.calls["gate"] == 16, "a gate request was retried"
    mixed = endpoint.chat_many(server.url, "m", [user("a"), user("e400"), user("b")], **FAST)
    assert mixed == ["A", None, "B"]
    assert "1/3 calls failed" in capsys.readouterr().err
    with pytest.raises(endpoint.EndpointError, match="all 2 calls failed"):
        endpoint.chat_many(server.url, "m", [user("e400")] * 2, **FAST)
    assert endpoint.chat_many(server.url, "m", []) == []


def test_unreachable_endpoint_names_it(server):
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(endpoint.EndpointError, match=f"endpoint {url}/chat/completions failed after 2 tries"):
        endpoint.chat(url, "m", user("x"), retries=1, **FAST)
    with pytest.raises(endpoint.EndpointError, match=f"endpoint {url} unreachable"):
        endpoint.check_reachable(url, timeout=1)
    endpoint.check_reachable(server.url, timeout=1)  # a 404 on /models still means a server is there
