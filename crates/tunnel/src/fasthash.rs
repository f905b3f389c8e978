//! The hasher of the data plane's maps (peers, routes, connections).
//!
//! A packet looks up a route, a peer and a connection; right after a wake-up
//! those lookups run from cold caches, where SipHash's code and rounds cost
//! more than the lookup itself. These keys come from the network map and from
//! the tunnel's own counters (peer ids), or are tracked connections whose
//! number is capped, so the seeded multiply-fold below is enough.

use std::hash::{BuildHasher, Hasher};

/// A seeded multiply-fold hasher: a few cycles per key, good spread in every bit.
#[derive(Clone, Copy)]
pub(crate) struct FoldHasher(u64);

const MUL: u64 = 0x9E37_79B9_7F4A_7C15;

#[inline]
fn fold_mul(a: u64, b: u64) -> u64 {
    let full = (a as u128).wrapping_mul(b as u128);
    (full as u64) ^ ((full >> 64) as u64)
}

impl Hasher for FoldHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(w));
        }
    }

    #[inline]
    fn write_u32(&mut self, x: u32) {
        self.write_u64(u64::from(x));
    }

    #[inline]
    fn write_u64(&mut self, x: u64) {
        self.0 = fold_mul(self.0 ^ x, MUL);
    }

    #[inline]
    fn write_usize(&mut self, x: usize) {
        self.write_u64(x as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

#[derive(Clone, Copy)]
pub(crate) struct FoldBuild(u64);

impl FoldBuild {
    pub(crate) fn new(seed: u64) -> FoldBuild {
        FoldBuild(seed)
    }

    /// A seed of its own, from the standard library's random keys.
    pub(crate) fn random() -> FoldBuild {
        FoldBuild(std::collections::hash_map::RandomState::new().hash_one(0x5EED_u64))
    }
}

impl Default for FoldBuild {
    fn default() -> FoldBuild {
        FoldBuild::random()
    }
}

impl BuildHasher for FoldBuild {
    type Hasher = FoldHasher;
    #[inline]
    fn build_hasher(&self) -> FoldHasher {
        FoldHasher(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn peer_ids_and_addresses_spread_over_the_buckets() {
        let b = FoldBuild::new(7);
        let ids: HashSet<u64> = (1..=1024u32).map(|id| b.hash_one(id) & 1023).collect();
        let ips: HashSet<u64> = (0..1024u32)
            .map(|i| b.hash_one(std::net::Ipv4Addr::from(0x6440_0000 + i)) & 1023)
            .collect();
        // A uniform hash fills about 63% of 1024 buckets with 1024 keys.
        assert!(ids.len() > 550, "peer ids: {}", ids.len());
        assert!(ips.len() > 550, "addresses: {}", ips.len());
    }

    #[test]
    fn two_tables_do_not_share_a_seed() {
        assert_ne!(
            FoldBuild::random().hash_one(1u32),
            FoldBuild::random().hash_one(1u32)
        );
    }
}
