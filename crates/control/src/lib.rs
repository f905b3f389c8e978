//! The Trellis control plane: accounts, join tokens, nodes and their keys, IP
//! allocation, the REST API under `/api/v1` (with its OpenAPI document) and the
//! live control stream that pushes each node its network map.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let server = trellis_control::Server::start(trellis_control::Config {
//!     data_dir: "/var/lib/trellis".into(),
//!     listen: "0.0.0.0:8080".parse()?,
//!     public_url: None,
//!     edge_udp: Some("0.0.0.0:3478".parse()?),
//!     dns_suffix: trellis_control::DEFAULT_DNS_SUFFIX.into(),
//!     flow_retention: trellis_control::flows::DEFAULT_FLOW_RETENTION,
//!     gateway_listen: Some(trellis_control::DEFAULT_GATEWAY_LISTEN.parse()?),
//!     gateway_tls: None,
//! })
//! .await?;
//! println!("{}", server.url());
//! server.serve(async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```

pub mod api;
pub mod audit;
pub mod bindings;
pub mod dashboard;
pub mod flows;
pub mod keys;
pub mod map;
pub mod mesh;
pub mod policy;
pub mod probe;
pub mod relay;
pub mod store;
pub mod stream;
pub mod tokens;

use std::fs::{DirBuilder, OpenOptions};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rand::RngCore;
use tokio::net::TcpListener;
use trellis_edge::{EdgeUdp, RelayHub};

pub use api::ApiDoc;
pub use store::Store;

use crate::api::{now, AppState};
use crate::map::Hub;
use crate::relay::Relay;

/// Name of the database file inside the data directory.
pub const DB_FILE: &str = "trellis.db";
/// Name of the operator key file inside the data directory.
pub const ADMIN_KEY_FILE: &str = "admin.key";
/// Name of the relay secret file (32 random bytes) inside the data directory.
pub const RELAY_SECRET_FILE: &str = "relay.secret";
/// The DNS suffix unless configured: nodes resolve `NODE.ACCOUNT.mesh`.
pub const DEFAULT_DNS_SUFFIX: &str = "mesh";
/// Where the fetch gateway listens unless configured.
pub const DEFAULT_GATEWAY_LISTEN: &str = "0.0.0.0:8443";

/// How to run the control plane.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the database and admin.key live; created (0700) if missing.
    pub data_dir: PathBuf,
    /// Address of the HTTP listener (port 0 picks a free port).
    pub listen: SocketAddr,
    /// URL under which users and nodes reach this server, if not the listen address.
    pub public_url: Option<String>,
    /// Address of the edge's UDP port (STUN and relay); None runs no edge, and
    /// network maps then carry no relay information.
    pub edge_udp: Option<SocketAddr>,
    /// Suffix of every account's domain: nodes resolve `NODE.ACCOUNT.SUFFIX`
    /// (default [`DEFAULT_DNS_SUFFIX`]). Lower-case DNS labels separated by dots.
    pub dns_suffix: String,
    /// How long flow records are kept (by the time each flow ended); older
    /// ones are deleted at start and hourly. Default
    /// [`flows::DEFAULT_FLOW_RETENTION`] (30 days).
    pub flow_retention: Duration,
    /// TCP address of the fetch gateway (bindings' requests; see
    /// `docs/gateway.md`); None runs no gateway, and bindings cannot be created.
    pub gateway_listen: Option<SocketAddr>,
    /// The gateway's TLS certificate chain and private key (PEM files); None
    /// serves plain HTTP.
    pub gateway_tls: Option<(PathBuf, PathBuf)>,
}

struct GatewayParts {
    listener: TcpListener,
    addr: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
    records: tokio::sync::mpsc::Receiver<trellis_edge::gateway::RequestRecord>,
}

/// A started control plane: database open, listener bound, not yet serving.
pub struct Server {
    config: Config,
    listener: TcpListener,
    local_addr: SocketAddr,
    edge: Option<EdgeUdp>,
    edge_addr: Option<SocketAddr>,
    /// The gateway's listener, its TLS configuration and its record channel.
    gateway: Option<GatewayParts>,
    state: AppState,
    /// The one-time dashboard setup token, while no dashboard admin exists.
    setup_token: Option<String>,
}

impl Server {
    /// Creates data_dir (0700) if needed, opens DATA_DIR/trellis.db (SQLite, WAL,
    /// foreign keys, busy_timeout 5 s), runs migrations, creates account `default`
    /// on first start, writes an operator API key to DATA_DIR/admin.key (0600) if
    /// that file does not exist, creates the relay secret DATA_DIR/relay.secret
    /// (0600) likewise, binds the TCP listener and, if configured, the edge's UDP port.
    pub async fn start(config: Config) -> anyhow::Result<Server> {
        mesh::validate_dns_suffix(&config.dns_suffix).map_err(|e| anyhow::anyhow!(e))?;
        if config.flow_retention.is_zero() {
            anyhow::bail!("the flow-log retention must be longer than zero, e.g. 30d");
        }
        let dir = &config.data_dir;
        if !dir.exists() {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating data directory {}", dir.display()))?;
        }
        let store = Store::open_sqlite(&dir.join(DB_FILE)).await?;
        let default = store
            .ensure_default_account(now())
            .await
            .context("creating the default account")?;

        let key_path = dir.join(ADMIN_KEY_FILE);
        if !key_path.exists() {
            let key = store
                .create_api_key(default.id, true, now())
                .await
                .context("creating the operator API key")?;
            write_secret_file(&key_path, &key)?;
            tracing::info!(path = %key_path.display(), "wrote the operator API key");
        }

        // A fresh setup link at each start until the first dashboard admin exists.
        let setup_token = store
            .renew_setup_token(now())
            .await
            .context("preparing the dashboard's setup link")?;

        let secret = load_or_create_relay_secret(&dir.join(RELAY_SECRET_FILE))?;
        let relay_hub = Arc::new(RelayHub::new(secret));
        // Deleted nodes stay refused across restarts, even with unexpired relay tokens.
        for key in store
            .revoked_keys()
            .await
            .context("loading revoked node keys")?
        {
            relay_hub.revoke(&key.0);
        }

        let listener = TcpListener::bind(config.listen).await.with_context(|| {
            format!(
                "listening on {} (is another server running there?)",
                config.listen
            )
        })?;
        let local_addr = listener
            .local_addr()
            .context("reading the listener's address")?;
        let (edge, edge_addr, udp) = match config.edge_udp {
            None => (None, None, None),
            Some(addr) => {
                let edge = EdgeUdp::bind(addr, relay_hub.clone()).await?;
                let bound = edge
                    .local_addr()
                    .context("reading the edge UDP port's address")?;
                let udp = relay_udp(bound, &server_url(&config, local_addr))?;
                (Some(edge), Some(bound), Some(udp))
            }
        };
        let (gateway, front) = match config.gateway_listen {
            None => {
                if config.gateway_tls.is_some() {
                    anyhow::bail!("a gateway TLS certificate was given but the gateway is off; give --gateway-listen ADDR too");
                }
                (None, None)
            }
            Some(addr) => {
                let tls = config
                    .gateway_tls
                    .as_ref()
                    .map(|(cert, key)| load_tls(cert, key))
                    .transpose()?;
                let listener = TcpListener::bind(addr).await.with_context(|| {
                    format!("listening for the fetch gateway on {addr} (is another server running there? pick another with --gateway-listen, or `off`)")
                })?;
                let bound = listener
                    .local_addr()
                    .context("reading the gateway listener's address")?;
                let authority = gateway_authority(&config, bound, local_addr)?;
                let (gw, records) = trellis_edge::gateway::Gateway::new(relay_hub.clone(), secret);
                let front = Arc::new(bindings::GatewayFront {
                    gateway: gw,
                    scheme: if tls.is_some() { "https" } else { "http" },
                    authority,
                });
                (
                    Some(GatewayParts {
                        listener,
                        addr: bound,
                        tls,
                        records,
                    }),
                    Some(front),
                )
            }
        };
        let dns_suffix: Arc<str> = Arc::from(config.dns_suffix.as_str());
        let dash = Arc::new(dashboard::DashState::new(&server_url(&config, local_addr)));
        let flow_retention = config.flow_retention;
        Ok(Server {
            setup_token,
            config,
            listener,
            local_addr,
            edge,
            edge_addr,
            gateway,
            state: AppState {
                store,
                hub: Arc::new(Hub::new()),
                dns_suffix,
                flows: Arc::new(flows::FlowBus::new()),
                relay: Arc::new(Relay {
                    hub: relay_hub,
                    udp,
                }),
                dash,
                flow_retention,
                gateway: front,
            },
        })
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// public_url if given, else http://<listen addr> (127.0.0.1 when bound to all interfaces).
    pub fn url(&self) -> String {
        server_url(&self.config, self.local_addr)
    }

    /// The dashboard's one-time setup link, while no dashboard admin exists.
    pub fn setup_url(&self) -> Option<String> {
        self.setup_token
            .as_ref()
            .map(|t| format!("{}/setup?token={t}", self.url()))
    }

    /// The line to print at start: `Set up Trellis: URL/setup?token=...` while
    /// no dashboard admin exists, else `Dashboard: URL/`.
    pub fn dashboard_line(&self) -> String {
        match self.setup_url() {
            Some(link) => format!("Set up Trellis: {link}"),
            None => format!("Dashboard: {}/", self.url()),
        }
    }

    /// The address the edge's UDP port is bound to, if it runs.
    pub fn edge_udp_addr(&self) -> Option<SocketAddr> {
        self.edge_addr
    }

    /// The address the fetch gateway's listener is bound to, if it runs.
    pub fn gateway_addr(&self) -> Option<SocketAddr> {
        self.gateway.as_ref().map(|g| g.addr)
    }

    /// The fetch gateway, if it runs (to watch its account snapshots).
    pub fn gateway(&self) -> Option<Arc<trellis_edge::gateway::Gateway>> {
        self.state.gateway.as_ref().map(|f| f.gateway.clone())
    }

    /// `SCHEME://HOST:PORT` of the fetch gateway as binding URLs name it.
    pub fn gateway_url(&self) -> Option<String> {
        self.state
            .gateway
            .as_ref()
            .map(|f| format!("{}://{}", f.scheme, f.authority))
    }

    /// The relay hub (for its counters).
    pub fn relay_hub(&self) -> Arc<RelayHub> {
        self.state.relay.hub.clone()
    }

    /// Where the operator API key is kept.
    pub fn admin_key_path(&self) -> PathBuf {
        self.config.data_dir.join(ADMIN_KEY_FILE)
    }

    /// Serves HTTP and the edge's UDP port until `shutdown` resolves, then
    /// closes every control stream and relay WebSocket and stops.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let hub = self.state.hub.clone();
        let hub_after = self.state.hub.clone();
        let store = self.state.store.clone();
        let retention = flows::spawn_retention(store.clone(), self.config.flow_retention);
        let relay_policy = relay::spawn_policy_sync(self.state.clone());
        let gateway_sync = bindings::spawn_gateway_sync(self.state.clone());
        // The gateway runs as its own task: should it fail, the control plane
        // keeps serving (the failure is logged when the task ends).
        let (gateway_task, ingest) = match self.gateway {
            None => (None, None),
            Some(parts) => {
                let gw = self
                    .state
                    .gateway
                    .as_ref()
                    .map(|f| f.gateway.clone())
                    .context("the gateway's state is missing")?;
                tracing::info!(addr = %parts.addr, tls = parts.tls.is_some(), "fetch gateway listening");
                let ingest = bindings::spawn_request_ingest(store.clone(), parts.records);
                let task = tokio::spawn(gw.serve(parts.listener, parts.tls));
                (Some(task), Some(ingest))
            }
        };
        let app = api::router(self.state);
        tracing::info!(addr = %self.local_addr, "control plane listening");
        let edge_task = self.edge.map(|edge| {
            tracing::info!(addr = ?self.edge_addr, "edge UDP port (STUN and relay) listening");
            tokio::spawn(edge.serve())
        });
        let served = axum::serve(
            self.listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
            shutdown.await;
            hub.shutdown();
        })
        .await;
        if let Some(task) = edge_task {
            task.abort();
            // The socket is closed once the aborted task is gone.
            let _ = task.await;
        }
        retention.abort();
        let _ = retention.await;
        relay_policy.abort();
        let _ = relay_policy.await;
        for task in [gateway_sync, gateway_task, ingest].into_iter().flatten() {
            task.abort();
            if let Err(e) = task.await {
                if e.is_panic() {
                    tracing::error!("a gateway task had failed: {e}");
                }
            }
        }
        served.context("serving HTTP")?;
        // Streams were told to close; let them record their last_seen first.
        if tokio::time::timeout(Duration::from_secs(5), hub_after.streams_ended())
            .await
            .is_err()
        {
            tracing::warn!("some control streams did not finish within 5 s of shutdown");
        }
        store.close().await;
        Ok(())
    }
}

/// public_url if given, else http://<listen addr> (127.0.0.1 when bound to all interfaces).
fn server_url(config: &Config, local_addr: SocketAddr) -> String {
    if let Some(url) = &config.public_url {
        return url.trim_end_matches('/').to_string();
    }
    let mut addr = local_addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    format!("http://{addr}")
}

/// The host part of a URL as written (IPv6 in brackets), e.g. "example.com"
/// for "https://user@example.com:8443/x".
fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if host_port.starts_with('[') {
        &host_port[..=host_port.find(']')?]
    } else {
        host_port.split(':').next()?
    };
    (!host.is_empty()).then_some(host)
}

/// `HOST:PORT` nodes use to reach the edge bound at `edge`: its own IP when
/// specific, else the host of the server's URL.
fn relay_udp(edge: SocketAddr, url: &str) -> anyhow::Result<String> {
    if !edge.ip().is_unspecified() {
        return Ok(edge.to_string());
    }
    let host = url_host(url).with_context(|| {
        format!("cannot tell the edge's host from the server URL {url:?}; give --public-url as scheme://host[:port]")
    })?;
    Ok(format!("{host}:{}", edge.port()))
}

/// `HOST:PORT` agents reach the gateway bound at `bound` at: the host of
/// the public URL if given, else like the edge's UDP port (its own IP when
/// specific, else the host of the server's URL).
fn gateway_authority(
    config: &Config,
    bound: SocketAddr,
    local_addr: SocketAddr,
) -> anyhow::Result<String> {
    if let Some(url) = &config.public_url {
        let host = url_host(url).with_context(|| {
            format!("cannot tell the gateway's host from the public URL {url:?}; give --public-url as scheme://host[:port]")
        })?;
        return Ok(format!("{host}:{}", bound.port()));
    }
    relay_udp(bound, &server_url(config, local_addr))
}

/// The gateway's TLS configuration from a PEM certificate chain and a PEM
/// private key (ring provider).
fn load_tls(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading the gateway certificate {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| {
            format!(
                "the gateway certificate {} is not a PEM certificate chain",
                cert.display()
            )
        })?;
    if certs.is_empty() {
        anyhow::bail!(
            "the gateway certificate {} holds no certificate (expected PEM `-----BEGIN CERTIFICATE-----` blocks)",
            cert.display()
        );
    }
    let private = PrivateKeyDer::from_pem_file(key).with_context(|| {
        format!(
            "reading the gateway's private key {} (expected one PEM private key)",
            key.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("choosing TLS versions for the gateway")?
        .with_no_client_auth()
        .with_single_cert(certs, private)
        .with_context(|| {
            format!(
                "the gateway certificate {} and key {} do not make a usable pair",
                cert.display(),
                key.display()
            )
        })?;
    Ok(Arc::new(config))
}

/// Reads the relay secret at `path`, creating it (32 random bytes, 0600) if missing.
fn load_or_create_relay_secret(path: &Path) -> anyhow::Result<[u8; 32]> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let len = bytes.len();
            bytes.try_into().map_err(|_| {
                anyhow::anyhow!(
                    "{} is corrupt: expected 32 bytes, found {len}; delete it to make a new one (nodes get new relay tokens when they reconnect)",
                    path.display()
                )
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut secret = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut secret);
            write_secret_bytes(path, &secret)?;
            tracing::info!(path = %path.display(), "created the relay secret");
            Ok(secret)
        }
        Err(e) => Err(e).with_context(|| format!("reading the relay secret {}", path.display())),
    }
}

/// Writes `secret` plus a newline to `path` with mode 0600, atomically.
fn write_secret_file(path: &Path, secret: &str) -> anyhow::Result<()> {
    write_secret_bytes(path, format!("{secret}\n").as_bytes())
}

/// Writes `bytes` to `path` with mode 0600, atomically.
fn write_secret_bytes(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("moving {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_host_comes_from_the_bind_address_or_the_url() {
        let edge = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            relay_udp(edge("198.18.0.1:3478"), "https://x.example").unwrap(),
            "198.18.0.1:3478"
        );
        assert_eq!(
            relay_udp(
                edge("0.0.0.0:3478"),
                "https://user@mesh.example.com:8443/base"
            )
            .unwrap(),
            "mesh.example.com:3478"
        );
        assert_eq!(
            relay_udp(edge("[::]:3478"), "http://[fd00::1]:8080").unwrap(),
            "[fd00::1]:3478"
        );
        assert_eq!(
            relay_udp(edge("0.0.0.0:9"), "http://127.0.0.1:8080").unwrap(),
            "127.0.0.1:9"
        );
        assert!(relay_udp(edge("0.0.0.0:9"), "https://").is_err());
    }

    #[test]
    fn gateway_tls_files_are_checked() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let cert = fixtures.join("gateway-cert.pem");
        let key = fixtures.join("gateway-key.pem");
        load_tls(&cert, &key).expect("a matching pair loads");
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = format!("{:#}", load_tls(&missing, &key).unwrap_err());
        assert!(err.contains("missing.pem"), "{err}");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let err = format!("{:#}", load_tls(&junk, &key).unwrap_err());
        assert!(err.contains("holds no certificate"), "{err}");
        let err = format!("{:#}", load_tls(&cert, &junk).unwrap_err());
        assert!(err.contains("private key"), "{err}");
        let other = fixtures.join("other-key.pem");
        let err = format!("{:#}", load_tls(&cert, &other).unwrap_err());
        assert!(err.contains("do not make a usable pair"), "{err}");
    }

    #[tokio::test]
    async fn gateway_url_and_listener() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let dir = tempfile::tempdir().unwrap();
        let config = |gateway_listen, gateway_tls, public_url| Config {
            data_dir: dir.path().to_path_buf(),
            listen: "127.0.0.1:0".parse().unwrap(),
            public_url,
            edge_udp: None,
            dns_suffix: DEFAULT_DNS_SUFFIX.into(),
            flow_retention: flows::DEFAULT_FLOW_RETENTION,
            gateway_listen,
            gateway_tls,
        };
        let tls = Some((
            fixtures.join("gateway-cert.pem"),
            fixtures.join("gateway-key.pem"),
        ));
        let s = Server::start(config(
            Some("127.0.0.1:0".parse().unwrap()),
            tls.clone(),
            None,
        ))
        .await
        .unwrap();
        let port = s.gateway_addr().unwrap().port();
        assert_eq!(
            s.gateway_url().unwrap(),
            format!("https://127.0.0.1:{port}")
        );
        // The port is taken now: a second server says so.
        let err = Server::start(config(
            Some(s.gateway_addr().unwrap()),
            None,
            Some("https://edge.example.com".into()),
        ))
        .await
        .err()
        .expect("the port is taken");
        assert!(format!("{err:#}").contains("--gateway-listen"), "{err:#}");
        drop(s);
        let s = Server::start(config(
            Some("0.0.0.0:0".parse().unwrap()),
            None,
            Some("https://edge.example.com:9000/x".into()),
        ))
        .await
        .unwrap();
        let port = s.gateway_addr().unwrap().port();
        assert_eq!(
            s.gateway_url().unwrap(),
            format!("http://edge.example.com:{port}")
        );
        drop(s);
        let err = Server::start(config(None, tls, None))
            .await
            .err()
            .expect("TLS without a gateway is refused");
        assert!(format!("{err:#}").contains("--gateway-listen"), "{err:#}");
        let s = Server::start(config(None, None, None)).await.unwrap();
        assert!(s.gateway().is_none() && s.gateway_url().is_none());
    }

    #[test]
    fn relay_secret_is_created_once_and_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(RELAY_SECRET_FILE);
        let a = load_or_create_relay_secret(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_or_create_relay_secret(&path).unwrap(), a);
        std::fs::write(&path, b"short").unwrap();
        let err = load_or_create_relay_secret(&path).unwrap_err();
        assert!(format!("{err:#}").contains("expected 32 bytes"), "{err:#}");
    }
}
