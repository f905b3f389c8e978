// Tests of @trellis-mesh/sdk against a fake gateway (loopback only) that
// implements docs/gateway.md: the plain form, CONNECT, /.trellis/services
// and refusals with Trellis-Error.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import net from 'node:net';
import { createHash } from 'node:crypto';
import { once } from 'node:events';
import https from 'node:https';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { mesh, Mesh, MeshError, gatewayError, parseBinding } from '../src/index.js';

const ID = 'b_k3v9x2m4q7w8e5rt';
const SECRET = 'Zp4s3cr3tQ9';
const BIG = 5 * 1024 * 1024;
// Bytes the gateway sends right behind "200 Connection established" (as a
// server that speaks first would): they must not be lost.
const GREETING = Buffer.from([0x53, 0x53, 0x48, 0x2d, 0x00, 0xff, 0x0d, 0x0a, 0x0d, 0x0a, 0x7f]);

// Deterministic, non-repeating-looking content for the big body.
function bigBody() {
  const out = Buffer.alloc(BIG);
  let x = 0x12345678;
  for (let i = 0; i < BIG; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}
const BIG_BODY = bigBody();
const sha = (b) => createHash('sha256').update(b).digest('hex');

let target; // in-test HTTP target
let echo; // in-test TCP echo
let gateway; // fake gateway
let gwPort;
const seen = []; // requests the gateway served: { method, target, binding }

function listen(server) {
  server.listen(0, '127.0.0.1');
  return once(server, 'listening').then(() => server.address().port);
}

function refuse(res, status, code, sentence) {
  res.writeHead(status, { 'Trellis-Error': code, 'Content-Type': 'text/plain; charset=utf-8' });
  res.end(`${sentence}\n`);
}

before(async () => {
  target = http.createServer(async (req, res) => {
    if (req.url === '/big') {
      res.writeHead(200, { 'Content-Type': 'application/octet-stream' });
      // Streamed in pieces, no Content-Length (chunked).
      for (let o = 0; o < BIG; o += 256 * 1024) {
        if (!res.write(BIG_BODY.subarray(o, o + 256 * 1024))) await once(res, 'drain');
      }
      res.end();
      return;
    }
    if (req.url === '/moved') {
      res.writeHead(302, { Location: '/landed?from=moved' });
      res.end();
      return;
    }
    const chunks = [];
    for await (const c of req) chunks.push(c);
    const body = Buffer.concat(chunks);
    res.writeHead(200, { 'Content-Type': 'application/json', 'X-Target': 'yes' });
    res.end(JSON.stringify({
      method: req.method,
      url: req.url,
      headers: req.headers,
      body: body.toString('utf8'),
      bodySha: sha(body),
    }));
  });
  const targetPort = await listen(target);

  echo = net.createServer((s) => s.pipe(s));
  const echoPort = await listen(echo);

  const creds = `${ID}:${SECRET}`;
  gateway = http.createServer((req, res) => {
    const binding = req.headers['trellis-binding'];
    seen.push({ method: req.method, target: req.headers['trellis-target'], binding, path: req.url });
    if (binding === undefined) return refuse(res, 401, 'auth_required', 'This request needs a binding.');
    if (binding !== creds) return refuse(res, 401, 'bad_credentials', 'The binding is unknown or its secret is wrong.');
    if (req.url === '/.trellis/services' && req.method === 'GET' && !req.headers['trellis-target']) {
      res.writeHead(200, { 'Content-Type': 'application/json' });
      res.end(JSON.stringify({
        binding: 'ci-runner', account: 'prod', address: '100.64.0.9',
        services: [{ name: 'db.prod.mesh', address: '100.64.0.3', node: 'db', online: true, ports: ['tcp:5432'] }],
      }));
      return;
    }
    let url;
    try {
      url = new URL(req.headers['trellis-target']);
    } catch {
      return refuse(res, 400, 'bad_target', 'Trellis-Target is not a URL.');
    }
    if (url.hostname === 'denied.prod.mesh') {
      return refuse(res, 403, 'policy_denied', 'No rule lets binding:ci-runner reach denied.prod.mesh on tcp:80.');
    }
    if (url.hostname !== 'api.prod.mesh') return refuse(res, 404, 'unknown_host', `No node is named ${url.hostname}.`);
    const headers = { ...req.headers, host: url.host };
    delete headers['trellis-target'];
    delete headers['trellis-binding'];
    delete headers.connection;
    const up = http.request({ host: '127.0.0.1', port: targetPort, method: req.method, path: url.pathname + url.search, headers }, (ur) => {
      res.writeHead(ur.statusCode, ur.headers);
      ur.pipe(res);
    });
    up.on('error', () => refuse(res, 502, 'upstream_error', 'The target broke the HTTP exchange.'));
    req.pipe(up);
  });
  gateway.on('connect', (req, sock, head) => {
    const auth = req.headers['proxy-authorization'];
    seen.push({ method: 'CONNECT', target: req.url, binding: auth });
    const answer = (status, code, sentence) => {
      const body = `${sentence}\n`;
      sock.end(`HTTP/1.1 ${status} ${http.STATUS_CODES[status]}\r\nTrellis-Error: ${code}\r\n`
        + `Content-Type: text/plain; charset=utf-8\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`);
    };
    if (auth !== `Basic ${Buffer.from(creds).toString('base64')}`) {
      return answer(407, 'bad_credentials', 'The binding is unknown or its secret is wrong.');
    }
    if (req.url === 'denied.prod.mesh:5432') {
      return answer(403, 'policy_denied', 'No rule lets binding:ci-runner reach denied.prod.mesh on tcp:5432.');
    }
    if (req.url !== 'db.prod.mesh:5432') return answer(404, 'unknown_host', 'No node is named that.');
    const up = net.connect(echoPort, '127.0.0.1', () => {
      // The answer and the first bytes of the stream in one write.
      sock.write(Buffer.concat([Buffer.from('HTTP/1.1 200 Connection established\r\n\r\n'), GREETING]));
      if (head.length) up.write(head);
      up.pipe(sock);
      sock.pipe(up);
    });
    up.on('error', () => sock.destroy());
    sock.on('error', () => up.destroy());
  });
  gwPort = await listen(gateway);
});

after(() => {
  gateway.closeAllConnections?.();
  target.closeAllConnections?.();
  gateway.close();
  target.close();
  echo.close();
});

const url = () => `http://${ID}:${SECRET}@127.0.0.1:${gwPort}`;

test('fetch GET reaches the target with its headers; Authorization passes untouched', async () => {
  const m = mesh(url());
  const res = await m.fetch('http://api.prod.mesh/items?limit=10', {
    headers: { Authorization: 'Bearer target-token', 'X-Custom': 'one two' },
  });
  assert.equal(res.status, 200);
  assert.equal(res.headers.get('x-target'), 'yes');
  assert.equal(res.url, 'http://api.prod.mesh/items?limit=10');
  const got = await res.json();
  assert.equal(got.method, 'GET');
  assert.equal(got.url, '/items?limit=10');
  assert.equal(got.headers.authorization, 'Bearer target-token');
  assert.equal(got.headers['x-custom'], 'one two');
  assert.equal(got.headers.host, 'api.prod.mesh');
  const last = seen.findLast((s) => s.method === 'GET');
  assert.equal(last.target, 'http://api.prod.mesh/items?limit=10');
  assert.equal(last.binding, `${ID}:${SECRET}`);
  assert.equal(last.path, '/fetch');
});

test('fetch POST with a body, a Request and a URL input', async () => {
  const { fetch } = mesh(url()); // works unbound
  const res = await fetch(new URL('http://api.prod.mesh/items'), {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', Cookie: 'session=abc' },
    body: JSON.stringify({ name: 'widget' }),
  });
  const got = await res.json();
  assert.equal(got.method, 'POST');
  assert.equal(got.body, '{"name":"widget"}');
  assert.equal(got.headers['content-type'], 'application/json');
  assert.equal(got.headers.cookie, 'session=abc');

  const req = new Request('http://api.prod.mesh/put', { method: 'PUT', body: 'from a Request', headers: { 'X-R': '1' } });
  const got2 = await (await fetch(req)).json();
  assert.deepEqual([got2.method, got2.url, got2.body, got2.headers['x-r']], ['PUT', '/put', 'from a Request', '1']);
});

test('fetch streams a request body (ReadableStream) to the target', async () => {
  const m = mesh(url());
  const parts = [];
  for (let i = 0; i < 64; i++) parts.push(BIG_BODY.subarray(i * 16384, (i + 1) * 16384));
  const stream = new ReadableStream({
    pull(c) {
      const p = parts.shift();
      if (p) c.enqueue(new Uint8Array(p));
      else c.close();
    },
  });
  const got = await (await m.fetch('http://api.prod.mesh/upload', { method: 'POST', body: stream })).json();
  assert.equal(got.method, 'POST');
  assert.equal(got.bodySha, sha(BIG_BODY.subarray(0, 64 * 16384)));
});

test('fetch streams a 5 MiB response intact', async () => {
  const res = await mesh(url()).fetch('http://api.prod.mesh/big');
  assert.equal(res.status, 200);
  const reader = res.body.getReader();
  let n = 0;
  let chunks = 0;
  const h = createHash('sha256');
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    n += value.length;
    chunks++;
    h.update(value);
  }
  assert.equal(n, BIG);
  assert.ok(chunks > 1, 'the body arrives in several chunks (streamed)');
  assert.equal(h.digest('hex'), sha(BIG_BODY));
});

test('fetch follows redirects through the mesh', async () => {
  const res = await mesh(url()).fetch('http://api.prod.mesh/moved');
  assert.equal(res.status, 200);
  assert.equal(res.url, 'http://api.prod.mesh/landed?from=moved');
  assert.equal(res.redirected, true);
  assert.equal((await res.json()).url, '/landed?from=moved');
  const manual = await mesh(url()).fetch('http://api.prod.mesh/moved', { redirect: 'manual' });
  assert.equal(manual.status, 302);
  assert.equal(manual.headers.get('location'), '/landed?from=moved');
});

test('gateway refusals come back as Responses with Trellis-Error', async () => {
  const res = await mesh(url()).fetch('http://denied.prod.mesh/');
  assert.equal(res.status, 403);
  assert.equal(res.headers.get('trellis-error'), 'policy_denied');
  const err = await gatewayError(res);
  assert.ok(err instanceof MeshError);
  assert.equal(err.code, 'policy_denied');
  assert.match(err.message, /No rule lets binding:ci-runner reach denied\.prod\.mesh/);

  const wrong = mesh(`http://${ID}:wrong@127.0.0.1:${gwPort}`);
  const r2 = await wrong.fetch('http://api.prod.mesh/');
  assert.equal(r2.status, 401);
  assert.equal(r2.headers.get('trellis-error'), 'bad_credentials');

  const ok = await mesh(url()).fetch('http://api.prod.mesh/');
  assert.equal(await gatewayError(ok), null);
});

test('fetch refuses non-http targets with a clear error', async () => {
  await assert.rejects(mesh(url()).fetch('https://api.prod.mesh/'), /only http:\/\/ targets.*mesh\.connect/);
});

test('connect round-trips bytes exactly, keeping what the gateway sent right after the 200', async () => {
  const sock = await mesh(url()).connect('db.prod.mesh:5432');
  const got = [];
  sock.on('data', (d) => got.push(d));
  const payload = Buffer.alloc(300_000);
  for (let i = 0; i < payload.length; i++) payload[i] = (i * 7 + 3) & 0xff;
  sock.write(payload);
  const want = Buffer.concat([GREETING, payload]);
  const deadline = Date.now() + 10_000;
  while (Buffer.concat(got).length < want.length && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 10));
  }
  sock.end();
  assert.ok(Buffer.concat(got).equals(want), 'greeting then the echoed payload, byte for byte');
  const last = seen.findLast((s) => s.method === 'CONNECT');
  assert.equal(last.target, 'db.prod.mesh:5432');
});

test('connect also takes host and port, and works with async iteration', async () => {
  const sock = await mesh(url()).connect('db.prod.mesh', 5432);
  sock.write('ping');
  let buf = Buffer.alloc(0);
  for await (const d of sock) {
    buf = Buffer.concat([buf, d]);
    if (buf.length >= GREETING.length + 4) break;
  }
  assert.ok(buf.equals(Buffer.concat([GREETING, Buffer.from('ping')])));
});

test('connect rejects with the gateway status, code and sentence', async () => {
  await assert.rejects(mesh(url()).connect('denied.prod.mesh:5432'), (err) => {
    assert.ok(err instanceof MeshError);
    assert.equal(err.status, 403);
    assert.equal(err.code, 'policy_denied');
    assert.equal(err.message, 'No rule lets binding:ci-runner reach denied.prod.mesh on tcp:5432.');
    return true;
  });
  await assert.rejects(mesh(`http://${ID}:nope@127.0.0.1:${gwPort}`).connect('db.prod.mesh:5432'), (err) => {
    assert.equal(err.status, 407);
    assert.equal(err.code, 'bad_credentials');
    return true;
  });
  await assert.rejects(mesh(url()).connect('db.prod.mesh'), /not HOST:PORT/);
  await assert.rejects(mesh(url()).connect('db.prod.mesh', 70000), /port between 1 and 65535/);
});

test('services returns the JSON of /.trellis/services', async () => {
  const s = await mesh(url()).services();
  assert.equal(s.binding, 'ci-runner');
  assert.equal(s.services[0].name, 'db.prod.mesh');
  assert.deepEqual(s.services[0].ports, ['tcp:5432']);
  await assert.rejects(mesh(`http://${ID}:nope@127.0.0.1:${gwPort}`).services(), (err) => {
    assert.equal(err.status, 401);
    assert.equal(err.code, 'bad_credentials');
    return true;
  });
});

test('malformed binding URLs throw a clear error without the secret', () => {
  const secret = 'S3CRETvalue';
  const cases = [
    ['', /it is empty/],
    [`ftp://${ID}:${secret}@edge:8443`, /scheme must be http or https/],
    [`http://${ID}:${secret}@`, /not a URL|host is missing/],
    [`http://${ID}:${secret}@edge:99999`, /not a URL/],
    [`http://${ID}:${secret} @edge:8443`, /not a URL|printable/],
    [`http://${ID}@edge:8443`, /secret \(password part\) is missing/],
    [`http://edge:8443`, /binding id \(user part\) is missing/],
    [`http://alice:${secret}@edge:8443`, /b_ followed by/],
    [`http://${ID}:${secret}@edge:8443/path`, /must not have a path/],
    [`http://${ID}:${secret}@edge:8443/?x=1`, /query or fragment/],
    [`http://${ID}:%ZZ${secret}@edge:8443`, /not valid percent-encoding/],
    [`${ID}:${secret}@edge:8443`, /not a URL|scheme/],
  ];
  for (const [u, want] of cases) {
    assert.throws(() => mesh(u), (err) => {
      assert.ok(err instanceof TypeError, `${typeof err} for case`);
      assert.match(err.message, want);
      assert.match(err.message, /http\(s\):\/\/b_<id>:<secret>@HOST:PORT/);
      const everything = JSON.stringify({ m: err.message, s: err.stack, c: String(err.cause), ...err });
      assert.ok(!everything.includes(secret), `the error leaks the secret: ${err.message}`);
      return true;
    });
  }
});

test('the client never shows its secret', () => {
  const m = mesh(url());
  assert.equal(m.id, ID);
  assert.equal(m.gateway, `http://127.0.0.1:${gwPort}`);
  assert.ok(!String(m).includes(SECRET));
  assert.ok(!JSON.stringify(m).includes(SECRET));
  assert.ok(m instanceof Mesh);
  const b = parseBinding(`https://${ID}:a%2Fb@[::1]:8443`);
  assert.deepEqual([b.secret, b.hostname, b.port, b.tls, b.gateway], ['a/b', '::1', 8443, true, 'https://[::1]:8443']);
  assert.equal(parseBinding(`https://${ID}:x@edge.example.com`).port, 443);
});

test('mesh() reads MESH from the environment', () => {
  const old = process.env.MESH;
  try {
    process.env.MESH = url();
    assert.equal(mesh().id, ID);
    delete process.env.MESH;
    assert.throws(() => mesh(), /MESH is not set/);
  } finally {
    if (old === undefined) delete process.env.MESH;
    else process.env.MESH = old;
  }
});

test('connect through an https gateway (TLS to the gateway, then CONNECT)', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'trellis-sdk-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  try {
    execFileSync('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', join(dir, 'key.pem'),
      '-out', join(dir, 'cert.pem'), '-days', '2', '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1'],
    { stdio: 'ignore' });
  } catch {
    t.skip('openssl is not available to make a test certificate');
    return;
  }
  const cert = readFileSync(join(dir, 'cert.pem'));
  const tlsGw = https.createServer({ cert, key: readFileSync(join(dir, 'key.pem')) });
  // The same CONNECT handling as the plain gateway.
  for (const l of gateway.listeners('connect')) tlsGw.on('connect', l);
  const port = await listen(tlsGw);
  t.after(() => tlsGw.close());
  const m = mesh(`https://${ID}:${SECRET}@127.0.0.1:${port}`);
  const sock = await m.connect('db.prod.mesh:5432', { tls: { ca: cert } });
  assert.equal(sock.encrypted, true);
  sock.write('over tls');
  let buf = Buffer.alloc(0);
  for await (const d of sock) {
    buf = Buffer.concat([buf, d]);
    if (buf.length >= GREETING.length + 8) break;
  }
  assert.ok(buf.equals(Buffer.concat([GREETING, Buffer.from('over tls')])));
  // Without the CA the gateway's certificate is refused.
  await assert.rejects(m.connect('db.prod.mesh:5432'), /self[- ]signed|certificate/i);
});
