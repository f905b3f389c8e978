//! The gateway's HTTP front: forward-proxy requests, CONNECT, the plain form
//! (`Trellis-Target`), WebSocket upgrades, `/.trellis/services`, and the
//! errors of `docs/gateway.md`. Bodies stream both ways; every request ends
//! as one [`RequestRecord`].

use std::convert::Infallible;
use std::future::Future;
use std::net::{SocketAddr, SocketAddrV4};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::{Gateway, Grant, RequestRecord, BINDING_HEADER, ERROR_HEADER, TARGET_HEADER};

/// How long the gateway waits for a node to accept a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the gateway waits for a target's response head.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a client may take to send a request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Path of the listing of what a binding may reach.
pub const SERVICES_PATH: &str = "/.trellis/services";

type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type GwBody = BoxBody<Bytes, BoxError>;

/// Serves one accepted connection (plain or TLS) until it closes.
pub(super) async fn serve_connection<S>(gw: Arc<Gateway>, io: S, peer: SocketAddr)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let gw = gw.clone();
        async move { Ok::<_, Infallible>(handle(gw, req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(%peer, error = %e, "gateway connection ended with an error");
    }
}

/// A gateway error: status, code and one sentence.
#[derive(Debug)]
pub(crate) struct GwError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl GwError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> GwError {
        GwError {
            status,
            code,
            message: message.into(),
        }
    }

    fn response(&self) -> Response<GwBody> {
        let mut resp = Response::new(full(format!("{}\n", self.message)));
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        h.insert(ERROR_HEADER, HeaderValue::from_static(self.code));
        if self.status == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
            h.insert(
                header::PROXY_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"trellis\""),
            );
        }
        if self.status == StatusCode::UNAUTHORIZED {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"trellis\""),
            );
        }
        resp
    }
}

fn full(s: impl Into<Bytes>) -> GwBody {
    Full::new(s.into()).map_err(|never| match never {}).boxed()
}

fn empty() -> GwBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// Which of the three request shapes (or the services listing) arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    Proxy,
    Connect,
    Fetch,
    Services,
}

/// Host and port a request is for, and the path to ask the target for.
struct Target {
    host: String,
    port: u16,
    /// Origin-form path and query for HTTP forms.
    path_and_query: Option<String>,
}

impl Target {
    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The record of one request, sent when dropped (when its response body or
/// tunnel ends, however it ends).
struct Log {
    gw: Arc<Gateway>,
    rec: RequestRecord,
    started: Instant,
    up: Arc<AtomicU64>,
    down: Arc<AtomicU64>,
}

impl Log {
    fn new(gw: Arc<Gateway>, form: Form, method: &Method) -> Log {
        Log {
            gw,
            rec: RequestRecord {
                account_id: 0,
                binding_id: None,
                binding: String::new(),
                start_ms: now_ms(),
                duration_ms: 0,
                form: match form {
                    Form::Proxy => "proxy",
                    Form::Connect => "connect",
                    Form::Fetch => "fetch",
                    Form::Services => "services",
                }
                .to_string(),
                method: method.as_str().to_string(),
                target: String::new(),
                dst_ip: None,
                dst_port: 0,
                node: None,
                path: None,
                status: 0,
                bytes_up: 0,
                bytes_down: 0,
                decision: "allow".to_string(),
                rule: None,
                error: None,
            },
            started: Instant::now(),
            up: Arc::default(),
            down: Arc::default(),
        }
    }

    fn fail(&mut self, e: &GwError) {
        self.rec.status = e.status.as_u16();
        self.rec.error = Some(e.code.to_string());
        if e.code == "policy_denied" {
            self.rec.decision = "deny".to_string();
        }
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        // Requests without a binding (bad credentials) belong to no account.
        if self.rec.account_id == 0 && self.rec.binding_id.is_none() {
            return;
        }
        self.rec.duration_ms = self.started.elapsed().as_millis() as i64;
        self.rec.bytes_up = self.up.load(Ordering::Relaxed);
        self.rec.bytes_down = self.down.load(Ordering::Relaxed);
        self.gw.record(std::mem::replace(
            &mut self.rec,
            RequestRecord {
                account_id: 0,
                binding_id: None,
                binding: String::new(),
                start_ms: 0,
                duration_ms: 0,
                form: String::new(),
                method: String::new(),
                target: String::new(),
                dst_ip: None,
                dst_port: 0,
                node: None,
                path: None,
                status: 0,
                bytes_up: 0,
                bytes_down: 0,
                decision: String::new(),
                rule: None,
                error: None,
            },
        ));
    }
}

async fn handle(gw: Arc<Gateway>, req: Request<Incoming>) -> Response<GwBody> {
    let form = if req.method() == Method::CONNECT {
        Form::Connect
    } else if req.uri().scheme().is_some() {
        Form::Proxy
    } else if req.headers().contains_key(TARGET_HEADER) {
        Form::Fetch
    } else if req.uri().path() == SERVICES_PATH {
        Form::Services
    } else if req.method() == Method::GET && req.uri().path() == "/" {
        let mut resp = Response::new(full(
            "Trellis fetch gateway: send a proxy request, a CONNECT, or a request with a Trellis-Target header.\n",
        ));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        return resp;
    } else {
        return GwError::new(
            StatusCode::BAD_REQUEST,
            "bad_target",
            "this is a Trellis fetch gateway: send a proxy request, a CONNECT, or a request with a Trellis-Target header (see docs/gateway.md)",
        )
        .response();
    };
    let mut log = Log::new(gw.clone(), form, req.method());
    match route(&gw, form, req, &mut log).await {
        Ok(resp) => resp,
        Err(e) => {
            log.fail(&e);
            tracing::debug!(code = e.code, message = %e.message, "gateway refused a request");
            e.response()
        }
    }
}

/// Authenticates, resolves, decides, dials and hands over to the form's pump.
async fn route(
    gw: &Arc<Gateway>,
    form: Form,
    mut req: Request<Incoming>,
    log: &mut Log,
) -> Result<Response<GwBody>, GwError> {
    let grant = authenticate(gw, form, req.headers())?;
    log.rec.account_id = grant.account.account_id;
    log.rec.binding_id = Some(grant.binding.id);
    log.rec.binding = grant.binding.name.clone();
    if form == Form::Services {
        log.rec.status = 200;
        log.rec.path = Some(SERVICES_PATH.to_string());
        return Ok(services_response(&grant));
    }
    let target = parse_target(form, &req)?;
    log.rec.target = target.authority();
    log.rec.path = target
        .path_and_query
        .as_deref()
        .map(|p| p.split('?').next().unwrap_or("").to_string());
    let (ip, node) = grant.resolve(&target.host)?;
    log.rec.dst_ip = Some(ip);
    log.rec.dst_port = target.port;
    log.rec.node = node.as_ref().map(|p| p.name.clone());
    let decision =
        grant
            .filter
            .decide(grant.binding.ip, ip, trellis_policy::PROTO_TCP, target.port);
    log.rec.rule = decision.rule.map(|r| grant.filter.rule_name(r).to_string());
    if !decision.allow {
        let why = match &log.rec.rule {
            Some(rule) if !rule.is_empty() => format!("rule {rule:?}"),
            _ => "no rule allows it".to_string(),
        };
        return Err(GwError::new(
            StatusCode::FORBIDDEN,
            "policy_denied",
            format!(
                "the account's policy denies binding {} → {} tcp/{} ({why})",
                grant.binding.name, target.host, target.port
            ),
        ));
    }
    let Some(node) = node else {
        return Err(GwError::new(
            StatusCode::NOT_FOUND,
            "unknown_host",
            format!(
                "no node or routed subnet of account {} has the address {ip}",
                grant.account.name
            ),
        ));
    };
    if !node.online {
        let seen = node
            .last_seen
            .map(|t| format!("last seen {}", super::format_unix(t)))
            .unwrap_or_else(|| "never seen online".to_string());
        return Err(GwError::new(
            StatusCode::BAD_GATEWAY,
            "node_offline",
            format!("node {} ({}) is offline ({seen})", node.name, node.ip),
        ));
    }
    let dst = SocketAddrV4::new(ip, target.port);
    match form {
        Form::Connect => {
            let stream = match grant
                .member
                .connect(grant.binding.ip, dst, CONNECT_TIMEOUT)
                .await
            {
                Ok(s) => s,
                Err(e) => return Err(dial_error(&node.name, dst, &e)),
            };
            Ok(connect_tunnel(req, stream, grant, log))
        }
        _ => {
            let upgrade = is_upgrade(req.headers());
            if upgrade {
                log.rec.form = "websocket".to_string();
            }
            let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
            let key = (grant.binding.id, dst);
            // An idle connection of this binding to this target, if one is
            // ready (an upgrade takes its connection over: always a new one).
            let mut pooled = if upgrade { None } else { gw.pool.take(&key) };
            if let Some(sender) = pooled.as_mut() {
                if sender.ready().await.is_err() {
                    pooled = None;
                }
            }
            let sender = match pooled {
                Some(s) => s,
                None => dial_http(&grant, &node.name, dst, &target).await?,
            };
            let reuse = (!upgrade).then(|| (gw.clone(), key));
            forward(req, sender, &target, grant, log, client_upgrade, reuse).await
        }
    }
}

type Sender = hyper::client::conn::http1::SendRequest<GwBody>;
/// A binding and a target.
type PoolKey = (i64, SocketAddrV4);

/// How long an idle upstream connection is kept for the next request of the
/// same binding to the same target. Short: servers close idle keep-alive
/// connections after a few seconds (Node.js after 5), and a request sent on
/// a connection the server is closing fails.
const POOL_IDLE: Duration = Duration::from_secs(2);
/// Idle connections kept per binding and target.
const POOL_MAX_PER_KEY: usize = 64;

/// Idle HTTP/1 connections to targets, by binding and target: back-to-back
/// requests skip a TCP handshake through the mesh.
#[derive(Default)]
pub(crate) struct Pool {
    idle: std::sync::Mutex<std::collections::HashMap<PoolKey, Vec<(Sender, Instant)>>>,
}

impl Pool {
    fn take(&self, key: &(i64, SocketAddrV4)) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(key)?;
        let mut found = None;
        while let Some((s, since)) = list.pop() {
            if since.elapsed() < POOL_IDLE && !s.is_closed() {
                found = Some(s);
                break;
            }
        }
        if list.is_empty() {
            idle.remove(key);
        }
        found
    }

    fn put(&self, key: (i64, SocketAddrV4), s: Sender) {
        if s.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        // Forget what went stale everywhere while we are here (cheap: few keys).
        idle.retain(|_, l| {
            l.retain(|(s, t)| t.elapsed() < POOL_IDLE && !s.is_closed());
            !l.is_empty()
        });
        let list = idle.entry(key).or_default();
        if list.len() < POOL_MAX_PER_KEY {
            list.push((s, Instant::now()));
        }
    }
}

/// A new HTTP/1 connection to `dst` from the binding's address.
async fn dial_http(
    grant: &Grant,
    node: &str,
    dst: SocketAddrV4,
    target: &Target,
) -> Result<Sender, GwError> {
    let stream = match grant
        .member
        .connect(grant.binding.ip, dst, CONNECT_TIMEOUT)
        .await
    {
        Ok(s) => s,
        Err(e) => return Err(dial_error(node, dst, &e)),
    };
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| {
            GwError::new(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                format!("cannot talk HTTP to {}: {e}", target.authority()),
            )
        })?;
    let cancel = grant.cancel.clone();
    tokio::spawn(async move {
        tokio::select! {
            r = conn.with_upgrades() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "gateway upstream connection ended with an error");
                }
            }
            _ = cancel.cancelled() => {}
        }
    });
    Ok(sender)
}

fn dial_error(node: &str, dst: SocketAddrV4, e: &std::io::Error) -> GwError {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => GwError::new(
            StatusCode::BAD_GATEWAY,
            "connection_refused",
            format!(
                "node {node} refused the connection: nothing accepts connections on {dst}"
            ),
        ),
        TimedOut => GwError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "connect_timeout",
            format!(
                "node {node} did not answer a connection to {dst} within {} s (is its agent running, and does its policy allow the binding?)",
                CONNECT_TIMEOUT.as_secs()
            ),
        ),
        _ => GwError::new(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            format!("cannot connect to {dst} on node {node}: {e}"),
        ),
    }
}

fn authenticate(gw: &Gateway, form: Form, headers: &HeaderMap) -> Result<Grant, GwError> {
    let proxy_form = matches!(form, Form::Proxy | Form::Connect);
    let (status, hint) = if proxy_form {
        (
            StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            "send the binding as Proxy-Authorization (use the binding URL as the proxy)",
        )
    } else {
        (
            StatusCode::UNAUTHORIZED,
            "send the binding in a Trellis-Binding header (b_<id>:<secret>)",
        )
    };
    let basic = headers
        .get(header::PROXY_AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("basic").then_some(rest.trim())
        })
        .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
        .and_then(|raw| String::from_utf8(raw).ok());
    let plain = if proxy_form {
        None
    } else {
        headers
            .get(BINDING_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.trim().to_string())
    };
    let cred = match plain.or(basic) {
        Some(c) => c,
        None if headers.contains_key(header::PROXY_AUTHORIZATION)
            || headers.contains_key(BINDING_HEADER) =>
        {
            return Err(GwError::new(
                status,
                "bad_credentials",
                format!("the binding credentials are malformed: {hint}"),
            ))
        }
        None => {
            return Err(GwError::new(
                status,
                "auth_required",
                format!("this gateway needs a binding: {hint}"),
            ))
        }
    };
    let (user, secret) = cred.split_once(':').unwrap_or((cred.as_str(), ""));
    let Some(public_id) = user.strip_prefix(super::BINDING_USER_PREFIX) else {
        return Err(GwError::new(
            status,
            "bad_credentials",
            "the binding credentials are malformed: the user name must be b_<id>".to_string(),
        ));
    };
    gw.grant(public_id, secret).map_err(|e| match e {
        super::AuthError::Unknown => {
            GwError::new(status, "bad_credentials", "unknown binding or wrong secret")
        }
        super::AuthError::Revoked(name) => GwError::new(
            StatusCode::FORBIDDEN,
            "binding_revoked",
            format!("binding {name} was revoked"),
        ),
        super::AuthError::Expired(name) => GwError::new(
            StatusCode::FORBIDDEN,
            "binding_expired",
            format!("binding {name} has expired; create a new one"),
        ),
        super::AuthError::NoMember(why) => GwError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "gateway_unavailable",
            format!("the gateway cannot join the account's network: {why}"),
        ),
    })
}

fn parse_target(form: Form, req: &Request<Incoming>) -> Result<Target, GwError> {
    let bad = |m: String| GwError::new(StatusCode::BAD_REQUEST, "bad_target", m);
    match form {
        Form::Connect => {
            let Some(auth) = req.uri().authority() else {
                return Err(bad("CONNECT needs HOST:PORT".to_string()));
            };
            let Some(port) = auth.port_u16() else {
                return Err(bad(format!("CONNECT {auth}: the port is missing")));
            };
            Ok(Target {
                host: host_of(auth.host()),
                port,
                path_and_query: None,
            })
        }
        Form::Proxy => target_of_uri(req.uri()),
        _ => {
            let raw = req
                .headers()
                .get(TARGET_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let uri: Uri = raw.trim().parse().map_err(|_| {
                bad(format!(
                    "Trellis-Target {raw:?} is not a URL like http://db.prod.mesh:8080/path"
                ))
            })?;
            target_of_uri(&uri)
        }
    }
}

fn host_of(h: &str) -> String {
    h.trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

fn target_of_uri(uri: &Uri) -> Result<Target, GwError> {
    let bad = |m: String| GwError::new(StatusCode::BAD_REQUEST, "bad_target", m);
    match uri.scheme_str() {
        Some("http") | Some("ws") => {}
        Some("https") | Some("wss") => {
            return Err(bad(format!(
                "{uri}: the gateway forwards http:// targets; for https:// use CONNECT (HTTPS_PROXY, or the SDK's connect)"
            )))
        }
        Some(other) => return Err(bad(format!("{uri}: unsupported scheme {other:?}"))),
        None => {
            return Err(bad(format!(
                "{uri:?} is not an absolute URL like http://db.prod.mesh:8080/path"
            )))
        }
    }
    let Some(auth) = uri.authority() else {
        return Err(bad(format!("{uri}: the host is missing")));
    };
    let pq = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "/".to_string());
    Ok(Target {
        host: host_of(auth.host()),
        port: auth.port_u16().unwrap_or(80),
        path_and_query: Some(pq),
    })
}

fn is_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str()
                .map(|s| {
                    s.split(',')
                        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
                })
                .unwrap_or(false)
        })
}

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1), plus
/// the gateway's own.
fn strip_hop_headers(h: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        if keep_upgrade && n == header::UPGRADE {
            continue;
        }
        h.remove(n);
    }
    for n in [
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        TARGET_HEADER,
        BINDING_HEADER,
    ] {
        h.remove(n);
    }
    if keep_upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        h.remove(header::CONNECTION);
        h.remove(header::UPGRADE);
    }
}

/// CONNECT: answer 200, then carry bytes both ways until either side ends,
/// the binding is revoked, or the server stops.
fn connect_tunnel(
    req: Request<Incoming>,
    stream: super::netstack::TcpStream,
    grant: Grant,
    log: &mut Log,
) -> Response<GwBody> {
    log.rec.status = 200;
    let mut owned = std::mem::replace(
        log,
        Log::new(log.gw.clone(), Form::Connect, &Method::CONNECT),
    );
    // The placeholder left behind must not log.
    log.rec.account_id = 0;
    log.rec.binding_id = None;
    tokio::spawn(async move {
        let upgraded = match hyper::upgrade::on(req).await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "CONNECT upgrade failed");
                owned.rec.error = Some("client_gone".to_string());
                drop(owned);
                return;
            }
        };
        splice(TokioIo::new(upgraded), stream, &grant.cancel, &mut owned).await;
    });
    Response::new(empty())
}

/// Copies both ways, counting, until both directions end or `cancel` fires.
async fn splice<A, B>(a: A, mut b: B, cancel: &CancellationToken, log: &mut Log)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut a = Counting {
        inner: a,
        read: log.up.clone(),
        written: log.down.clone(),
    };
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut a, &mut b) => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "tunnel ended with an error");
            }
        }
        _ = cancel.cancelled() => {
            log.rec.error = Some("binding_revoked".to_string());
        }
    }
}

/// An IO object that counts bytes read from it and written to it.
struct Counting<T> {
    inner: T,
    read: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counting<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counting<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A body that counts its bytes, ends with an error when the binding is
/// revoked, and holds the request's log record until it ends.
struct Tracked<B> {
    inner: B,
    count: Arc<AtomicU64>,
    cancel: Pin<Box<WaitForCancellationFutureOwned>>,
    log: Option<Log>,
    /// The upstream connection goes back to the pool when the body ends well.
    reuse: Option<(Arc<Gateway>, (i64, SocketAddrV4), Sender)>,
}

impl<B> Tracked<B> {
    /// The body ended well: the record goes out, the connection back to the pool.
    fn finish(&mut self) {
        self.log = None;
        if let Some((gw, key, sender)) = self.reuse.take() {
            gw.pool.put(key, sender);
        }
    }
}

impl<B> HttpBody for Tracked<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.cancel.as_mut().poll(cx).is_ready() {
            if let Some(log) = self.log.as_mut() {
                log.rec.error = Some("binding_revoked".to_string());
            }
            self.log = None;
            return Poll::Ready(Some(Err("the binding was revoked".into())));
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    self.count.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
                // hyper stops polling a body that says it has ended.
                if self.inner.is_end_stream() {
                    self.finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(log) = self.log.as_mut() {
                    log.rec.error = Some("upstream_error".to_string());
                }
                self.log = None;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                self.finish();
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The HTTP forms: send the request to the target over `stream` and answer
/// with its response, streaming both bodies.
#[allow(clippy::too_many_arguments)]
async fn forward(
    req: Request<Incoming>,
    mut sender: Sender,
    target: &Target,
    grant: Grant,
    log: &mut Log,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    reuse: Option<(Arc<Gateway>, (i64, SocketAddrV4))>,
) -> Result<Response<GwBody>, GwError> {
    let upstream_err = |m: String| GwError::new(StatusCode::BAD_GATEWAY, "upstream_error", m);
    let (mut parts, body) = req.into_parts();
    let upgrade = client_upgrade.is_some();
    strip_hop_headers(&mut parts.headers, upgrade);
    let host = if target.port == 80 {
        target.host.clone()
    } else {
        target.authority()
    };
    parts.headers.insert(
        header::HOST,
        HeaderValue::from_str(&host)
            .map_err(|_| GwError::new(StatusCode::BAD_REQUEST, "bad_target", "bad host"))?,
    );
    parts.uri = target
        .path_and_query
        .as_deref()
        .unwrap_or("/")
        .parse()
        .map_err(|_| GwError::new(StatusCode::BAD_REQUEST, "bad_target", "bad path"))?;
    parts.version = http::Version::HTTP_11;
    let up_body = Tracked {
        inner: body,
        count: log.up.clone(),
        cancel: Box::pin(grant.cancel.clone().cancelled_owned()),
        log: None,
        reuse: None,
    };
    let out = Request::from_parts(parts, up_body.boxed());
    let mut resp = match tokio::time::timeout(RESPONSE_TIMEOUT, sender.send_request(out)).await {
        Err(_) => {
            return Err(GwError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                format!(
                    "{} accepted the connection but sent no response within {} s",
                    target.authority(),
                    RESPONSE_TIMEOUT.as_secs()
                ),
            ))
        }
        Ok(Err(e)) => {
            return Err(upstream_err(format!(
                "{} broke the HTTP exchange: {e}",
                target.authority()
            )))
        }
        Ok(Ok(r)) => r,
    };
    log.rec.status = resp.status().as_u16();
    let mut owned = std::mem::replace(log, Log::new(log.gw.clone(), Form::Fetch, &Method::GET));
    log.rec.account_id = 0;
    log.rec.binding_id = None;

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            owned.rec.error = Some("upstream_error".to_string());
            return Err(upstream_err(format!(
                "{} switched protocols without being asked to",
                target.authority()
            )));
        };
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        let (parts, _) = resp.into_parts();
        let cancel = grant.cancel.clone();
        tokio::spawn(async move {
            let (Ok(client), Ok(upstream)) = tokio::join!(client_upgrade, upstream_upgrade) else {
                owned.rec.error = Some("upgrade_failed".to_string());
                drop(owned);
                return;
            };
            splice(
                TokioIo::new(client),
                TokioIo::new(upstream),
                &cancel,
                &mut owned,
            )
            .await;
        });
        let mut headers = parts.headers;
        strip_hop_headers(&mut headers, true);
        let mut r = Response::new(empty());
        *r.status_mut() = parts.status;
        *r.headers_mut() = headers;
        return Ok(r);
    }

    let (mut parts, body) = resp.into_parts();
    strip_hop_headers(&mut parts.headers, false);
    let down = owned.down.clone();
    let body = Tracked {
        inner: body,
        count: down,
        cancel: Box::pin(grant.cancel.clone().cancelled_owned()),
        log: Some(owned),
        reuse: reuse.map(|(gw, key)| (gw, key, sender)),
    };
    Ok(Response::from_parts(parts, body.boxed()))
}

fn services_response(grant: &Grant) -> Response<GwBody> {
    let body = serde_json::json!({
        "binding": grant.binding.name,
        "account": grant.account.name,
        "address": grant.binding.ip.to_string(),
        "services": grant.services(),
    });
    let mut resp = Response::new(full(body.to_string()));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}
