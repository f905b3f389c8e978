//! Reach a Trellis account's private network from code that does not run on a
//! node, through a **binding** and the edge's fetch gateway (see
//! `docs/gateway.md`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), trellis_sdk::Error> {
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! // MESH=http://b_<id>:<secret>@edge.example.com:8443
//! let mesh = trellis_sdk::Mesh::from_env("MESH")?;
//! let health = mesh.get("http://db.prod.mesh:8080/health").await?;
//! println!("{}", health.status());
//!
//! let mut redis = mesh.connect("cache.prod.mesh:6379").await?;
//! redis.write_all(b"PING\r\n").await?;
//! let mut pong = [0u8; 7];
//! redis.read_exact(&mut pong).await?;
//! # Ok(()) }
//! ```
//!
//! - [`Mesh::fetch`] sends `http://` URLs through the gateway as a forward
//!   proxy and `https://` URLs through `CONNECT` (TLS end to end with the target).
//! - [`Mesh::connect`] opens a raw TCP tunnel (`CONNECT HOST:PORT`).
//! - [`Mesh::services`] lists what the binding may reach.
//! - [`proxy::serve`] is a local plain-HTTP proxy for tools that cannot
//!   authenticate to a proxy; [`mcp::serve_stdio`] is a Model Context Protocol
//!   server for AI agents.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde::{Deserialize, Serialize};

pub mod mcp;
pub mod proxy;
mod stream;

pub use stream::MeshStream;

/// How long opening a connection to the gateway may take.
const GATEWAY_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// The largest gateway error sentence read.
const MAX_ERROR_BODY: usize = 4096;

/// What the SDK reports when something fails.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The binding URL (or the environment variable that should hold it) is
    /// missing or malformed. The message names the part that is wrong and
    /// never contains the secret.
    #[error("{0}")]
    Config(String),
    /// The target given to [`Mesh::connect`] or [`Mesh::fetch`] is not usable.
    #[error("{0}")]
    InvalidTarget(String),
    /// The gateway refused or failed the request (docs/gateway.md, "Errors").
    #[error("the gateway answered {status}{}: {message}", code.as_deref().map(|c| format!(" {c}")).unwrap_or_default())]
    Gateway {
        /// HTTP status of the gateway's answer, e.g. 403.
        status: u16,
        /// The `Trellis-Error` code, e.g. `policy_denied` (absent if the
        /// answer had none).
        code: Option<String>,
        /// The gateway's one-sentence explanation.
        message: String,
    },
    /// The gateway could not be reached (connection, TLS or timeout).
    #[error("cannot reach the gateway at {gateway}: {reason}")]
    Unreachable { gateway: String, reason: String },
    /// The gateway's answer was not HTTP as expected.
    #[error("the gateway sent a malformed answer: {0}")]
    Protocol(String),
    /// An HTTP exchange through the gateway failed.
    #[error("{}", chain(.0))]
    Http(#[from] reqwest::Error),
    /// Reading or writing a tunnel failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// The gateway's HTTP status, for [`Error::Gateway`].
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Gateway { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The gateway's `Trellis-Error` code (`policy_denied`, `unknown_host`, ...).
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Gateway { code, .. } => code.as_deref(),
            _ => None,
        }
    }
}

/// An error with its causes, "a: b: c" (reqwest's own Display hides them).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// What `GET /.trellis/services` answers: what the binding may reach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Services {
    /// The binding's name.
    pub binding: String,
    pub account: String,
    /// The binding's overlay address (the source nodes see).
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub services: Vec<Service>,
}

/// One node, DNS record or routed subnet a binding may reach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// e.g. `db.prod.mesh`, or a subnet like `198.19.10.0/24`.
    pub name: String,
    /// Overlay address, or the subnet.
    #[serde(default)]
    pub address: String,
    /// The node that owns or routes it.
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub online: bool,
    /// Ports the policy allows: `tcp:5432`, ..., or `*` for any.
    #[serde(default)]
    pub ports: Vec<String>,
}

/// The parsed binding: where the gateway is and the credentials.
#[derive(Clone)]
struct Binding {
    tls: bool,
    host: url::Host<String>,
    port: u16,
    id: String,
    secret: String,
    roots: Vec<rustls::pki_types::CertificateDer<'static>>,
}

impl Binding {
    /// `http(s)://HOST:PORT`, without credentials.
    fn gateway_url(&self) -> String {
        format!(
            "{}://{}:{}",
            if self.tls { "https" } else { "http" },
            self.host,
            self.port
        )
    }

    fn basic_auth(&self) -> String {
        let raw = format!("{}:{}", self.id, self.secret);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }

    fn reqwest_builder(&self) -> Result<reqwest::ClientBuilder, Error> {
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .http1_only()
            .connect_timeout(GATEWAY_CONNECT_TIMEOUT);
        for der in &self.roots {
            b = b.add_root_certificate(reqwest::Certificate::from_der(der)?);
        }
        Ok(b)
    }

    /// A client that sends everything through the gateway.
    fn proxied_client(
        &self,
        redirect: reqwest::redirect::Policy,
    ) -> Result<reqwest::Client, Error> {
        let proxy = reqwest::Proxy::all(self.gateway_url())?.basic_auth(&self.id, &self.secret);
        Ok(self
            .reqwest_builder()?
            .proxy(proxy)
            .redirect(redirect)
            .build()?)
    }
}

struct Inner {
    binding: Binding,
    client: reqwest::Client,
    direct: reqwest::Client,
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// A binding to an account's private network: send requests and open
/// tunnels through the fetch gateway. Cheap to clone.
#[derive(Clone)]
pub struct Mesh {
    inner: Arc<Inner>,
}

impl fmt::Debug for Mesh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mesh")
            .field("gateway", &self.inner.binding.gateway_url())
            .field("binding", &self.inner.binding.id)
            .finish_non_exhaustive()
    }
}

const EXPECTED: &str = "expected http://b_<id>:<secret>@HOST:PORT (or https://)";

impl Mesh {
    /// Reads the binding URL from the environment variable `var` (usually `MESH`).
    pub fn from_env(var: &str) -> Result<Mesh, Error> {
        match std::env::var(var) {
            Ok(v) => parse_named(&v, var),
            Err(std::env::VarError::NotPresent) => Err(Error::Config(format!(
                "{var} is not set: {EXPECTED}, as printed by `trellis binding create`"
            ))),
            Err(std::env::VarError::NotUnicode(_)) => Err(Error::Config(format!(
                "{var} is not valid UTF-8: {EXPECTED}"
            ))),
        }
    }

    /// Parses a binding URL `http(s)://b_<id>:<secret>@HOST:PORT`.
    pub fn parse(binding_url: &str) -> Result<Mesh, Error> {
        parse_named(binding_url, "the binding URL")
    }

    /// Also trusts the CA (or self-signed certificate) in `pem` — for an
    /// `https://` gateway whose certificate is not from a public CA. Every
    /// certificate in the PEM text is added; the public roots stay trusted.
    pub fn with_root_certificate(self, pem: impl AsRef<[u8]>) -> Result<Mesh, Error> {
        use rustls::pki_types::pem::PemObject;
        let mut binding = self.inner.binding.clone();
        let mut found = 0;
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_ref()) {
            let cert = cert.map_err(|e| {
                Error::Config(format!("the root certificate is not valid PEM: {e}"))
            })?;
            binding.roots.push(cert);
            found += 1;
        }
        if found == 0 {
            return Err(Error::Config(
                "the root certificate PEM holds no CERTIFICATE block".into(),
            ));
        }
        Mesh::build(binding)
    }

    fn build(binding: Binding) -> Result<Mesh, Error> {
        let client = binding.proxied_client(reqwest::redirect::Policy::default())?;
        let direct = binding.reqwest_builder()?.no_proxy().build()?;
        let tls = if binding.tls {
            let mut roots = rustls::RootCertStore::empty();
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            for der in &binding.roots {
                roots.add(der.clone()).map_err(|e| {
                    Error::Config(format!("the root certificate cannot be used: {e}"))
                })?;
            }
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("TLS setup: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
            Some(Arc::new(config))
        } else {
            None
        };
        Ok(Mesh {
            inner: Arc::new(Inner {
                binding,
                client,
                direct,
                tls,
            }),
        })
    }

    /// The gateway's address, `http(s)://HOST:PORT` (no credentials).
    pub fn gateway_url(&self) -> String {
        self.inner.binding.gateway_url()
    }

    /// The binding id, `b_...` (not secret).
    pub fn binding_id(&self) -> &str {
        &self.inner.binding.id
    }

    /// The reqwest client configured to send everything through the gateway
    /// (`http://` as a forward proxy, `https://` with CONNECT). Requests sent
    /// with it directly get gateway errors as ordinary responses (with a
    /// `Trellis-Error` header); [`Mesh::fetch`] turns them into [`Error::Gateway`].
    pub fn client(&self) -> &reqwest::Client {
        &self.inner.client
    }

    /// A new client through the gateway with another redirect policy.
    pub fn client_with_redirects(
        &self,
        policy: reqwest::redirect::Policy,
    ) -> Result<reqwest::Client, Error> {
        self.inner.binding.proxied_client(policy)
    }

    /// Sends `request` through the gateway. A refusal by the gateway (an
    /// answer with `Trellis-Error`) is `Err(Error::Gateway)`; any answer of
    /// the target, whatever its status, is `Ok`.
    pub async fn fetch(&self, request: reqwest::Request) -> Result<reqwest::Response, Error> {
        let url = request.url().clone();
        match url.scheme() {
            "http" | "https" => {}
            other => {
                return Err(Error::InvalidTarget(format!(
                    "cannot fetch a {other}: URL through the gateway: only http:// and https://"
                )))
            }
        }
        match self.inner.client.execute(request).await {
            Ok(resp) => gateway_error(resp).await,
            Err(e) if url.scheme() == "https" && e.is_connect() => {
                // reqwest reports a refused CONNECT without the gateway's
                // answer; ask once more to learn the code and the sentence
                // (or that the gateway cannot be reached at all).
                let authority = match (url.host_str(), url.port_or_known_default()) {
                    (Some(h), Some(p)) => format!("{h}:{p}"),
                    _ => return Err(e.into()),
                };
                match self.connect(&authority).await {
                    Err(g @ (Error::Gateway { .. } | Error::Unreachable { .. })) => Err(g),
                    _ => Err(e.into()),
                }
            }
            // For http:// targets reqwest connects to the gateway only.
            Err(e) if e.is_connect() => Err(self.unreachable(&e)),
            Err(e) => Err(e.into()),
        }
    }

    /// `GET url` through the gateway (see [`Mesh::fetch`]).
    pub async fn get(&self, url: impl reqwest::IntoUrl) -> Result<reqwest::Response, Error> {
        let request = self.inner.client.get(url).build()?;
        self.fetch(request).await
    }

    /// Opens a TCP tunnel to `authority` (`HOST:PORT`, e.g.
    /// `db.prod.mesh:5432`) with `CONNECT`. The stream carries the target's
    /// bytes exactly, from the first one after the gateway's `200`.
    pub async fn connect(&self, authority: &str) -> Result<MeshStream, Error> {
        stream::connect(self, authority).await
    }

    fn unreachable(&self, e: &reqwest::Error) -> Error {
        Error::Unreachable {
            gateway: self.gateway_url(),
            reason: chain(e),
        }
    }

    /// What this binding may reach (`GET /.trellis/services` on the gateway).
    pub async fn services(&self) -> Result<Services, Error> {
        let b = &self.inner.binding;
        let resp = self
            .inner
            .direct
            .get(format!("{}/.trellis/services", b.gateway_url()))
            .header("Trellis-Binding", format!("{}:{}", b.id, b.secret))
            .send()
            .await
            .map_err(|e| match e.is_connect() {
                true => self.unreachable(&e),
                false => e.into(),
            })?;
        let resp = gateway_error(resp).await?;
        let status = resp.status();
        if !status.is_success() {
            let message = read_sentence(resp).await;
            return Err(Error::Gateway {
                status: status.as_u16(),
                code: None,
                message,
            });
        }
        let body = resp.bytes().await?;
        serde_json::from_slice(&body).map_err(|e| {
            Error::Protocol(format!(
                "/.trellis/services did not answer the expected JSON: {e}"
            ))
        })
    }
}

fn parse_named(raw: &str, what: &str) -> Result<Mesh, Error> {
    let raw = raw.trim();
    let bad = |m: &str| Error::Config(format!("{what} {m}: {EXPECTED}"));
    if raw.is_empty() {
        return Err(bad("is empty"));
    }
    let Some((scheme, _)) = raw.split_once("://") else {
        return Err(bad("has no scheme (http:// or https://)"));
    };
    let tls = match scheme.to_ascii_lowercase().as_str() {
        "http" => false,
        "https" => true,
        s if s.len() <= 16
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) =>
        {
            return Err(bad(&format!(
                "has scheme \"{s}\"; the gateway speaks http or https"
            )))
        }
        _ => return Err(bad("has an unsupported scheme")),
    };
    // url::ParseError messages never quote the input (which holds the secret).
    let url = url::Url::parse(raw).map_err(|e| bad(&format!("is not a valid URL ({e})")))?;
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(|s| s.into_owned())
    };
    let id = decode(url.username()).map_err(|_| bad("has a binding id that is not UTF-8"))?;
    if id.is_empty() {
        return Err(bad("has no binding id (b_<id>) before the host"));
    }
    if !id.starts_with("b_") || id.len() < 3 {
        // Not quoted: it may be the secret, put where the id belongs.
        return Err(bad(
            "has a user name that is not a binding id (binding ids start with b_)",
        ));
    }
    let secret = match url.password() {
        Some(p) if !p.is_empty() => decode(p).map_err(|_| bad("has a secret that is not UTF-8"))?,
        _ => return Err(bad(&format!("has no secret after the binding id {id}"))),
    };
    let host = match url.host() {
        Some(h) if !h.to_string().is_empty() => h.to_owned(),
        _ => return Err(bad("has no host")),
    };
    if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
        return Err(bad("has a path, query or fragment after the host"));
    }
    let port = url
        .port_or_known_default()
        .ok_or_else(|| bad("has no port"))?;
    Mesh::build(Binding {
        tls,
        host,
        port,
        id,
        secret,
        roots: Vec::new(),
    })
}

/// Turns a gateway refusal (an answer with `Trellis-Error`) into an error.
async fn gateway_error(resp: reqwest::Response) -> Result<reqwest::Response, Error> {
    let Some(code) = resp.headers().get("trellis-error") else {
        return Ok(resp);
    };
    let code = String::from_utf8_lossy(code.as_bytes()).trim().to_string();
    let status = resp.status().as_u16();
    let message = read_sentence(resp).await;
    Err(Error::Gateway {
        status,
        code: Some(code),
        message,
    })
}

/// The (short, plain-text) body of an error answer.
async fn read_sentence(mut resp: reqwest::Response) -> String {
    let reason = resp.status().canonical_reason().unwrap_or("").to_string();
    let mut buf = Vec::new();
    let read = async {
        while let Ok(Some(chunk)) = resp.chunk().await {
            buf.extend_from_slice(&chunk);
            if buf.len() >= MAX_ERROR_BODY {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
    sentence(&buf, &reason)
}

fn sentence(body: &[u8], fallback: &str) -> String {
    let body = &body[..body.len().min(MAX_ERROR_BODY)];
    let text = String::from_utf8_lossy(body).trim().to_string();
    if text.is_empty() {
        fallback.to_string()
    } else {
        text
    }
}
