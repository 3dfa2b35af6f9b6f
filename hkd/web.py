"""Guards for hkd's local web server (`hkd explore`): only its own page may drive it, and every value a request
carries is parsed strictly, into one-line errors.

* Who: a request must name the server's own address in Host (a DNS-rebinding page sends its own name there), and a
  browser's request must come from the server's own origin (Origin, Sec-Fetch-Site). The one exception is a
  top-level navigation to the page itself (a link followed from elsewhere), which shows the page and does no work.
* Bodies: one Content-Length of ASCII digits, within the route's limit, read within a deadline.
* Values: integers and numbers in ASCII digits only (int() and float() also read "+3", "3_0", " 3" and other
  scripts' digits), JSON fields of their exact type (true is not a number, 3.9 is not an integer), and errors that
  quote at most a short prefix of what was sent.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import time
from http import HTTPStatus

INTEGER = re.compile(r"[0-9]{1,19}")
NUMBER = re.compile(r"[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]{1,3})?")
HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::([0-9]{1,5}))?")
SAME_ORIGIN = ("same-origin", "none")  # Sec-Fetch-Site of the page's own requests, and of a typed or bookmarked URL


class Refused(Exception):  # noqa: N818 (an answer, not a bug)
    """A request answered with `status` and a one-line message."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


def quote(value, limit: int = 40) -> str:
    """repr(value), cut to `limit` characters: an error never repeats an unbounded value."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def line(text: str, limit: int = 240) -> str:
    """The first line of a message, cut to `limit` characters."""
    first = (text.splitlines() or [""])[0]
    return first if len(first) <= limit else first[: limit - 3] + "..."


def _in_range(value: int, name: str, low: int, high: int) -> int:
    if not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {quote(value)}")
    return value


# Query values (text) ------------------------------------------------------------------------------------------------


def integer(text: str, name: str, low: int, high: int) -> int:
    """An integer in [low, high] written with the digits 0-9 and nothing else."""
    if not INTEGER.fullmatch(text):
        raise ValueError(f"{name} must be an integer written with the digits 0-9, got {quote(text)}")
    return _in_range(int(text), name, low, high)


def number(text: str, name: str) -> float:
    """A finite decimal number (digits 0-9, an optional sign, point and exponent)."""
    value = float(text) if len(text) <= 40 and NUMBER.fullmatch(text) else math.nan
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number written with the digits 0-9, got {quote(text)}")
    return value


# JSON values ---------------------------------------------------------------------------------------------------------


def _unique(pairs):
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"a key appears twice in {quote(keys)}")
    return dict(pairs)


def _constant(name):
    raise ValueError(f"{name} is not a JSON number")


def json_object(data: bytes, what: str, fields: set[str]) -> dict:
    """A JSON object (UTF-8, no NaN or Infinity, no repeated keys) whose keys are among `fields`."""
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=_constant, object_pairs_hook=_unique)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ValueError(f"{what} is not JSON: {str(error).splitlines()[0][:80]}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object")
    unknown = sorted(set(value) - fields)
    if unknown:
        raise ValueError(f"{what} has unknown field(s) {quote(unknown)}; the fields are {sorted(fields)}")
    return value


def json_integer(value, name: str, low: int, high: int) -> int:
    if type(value) is not int:  # bool is an int subclass; 3.0 is a float
        raise ValueError(f"{name} must be an integer, got {quote(value)}")
    return _in_range(value, name, low, high)


def json_number(value, name: str) -> float:
    try:
        finite = type(value) in (int, float) and math.isfinite(value)
    except OverflowError:  # an integer beyond float's range
        finite = False
    if not finite:
        raise ValueError(f"{name} must be a finite number, got {quote(value)}")
    return float(value)


def json_string(value, name: str) -> str:
    if type(value) is not str:
        raise ValueError(f"{name} must be a string, got {quote(value)}")
    return value


def json_integers(value, name: str, count: int, low: int, high: int) -> tuple[int, ...]:
    if type(value) is not list or len(value) != count:
        raise ValueError(f"{name} must be a list of {count} integers, got {quote(value)}")
    return tuple(json_integer(v, name, low, high) for v in value)


# Who may ask ---------------------------------------------------------------------------------------------------------


class Address:
    """The server's own address: the Host values that name it, and its origin.

    Accepted Host names: the address given and the one bound; "localhost" too when that address is a loopback or
    wildcard one; with a wildcard address (0.0.0.0), any IP address (a name could be rebound). The port must be the
    bound port."""

    def __init__(self, given: str, bound: str, port: int):
        ips = {name: _ip(name) for name in {given.lower(), bound.lower()}}
        self.names = {f"[{name}]" if ip is not None and ip.version == 6 else name for name, ip in ips.items()}
        self.wildcard = any(ip is not None and ip.is_unspecified for ip in ips.values())
        if any(n == "localhost" or ip is not None and (ip.is_loopback or ip.is_unspecified) for n, ip in ips.items()):
            self.names.add("localhost")
        self.port = port

    def __str__(self) -> str:
        return f"{min(self.names - {'localhost'} or self.names)}:{self.port}"

    def names_host(self, value: str) -> bool:
        """Whether a Host header names this server."""
        match = HOST.fullmatch(value)
        if match is None or int(match[2] or 80) != self.port:
            return False
        name = match[1].lower()
        return name in self.names or (self.wildcard and _ip(name.strip("[]")) is not None)

    def refusal(self, headers, method: str, path: str, page: tuple[str, ...]) -> str | None:
        """Why a request may not drive the server (None: it may)."""
        hosts = headers.get_all("Host") or []
        if len(hosts) != 1 or not self.names_host(hosts[0]):
            return f"Host {quote(', '.join(hosts))} is not this server's address; open http://{self}/"
        origin = headers.get("Origin")
        if origin is not None and origin.lower() != f"http://{hosts[0].lower()}":
            return f"a request from another origin ({quote(origin)})"
        site = headers.get("Sec-Fetch-Site")
        navigation = method == "GET" and path in page and headers.get("Sec-Fetch-Mode") == "navigate"
        if site is not None and site not in SAME_ORIGIN and not navigation:
            return f"a {quote(site)} request (Sec-Fetch-Site): only this server's own page may use it"
        return None


def _ip(name: str):
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


# Bodies --------------------------------------------------------------------------------------------------------------


def read_body(handler, limit: int, deadline_s: float) -> bytes:
    """The request body of a BaseHTTPRequestHandler: exactly one Content-Length of ASCII digits, at most `limit`
    bytes, all of it within `deadline_s` seconds (each read also within the handler's socket timeout). A client that
    closes the connection early raises ConnectionAbortedError."""
    headers = handler.headers
    if headers.get("Transfer-Encoding") is not None:
        raise Refused(HTTPStatus.LENGTH_REQUIRED, "Transfer-Encoding is not supported: send a Content-Length")
    values = headers.get_all("Content-Length") or []
    if not values:
        raise Refused(HTTPStatus.LENGTH_REQUIRED, "the request has no Content-Length")
    if len(values) != 1 or not re.fullmatch(r"[0-9]{1,12}", values[0]):
        raise Refused(HTTPStatus.BAD_REQUEST, f"Content-Length must be one number of bytes, got {quote(values)}")
    length = int(values[0])
    if length > limit:
        raise Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the request is {length} bytes; the limit is {limit}")
    chunks, got, deadline = [], 0, time.monotonic() + deadline_s
    try:
        while got < length:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            handler.connection.settimeout(min(left, handler.timeout))
            chunk = handler.rfile.read1(min(length - got, 2**16))
            if not chunk:
                raise ConnectionAbortedError(f"the client closed the connection after {got} of {length} bytes")
            chunks.append(chunk)
            got += len(chunk)
    except TimeoutError:
        message = f"the request body did not arrive: {got} of {length} bytes within {deadline_s:g} s"
        raise Refused(HTTPStatus.REQUEST_TIMEOUT, message) from None
    finally:
        handler.connection.settimeout(handler.timeout)
    return b"".join(chunks)
