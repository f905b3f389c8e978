//! The gateway end to end inside one process: a real relay hub, the
//! gateway's member, and a "node" made of the same parts (a tunnel core on
//! the hub and a userspace stack running a small HTTP server), with agents
//! talking HTTP to the gateway over loopback TCP.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::member::Member;
use super::*;
use crate::RelayHub;

const SERVER_SECRET: [u8; 32] = [9; 32];
const ACCOUNT: i64 = 1;
const NODE_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
const BINDING_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 9);
const SECRET: &str = "s3cr3t-s3cr3t-s3cr3t";

fn binding() -> BindingEntry {
    BindingEntry {
        id: 7,
        public_id: "abcdefghijklmnop".into(),
        name: "agent".into(),
        secret_hash: hash_secret(SECRET),
        ip: BINDING_IP,
        expires_at: None,
    }
}

fn node_secret() -> trellis_tunnel::StaticSecret {
    trellis_tunnel::StaticSecret::from([5u8; 32])
}

fn snapshot(node_key: [u8; 32], online: bool, filter: Option<FilterSpec>) -> AccountSnapshot {
    AccountSnapshot {
        account_id: ACCOUNT,
        name: "acme".into(),
        cidr: "100.64.0.0/16".parse().unwrap(),
        domain: Some("acme.mesh".into()),
        names: vec![("web.acme.mesh".into(), NODE_IP)],
        peers: vec![GatewayPeer {
            name: "web".into(),
            public_key: node_key,
            ip: NODE_IP,
            allowed_ips: vec![Ipv4Net::from(NODE_IP)],
            online,
            last_seen: Some(1_700_000_000),
        }],
        filter,
        bindings: vec![binding()],
    }
}

/// A node on the hub: a member whose "binding" address is the node's own,
/// with the gateway as its one peer, serving HTTP on port 80.
async fn start_node(hub: &Arc<RelayHub>, gw: &Gateway) -> Member {
    let snap = AccountSnapshot {
        account_id: ACCOUNT,
        name: "acme".into(),
        cidr: "100.64.0.0/16".parse().unwrap(),
        domain: None,
        names: vec![],
        peers: vec![GatewayPeer {
            name: "gateway".into(),
            public_key: gw.member_public_key(ACCOUNT),
            ip: gateway_ip(&"100.64.0.0/16".parse().unwrap()),
            allowed_ips: vec![Ipv4Net::from(BINDING_IP)],
            online: true,
            last_seen: None,
        }],
        filter: None,
        bindings: vec![BindingEntry {
            ip: NODE_IP,
            ..binding()
        }],
    };
    let node = Member::start(
        hub.clone(),
        node_secret(),
        Arc::new(snap),
        Arc::new(trellis_policy::Filter::allow_all()),
    )
    .unwrap();
    let listener = node
        .stack()
        .listen(SocketAddrV4::new(NODE_IP, 80))
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Ok((stream, peer)) = listener.accept().await {
            tokio::spawn(serve_http(stream, peer));
        }
    });
    node
}

/// A tiny HTTP/1.1 server: `/health`, `/who` (the peer address), `/echo`
/// (POST: the body and the Authorization seen), `/stream` (endless).
async fn serve_http(stream: netstack::TcpStream, peer: SocketAddrV4) {
    let (r, mut w) = tokio::io::split(stream);
    let mut r = BufReader::new(r);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let target = line.split_whitespace().nth(1).unwrap_or("/");
        let path = target.split('?').next().unwrap_or("/").to_string();
        let mut len = 0usize;
        let mut auth = String::new();
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).await.unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').unwrap_or((h, ""));
            match k.to_ascii_lowercase().as_str() {
                "content-length" => len = v.trim().parse().unwrap_or(0),
                "authorization" => auth = v.trim().to_string(),
                _ => {}
            }
        }
        let mut body = vec![0u8; len];
        if r.read_exact(&mut body).await.is_err() {
            return;
        }
        let reply = match path.as_str() {
            "/health" => "ok from web\n".to_string(),
            "/ws" => {
                // Switches protocols, then echoes whatever comes.
                let _ = w
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
                    .await;
                let mut r = r.into_inner();
                let mut buf = vec![0u8; 4096];
                loop {
                    match r.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if w.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
            "/who" => format!("{}\n", peer.ip()),
            "/port" => format!("{}\n", peer.port()),
            "/echo" => format!("auth={auth} body={}", String::from_utf8_lossy(&body)),
            "/stream" => {
                let _ = w
                    .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                    .await;
                let chunk = vec![b'x'; 8192];
                loop {
                    let mut c = format!("{:x}\r\n", chunk.len()).into_bytes();
                    c.extend_from_slice(&chunk);
                    c.extend_from_slice(b"\r\n");
                    if w.write_all(&c).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            _ => "no such page\n".to_string(),
        };
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n\r\n",
            reply.len()
        );
        if w.write_all(head.as_bytes()).await.is_err()
            || w.write_all(reply.as_bytes()).await.is_err()
        {
            return;
        }
    }
}

struct Setup {
    gw: Arc<Gateway>,
    addr: SocketAddr,
    records: tokio::sync::mpsc::Receiver<RequestRecord>,
    _node: Member,
    node_key: [u8; 32],
}

async fn setup(filter: Option<FilterSpec>) -> Setup {
    let hub = Arc::new(RelayHub::new(SERVER_SECRET));
    let (gw, records) = Gateway::new(hub.clone(), SERVER_SECRET);
    let node_key = *trellis_tunnel::PublicKey::from(&node_secret()).as_bytes();
    gw.set_account(snapshot(node_key, true, filter));
    let node = start_node(&hub, &gw).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(gw.clone().serve(listener, None));
    Setup {
        gw,
        addr,
        records,
        _node: node,
        node_key,
    }
}

fn basic(user: &str, secret: &str) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{secret}"));
    format!("Basic {b64}")
}

fn good_auth() -> String {
    basic("b_abcdefghijklmnop", SECRET)
}

/// Sends raw bytes, reads the whole answer (the request says close).
async fn exchange(addr: SocketAddr, request: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out))
        .await
        .expect("an answer within 20 s")
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

fn proxy_get(url: &str, auth: Option<&str>) -> String {
    let host = url.split('/').nth(2).unwrap_or("");
    let mut r = format!("GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    if let Some(a) = auth {
        r.push_str(&format!("Proxy-Authorization: {a}\r\n"));
    }
    r.push_str("\r\n");
    r
}

/// Strips chunked framing if present.
fn dechunk(head: &str, body: &str) -> String {
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return body.to_string();
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

#[tokio::test]
async fn the_three_forms_reach_a_node_from_the_bindings_address() {
    let mut s = setup(None).await;
    // Forward proxy; the node sees the binding's overlay address.
    let (status, head, body) = exchange(
        s.addr,
        &proxy_get("http://web.acme.mesh/who", Some(&good_auth())),
    )
    .await;
    assert_eq!(status, 200, "{head}\n{body}");
    assert_eq!(dechunk(&head, &body), format!("{BINDING_IP}\n"));
    let rec = s.records.recv().await.unwrap();
    assert_eq!(
        (
            rec.binding.as_str(),
            rec.form.as_str(),
            rec.status,
            rec.node.as_deref(),
            rec.path.as_deref()
        ),
        ("agent", "proxy", 200, Some("web"), Some("/who"))
    );
    assert_eq!(rec.target, "web.acme.mesh:80");
    assert!(rec.bytes_down > 0);

    // The plain form: the target's own Authorization passes through.
    let req = format!(
        "POST /fetch HTTP/1.1\r\nHost: gw\r\nTrellis-Target: http://web/echo?q=secret\r\nTrellis-Binding: b_abcdefghijklmnop:{SECRET}\r\nAuthorization: Bearer app\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    );
    let (status, head, body) = exchange(s.addr, &req).await;
    assert_eq!(status, 200, "{head}\n{body}");
    assert_eq!(dechunk(&head, &body), "auth=Bearer app body=hello");
    let rec = s.records.recv().await.unwrap();
    assert_eq!(rec.form, "fetch");
    assert_eq!(
        rec.path.as_deref(),
        Some("/echo"),
        "query string not logged"
    );
    assert_eq!(rec.bytes_up, 5);

    // CONNECT, then HTTP inside the tunnel.
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(
        format!(
            "CONNECT 100.64.0.2:80 HTTP/1.1\r\nHost: 100.64.0.2:80\r\nProxy-Authorization: {}\r\n\r\n",
            good_auth()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        c.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("ok from web") {
        let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "tunnel closed early");
        got.extend_from_slice(&buf[..n]);
    }
    drop(c);
    let rec = tokio::time::timeout(Duration::from_secs(5), s.records.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((rec.method.as_str(), rec.status), ("CONNECT", 200));
    assert_eq!(rec.dst_ip, Some(NODE_IP));
    assert!(rec.bytes_up > 0 && rec.bytes_down > 0, "{rec:?}");

    // What the binding may reach.
    let req = format!(
        "GET /.trellis/services HTTP/1.1\r\nHost: gw\r\nTrellis-Binding: b_abcdefghijklmnop:{SECRET}\r\nConnection: close\r\n\r\n"
    );
    let (status, head, body) = exchange(s.addr, &req).await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&dechunk(&head, &body)).unwrap();
    assert_eq!(v["binding"], "agent");
    assert_eq!(v["address"], BINDING_IP.to_string());
    assert_eq!(v["services"][0]["name"], "web.acme.mesh");
    assert_eq!(v["services"][0]["online"], true);
    let _ = s.gw;
}

#[tokio::test]
async fn refusals_are_clear_and_logged() {
    let deny_web = FilterSpec {
        default_allow: true,
        rules: vec![trellis_policy::FilterRule {
            name: "no-agents-on-8080".into(),
            allow: false,
            src: vec![Ipv4Net::from(BINDING_IP)],
            dst: vec!["0.0.0.0/0".parse().unwrap()],
            ports: vec![trellis_policy::PortRange {
                proto: Some(trellis_policy::PROTO_TCP),
                lo: 8080,
                hi: 8080,
            }],
        }],
    };
    let mut s = setup(Some(deny_web)).await;
    let cases: Vec<(String, u16, &str)> = vec![
        (proxy_get("http://web.acme.mesh/health", None), 407, "auth_required"),
        (
            proxy_get("http://web.acme.mesh/health", Some(&basic("b_abcdefghijklmnop", "wrong"))),
            407,
            "bad_credentials",
        ),
        (
            proxy_get("http://web.acme.mesh/health", Some(&basic("someone", SECRET))),
            407,
            "bad_credentials",
        ),
        (
            "GET /x HTTP/1.1\r\nHost: gw\r\nTrellis-Target: http://web/\r\nConnection: close\r\n\r\n".into(),
            401,
            "auth_required",
        ),
        (
            proxy_get("http://web.acme.mesh:8080/", Some(&good_auth())),
            403,
            "policy_denied",
        ),
        (
            proxy_get("http://nosuch.acme.mesh/", Some(&good_auth())),
            404,
            "unknown_host",
        ),
        (
            proxy_get("http://100.64.0.77/", Some(&good_auth())),
            404,
            "unknown_host",
        ),
        (
            proxy_get("http://web.acme.mesh:81/", Some(&good_auth())),
            502,
            "connection_refused",
        ),
        (
            "GET /x HTTP/1.1\r\nHost: gw\r\nTrellis-Target: https://web/\r\nTrellis-Binding: b_abcdefghijklmnop:s3cr3t-s3cr3t-s3cr3t\r\nConnection: close\r\n\r\n".into(),
            400,
            "bad_target",
        ),
    ];
    for (req, want, code) in cases {
        let (status, head, body) = exchange(s.addr, &req).await;
        assert_eq!(status, want, "{req}\n→ {head}\n{body}");
        assert!(
            head.to_ascii_lowercase()
                .contains(&format!("trellis-error: {code}")),
            "{head}"
        );
        assert!(!body.trim().is_empty(), "a sentence explains the error");
        assert!(!body.contains(SECRET), "the secret never echoes");
        if want == 403 {
            assert!(body.contains("no-agents-on-8080"), "names the rule: {body}");
        }
    }
    // Requests of a known binding are logged, refusals included.
    let mut seen = Vec::new();
    while let Ok(Some(r)) = tokio::time::timeout(Duration::from_millis(300), s.records.recv()).await
    {
        seen.push((
            r.status,
            r.error.clone(),
            r.decision.clone(),
            r.rule.clone(),
        ));
    }
    assert!(
        seen.contains(&(
            403,
            Some("policy_denied".into()),
            "deny".into(),
            Some("no-agents-on-8080".into())
        )),
        "{seen:?}"
    );
    assert!(seen.iter().any(|r| r.0 == 502), "{seen:?}");

    // The node goes offline.
    s.gw.set_account(snapshot(s.node_key, false, None));
    let (status, _, body) = exchange(
        s.addr,
        &proxy_get("http://web.acme.mesh/health", Some(&good_auth())),
    )
    .await;
    assert_eq!(status, 502);
    assert!(
        body.contains("node web") && body.contains("offline"),
        "{body}"
    );
}

#[tokio::test]
async fn revoking_closes_open_streams_and_refuses_the_next_request() {
    let s = setup(None).await;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(proxy_get("http://web.acme.mesh/stream", Some(&good_auth())).as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 65536];
    let mut total = 0usize;
    while total < 100_000 {
        let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        total += n;
    }
    // A CONNECT tunnel too.
    let mut t = TcpStream::connect(s.addr).await.unwrap();
    t.write_all(
        format!(
            "CONNECT web:80 HTTP/1.1\r\nHost: web:80\r\nProxy-Authorization: {}\r\n\r\n",
            good_auth()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let n = t.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));

    let mut snap = snapshot(s.node_key, true, None);
    snap.bindings.clear();
    let revoked = Instant::now();
    s.gw.set_account(snap);
    let ended = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the stream still flows 1 s after revocation");
    let tunnel_end = tokio::time::timeout(Duration::from_secs(1), t.read(&mut buf)).await;
    assert!(
        matches!(tunnel_end, Ok(Ok(0)) | Ok(Err(_))),
        "the CONNECT tunnel is closed: {tunnel_end:?}"
    );
    assert!(revoked.elapsed() < Duration::from_secs(1));
    let (status, head, body) = exchange(
        s.addr,
        &proxy_get("http://web.acme.mesh/health", Some(&good_auth())),
    )
    .await;
    assert_eq!(status, 403, "{head}");
    assert!(body.contains("binding agent was revoked"), "{body}");
}

/// Reads up to the end of a response head.
async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut b))
            .await
            .expect("a response head within 10 s")
            .unwrap();
        head.push(b[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[tokio::test]
async fn a_websocket_upgrade_in_the_plain_form_carries_bytes_both_ways() {
    let mut s = setup(None).await;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(
        format!(
            "GET /fetch HTTP/1.1\r\nHost: gw\r\nTrellis-Target: http://web.acme.mesh/ws\r\nTrellis-Binding: b_abcdefghijklmnop:{SECRET}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let head = read_head(&mut c).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    for msg in [&b"first frame"[..], &[0u8, 1, 2, 255][..]] {
        c.write_all(msg).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(10), c.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, msg);
    }
    drop(c);
    let rec = tokio::time::timeout(Duration::from_secs(5), s.records.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((rec.form.as_str(), rec.status), ("websocket", 101));
    assert_eq!(rec.bytes_up, 15);
}

#[tokio::test]
async fn the_gateway_speaks_tls_when_given_a_certificate() {
    let s = setup(None).await;
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into()),
        )
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(s.gw.clone().serve(listener, Some(Arc::new(server))));

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(proxy_get("http://web.acme.mesh/health", Some(&good_auth())).as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), tls.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("ok from web\n"), "{text}");

    // Plain HTTP on the TLS port is not answered as HTTP.
    let (status, _, _) = exchange(
        addr,
        &proxy_get("http://web.acme.mesh/health", Some(&good_auth())),
    )
    .await;
    assert_eq!(status, 0);
}

#[tokio::test]
async fn back_to_back_requests_reuse_the_upstream_connection() {
    let s = setup(None).await;
    let mut ports = Vec::new();
    for _ in 0..3 {
        let (status, head, body) = exchange(
            s.addr,
            &proxy_get("http://web.acme.mesh/port", Some(&good_auth())),
        )
        .await;
        assert_eq!(status, 200, "{head}");
        ports.push(dechunk(&head, &body));
    }
    assert!(
        ports.windows(2).all(|w| w[0] == w[1]),
        "one upstream connection serves consecutive requests: {ports:?}"
    );
}
