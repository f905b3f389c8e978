//! Wire and API types shared by the node agent, the control plane and the edge.
//!
//! Everything here is plain data: JSON bodies of the REST API under `/api/v1`,
//! and the messages of the long-lived control stream between a node and the
//! control plane. No IO, no clock.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ipnet::Ipv4Net;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
pub use trellis_policy::FilterSpec;
use utoipa::ToSchema;

pub mod admin_policy;
pub mod bindings;
pub mod frames;
pub mod logs;
pub use bindings::{BindingInfo, CreateBindingRequest, CreateBindingResponse};
pub use logs::{FlowLogPage, FlowLogRecord, RequestLogPage, RequestLogRecord, TrafficSummary};

pub use admin_policy::*;

/// The block every account's overlay addresses come from (RFC 6598 shared space).
pub const OVERLAY_SPACE: &str = "100.64.0.0/10";

/// Default tunnel MTU: a 1500-byte underlay minus IPv6 (40) + UDP (8) +
/// WireGuard (32) + the relay header (33), so that a packet fits whether it
/// goes direct or through the edge, over IPv4 or IPv6.
pub const DEFAULT_MTU: u16 = 1380;

/// A node's WireGuard (X25519) public key. The private half never leaves the node.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, ToSchema)]
#[schema(value_type = String, example = "q1n1Yp7v9mX4x3cQ2b0p0m4n1Yp7v9mX4x3cQ2b0p0k=")]
pub struct NodeKey(pub [u8; 32]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a WireGuard public key: expected 32 bytes in standard base64 (44 characters)")]
pub struct BadKey;

impl FromStr for NodeKey {
    type Err = BadKey;
    fn from_str(s: &str) -> Result<Self, BadKey> {
        let bytes = B64.decode(s.trim()).map_err(|_| BadKey)?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| BadKey)?;
        Ok(NodeKey(arr))
    }
}

impl fmt::Display for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&B64.encode(self.0))
    }
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Public keys are not secret, but a short form keeps logs readable.
        let s = B64.encode(self.0);
        write!(f, "NodeKey({}…)", &s[..8])
    }
}

impl Serialize for NodeKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for NodeKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Error body of every failed API call.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ApiError {
    /// A sentence a person can act on.
    pub error: String,
}

/// Checks a node or account name: a DNS label, lower-case letters, digits and
/// dashes, 1–63 characters, not starting or ending with a dash.
pub fn validate_name(kind: &str, name: &str) -> Result<(), String> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if name.is_empty()
        || name.len() > 63
        || !ok_chars
        || name.starts_with('-')
        || name.ends_with('-')
    {
        return Err(format!(
            "invalid {kind} name {name:?}: use 1-63 lower-case letters, digits and dashes, not starting or ending with a dash"
        ));
    }
    Ok(())
}

/// Turns a hostname into a valid node name ("My_Laptop.local" → "my-laptop").
pub fn sanitize_name(raw: &str) -> String {
    let first = raw.split('.').next().unwrap_or("");
    let mut out = String::new();
    for c in first.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let out = out.trim_matches('-');
    let mut out: String = out.chars().take(63).collect();
    while out.ends_with('-') {
        out.pop();
    }
    if out.is_empty() {
        "node".to_string()
    } else {
        out
    }
}

// ---------------------------------------------------------------------------
// Admin API
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateAccountRequest {
    pub name: String,
    /// The account's overlay block inside 100.64.0.0/10. Chosen for you when absent.
    /// Blocks of different accounts may overlap: accounts never see each other.
    #[schema(value_type = Option<String>, example = "100.65.0.0/16")]
    #[serde(default)]
    pub cidr: Option<Ipv4Net>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AccountInfo {
    pub name: String,
    #[schema(value_type = String, example = "100.64.0.0/16")]
    pub cidr: Ipv4Net,
    /// Unix seconds.
    pub created_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateAccountResponse {
    pub account: AccountInfo,
    /// Admin API key of the new account. Shown once; the server keeps only its hash.
    pub api_key: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct CreateTokenRequest {
    /// A reusable token enrolls any number of nodes until it expires.
    #[serde(default)]
    pub reusable: bool,
    /// Routes advertised by nodes enrolled with this token are approved at once.
    #[serde(default)]
    pub routes_auto_approve: bool,
    /// Lifetime in seconds; default 3600.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    /// Tags given to every node that enrolls with this token.
    #[serde(default)]
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateTokenResponse {
    /// The join token. Shown once; the server keeps only its hash.
    pub token: String,
    /// Its id, for `trellis token list` and `trellis token revoke ID`.
    #[serde(default)]
    pub id: i64,
    pub account: String,
    pub reusable: bool,
    /// Unix seconds.
    pub expires_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NodeInfo {
    pub id: i64,
    pub name: String,
    pub account: String,
    #[schema(value_type = String, example = "100.64.0.2")]
    pub ip: Ipv4Addr,
    pub public_key: NodeKey,
    /// True while the node holds its control stream open.
    pub online: bool,
    /// Unix seconds of the last moment the node was connected.
    pub last_seen: Option<i64>,
    pub created_at: i64,
    pub os: String,
    pub version: String,
    pub tags: Vec<String>,
    /// Disabled by an admin: enrolled, but no peer accepts its packets.
    #[serde(default)]
    pub disabled: bool,
    /// Underlay endpoints the node was last seen on.
    #[schema(value_type = Vec<String>)]
    pub endpoints: Vec<SocketAddr>,
    /// The path this node uses to each of its peers, as it last reported it
    /// (empty while it is offline or has not reported yet).
    #[serde(default)]
    pub peer_paths: Vec<PeerPath>,
}

/// How a node reaches one peer, as the node reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PeerPath {
    /// The peer's node name.
    pub name: String,
    /// `direct`, `relay-udp`, `relay-tcp`, or `none` (no path yet).
    pub path: String,
    /// Seconds since the last WireGuard handshake with this peer; absent if none yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handshake_secs: Option<u64>,
}

/// A subnet a node advertises, and whether it is routed.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RouteInfo {
    pub node: String,
    #[schema(value_type = String, example = "198.19.10.0/24")]
    pub cidr: Ipv4Net,
    pub approved: bool,
    /// This node is the one carrying the subnet now (several may advertise it;
    /// the first approved one that is online is primary).
    pub primary: bool,
    pub online: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ApproveRouteRequest {
    pub node: String,
    #[schema(value_type = String, example = "198.19.10.0/24")]
    pub cidr: Ipv4Net,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DnsRecordInfo {
    /// Relative to the account's domain: `db.prod` answers as `db.prod.ACCOUNT.SUFFIX`.
    pub name: String,
    #[schema(value_type = String, example = "198.19.10.5")]
    pub addr: IpAddr,
    /// The fully qualified name nodes resolve.
    #[serde(default)]
    pub fqdn: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RenameNodeRequest {
    pub name: String,
}

// ---------------------------------------------------------------------------
// Enrollment
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EnrollRequest {
    pub token: String,
    /// The node's X25519 public key, generated on the node.
    pub public_key: NodeKey,
    /// Wanted node name; made unique within the account if taken.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub version: String,
    /// Subnets this node offers to route into the mesh (a mesh node).
    #[schema(value_type = Vec<String>, example = json!(["198.19.10.0/24"]))]
    #[serde(default)]
    pub advertise_routes: Vec<Ipv4Net>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EnrollResponse {
    pub node_id: i64,
    pub name: String,
    pub account: String,
    #[schema(value_type = String)]
    pub ip: Ipv4Addr,
    /// The account's overlay block: routed into the tunnel interface.
    #[schema(value_type = String)]
    pub cidr: Ipv4Net,
    /// Credential of this node for the control stream. Shown once; stored hashed.
    pub node_secret: String,
}

// ---------------------------------------------------------------------------
// Control stream (WebSocket at /api/v1/node/stream, `Authorization: Bearer <node_secret>`)
// ---------------------------------------------------------------------------

/// What the node tells the control plane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum NodeMessage {
    /// First message on every connection, and again whenever it changes.
    Hello {
        /// UDP port the node's WireGuard socket listens on.
        listen_port: u16,
        /// The node's own interface addresses (candidates for direct paths).
        local_addrs: Vec<IpAddr>,
        /// The address and port the edge saw this node's WireGuard socket come
        /// from (STUN): its server-reflexive candidate, the one that works
        /// through endpoint-independent NATs.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reflexive: Option<SocketAddr>,
        /// Subnets this node offers to route (`--advertise-routes`); an admin
        /// approves them before anything is routed.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        advertise_routes: Vec<Ipv4Net>,
        os: String,
        version: String,
    },
    /// A batch of flow records. Numbered per node (`seq` grows by one per
    /// batch and survives restarts); the server stores a batch once and
    /// acknowledges it with [`ServerMessage::FlowsAck`]. Until then the node
    /// keeps it on disk and sends it again after a reconnect.
    Flows { seq: u64, records: Vec<FlowRecord> },
    /// The answer to [`ServerMessage::Probe`] with the same `id`.
    ProbeResult {
        id: u64,
        /// A ping to the target came back.
        ok: bool,
        /// Round-trip time of the ping that came back.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rtt_ms: Option<f64>,
        /// The path the answer took: `direct`, `relay-udp` or `relay-tcp`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<String>,
        /// Why the target could not be reached.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// The path in use to each peer; sent after connecting and whenever it
    /// changes (checked every few seconds).
    PeerPaths {
        #[serde(default)]
        peers: Vec<PeerPath>,
    },
}

/// What the control plane tells a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// The whole network map; sent first on every connection.
    Map(NetworkMap),
    /// Only what changed since the last message on this connection.
    Delta {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        self_node: Option<SelfNode>,
        #[serde(default)]
        upsert: Vec<Peer>,
        #[serde(default)]
        remove: Vec<NodeKey>,
        /// A fresh relay credential (sent before the old one expires).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        relay: Option<RelayInfo>,
        /// The account's names, whole, when any of them changed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dns: Option<DnsConfig>,
        /// The account's packet filter, whole, when the policy (or a name
        /// it refers to) changed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        filter: Option<FilterSpec>,
    },
    /// The batch of flow records numbered `seq` is stored.
    FlowsAck { seq: u64 },
    /// The node was removed by an admin: it must stop and not reconnect.
    Removed { reason: String },
    /// Ping the peer with overlay address `target` through the mesh and
    /// answer with [`NodeMessage::ProbeResult`] carrying the same `id`
    /// ("test the connection").
    Probe { id: u64, target: Ipv4Addr },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfNode {
    pub id: i64,
    pub name: String,
    pub account: String,
    pub ip: Ipv4Addr,
    pub cidr: Ipv4Net,
    /// Approved subnets this node is the primary router for: it forwards
    /// traffic from the mesh into them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Ipv4Net>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkMap {
    pub self_node: SelfNode,
    pub peers: Vec<Peer>,
    /// How to reach the edge's relay; absent when the server runs no edge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelayInfo>,
    /// The names nodes of this account resolve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsConfig>,
    /// The account's packet filter (its policy with names resolved). Absent
    /// from servers that predate policies: the node then allows everything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<FilterSpec>,
}

/// Names inside an account: `NODE.ACCOUNT.SUFFIX` for every node, and the
/// admin's extra records (`trellis dns add NAME ADDR` → `NAME.ACCOUNT.SUFFIX`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsConfig {
    /// The domain the node's resolver answers for, e.g. `default.mesh`
    /// (account name + the server's suffix). Everything else is forwarded.
    pub domain: String,
    /// Fully qualified names (lower case, no trailing dot) and their addresses.
    pub records: Vec<DnsRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsRecord {
    pub name: String,
    pub addr: IpAddr,
}

/// Where the edge is and the credential a node presents to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayInfo {
    /// `HOST:PORT` of the edge's UDP port (STUN and UDP relay). HOST may be a
    /// name; the node resolves it.
    pub udp: String,
    /// Path of the TCP relay (WebSocket) on the server's HTTP port,
    /// authenticated with the node secret like the control stream.
    pub ws_path: String,
    /// Opaque token for `FRAME_REGISTER` on the UDP relay.
    pub token: String,
    /// Unix seconds when `token` stops working.
    pub expires_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub id: i64,
    pub name: String,
    pub public_key: NodeKey,
    pub ip: Ipv4Addr,
    /// Overlay prefixes this peer may send from and is routed to.
    pub allowed_ips: Vec<Ipv4Net>,
    /// Underlay candidates, best first.
    pub endpoints: Vec<SocketAddr>,
    pub online: bool,
}

/// One connection (TCP), flow (UDP) or exchange (ICMP) as a node saw it,
/// or a rate-limited summary of denied attempts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FlowRecord {
    /// Unix milliseconds of the first packet.
    pub start_ms: i64,
    /// Unix milliseconds of the last packet (or when the flow was cut).
    pub end_ms: i64,
    /// `tcp`, `udp`, `icmp`, or the IP protocol number.
    pub proto: String,
    #[schema(value_type = String)]
    pub src_ip: Ipv4Addr,
    pub src_port: u16,
    #[schema(value_type = String)]
    pub dst_ip: Ipv4Addr,
    pub dst_port: u16,
    /// `in` when the flow was opened towards the reporting node (or a subnet
    /// it routes), `out` when the reporting node (or its subnet) opened it.
    pub direction: String,
    /// Initiator → responder.
    pub packets_out: u64,
    pub bytes_out: u64,
    /// Responder → initiator.
    pub packets_in: u64,
    pub bytes_in: u64,
    /// `direct`, `relay-udp` or `relay-tcp` (the path to the peer when the
    /// flow began).
    pub path: String,
    /// The mesh node the flow went through when one of its ends is a host
    /// on that node's subnet; empty otherwise.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub via: String,
    /// `allow` or `deny`.
    pub decision: String,
    /// Name of the rule that decided; empty when the policy's default did.
    pub rule: String,
    /// For denied attempts summarised by rate limiting: how many attempts
    /// this record stands for (1 otherwise).
    pub count: u64,
    /// Why the flow ended: `closed`, `reset`, `idle`, `revoked` (a policy
    /// change denied it while open), `shutdown`, or `denied`.
    pub end_reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_round_trips_and_rejects_garbage() {
        let k = NodeKey([7u8; 32]);
        let s = k.to_string();
        assert_eq!(s.len(), 44);
        assert_eq!(s.parse::<NodeKey>().unwrap(), k);
        assert_eq!("abc".parse::<NodeKey>(), Err(BadKey));
        assert_eq!("!!!!".parse::<NodeKey>(), Err(BadKey));
    }

    #[test]
    fn names() {
        assert!(validate_name("node", "db-1").is_ok());
        assert!(validate_name("node", "").is_err());
        assert!(validate_name("node", "-a").is_err());
        assert!(validate_name("node", "Caps").is_err());
        assert!(validate_name("node", &"a".repeat(64)).is_err());
        assert_eq!(sanitize_name("My_Laptop.local"), "my-laptop");
        assert_eq!(sanitize_name("___"), "node");
    }

    #[test]
    fn server_message_json_shape() {
        let m = ServerMessage::Removed { reason: "x".into() };
        let j = serde_json::to_string(&m).unwrap();
        assert_eq!(j, r#"{"type":"removed","reason":"x"}"#);
        let back: ServerMessage = serde_json::from_str(&j).unwrap();
        assert_eq!(back, m);
    }
}
