"""`hkd explore`'s server at the HTTP level (raw sockets to 127.0.0.1): only its own page may drive it (Host, Origin,
Sec-Fetch-Site), bodies are bounded in size and time, a client that leaves costs one console line, and every value
is parsed strictly. The page itself is driven in a browser in tests/test_explore.py."""

import json
import socket
import struct
import threading
import time
from urllib.parse import quote

import pytest
import torch
from test_explore import SHAPE, serve
from test_model import tiny_model

from hkd import explore, web


def raw(port, request: bytes, *, linger=False, wait=True):
    """Send `request` as is; (status, JSON body or None) of the answer, read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(request)
        if not wait:
            return None
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    is_json = b"application/json" in head
    return status, json.loads(body) if is_json else None


def request(port, method="GET", path="/api/info", headers=None, body=b"", host=None):
    """An HTTP/1.1 request with Host 127.0.0.1:port unless `host` (None in headers: left out) says otherwise."""
    lines = [f"{method} {path} HTTP/1.1"]
    fields = {"Host": host or f"127.0.0.1:{port}", **(headers or {})}
    if method == "POST" and "Content-Length" not in fields:
        fields["Content-Length"] = str(len(body))
    lines += [f"{k}: {v}" for k, v in fields.items() if v is not None]
    return raw(port, ("\r\n".join(lines) + "\r\n\r\n").encode() + body)


@pytest.fixture(scope="module")
def running():
    """One server for the module (a tiny random model of the page tests' shape)."""
    torch.manual_seed(0)
    x = explore.Explorer(tiny_model(**SHAPE).eval())
    server, _ = serve(x)
    yield x, server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def server(running):
    x, _ = running
    x.edits.clear()
    x.uploads.clear()
    return running


def edit_body(**fields):
    request = {"seed": 0, "t": 2.0, "box": [0, 8, 16, 16], "band": "high", "r": 0.5, "reference": {"seed": 1}}
    return json.dumps({**request, **fields}).encode()


def one_line(answer):
    assert isinstance(answer["error"], str) and "\n" not in answer["error"] and len(answer["error"]) < 300, answer
    return answer["error"]


# ---------------------------------------------------------------------------------------------------------------
# Who may ask


def test_host_must_name_the_server(server):
    x, port = server
    assert request(port)[0] == 200
    assert request(port, host=f"localhost:{port}")[0] == 200
    for host in [f"evil.example:{port}", "evil.example", f"127.0.0.1:{port + 1}", f"127.0.0.2:{port}",
                 f"127.0.0.1.evil.example:{port}", "127.0.0.1"]:  # fmt: skip
        status, answer = request(port, host=host)
        assert status == 403 and "Host" in one_line(answer), (host, answer)
    assert request(port, headers={"Host": None}, host="")[0] == 403  # no Host at all
    status, _ = raw(port, f"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nHost: evil:{port}\r\n\r\n".encode())
    assert status == 403
    assert request(port, method="POST", path="/api/edit", body=edit_body(), host=f"evil.example:{port}")[0] == 403
    assert not x.edits  # refused before any work


def test_only_the_servers_own_origin(server):
    x, port = server
    own = f"http://127.0.0.1:{port}"
    status, answer = request(port, "POST", "/api/edit", {"Origin": own, "Sec-Fetch-Site": "same-origin"}, edit_body())
    assert status == 200 and answer["edit"] in x.edits
    x.edits.clear()
    cross = [
        {"Origin": "http://evil.example"},
        {"Origin": f"http://localhost:{port + 1}"},  # same site, another port: another origin
        {"Origin": "null"},
        {"Origin": f"https://127.0.0.1:{port}"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": own, "Sec-Fetch-Site": "cross-site"},
    ]
    for headers in cross:  # a text/plain POST from another page, as a browser sends it without CORS
        status, answer = request(port, "POST", "/api/edit", {"Content-Type": "text/plain", **headers}, edit_body())
        assert status == 403 and "origin" in one_line(answer).lower() or "Sec-Fetch-Site" in answer["error"], headers
        assert request(port, "GET", "/api/frame.png?seed=0&t=1", headers)[0] == 403
    assert not x.edits
    # a link followed from elsewhere shows the page (and only the page); a typed URL is "none"
    navigate = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
    assert request(port, "GET", "/", navigate)[0] == 200
    assert request(port, "GET", "/api/info", navigate)[0] == 403
    assert request(port, "GET", "/api/info", {"Sec-Fetch-Site": "none"})[0] == 200


def test_address_names():
    local = web.Address("127.0.0.1", "127.0.0.1", 7860)
    assert local.names_host("127.0.0.1:7860") and local.names_host("LOCALHOST:7860")
    assert not local.names_host("127.0.0.1:7861") and not local.names_host("10.0.0.2:7860")
    assert not local.names_host("attacker.example:7860") and not local.names_host("127.0.0.1:7860 ")
    anywhere = web.Address("0.0.0.0", "0.0.0.0", 7860)
    assert anywhere.names_host("192.168.1.5:7860") and anywhere.names_host("[::1]:7860")
    assert not anywhere.names_host("rebound.example:7860")  # a name could point anywhere: IP addresses only
    on_80 = web.Address("localhost", "127.0.0.1", 80)
    assert on_80.names_host("localhost") and on_80.names_host("127.0.0.1:80")


# ---------------------------------------------------------------------------------------------------------------
# Bodies


@pytest.mark.parametrize(
    "length, status",
    [("-1", 400), ("+5", 400), ("5 ", 400), ("0x10", 400), ("1e3", 400), ("\u0661\u0660", 400), ("9" * 40, 400),
     (str(explore.MAX_UPLOAD_BYTES + 1), 413), (None, 411)],
)  # fmt: skip
def test_content_length_is_strict(server, length, status):
    x, port = server
    answer = request(port, "POST", "/api/upload", {"Content-Length": length}, b"x" * 8)
    assert answer[0] == status and one_line(answer[1]), answer
    assert not x.uploads


def test_content_length_other_forms(server):
    _, port = server
    chunked = request(port, "POST", "/api/upload", {"Transfer-Encoding": "chunked", "Content-Length": None}, b"0\r\n")
    assert chunked[0] == 411
    twice = f"POST /api/upload HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
    assert raw(port, twice.encode())[0] == 400
    big = request(port, "POST", "/api/edit", {"Content-Length": str(explore.MAX_EDIT_BYTES + 1)})
    assert big[0] == 413


def test_a_short_body_or_a_silent_client_does_not_hold_a_thread(server, monkeypatch, capsys):
    _, port = server
    monkeypatch.setattr(explore.Handler, "timeout", 0.5)
    monkeypatch.setattr(explore, "BODY_DEADLINE", 1.5)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:  # declares 1000 bytes, sends 10
        s.sendall(f"POST /api/upload HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 1000\r\n\r\n".encode())
        s.sendall(b"x" * 10)
        answer = s.recv(65536)
    assert b" 408 " in answer.split(b"\r\n")[0] and time.monotonic() - started < 20
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:  # a trickle: the deadline is for the body
        s.sendall(f"POST /api/upload HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 1000\r\n\r\n".encode())
        started, answer = time.monotonic(), b""
        while time.monotonic() - started < 20:
            s.sendall(b"x")
            time.sleep(0.2)
            try:
                answer = s.recv(65536, socket.MSG_DONTWAIT)
                break
            except BlockingIOError:
                continue
        assert b" 408 " in answer.split(b"\r\n")[0] and time.monotonic() - started < 10
    monkeypatch.setattr(explore, "HEAD_DEADLINE", 1.5)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:  # a trickle of header lines
        s.sendall(f"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode())
        started, closed = time.monotonic(), False
        while not closed and time.monotonic() - started < 20:
            try:
                s.sendall(b"X-Slow: 1\r\n")
                time.sleep(0.2)
                closed = s.recv(65536, socket.MSG_DONTWAIT) == b""
            except BlockingIOError:
                continue
            except OSError:
                closed = True
        assert closed and time.monotonic() - started < 10
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:  # connects and says nothing
        started = time.monotonic()
        assert s.recv(65536) == b"" and time.monotonic() - started < 10  # closed by the server
    assert request(port)[0] == 200  # still serving
    err = capsys.readouterr().err
    assert "Traceback" not in err and "408" not in err


def test_a_client_that_leaves_is_one_line(server, monkeypatch, capsys):
    x, port = server
    left = threading.Event()
    real = x.frame

    def slow(*args, **kwargs):
        left.wait(30)
        time.sleep(0.2)
        return real(*args, **kwargs)

    monkeypatch.setattr(x, "frame", slow)
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(f"GET /api/frame.png?seed=0&t=1&scale=32 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
    s.close()
    left.set()
    deadline = time.monotonic() + 30
    while "closed the connection" not in (err := capsys.readouterr().err) and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "closed the connection" in lines[0] and "Traceback" not in err, err
    assert request(port)[0] == 200


def test_connections_are_bounded_in_number(monkeypatch, capsys):
    monkeypatch.setattr(explore, "MAX_CONNECTIONS", 4)
    monkeypatch.setattr(explore.Handler, "timeout", 60)  # the silent clients hold their slots for the whole test
    monkeypatch.setattr(explore, "HEAD_DEADLINE", 60)
    torch.manual_seed(0)
    server, _ = serve(explore.Explorer(tiny_model(**SHAPE).eval()))
    port, idle = server.server_address[1], []
    try:
        assert request(port)[0] == 200
        idle = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(4)]  # connect, say nothing
        deadline = time.monotonic() + 30
        while server.slots._value and time.monotonic() < deadline:  # every slot taken by a silent client
            time.sleep(0.05)
        threads = threading.active_count()
        for _ in range(5):  # refused at once, one line, each with no thread of its own
            status, answer = request(port)
            assert status == 503 and "4 connections open (its limit)" in one_line(answer), (status, answer)
        assert threading.active_count() <= threads
        idle.pop().close()  # one leaves: its slot comes back
        while (status := request(port)[0]) == 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status == 200
    finally:
        for s in idle:
            s.close()
        server.shutdown()
        server.server_close()
    err = capsys.readouterr().err
    assert err.count("refused: 4 connections open") == 1 and "Traceback" not in err, err  # one line per 10 s


# ---------------------------------------------------------------------------------------------------------------
# Values


@pytest.mark.parametrize(
    "fields, message",
    [({"t": True}, "t must be a finite number"), ({"t": "2.0"}, "t must be"),
     ({"seed": 3.9}, "seed must be an integer"), ({"seed": True}, "seed must be an integer"),
     ({"seed": -1}, "seed must be an integer in"), ({"seed": 2**64}, "seed must be an integer in"),
     ({"box": "0,0,4,4"}, "box must be a list"), ({"box": {"x0": 0}}, "box must be a list"),
     ({"box": [0, 0, 4]}, "box must be a list"), ({"box": [0, 0, 4, True]}, "box must be an integer"),
     ({"box": [0, 0, 4.0, 4]}, "box must be an integer"), ({"r": None}, "r must be a finite number"),
     ({"band": 3}, "band must be a string"), ({"reference": {"seed": "1"}}, "reference seed must be an integer"),
     ({"reference": {"seed": 1, "upload": "1"}}, "reference must be"), ({"reference": 1}, "reference must be"),
     ({"base": 5}, "base must be a string"), ({"extra": 1}, "unknown field")],
)  # fmt: skip
def test_edit_fields_are_strict(server, fields, message):
    x, port = server
    status, answer = request(port, "POST", "/api/edit", body=edit_body(**fields))
    assert status == 400 and message in one_line(answer), (fields, answer)
    assert not x.edits


@pytest.mark.parametrize(
    "body, message",
    [(b'{"t": NaN}', "not JSON"), (b'{"t": Infinity}', "not JSON"), (b'{"t": 1, "t": 2}', "twice"),
     (b"[" * 30_000 + b"]" * 30_000, "not JSON"), (b"\xff\xfe", "not JSON"), (b"[1, 2]", "JSON object"),
     (edit_body(t=12345).replace(b"12345", b"1e400"), "t must be a finite number")],
)  # fmt: skip
def test_edit_body_must_be_plain_json(server, body, message):
    x, port = server
    status, answer = request(port, "POST", "/api/edit", body=body)
    assert status == 400 and message in one_line(answer), answer
    assert not x.edits


@pytest.mark.parametrize(
    "query, name",
    [("seed=\u0663&t=1", "seed"), ("seed=+3&t=1", "seed"), ("seed=3_0&t=1", "seed"), ("seed=%203&t=1", "seed"),
     ("seed=99999999999999999999&t=1", "seed"), ("t=\u0661.5", "t"), ("t=nan", "t"), ("t=inf", "t"),
     ("t=1_0", "t"), ("t=1e999", "t"), ("t=1&off=\u0660-low", "off"), ("t=1&scale=\u0662", "scale"),
     ("t=1&scale=0", "scale"), ("t=1&scale=33", "scale")],
)  # fmt: skip
def test_query_values_are_strict(server, query, name):
    _, port = server
    status, answer = request(port, path=f"/api/frame.png?{quote(query, safe='=&%')}")  # as a browser sends it
    assert status == 400 and name in one_line(answer), (query, answer)


def test_errors_never_repeat_a_long_value(server):
    _, port = server
    for path in [f"/api/frame.png?seed=0&t=1&edit={'e' * 5000}", f"/api/teacher.png?t=1&view={'v' * 5000}"]:
        status, answer = request(port, path=path)
        assert status == 400 and len(one_line(answer)) < 300, answer
    status, answer = request(port, "POST", "/api/edit", body=edit_body(band="b" * 5000))
    assert status == 400 and len(one_line(answer)) < 300, answer


def test_good_requests_still_work(server):
    x, port = server
    assert request(port, path="/api/frame.png?seed=3&t=0.5&off=0-low&scale=2")[0] == 200
    assert request(port, path="/api/frame.png?seed=3&t=5e-1")[0] == 200
    status, answer = request(port, "POST", "/api/edit", body=edit_body(t=2, box=[0, 0, 16, 16], base=None))
    assert status == 200 and answer["t"] == 2.0
    stacked = edit_body(t=1.0, base=answer["edit"], reference={"seed": 2})
    assert request(port, "POST", "/api/edit", body=stacked)[0] == 200 and len(x.edits) == 2
