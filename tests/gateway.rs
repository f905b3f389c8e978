//! End-to-end tests of bindings and the fetch gateway (issue 6): the real
//! `trellis` server and agents in network namespaces made by each test, a
//! real HTTP server and a real PostgreSQL server on private nodes, and
//! agents on a host that runs no Trellis at all — curl, a Python script, a
//! Node script and the Rust SDK, each configured by the binding line alone.
//!
//! Underlay 198.18.0.0/24 (server 198.18.0.1, hosts .11, .12, ...), overlay
//! from the accounts' blocks in 100.64.0.0/10.
//!
//! Needs root, /dev/net/tun and iproute2 (and PostgreSQL, python3, node for
//! the first test); otherwise each test prints `SKIPPED: <why>` and passes —
//! except with CI=true, where it fails.

mod harness;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use harness::*;
use serde_json::Value;

const WEB_PORT: u16 = 8000;
const PG_PORT: u16 = 5432;

/// The private web service: /health, /echo (POST, answers the body and the
/// Authorization it saw), /bytes?n=N, and /stream (endless, 16 KiB every 20 ms).
const WEB_SERVER: &str = r#"
import sys
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
from urllib.parse import urlparse, parse_qs

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        sys.stderr.write("%s %s\n" % (self.command, self.path))
    def send(self, code, body, ctype="text/plain"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        u = urlparse(self.path)
        if u.path == "/health":
            self.send(200, b"ok from web\n")
        elif u.path == "/bytes":
            n = int(parse_qs(u.query).get("n", ["0"])[0])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            chunk = bytes(range(256)) * 256
            while n > 0:
                k = min(n, len(chunk))
                self.wfile.write(chunk[:k])
                n -= k
        elif u.path == "/stream":
            import time
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"x" * 16384
            try:
                while True:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                    time.sleep(0.02)
            except OSError:
                return
        else:
            self.send(404, b"no such page\n")
    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(n)
        auth = self.headers.get("Authorization", "")
        self.send(200, b"auth=" + auth.encode() + b" body=" + body)

ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"#;

/// Python agent: one env line (MESH), the SDK, a page and a SQL query
/// through CONNECT (PostgreSQL's wire protocol, trust auth).
const PY_AGENT: &str = r#"
import asyncio, json, os, struct, sys
sys.path.insert(0, os.environ["SDK_PY"])
from trellis_mesh import Mesh

async def pg_query(mesh, host, port, sql):
    r, w = await mesh.open_connection(host, port)
    params = b"user\0postgres\0database\0postgres\0\0"
    w.write(struct.pack("!ii", 8 + len(params), 196608) + params)
    await w.drain()
    async def msg():
        t = await r.readexactly(1)
        (n,) = struct.unpack("!i", await r.readexactly(4))
        return t, await r.readexactly(n - 4)
    while True:
        t, b = await msg()
        if t == b"E":
            raise RuntimeError(b)
        if t == b"Z":
            break
    q = sql.encode() + b"\0"
    w.write(b"Q" + struct.pack("!i", 4 + len(q)) + q)
    await w.drain()
    val = None
    while True:
        t, b = await msg()
        if t == b"E":
            raise RuntimeError(b)
        if t == b"D":
            (n,) = struct.unpack("!i", b[2:6])
            val = b[6:6 + n].decode()
        if t == b"Z":
            break
    w.close()
    return val

mesh = Mesh.from_env("MESH")
page = mesh.get("http://web.default.mesh:8000/health").text
answer = asyncio.run(pg_query(mesh, "db.default.mesh", 5432, "select 40 + 2"))
print(json.dumps({"page": page, "answer": answer}))
"#;

/// Node agent: the same with the JS SDK.
const JS_AGENT: &str = r#"
const { mesh } = await import(process.env.SDK_JS);
const m = mesh(process.env.MESH);
const page = await (await m.fetch("http://web.default.mesh:8000/health")).text();
const sock = await m.connect("db.default.mesh:5432");
let buf = Buffer.alloc(0);
let waiters = [];
sock.on("data", (d) => { buf = Buffer.concat([buf, d]); waiters.splice(0).forEach((f) => f()); });
async function need(n) {
  while (buf.length < n) await new Promise((r) => waiters.push(r));
  const out = buf.subarray(0, n);
  buf = buf.subarray(n);
  return out;
}
async function msg() {
  const t = (await need(1)).toString();
  const n = (await need(4)).readInt32BE(0);
  return [t, await need(n - 4)];
}
const params = Buffer.from("user\0postgres\0database\0postgres\0\0");
const head = Buffer.alloc(8);
head.writeInt32BE(8 + params.length, 0);
head.writeInt32BE(196608, 4);
sock.write(Buffer.concat([head, params]));
for (;;) { const [t, b] = await msg(); if (t === "E") throw new Error(b.toString()); if (t === "Z") break; }
const q = Buffer.from("select 40 + 2\0");
const qh = Buffer.alloc(5);
qh.write("Q");
qh.writeInt32BE(4 + q.length, 1);
sock.write(Buffer.concat([qh, q]));
let answer = null;
for (;;) {
  const [t, b] = await msg();
  if (t === "E") throw new Error(b.toString());
  if (t === "D") { const n = b.readInt32BE(2); answer = b.subarray(6, 6 + n).toString(); }
  if (t === "Z") break;
}
sock.end();
console.log(JSON.stringify({ page, answer }));
"#;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
}

/// Prints why and returns false when a tool is missing (a failure in CI).
fn have(tool: &str, probe: &[&str]) -> bool {
    let ok = std::process::Command::new(tool)
        .args(probe)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        let msg = format!("{tool} is not usable here (`{tool} {}`)", probe.join(" "));
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("CI=true: {msg}");
        }
        println!("SKIPPED: {msg}");
    }
    ok
}

fn postgres_bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|d| d.join("postgres").exists())
        .collect();
    dirs.sort();
    dirs.pop()
}

impl ServerLab {
    /// A node on a new host, joined to the default account (or `account`).
    fn node(&mut self, name: &str, token: &str) -> (Node, Ipv4Addr) {
        let h = self.new_host(name);
        let node = self.lab.join(&h, &self.srv, name, token, None);
        let st = self.lab.wait_ready(&node);
        (node, st.ip.expect("ready node has an address"))
    }

    fn binding(&self, key: &str, name: &str, extra: &[&str]) -> String {
        let mut args = vec!["binding", "create", name];
        args.extend_from_slice(extra);
        let out = self.lab.admin_ok(&self.srv, key, &args);
        let url = out.trim().to_string();
        self.lab.ensure(
            url.starts_with("http://b_") && !url.contains('\n'),
            format!("binding create printed {out:?}"),
        );
        url
    }

    /// Starts the web service on `node`, waits until it listens.
    fn web(&self, node: &Node) {
        let script = self.lab.path("web.py");
        std::fs::write(&script, WEB_SERVER).expect("write web.py");
        let s = script.to_string_lossy().into_owned();
        self.lab
            .spawn(&node.host, "web", "python3", &[&s, &WEB_PORT.to_string()]);
        let r = eventually(Instant::now() + Duration::from_secs(15), || match http_get(
            &node.host.ns,
            std::net::SocketAddr::from(([127, 0, 0, 1], WEB_PORT)),
            "/health",
            Duration::from_secs(2),
        ) {
            Ok((200, _)) => Ok(()),
            other => Err(format!("web not up: {other:?}")),
        });
        self.lab.check(r, "the web service did not start");
    }

    /// Starts PostgreSQL (trust auth) on `node`, waits until it listens.
    fn postgres(&self, node: &Node, bin: &Path) {
        let data = self.lab.path("pgdata");
        std::fs::create_dir_all(&data).expect("pg dir");
        // The lab dir is root's; postgres needs to reach its data dir.
        let _ = std::process::Command::new("chmod")
            .args(["o+x", &self.lab.dir().to_string_lossy()])
            .status();
        let d = data.to_string_lossy().into_owned();
        let st = std::process::Command::new("chown")
            .args(["postgres:postgres", &d])
            .status();
        self.lab
            .ensure(st.is_ok_and(|s| s.success()), "chown pgdata");
        let initdb = bin.join("initdb").to_string_lossy().into_owned();
        let out = self.lab.run(
            &node.host.ns,
            "runuser",
            &[
                "-u",
                "postgres",
                "--",
                &initdb,
                "-D",
                &d,
                "-U",
                "postgres",
                "--auth=trust",
            ],
            Duration::from_secs(120),
        );
        self.lab
            .ensure(out.success(), format!("initdb failed:\n{}", out.describe()));
        // Connections come from the mesh (a binding's overlay address).
        let hba = data.join("pg_hba.conf");
        let mut conf = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
        conf.push_str("\nhost all all 100.64.0.0/10 trust\n");
        std::fs::write(&hba, conf).expect("write pg_hba.conf");
        let pg = bin.join("postgres").to_string_lossy().into_owned();
        self.lab.spawn(
            &node.host,
            "postgres",
            "runuser",
            &[
                "-u",
                "postgres",
                "--",
                &pg,
                "-D",
                &d,
                "-k",
                &d,
                "-c",
                "listen_addresses=*",
                "-p",
                &PG_PORT.to_string(),
            ],
        );
        let r = eventually(Instant::now() + Duration::from_secs(30), || {
            let ns = node.host.ns.clone();
            in_netns(&ns, || {
                std::net::TcpStream::connect(("127.0.0.1", PG_PORT))
                    .map(|_| ())
                    .map_err(|e| format!("postgres not up: {e}"))
            })
        });
        self.lab.check(r, "PostgreSQL did not start");
    }

    /// `curl` on `agent` with `args`; returns (http code, body).
    fn curl(&self, agent: &Host, args: &[&str]) -> (u16, String) {
        let body = self.lab.path(&format!("curl-{}.out", rand_suffix()));
        let b = body.to_string_lossy().into_owned();
        let mut a = vec!["-sS", "--max-time", "20", "-o", &b, "-w", "%{http_code}"];
        a.extend_from_slice(args);
        let out = self.lab.run(&agent.ns, "curl", &a, Duration::from_secs(30));
        let code = out.stdout.trim().parse().unwrap_or(0);
        (code, std::fs::read_to_string(&body).unwrap_or_default())
    }

    /// `trellis logs requests --json` of the account behind `key`.
    fn requests(&self, key: &str) -> Vec<Value> {
        let out = self
            .lab
            .admin_ok(&self.srv, key, &["logs", "requests", "--json"]);
        out.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
            .collect()
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[test]
fn agents_reach_a_web_page_and_postgres_through_one_binding_line() {
    let Some(mut sl) = ServerLab::new() else {
        return;
    };
    let Some(pg_bin) = postgres_bin_dir() else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true: PostgreSQL is not installed (/usr/lib/postgresql/*/bin/postgres)"
        );
        println!("SKIPPED: PostgreSQL is not installed");
        return;
    };
    if !have("python3", &["-c", "import httpx"]) || !have("node", &["--version"]) {
        return;
    }
    let token = sl.lab.create_token(
        &sl.srv,
        TokenOpts {
            reusable: true,
            ..Default::default()
        },
    );
    let (web, _web_ip) = sl.node("web", &token);
    let (db, _db_ip) = sl.node("db", &token);
    sl.web(&web);
    sl.postgres(&db, &pg_bin);
    let key = sl.key.clone();
    let mesh = sl.binding(&key, "agents", &[]);
    let agent = sl.new_host("agent");

    // curl: forward proxy, and CONNECT (--proxytunnel).
    let r = eventually(Instant::now() + Duration::from_secs(20), || {
        match sl.curl(
            &agent,
            &["--proxy", &mesh, "http://web.default.mesh:8000/health"],
        ) {
            (200, body) if body == "ok from web\n" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    sl.lab.check(r, "curl through the gateway (forward proxy)");
    let got = sl.curl(
        &agent,
        &[
            "--proxytunnel",
            "--proxy",
            &mesh,
            "http://web.default.mesh:8000/health",
        ],
    );
    assert_eq!(
        got,
        (200, "ok from web\n".to_string()),
        "curl through CONNECT"
    );
    // A POST with a body and the target's own Authorization header.
    let got = sl.curl(
        &agent,
        &[
            "--proxy",
            &mesh,
            "-H",
            "Authorization: Bearer app-token",
            "--data-binary",
            "hello",
            "http://web.default.mesh:8000/echo",
        ],
    );
    assert_eq!(got, (200, "auth=Bearer app-token body=hello".to_string()));

    let root = repo_root();
    // Python and Node scripts, each configured by MESH alone (plus where the
    // SDK is), each printing {"page": ..., "answer": ...}.
    let scripts = [
        (
            "agent.py",
            PY_AGENT,
            "python3",
            "SDK_PY",
            root.join("sdk/python/src"),
        ),
        (
            "agent.mjs",
            JS_AGENT,
            "node",
            "SDK_JS",
            root.join("sdk/js/src/index.js"),
        ),
    ];
    for (file, text, program, sdk_var, sdk) in scripts {
        let script = sl.lab.path(file);
        std::fs::write(&script, text).expect("write the agent script");
        let out = sl.lab.run(
            &agent.ns,
            "env",
            &[
                &format!("MESH={mesh}"),
                &format!("{sdk_var}={}", sdk.display()),
                program,
                &script.to_string_lossy(),
            ],
            Duration::from_secs(60),
        );
        sl.lab.ensure(
            out.success(),
            format!("{program} agent:\n{}", out.describe()),
        );
        let v: Value = serde_json::from_str(out.stdout.trim())
            .unwrap_or_else(|e| panic!("{program} agent prints JSON ({e}): {}", out.stdout));
        assert_eq!(v["page"], "ok from web\n", "{program}");
        assert_eq!(v["answer"], "42", "SQL through CONNECT from {program}");
    }

    // Rust: the SDK's fetch, and tokio-postgres over the SDK's connect().
    let m = mesh.clone();
    let r = in_netns(&agent.ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async move {
            let mesh = trellis_sdk::Mesh::parse(&m).map_err(|e| e.to_string())?;
            let page = mesh
                .get("http://web.default.mesh:8000/health")
                .await
                .map_err(|e| e.to_string())?
                .text()
                .await
                .map_err(|e| e.to_string())?;
            let stream = mesh
                .connect("db.default.mesh:5432")
                .await
                .map_err(|e| e.to_string())?;
            let (client, conn) = tokio_postgres::Config::new()
                .user("postgres")
                .dbname("postgres")
                .connect_raw(stream, tokio_postgres::NoTls)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            let row = client
                .query_one("select 40 + 2", &[])
                .await
                .map_err(|e| e.to_string())?;
            let answer: i32 = row.get(0);
            Ok::<_, String>((page, answer))
        })
    });
    let (page, answer) = sl.lab.check(r, "Rust SDK");
    assert_eq!(page, "ok from web\n");
    assert_eq!(answer, 42);

    // Every request is in the request log, with its binding and target
    // (a tunnel's record is written when it closes).
    let r = eventually(Instant::now() + Duration::from_secs(5), || {
        let logs = sl.requests(&key);
        let connects = logs
            .iter()
            .filter(|r| r["method"] == "CONNECT" && r["target"] == "db.default.mesh:5432")
            .count();
        if connects >= 3 {
            Ok(logs)
        } else {
            Err(format!(
                "three SQL sessions via CONNECT expected: {logs:#?}"
            ))
        }
    });
    let logs = sl.lab.check(r, "request log");
    assert!(
        logs.iter().all(|r| r["binding"] == "agents"),
        "every request names its binding: {logs:#?}"
    );
    assert!(
        logs.iter()
            .any(|r| r["path"] == "/health" && r["status"] == 200 && r["form"] == "proxy"),
        "{logs:#?}"
    );
    assert!(
        logs.iter()
            .any(|r| r["form"] == "fetch" && r["status"] == 200 && r["node"] == "web"),
        "the JS SDK's plain form is logged: {logs:#?}"
    );
    let _ = (web, db);
}

#[test]
fn a_binding_reaches_only_its_own_account_even_at_the_same_addresses() {
    let Some(mut sl) = ServerLab::new() else {
        return;
    };
    let key = sl.key.clone();
    let token = sl.lab.create_token(&sl.srv, TokenOpts::default());
    let (web, web_ip) = sl.node("web", &token);
    sl.web(&web);
    // Another account with the same block: its first node gets the same address.
    // The default account's block.
    let other_key = sl
        .lab
        .create_account(&sl.srv, "other", Some("100.64.0.0/16"));
    let other_token = sl.lab.create_token(
        &sl.srv,
        TokenOpts {
            api_key: Some(&other_key),
            ..Default::default()
        },
    );
    let (_twin, twin_ip) = sl.node("twin", &other_token);
    assert_eq!(twin_ip, web_ip, "the two accounts' nodes share an address");
    let ours = sl.binding(&key, "ours", &[]);
    let theirs = sl.binding(&other_key, "theirs", &[]);
    let agent = sl.new_host("agent");
    let url = format!("http://{web_ip}:{WEB_PORT}/health");
    let r = eventually(Instant::now() + Duration::from_secs(20), || {
        match sl.curl(&agent, &["--proxy", &ours, &url]) {
            (200, b) if b == "ok from web\n" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    sl.lab.check(r, "our binding reaches our web node");
    // Theirs reaches their own node at that address (nothing listens: refused).
    let (code, body) = sl.curl(&agent, &["--proxy", &theirs, &url]);
    assert_eq!(code, 502, "{body}");
    assert!(body.contains("twin"), "names their node: {body}");
    let (code, body) = sl.curl(
        &agent,
        &["--proxy", &theirs, "http://web.default.mesh:8000/health"],
    );
    assert_eq!(code, 404, "{body}");
    assert!(!body.contains("ok from web"));

    // Bindings survive a server restart: the same line works again.
    sl.lab.restart_server(&mut sl.srv);
    let r = eventually(Instant::now() + Duration::from_secs(30), || {
        match sl.curl(&agent, &["--proxy", &ours, &url]) {
            (200, b) if b == "ok from web\n" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    sl.lab.check(r, "the binding after a server restart");
}

#[test]
fn revoking_a_binding_refuses_the_next_request_and_cuts_an_open_stream() {
    let Some(mut sl) = ServerLab::new() else {
        return;
    };
    let key = sl.key.clone();
    let token = sl.lab.create_token(&sl.srv, TokenOpts::default());
    let (web, _ip) = sl.node("web", &token);
    sl.web(&web);
    let mesh = sl.binding(&key, "streamer", &[]);
    let agent = sl.new_host("agent");
    let r = eventually(Instant::now() + Duration::from_secs(20), || {
        match sl.curl(
            &agent,
            &["--proxy", &mesh, "http://web.default.mesh:8000/health"],
        ) {
            (200, _) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    sl.lab.check(r, "binding works before revocation");

    // A streaming download in progress.
    let sink = sl.lab.path("stream.out");
    let s = sink.to_string_lossy().into_owned();
    let dl = sl.lab.spawn(
        &agent,
        "stream",
        "curl",
        &[
            "-sS",
            "-N",
            "--proxy",
            &mesh,
            "-o",
            &s,
            "http://web.default.mesh:8000/stream",
        ],
    );
    let r = eventually(Instant::now() + Duration::from_secs(15), || {
        let n = std::fs::metadata(&sink).map(|m| m.len()).unwrap_or(0);
        if n > 256 * 1024 {
            Ok(n)
        } else {
            Err(format!("only {n} bytes streamed"))
        }
    });
    sl.lab.check(r, "the stream flows");
    assert!(sl.lab.is_running(dl));

    let revoking = Instant::now();
    sl.lab
        .admin_ok(&sl.srv, &key, &["binding", "revoke", "streamer"]);
    let command = revoking.elapsed();
    let st = sl.lab.wait_exit(dl, Duration::from_secs(5));
    let took = revoking.elapsed();
    assert!(st.is_some(), "the stream was still open 5 s after revoke");
    println!(
        "open stream closed {took:?} after `binding revoke` started (the command itself took {command:?})"
    );
    assert!(
        took < Duration::from_millis(1500),
        "the stream closed only {took:?} after revoke"
    );
    let (code, body) = sl.curl(
        &agent,
        &["--proxy", &mesh, "http://web.default.mesh:8000/health"],
    );
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("revoked"), "{body}");

    let r = eventually(Instant::now() + Duration::from_secs(5), || {
        let logs = sl.requests(&key);
        if logs.iter().any(|r| {
            r["path"] == "/stream"
                && r["bytes_down"].as_u64().unwrap_or(0) > 256 * 1024
                && r["error"] == "binding_revoked"
        }) {
            Ok(())
        } else {
            Err(format!(
                "the cut stream is not logged with its bytes: {logs:#?}"
            ))
        }
    });
    sl.lab.check(r, "request log");
}

#[test]
fn policy_decides_binding_requests_and_errors_say_what_is_wrong() {
    let Some(mut sl) = ServerLab::new() else {
        return;
    };
    let key = sl.key.clone();
    let token = sl.lab.create_token(
        &sl.srv,
        TokenOpts {
            reusable: true,
            ..Default::default()
        },
    );
    let (web, _) = sl.node("web", &token);
    let (other, _) = sl.node("other", &token);
    sl.web(&web);
    sl.web(&other);
    let mesh = sl.binding(&key, "ci", &["--tag", "agents"]);
    let policy = sl.lab.path("policy.toml");
    std::fs::write(
        &policy,
        "default = \"deny\"\n\n[[rules]]\nname = \"agents-to-web\"\naction = \"allow\"\nfrom = [\"tag:agents\"]\nto = [\"web\"]\nports = [\"tcp:8000\"]\n\n[[rules]]\nname = \"nodes\"\naction = \"allow\"\nfrom = [\"web\", \"other\"]\nto = [\"*\"]\n",
    )
    .expect("write policy");
    sl.lab
        .admin_ok(&sl.srv, &key, &["policy", "set", &policy.to_string_lossy()]);
    let agent = sl.new_host("agent");
    let r = eventually(Instant::now() + Duration::from_secs(20), || {
        match sl.curl(
            &agent,
            &["--proxy", &mesh, "http://web.default.mesh:8000/health"],
        ) {
            (200, _) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    sl.lab.check(r, "the allowed target");
    let (code, body) = sl.curl(
        &agent,
        &["--proxy", &mesh, "http://other.default.mesh:8000/health"],
    );
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("policy") && body.contains("ci"), "{body}");
    // No credentials, wrong secret, unknown name.
    let (code, _) = sl.curl(
        &agent,
        &[
            "--proxy",
            "http://198.18.0.1:8443",
            "http://web.default.mesh:8000/health",
        ],
    );
    assert_eq!(code, 407);
    let wrong = mesh.replacen('@', "x@", 1);
    let (code, _) = sl.curl(
        &agent,
        &["--proxy", &wrong, "http://web.default.mesh:8000/health"],
    );
    assert_eq!(code, 407, "a wrong secret is refused ({wrong})");
    let (code, body) = sl.curl(&agent, &["--proxy", &mesh, "http://nosuch.default.mesh/"]);
    assert_eq!(code, 404, "{body}");
    // The node goes offline: 502 naming it, not a hang.
    sl.lab.stop(web.proc);
    let r = eventually(Instant::now() + Duration::from_secs(20), || {
        match sl.curl(
            &agent,
            &["--proxy", &mesh, "http://web.default.mesh:8000/health"],
        ) {
            (502, body) if body.contains("web") && body.contains("offline") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    sl.lab.check(r, "an offline node is a clear 502");
    // Records are stored in batches (within INGEST_INTERVAL of the first).
    let r = eventually(Instant::now() + Duration::from_secs(5), || {
        let logs = sl.requests(&key);
        if logs.iter().any(|r| {
            r["decision"] == "deny"
                && r["rule"].is_null()
                && r["target"] == "other.default.mesh:8000"
        }) {
            Ok(())
        } else {
            Err(format!("the denied request is not logged: {logs:#?}"))
        }
    });
    sl.lab.check(r, "the denied request is logged");
}

#[test]
fn trellis_proxy_and_trellis_mcp_reach_a_private_page() {
    let Some(mut sl) = ServerLab::new() else {
        return;
    };
    let key = sl.key.clone();
    let token = sl.lab.create_token(&sl.srv, TokenOpts::default());
    let (web, _) = sl.node("web", &token);
    sl.web(&web);
    let mesh = sl.binding(&key, "tools", &[]);
    let agent = sl.new_host("agent");

    // A local plain proxy without credentials, for tools that cannot send them.
    sl.lab.spawn(
        &agent,
        "proxy",
        trellis_bin(),
        &["proxy", "--binding", &mesh, "--listen", "127.0.0.1:8118"],
    );
    let r = eventually(Instant::now() + Duration::from_secs(20), || {
        match sl.curl(
            &agent,
            &[
                "--proxy",
                "http://127.0.0.1:8118",
                "http://web.default.mesh:8000/health",
            ],
        ) {
            (200, b) if b == "ok from web\n" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    sl.lab.check(r, "curl through `trellis proxy`");
    let got = sl.curl(
        &agent,
        &[
            "--proxytunnel",
            "--proxy",
            "http://127.0.0.1:8118",
            "http://web.default.mesh:8000/health",
        ],
    );
    assert_eq!(
        got,
        (200, "ok from web\n".to_string()),
        "CONNECT via `trellis proxy`"
    );

    // MCP over stdio: initialize, then the fetch and list_services tools.
    let input = [
        r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"e2e","version":"1"}}}"#,
        r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
        r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"fetch","arguments":{"url":"http://web.default.mesh:8000/health"}}}"#,
        r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"list_services","arguments":{}}}"#,
    ]
    .join("\n");
    let input_file = sl.lab.path("mcp-in.jsonl");
    std::fs::write(&input_file, format!("{input}\n")).expect("write MCP input");
    let cmd = format!(
        "{} mcp --binding '{mesh}' < {}",
        trellis_bin(),
        input_file.display()
    );
    let out = sl
        .lab
        .run(&agent.ns, "sh", &["-c", &cmd], Duration::from_secs(60));
    sl.lab
        .ensure(out.success(), format!("trellis mcp:\n{}", out.describe()));
    let answers: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("only JSON-RPC on stdout"))
        .collect();
    let by_id = |id: i64| {
        answers
            .iter()
            .find(|a| a["id"] == id)
            .unwrap_or_else(|| panic!("no answer to request {id}: {answers:#?}"))
    };
    assert_eq!(by_id(1)["result"]["protocolVersion"], "2025-06-18");
    let fetched = by_id(2)["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        fetched.contains("200") && fetched.contains("ok from web"),
        "{fetched}"
    );
    assert_ne!(by_id(2)["result"]["isError"], true);
    let services = by_id(3)["result"]["structuredContent"]["services"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        services
            .iter()
            .any(|s| s["name"] == "web.default.mesh" && s["online"] == true),
        "{services:#?}"
    );
    // Both tools went through the gateway, logged under the binding.
    let r = eventually(Instant::now() + Duration::from_secs(5), || {
        let logs = sl.requests(&key);
        let fetches = logs.iter().filter(|r| r["path"] == "/health").count();
        let tunnels = logs.iter().filter(|r| r["form"] == "connect").count();
        if fetches >= 2 && tunnels >= 1 && logs.iter().any(|r| r["form"] == "services") {
            Ok(())
        } else {
            Err(format!("{logs:#?}"))
        }
    });
    sl.lab.check(r, "proxy and MCP requests in the request log");
}

#[test]
fn a_binding_reaches_a_lan_host_behind_a_mesh_node() {
    let Some(mut sl) = ServerLab::new() else {
        return;
    };
    let key = sl.key.clone();
    // The LAN: a host with no Trellis, serving HTTP on 198.19.10.5:8080.
    let lan = sl.lab.new_switch("lan");
    let lanhost = sl.lab.host_on(&lan, "lanhost", "198.19.10.5/24");
    let web = std::net::SocketAddr::from(([198, 19, 10, 5], 8080));
    let _web = sl.lab.check(
        http_serve(&lanhost.ns, web, "lanhost"),
        "http server on lanhost",
    );
    let token = sl.lab.create_token(
        &sl.srv,
        TokenOpts {
            reusable: true,
            routes_auto_approve: true,
            ..Default::default()
        },
    );
    let gwh = sl.new_host("office");
    sl.lab.attach(&gwh, &lan, "eth1", "198.19.10.1/24");
    let node = sl.lab.join_with(
        &gwh,
        &sl.srv,
        "office",
        &token,
        None,
        &["--advertise-routes", "198.19.10.0/24"],
    );
    sl.lab.wait_ready(&node);
    let mesh = sl.binding(&key, "lan-agent", &[]);
    let agent = sl.new_host("agent");
    let r = eventually(Instant::now() + Duration::from_secs(30), || {
        match sl.curl(&agent, &["--proxy", &mesh, "http://198.19.10.5:8080/"]) {
            (200, b) if b.starts_with("server=lanhost\n") => Ok(b),
            other => Err(format!("{other:?}")),
        }
    });
    let body = sl
        .lab
        .check(r, "the LAN host through the gateway and the mesh node");
    // Masqueraded by the mesh node onto the LAN.
    assert!(body.contains("peer=198.19.10.1:"), "{body}");
    let r = eventually(Instant::now() + Duration::from_secs(5), || {
        let logs = sl.requests(&key);
        if logs
            .iter()
            .any(|r| r["dst_ip"] == "198.19.10.5" && r["node"] == "office" && r["status"] == 200)
        {
            Ok(())
        } else {
            Err(format!(
                "the request names the mesh node that carried it: {logs:#?}"
            ))
        }
    });
    sl.lab.check(r, "request log");
}
