//! The control plane's side of the edge relay: relay credentials in network
//! maps, and the TCP relay — a WebSocket at `/api/v1/relay` for nodes whose
//! UDP is blocked, carrying the same binary frames as the edge's UDP port.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use trellis_edge::RelayHub;
use trellis_proto::{NodeKey, RelayInfo};

use crate::api::AppState;
use crate::store::Node;
use crate::stream::{close, CLOSE_GOING_AWAY, CLOSE_NORMAL, CLOSE_POLICY};

/// How often the relay WebSocket pings its node.
pub const PING_INTERVAL: Duration = Duration::from_secs(10);
/// A relay WebSocket silent for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Path of the TCP relay on the HTTP port.
pub const RELAY_WS_PATH: &str = "/api/v1/relay";
/// Lifetime of a relay token.
pub const RELAY_TOKEN_TTL_SECS: i64 = 24 * 3600;
/// How often each open control stream gets a fresh relay token.
pub const RELAY_REFRESH: Duration = Duration::from_secs(3600);

/// The relay hub shared by the edge's UDP port and the WebSocket relay, and
/// where nodes find the edge.
pub struct Relay {
    pub hub: Arc<RelayHub>,
    /// `HOST:PORT` of the edge's UDP port; None when this server runs no edge.
    pub udp: Option<String>,
}

impl Relay {
    /// The relay credential of `key` in `account_id` at unix time `now`;
    /// None when no edge runs.
    pub fn info(&self, account_id: i64, key: &NodeKey, now: i64) -> Option<RelayInfo> {
        let udp = self.udp.clone()?;
        let expires_at = now.saturating_add(RELAY_TOKEN_TTL_SECS);
        Some(RelayInfo {
            udp,
            ws_path: RELAY_WS_PATH.to_string(),
            token: self.hub.issue_token(account_id, &key.0, expires_at),
            expires_at,
        })
    }
}

/// Runs the relay WebSocket of `node` (already authenticated) until it ends.
pub async fn run(state: AppState, node: Node, mut ws: WebSocket) {
    let key = node.public_key.0;
    let hub = state.relay.hub.clone();
    let (conn_id, frames) = match hub.attach_ws(node.account_id, &key) {
        Ok(x) => x,
        Err(e) => {
            close(&mut ws, CLOSE_POLICY, &e.to_string()).await;
            return;
        }
    };
    tracing::debug!(node = %node.name, "relay WebSocket attached");
    let mut shutdown = state.hub.shutdown_signal();
    let result = pump(&hub, &key, &mut ws, frames, &mut shutdown).await;
    hub.detach_ws(&key, conn_id);
    match result {
        Ok(()) => tracing::debug!(node = %node.name, "relay WebSocket closed"),
        Err(e) => {
            tracing::debug!(node = %node.name, error = %format!("{e:#}"), "relay WebSocket failed")
        }
    }
}

/// Sends one message; a node that stops reading for IDLE_TIMEOUT is given up on
/// (frames for it meanwhile are dropped by the hub, which never waits).
async fn send(ws: &mut WebSocket, msg: Message) -> anyhow::Result<()> {
    tokio::time::timeout(IDLE_TIMEOUT, ws.send(msg))
        .await
        .context("the node stopped reading from the relay")?
        .context("sending to the node")
}

async fn pump(
    hub: &RelayHub,
    key: &[u8; 32],
    ws: &mut WebSocket,
    mut frames: mpsc::Receiver<Vec<u8>>,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut ping = tokio::time::interval_at(Instant::now() + PING_INTERVAL, PING_INTERVAL);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            msg = ws.recv() => {
                let msg = match msg {
                    None => return Ok(()),
                    Some(Err(e)) => return Err(e).context("reading from the node"),
                    Some(Ok(m)) => m,
                };
                last_heard = Instant::now();
                match msg {
                    Message::Binary(frame) => {
                        let outcome = hub.handle_ws_frame(std::time::Instant::now(), key, &frame);
                        tracing::trace!(?outcome, "relay frame from a WebSocket");
                    }
                    Message::Close(_) => return Ok(()),
                    _ => {}
                }
            }
            frame = frames.recv() => match frame {
                Some(frame) => send(ws, Message::Binary(frame.into())).await?,
                None => {
                    close(
                        ws,
                        CLOSE_NORMAL,
                        "relay session ended: the node was removed or connected to the relay again",
                    )
                    .await;
                    return Ok(());
                }
            },
            _ = ping.tick() => {
                if last_heard.elapsed() >= IDLE_TIMEOUT {
                    close(ws, CLOSE_GOING_AWAY, "no traffic for 30 s").await;
                    return Ok(());
                }
                send(ws, Message::Ping(Bytes::new())).await?;
            }
            _ = shutdown.changed() => {
                close(ws, CLOSE_GOING_AWAY, "server shutting down").await;
                return Ok(());
            }
        }
    }
}

/// Pairs of nodes of `nodes` that the relay must keep apart under `filter`:
/// both directions of every pair of which neither may reach the other on any
/// protocol or port. Nodes that advertise subnets are left out (their
/// traffic also comes from and goes to LAN addresses the pair check cannot
/// see), so the relay never drops what a node's own filter would allow.
pub fn blocked_pairs(
    nodes: &[Node],
    routers: &std::collections::HashSet<i64>,
    filter: &trellis_policy::Filter,
) -> std::collections::HashSet<([u8; 32], [u8; 32])> {
    let mut out = std::collections::HashSet::new();
    // A disabled node is kept apart from everyone.
    for d in nodes.iter().filter(|n| n.disabled) {
        for o in nodes.iter().filter(|n| n.id != d.id) {
            out.insert((d.public_key.0, o.public_key.0));
            out.insert((o.public_key.0, d.public_key.0));
        }
    }
    let plain: Vec<&Node> = nodes
        .iter()
        .filter(|n| !routers.contains(&n.id) && !n.disabled)
        .collect();
    for (i, a) in plain.iter().enumerate() {
        for b in &plain[i + 1..] {
            if !filter.may_talk(a.ip, b.ip) && !filter.may_talk(b.ip, a.ip) {
                out.insert((a.public_key.0, b.public_key.0));
                out.insert((b.public_key.0, a.public_key.0));
            }
        }
    }
    out
}

/// Keeps the relay's blocked pairs in step with each account's policy and
/// nodes: at start for every account, then after every change of an account
/// (the same notifications that push network maps).
pub fn spawn_policy_sync(state: AppState) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut changes = state.hub.subscribe();
        // What each account's pairs were computed from, to skip recomputing
        // on changes that do not matter (a node's endpoints, say).
        let mut last: std::collections::HashMap<i64, u64> = std::collections::HashMap::new();
        let accounts = match state.store.list_accounts().await {
            Ok(a) => a.into_iter().map(|a| a.id).collect::<Vec<_>>(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list accounts for the relay's policy");
                Vec::new()
            }
        };
        for id in accounts {
            sync_account(&state, id, &mut last).await;
        }
        loop {
            match changes.recv().await {
                Ok(id) => sync_account(&state, id, &mut last).await,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    last.clear();
                    if let Ok(accounts) = state.store.list_accounts().await {
                        for a in accounts {
                            sync_account(&state, a.id, &mut last).await;
                        }
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    })
}

async fn sync_account(
    state: &AppState,
    account_id: i64,
    last: &mut std::collections::HashMap<i64, u64>,
) {
    use std::hash::{Hash, Hasher};
    let result: anyhow::Result<()> = async {
        let Some(account) = state.store.account_by_id(account_id).await? else {
            state
                .relay
                .hub
                .set_blocked_pairs(account_id, Default::default());
            return Ok(());
        };
        let nodes = state.store.list_nodes(account_id).await?;
        let routers: std::collections::HashSet<i64> = state
            .store
            .list_routes(account_id)
            .await?
            .iter()
            .map(|r| r.node_id)
            .collect();
        let filter = crate::policy::effective_filter(&state.store, &account, &nodes).await?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        filter.as_ref().map(|(v, _)| *v).hash(&mut h);
        for n in &nodes {
            (n.id, n.ip, &n.public_key.0, &n.tags, n.disabled).hash(&mut h);
        }
        let mut r: Vec<i64> = routers.iter().copied().collect();
        r.sort_unstable();
        r.hash(&mut h);
        let key = h.finish();
        if last.get(&account_id) == Some(&key) {
            return Ok(());
        }
        let filter = match &filter {
            Some((_, spec)) => trellis_policy::Filter::compile(spec),
            None => trellis_policy::Filter::allow_all(),
        };
        let pairs = blocked_pairs(&nodes, &routers, &filter);
        tracing::debug!(account = %account.name, pairs = pairs.len(), "relay policy updated");
        state.relay.hub.set_blocked_pairs(account_id, pairs);
        last.insert(account_id, key);
        Ok(())
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(account_id, error = %format!("{e:#}"), "cannot update the relay's policy");
    }
}
