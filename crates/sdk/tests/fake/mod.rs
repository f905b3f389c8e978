//! A small fake of the edge's fetch gateway (docs/gateway.md), on loopback:
//! checks the binding, serves absolute-form requests for `web.prod.mesh`,
//! tunnels `CONNECT echo.prod.mesh:7` to an in-test echo server that speaks
//! first, answers `/.trellis/services`, and refuses `denied.prod.mesh` with
//! `403 policy_denied`.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use base64::Engine;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const ID: &str = "b_k3v9x2m4q7w8e5rt";
pub const SECRET: &str = "Zp4xS3cretQ9";
pub const BANNER: &[u8] = b"SSH-2.0-echo\r\n";
pub const DENIED: &str = "Rule 2 of policy v3 denies binding:ci-runner to db:5432.";

/// One request the fake saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub target: String,
    pub proxy_auth: Option<String>,
    pub binding: Option<String>,
    pub body: Vec<u8>,
}

pub struct Fake {
    pub addr: SocketAddr,
    /// The CA of the gateway's certificate (https) and of tls.prod.mesh.
    pub ca_pem: String,
    pub https: bool,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub connections: Arc<Mutex<usize>>,
}

impl Fake {
    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{ID}:{SECRET}@{}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

pub fn basic() -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{ID}:{SECRET}"))
    )
}

/// A CA and a server configuration with a certificate it signed for
/// localhost, 127.0.0.1 and tls.prod.mesh.
fn pki() -> (String, Arc<rustls::ServerConfig>) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "fake gateway test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "tls.prod.mesh".to_string(),
    ])
    .unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    (ca.pem(), Arc::new(config))
}

#[derive(Clone, Copy)]
struct Targets {
    echo: SocketAddr,
    tls: SocketAddr,
}

/// The fake gateway on plain HTTP.
pub async fn start() -> Fake {
    start_with(false).await
}

/// The fake gateway on HTTPS, with a certificate from `Fake::ca_pem`.
pub async fn start_https() -> Fake {
    start_with(true).await
}

async fn start_with(https: bool) -> Fake {
    let (ca_pem, server_config) = pki();
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config);
    // An HTTPS service: answers one request with "hello over tls".
    let tls_target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tls_addr = tls_target.local_addr().unwrap();
    let tls_acceptor = acceptor.clone();
    tokio::spawn(async move {
        loop {
            let (s, _) = tls_target.accept().await.unwrap();
            let acceptor = tls_acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(s).await else {
                    return;
                };
                let mut buf = Vec::new();
                while find(&buf, b"\r\n\r\n").is_none() {
                    if !fill(&mut s, &mut buf).await.unwrap_or(false) {
                        return;
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\nConnection: close\r\n\r\nhello over tls")
                    .await;
                let _ = s.shutdown().await;
            });
        }
    });
    // The service behind the tunnel: greets first, then echoes.
    let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = echo.accept().await.unwrap();
            tokio::spawn(async move {
                s.write_all(BANNER).await.unwrap();
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let targets = Targets {
        echo: echo_addr,
        tls: tls_addr,
    };
    let fake = Fake {
        addr: listener.local_addr().unwrap(),
        ca_pem,
        https,
        seen: Arc::default(),
        connections: Arc::default(),
    };
    let seen = fake.seen.clone();
    let connections = fake.connections.clone();
    tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            *connections.lock().unwrap() += 1;
            let seen = seen.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if https {
                    if let Ok(s) = acceptor.accept(s).await {
                        let _ = serve_conn(s, targets, seen).await;
                    }
                } else {
                    let _ = serve_conn(s, targets, seen).await;
                }
            });
        }
    });
    fake
}

fn find(buf: &[u8], pat: &[u8]) -> Option<usize> {
    buf.windows(pat.len()).position(|w| w == pat)
}

/// Reads more into `buf`; false at EOF.
async fn fill<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    let mut chunk = [0u8; 4096];
    let n = s.read(&mut chunk).await?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n > 0)
}

async fn read_body<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
    length: Option<usize>,
    chunked: bool,
) -> std::io::Result<Vec<u8>> {
    if chunked {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = find(buf, b"\r\n") {
                    break i;
                }
                if !fill(s, buf).await? {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
            };
            let size_text = String::from_utf8_lossy(&buf[..line_end]).to_string();
            let size =
                usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
            buf.drain(..line_end + 2);
            while buf.len() < size + 2 {
                if !fill(s, buf).await? {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
            }
            body.extend_from_slice(&buf[..size]);
            buf.drain(..size + 2);
            if size == 0 {
                // (no trailers expected; the last CRLF was consumed above)
                return Ok(body);
            }
        }
    }
    let n = length.unwrap_or(0);
    while buf.len() < n {
        if !fill(s, buf).await? {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(buf.drain(..n).collect())
}

async fn respond<S: AsyncWrite + Unpin>(
    s: &mut S,
    status: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut out = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    s.write_all(&bytes).await?;
    s.flush().await
}

async fn refuse<S: AsyncWrite + Unpin>(
    s: &mut S,
    status: &str,
    code: &str,
    sentence: &str,
) -> std::io::Result<()> {
    respond(
        s,
        status,
        &[
            ("Trellis-Error", code),
            ("Content-Type", "text/plain; charset=utf-8"),
        ],
        format!("{sentence}\n").as_bytes(),
    )
    .await
}

async fn serve_conn<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    targets: Targets,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    loop {
        let end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            if !fill(&mut s, &mut buf).await? {
                return Ok(());
            }
        };
        let head: Vec<u8> = buf.drain(..end).collect();
        let mut hs = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut hs);
        req.parse(&head).expect("a valid request head");
        let method = req.method.unwrap().to_string();
        let target = req.path.unwrap().to_string();
        let header = |name: &str| {
            req.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).to_string())
        };
        let proxy_auth = header("proxy-authorization");
        let binding = header("trellis-binding");
        let length = header("content-length").map(|v| v.parse().unwrap());
        let chunked = header("transfer-encoding").is_some_and(|v| v.contains("chunked"));
        let body = if method == "CONNECT" {
            Vec::new()
        } else {
            read_body(&mut s, &mut buf, length, chunked).await?
        };
        seen.lock().unwrap().push(Seen {
            method: method.clone(),
            target: target.clone(),
            proxy_auth: proxy_auth.clone(),
            binding: binding.clone(),
            body: body.clone(),
        });
        let plain_form = target.starts_with('/');
        let credentials = if plain_form {
            binding
                .map(|b| {
                    format!(
                        "Basic {}",
                        base64::engine::general_purpose::STANDARD.encode(b)
                    )
                })
                .or(proxy_auth)
        } else {
            proxy_auth
        };
        let denied_status = if plain_form {
            "401 Unauthorized"
        } else {
            "407 Proxy Authentication Required"
        };
        match credentials {
            None => {
                refuse(
                    &mut s,
                    denied_status,
                    "auth_required",
                    "This gateway needs a binding.",
                )
                .await?;
                continue;
            }
            Some(c) if c != basic() => {
                refuse(
                    &mut s,
                    denied_status,
                    "bad_credentials",
                    "The binding's id or secret is wrong.",
                )
                .await?;
                continue;
            }
            Some(_) => {}
        }
        if method == "CONNECT" {
            if target.starts_with("denied.prod.mesh:") {
                refuse(&mut s, "403 Forbidden", "policy_denied", DENIED).await?;
                continue;
            }
            if target == "tls.prod.mesh:443" {
                let mut up = TcpStream::connect(targets.tls).await?;
                s.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await?;
                s.flush().await?;
                if !buf.is_empty() {
                    up.write_all(&buf).await?;
                }
                let _ = tokio::io::copy_bidirectional(&mut s, &mut up).await;
                return Ok(());
            }
            if target != "echo.prod.mesh:7" {
                refuse(
                    &mut s,
                    "404 Not Found",
                    "unknown_host",
                    "No node, record or routed subnet is called that.",
                )
                .await?;
                continue;
            }
            // Dial, wait for the service's greeting and send it in the very
            // same write as the 200: a client that reads past the head loses it.
            let mut up = TcpStream::connect(targets.echo).await?;
            let mut greeting = vec![0u8; BANNER.len()];
            up.read_exact(&mut greeting).await?;
            let mut out = b"HTTP/1.1 200 Connection established\r\n\r\n".to_vec();
            out.extend_from_slice(&greeting);
            s.write_all(&out).await?;
            s.flush().await?;
            if !buf.is_empty() {
                up.write_all(&buf).await?;
            }
            let _ = tokio::io::copy_bidirectional(&mut s, &mut up).await;
            return Ok(());
        }
        if target == "/.trellis/services" {
            let json = serde_json::json!({
                "binding": "ci-runner", "account": "prod", "address": "100.64.0.9",
                "services": [
                    {"name": "db.prod.mesh", "address": "100.64.0.3", "node": "db", "online": true, "ports": ["tcp:5432"]},
                    {"name": "198.19.10.0/24", "address": "198.19.10.0/24", "node": "office-router", "online": false, "ports": ["*"]}
                ]
            });
            respond(
                &mut s,
                "200 OK",
                &[("Content-Type", "application/json")],
                json.to_string().as_bytes(),
            )
            .await?;
            continue;
        }
        if let Some(rest) = target.strip_prefix("http://web.prod.mesh") {
            let text = format!(
                "hello from web.prod.mesh: {method} {rest} body={}",
                String::from_utf8_lossy(&body)
            );
            respond(
                &mut s,
                "200 OK",
                &[("Content-Type", "text/plain"), ("X-Target", "web")],
                text.as_bytes(),
            )
            .await?;
            continue;
        }
        if target.starts_with("http://big.prod.mesh") {
            let text = "0123456789abcdef".repeat(8 * 1024); // 128 KiB
            respond(
                &mut s,
                "200 OK",
                &[("Content-Type", "text/plain")],
                text.as_bytes(),
            )
            .await?;
            continue;
        }
        if target.starts_with("http://png.prod.mesh") {
            let png = [
                0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a, 0, 0, 0, 0x0d, 0xff, 0xfe,
            ];
            respond(&mut s, "200 OK", &[("Content-Type", "image/png")], &png).await?;
            continue;
        }
        if target.starts_with("http://denied.prod.mesh") {
            refuse(&mut s, "403 Forbidden", "policy_denied", DENIED).await?;
            continue;
        }
        refuse(
            &mut s,
            "404 Not Found",
            "unknown_host",
            "No node, record or routed subnet is called that.",
        )
        .await?;
    }
}
