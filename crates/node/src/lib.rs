//! The node agent: enrollment, the control-stream client that keeps the
//! network map current, the data plane, and the local status socket.

pub mod dns;
pub mod flows;
pub mod state;
pub mod sysconf;

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures_util::{SinkExt, StreamExt};
use ipnet::Ipv4Net;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use trellis_io::{DataPlane, DataPlaneConfig};
use trellis_proto::{
    ApiError, EnrollRequest, EnrollResponse, FlowRecord, NetworkMap, NodeKey, NodeMessage, Peer,
    PeerPath, ServerMessage, DEFAULT_MTU,
};
use trellis_tunnel::{PeerConfig, PublicKey, RelayStatus, StaticSecret, Tunnel};

use flows::{Flows, Outbox, SpoolLimits};
use state::{NodeState, StateDir};
use trellis_proto::{DnsConfig, RelayInfo};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// How long without any frame from the control plane before the stream is
/// considered dead (the server pings every 10 s).
const STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(35);
const RECONNECT_MIN: Duration = Duration::from_millis(500);
const RECONNECT_MAX: Duration = Duration::from_secs(3);
/// How often the agent looks for a change of its own addresses (roaming) and
/// of its reflexive address.
const LOCAL_ADDR_CHECK: Duration = Duration::from_secs(1);
/// How often the paths to peers are looked at; a report goes to the control
/// plane when they changed since the last one sent on this connection.
const PEER_PATHS_CHECK: Duration = Duration::from_secs(5);
/// A node re-sends its paths this often even when none changed (ages move).
const PEER_PATHS_REFRESH: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct JoinOptions {
    pub server: Option<String>,
    pub token: Option<String>,
    pub name: Option<String>,
    pub state_dir: PathBuf,
    pub ifname: String,
    pub listen_port: u16,
    /// Subnets to offer as a mesh node; `None` keeps what was advertised before.
    pub advertise_routes: Option<Vec<Ipv4Net>>,
    /// Masquerade traffic into advertised subnets; `None` keeps the earlier choice.
    pub snat: Option<bool>,
    /// Point the system resolver at the agent for the account's names.
    pub accept_dns: bool,
}

/// Enrolls if needed, brings the node up and runs it until `shutdown`
/// resolves, or the node is removed by an admin (an error).
pub async fn run(opts: JoinOptions, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let dir = StateDir::new(&opts.state_dir);
    let (mut state, key) = if dir.is_enrolled() {
        if opts.token.is_some() {
            eprintln!(
                "note: {} already holds an enrolled node; the token is not used. \
                 Use another --state-dir to enroll a new node.",
                dir.path().display()
            );
        }
        dir.load()?
    } else {
        let server = opts
            .server
            .clone()
            .context("this node is not enrolled yet: pass --server URL")?;
        let token = opts.token.clone().context(
            "this node is not enrolled yet: pass --token (create one with `trellis token create`)",
        )?;
        let routes = opts.advertise_routes.clone().unwrap_or_default();
        let (mut state, key) = enroll(
            &server,
            &token,
            opts.name.as_deref(),
            opts.listen_port,
            &routes,
        )
        .await?;
        state.snat = opts.snat.unwrap_or(true);
        dir.save_new(&state, &key)?;
        eprintln!(
            "enrolled as {} in account {} with IP {}",
            state.name, state.account, state.ip
        );
        (state, key)
    };
    let mut changed = false;
    if let Some(r) = &opts.advertise_routes {
        changed |= *r != state.advertise_routes;
        state.advertise_routes = r.clone();
    }
    if let Some(snat) = opts.snat {
        changed |= snat != state.snat;
        state.snat = snat;
    }
    if changed {
        dir.save(&state)?;
    }
    if let Some(server) = &opts.server {
        if server.trim_end_matches('/') != state.server {
            eprintln!(
                "note: using the server this node enrolled with ({}), not {server}",
                state.server
            );
        }
    }

    let listener = bind_status_socket(&dir).await?;
    let flows = Flows::open(dir.path().join("flows"), SpoolLimits::default()).await?;

    let tunnel = Tunnel::new(key.clone(), rand::random::<u64>());
    let dp = DataPlane::start(
        &DataPlaneConfig {
            ifname: opts.ifname.clone(),
            address: state.ip,
            prefix_len: state.cidr.prefix_len(),
            mtu: DEFAULT_MTU,
            listen_port: if opts.listen_port != 0 {
                opts.listen_port
            } else {
                state.listen_port
            },
        },
        tunnel,
    )?;
    if dp.listen_port() != state.listen_port {
        state.listen_port = dp.listen_port();
        dir.save(&state)?;
    }
    let agent = Arc::new(Agent {
        dp,
        public_key: *PublicKey::from(&key).as_bytes(),
        inner: Mutex::new(AgentInner {
            map: None,
            connected: false,
            relay: None,
        }),
        dir,
        ifname: opts.ifname.clone(),
        routing: Mutex::new(sysconf::Routing::new(&opts.ifname)),
        snat: state.snat,
        advertise_routes: state.advertise_routes.clone(),
        accept_dns: opts.accept_dns,
        dns: Arc::new(std::sync::RwLock::new(None)),
        resolver: tokio::sync::Mutex::new(None),
        roamed: tokio::sync::Notify::new(),
        flows,
    });
    if let Some(map) = agent.dir.load_map() {
        tracing::info!(
            peers = map.peers.len(),
            "using the last network map until the control plane answers"
        );
        let relay = map.relay.clone();
        let dns = map.dns.clone();
        agent.apply_full(map, false);
        agent.apply_relay(relay).await;
        agent.apply_dns(dns).await;
    }
    eprintln!(
        "trellis node {} is up: {} on {} (WireGuard UDP port {})",
        state.name,
        state.ip,
        opts.ifname,
        agent.dp.listen_port()
    );

    let status_task = tokio::spawn(serve_status(listener, agent.clone()));
    let relay_task = tokio::spawn(relay_tcp_loop(agent.clone(), state.clone()));
    let flows_task = tokio::spawn(flows_loop(agent.clone()));
    let result = tokio::select! {
        r = control_loop(agent.clone(), state.clone()) => r,
        _ = shutdown => Ok(()),
    };
    status_task.abort();
    relay_task.abort();
    flows_task.abort();
    let _ = flows_task.await;
    // Nothing collected in memory is lost on a clean stop: open flows end
    // ("shutdown"), and everything is spooled and sent after the next start.
    agent.dp.tunnel().close_all_flows(Instant::now());
    agent.flows.add_and_seal(collect_flows(&agent)).await;
    agent.dp.set_relay_tcp(None);
    agent.shutdown().await;
    let _ = std::fs::remove_file(agent.dir.socket_path());
    result
}

async fn enroll(
    server: &str,
    token: &str,
    name: Option<&str>,
    listen_port: u16,
    advertise_routes: &[Ipv4Net],
) -> anyhow::Result<(NodeState, StaticSecret)> {
    let server = server.trim_end_matches('/').to_string();
    if let Some(n) = name {
        trellis_proto::validate_name("node", n).map_err(|e| anyhow!(e))?;
    }
    let mut seed = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
    let key = StaticSecret::from(seed);
    let public = NodeKey(*PublicKey::from(&key).as_bytes());
    let req = EnrollRequest {
        token: token.trim().to_string(),
        public_key: public,
        name: name.map(str::to_string),
        hostname: hostname(),
        os: std::env::consts::OS.to_string(),
        version: VERSION.to_string(),
        advertise_routes: advertise_routes.to_vec(),
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()?;
    let resp = client
        .post(format!("{server}/api/v1/enroll"))
        .json(&req)
        .send()
        .await
        .with_context(|| format!("cannot reach the Trellis server at {server}"))?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        let msg = serde_json::from_str::<ApiError>(&text)
            .map(|e| e.error)
            .unwrap_or(text);
        bail!("enrollment refused ({status}): {msg}");
    }
    let r: EnrollResponse = resp
        .json()
        .await
        .context("the server's answer was not understood")?;
    Ok((
        NodeState {
            server,
            node_id: r.node_id,
            name: r.name,
            account: r.account,
            ip: r.ip,
            cidr: r.cidr,
            node_secret: r.node_secret,
            listen_port,
            advertise_routes: advertise_routes.to_vec(),
            snat: true,
        },
        key,
    ))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

struct Agent {
    dp: DataPlane,
    public_key: [u8; 32],
    inner: Mutex<AgentInner>,
    dir: StateDir,
    ifname: String,
    routing: Mutex<sysconf::Routing>,
    snat: bool,
    advertise_routes: Vec<Ipv4Net>,
    accept_dns: bool,
    /// The account's names, shared with the resolver task.
    dns: Arc<std::sync::RwLock<Option<DnsConfig>>>,
    /// The resolver task and what it changed on the system, once names arrived.
    resolver: tokio::sync::Mutex<Option<(tokio::task::JoinHandle<()>, sysconf::ResolverGuard)>>,
    /// Woken when this machine's addresses change, so that long-lived TCP
    /// connections bound to an old address are made again.
    roamed: tokio::sync::Notify,
    /// Finished flows waiting on disk for the control plane's acknowledgement.
    flows: Flows,
}

/// A node's name and overlay address.
type NameIp = (String, Ipv4Addr);

/// Finished flows since the last call, to be logged on the control plane.
fn collect_flows(agent: &Agent) -> Vec<FlowRecord> {
    let mut ended = Vec::new();
    agent.dp.tunnel().drain_flows(&mut ended);
    if ended.is_empty() {
        return Vec::new();
    }
    let (now, wall) = (Instant::now(), unix_ms());
    let at = |t: Instant| wall - now.saturating_duration_since(t).as_millis() as i64;
    // Names and addresses of this node and its peers, to tell flows that
    // went through a mesh node (one end on a subnet behind it).
    let (me, peers): (Option<NameIp>, HashMap<[u8; 32], NameIp>) = {
        let inner = agent.lock();
        match &inner.map {
            Some(m) => (
                Some((m.self_node.name.clone(), m.self_node.ip)),
                m.peers
                    .iter()
                    .map(|p| (p.public_key.0, (p.name.clone(), p.ip)))
                    .collect(),
            ),
            None => (None, HashMap::new()),
        }
    };
    ended
        .into_iter()
        .map(|f| {
            let out = matches!(f.direction, trellis_tunnel::FlowDirection::Out);
            let (local, remote) = if out { (f.src, f.dst) } else { (f.dst, f.src) };
            let via = match (peers.get(&f.peer), &me) {
                (Some((name, ip)), _) if remote != *ip => name.clone(),
                (_, Some((name, ip))) if local != *ip => name.clone(),
                _ => String::new(),
            };
            (f, via)
        })
        .map(|(f, via)| FlowRecord {
            via,
            start_ms: at(f.start),
            end_ms: at(f.end),
            proto: match f.proto {
                trellis_policy::PROTO_TCP => "tcp".into(),
                trellis_policy::PROTO_UDP => "udp".into(),
                trellis_policy::PROTO_ICMP => "icmp".into(),
                p => p.to_string(),
            },
            src_ip: f.src,
            src_port: f.src_port,
            dst_ip: f.dst,
            dst_port: f.dst_port,
            direction: f.direction.as_str().into(),
            packets_out: f.packets_out,
            bytes_out: f.bytes_out,
            packets_in: f.packets_in,
            bytes_in: f.bytes_in,
            path: f.path.kind().into(),
            decision: if f.allow { "allow" } else { "deny" }.into(),
            rule: f.rule.as_deref().unwrap_or("").into(),
            count: f.count,
            end_reason: f.end_reason.into(),
        })
        .collect()
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Every second, moves finished flows from the data plane into the spool
/// (sealed as a batch, which wakes the control stream to send it).
async fn flows_loop(agent: Arc<Agent>) {
    let mut tick = tokio::time::interval(flows::SEAL_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        agent.flows.add_and_seal(collect_flows(&agent)).await;
    }
}

struct AgentInner {
    map: Option<NetworkMap>,
    connected: bool,
    relay: Option<RelayInfo>,
}

fn peer_config(p: &Peer) -> PeerConfig {
    PeerConfig {
        public_key: p.public_key.0,
        name: p.name.clone(),
        allowed_ips: p.allowed_ips.clone(),
        endpoints: p.endpoints.clone(),
    }
}

impl Agent {
    fn lock(&self) -> std::sync::MutexGuard<'_, AgentInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn apply_full(&self, map: NetworkMap, persist: bool) {
        let configs: Vec<PeerConfig> = map
            .peers
            .iter()
            .filter(|p| p.public_key.0 != self.public_key)
            .map(peer_config)
            .collect();
        self.dp.tunnel().set_peers(Instant::now(), configs);
        self.apply_filter(map.filter.as_ref());
        if persist {
            if let Err(e) = self.dir.save_map(&map) {
                tracing::warn!(error = %e, "cannot cache the network map");
            }
        }
        self.sync_system(&map);
        self.lock().map = Some(map);
    }

    /// Kernel routes for subnets behind other mesh nodes, and forwarding into
    /// our own approved subnets.
    fn sync_system(&self, map: &NetworkMap) {
        let overlay = map.self_node.cidr;
        // Subnets we advertise ourselves are on our own LAN: never route them
        // into the tunnel (a standby mesh node keeps its connected route).
        let wanted: std::collections::BTreeSet<Ipv4Net> = map
            .peers
            .iter()
            .flat_map(|p| p.allowed_ips.iter().copied())
            .filter(|n| !overlay.contains(n))
            .filter(|n| {
                !self
                    .advertise_routes
                    .iter()
                    .any(|own| own.contains(n) || n.contains(own))
            })
            .collect();
        let mut r = self.routing.lock().unwrap_or_else(|e| e.into_inner());
        r.set_peer_routes(wanted);
        r.set_served(map.self_node.routes.clone(), overlay, self.snat);
    }

    /// Keeps the resolver's names current; on the first names, starts the
    /// resolver on our overlay address and points the system at it.
    async fn apply_dns(&self, cfg: Option<DnsConfig>) {
        let Some(cfg) = cfg else {
            return;
        };
        let domain = cfg.domain.clone();
        *self.dns.write().unwrap_or_else(|e| e.into_inner()) = Some(cfg);
        if !self.accept_dns {
            return;
        }
        let mut resolver = self.resolver.lock().await;
        if resolver.is_some() {
            return;
        }
        let ip = self.lock().map.as_ref().map(|m| m.self_node.ip);
        let Some(ip) = ip else {
            return;
        };
        let socket = match tokio::net::UdpSocket::bind((ip, 53)).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot serve DNS on {ip}:53; names will not resolve");
                return;
            }
        };
        match sysconf::ResolverGuard::install(self.dir.path(), &self.ifname, ip, &domain) {
            Ok((guard, upstreams)) => {
                let task = tokio::spawn(dns::serve(socket, self.dns.clone(), upstreams));
                *resolver = Some((task, guard));
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot point the system resolver at the agent")
            }
        }
    }

    /// Puts the machine back as it was: resolver, routes, forwarding.
    async fn shutdown(&self) {
        if let Some((task, guard)) = self.resolver.lock().await.take() {
            task.abort();
            drop(guard); // restores the resolver configuration
        }
        self.routing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .cleanup();
    }

    /// Points the tunnel at the edge's relay (resolving its host name).
    async fn apply_relay(&self, info: Option<RelayInfo>) {
        let Some(info) = info else {
            return;
        };
        let addr = match tokio::net::lookup_host(info.udp.as_str()).await {
            Ok(mut addrs) => addrs.find(|a| a.is_ipv4()),
            Err(e) => {
                tracing::warn!(edge = %info.udp, error = %e, "cannot resolve the edge; relaying over UDP is off");
                None
            }
        };
        if let Some(addr) = addr {
            self.dp.tunnel().set_relay(Some((addr, info.token.clone())));
        }
        self.lock().relay = Some(info);
    }

    /// Enforces the account's policy (its packet filter): only when it
    /// changed, since every change re-decides each open connection. A map
    /// without one (a server older than policies) leaves everything allowed.
    fn apply_filter(&self, spec: Option<&trellis_policy::FilterSpec>) {
        let Some(spec) = spec else {
            return;
        };
        let mut t = self.dp.tunnel();
        if t.filter().spec() == spec {
            return;
        }
        let filter = Arc::new(trellis_policy::Filter::compile(spec));
        t.set_filter(Instant::now(), filter);
        let stats = t.flow_stats();
        drop(t);
        tracing::info!(
            rules = spec.rules.len(),
            revoked = stats.revoked,
            "policy updated"
        );
    }

    fn apply_delta(
        &self,
        self_node: Option<trellis_proto::SelfNode>,
        upsert: Vec<Peer>,
        remove: Vec<NodeKey>,
        dns: Option<DnsConfig>,
        filter: Option<trellis_policy::FilterSpec>,
    ) {
        self.apply_filter(filter.as_ref());
        let now = Instant::now();
        {
            let mut t = self.dp.tunnel();
            for k in &remove {
                t.remove_peer(&k.0);
            }
            for p in upsert.iter().filter(|p| p.public_key.0 != self.public_key) {
                t.upsert_peer(now, peer_config(p));
            }
        }
        let snapshot = {
            let mut inner = self.lock();
            let Some(map) = inner.map.as_mut() else {
                return;
            };
            if let Some(s) = self_node {
                map.self_node = s;
            }
            map.peers.retain(|p| !remove.contains(&p.public_key));
            for p in upsert {
                match map.peers.iter_mut().find(|q| q.public_key == p.public_key) {
                    Some(q) => *q = p,
                    None => map.peers.push(p),
                }
            }
            if let Some(d) = dns {
                map.dns = Some(d);
            }
            if filter.is_some() {
                map.filter = filter;
            }
            map.clone()
        };
        self.sync_system(&snapshot);
        if let Err(e) = self.dir.save_map(&snapshot) {
            tracing::warn!(error = %e, "cannot cache the network map");
        }
    }

    fn status(&self, state: &NodeState) -> Status {
        let inner = self.lock();
        let online: HashMap<[u8; 32], bool> = inner
            .map
            .as_ref()
            .map(|m| m.peers.iter().map(|p| (p.public_key.0, p.online)).collect())
            .unwrap_or_default();
        let (name, ip, account) = match &inner.map {
            Some(m) => (
                m.self_node.name.clone(),
                m.self_node.ip,
                m.self_node.account.clone(),
            ),
            None => (state.name.clone(), state.ip, state.account.clone()),
        };
        let connected = inner.connected;
        drop(inner);
        let peers = self
            .dp
            .tunnel()
            .status(Instant::now())
            .into_iter()
            .map(|p| PeerStatusJson {
                name: p.name,
                ip: p
                    .allowed_ips
                    .first()
                    .map(|n| n.addr())
                    .unwrap_or(Ipv4Addr::UNSPECIFIED),
                public_key: NodeKey(p.public_key).to_string(),
                path: p.path.map(|x| x.kind()).unwrap_or("none").to_string(),
                endpoint: p.path.and_then(|x| x.endpoint()).map(|e| e.to_string()),
                last_handshake_secs: p.stats.since_last_handshake.map(|d| d.as_secs()),
                rx_bytes: p.stats.rx_bytes,
                tx_bytes: p.stats.tx_bytes,
                online: online.get(&p.public_key).copied().unwrap_or(false),
            })
            .collect();
        let (relay, reflexive) = {
            let t = self.dp.tunnel();
            let relay = match t.relay_status(Instant::now()) {
                RelayStatus::None => "none".to_string(),
                RelayStatus::Udp => "udp".to_string(),
                RelayStatus::Tcp => "tcp".to_string(),
                RelayStatus::Down => "down".to_string(),
                RelayStatus::Refused(r) => format!("refused: {r}"),
            };
            (relay, t.reflexive().map(|a| a.to_string()))
        };
        Status {
            relay,
            reflexive,
            name,
            ip,
            account,
            public_key: NodeKey(self.public_key).to_string(),
            interface: self.ifname.clone(),
            listen_port: self.dp.listen_port(),
            server: state.server.clone(),
            control: if connected {
                "connected"
            } else {
                "disconnected"
            },
            peers,
            flow_records_dropped: self.flows.records_dropped(),
            flow_batches_pending: self.flows.batches_pending(),
            data_plane: {
                let c = self.dp.counters();
                let get =
                    |x: &std::sync::atomic::AtomicU64| x.load(std::sync::atomic::Ordering::Relaxed);
                DataPlaneJson {
                    tun_packets: get(&c.tun_rx_packets),
                    udp_datagrams: get(&c.udp_rx_datagrams),
                    dropped: get(&c.dropped),
                    send_errors: get(&c.send_errors),
                    tun_handovers: get(&c.tun_handovers),
                }
            },
        }
    }
}

/// The JSON `trellis status --json` prints.
#[derive(Debug, Serialize)]
pub struct Status {
    pub name: String,
    pub ip: Ipv4Addr,
    pub account: String,
    pub public_key: String,
    pub interface: String,
    pub listen_port: u16,
    pub server: String,
    pub control: &'static str,
    /// The edge relay: none, udp, tcp, down, or "refused: <why>".
    pub relay: String,
    /// The address the edge sees this node's WireGuard socket at.
    pub reflexive: Option<String>,
    pub peers: Vec<PeerStatusJson>,
    /// Flow records deleted unsent because the spool was full (since start).
    pub flow_records_dropped: u64,
    /// Batches of flow records on disk, not yet acknowledged by the control plane.
    pub flow_batches_pending: u64,
    pub data_plane: DataPlaneJson,
}

/// The data plane's counters since the agent started.
#[derive(Debug, Serialize)]
pub struct DataPlaneJson {
    /// Packets read from the TUN device (to be encrypted).
    pub tun_packets: u64,
    /// Datagrams received on the WireGuard socket.
    pub udp_datagrams: u64,
    /// Packets dropped: no peer for the destination, refused by a policy,
    /// invalid or stale ciphertext, a failed TUN write.
    pub dropped: u64,
    /// Datagrams the kernel refused to send.
    pub send_errors: u64,
    /// Times a burst moved encryption onto the data plane's second thread.
    pub tun_handovers: u64,
}

impl Agent {
    /// The path in use to each peer now, sorted by name (what
    /// [`NodeMessage::PeerPaths`] reports).
    fn peer_paths(&self) -> Vec<PeerPath> {
        let mut out: Vec<PeerPath> = self
            .dp
            .tunnel()
            .status(Instant::now())
            .into_iter()
            .map(|p| PeerPath {
                name: p.name,
                path: p.path.map(|x| x.kind()).unwrap_or("none").to_string(),
                last_handshake_secs: p.stats.since_last_handshake.map(|d| d.as_secs()),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

#[derive(Debug, Serialize)]
pub struct PeerStatusJson {
    pub name: String,
    pub ip: Ipv4Addr,
    pub public_key: String,
    pub path: String,
    pub endpoint: Option<String>,
    pub last_handshake_secs: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub online: bool,
}

/// Why the control loop ended for good.
#[derive(Debug)]
enum Fatal {
    Removed(String),
    Unauthorized(String),
}

async fn control_loop(agent: Arc<Agent>, state: NodeState) -> anyhow::Result<()> {
    let mut backoff = RECONNECT_MIN;
    let mut outbox = Outbox::new(flows::IN_FLIGHT);
    loop {
        let started = Instant::now();
        outbox.reconnect();
        match stream_once(&agent, &state, &mut outbox).await {
            Ok(fatal) => {
                agent.lock().connected = false;
                return Err(match fatal {
                    Fatal::Removed(reason) => anyhow!(
                        "this node was removed from the network by an admin ({reason}); \
                         to join again, enroll with a new token and an empty --state-dir"
                    ),
                    Fatal::Unauthorized(msg) => anyhow!(
                        "the server refused this node's credentials: {msg}; \
                         it was probably deleted — enroll again with a new token and an empty --state-dir"
                    ),
                });
            }
            Err(e) => {
                agent.lock().connected = false;
                tracing::warn!(error = %format!("{e:#}"), "control stream lost; the mesh keeps running, reconnecting");
            }
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff = RECONNECT_MIN;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(RECONNECT_MAX);
    }
}

fn stream_url(server: &str) -> String {
    ws_url(server, "/api/v1/node/stream")
}

fn ws_url(server: &str, path: &str) -> String {
    let base = if let Some(rest) = server.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = server.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        format!("ws://{server}")
    };
    format!("{base}{path}")
}

fn hello(
    agent: &Agent,
    local_addrs: &[IpAddr],
    reflexive: Option<SocketAddr>,
) -> anyhow::Result<Message> {
    let m = NodeMessage::Hello {
        listen_port: agent.dp.listen_port(),
        local_addrs: local_addrs.to_vec(),
        reflexive,
        os: std::env::consts::OS.to_string(),
        version: VERSION.to_string(),
        advertise_routes: agent.advertise_routes.clone(),
    };
    Ok(Message::Text(serde_json::to_string(&m)?.into()))
}

/// One connection of the control stream. `Ok` only for a reason to stop for good.
async fn stream_once(
    agent: &Arc<Agent>,
    state: &NodeState,
    outbox: &mut Outbox,
) -> anyhow::Result<Fatal> {
    let mut req = stream_url(&state.server).into_client_request()?;
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", state.node_secret).parse()?,
    );
    let connect = tokio_tungstenite::connect_async(req);
    let (ws, _) = match tokio::time::timeout(Duration::from_secs(10), connect).await {
        Err(_) => bail!("connecting to {} timed out", state.server),
        Ok(Err(tungstenite::Error::Http(resp))) => {
            let status = resp.status();
            let body = resp
                .body()
                .as_ref()
                .and_then(|b| serde_json::from_slice::<ApiError>(b).ok())
                .map(|e| e.error)
                .unwrap_or_default();
            if status.as_u16() == 401 || status.as_u16() == 403 {
                return Ok(Fatal::Unauthorized(format!("{status} {body}")));
            }
            bail!("the server answered {status} {body}");
        }
        Ok(Err(e)) => return Err(e).with_context(|| format!("connecting to {}", state.server)),
        Ok(Ok(x)) => x,
    };
    let (mut tx, mut rx) = ws.split();
    let addrs = local_addrs(&agent.ifname);
    let mut reflexive = agent.dp.tunnel().reflexive();
    tx.send(hello(agent, &addrs, reflexive)?).await?;
    agent.lock().connected = true;
    tracing::info!(server = %state.server, "control stream connected");
    // Flow batches spooled while disconnected (or before a restart) go first.
    send_flows(agent, outbox, &mut tx).await?;
    let mut check = tokio::time::interval(LOCAL_ADDR_CHECK);
    check.tick().await;
    // Fires at once: the first report goes right after connecting.
    let mut paths_check = tokio::time::interval(PEER_PATHS_CHECK);
    paths_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut paths_sent: Option<(Vec<PeerPath>, Instant)> = None;
    // Answers to connection tests, which run beside the stream.
    let (probe_tx, mut probe_rx) = tokio::sync::mpsc::unbounded_channel::<NodeMessage>();
    loop {
        tokio::select! {
            _ = agent.flows.sealed().notified() => send_flows(agent, outbox, &mut tx).await?,
            Some(answer) = probe_rx.recv() => {
                tx.send(Message::Text(serde_json::to_string(&answer)?.into())).await?;
            }
            msg = tokio::time::timeout(STREAM_IDLE_TIMEOUT, rx.next()) => {
                let msg = match msg {
                    Err(_) => bail!("no word from the control plane for {STREAM_IDLE_TIMEOUT:?}"),
                    Ok(None) => bail!("the control plane closed the stream"),
                    Ok(Some(m)) => m?,
                };
                match msg {
                    Message::Text(t) => {
                        let m: ServerMessage = match serde_json::from_str(t.as_str()) {
                            Ok(m) => m,
                            Err(e) => {
                                tracing::warn!(error = %e, "ignoring a control message this version does not understand");
                                continue;
                            }
                        };
                        match m {
                            ServerMessage::Map(map) => {
                                tracing::info!(peers = map.peers.len(), "network map received");
                                let relay = map.relay.clone();
                                let dns = map.dns.clone();
                                agent.apply_full(map, true);
                                agent.apply_relay(relay).await;
                                agent.apply_dns(dns).await;
                            }
                            ServerMessage::Delta { self_node, upsert, remove, relay, dns, filter } => {
                                tracing::info!(upsert = upsert.len(), remove = remove.len(), "network map update");
                                agent.apply_delta(self_node, upsert, remove, dns.clone(), filter);
                                agent.apply_relay(relay).await;
                                agent.apply_dns(dns).await;
                            }
                            ServerMessage::FlowsAck { seq } => {
                                if agent.flows.ack(outbox, seq).await? {
                                    send_flows(agent, outbox, &mut tx).await?;
                                }
                            }
                            ServerMessage::Removed { reason } => return Ok(Fatal::Removed(reason)),
                            ServerMessage::Probe { id, target } => {
                                let agent = agent.clone();
                                let answers = probe_tx.clone();
                                tokio::spawn(async move {
                                    let answer = probe_peer(&agent, id, target).await;
                                    // The stream may be gone by now; the server then gives up on its own.
                                    let _ = answers.send(answer);
                                });
                            }
                        }
                    }
                    Message::Ping(p) => tx.send(Message::Pong(p)).await?,
                    Message::Close(_) => bail!("the control plane closed the stream"),
                    _ => {}
                }
            }
            _ = paths_check.tick() => {
                // Sent when a peer or its path changed, and at least once a
                // minute (the handshake ages move every second; they alone
                // are not worth a message every 5 s from every node).
                let paths = agent.peer_paths();
                let shape = |v: &[PeerPath]| {
                    v.iter().map(|p| (p.name.clone(), p.path.clone())).collect::<Vec<_>>()
                };
                let due = paths_sent.as_ref().is_none_or(|(sent, at)| {
                    shape(sent) != shape(&paths) || at.elapsed() >= PEER_PATHS_REFRESH
                });
                if due {
                    let m = NodeMessage::PeerPaths { peers: paths.clone() };
                    tx.send(Message::Text(serde_json::to_string(&m)?.into())).await?;
                    paths_sent = Some((paths, Instant::now()));
                }
            }
            _ = check.tick() => {
                let now = local_addrs(&agent.ifname);
                let mut changed = false;
                if now != addrs {
                    tracing::info!("local addresses changed (roaming); re-registering, re-probing, reconnecting");
                    agent.dp.tunnel().reregister_now(Instant::now());
                    agent.roamed.notify_waiters();
                    // This connection may be bound to an address that is gone:
                    // make a new one, which sends the new candidates first thing.
                    bail!("local addresses changed");
                }
                let r = agent.dp.tunnel().reflexive();
                if r != reflexive {
                    reflexive = r;
                    changed = true;
                }
                if changed {
                    tx.send(hello(agent, &addrs, reflexive)?).await?;
                }
            }
        }
    }
}

/// Sends the flow batches the window has room for, oldest first.
async fn send_flows<S>(agent: &Agent, outbox: &mut Outbox, tx: &mut S) -> anyhow::Result<()>
where
    S: futures_util::Sink<Message, Error = tungstenite::Error> + Unpin,
{
    for (seq, records) in agent.flows.next_batches(outbox).await? {
        let n = records.len();
        let m = NodeMessage::Flows { seq, records };
        tx.send(Message::Text(serde_json::to_string(&m)?.into()))
            .await?;
        tracing::debug!(seq, records = n, "flow records sent");
    }
    Ok(())
}

/// Keeps the TCP relay (a WebSocket to the edge on the server's HTTP port)
/// connected, so that a node whose UDP is blocked still reaches its peers.
async fn relay_tcp_loop(agent: Arc<Agent>, state: NodeState) {
    let mut backoff = RECONNECT_MIN;
    loop {
        let path = agent.lock().relay.as_ref().map(|r| r.ws_path.clone());
        let Some(path) = path else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let started = Instant::now();
        if let Err(e) = relay_tcp_once(&agent, &state, &path).await {
            tracing::debug!(error = %format!("{e:#}"), "TCP relay connection ended");
        }
        agent.dp.set_relay_tcp(None);
        if started.elapsed() > Duration::from_secs(10) {
            backoff = RECONNECT_MIN;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(RECONNECT_MAX);
    }
}

async fn relay_tcp_once(agent: &Arc<Agent>, state: &NodeState, path: &str) -> anyhow::Result<()> {
    let mut req = ws_url(&state.server, path).into_client_request()?;
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", state.node_secret).parse()?,
    );
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(req),
    )
    .await
    .context("connecting the TCP relay timed out")??;
    let (mut tx, mut rx) = ws.split();
    let (frames_tx, mut frames_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(1024);
    agent.dp.set_relay_tcp(Some(Box::new(move |frame: &[u8]| {
        // Full queue: drop, like a congested link; WireGuard and TCP recover.
        let _ = frames_tx.try_send(frame.to_vec());
    })));
    tracing::info!("TCP relay connected");
    loop {
        tokio::select! {
            f = frames_rx.recv() => match f {
                Some(f) => tx.send(Message::Binary(f.into())).await?,
                None => bail!("relay sink closed"),
            },
            _ = agent.roamed.notified() => bail!("local addresses changed"),
            m = tokio::time::timeout(STREAM_IDLE_TIMEOUT, rx.next()) => {
                match m.context("the TCP relay went silent")? {
                    None => bail!("the edge closed the TCP relay"),
                    Some(Err(e)) => return Err(e.into()),
                    Some(Ok(Message::Binary(b))) => agent.dp.handle_relay_tcp_frame(&b),
                    Some(Ok(Message::Ping(p))) => tx.send(Message::Pong(p)).await?,
                    Some(Ok(Message::Close(_))) => bail!("the edge closed the TCP relay"),
                    Some(Ok(_)) => {}
                }
            }
        }
    }
}

/// One line of `trellis ping` output, as JSON.
#[derive(Debug, Serialize)]
struct PingLine {
    seq: u32,
    peer: String,
    ip: Ipv4Addr,
    #[serde(skip_serializing_if = "Option::is_none")]
    rtt_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    endpoint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Pings a peer (by name or overlay IP) `count` times, writing one JSON line per reply.
async fn ping_peer(
    agent: &Agent,
    target: &str,
    count: u32,
    w: &mut (impl tokio::io::AsyncWrite + Unpin),
) -> anyhow::Result<()> {
    let peer = agent
        .dp
        .tunnel()
        .status(Instant::now())
        .into_iter()
        .find(|p| p.name == target || p.allowed_ips.iter().any(|n| n.addr().to_string() == target))
        .with_context(|| format!("no peer named or addressed {target:?}"))?;
    let ip = peer
        .allowed_ips
        .first()
        .map(|n| n.addr())
        .unwrap_or(Ipv4Addr::UNSPECIFIED);
    for seq in 0..count {
        let started = Instant::now();
        let mut line = PingLine {
            seq,
            peer: peer.name.clone(),
            ip,
            rtt_ms: None,
            path: None,
            endpoint: None,
            error: None,
        };
        match agent.dp.ping(&peer.public_key) {
            Err(e) => line.error = Some(e.to_string()),
            Ok(txid) => loop {
                if let Some(r) = agent.dp.ping_result(txid) {
                    line.rtt_ms = Some(r.rtt.as_secs_f64() * 1000.0);
                    line.path = Some(r.path.kind());
                    line.endpoint = r.path.endpoint().map(|e| e.to_string());
                    break;
                }
                if started.elapsed() > Duration::from_secs(2) {
                    line.error = Some("timeout".into());
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            },
        }
        w.write_all(serde_json::to_string(&line)?.as_bytes())
            .await?;
        w.write_all(b"\n").await?;
        if seq + 1 < count {
            tokio::time::sleep(Duration::from_secs(1).saturating_sub(started.elapsed())).await;
        }
    }
    Ok(())
}

/// How long a connection test may take on the node.
const PROBE_DEADLINE: Duration = Duration::from_secs(3);
/// How long one ping of a connection test waits before another is sent (the
/// first may be lost while the peers handshake).
const PROBE_RETRY: Duration = Duration::from_millis(700);
/// After an answer through the relay, how long a connection test keeps
/// pinging to see whether a direct path comes up.
const PROBE_DIRECT_GRACE: Duration = Duration::from_millis(1500);

/// A connection test the control plane asked for: pings the peer whose
/// overlay address is `target` until one answers or [`PROBE_DEADLINE`] passes.
async fn probe_peer(agent: &Agent, id: u64, target: Ipv4Addr) -> NodeMessage {
    let fail = |error: String| NodeMessage::ProbeResult {
        id,
        ok: false,
        rtt_ms: None,
        path: None,
        error: Some(error),
    };
    let peer = agent
        .dp
        .tunnel()
        .status(Instant::now())
        .into_iter()
        .find(|p| p.allowed_ips.first().is_some_and(|n| n.addr() == target));
    let Some(peer) = peer else {
        return fail(format!(
            "{target} is not among this node's peers (its network map may not have caught up yet)"
        ));
    };
    let mut deadline = Instant::now() + PROBE_DEADLINE;
    let mut last_error = None;
    // The first answer through the relay; kept while a direct path is given
    // a moment to come up (the ping itself starts the search for one).
    let mut relayed: Option<NodeMessage> = None;
    while Instant::now() < deadline {
        match agent.dp.ping(&peer.public_key) {
            Err(e) => {
                last_error = Some(e.to_string());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(txid) => {
                let sent = Instant::now();
                let wait = if relayed.is_some() {
                    Duration::from_millis(100)
                } else {
                    PROBE_RETRY
                };
                while sent.elapsed() < wait && Instant::now() < deadline {
                    if let Some(r) = agent.dp.ping_result(txid) {
                        let answer = NodeMessage::ProbeResult {
                            id,
                            ok: true,
                            rtt_ms: Some(r.rtt.as_secs_f64() * 1000.0),
                            path: Some(r.path.kind().to_string()),
                            error: None,
                        };
                        if matches!(r.path, trellis_tunnel::Path::Direct(_)) {
                            return answer;
                        }
                        if relayed.is_none() {
                            deadline = deadline.min(Instant::now() + PROBE_DIRECT_GRACE);
                            relayed = Some(answer);
                        }
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                if relayed.is_some() {
                    // Pace the follow-up pings.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                last_error = None;
            }
        }
    }
    if let Some(answer) = relayed {
        return answer;
    }
    fail(match last_error {
        Some(e) => e,
        None => format!(
            "no answer within {} s (is {} running and allowed to receive UDP?)",
            PROBE_DEADLINE.as_secs(),
            peer.name
        ),
    })
}

/// Asks a running agent to ping a peer; calls `each` with every reply line.
pub async fn query_ping(
    state_dir: &std::path::Path,
    target: &str,
    count: u32,
    mut each: impl FnMut(serde_json::Value),
) -> anyhow::Result<()> {
    let conn = UnixStream::connect(StateDir::new(state_dir).socket_path())
        .await
        .with_context(|| {
            format!(
                "no agent is running with state dir {} (start it with `trellis join`)",
                state_dir.display()
            )
        })?;
    let (r, mut w) = conn.into_split();
    w.write_all(format!("ping {target} {count}\n").as_bytes())
        .await?;
    let mut lines = BufReader::new(r).lines();
    while let Some(line) = lines.next_line().await? {
        let v: serde_json::Value =
            serde_json::from_str(&line).context("the agent's answer was not JSON")?;
        if let Some(e) = v.get("fatal") {
            bail!("{}", e.as_str().unwrap_or("ping failed"));
        }
        each(v);
    }
    Ok(())
}

/// The machine's own IPv4 addresses that could carry WireGuard (not loopback,
/// not our tunnel).
fn local_addrs(tun_ifname: &str) -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a linked list that we walk read-only and free once.
    unsafe {
        if libc::getifaddrs(&mut ifap) != 0 {
            return out;
        }
        let mut cur = ifap;
        while !cur.is_null() {
            let ifa = &*cur;
            cur = ifa.ifa_next;
            if ifa.ifa_addr.is_null() || (*ifa.ifa_addr).sa_family as i32 != libc::AF_INET {
                continue;
            }
            let name = std::ffi::CStr::from_ptr(ifa.ifa_name).to_string_lossy();
            if name == tun_ifname {
                continue;
            }
            let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            if !ip.is_loopback() && !ip.is_link_local() && !ip.is_unspecified() {
                out.push(IpAddr::V4(ip));
            }
        }
        libc::freeifaddrs(ifap);
    }
    out.sort();
    out.dedup();
    out
}

async fn bind_status_socket(dir: &StateDir) -> anyhow::Result<UnixListener> {
    let path = dir.socket_path();
    if path.exists() {
        if UnixStream::connect(&path).await.is_ok() {
            bail!(
                "an agent is already running with state dir {} (stop it first)",
                dir.path().display()
            );
        }
        let _ = std::fs::remove_file(&path);
    }
    let l = UnixListener::bind(&path)
        .with_context(|| format!("creating the status socket {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

async fn serve_status(listener: UnixListener, agent: Arc<Agent>) {
    let state = match agent.dir.load() {
        Ok((s, _)) => s,
        Err(_) => return,
    };
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            continue;
        };
        let agent = agent.clone();
        let state = state.clone();
        tokio::spawn(async move {
            let (r, mut w) = conn.into_split();
            let mut line = String::new();
            let mut r = BufReader::new(r);
            let read = tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut line)).await;
            let req = line.trim().to_string();
            if let (Ok(Ok(_)), Some(rest)) = (&read, req.strip_prefix("ping ")) {
                let mut parts = rest.split_whitespace();
                let target = parts.next().unwrap_or("").to_string();
                let count = parts
                    .next()
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(4u32)
                    .clamp(1, 1000);
                if let Err(e) = ping_peer(&agent, &target, count, &mut w).await {
                    let v = serde_json::json!({ "fatal": format!("{e:#}") });
                    let _ = w.write_all(format!("{v}\n").as_bytes()).await;
                }
                return;
            }
            let reply = match (read, req.as_str()) {
                (Ok(Ok(_)), "status") => serde_json::to_string(&agent.status(&state))
                    .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")),
                _ => {
                    "{\"error\":\"unknown request; try `status` or `ping PEER COUNT`\"}".to_string()
                }
            };
            let _ = w.write_all(reply.as_bytes()).await;
            let _ = w.write_all(b"\n").await;
        });
    }
}

/// Asks a running agent for its status (what `trellis status` prints).
pub async fn query_status(state_dir: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    let dir = StateDir::new(state_dir);
    let path = dir.socket_path();
    let conn = UnixStream::connect(&path).await.with_context(|| {
        format!(
            "no agent is running with state dir {} (start it with `trellis join`)",
            state_dir.display()
        )
    })?;
    let (r, mut w) = conn.into_split();
    w.write_all(b"status\n").await?;
    let mut line = String::new();
    BufReader::new(r).read_line(&mut line).await?;
    let v: serde_json::Value =
        serde_json::from_str(&line).context("the agent's answer was not JSON")?;
    if let Some(e) = v.get("error") {
        bail!("the agent answered: {e}");
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_urls() {
        assert_eq!(
            stream_url("http://198.18.0.1:8080"),
            "ws://198.18.0.1:8080/api/v1/node/stream"
        );
        assert_eq!(
            stream_url("https://mesh.example.com"),
            "wss://mesh.example.com/api/v1/node/stream"
        );
    }

    #[test]
    fn local_addrs_never_lists_loopback() {
        for a in local_addrs("trellis0") {
            assert!(!a.is_loopback());
        }
    }
}
