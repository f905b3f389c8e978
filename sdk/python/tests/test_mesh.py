"""Tests of trellis_mesh against a fake gateway (loopback only) that implements
docs/gateway.md: absolute-form forward proxy, CONNECT, /.trellis/services and
refusals with Trellis-Error."""

import asyncio
import base64
import hashlib
import json
import shutil
import ssl
import subprocess
import threading
import traceback

import httpx
import pytest

from trellis_mesh import Mesh, MeshError, MeshURLError, gateway_error

ID = "b_k3v9x2m4q7w8e5rt"
SECRET = "Zp4s3cr3tQ9"
BIG = 5 * 1024 * 1024
GREETING = bytes([0x53, 0x53, 0x48, 0x2D, 0x00, 0xFF, 0x0D, 0x0A, 0x0D, 0x0A, 0x7F])


def _big_body() -> bytes:
    # Deterministic bytes that do not repeat in short cycles.
    out = bytearray()
    block = b"trellis"
    i = 0
    while len(out) < BIG:
        block = hashlib.sha256(block + i.to_bytes(4, "big")).digest()
        out += block
        i += 1
    return bytes(out[:BIG])


BIG_BODY = _big_body()


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


async def _read_head(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = []
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers.append((k.strip(), v.strip()))
    return method, target, headers


def _get(headers, name):
    for k, v in headers:
        if k.lower() == name.lower():
            return v
    return None


async def _read_body(reader, headers):
    if (_get(headers, "transfer-encoding") or "").lower() == "chunked":
        out = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return out
            out += await reader.readexactly(size)
            await reader.readexactly(2)
    n = int(_get(headers, "content-length") or 0)
    return await reader.readexactly(n)


async def _pipe(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


async def _refuse(writer, status, reason, code, sentence):
    body = (sentence + "\n").encode()
    writer.write(
        f"HTTP/1.1 {status} {reason}\r\nTrellis-Error: {code}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    writer.close()


class World:
    """The target, an echo server, a TLS target and the fake gateway on one loop in a thread."""

    def __init__(self, tls_cert=None, tls_key=None):
        self.tls_cert, self.tls_key = tls_cert, tls_key
        self.seen = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10), "the fake gateway did not start"

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self.ready.set()
        self.loop.run_forever()

    async def _start(self):
        self.target = await asyncio.start_server(self._target, "127.0.0.1", 0)
        self.echo = await asyncio.start_server(self._echo, "127.0.0.1", 0)
        self.gw = await asyncio.start_server(self._gateway, "127.0.0.1", 0)
        self.servers = [self.target, self.echo, self.gw]
        self.tls = None
        if self.tls_cert:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
            self.tls = await asyncio.start_server(self._target, "127.0.0.1", 0, ssl=ctx)
            # The gateway on TLS too (a binding URL with https).
            self.gw_tls = await asyncio.start_server(self._gateway, "127.0.0.1", 0, ssl=ctx)
            self.servers += [self.tls, self.gw_tls]
        self.gw_port = self.gw.sockets[0].getsockname()[1]

    def port(self, server):
        return server.sockets[0].getsockname()[1]

    def close(self):
        async def stop():
            for s in self.servers:
                s.close()
            # Tunnels still open (kept-alive clients) end here, not at loop teardown.
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    # -- the in-test services ---------------------------------------------

    async def _echo(self, reader, writer):
        await _pipe(reader, writer)
        writer.close()

    async def _target(self, reader, writer):
        try:
            method, path, headers = await _read_head(reader)
            if path == "/big":
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                    b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                )
                for o in range(0, BIG, 256 * 1024):
                    piece = BIG_BODY[o : o + 256 * 1024]
                    writer.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
            else:
                body = await _read_body(reader, headers)
                out = json.dumps(
                    {
                        "method": method,
                        "path": path,
                        "headers": {k.lower(): v for k, v in headers},
                        "body": body.decode("utf-8", "replace"),
                        "sha": sha(body),
                    }
                ).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Target: yes\r\n"
                    b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(out) + out
                )
            await writer.drain()
        except Exception:
            traceback.print_exc()
        writer.close()

    # -- the fake gateway ----------------------------------------------------

    def _authorized(self, headers):
        want = "Basic " + base64.b64encode(f"{ID}:{SECRET}".encode()).decode()
        return _get(headers, "proxy-authorization") == want

    async def _gateway(self, reader, writer):
        try:
            method, target, headers = await _read_head(reader)
            self.seen.append((method, target, _get(headers, "proxy-authorization")))
            if method == "CONNECT":
                await self._connect(reader, writer, target, headers)
            elif target.startswith("http://"):
                await self._forward(reader, writer, method, target, headers)
            elif target == "/.trellis/services":
                if _get(headers, "trellis-binding") != f"{ID}:{SECRET}":
                    return await _refuse(writer, 401, "Unauthorized", "bad_credentials", "The binding is unknown.")
                body = json.dumps(
                    {
                        "binding": "ci-runner",
                        "account": "prod",
                        "address": "100.64.0.9",
                        "services": [
                            {
                                "name": "db.prod.mesh",
                                "address": "100.64.0.3",
                                "node": "db",
                                "online": True,
                                "ports": ["tcp:5432"],
                            }
                        ],
                    }
                ).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                    b"Connection: close\r\n\r\n" % len(body) + body
                )
                await writer.drain()
                writer.close()
            else:
                await _refuse(writer, 404, "Not Found", "bad_target", "Unknown gateway path.")
        except Exception:
            traceback.print_exc()
            writer.close()

    async def _connect(self, reader, writer, authority, headers):
        if not self._authorized(headers):
            return await _refuse(
                writer, 407, "Proxy Authentication Required", "bad_credentials", "The binding is unknown."
            )
        if authority == "denied.prod.mesh:5432":
            return await _refuse(
                writer,
                403,
                "Forbidden",
                "policy_denied",
                "No rule lets binding:ci-runner reach denied.prod.mesh on tcp:5432.",
            )
        if authority == "db.prod.mesh:5432":
            port, greeting = self.port(self.echo), GREETING
        elif authority == "secure.prod.mesh:443" and self.tls:
            port, greeting = self.port(self.tls), b""
        else:
            return await _refuse(writer, 404, "Not Found", "unknown_host", "No node has that name.")
        ur, uw = await asyncio.open_connection("127.0.0.1", port)
        # The answer and the first bytes of the stream in one write.
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n" + greeting)
        await writer.drain()
        await asyncio.gather(_pipe(reader, uw), _pipe(ur, writer))
        uw.close()
        writer.close()

    async def _forward(self, reader, writer, method, url, headers):
        if not self._authorized(headers):
            return await _refuse(
                writer, 407, "Proxy Authentication Required", "bad_credentials", "The binding is unknown."
            )
        u = httpx.URL(url)
        if u.host == "denied.prod.mesh":
            return await _refuse(
                writer, 403, "Forbidden", "policy_denied", "No rule lets binding:ci-runner reach denied.prod.mesh on tcp:80."
            )
        if u.host != "api.prod.mesh":
            return await _refuse(writer, 404, "Not Found", "unknown_host", "No node has that name.")
        ur, uw = await asyncio.open_connection("127.0.0.1", self.port(self.target))
        path = u.raw_path.decode()
        head = f"{method} {path} HTTP/1.1\r\n"
        for k, v in headers:
            if k.lower() in ("proxy-authorization", "proxy-connection", "connection"):
                continue
            head += f"{k}: {v}\r\n"
        head += "Connection: close\r\n\r\n"
        uw.write(head.encode())
        # Both directions stream; the target closes after its response.
        up = asyncio.ensure_future(_pipe(reader, uw))
        await _pipe(ur, writer)
        up.cancel()
        uw.close()
        writer.close()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    if not shutil.which("openssl"):
        return None
    d = tmp_path_factory.mktemp("tls")
    cert, key = str(d / "cert.pem"), str(d / "key.pem")
    r = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "2",
         "-subj", "/CN=secure.prod.mesh", "-addext", "subjectAltName=DNS:secure.prod.mesh,IP:127.0.0.1"],
        capture_output=True,
    )
    if r.returncode != 0:
        return None
    return cert, key


@pytest.fixture(scope="module")
def world(tls_files):
    w = World(*(tls_files or (None, None)))
    yield w
    w.close()


@pytest.fixture
def mesh(world):
    return Mesh(f"http://{ID}:{SECRET}@127.0.0.1:{world.gw_port}")


def test_get_reaches_the_target_with_headers_and_untouched_authorization(mesh, world):
    with mesh.client() as c:
        r = c.get(
            "http://api.prod.mesh/items?limit=10",
            headers={"Authorization": "Bearer target-token", "X-Custom": "one two"},
        )
    assert r.status_code == 200
    assert r.headers["x-target"] == "yes"
    got = r.json()
    assert got["method"] == "GET"
    assert got["path"] == "/items?limit=10"
    assert got["headers"]["authorization"] == "Bearer target-token"
    assert got["headers"]["x-custom"] == "one two"
    assert got["headers"]["host"] == "api.prod.mesh"
    assert "proxy-authorization" not in got["headers"]
    assert ("GET", "http://api.prod.mesh/items?limit=10",
            "Basic " + base64.b64encode(f"{ID}:{SECRET}".encode()).decode()) in world.seen


def test_post_with_body_and_convenience_functions(mesh, monkeypatch, world):
    r = mesh.post("http://api.prod.mesh/items", json={"name": "widget"}, headers={"Cookie": "session=abc"})
    got = r.json()
    assert got["method"] == "POST"
    assert json.loads(got["body"]) == {"name": "widget"}
    assert got["headers"]["content-type"] == "application/json"
    assert got["headers"]["cookie"] == "session=abc"

    monkeypatch.setenv("MESH", f"http://{ID}:{SECRET}@127.0.0.1:{world.gw_port}")
    r = Mesh.from_env().get("http://api.prod.mesh/env")
    assert r.json()["path"] == "/env"
    r = Mesh.from_env("MESH").request("PUT", "http://api.prod.mesh/put", content=b"\x00\x01raw")
    assert (r.json()["method"], r.json()["sha"]) == ("PUT", sha(b"\x00\x01raw"))


def test_streamed_upload_arrives(mesh):
    data = BIG_BODY[: 1024 * 1024]

    def gen():
        for o in range(0, len(data), 65536):
            yield data[o : o + 65536]

    with mesh.client() as c:
        r = c.post("http://api.prod.mesh/upload", content=gen())
    assert r.json()["sha"] == sha(data)


def test_streamed_5mib_response_arrives_intact(mesh):
    h = hashlib.sha256()
    n = chunks = 0
    with mesh.client() as c:
        with c.stream("GET", "http://api.prod.mesh/big") as r:
            assert r.status_code == 200
            for piece in r.iter_bytes():
                h.update(piece)
                n += len(piece)
                chunks += 1
    assert n == BIG
    assert chunks > 1
    assert h.hexdigest() == sha(BIG_BODY)


def test_transport_for_your_own_client(mesh):
    with httpx.Client(transport=mesh.transport()) as c:
        assert c.get("http://api.prod.mesh/own").json()["path"] == "/own"
    with httpx.Client(mounts={"http://": mesh.transport()}) as c:
        assert c.get("http://api.prod.mesh/mounted").json()["path"] == "/mounted"


def test_async_client(mesh):
    async def main():
        async with mesh.async_client() as c:
            r = await c.post("http://api.prod.mesh/async", content=b"hello")
            return r.json()

    got = asyncio.run(main())
    assert (got["method"], got["path"], got["body"]) == ("POST", "/async", "hello")


def test_https_targets_go_through_connect(mesh, world, tls_files):
    if tls_files is None:
        pytest.skip("openssl is not available to make a test certificate")
    ctx = ssl.create_default_context(cafile=tls_files[0])
    with mesh.client(verify=ctx) as c:
        r = c.get("https://secure.prod.mesh/tls-path", headers={"Authorization": "Bearer t"})
    got = r.json()
    assert got["path"] == "/tls-path"
    assert got["headers"]["authorization"] == "Bearer t"
    assert any(m == "CONNECT" and t == "secure.prod.mesh:443" for m, t, _ in world.seen)


def test_gateway_refusals_are_responses(mesh, world):
    r = mesh.get("http://denied.prod.mesh/")
    assert r.status_code == 403
    err = gateway_error(r)
    assert isinstance(err, MeshError)
    assert (err.status, err.code) == (403, "policy_denied")
    assert "No rule lets binding:ci-runner" in err.message
    assert gateway_error(mesh.get("http://api.prod.mesh/")) is None

    wrong = Mesh(f"http://{ID}:wrong@127.0.0.1:{world.gw_port}")
    r = wrong.get("http://api.prod.mesh/")
    assert r.status_code == 407
    assert r.headers["trellis-error"] == "bad_credentials"


def test_open_connection_round_trips_bytes_exactly(mesh, world):
    payload = bytes((i * 7 + 3) & 0xFF for i in range(300_000))

    async def main():
        reader, writer = await mesh.open_connection("db.prod.mesh", 5432)
        writer.write(payload)
        await writer.drain()
        got = await asyncio.wait_for(reader.readexactly(len(GREETING) + len(payload)), 10)
        writer.write_eof()
        rest = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return got, rest

    got, rest = asyncio.run(main())
    assert got == GREETING + payload
    assert rest == b""
    assert any(m == "CONNECT" and t == "db.prod.mesh:5432" for m, t, _ in world.seen)


def test_open_connection_refusals_raise_mesh_error(mesh, world):
    async def attempt(m, host, port):
        return await m.open_connection(host, port)

    with pytest.raises(MeshError) as e:
        asyncio.run(attempt(mesh, "denied.prod.mesh", 5432))
    assert (e.value.status, e.value.code) == (403, "policy_denied")
    assert e.value.message == "No rule lets binding:ci-runner reach denied.prod.mesh on tcp:5432."

    wrong = Mesh(f"http://{ID}:wrong@127.0.0.1:{world.gw_port}")
    with pytest.raises(MeshError) as e:
        asyncio.run(attempt(wrong, "db.prod.mesh", 5432))
    assert (e.value.status, e.value.code) == (407, "bad_credentials")

    with pytest.raises(ValueError, match="between 1 and 65535"):
        asyncio.run(attempt(mesh, "db.prod.mesh", 70000))


def test_services(mesh, world):
    s = mesh.services()
    assert s["binding"] == "ci-runner"
    assert s["services"][0]["name"] == "db.prod.mesh"
    assert s["services"][0]["ports"] == ["tcp:5432"]
    assert asyncio.run(mesh.aservices()) == s
    with pytest.raises(MeshError) as e:
        Mesh(f"http://{ID}:nope@127.0.0.1:{world.gw_port}").services()
    assert (e.value.status, e.value.code) == (401, "bad_credentials")


SECRET2 = "S3CRETvalue"


@pytest.mark.parametrize(
    "url,want",
    [
        ("", "it is empty"),
        (f"ftp://{ID}:{SECRET2}@edge:8443", "scheme must be http or https"),
        (f"http://{ID}:{SECRET2}@", "host is missing"),
        (f"http://{ID}:{SECRET2}@edge:99999", "port must be between"),
        (f"http://{ID}:{SECRET2}@edge:po{SECRET2}", "host or port is malformed"),
        (f"http://{ID}:{SECRET2} @edge:8443", "whitespace"),
        (f"http://{ID}@edge:8443", "secret (password part) is missing"),
        ("http://edge:8443", "binding id (user part) is missing"),
        (f"http://alice:{SECRET2}@edge:8443", "b_ followed by"),
        (f"http://{ID}:{SECRET2}@edge:8443/path", "must not have a path"),
        (f"http://{ID}:{SECRET2}@edge:8443/?x=1", "query or fragment"),
        (f"http://{ID}:%ff{SECRET2}@edge:8443", "percent-encoded UTF-8"),
        (f"http://{ID}:{SECRET2}@[zz{SECRET2}]:8443", "not a URL"),
        (f"{ID}:{SECRET2}@edge:8443", "not a URL"),
    ],
)
def test_malformed_urls_raise_without_the_secret(url, want):
    with pytest.raises(MeshURLError) as e:
        Mesh(url)
    msg = str(e.value)
    assert want in msg
    assert "http(s)://b_<id>:<secret>@HOST:PORT" in msg
    shown = "".join(traceback.format_exception(e.type, e.value, e.tb))
    assert SECRET2 not in msg
    # The traceback (with chained exceptions) shows no secret either, apart
    # from the test's own source lines.
    assert SECRET2 not in shown.replace("SECRET2", "")
    assert e.value.__cause__ is None and e.value.__suppress_context__ or e.value.__context__ is None


def test_from_env_missing(monkeypatch):
    monkeypatch.delenv("MESH_MISSING", raising=False)
    with pytest.raises(MeshURLError, match="MESH_MISSING is not set"):
        Mesh.from_env("MESH_MISSING")


def test_the_client_never_shows_its_secret(world):
    m = Mesh(f"https://{ID}:a%2Fb@[::1]:8443")
    assert m.id == ID
    assert m.gateway == "https://[::1]:8443"
    assert "a/b" not in repr(m) and "a%2Fb" not in repr(m)
    assert m._b.secret == "a/b"
    assert Mesh(f"https://{ID}:x@edge.example.com").gateway == "https://edge.example.com:443"
    with pytest.raises(TypeError, match="set by the mesh"):
        m.client(proxy="http://elsewhere:1")


def test_open_connection_through_an_https_gateway(world, tls_files):
    if tls_files is None:
        pytest.skip("openssl is not available to make a test certificate")
    m = Mesh(f"https://{ID}:{SECRET}@127.0.0.1:{world.port(world.gw_tls)}")

    async def main(ctx):
        reader, writer = await m.open_connection("db.prod.mesh", 5432, ssl=ctx)
        assert writer.get_extra_info("ssl_object") is not None
        writer.write(b"over tls")
        got = await asyncio.wait_for(reader.readexactly(len(GREETING) + 8), 10)
        writer.close()
        return got

    assert asyncio.run(main(ssl.create_default_context(cafile=tls_files[0]))) == GREETING + b"over tls"
    # Without the CA the gateway's certificate is refused.
    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(main(None))
