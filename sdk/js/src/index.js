// @trellis-mesh/sdk — reach a Trellis mesh through a binding and the fetch
// gateway (protocol: docs/gateway.md in the Trellis repository).
//
// No runtime dependencies. `fetch` and `services` only need the platform's
// `fetch` (Node >= 18, Deno, Bun, Cloudflare Workers, Vercel, ...);
// `connect` needs Node's `node:net` / `node:tls`.

const USAGE = 'expected http(s)://b_<id>:<secret>@HOST:PORT';
const MAX_REDIRECTS = 20;
const MAX_ERROR_HEAD = 64 * 1024;
const MAX_ERROR_BODY = 64 * 1024;

/** An answer of the gateway that is not a success: status, `Trellis-Error` code, sentence. */
export class MeshError extends Error {
  /**
   * @param {number} status HTTP status the gateway answered
   * @param {string|null} code the `Trellis-Error` header (null when absent)
   * @param {string} message the gateway's one-sentence explanation
   */
  constructor(status, code, message) {
    super(message || `the gateway answered ${status}${code ? ` (${code})` : ''}`);
    this.name = 'MeshError';
    this.status = status;
    this.code = code;
  }
}

function bad(reason) {
  // Never include the input: it contains the binding's secret.
  return new TypeError(`invalid Trellis binding URL: ${reason}; ${USAGE}`);
}

function decode(part, what) {
  try {
    return decodeURIComponent(part);
  } catch {
    throw bad(`the ${what} is not valid percent-encoding`);
  }
}

const PRINTABLE = /^[\x21-\x7e]+$/;

/**
 * Parses a binding URL. Errors never contain the URL (it carries the secret).
 * @param {string} url
 */
export function parseBinding(url) {
  if (typeof url !== 'string' || url.trim() === '') {
    throw bad('it is empty');
  }
  url = url.trim();
  let u;
  try {
    u = new URL(url);
  } catch {
    // The platform's error carries the input (Node sets `err.input`): drop it.
    throw bad('it is not a URL');
  }
  if (u.protocol !== 'http:' && u.protocol !== 'https:') {
    throw bad(`the scheme must be http or https, not ${JSON.stringify(u.protocol.slice(0, -1)).slice(0, 40)}`);
  }
  if (!u.hostname) throw bad('the host is missing');
  if (u.pathname !== '/' && u.pathname !== '') throw bad('it must not have a path');
  if (u.search || u.hash || url.includes('#') || url.includes('?')) {
    throw bad('it must not have a query or fragment');
  }
  if (!u.username) throw bad('the binding id (user part) is missing');
  const id = decode(u.username, 'binding id');
  if (!/^b_[A-Za-z0-9_-]+$/.test(id)) {
    throw bad('the user part must be the binding id, b_ followed by letters and digits');
  }
  if (!u.password) throw bad('the secret (password part) is missing');
  const secret = decode(u.password, 'secret');
  if (!PRINTABLE.test(secret)) {
    throw bad('the secret contains spaces or characters outside printable ASCII');
  }
  const tls = u.protocol === 'https:';
  const hostname = u.hostname.startsWith('[') ? u.hostname.slice(1, -1) : u.hostname;
  const port = u.port ? Number(u.port) : tls ? 443 : 80;
  return {
    id,
    secret,
    tls,
    hostname,
    port,
    // u.host keeps IPv6 brackets and drops a default port.
    gateway: `${u.protocol}//${u.host}`,
  };
}

function base64(text) {
  const bytes = new TextEncoder().encode(text);
  let bin = '';
  for (const b of bytes) bin += String.fromCharCode(b);
  return btoa(bin);
}

function isStream(body) {
  return typeof ReadableStream !== 'undefined' && body instanceof ReadableStream;
}

function isAsyncIterable(body) {
  return body != null && typeof body === 'object' && typeof body[Symbol.asyncIterator] === 'function'
    && !isStream(body);
}

function splitAuthority(target, port) {
  if (port !== undefined) {
    const p = Number(port);
    if (typeof target !== 'string' || !target || !Number.isInteger(p) || p < 1 || p > 65535) {
      throw new TypeError('mesh.connect: expected (host, port) with a port between 1 and 65535');
    }
    const host = target.includes(':') && !target.startsWith('[') ? `[${target}]` : target;
    return `${host}:${p}`;
  }
  if (typeof target !== 'string') {
    throw new TypeError('mesh.connect: expected "HOST:PORT", e.g. "db.prod.mesh:5432"');
  }
  const m = /^(\[[0-9A-Fa-f:.]+\]|[^\s:/@[\]]+):(\d{1,5})$/.exec(target);
  if (!m || Number(m[2]) < 1 || Number(m[2]) > 65535) {
    throw new TypeError(
      `mesh.connect: ${JSON.stringify(target)} is not HOST:PORT (e.g. "db.prod.mesh:5432", "[fd00::3]:22")`,
    );
  }
  return `${m[1]}:${Number(m[2])}`;
}

/** The client of one binding. Create it with `mesh(url)`. */
export class Mesh {
  #b;

  /** @param {string} url the binding URL (`MESH=...`) */
  constructor(url) {
    this.#b = parseBinding(url);
    /** The binding id, `b_...`. */
    this.id = this.#b.id;
    /** The gateway's base URL without credentials, e.g. `https://edge.example.com:8443`. */
    this.gateway = this.#b.gateway;
    // Bound so that `const { fetch } = mesh()` and passing `m.fetch` around work.
    this.fetch = this.fetch.bind(this);
    this.connect = this.connect.bind(this);
    this.services = this.services.bind(this);
  }

  /** `b_<id>:<secret>`, the value of `Trellis-Binding`. */
  #credentials() {
    return `${this.#b.id}:${this.#b.secret}`;
  }

  /**
   * The platform's `fetch`, through the mesh: same arguments, returns the
   * platform's `Response`. Uses the gateway's plain form, so it needs no
   * proxy support. Gateway errors come back as Responses too; they carry a
   * `Trellis-Error` header (see `gatewayError`).
   * @param {string|URL|Request} input
   * @param {RequestInit} [init]
   * @returns {Promise<Response>}
   */
  async fetch(input, init = undefined) {
    const opts = init ? { ...init } : {};
    if (opts.body != null && (isStream(opts.body) || isAsyncIterable(opts.body)) && !opts.duplex) {
      opts.duplex = 'half';
    }
    let req = new Request(input, opts);
    let target = new URL(req.url);
    if (target.protocol !== 'http:') {
      throw new TypeError(
        `mesh.fetch: only http:// targets go through the gateway's plain form, not ${target.protocol}// ` +
          '(traffic inside the mesh is already encrypted by WireGuard; for TLS to a private service use mesh.connect())',
      );
    }
    // Bodies that can be sent again (not streams) may follow 307/308 redirects.
    const replayable = !(input instanceof Request && input.body != null && opts.body === undefined)
      && !isStream(opts.body) && !isAsyncIterable(opts.body);
    const mode = req.redirect;
    let method = req.method;
    let headers = new Headers(req.headers);
    let body = req.body;
    for (let hops = 0; ; hops++) {
      target.hash = '';
      const sent = new Headers(headers);
      sent.set('Trellis-Target', target.href);
      sent.set('Trellis-Binding', this.#credentials());
      const reqInit = {
        method,
        headers: sent,
        redirect: 'manual',
        signal: req.signal,
      };
      if (body != null) {
        reqInit.body = body;
        reqInit.duplex = 'half';
      }
      const res = await globalThis.fetch(`${this.#b.gateway}/fetch`, reqInit);
      const location = res.headers.get('location');
      const redirect = [301, 302, 303, 307, 308].includes(res.status) && location !== null
        && !res.headers.has('trellis-error');
      if (!redirect || mode === 'manual') {
        return withUrl(res, target.href, hops > 0);
      }
      if (mode === 'error') {
        await res.body?.cancel();
        throw new TypeError(`mesh.fetch: ${target.href} redirected and redirect is "error"`);
      }
      if (hops >= MAX_REDIRECTS) {
        await res.body?.cancel();
        throw new TypeError(`mesh.fetch: more than ${MAX_REDIRECTS} redirects from ${target.href}`);
      }
      await res.body?.cancel();
      const next = new URL(location, target);
      if (next.protocol !== 'http:') {
        throw new TypeError(`mesh.fetch: ${target.href} redirected to a ${next.protocol}// URL, which the plain form cannot fetch`);
      }
      if (res.status === 303 && method !== 'GET' && method !== 'HEAD'
        || (res.status === 301 || res.status === 302) && method === 'POST') {
        method = 'GET';
        body = null;
        for (const h of ['content-type', 'content-length', 'content-encoding', 'content-language', 'content-location']) {
          headers.delete(h);
        }
      } else if (body != null) {
        if (!replayable) {
          throw new TypeError(`mesh.fetch: ${target.href} answered ${res.status}, and a streamed body cannot be sent again`);
        }
        req = new Request(input, opts);
        body = req.body;
      }
      if (next.origin !== target.origin) {
        headers.delete('authorization');
        headers.delete('cookie');
      }
      target = next;
    }
  }

  /**
   * Opens a TCP stream to `target` (`"HOST:PORT"`, or host and port) through
   * the gateway's CONNECT. Node only. Resolves the connected socket (a
   * `net.Socket`/`tls.TLSSocket`, a Duplex) once the gateway answered 200;
   * rejects with a `MeshError` (status, code, message) when it refused.
   * @param {string} target
   * @param {number|{signal?: AbortSignal, timeout?: number}} [portOrOptions]
   * @param {{signal?: AbortSignal, timeout?: number, tls?: object}} [options] `tls`: extra
   *   `tls.connect` options (e.g. `ca`) for an https gateway
   */
  async connect(target, portOrOptions = undefined, options = undefined) {
    let port;
    if (typeof portOrOptions === 'number' || typeof portOrOptions === 'string') {
      port = portOrOptions;
    } else if (portOrOptions && options === undefined) {
      options = portOrOptions;
    }
    const authority = splitAuthority(target, port);
    const { signal, timeout = 30_000, tls: tlsOptions } = options ?? {};
    signal?.throwIfAborted();
    const b = this.#b;
    let socket;
    if (b.tls) {
      const tls = await import('node:tls');
      const isIp = /^[\d.]+$/.test(b.hostname) || b.hostname.includes(':');
      socket = tls.connect({ servername: isIp ? undefined : b.hostname, ...tlsOptions, host: b.hostname, port: b.port });
    } else {
      const net = await import('node:net');
      socket = net.connect({ host: b.hostname, port: b.port });
    }
    const head = `CONNECT ${authority} HTTP/1.1\r\nHost: ${authority}\r\n`
      + `Proxy-Authorization: Basic ${base64(this.#credentials())}\r\n\r\n`;
    socket.write(head);
    return await handshake(socket, authority, { signal, timeout });
  }

  /**
   * What the binding may reach: the JSON of `GET /.trellis/services`.
   * Rejects with a `MeshError` when the gateway refuses.
   */
  async services() {
    const res = await globalThis.fetch(`${this.#b.gateway}/.trellis/services`, {
      headers: { 'Trellis-Binding': this.#credentials(), Accept: 'application/json' },
    });
    if (!res.ok) {
      throw new MeshError(res.status, res.headers.get('trellis-error'), (await res.text()).trim());
    }
    return await res.json();
  }

  toString() {
    return `Mesh(${this.#b.tls ? 'https' : 'http'}://${this.#b.id}:***@${new URL(this.#b.gateway).host})`;
  }

  toJSON() {
    return { id: this.id, gateway: this.gateway };
  }

  [Symbol.for('nodejs.util.inspect.custom')]() {
    return this.toString();
  }
}

function withUrl(res, url, redirected) {
  try {
    Object.defineProperty(res, 'url', { value: url, configurable: true });
    if (redirected) Object.defineProperty(res, 'redirected', { value: true, configurable: true });
  } catch {
    // A platform whose Responses cannot take properties keeps the gateway URL.
  }
  return res;
}

/**
 * The gateway's refusal carried by a Response from `mesh.fetch`, or null when
 * the response comes from the target.
 * @param {Response} res
 * @returns {Promise<MeshError|null>}
 */
export async function gatewayError(res) {
  const code = res.headers.get('trellis-error');
  if (code === null) return null;
  return new MeshError(res.status, code, (await res.text()).trim());
}

function handshake(socket, authority, { signal, timeout }) {
  return new Promise((resolve, reject) => {
    let buf = new Uint8Array(0);
    let done = false;
    let head = null; // parsed response head of a refusal
    let body = [];
    let bodyLen = 0;
    const timer = setTimeout(() => fail(new Error(`mesh.connect: the gateway did not answer CONNECT ${authority} within ${timeout} ms`)), timeout);
    const onAbort = () => fail(signal.reason ?? new Error('aborted'));
    signal?.addEventListener('abort', onAbort, { once: true });

    function cleanup() {
      done = true;
      clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
      socket.removeListener('readable', onReadable);
      socket.removeListener('error', onError);
      socket.removeListener('end', onEnd);
      socket.removeListener('close', onEnd);
    }
    function fail(err) {
      if (done) return;
      cleanup();
      socket.destroy();
      reject(err);
    }
    function onError(err) {
      fail(err);
    }
    function refuse() {
      if (done) return;
      const text = new TextDecoder().decode(concat(body)).trim();
      fail(new MeshError(head.status, head.headers.get('trellis-error') ?? null, text));
    }
    function onEnd() {
      if (head) refuse();
      else fail(new Error(`mesh.connect: the gateway closed the connection before answering CONNECT ${authority}`));
    }
    function onReadable() {
      let chunk;
      while (!done && (chunk = socket.read()) !== null) {
        if (head) {
          body.push(chunk);
          bodyLen += chunk.length;
          if (head.length !== null ? bodyLen >= head.length : bodyLen >= MAX_ERROR_BODY) {
            body = [concat(body).subarray(0, head.length ?? MAX_ERROR_BODY)];
            refuse();
          }
          continue;
        }
        buf = concat([buf, chunk]);
        const end = indexOfHeadEnd(buf);
        if (end < 0) {
          if (buf.length > MAX_ERROR_HEAD) fail(new Error('mesh.connect: the gateway\'s answer is not HTTP'));
          continue;
        }
        let parsed;
        try {
          parsed = parseHead(new TextDecoder('latin1').decode(buf.subarray(0, end)));
        } catch (err) {
          fail(err);
          return;
        }
        const rest = buf.subarray(end + 4);
        if (parsed.status >= 200 && parsed.status < 300) {
          cleanup();
          // Bytes the target sent right behind the answer stay in the stream.
          if (rest.length) socket.unshift(Buffer.from(rest.buffer, rest.byteOffset, rest.length));
          resolve(socket);
          return;
        }
        head = parsed;
        const te = parsed.headers.get('transfer-encoding');
        head.length = te ? null : parsed.headers.has('content-length') ? Number(parsed.headers.get('content-length')) : null;
        if (head.length === 0) {
          refuse();
          return;
        }
        if (rest.length) {
          body.push(rest);
          bodyLen += rest.length;
          if (head.length !== null && bodyLen >= head.length) {
            body = [concat(body).subarray(0, head.length)];
            refuse();
            return;
          }
        }
        if (te) {
          // A chunked refusal: wait for the end and decode what came.
          head.chunked = true;
        }
      }
      if (head?.chunked && !done) {
        const decoded = dechunk(concat(body));
        if (decoded) {
          body = [decoded];
          refuse();
        }
      }
    }
    socket.on('readable', onReadable);
    socket.on('error', onError);
    socket.on('end', onEnd);
    socket.on('close', onEnd);
  });
}

function concat(parts) {
  if (parts.length === 1) return parts[0];
  let n = 0;
  for (const p of parts) n += p.length;
  const out = new Uint8Array(n);
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

function indexOfHeadEnd(buf) {
  for (let i = 0; i + 3 < buf.length; i++) {
    if (buf[i] === 13 && buf[i + 1] === 10 && buf[i + 2] === 13 && buf[i + 3] === 10) return i;
  }
  return -1;
}

function parseHead(text) {
  const lines = text.split('\r\n');
  const m = /^HTTP\/1\.[01] (\d{3})(?: .*)?$/.exec(lines[0]);
  if (!m) throw new Error('mesh.connect: the gateway\'s answer is not HTTP');
  const headers = new Map();
  for (const line of lines.slice(1)) {
    const i = line.indexOf(':');
    if (i > 0) headers.set(line.slice(0, i).trim().toLowerCase(), line.slice(i + 1).trim());
  }
  return { status: Number(m[1]), headers };
}

// Decodes a complete chunked body, or returns null while it is incomplete.
function dechunk(buf) {
  const parts = [];
  let i = 0;
  const text = new TextDecoder('latin1');
  for (;;) {
    let eol = -1;
    for (let j = i; j + 1 < buf.length; j++) {
      if (buf[j] === 13 && buf[j + 1] === 10) {
        eol = j;
        break;
      }
    }
    if (eol < 0) return null;
    const size = parseInt(text.decode(buf.subarray(i, eol)), 16);
    if (Number.isNaN(size)) return concat(parts.length ? parts : [new Uint8Array(0)]);
    if (size === 0) return concat(parts.length ? parts : [new Uint8Array(0)]);
    if (eol + 2 + size > buf.length) return null;
    parts.push(buf.subarray(eol + 2, eol + 2 + size));
    i = eol + 2 + size + 2;
  }
}

/**
 * The client of one binding.
 * @param {string} [url] the binding URL; defaults to `process.env.MESH` where there is one
 * @returns {Mesh}
 */
export function mesh(url = undefined) {
  if (url === undefined) {
    url = globalThis.process?.env?.MESH;
    if (url === undefined) {
      throw new TypeError('mesh(): no binding URL given and MESH is not set; pass it, e.g. mesh(env.MESH)');
    }
  }
  return new Mesh(url);
}

export default mesh;
