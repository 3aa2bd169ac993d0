"""F11: slow-header (slowloris) clients. Connections that send their request headers a byte
at a time, or nothing at all, are closed `--header-timeout` seconds after they open (or,
kept alive, after a next request's first byte), while everyone else is served as usual and
the server's file descriptors come back."""

from __future__ import annotations

import selectors
import socket
import threading
import time

import httpx

from .conftest import TENANT_KEYS, auth, scale

HEADER_TIMEOUT = 2.0
SLACK = 1.5  # the server's timer and event loop, and this test's own polling, seconds
DRIBBLE_S = 0.5  # a byte per connection this often: each byte is "progress" to uvicorn
# Headers that never end: a request line, a header, then a value that goes on forever.
SLOW_REQUEST = b"POST /v1/completions HTTP/1.1\r\nHost: loraplex\r\nX-Slow: "


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class SlowClients:
    """`n` connections: one in five sends nothing, the rest send SLOW_REQUEST and then "a"
    forever, a byte every DRIBBLE_S. Records, per connection, the seconds from its opening
    until the server closed it (None: still open when the attack ended)."""

    def __init__(self, port: int, n: int):
        self.port, self.n = port, n
        self.closed_after: list[float | None] = [None] * n
        self.all_open = threading.Event()

    def run(self, give_up_after: float) -> None:
        sel = selectors.DefaultSelector()
        opened, sent = [0.0] * self.n, [0] * self.n
        for i in range(self.n):
            s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            s.setblocking(False)
            opened[i] = time.monotonic()
            sel.register(s, selectors.EVENT_READ, i)
        self.all_open.set()
        next_byte = time.monotonic()
        while sel.get_map() and time.monotonic() - max(opened) < give_up_after:
            for key, _ in sel.select(timeout=0.05):
                try:
                    data = key.fileobj.recv(4096)
                except ConnectionError:
                    data = b""
                if not data:  # the server closed it
                    self._closed(sel, key.fileobj, key.data, opened)
            if time.monotonic() >= next_byte:
                next_byte += DRIBBLE_S
                for key in list(sel.get_map().values()):
                    i = key.data
                    if i % 5 == 0:
                        continue  # the silent ones
                    byte = SLOW_REQUEST[sent[i]:sent[i] + 1] or b"a"
                    try:
                        key.fileobj.send(byte)
                        sent[i] += 1
                    except ConnectionError:
                        self._closed(sel, key.fileobj, i, opened)
        for key in list(sel.get_map().values()):
            key.fileobj.close()

    def _closed(self, sel, sock, i: int, opened: list[float]) -> None:
        self.closed_after[i] = time.monotonic() - opened[i]
        sel.unregister(sock)
        sock.close()


def test_slow_header_clients_are_closed_while_others_are_served(make_server, figures):
    server = make_server("--header-timeout", str(HEADER_TIMEOUT))
    server.start()
    time.sleep(0.5)  # the server has closed the connection start() checked /health on
    fds_before = server.open_files()
    n = scale(50, 1000)
    attack = SlowClients(server.port, n)
    attacker = threading.Thread(target=attack.run, args=(HEADER_TIMEOUT * 3 + 5,), daemon=True)
    completions: list[int] = []

    def complete() -> None:  # small completions, one after another, through the attack
        while attacker.is_alive():
            completions.append(httpx.post(
                f"{server.url}/v1/completions", headers=auth(TENANT_KEYS["acme"]), timeout=30,
                json={"prompt": "Hello", "max_tokens": 2}).status_code)

    attacker.start()
    assert attack.all_open.wait(60)
    completer = threading.Thread(target=complete, daemon=True)
    completer.start()
    time.sleep(0.2)  # the server has accepted them all
    fds_during = server.open_files()
    health = []  # (status, seconds): a check every 0.05 s, each on a new connection
    while attacker.is_alive():
        t0 = time.monotonic()
        health.append((httpx.get(f"{server.url}/health", timeout=10).status_code,
                       time.monotonic() - t0))
        time.sleep(0.05)
    attacker.join()
    completer.join(30)

    deadline = time.monotonic() + 10
    while server.open_files() > fds_before and time.monotonic() < deadline:
        time.sleep(0.1)
    fds_after = server.open_files()

    closed = [s for s in attack.closed_after if s is not None]
    health_p99 = _percentile([s for _, s in health], 0.99)
    figures.record("F11", "slow-header connections closed by the server", len(closed),
                   "connections", f"of {n}, --header-timeout {HEADER_TIMEOUT:g} s")
    figures.record("F11", "slowest close after the connection opened",
                   round(max(closed), 2) if closed else None, "s")
    figures.record("F11", "/health p99 during the attack", round(health_p99 * 1000, 1), "ms",
                   f"{len(health)} checks, {len(completions)} completions beside them")
    figures.record("F11", "server fds before / during / after the attack",
                   f"{fds_before} / {fds_during} / {fds_after}")

    assert fds_during >= fds_before + n  # the attack did hold a socket each
    assert len(closed) == n, f"{n - len(closed)} of {n} slow connections still open"
    assert HEADER_TIMEOUT - 0.2 <= min(closed) and max(closed) <= HEADER_TIMEOUT + SLACK
    assert health and all(status == 200 for status, _ in health)
    assert completions and all(status == 200 for status in completions)
    assert health_p99 < 1.0
    assert fds_after <= fds_before


def test_keep_alive_connection_dribbling_its_next_request_is_closed(make_server, figures):
    server = make_server("--header-timeout", str(HEADER_TIMEOUT))
    server.start()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: loraplex\r\n\r\n")
        response = b""
        while b"\r\n\r\n" not in response:
            response += s.recv(4096)
        assert response.startswith(b"HTTP/1.1 200"), response
        assert b"connection: close" not in response.lower()  # kept alive

        # Each byte cancels uvicorn's keep-alive timer; only the header deadline is left.
        s.settimeout(DRIBBLE_S)  # how long recv waits for the server: the dribble's pace
        sent, first_byte, closed_after = 0, time.monotonic(), None
        while closed_after is None and time.monotonic() - first_byte < HEADER_TIMEOUT * 3 + 5:
            try:
                s.send(SLOW_REQUEST[sent:sent + 1] or b"a")
                sent += 1
                if s.recv(4096) == b"":
                    closed_after = time.monotonic() - first_byte
            except TimeoutError:
                pass  # still open: the next byte
            except ConnectionError:
                closed_after = time.monotonic() - first_byte
    figures.record("F11", "keep-alive connection dribbling its second request: closed after",
                   None if closed_after is None else round(closed_after, 2), "s",
                   "from its first byte")
    assert closed_after is not None, "the dribbling keep-alive connection was never closed"
    assert HEADER_TIMEOUT - 0.2 <= closed_after <= HEADER_TIMEOUT + SLACK
