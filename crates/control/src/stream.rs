//! One node's control stream: wait for Hello, send the full map, then push
//! deltas whenever the account changes, until the node goes away.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::time::{Instant, MissedTickBehavior};
use trellis_proto::{NetworkMap, NodeMessage, PeerPath, ServerMessage};

use crate::api::{now, AppState};
use crate::map::{build_map, AccountView, Control, Sent};
use crate::mesh::{dns_config, filter_routes, routes_by_node};
use crate::relay::RELAY_REFRESH;
use crate::store::{HelloInfo, Node};

/// How long a new connection may take to say Hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the server pings (the node's WebSocket answers on its own).
pub const PING_INTERVAL: Duration = Duration::from_secs(3);
/// A stream silent for this long is closed, and its node goes offline: a
/// dead node's subnets fail over to another router within this time.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(9);

pub(crate) const CLOSE_NORMAL: u16 = 1000;
pub(crate) const CLOSE_GOING_AWAY: u16 = 1001;
pub(crate) const CLOSE_POLICY: u16 = 1008;

/// Runs the stream of `node` (already authenticated) until it ends.
pub async fn run(state: AppState, node: Node, observed: IpAddr, mut ws: WebSocket) {
    match serve(&state, &node, observed, &mut ws).await {
        Ok(()) => tracing::debug!(node = %node.name, "control stream closed"),
        Err(e) => {
            tracing::warn!(node = %node.name, error = %format!("{e:#}"), "control stream failed")
        }
    }
}

pub(crate) async fn close(ws: &mut WebSocket, code: u16, reason: &str) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    // The peer may already be gone; nothing to do about it then.
    let _ = ws.send(Message::Close(Some(frame))).await;
}

async fn send(ws: &mut WebSocket, msg: &ServerMessage) -> anyhow::Result<()> {
    let text = serde_json::to_string(msg).context("encoding a server message")?;
    send_raw(ws, Message::Text(text.into())).await
}

/// Sends one message; a node that stops reading for IDLE_TIMEOUT is given up on.
async fn send_raw(ws: &mut WebSocket, msg: Message) -> anyhow::Result<()> {
    tokio::time::timeout(IDLE_TIMEOUT, ws.send(msg))
        .await
        .context("the node stopped reading its control stream")?
        .context("sending to the node")
}

/// Waits for the first Hello. None if the node closed first.
async fn wait_hello(ws: &mut WebSocket) -> anyhow::Result<Option<NodeMessage>> {
    loop {
        match ws.recv().await {
            None | Some(Ok(Message::Close(_))) => return Ok(None),
            Some(Err(e)) => return Err(e).context("reading the node's hello"),
            Some(Ok(Message::Text(t))) => match serde_json::from_str::<NodeMessage>(&t) {
                Ok(m @ NodeMessage::Hello { .. }) => return Ok(Some(m)),
                Ok(_) => tracing::debug!("ignoring a message before hello"),
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring a malformed message before hello");
                }
            },
            Some(Ok(_)) => {}
        }
    }
}

/// At most this many of a node's own addresses are kept.
const MAX_LOCAL_ADDRS: usize = 32;

fn hello_info(node: &str, msg: NodeMessage, observed: IpAddr) -> HelloInfo {
    let NodeMessage::Hello {
        listen_port,
        mut local_addrs,
        reflexive,
        advertise_routes,
        os,
        version,
    } = msg
    else {
        unreachable!("hello_info is only given hellos");
    };
    local_addrs.truncate(MAX_LOCAL_ADDRS);
    HelloInfo {
        advertise_routes: filter_routes(node, &advertise_routes),
        reflexive: reflexive.map(|a| SocketAddr::new(a.ip().to_canonical(), a.port())),
        listen_port,
        local_addrs,
        observed_ip: observed.to_canonical(),
        os: os.chars().take(64).collect(),
        version: version.chars().take(64).collect(),
    }
}

/// At most this many peers of one node's report of its paths are accepted.
pub const MAX_PEER_PATHS: usize = 1000;
/// Longest peer name and path name kept from such a report.
const MAX_PEER_PATH_FIELD: usize = 64;

/// Checks and tidies a node's report of its paths: a report naming more
/// than [`MAX_PEER_PATHS`] peers is refused whole (the last good one stays);
/// over-long strings are cut, and sorted by peer name.
fn peer_paths(mut peers: Vec<PeerPath>) -> Result<Vec<PeerPath>, String> {
    if peers.len() > MAX_PEER_PATHS {
        return Err(format!(
            "{} peers, more than the {MAX_PEER_PATHS} accepted",
            peers.len()
        ));
    }
    for p in &mut peers {
        if p.name.chars().count() > MAX_PEER_PATH_FIELD {
            p.name = p.name.chars().take(MAX_PEER_PATH_FIELD).collect();
        }
        if p.path.chars().count() > MAX_PEER_PATH_FIELD {
            p.path = p.path.chars().take(MAX_PEER_PATH_FIELD).collect();
        }
    }
    peers.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(peers)
}

/// Everything the maps of `account_id` are made of, now; None if the account is gone.
pub async fn account_view(
    state: &AppState,
    account_id: i64,
) -> anyhow::Result<Option<AccountView>> {
    let Some(account) = state
        .store
        .account_by_id(account_id)
        .await
        .context("loading the node's account")?
    else {
        return Ok(None);
    };
    // Who is online is read before the nodes: a node's Hello is stored before
    // it counts as online, so a node seen online here has its endpoints in the
    // rows read below (never "online without endpoints" in a pushed map).
    let online = state.hub.online_in(account.id);
    let nodes = state
        .store
        .list_nodes(account.id)
        .await
        .context("loading the account's nodes")?;
    let approved = state
        .store
        .approved_routes(account.id)
        .await
        .context("loading the account's routes")?;
    let records = state
        .store
        .dns_records(account.id)
        .await
        .context("loading the account's DNS records")?;
    // A disabled mesh node carries no subnet: the next one takes over.
    let usable: HashSet<i64> = online
        .iter()
        .copied()
        .filter(|id| nodes.iter().any(|n| n.id == *id && !n.disabled))
        .collect();
    let primaries = state.hub.primaries(account.id, &approved, &usable);
    let dns = dns_config(&account, &nodes, &records, &state.dns_suffix);
    let bindings = state
        .store
        .live_bindings(account.id, now())
        .await
        .context("loading the account's bindings")?;
    let filter = crate::policy::effective_filter_with(&state.store, &account, &nodes, &bindings)
        .await
        .context("loading the account's policy")?
        .map(|(_, spec)| spec);
    let gateway = crate::bindings::gateway_member(state.gateway.as_deref(), &account, &bindings);
    Ok(Some(AccountView {
        account,
        nodes,
        online,
        routes: routes_by_node(&primaries),
        dns: Some(dns),
        filter,
        bindings,
        gateway,
    }))
}

/// The current map of this node, or None if the node is gone.
async fn current_map(state: &AppState, node: &Node) -> anyhow::Result<Option<NetworkMap>> {
    Ok(account_view(state, node.account_id)
        .await?
        .and_then(|view| build_map(&view, node.id)))
}

const REMOVED_REASON: &str = "this node was removed from the network by an admin";

async fn serve(
    state: &AppState,
    node: &Node,
    observed: IpAddr,
    ws: &mut WebSocket,
) -> anyhow::Result<()> {
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, wait_hello(ws)).await {
        Err(_) => {
            close(ws, CLOSE_POLICY, "expected a hello message within 10 s").await;
            return Ok(());
        }
        Ok(r) => match r? {
            Some(h) => h,
            None => return Ok(()),
        },
    };

    // Subscribe before anything changes, so no change is missed.
    let mut changes = state.hub.subscribe();
    let mut shutdown = state.hub.shutdown_signal();

    if !state
        .store
        .update_hello(node.id, &hello_info(&node.name, hello, observed), now())
        .await
        .context("storing the node's hello")?
    {
        send(
            ws,
            &ServerMessage::Removed {
                reason: REMOVED_REASON.into(),
            },
        )
        .await?;
        close(ws, CLOSE_NORMAL, "removed").await;
        return Ok(());
    }
    let (conn_id, mut control) = state.hub.register(node.id, node.account_id);
    state.hub.notify(node.account_id);
    tracing::info!(node = %node.name, %observed, "node connected");

    let result = connected(
        state,
        node,
        conn_id,
        observed,
        ws,
        &mut changes,
        &mut shutdown,
        &mut control,
    )
    .await;

    if state.hub.unregister(node.id, conn_id) {
        state.hub.probes.node_gone(node.id);
        if let Err(e) = state.store.touch_last_seen(node.id, now()).await {
            tracing::warn!(node = %node.name, error = %e, "could not record last_seen");
        }
        state.hub.notify(node.account_id);
        tracing::info!(node = %node.name, "node disconnected");
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn connected(
    state: &AppState,
    node: &Node,
    conn_id: u64,
    observed: IpAddr,
    ws: &mut WebSocket,
    changes: &mut tokio::sync::broadcast::Receiver<i64>,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
    control: &mut tokio::sync::mpsc::UnboundedReceiver<Control>,
) -> anyhow::Result<()> {
    let account_id = node.account_id;
    let Some(mut map) = current_map(state, node).await? else {
        send(
            ws,
            &ServerMessage::Removed {
                reason: REMOVED_REASON.into(),
            },
        )
        .await?;
        close(ws, CLOSE_NORMAL, "removed").await;
        return Ok(());
    };
    map.relay = state.relay.info(node.account_id, &node.public_key, now());
    send(ws, &ServerMessage::Map(map.clone())).await?;
    let mut sent = Sent::new(&map);
    let mut relay_refresh = tokio::time::interval_at(Instant::now() + RELAY_REFRESH, RELAY_REFRESH);
    relay_refresh.set_missed_tick_behavior(MissedTickBehavior::Delay);

    let mut ping = tokio::time::interval_at(Instant::now() + PING_INTERVAL, PING_INTERVAL);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Anything from the node (a pong included) pushes this back.
    let idle = tokio::time::sleep(IDLE_TIMEOUT);
    tokio::pin!(idle);

    loop {
        tokio::select! {
            msg = ws.recv() => {
                let msg = match msg {
                    None => return Ok(()),
                    Some(Err(e)) => return Err(e).context("reading from the node"),
                    Some(Ok(m)) => m,
                };
                idle.as_mut().reset(Instant::now() + IDLE_TIMEOUT);
                match msg {
                    Message::Close(_) => return Ok(()),
                    Message::Text(t) => match serde_json::from_str::<NodeMessage>(&t) {
                        Ok(hello @ NodeMessage::Hello { .. }) => {
                            let stored = state
                                .store
                                .update_hello(node.id, &hello_info(&node.name, hello, observed), now())
                                .await
                                .context("storing the node's hello")?;
                            if stored {
                                state.hub.notify(account_id);
                            }
                        }
                        Ok(NodeMessage::Flows { seq, records }) => {
                            // Acknowledged only once durable. A batch refused for
                            // its content is acknowledged too (a resend cannot fix
                            // it, and it must not block the node's queue for ever);
                            // a store error is not, so the node sends it again.
                            match crate::flows::ingest(state, node, seq, &records).await {
                                Ok(outcome) => {
                                    tracing::debug!(node = %node.name, seq, ?outcome, "flow batch");
                                    send(ws, &ServerMessage::FlowsAck { seq }).await?;
                                }
                                Err(e @ crate::flows::IngestError::Refused(_)) => {
                                    tracing::warn!(node = %node.name, seq, error = %e, "flow batch refused and dropped");
                                    send(ws, &ServerMessage::FlowsAck { seq }).await?;
                                }
                                Err(e) => {
                                    tracing::warn!(node = %node.name, seq, error = %e, "flow batch not stored; the node will send it again");
                                }
                            }
                        }
                        Ok(NodeMessage::ProbeResult { id, ok, rtt_ms, path, error }) => {
                            state.hub.probes.complete(node.id, id, crate::probe::ProbeReply { ok, rtt_ms, path, error });
                        }
                        Ok(NodeMessage::PeerPaths { peers }) => match peer_paths(peers) {
                            Ok(paths) => state.hub.set_peer_paths(node.id, conn_id, paths),
                            Err(e) => {
                                tracing::warn!(node = %node.name, error = %e, "ignoring a report of peer paths");
                            }
                        },
                        Err(e) => {
                            tracing::warn!(node = %node.name, error = %e, "ignoring a malformed message");
                        }
                    },
                    _ => {}
                }
            }
            change = changes.recv() => {
                let mut relevant = match change {
                    Ok(id) => id == account_id,
                    Err(RecvError::Lagged(_)) => true,
                    Err(RecvError::Closed) => return Ok(()),
                };
                // Coalesce a burst of changes into one recomputation.
                loop {
                    match changes.try_recv() {
                        Ok(id) => relevant |= id == account_id,
                        Err(TryRecvError::Lagged(_)) => relevant = true,
                        Err(TryRecvError::Empty) | Err(TryRecvError::Closed) => break,
                    }
                }
                if !relevant {
                    continue;
                }
                match current_map(state, node).await? {
                    None => {
                        send(ws, &ServerMessage::Removed { reason: REMOVED_REASON.into() }).await?;
                        close(ws, CLOSE_NORMAL, "removed").await;
                        return Ok(());
                    }
                    Some(next) => {
                        if let Some(delta) = sent.delta_to(&next) {
                            send(ws, &delta).await?;
                        }
                    }
                }
            }
            order = control.recv() => {
                match order {
                    Some(Control::Probe { id, target }) => {
                        send(ws, &ServerMessage::Probe { id, target }).await?;
                        continue;
                    }
                    Some(Control::Removed(reason)) => {
                        send(ws, &ServerMessage::Removed { reason }).await?;
                        close(ws, CLOSE_NORMAL, "removed").await;
                    }
                    Some(Control::Replaced) | None => {
                        close(ws, CLOSE_NORMAL, "replaced by a newer connection of the same node").await;
                    }
                }
                return Ok(());
            }
            _ = relay_refresh.tick() => {
                if let Some(relay) = state.relay.info(account_id, &node.public_key, now()) {
                    send(ws, &ServerMessage::Delta {
                        self_node: None,
                        upsert: Vec::new(),
                        remove: Vec::new(),
                        relay: Some(relay),
                        dns: None,
                        filter: None,
                    }).await?;
                }
            }
            _ = ping.tick() => {
                send_raw(ws, Message::Ping(Bytes::new())).await.context("pinging the node")?;
            }
            () = &mut idle => {
                tracing::info!(node = %node.name, "no answer to pings for {} s; closing its control stream", IDLE_TIMEOUT.as_secs());
                // The node is not answering: do not wait on it for the close frame.
                let _ = tokio::time::timeout(Duration::from_secs(1), close(ws, CLOSE_GOING_AWAY, "no answer to pings for 9 s")).await;
                return Ok(());
            }
            _ = shutdown.changed() => {
                close(ws, CLOSE_GOING_AWAY, "server shutting down").await;
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str, path: &str) -> PeerPath {
        PeerPath {
            name: name.into(),
            path: path.into(),
            last_handshake_secs: None,
        }
    }

    #[test]
    fn peer_path_reports_are_capped_cut_and_sorted() {
        let many = |n: usize| (0..n).map(|i| p(&format!("p{i}"), "direct")).collect();
        assert!(peer_paths(many(MAX_PEER_PATHS + 1)).is_err());
        assert_eq!(
            peer_paths(many(MAX_PEER_PATHS)).unwrap().len(),
            MAX_PEER_PATHS
        );
        let out = peer_paths(vec![
            p("b", "direct"),
            p(&"é".repeat(100), &"x".repeat(100)),
        ])
        .unwrap();
        assert_eq!(out[0].name, "b");
        assert_eq!(out[1].name.chars().count(), MAX_PEER_PATH_FIELD);
        assert_eq!(out[1].path.len(), MAX_PEER_PATH_FIELD);
    }
}
