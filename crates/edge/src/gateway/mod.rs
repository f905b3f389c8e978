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

pub mod http;
pub mod member;
pub mod netstack;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use ipnet::Ipv4Net;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use trellis_policy::Filter;
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
    hub: Arc<crate::RelayHub>,
    inner: Mutex<Inner>,
    records: mpsc::Sender<RequestRecord>,
    /// Idle upstream HTTP connections.
    pool: http::Pool,
}

#[derive(Default)]
struct Inner {
    accounts: HashMap<i64, AccountState>,
    /// Public binding id → account.
    by_public_id: HashMap<String, i64>,
    /// Bindings that left a snapshot while the server ran: public id → name
    /// and whether they expired (else they were revoked).
    gone: HashMap<String, (String, bool)>,
}

struct AccountState {
    snap: Arc<AccountSnapshot>,
    filter: Arc<Filter>,
    member: Option<Arc<member::Member>>,
    /// Cancelled when the binding is revoked: its streams end.
    cancels: HashMap<i64, CancellationToken>,
}

/// Why credentials were refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AuthError {
    Unknown,
    Revoked(String),
    Expired(String),
    NoMember(String),
}

/// What an authenticated request may use.
#[derive(Clone)]
pub(crate) struct Grant {
    pub account: Arc<AccountSnapshot>,
    pub filter: Arc<Filter>,
    pub member: Arc<member::Member>,
    pub binding: BindingEntry,
    pub cancel: CancellationToken,
}

/// Request records waiting for the control plane before further ones are dropped.
pub const RECORD_QUEUE: usize = 65_536;

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `2026-11-26 03:04:05 UTC` for a unix time.
pub(crate) fn format_unix(t: i64) -> String {
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

impl Gateway {
    /// A gateway whose members attach to `hub`, with keys derived from
    /// `server_secret`; the receiver yields a record per request.
    pub fn new(
        hub: Arc<crate::RelayHub>,
        server_secret: [u8; 32],
    ) -> (Arc<Gateway>, mpsc::Receiver<RequestRecord>) {
        let (records, rx) = mpsc::channel(RECORD_QUEUE);
        let gw = Gateway {
            server_secret,
            hub,
            inner: Default::default(),
            records,
            pool: Default::default(),
        };
        (Arc::new(gw), rx)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The public key of the member in `account_id` (for network maps).
    pub fn member_public_key(&self, account_id: i64) -> [u8; 32] {
        member_public_key(&self.server_secret, account_id)
    }

    /// What the gateway currently knows of an account.
    pub fn account(&self, account_id: i64) -> Option<Arc<AccountSnapshot>> {
        self.lock()
            .accounts
            .get(&account_id)
            .map(|a| a.snap.clone())
    }

    /// Queues one request record for the control plane (dropped when the
    /// queue is full).
    pub fn record(&self, r: RequestRecord) {
        if self.records.try_send(r).is_err() {
            tracing::warn!("request log queue full: a record was dropped");
        }
    }

    /// Replaces what the gateway knows of an account. Streams of bindings no
    /// longer in it (revoked or expired) are closed at once.
    pub fn set_account(&self, snapshot: AccountSnapshot) {
        let id = snapshot.account_id;
        let snap = Arc::new(snapshot);
        let filter = Arc::new(match &snap.filter {
            Some(spec) => Filter::compile(spec),
            None => Filter::allow_all(),
        });
        let now = unix_now();
        let mut inner = self.lock();
        let inner = &mut *inner;
        let old = inner.accounts.remove(&id);
        let (mut member, mut cancels, old_bindings) = match old {
            Some(a) => (a.member, a.cancels, a.snap.bindings.clone()),
            None => (None, HashMap::new(), Vec::new()),
        };
        for b in &old_bindings {
            if !snap.bindings.iter().any(|n| n.id == b.id) {
                if let Some(c) = cancels.remove(&b.id) {
                    c.cancel();
                }
                inner.by_public_id.remove(&b.public_id);
                let expired = b.expires_at.is_some_and(|t| t <= now);
                inner
                    .gone
                    .insert(b.public_id.clone(), (b.name.clone(), expired));
            }
        }
        for b in &snap.bindings {
            cancels.entry(b.id).or_default();
            inner.by_public_id.insert(b.public_id.clone(), id);
            inner.gone.remove(&b.public_id);
        }
        match &member {
            Some(m) => m.update(snap.clone(), filter.clone()),
            None if !snap.bindings.is_empty() => {
                match member::Member::start(
                    self.hub.clone(),
                    member_secret(&self.server_secret, id),
                    snap.clone(),
                    filter.clone(),
                ) {
                    Ok(m) => member = Some(Arc::new(m)),
                    Err(e) => {
                        tracing::warn!(account = %snap.name, error = %format!("{e:#}"), "the gateway cannot join")
                    }
                }
            }
            None => {}
        }
        inner.accounts.insert(
            id,
            AccountState {
                snap,
                filter,
                member,
                cancels,
            },
        );
    }

    /// Forgets an account (deleted): its member leaves, its streams close.
    pub fn remove_account(&self, account_id: i64) {
        let mut inner = self.lock();
        if let Some(a) = inner.accounts.remove(&account_id) {
            for c in a.cancels.values() {
                c.cancel();
            }
            for b in &a.snap.bindings {
                inner.by_public_id.remove(&b.public_id);
            }
        }
    }

    /// Checks `b_<public_id>:<secret>`.
    pub(crate) fn grant(&self, public_id: &str, secret: &str) -> Result<Grant, AuthError> {
        let inner = self.lock();
        let Some(account) = inner
            .by_public_id
            .get(public_id)
            .and_then(|id| inner.accounts.get(id))
        else {
            return Err(match inner.gone.get(public_id) {
                Some((name, true)) => AuthError::Expired(name.clone()),
                Some((name, false)) => AuthError::Revoked(name.clone()),
                None => AuthError::Unknown,
            });
        };
        let Some(binding) = account
            .snap
            .bindings
            .iter()
            .find(|b| b.public_id == public_id)
        else {
            return Err(AuthError::Unknown);
        };
        let given = hash_secret(secret);
        let diff = given
            .iter()
            .zip(binding.secret_hash.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 {
            return Err(AuthError::Unknown);
        }
        if binding.expires_at.is_some_and(|t| t <= unix_now()) {
            return Err(AuthError::Expired(binding.name.clone()));
        }
        let Some(member) = account.member.clone() else {
            return Err(AuthError::NoMember(
                "the account's member did not start".to_string(),
            ));
        };
        Ok(Grant {
            account: account.snap.clone(),
            filter: account.filter.clone(),
            member,
            binding: binding.clone(),
            cancel: account
                .cancels
                .get(&binding.id)
                .cloned()
                .unwrap_or_default(),
        })
    }

    /// Serves agents on `listener` (TLS when `tls` is given) until dropped.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) {
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        loop {
            let (sock, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "gateway accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = sock.set_nodelay(true);
            let gw = self.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                match acceptor {
                    None => http::serve_connection(gw, sock, peer).await,
                    Some(acceptor) => {
                        match tokio::time::timeout(
                            std::time::Duration::from_secs(10),
                            acceptor.accept(sock),
                        )
                        .await
                        {
                            Ok(Ok(tls)) => http::serve_connection(gw, tls, peer).await,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "gateway TLS handshake failed")
                            }
                            Err(_) => tracing::debug!(%peer, "gateway TLS handshake timed out"),
                        }
                    }
                }
            });
        }
    }
}

impl Grant {
    /// Resolves a host (name or address) of the account to an address and
    /// the peer that owns it (None: no node or routed subnet has it).
    pub(crate) fn resolve(
        &self,
        host: &str,
    ) -> Result<(Ipv4Addr, Option<GatewayPeer>), http::GwError> {
        let snap = &self.account;
        let ip = if let Ok(ip) = host.parse::<Ipv4Addr>() {
            ip
        } else {
            let find = |n: &str| snap.names.iter().find(|(k, _)| k == n).map(|(_, ip)| *ip);
            let mut found = find(host);
            if found.is_none() && !host.contains('.') {
                if let Some(domain) = &snap.domain {
                    found = find(&format!("{host}.{domain}"));
                }
                if found.is_none() {
                    found = snap.peers.iter().find(|p| p.name == host).map(|p| p.ip);
                }
            }
            match found {
                Some(ip) => ip,
                None => {
                    return Err(http::GwError::new(
                        ::http::StatusCode::NOT_FOUND,
                        "unknown_host",
                        format!(
                            "no node or name {host:?} in account {}{}",
                            snap.name,
                            snap.domain
                                .as_deref()
                                .map(|d| format!(" (names end in .{d})"))
                                .unwrap_or_default()
                        ),
                    ))
                }
            }
        };
        Ok((ip, owner(snap, ip).cloned()))
    }

    /// What the binding may reach (see `docs/gateway.md`).
    pub(crate) fn services(&self) -> Vec<serde_json::Value> {
        let snap = &self.account;
        let me = self.binding.ip;
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut push = |name: String, addr: String, ip: Ipv4Addr| {
            if !seen.insert(name.clone()) || !self.filter.may_talk(me, ip) {
                return;
            }
            let peer = owner(snap, ip);
            out.push(serde_json::json!({
                "name": name,
                "address": addr,
                "node": peer.map(|p| p.name.clone()),
                "online": peer.is_some_and(|p| p.online),
                "ports": allowed_ports(snap.filter.as_ref(), me, ip),
            }));
        };
        for (name, ip) in &snap.names {
            push(name.clone(), ip.to_string(), *ip);
        }
        for p in &snap.peers {
            for net in p.allowed_ips.iter().filter(|n| n.prefix_len() < 32) {
                push(net.to_string(), net.to_string(), net.network());
            }
        }
        out
    }
}

/// The peer whose allowed addresses hold `ip` (longest prefix).
fn owner(snap: &AccountSnapshot, ip: Ipv4Addr) -> Option<&GatewayPeer> {
    snap.peers
        .iter()
        .filter_map(|p| {
            p.allowed_ips
                .iter()
                .filter(|n| n.contains(&ip))
                .map(|n| n.prefix_len())
                .max()
                .map(|len| (len, p))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, p)| p)
}

/// The port ranges of the rules that let `src` reach `dst`, in the policy's
/// words (`tcp:5432`, `*`), up to the first rule that denies everything.
fn allowed_ports(spec: Option<&FilterSpec>, src: Ipv4Addr, dst: Ipv4Addr) -> Vec<String> {
    let Some(spec) = spec else {
        return vec!["*".to_string()];
    };
    let mut out = Vec::new();
    for r in &spec.rules {
        if !(r.src.iter().any(|n| n.contains(&src)) && r.dst.iter().any(|n| n.contains(&dst))) {
            continue;
        }
        let any = r.ports.is_empty() || r.ports.iter().any(|p| p.proto.is_none());
        if r.allow {
            if any {
                out.push("*".to_string());
                break;
            }
            out.extend(r.ports.iter().map(port_text));
        } else if any {
            return out;
        }
    }
    if spec.default_allow && !out.iter().any(|p| p == "*") {
        out.push("*".to_string());
    }
    out.dedup();
    out
}

fn port_text(p: &trellis_policy::PortRange) -> String {
    let proto = match p.proto {
        None => return "*".to_string(),
        Some(trellis_policy::PROTO_TCP) => "tcp",
        Some(trellis_policy::PROTO_UDP) => "udp",
        Some(trellis_policy::PROTO_ICMP) => return "icmp".to_string(),
        Some(n) => return format!("proto {n}"),
    };
    if p.lo == 0 && p.hi == u16::MAX {
        proto.to_string()
    } else if p.lo == p.hi {
        format!("{proto}:{}", p.lo)
    } else {
        format!("{proto}:{}-{}", p.lo, p.hi)
    }
}
