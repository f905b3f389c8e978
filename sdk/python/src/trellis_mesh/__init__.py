"""Reach a Trellis mesh through a binding and the fetch gateway.

The protocol is docs/gateway.md in the Trellis repository: the binding URL
``http(s)://b_<id>:<secret>@HOST:PORT`` is an ordinary proxy URL. HTTP goes
through the gateway as a forward proxy (absolute form for ``http://``,
CONNECT for ``https://``), any TCP protocol through CONNECT.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import ipaddress
import os
import re
import ssl as _ssl
from typing import Any, Optional, Tuple
from urllib.parse import unquote, urlsplit

import httpx

__all__ = ["Mesh", "MeshError", "MeshURLError", "gateway_error", "__version__"]
__version__ = "0.1.0"

_USAGE = "expected http(s)://b_<id>:<secret>@HOST:PORT"
_ID = re.compile(r"^b_[A-Za-z0-9_-]+$")
_PRINTABLE = re.compile(r"^[\x21-\x7e]+$")
_MAX_HEAD = 64 * 1024
_MAX_BODY = 64 * 1024

# httpx 0.26 added `proxy=`; 0.28 removed `proxies=`.
_PROXY_KW = "proxy" if "proxy" in inspect.signature(httpx.Client.__init__).parameters else "proxies"


class MeshError(Exception):
    """The gateway refused: HTTP status, ``Trellis-Error`` code and its sentence."""

    def __init__(self, status: int, code: Optional[str], message: str):
        self.status = status
        self.code = code
        self.message = message or f"the gateway answered {status}" + (f" ({code})" if code else "")
        super().__init__(self.message)

    def __repr__(self) -> str:
        return f"MeshError(status={self.status!r}, code={self.code!r}, message={self.message!r})"


class MeshURLError(ValueError):
    """A malformed binding URL. The message never contains the URL (it holds the secret)."""


def _bad(reason: str) -> MeshURLError:
    return MeshURLError(f"invalid Trellis binding URL: {reason}; {_USAGE}")


def gateway_error(response: httpx.Response) -> Optional[MeshError]:
    """The refusal a response of the gateway carries (it has ``Trellis-Error``), else None.

    Responses from the target never carry ``Trellis-Error``. The response
    body must have been read (it is, unless you streamed it).
    """
    code = response.headers.get("trellis-error")
    if code is None:
        return None
    try:
        text = response.text.strip()
    except httpx.ResponseNotRead:
        text = ""
    return MeshError(response.status_code, code, text)


class _Binding:
    __slots__ = ("id", "secret", "tls", "host", "port", "gateway")

    def __init__(self, url: Any):
        if not isinstance(url, str) or not url.strip():
            raise _bad("it is empty")
        url = url.strip()
        if any(c.isspace() for c in url):
            raise _bad("it contains whitespace")
        try:
            parts = urlsplit(url)
        except ValueError:
            raise _bad("it is not a URL") from None
        scheme = parts.scheme.lower()
        if not parts.scheme or "://" not in url:
            raise _bad("it is not a URL")
        if scheme not in ("http", "https"):
            raise _bad(f"the scheme must be http or https, not {parts.scheme[:20]!r}")
        if parts.path not in ("", "/"):
            raise _bad("it must not have a path")
        if parts.query or parts.fragment or "?" in url or "#" in url:
            raise _bad("it must not have a query or fragment")
        userinfo, at, hostport = parts.netloc.rpartition("@")
        if not hostport:
            raise _bad("the host is missing")
        if not at or not userinfo:
            raise _bad("the binding id (user part) is missing")
        user, colon, password = userinfo.partition(":")
        ident = unquote(user)
        if not ident:
            raise _bad("the binding id (user part) is missing")
        if not _ID.match(ident):
            raise _bad("the user part must be the binding id, b_ followed by letters and digits")
        if not colon or not password:
            raise _bad("the secret (password part) is missing")
        try:
            secret = unquote(password, errors="strict")
        except UnicodeDecodeError:
            raise _bad("the secret is not valid percent-encoded UTF-8") from None
        if not _PRINTABLE.match(secret):
            raise _bad("the secret contains spaces or characters outside printable ASCII")
        m = re.match(r"^(\[[0-9A-Fa-f:.]+\]|[^\[\]:]+)(?::(\d*))?$", hostport)
        if not m:
            raise _bad("the host or port is malformed")
        host, port_s = m.group(1), m.group(2)
        if port_s:
            port = int(port_s)
            if not 1 <= port <= 65535:
                raise _bad("the port must be between 1 and 65535")
        else:
            port = 443 if scheme == "https" else 80
        if host.startswith("["):
            try:
                ipaddress.IPv6Address(host[1:-1])
            except ValueError:
                raise _bad("the host is not a valid IPv6 address") from None
        self.id = ident
        self.secret = secret
        self.tls = scheme == "https"
        self.host = host[1:-1] if host.startswith("[") else host
        self.port = port
        self.gateway = f"{scheme}://{host}:{port}"


def _authority(host: str, port: int) -> str:
    if not isinstance(host, str) or not host or any(c.isspace() or c in "/@" for c in host):
        raise ValueError(f"open_connection: {host!r} is not a host name or address")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"open_connection: the port must be an integer between 1 and 65535, not {port!r}")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def _parse_head(head: bytes) -> Tuple[int, dict]:
    lines = head.decode("latin-1").split("\r\n")
    m = re.match(r"^HTTP/1\.[01] (\d{3})(?: .*)?$", lines[0])
    if not m:
        raise OSError("open_connection: the gateway's answer is not HTTP")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep and name:
            headers[name.strip().lower()] = value.strip()
    return int(m.group(1)), headers


async def _read_refusal_body(reader: asyncio.StreamReader, headers: dict) -> bytes:
    if "content-length" in headers and "transfer-encoding" not in headers:
        try:
            n = min(int(headers["content-length"]), _MAX_BODY)
        except ValueError:
            n = 0
        try:
            return await reader.readexactly(n)
        except asyncio.IncompleteReadError as e:
            return e.partial
    if "chunked" in headers.get("transfer-encoding", "").lower():
        out = b""
        while len(out) < _MAX_BODY:
            try:
                size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
                if size == 0:
                    break
                out += await reader.readexactly(size)
                await reader.readexactly(2)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                break
        return out
    return await reader.read(_MAX_BODY)


class Mesh:
    """The client of one binding.

    >>> mesh = Mesh.from_env()            # MESH=http://b_...:...@edge:8443
    >>> mesh.get("http://db.prod.mesh:8080/health").status_code
    """

    def __init__(self, url: str):
        self._b = _Binding(url)

    @classmethod
    def from_env(cls, name: str = "MESH") -> "Mesh":
        """The binding URL from the environment variable ``name``."""
        url = os.environ.get(name)
        if url is None:
            raise MeshURLError(
                f"the environment variable {name} is not set; it should hold http(s)://b_<id>:<secret>@HOST:PORT"
            )
        return cls(url)

    # -- what it is ---------------------------------------------------------

    @property
    def id(self) -> str:
        """The binding id, ``b_...``."""
        return self._b.id

    @property
    def gateway(self) -> str:
        """The gateway's URL without credentials."""
        return self._b.gateway

    def __repr__(self) -> str:
        scheme, rest = self._b.gateway.split("://", 1)
        return f"Mesh('{scheme}://{self._b.id}:***@{rest}')"

    __str__ = __repr__

    def proxy(self) -> httpx.Proxy:
        """The gateway as an ``httpx.Proxy`` carrying the binding's credentials."""
        return httpx.Proxy(self._b.gateway, auth=(self._b.id, self._b.secret))

    def _binding_header(self) -> dict:
        return {"Trellis-Binding": f"{self._b.id}:{self._b.secret}"}

    # -- httpx --------------------------------------------------------------

    @staticmethod
    def _check_kw(kw: dict) -> None:
        for k in ("proxy", "proxies"):
            if k in kw:
                raise TypeError(f"{k}= is set by the mesh (the gateway is the proxy); leave it out")

    def client(self, **kwargs: Any) -> httpx.Client:
        """An ``httpx.Client`` whose requests go through the gateway.

        ``http://`` targets use the absolute form, ``https://`` targets CONNECT
        (TLS end to end). Other keyword arguments go to ``httpx.Client``.
        """
        self._check_kw(kwargs)
        kwargs[_PROXY_KW] = self.proxy()
        return httpx.Client(**kwargs)

    def async_client(self, **kwargs: Any) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` whose requests go through the gateway."""
        self._check_kw(kwargs)
        kwargs[_PROXY_KW] = self.proxy()
        return httpx.AsyncClient(**kwargs)

    def transport(self, **kwargs: Any) -> httpx.HTTPTransport:
        """An ``httpx.HTTPTransport`` through the gateway, for clients you build yourself:
        ``httpx.Client(transport=mesh.transport())`` or in ``mounts=``."""
        self._check_kw(kwargs)
        return httpx.HTTPTransport(proxy=self.proxy(), **kwargs)

    def async_transport(self, **kwargs: Any) -> httpx.AsyncHTTPTransport:
        """The asynchronous ``transport()``."""
        self._check_kw(kwargs)
        return httpx.AsyncHTTPTransport(proxy=self.proxy(), **kwargs)

    def request(self, method: str, url: Any, **kwargs: Any) -> httpx.Response:
        """One request through the gateway (a client per call, like ``httpx.request``).

        Gateway refusals are responses too: see ``gateway_error``.
        """
        client_kw = {k: kwargs.pop(k) for k in ("verify", "cert", "trust_env", "http2") if k in kwargs}
        with self.client(**client_kw) as c:
            return c.request(method, url, **kwargs)

    def get(self, url: Any, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def head(self, url: Any, **kwargs: Any) -> httpx.Response:
        return self.request("HEAD", url, **kwargs)

    def options(self, url: Any, **kwargs: Any) -> httpx.Response:
        return self.request("OPTIONS", url, **kwargs)

    def post(self, url: Any, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def put(self, url: Any, **kwargs: Any) -> httpx.Response:
        return self.request("PUT", url, **kwargs)

    def patch(self, url: Any, **kwargs: Any) -> httpx.Response:
        return self.request("PATCH", url, **kwargs)

    def delete(self, url: Any, **kwargs: Any) -> httpx.Response:
        return self.request("DELETE", url, **kwargs)

    # -- services -----------------------------------------------------------

    def _services_result(self, r: httpx.Response) -> dict:
        if r.status_code != 200:
            raise MeshError(r.status_code, r.headers.get("trellis-error"), r.text.strip())
        return r.json()

    def services(self, **kwargs: Any) -> dict:
        """The JSON of ``GET /.trellis/services``: what this binding may reach."""
        kwargs.setdefault("trust_env", False)  # talk to the gateway itself, not a proxy
        with httpx.Client(**kwargs) as c:
            return self._services_result(c.get(self._b.gateway + "/.trellis/services", headers=self._binding_header()))

    async def aservices(self, **kwargs: Any) -> dict:
        """The asynchronous ``services()``."""
        kwargs.setdefault("trust_env", False)
        async with httpx.AsyncClient(**kwargs) as c:
            r = await c.get(self._b.gateway + "/.trellis/services", headers=self._binding_header())
            return self._services_result(r)

    # -- raw TCP ------------------------------------------------------------

    async def open_connection(
        self,
        host: str,
        port: int,
        *,
        ssl: Optional[_ssl.SSLContext] = None,
        timeout: Optional[float] = 30.0,
        limit: int = 2**16,
    ) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A TCP stream to ``host:port`` in the mesh through CONNECT.

        Returns asyncio's ``(StreamReader, StreamWriter)``, like
        ``asyncio.open_connection``; bytes the gateway sent right behind its
        answer are in the reader. ``ssl`` is the context for an ``https``
        gateway (default: the system's trust store). ``timeout`` bounds
        connecting and the handshake. Raises ``MeshError`` when the gateway
        refuses, ``OSError`` when it cannot be reached.
        """
        authority = _authority(host, port)
        b = self._b
        ctx = None
        if b.tls:
            ctx = ssl if ssl is not None else _ssl.create_default_context()
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                b.host, b.port, ssl=ctx, server_hostname=(b.host if ctx is not None else None), limit=limit
            ),
            timeout,
        )
        try:
            return await asyncio.wait_for(self._handshake(reader, writer, authority), timeout)
        except BaseException:
            writer.close()
            raise

    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, authority: str
    ) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        token = base64.b64encode(f"{self._b.id}:{self._b.secret}".encode()).decode()
        writer.write(
            f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nProxy-Authorization: Basic {token}\r\n\r\n".encode()
        )
        await writer.drain()
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            raise OSError(f"open_connection: the gateway closed the connection before answering CONNECT {authority}") from None
        except asyncio.LimitOverrunError:
            raise OSError("open_connection: the gateway's answer is not HTTP") from None
        status, headers = _parse_head(head[:-4])
        if 200 <= status < 300:
            # readuntil consumed exactly the head: whatever followed stays in `reader`.
            return reader, writer
        body = await _read_refusal_body(reader, headers)
        raise MeshError(status, headers.get("trellis-error"), body.decode("utf-8", "replace").strip())
