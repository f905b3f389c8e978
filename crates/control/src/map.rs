//! Network maps: what each node is told about itself and its peers, the
//! registry of open control streams, and the change fan-out between them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use ipnet::Ipv4Net;
use tokio::sync::{broadcast, mpsc, watch};
use trellis_proto::{
    DnsConfig, FilterSpec, NetworkMap, NodeKey, Peer, PeerPath, SelfNode, ServerMessage,
};

use crate::mesh::{pick_primaries, ApprovedRoute};
use crate::store::{overlay_space, Account, Node};

/// Underlay endpoints of a node, best first, without duplicates: its
/// server-reflexive address (what the edge saw; it works through
/// endpoint-independent NATs), the address the control plane saw it connect
/// from, then its own interface addresses — the last two with its WireGuard port.
pub fn endpoints(node: &Node) -> Vec<SocketAddr> {
    let space = overlay_space();
    let usable = |ip: &IpAddr| {
        !(ip.is_loopback()
            || ip.is_unspecified()
            || is_link_local(ip)
            || matches!(ip, IpAddr::V4(v4) if space.contains(v4)))
    };
    let mut out: Vec<SocketAddr> = Vec::new();
    if let Some(r) = node.reflexive {
        let ip = r.ip().to_canonical();
        if r.port() != 0 && usable(&ip) {
            out.push(SocketAddr::new(ip, r.port()));
        }
    }
    let Some(port) = node.listen_port.filter(|p| *p != 0) else {
        return out;
    };
    if let Some(ip) = node.observed_ip.map(|ip| ip.to_canonical()) {
        if !ip.is_loopback() && !ip.is_unspecified() {
            let ep = SocketAddr::new(ip, port);
            if !out.contains(&ep) {
                out.push(ep);
            }
        }
    }
    for ip in &node.local_addrs {
        let ip = ip.to_canonical();
        if !usable(&ip) {
            continue;
        }
        let ep = SocketAddr::new(ip, port);
        if !out.contains(&ep) {
            out.push(ep);
        }
    }
    out
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

fn host_net(ip: Ipv4Addr) -> Ipv4Net {
    Ipv4Net::from(ip)
}

/// The peer entry of `node`; `routes` are the subnets it is primary for.
pub fn peer_of(node: &Node, online: bool, routes: &[Ipv4Net]) -> Peer {
    let mut allowed_ips = vec![host_net(node.ip)];
    allowed_ips.extend_from_slice(routes);
    Peer {
        id: node.id,
        name: node.name.clone(),
        public_key: node.public_key,
        ip: node.ip,
        allowed_ips,
        endpoints: endpoints(node),
        online,
    }
}

/// Everything a network map of one account is made of.
#[derive(Debug, Clone)]
pub struct AccountView {
    pub account: Account,
    pub nodes: Vec<Node>,
    /// Nodes with an open control stream.
    pub online: HashSet<i64>,
    /// Subnets each node is primary for, sorted.
    pub routes: HashMap<i64, Vec<Ipv4Net>>,
    /// The account's names.
    pub dns: Option<DnsConfig>,
    /// The account's packet filter (policy with names resolved).
    pub filter: Option<FilterSpec>,
    /// The account's live bindings (neither revoked nor expired).
    pub bindings: Vec<crate::bindings::Binding>,
    /// The fetch gateway's member, a peer of every node: present when the
    /// server runs a gateway and the account has live bindings.
    pub gateway: Option<GatewayMember>,
}

/// The fetch gateway's member in one account, as nodes see it: a peer with
/// id 0 named [`crate::bindings::GATEWAY_PEER_NAME`], reached over the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayMember {
    pub public_key: NodeKey,
    /// The gateway's own address (offset 1 of the block).
    pub ip: Ipv4Addr,
    /// Every live binding's address: requests come from them.
    pub allowed_ips: Vec<Ipv4Net>,
}

impl GatewayMember {
    pub fn peer(&self) -> Peer {
        Peer {
            id: 0,
            name: crate::bindings::GATEWAY_PEER_NAME.to_string(),
            public_key: self.public_key,
            ip: self.ip,
            allowed_ips: self.allowed_ips.clone(),
            endpoints: Vec::new(),
            online: true,
        }
    }
}

/// The map of node `me` in `view`. None when `me` is not among the account's
/// nodes (it was removed). The relay part is left empty: the stream adds a
/// credential for the connection.
pub fn build_map(view: &AccountView, me: i64) -> Option<NetworkMap> {
    let account = &view.account;
    let this = view
        .nodes
        .iter()
        .find(|n| n.id == me && n.account_id == account.id)?;
    let routes_of = |id: i64| view.routes.get(&id).map(Vec::as_slice).unwrap_or(&[]);
    let self_node = SelfNode {
        id: this.id,
        name: this.name.clone(),
        account: account.name.clone(),
        ip: this.ip,
        cidr: account.cidr,
        routes: routes_of(me).to_vec(),
    };
    // A disabled node is cut off: it has no peers and is nobody's peer.
    let mut peers: Vec<Peer> = view
        .nodes
        .iter()
        .filter(|_| !this.disabled)
        .filter(|n| n.id != me && n.account_id == account.id && !n.disabled)
        .map(|n| peer_of(n, view.online.contains(&n.id), routes_of(n.id)))
        .collect();
    // The gateway (id 0) comes first; a disabled node does not get it either.
    if let Some(g) = view.gateway.as_ref().filter(|_| !this.disabled) {
        peers.push(g.peer());
    }
    peers.sort_by_key(|p| p.id);
    Some(NetworkMap {
        self_node,
        peers,
        relay: None,
        dns: view.dns.clone(),
        filter: view.filter.clone(),
    })
}

/// What one connection last told its node (the relay credential is refreshed on its own clock).
#[derive(Debug, Clone)]
pub struct Sent {
    self_node: SelfNode,
    peers: BTreeMap<NodeKey, Peer>,
    dns: Option<DnsConfig>,
    filter: Option<FilterSpec>,
}

impl Sent {
    pub fn new(map: &NetworkMap) -> Sent {
        Sent {
            dns: map.dns.clone(),
            filter: map.filter.clone(),
            self_node: map.self_node.clone(),
            peers: map
                .peers
                .iter()
                .map(|p| (p.public_key, p.clone()))
                .collect(),
        }
    }

    /// The delta from what was sent to `next`, or None if nothing changed.
    /// Updates `self` to `next` when there is something to send.
    pub fn delta_to(&mut self, next: &NetworkMap) -> Option<ServerMessage> {
        let self_node = (self.self_node != next.self_node).then(|| next.self_node.clone());
        let upsert: Vec<Peer> = next
            .peers
            .iter()
            .filter(|p| self.peers.get(&p.public_key) != Some(*p))
            .cloned()
            .collect();
        let keep: HashSet<NodeKey> = next.peers.iter().map(|p| p.public_key).collect();
        let remove: Vec<NodeKey> = self
            .peers
            .keys()
            .filter(|k| !keep.contains(k))
            .copied()
            .collect();
        let dns = (self.dns != next.dns).then(|| next.dns.clone()).flatten();
        let filter = (self.filter != next.filter)
            .then(|| next.filter.clone())
            .flatten();
        if self_node.is_none()
            && upsert.is_empty()
            && remove.is_empty()
            && dns.is_none()
            && filter.is_none()
        {
            return None;
        }
        *self = Sent::new(next);
        Some(ServerMessage::Delta {
            self_node,
            upsert,
            remove,
            relay: None,
            dns,
            filter,
        })
    }
}

/// Orders the hub gives an open connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// A newer connection of the same node took over.
    Replaced,
    /// The node was deleted: tell it, then close.
    Removed(String),
    /// Send the node a connection test (see [`crate::probe`]); the stream stays open.
    Probe { id: u64, target: Ipv4Addr },
}

struct Conn {
    conn_id: u64,
    account_id: i64,
    control: mpsc::UnboundedSender<Control>,
    /// The node's last report of its paths to its peers (in memory only: it
    /// goes with the connection).
    peer_paths: Vec<PeerPath>,
}

/// Registry of open control streams and the account-change fan-out.
pub struct Hub {
    conns: Mutex<HashMap<i64, Conn>>,
    /// The last primary of each subnet, per account: it stays primary while
    /// no node with the subnet approved is online.
    primaries: Mutex<HashMap<i64, HashMap<Ipv4Net, i64>>>,
    changes: broadcast::Sender<i64>,
    next_conn: AtomicU64,
    shutdown: watch::Sender<bool>,
    /// Number of stream tasks still running (registered or not).
    active: watch::Sender<usize>,
    /// Connection tests waiting for their node's answer.
    pub probes: crate::probe::Pending,
}

impl Default for Hub {
    fn default() -> Self {
        Hub::new()
    }
}

impl Hub {
    pub fn new() -> Hub {
        let (changes, _) = broadcast::channel(1024);
        let (shutdown, _) = watch::channel(false);
        let (active, _) = watch::channel(0);
        Hub {
            conns: Mutex::new(HashMap::new()),
            primaries: Mutex::new(HashMap::new()),
            changes,
            next_conn: AtomicU64::new(1),
            shutdown,
            active,
            probes: crate::probe::Pending::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<i64, Conn>> {
        // A panic while holding this lock leaves a plain map behind; keep using it.
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The primary node of each approved subnet of `account_id` now (see
    /// [`pick_primaries`]); remembers it for when its candidates go offline.
    pub fn primaries(
        &self,
        account_id: i64,
        approved: &[ApprovedRoute],
        online: &HashSet<i64>,
    ) -> BTreeMap<Ipv4Net, i64> {
        // A panic while holding this lock leaves a plain map behind; keep using it.
        let mut all = self.primaries.lock().unwrap_or_else(|e| e.into_inner());
        let previous = all.entry(account_id).or_default();
        let next = pick_primaries(approved, online, previous);
        *previous = next.iter().map(|(c, n)| (*c, *n)).collect();
        next
    }

    /// Something in this account changed: every open stream of it recomputes.
    pub fn notify(&self, account_id: i64) {
        // An error only means nobody is listening right now.
        let _ = self.changes.send(account_id);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<i64> {
        self.changes.subscribe()
    }

    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Tells every open stream to close.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// A stream task began.
    pub fn stream_started(&self) {
        self.active.send_modify(|n| *n += 1);
    }

    /// A stream task ended.
    pub fn stream_ended(&self) {
        self.active.send_modify(|n| *n = n.saturating_sub(1));
    }

    /// Waits until every stream task has ended (they finish their last writes).
    pub async fn streams_ended(&self) {
        let mut rx = self.active.subscribe();
        // The sender lives in self, so this cannot fail while we wait.
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// Registers an open stream of `node_id`; an older one of the same node is told to close.
    pub fn register(
        &self,
        node_id: i64,
        account_id: i64,
    ) -> (u64, mpsc::UnboundedReceiver<Control>) {
        let conn_id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let old = self.lock().insert(
            node_id,
            Conn {
                conn_id,
                account_id,
                control: tx,
                peer_paths: Vec::new(),
            },
        );
        if let Some(old) = old {
            let _ = old.control.send(Control::Replaced);
        }
        (conn_id, rx)
    }

    /// Removes the registration if it is still this connection's. True if it was.
    pub fn unregister(&self, node_id: i64, conn_id: u64) -> bool {
        let mut conns = self.lock();
        if conns.get(&node_id).map(|c| c.conn_id) == Some(conn_id) {
            conns.remove(&node_id);
            true
        } else {
            false
        }
    }

    /// Tells the open stream of a deleted node (if any) that it was removed.
    pub fn kick(&self, node_id: i64, reason: &str) {
        if let Some(conn) = self.lock().remove(&node_id) {
            let _ = conn.control.send(Control::Removed(reason.to_string()));
        }
    }

    /// Gives the open stream of `node_id` an order. False if the node has none.
    pub fn send_control(&self, node_id: i64, order: Control) -> bool {
        self.lock()
            .get(&node_id)
            .is_some_and(|conn| conn.control.send(order).is_ok())
    }

    /// Keeps the paths `node_id` reported on connection `conn_id` (ignored if
    /// that connection is no longer the node's current one).
    pub fn set_peer_paths(&self, node_id: i64, conn_id: u64, paths: Vec<PeerPath>) {
        if let Some(conn) = self.lock().get_mut(&node_id) {
            if conn.conn_id == conn_id {
                conn.peer_paths = paths;
            }
        }
    }

    /// The paths `node_id` last reported on its open connection; empty if it
    /// is offline or has not reported yet.
    pub fn peer_paths(&self, node_id: i64) -> Vec<PeerPath> {
        self.lock()
            .get(&node_id)
            .map(|c| c.peer_paths.clone())
            .unwrap_or_default()
    }

    pub fn is_online(&self, node_id: i64) -> bool {
        self.lock().contains_key(&node_id)
    }

    /// Ids of the nodes of `account_id` with an open stream.
    pub fn online_in(&self, account_id: i64) -> HashSet<i64> {
        self.lock()
            .iter()
            .filter(|(_, c)| c.account_id == account_id)
            .map(|(id, _)| *id)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: i64, account_id: i64) -> Node {
        Node {
            id,
            account_id,
            name: format!("n{id}"),
            public_key: NodeKey([id as u8; 32]),
            ip: Ipv4Addr::new(100, 64, 0, id as u8 + 1),
            hostname: String::new(),
            os: String::new(),
            version: String::new(),
            tags: Vec::new(),
            listen_port: None,
            local_addrs: Vec::new(),
            observed_ip: None,
            reflexive: None,
            created_at: 0,
            last_seen: None,
            disabled: false,
        }
    }

    fn account(id: i64) -> Account {
        Account {
            id,
            name: format!("a{id}"),
            cidr: "100.64.0.0/16".parse().unwrap(),
            created_at: 0,
        }
    }

    #[test]
    fn endpoint_filtering() {
        let mut n = node(1, 1);
        assert!(endpoints(&n).is_empty(), "no port, no endpoints");
        n.listen_port = Some(51820);
        n.observed_ip = Some("198.18.0.7".parse().unwrap());
        n.local_addrs = [
            "198.18.0.7",
            "127.0.0.1",
            "169.254.1.1",
            "100.64.0.2",
            "0.0.0.0",
            "fe80::1",
            "::1",
            "192.168.1.4",
            "2001:db8::5",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let got: Vec<String> = endpoints(&n).iter().map(|e| e.to_string()).collect();
        assert_eq!(
            got,
            [
                "198.18.0.7:51820",
                "192.168.1.4:51820",
                "[2001:db8::5]:51820"
            ]
        );
        n.observed_ip = Some("::ffff:127.0.0.1".parse().unwrap());
        assert_eq!(endpoints(&n)[0].to_string(), "198.18.0.7:51820");
    }

    #[test]
    fn reflexive_comes_first_filtered_and_deduplicated() {
        let mut n = node(1, 1);
        n.reflexive = Some("203.0.113.9:60000".parse().unwrap());
        assert_eq!(
            endpoints(&n),
            ["203.0.113.9:60000".parse::<SocketAddr>().unwrap()],
            "known even before the node reports its port"
        );
        n.listen_port = Some(51820);
        n.observed_ip = Some("203.0.113.9".parse().unwrap());
        n.local_addrs = vec!["192.168.1.4".parse().unwrap()];
        let got: Vec<String> = endpoints(&n).iter().map(|e| e.to_string()).collect();
        assert_eq!(
            got,
            [
                "203.0.113.9:60000",
                "203.0.113.9:51820",
                "192.168.1.4:51820"
            ]
        );
        // Same address and port as the observed one: listed once.
        n.reflexive = Some("203.0.113.9:51820".parse().unwrap());
        assert_eq!(endpoints(&n).len(), 2);
        n.reflexive = Some("[::ffff:198.18.0.5]:7".parse().unwrap());
        assert_eq!(endpoints(&n)[0].to_string(), "198.18.0.5:7");
        for bad in [
            "127.0.0.1:5",
            "0.0.0.0:5",
            "100.64.0.9:5",
            "[::1]:5",
            "198.18.0.5:0",
        ] {
            n.reflexive = Some(bad.parse().unwrap());
            assert_eq!(endpoints(&n)[0].to_string(), "203.0.113.9:51820", "{bad}");
        }
    }

    fn view(acc: &Account, nodes: &[Node], online: &HashSet<i64>) -> AccountView {
        AccountView {
            account: acc.clone(),
            nodes: nodes.to_vec(),
            online: online.clone(),
            routes: HashMap::new(),
            dns: None,
            filter: None,
            bindings: Vec::new(),
            gateway: None,
        }
    }

    fn build(acc: &Account, nodes: &[Node], me: i64, online: &HashSet<i64>) -> Option<NetworkMap> {
        build_map(&view(acc, nodes, online), me)
    }

    #[test]
    fn primary_routes_go_into_allowed_ips_and_self_node() {
        let acc = account(1);
        let nodes = vec![node(1, 1), node(2, 1)];
        let c: Ipv4Net = "198.19.10.0/24".parse().unwrap();
        let mut v = view(&acc, &nodes, &HashSet::new());
        let first = build_map(&v, 1).unwrap();
        assert_eq!(first.peers[0].allowed_ips.len(), 1);
        let mut sent = Sent::new(&first);
        v.routes.insert(2, vec![c]);
        let m1 = build_map(&v, 1).unwrap();
        assert_eq!(m1.peers[0].allowed_ips[1], c);
        assert!(m1.self_node.routes.is_empty());
        assert_eq!(build_map(&v, 2).unwrap().self_node.routes, [c]);
        match sent.delta_to(&m1) {
            Some(ServerMessage::Delta {
                self_node,
                upsert,
                dns,
                ..
            }) => {
                assert!(self_node.is_none() && dns.is_none());
                assert_eq!(upsert[0].allowed_ips.len(), 2);
            }
            other => panic!("expected a delta, got {other:?}"),
        }
        v.dns = Some(DnsConfig {
            domain: "a1.mesh".into(),
            records: Vec::new(),
        });
        match sent.delta_to(&build_map(&v, 1).unwrap()) {
            Some(ServerMessage::Delta { upsert, dns, .. }) => {
                assert!(upsert.is_empty());
                assert_eq!(dns.unwrap().domain, "a1.mesh");
            }
            other => panic!("expected a delta, got {other:?}"),
        }
        assert_eq!(sent.delta_to(&build_map(&v, 1).unwrap()), None);
    }

    #[test]
    fn maps_hold_only_own_account_and_never_self() {
        let nodes = vec![node(1, 1), node(2, 1), node(3, 2)];
        let online: HashSet<i64> = [2].into();
        let map = build(&account(1), &nodes, 1, &online).unwrap();
        assert_eq!(map.self_node.id, 1);
        assert_eq!(map.peers.len(), 1);
        assert_eq!(map.peers[0].id, 2);
        assert!(map.peers[0].online);
        assert_eq!(map.peers[0].allowed_ips[0].to_string(), "100.64.0.3/32");
        assert!(build(&account(1), &nodes, 3, &online).is_none());
    }

    #[test]
    fn a_disabled_node_has_no_peers_and_is_nobodys_peer() {
        let mut nodes = vec![node(1, 1), node(2, 1), node(3, 1)];
        nodes[2].disabled = true;
        let online: HashSet<i64> = [1, 2, 3].into();
        let acc = account(1);
        let ids = |m: NetworkMap| m.peers.iter().map(|p| p.id).collect::<Vec<_>>();
        assert_eq!(ids(build(&acc, &nodes, 1, &online).unwrap()), [2]);
        assert_eq!(ids(build(&acc, &nodes, 2, &online).unwrap()), [1]);
        let own = build(&acc, &nodes, 3, &online).unwrap();
        assert_eq!(own.self_node.id, 3, "a disabled node keeps its identity");
        assert!(own.peers.is_empty());
    }

    #[test]
    fn the_gateway_is_peer_zero_of_enabled_nodes_only() {
        let acc = account(1);
        let mut nodes = vec![node(1, 1), node(2, 1)];
        nodes[1].disabled = true;
        let mut v = view(&acc, &nodes, &HashSet::new());
        let before = build_map(&v, 1).unwrap();
        let mut sent = Sent::new(&before);
        let b: Ipv4Net = "100.64.0.9/32".parse().unwrap();
        v.gateway = Some(GatewayMember {
            public_key: NodeKey([9; 32]),
            ip: "100.64.0.1".parse().unwrap(),
            allowed_ips: vec![b],
        });
        let m = build_map(&v, 1).unwrap();
        assert_eq!(m.peers[0].id, 0);
        assert_eq!(m.peers[0].name, "gateway");
        assert_eq!(m.peers[0].allowed_ips, [b]);
        assert!(m.peers[0].endpoints.is_empty() && m.peers[0].online);
        assert!(
            build_map(&v, 2).unwrap().peers.is_empty(),
            "disabled: no gateway either"
        );
        assert!(
            matches!(sent.delta_to(&m), Some(ServerMessage::Delta { upsert, .. }) if upsert.len() == 1)
        );
        v.gateway = None;
        match sent.delta_to(&build_map(&v, 1).unwrap()) {
            Some(ServerMessage::Delta { remove, .. }) => assert_eq!(remove, [NodeKey([9; 32])]),
            other => panic!("expected a delta, got {other:?}"),
        }
    }

    #[test]
    fn deltas_carry_only_changes() {
        let acc = account(1);
        let mut nodes = vec![node(1, 1), node(2, 1)];
        let none = HashSet::new();
        let first = build(&acc, &nodes, 1, &none).unwrap();
        let mut sent = Sent::new(&first);
        assert_eq!(sent.delta_to(&first), None);

        nodes.push(node(3, 1));
        let online: HashSet<i64> = [2].into();
        let next = build(&acc, &nodes, 1, &online).unwrap();
        match sent.delta_to(&next) {
            Some(ServerMessage::Delta {
                self_node,
                upsert,
                remove,
                relay,
                dns,
                filter,
            }) => {
                assert!(filter.is_none());
                assert!(relay.is_none());
                assert!(dns.is_none());
                assert!(self_node.is_none());
                let ids: Vec<i64> = upsert.iter().map(|p| p.id).collect();
                assert_eq!(ids, [2, 3]);
                assert!(remove.is_empty());
            }
            other => panic!("expected a delta, got {other:?}"),
        }
        assert_eq!(sent.delta_to(&next), None);

        nodes.remove(1);
        let next = build(&acc, &nodes, 1, &online).unwrap();
        match sent.delta_to(&next) {
            Some(ServerMessage::Delta { upsert, remove, .. }) => {
                assert!(upsert.is_empty());
                assert_eq!(remove, [NodeKey([2; 32])]);
            }
            other => panic!("expected a delta, got {other:?}"),
        }
    }

    #[test]
    fn hub_replaces_and_kicks() {
        let hub = Hub::new();
        let (c1, mut r1) = hub.register(5, 1);
        let (c2, mut r2) = hub.register(5, 1);
        assert_eq!(r1.try_recv(), Ok(Control::Replaced));
        assert!(
            !hub.unregister(5, c1),
            "old connection must not unregister the new one"
        );
        assert!(hub.is_online(5));
        assert_eq!(hub.online_in(1), [5].into());
        assert!(hub.online_in(2).is_empty());
        hub.kick(5, "bye");
        assert_eq!(r2.try_recv(), Ok(Control::Removed("bye".into())));
        assert!(!hub.is_online(5));
        assert!(!hub.unregister(5, c2));
    }
}
