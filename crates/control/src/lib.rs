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
//! })
//! .await?;
//! println!("{}", server.url());
//! server.serve(async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```

pub mod api;
pub mod map;
pub mod store;
pub mod stream;

use std::fs::{DirBuilder, OpenOptions};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

pub use api::ApiDoc;
pub use store::Store;

use crate::api::{now, AppState};
use crate::map::Hub;

/// Name of the database file inside the data directory.
pub const DB_FILE: &str = "trellis.db";
/// Name of the operator key file inside the data directory.
pub const ADMIN_KEY_FILE: &str = "admin.key";

/// How to run the control plane.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the database and admin.key live; created (0700) if missing.
    pub data_dir: PathBuf,
    /// Address of the HTTP listener (port 0 picks a free port).
    pub listen: SocketAddr,
    /// URL under which users and nodes reach this server, if not the listen address.
    pub public_url: Option<String>,
}

/// A started control plane: database open, listener bound, not yet serving.
pub struct Server {
    config: Config,
    listener: TcpListener,
    local_addr: SocketAddr,
    state: AppState,
}

impl Server {
    /// Creates data_dir (0700) if needed, opens DATA_DIR/trellis.db (SQLite, WAL,
    /// foreign keys, busy_timeout 5 s), runs migrations, creates account `default`
    /// on first start, writes an operator API key to DATA_DIR/admin.key (0600) if
    /// that file does not exist, and binds the TCP listener.
    pub async fn start(config: Config) -> anyhow::Result<Server> {
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

        let listener = TcpListener::bind(config.listen).await.with_context(|| {
            format!(
                "listening on {} (is another server running there?)",
                config.listen
            )
        })?;
        let local_addr = listener
            .local_addr()
            .context("reading the listener's address")?;
        Ok(Server {
            config,
            listener,
            local_addr,
            state: AppState {
                store,
                hub: Arc::new(Hub::new()),
            },
        })
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// public_url if given, else http://<listen addr> (127.0.0.1 when bound to all interfaces).
    pub fn url(&self) -> String {
        if let Some(url) = &self.config.public_url {
            return url.trim_end_matches('/').to_string();
        }
        let mut addr = self.local_addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
        format!("http://{addr}")
    }

    /// Where the operator API key is kept.
    pub fn admin_key_path(&self) -> PathBuf {
        self.config.data_dir.join(ADMIN_KEY_FILE)
    }

    /// Serves until `shutdown` resolves, then closes every control stream and stops.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let hub = self.state.hub.clone();
        let hub_after = self.state.hub.clone();
        let store = self.state.store.clone();
        let app = api::router(self.state);
        tracing::info!(addr = %self.local_addr, "control plane listening");
        axum::serve(
            self.listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
            shutdown.await;
            hub.shutdown();
        })
        .await
        .context("serving HTTP")?;
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

/// Writes `secret` plus a newline to `path` with mode 0600, atomically.
fn write_secret_file(path: &Path, secret: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("key.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(format!("{secret}\n").as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("moving {} to {}", tmp.display(), path.display()))?;
    Ok(())
}
