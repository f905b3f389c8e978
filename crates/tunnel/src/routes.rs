//! Allowed-IPs routing ("cryptokey routing"): which peer an overlay address
//! belongs to. Host routes (/32, the common case: one per node) are a hash
//! lookup; shorter prefixes (subnets behind mesh nodes, a later feature) are a
//! longest-prefix match over a short list. The last answer is remembered:
//! a node mostly talks to the peer it talked to last, and both the send
//! path (where to) and the receive path (is the source allowed) ask for the
//! same address, so a round trip asks the map once instead of twice from a
//! cold cache.

use std::cell::Cell;
use std::collections::HashMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::fasthash::FoldBuild;

#[derive(Debug, Clone)]
pub struct RouteTable<T: Copy + Eq> {
    hosts: HashMap<Ipv4Addr, T, FoldBuild>,
    /// Sorted by prefix length, longest first.
    prefixes: Vec<(Ipv4Net, T)>,
    /// The last lookup and its answer; forgotten on every change.
    memo: Cell<Option<(Ipv4Addr, Option<T>)>>,
}

impl<T: Copy + Eq> Default for RouteTable<T> {
    fn default() -> Self {
        RouteTable {
            hosts: HashMap::default(),
            prefixes: Vec::new(),
            memo: Cell::new(None),
        }
    }
}

impl<T: Copy + Eq> RouteTable<T> {
    /// Routes `net` to `to`, replacing whoever had exactly that prefix before.
    pub fn insert(&mut self, net: Ipv4Net, to: T) {
        self.memo.set(None);
        let net = net.trunc();
        if net.prefix_len() == 32 {
            self.hosts.insert(net.addr(), to);
            return;
        }
        self.prefixes.retain(|(n, _)| *n != net);
        self.prefixes.push((net, to));
        self.prefixes
            .sort_by_key(|(n, _)| std::cmp::Reverse(n.prefix_len()));
    }

    /// Removes every route that points at `to`.
    pub fn remove_target(&mut self, to: T) {
        self.memo.set(None);
        self.hosts.retain(|_, t| *t != to);
        self.prefixes.retain(|(_, t)| *t != to);
    }

    pub fn lookup(&self, ip: Ipv4Addr) -> Option<T> {
        if let Some((at, answer)) = self.memo.get() {
            if at == ip {
                return answer;
            }
        }
        let answer = self.lookup_uncached(ip);
        self.memo.set(Some((ip, answer)));
        answer
    }

    fn lookup_uncached(&self, ip: Ipv4Addr) -> Option<T> {
        if let Some(t) = self.hosts.get(&ip) {
            return Some(*t);
        }
        self.prefixes
            .iter()
            .find(|(n, _)| n.contains(&ip))
            .map(|(_, t)| *t)
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty() && self.prefixes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins_and_hosts_first() {
        let mut t = RouteTable::default();
        t.insert(net("100.64.0.0/16"), 1u32);
        t.insert(net("100.64.1.0/24"), 2);
        t.insert(net("100.64.1.7/32"), 3);
        assert_eq!(t.lookup("100.64.1.7".parse().unwrap()), Some(3));
        assert_eq!(t.lookup("100.64.1.8".parse().unwrap()), Some(2));
        assert_eq!(t.lookup("100.64.2.8".parse().unwrap()), Some(1));
        assert_eq!(t.lookup("100.65.0.1".parse().unwrap()), None);
        t.remove_target(2);
        assert_eq!(t.lookup("100.64.1.8".parse().unwrap()), Some(1));
        t.remove_target(1);
        t.remove_target(3);
        assert!(t.is_empty());
    }

    #[test]
    fn a_remembered_answer_follows_every_change() {
        let ip: Ipv4Addr = "100.64.1.7".parse().unwrap();
        let mut t = RouteTable::default();
        assert_eq!(t.lookup(ip), None);
        t.insert(net("100.64.1.0/24"), 2u32);
        assert_eq!(
            t.lookup(ip),
            Some(2),
            "a new route replaces a remembered miss"
        );
        t.insert(net("100.64.1.7/32"), 3);
        assert_eq!(t.lookup(ip), Some(3), "a more specific route wins at once");
        assert_eq!(t.lookup(ip), Some(3));
        t.insert(net("100.64.1.7/32"), 4);
        assert_eq!(
            t.lookup(ip),
            Some(4),
            "the host route moved to another peer"
        );
        t.remove_target(4);
        assert_eq!(t.lookup(ip), Some(2), "back to the subnet route");
        assert_eq!(t.lookup("100.64.1.8".parse().unwrap()), Some(2));
        t.remove_target(2);
        assert_eq!(t.lookup(ip), None, "no route left");
        assert_eq!(t.lookup("100.64.1.8".parse().unwrap()), None);
    }

    #[test]
    fn host_bits_of_a_prefix_are_ignored() {
        let mut t = RouteTable::default();
        t.insert(net("198.19.10.5/24"), 9u32);
        assert_eq!(t.lookup("198.19.10.200".parse().unwrap()), Some(9));
    }
}
