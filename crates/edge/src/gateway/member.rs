//! The gateway's member of one account's network: a WireGuard identity on
//! the relay hub (attached like a node on the TCP relay, so it reaches nodes
//! behind any NAT over the registrations they already keep), a tunnel core
//! with the account's nodes as peers and its policy as filter, and a
//! userspace TCP/IP stack owning the bindings' addresses.
//!
//! One task per member owns the tunnel: packets the stack emits are
//! encrypted and handed to the hub; frames the hub queues for the member are
//! decrypted and handed to the stack; timers drive handshakes and keepalives.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use trellis_policy::Filter;
use trellis_tunnel::{Action, FlowEnd, PeerConfig, Tunnel, Via};

use super::netstack::{NetStack, TcpStream};
use super::AccountSnapshot;
use crate::RelayHub;

/// Largest packet the member's stack emits: the mesh's tunnel MTU.
pub const MEMBER_MTU: usize = trellis_proto::DEFAULT_MTU as usize;
/// Packets from the stack queued for encryption before further ones are dropped.
const OUTBOUND_QUEUE: usize = 4096;
/// How often the tunnel's timers run.
const TICK: Duration = Duration::from_millis(100);
/// Room for one encrypted frame (relay header + WireGuard overhead + packet).
const OUT_BUF: usize = 65_536;

/// What the member applies: the account's snapshot and its compiled policy.
type Config = (Arc<AccountSnapshot>, Arc<Filter>);

/// A running member; dropping it stops its task and detaches it from the hub.
pub struct Member {
    stack: NetStack,
    config: watch::Sender<Config>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Member {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Member {
    /// Joins the account's network as `secret` on `hub`; `filter` is the
    /// snapshot's policy, compiled.
    pub fn start(
        hub: Arc<RelayHub>,
        secret: trellis_tunnel::StaticSecret,
        snapshot: Arc<AccountSnapshot>,
        filter: Arc<Filter>,
    ) -> anyhow::Result<Member> {
        let account_id = snapshot.account_id;
        let mut tunnel = Tunnel::new(secret, rand_seed(account_id));
        let key = tunnel.public_key();
        let (conn_id, frames) = hub
            .attach_ws(account_id, &key)
            .map_err(|e| anyhow::anyhow!("the gateway cannot join account {account_id}: {e}"))?;
        tunnel.set_tcp_relay(true);
        let (out_tx, out_rx) = mpsc::channel(OUTBOUND_QUEUE);
        let stack = NetStack::spawn(MEMBER_MTU, out_tx);
        let addrs: Vec<Ipv4Addr> = snapshot.bindings.iter().map(|b| b.ip).collect();
        stack.set_addresses(&addrs);
        let (config, config_rx) = watch::channel((snapshot, filter));
        let run = Run {
            hub,
            key,
            conn_id,
            tunnel,
            stack: stack.clone(),
            out: vec![0u8; OUT_BUF],
            flows: Vec::new(),
        };
        let task = tokio::spawn(run.serve(frames, out_rx, config_rx));
        Ok(Member {
            stack,
            config,
            task,
        })
    }

    /// Applies a new snapshot of the account (peers, bindings) and its
    /// compiled policy.
    pub fn update(&self, snapshot: Arc<AccountSnapshot>, filter: Arc<Filter>) {
        self.config.send_replace((snapshot, filter));
    }

    /// The member's userspace stack.
    pub fn stack(&self) -> &NetStack {
        &self.stack
    }

    /// Dials `dst` from `src` (a binding's address) through the mesh.
    pub async fn connect(
        &self,
        src: Ipv4Addr,
        dst: SocketAddrV4,
        timeout: Duration,
    ) -> std::io::Result<TcpStream> {
        self.stack.connect(src, dst, timeout).await
    }
}

fn rand_seed(account_id: i64) -> u64 {
    use rand::RngCore;
    rand::thread_rng().next_u64() ^ account_id as u64
}

struct Run {
    hub: Arc<RelayHub>,
    key: [u8; 32],
    conn_id: u64,
    tunnel: Tunnel,
    stack: NetStack,
    out: Vec<u8>,
    flows: Vec<FlowEnd>,
}

impl Drop for Run {
    fn drop(&mut self) {
        self.hub.detach_ws(&self.key, self.conn_id);
    }
}

impl Run {
    async fn serve(
        mut self,
        mut frames: mpsc::Receiver<Vec<u8>>,
        mut packets: mpsc::Receiver<Vec<u8>>,
        mut config: watch::Receiver<Config>,
    ) {
        let (snapshot, filter) = config.borrow_and_update().clone();
        self.apply(&snapshot, filter);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                frame = frames.recv() => match frame {
                    Some(frame) => {
                        self.on_frame(&frame);
                        // Take whatever else is queued before yielding.
                        while let Ok(frame) = frames.try_recv() {
                            self.on_frame(&frame);
                        }
                    }
                    None => {
                        tracing::warn!("the gateway's relay attachment was replaced; member stops");
                        return;
                    }
                },
                packet = packets.recv() => match packet {
                    Some(packet) => {
                        self.on_packet(&packet);
                        while let Ok(packet) = packets.try_recv() {
                            self.on_packet(&packet);
                        }
                    }
                    None => return,
                },
                changed = config.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let (snapshot, filter) = config.borrow_and_update().clone();
                    self.apply(&snapshot, filter);
                }
                _ = tick.tick() => self.timers(),
            }
        }
    }

    fn apply(&mut self, snap: &AccountSnapshot, filter: Arc<Filter>) {
        let now = Instant::now();
        let peers = snap
            .peers
            .iter()
            .map(|p| PeerConfig {
                public_key: p.public_key,
                name: p.name.clone(),
                allowed_ips: p.allowed_ips.clone(),
                endpoints: Vec::new(),
            })
            .collect();
        self.tunnel.set_peers(now, peers);
        self.tunnel.set_filter(now, filter);
        let addrs: Vec<Ipv4Addr> = snap.bindings.iter().map(|b| b.ip).collect();
        self.stack.set_addresses(&addrs);
    }

    /// Sends what an action asks for to the hub.
    fn act(&mut self, action: Action) {
        match action {
            Action::SendRelayTcp { offset, len } => {
                let now = Instant::now();
                self.hub
                    .handle_ws_frame(now, &self.key, &self.out[offset..offset + len]);
            }
            Action::Deliver { offset, len } => {
                self.stack.deliver(&self.out[offset..offset + len]);
            }
            // The member has no UDP socket: every path is the TCP relay.
            Action::Send { .. } | Action::None => {}
            Action::Drop(reason) => {
                tracing::trace!(%reason, "gateway member dropped a packet");
            }
        }
    }

    fn flush(&mut self) {
        loop {
            let action = self.tunnel.poll_flush(Instant::now(), &mut self.out);
            if action == Action::None {
                return;
            }
            self.act(action);
        }
    }

    fn on_frame(&mut self, frame: &[u8]) {
        let action = self
            .tunnel
            .handle_relay_tcp_frame(Instant::now(), frame, &mut self.out);
        self.act(action);
        self.flush();
    }

    fn on_packet(&mut self, packet: &[u8]) {
        let action = self
            .tunnel
            .handle_tun_packet(Instant::now(), packet, &mut self.out);
        self.act(action);
        self.flush();
    }

    fn timers(&mut self) {
        let hub = self.hub.clone();
        let key = self.key;
        let mut out = std::mem::take(&mut self.out);
        self.tunnel
            .poll_timers(Instant::now(), &mut out, |via, bytes| {
                if via == Via::RelayTcp {
                    hub.handle_ws_frame(Instant::now(), &key, bytes);
                }
            });
        self.out = out;
        // The request log covers the gateway's connections; the tunnel's own
        // flow records are not kept.
        self.flows.clear();
        self.tunnel.drain_flows(&mut self.flows);
        self.flows.clear();
    }
}
