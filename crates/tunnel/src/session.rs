//! One WireGuard session with one peer: boringtun's `noise::Tunn` behind a type of
//! ours, so that the rest of the core never names boringtun and a maintained fork
//! (gotatun) can replace it in this one file.
//!
//! boringtun keeps its own monotonic clock for the Noise timers (rekey, keepalive,
//! handshake retry); everything else in this crate is driven by the `now` passed in.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

/// What a session call produced. Bytes are in the caller's output buffer at
/// `out[offset..offset + len]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionOutput {
    /// Nothing to do (a packet was queued waiting for a handshake, or a keepalive was absorbed).
    Done,
    /// Send this datagram to the peer.
    ToNetwork { offset: usize, len: usize },
    /// Deliver this decrypted IP packet, whose source address is `src`.
    ToTunnel {
        offset: usize,
        len: usize,
        src: IpAddr,
    },
    /// The packet was rejected (bad MAC, replay, unknown session, ...).
    Rejected(SessionError),
}

/// Why a session rejected or could not handle a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("no session established yet")]
    NoSession,
    #[error("data for a session this node does not have (the sender's is from before a restart)")]
    UnknownSession,
    #[error("the session expired; a new handshake is needed")]
    Expired,
    #[error("packet failed authentication or was replayed")]
    BadPacket,
    #[error("under load: handshake must carry a cookie")]
    UnderLoad,
    #[error("output buffer too small")]
    BufferTooSmall,
}

fn map_err(e: WireGuardError) -> SessionError {
    match e {
        WireGuardError::NoCurrentSession => SessionError::NoSession,
        WireGuardError::WrongIndex => SessionError::UnknownSession,
        WireGuardError::ConnectionExpired => SessionError::Expired,
        WireGuardError::DestinationBufferTooSmall => SessionError::BufferTooSmall,
        WireGuardError::UnderLoad => SessionError::UnderLoad,
        _ => SessionError::BadPacket,
    }
}

/// Counters of one session, as `trellis status` shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SessionStats {
    pub since_last_handshake: Option<Duration>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

pub struct Session {
    tunn: Tunn,
}

/// Converts boringtun's result into ours. `base` is the address of the caller's
/// output buffer, so that the bytes boringtun wrote are named by offset.
fn output(base: usize, r: TunnResult<'_>) -> SessionOutput {
    match r {
        TunnResult::Done => SessionOutput::Done,
        TunnResult::Err(e) => SessionOutput::Rejected(map_err(e)),
        TunnResult::WriteToNetwork(b) => SessionOutput::ToNetwork {
            offset: b.as_ptr() as usize - base,
            len: b.len(),
        },
        TunnResult::WriteToTunnelV4(b, src) => SessionOutput::ToTunnel {
            offset: b.as_ptr() as usize - base,
            len: b.len(),
            src: IpAddr::V4(src),
        },
        TunnResult::WriteToTunnelV6(b, src) => SessionOutput::ToTunnel {
            offset: b.as_ptr() as usize - base,
            len: b.len(),
            src: IpAddr::V6(src),
        },
    }
}

impl Session {
    pub(crate) fn new(
        private: StaticSecret,
        peer_public: [u8; 32],
        local_index: u32,
        keepalive_secs: Option<u16>,
        rate_limiter: Arc<RateLimiter>,
    ) -> Self {
        let tunn = Tunn::new(
            private,
            PublicKey::from(peer_public),
            None,
            keepalive_secs,
            local_index,
            Some(rate_limiter),
        );
        Session { tunn }
    }

    /// Encrypts an IP packet from the tunnel interface.
    pub(crate) fn encapsulate(&mut self, packet: &[u8], out: &mut [u8]) -> SessionOutput {
        let base = out.as_ptr() as usize;
        output(base, self.tunn.encapsulate(packet, out))
    }

    /// Handles a datagram from the network. Called with an empty `datagram`, it
    /// flushes packets that were queued while the handshake was running.
    pub(crate) fn decapsulate(
        &mut self,
        src: Option<IpAddr>,
        datagram: &[u8],
        out: &mut [u8],
    ) -> SessionOutput {
        let base = out.as_ptr() as usize;
        output(base, self.tunn.decapsulate(src, datagram, out))
    }

    /// A new handshake initiation now, even if one is in flight (it went
    /// out over a path that has since changed).
    pub(crate) fn force_handshake(&mut self, out: &mut [u8]) -> SessionOutput {
        let base = out.as_ptr() as usize;
        output(base, self.tunn.format_handshake_initiation(out, true))
    }

    pub(crate) fn update_timers(&mut self, out: &mut [u8]) -> SessionOutput {
        let base = out.as_ptr() as usize;
        output(base, self.tunn.update_timers(out))
    }

    pub(crate) fn stats(&self) -> SessionStats {
        let (since, tx, rx, _, _) = self.tunn.stats();
        SessionStats {
            since_last_handshake: since,
            tx_bytes: tx as u64,
            rx_bytes: rx as u64,
        }
    }
}
