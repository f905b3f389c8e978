//! The fetch gateway: the edge as a member of every account's network.
//!
//! Each account that has bindings gets a *member*: a WireGuard identity of
//! the edge (derived from the server's secret, so it survives restarts
//! without being stored), attached to the [`RelayHub`] like a node on the TCP
//! relay, a [`trellis_tunnel::Tunnel`] that speaks WireGuard with the
//! account's nodes, and a userspace TCP/IP stack ([`netstack`]) whose
//! addresses are the account's gateway address and one per binding.
//!
//! Agents present a binding and a request (forward proxy, CONNECT, or the
//! plain form with `Trellis-Target`; see `docs/gateway.md`); the gateway
//! authenticates it against the account snapshot the control plane pushes
//! ([`Gateway::set_account`]), decides it against the account's policy,
//! dials the target through the member's stack *from the binding's address*,
//! and streams both ways. Every request ends as a [`RequestRecord`] on the
//! channel returned by [`Gateway::new`].

pub mod netstack;

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use trellis_proto::FilterSpec;

/// Prefix of a binding's public id in its URL user name: `b_<id>`.
pub const BINDING_USER_PREFIX: &str = "b_";
/// Header carrying the target URL in the plain form.
pub const TARGET_HEADER: &str = "trellis-target";
/// Header carrying `b_<id>:<secret>` in the plain form.
pub const BINDING_HEADER: &str = "trellis-binding";
/// Header naming the gateway's error code on every error it produces.
pub const ERROR_HEADER: &str = "trellis-error";

/// One binding of an account, as the gateway authenticates it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingEntry {
    /// Database id (for logs).
    pub id: i64,
    /// The public id: the `<id>` in `b_<id>`.
    pub public_id: String,
    pub name: String,
    /// SHA-256 of the secret.
    pub secret_hash: [u8; 32],
    /// The binding's overlay address: requests leave the gateway from it.
    pub ip: Ipv4Addr,
    /// Unix seconds after which the binding is refused; None never expires.
    pub expires_at: Option<i64>,
}

/// A node of the account, as the gateway dials it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayPeer {
    pub name: String,
    pub public_key: [u8; 32],
    pub ip: Ipv4Addr,
    /// Its address and the subnets it is primary for.
    pub allowed_ips: Vec<Ipv4Net>,
    /// It holds its control stream open.
    pub online: bool,
    /// Unix seconds it was last connected.
    pub last_seen: Option<i64>,
}

/// Everything the gateway knows of one account; replaced whole on every change.
#[derive(Debug, Clone, PartialEq)]
pub struct AccountSnapshot {
    pub account_id: i64,
    pub name: String,
    /// The account's overlay block; the gateway's own address is its offset 1.
    pub cidr: Ipv4Net,
    /// The account's domain, e.g. `prod.mesh`; names under it resolve.
    pub domain: Option<String>,
    /// Fully qualified names (lower case) and their addresses: every node and
    /// the admin's records.
    pub names: Vec<(String, Ipv4Addr)>,
    pub peers: Vec<GatewayPeer>,
    /// The account's packet filter; None allows everything.
    pub filter: Option<FilterSpec>,
    /// Live bindings (revoked ones are simply absent).
    pub bindings: Vec<BindingEntry>,
}

/// One request through the gateway, for the request log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    pub account_id: i64,
    /// None when the credentials matched no binding.
    pub binding_id: Option<i64>,
    pub binding: String,
    /// Unix milliseconds the request arrived.
    pub start_ms: i64,
    pub duration_ms: i64,
    /// `proxy`, `connect`, `fetch` (plain form) or `websocket`.
    pub form: String,
    /// The HTTP method; `CONNECT` for tunnels.
    pub method: String,
    /// `host:port` as asked.
    pub target: String,
    /// The address it resolved to, and the node that owns it.
    pub dst_ip: Option<Ipv4Addr>,
    pub dst_port: u16,
    pub node: Option<String>,
    /// The path without its query string (None for CONNECT).
    pub path: Option<String>,
    pub status: u16,
    /// Bytes from the agent to the target, and back.
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// `allow` or `deny`.
    pub decision: String,
    pub rule: Option<String>,
    /// The gateway's error code (see docs/gateway.md), if it produced an error.
    pub error: Option<String>,
}

/// The gateway's own address in an account's block (offset 1, which node
/// allocation never hands out).
pub fn gateway_ip(cidr: &Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(cidr.network()).wrapping_add(1))
}

/// The WireGuard private key of the gateway's member in `account_id`:
/// HMAC-SHA256 of the server secret, so it is the same after a restart and
/// is never stored or sent anywhere.
pub fn member_secret(server_secret: &[u8; 32], account_id: i64) -> trellis_tunnel::StaticSecret {
    use hmac::{Hmac, Mac};
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(server_secret).expect("any key size");
    mac.update(b"trellis gateway member key v1");
    mac.update(&account_id.to_be_bytes());
    let bytes: [u8; 32] = mac.finalize().into_bytes().into();
    trellis_tunnel::StaticSecret::from(bytes)
}

/// The public key nodes of `account_id` know the gateway's member by.
pub fn member_public_key(server_secret: &[u8; 32], account_id: i64) -> [u8; 32] {
    *trellis_tunnel::PublicKey::from(&member_secret(server_secret, account_id)).as_bytes()
}

/// SHA-256 of a binding secret, as stored and compared.
pub fn hash_secret(secret: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(secret.as_bytes()).into()
}

/// The fetch gateway: account snapshots in, requests served, records out.
pub struct Gateway {
    server_secret: [u8; 32],
    hub: std::sync::Arc<crate::RelayHub>,
    accounts: std::sync::Mutex<std::collections::HashMap<i64, std::sync::Arc<AccountSnapshot>>>,
    records: tokio::sync::mpsc::Sender<RequestRecord>,
}

/// Request records waiting for the control plane before further ones are dropped.
pub const RECORD_QUEUE: usize = 65_536;

impl Gateway {
    /// A gateway whose members attach to `hub`, with keys derived from
    /// `server_secret`; the receiver yields a record per request.
    pub fn new(
        hub: std::sync::Arc<crate::RelayHub>,
        server_secret: [u8; 32],
    ) -> (
        std::sync::Arc<Gateway>,
        tokio::sync::mpsc::Receiver<RequestRecord>,
    ) {
        let (records, rx) = tokio::sync::mpsc::channel(RECORD_QUEUE);
        let gw = Gateway {
            server_secret,
            hub,
            accounts: Default::default(),
            records,
        };
        (std::sync::Arc::new(gw), rx)
    }

    /// The public key of the member in `account_id` (for network maps).
    pub fn member_public_key(&self, account_id: i64) -> [u8; 32] {
        member_public_key(&self.server_secret, account_id)
    }

    /// Replaces what the gateway knows of an account. Streams of bindings no
    /// longer in it (revoked) are closed at once.
    pub fn set_account(&self, snapshot: AccountSnapshot) {
        let id = snapshot.account_id;
        self.accounts
            .lock()
            .expect("gateway lock")
            .insert(id, std::sync::Arc::new(snapshot));
    }

    /// Forgets an account (deleted): its member leaves, its streams close.
    pub fn remove_account(&self, account_id: i64) {
        self.accounts
            .lock()
            .expect("gateway lock")
            .remove(&account_id);
    }

    /// What the gateway knows of an account now (the last snapshot set).
    pub fn account(&self, id: i64) -> Option<std::sync::Arc<AccountSnapshot>> {
        self.accounts
            .lock()
            .expect("gateway lock")
            .get(&id)
            .cloned()
    }

    /// Queues a request record for the control plane's request log; dropped
    /// when [`RECORD_QUEUE`] records already wait.
    pub fn record(&self, r: RequestRecord) {
        if self.records.try_send(r).is_err() {
            tracing::debug!("request log queue full or closed; a record was dropped");
        }
    }

    /// Serves agents on `listener` (TLS when `tls` is given) until dropped.
    pub async fn serve(
        self: std::sync::Arc<Self>,
        listener: tokio::net::TcpListener,
        tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    ) {
        let _ = (listener, tls, &self.hub, &self.records);
        todo!("the gateway's HTTP front")
    }
}
