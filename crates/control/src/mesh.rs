//! Mesh nodes and names, as pure functions: which subnets a node may
//! advertise, which node is primary for each approved subnet, what DNS names
//! and suffixes look like, and the DNS configuration of an account.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use ipnet::Ipv4Net;
use trellis_proto::{DnsConfig, DnsRecord, OVERLAY_SPACE};

use crate::store::{overlay_space, Account, Node};

/// The widest subnet a node may advertise.
pub const MIN_ROUTE_PREFIX: u8 = 8;
/// At most this many subnets per node.
pub const MAX_ROUTES_PER_NODE: usize = 64;
/// Longest extra record name (relative to the account's domain).
pub const MAX_RECORD_NAME: usize = 200;
/// Longest fully qualified name (RFC 1035, without the trailing dot).
pub const MAX_FQDN: usize = 253;

/// Checks one advertised subnet: a network address (no host bits), not the
/// default route, /8 or longer, and clear of the overlay space.
pub fn validate_route(net: &Ipv4Net) -> Result<(), String> {
    if net.addr() != net.network() {
        return Err(format!(
            "{net} has host bits set; did you mean {}?",
            net.trunc()
        ));
    }
    if net.prefix_len() == 0 {
        return Err(format!(
            "{net} is a default route (an exit node); exit nodes are not supported yet — advertise the subnets themselves"
        ));
    }
    if net.prefix_len() < MIN_ROUTE_PREFIX {
        return Err(format!(
            "{net} is too wide: advertise subnets of /{MIN_ROUTE_PREFIX} or longer"
        ));
    }
    let space = overlay_space();
    if space.contains(net) || net.contains(&space) {
        return Err(format!(
            "{net} overlaps the overlay block {OVERLAY_SPACE}; mesh addresses cannot be routed to a subnet"
        ));
    }
    Ok(())
}

/// Checks a whole list of advertised subnets (at enrollment): every problem
/// is reported, in the order given; duplicates are dropped, order kept.
pub fn validate_routes(routes: &[Ipv4Net]) -> Result<Vec<Ipv4Net>, String> {
    let errors: Vec<String> = routes
        .iter()
        .filter_map(|r| validate_route(r).err())
        .collect();
    if !errors.is_empty() {
        return Err(format!("invalid advertised route: {}", errors.join("; ")));
    }
    let out = dedup(routes.iter().copied());
    if out.len() > MAX_ROUTES_PER_NODE {
        return Err(format!(
            "{} routes advertised; a node may advertise at most {MAX_ROUTES_PER_NODE} (summarise them into wider subnets)",
            out.len()
        ));
    }
    Ok(out)
}

/// Keeps the valid subnets of a Hello (logging the others), without duplicates.
pub fn filter_routes(node: &str, routes: &[Ipv4Net]) -> Vec<Ipv4Net> {
    let mut ok = Vec::new();
    for r in routes {
        match validate_route(r) {
            Ok(()) => ok.push(*r),
            Err(e) => tracing::warn!(node, error = %e, "ignoring an advertised route"),
        }
    }
    let mut out = dedup(ok.into_iter());
    if out.len() > MAX_ROUTES_PER_NODE {
        tracing::warn!(
            node,
            advertised = out.len(),
            "too many advertised routes; keeping the first {MAX_ROUTES_PER_NODE}"
        );
        out.truncate(MAX_ROUTES_PER_NODE);
    }
    out
}

fn dedup(routes: impl Iterator<Item = Ipv4Net>) -> Vec<Ipv4Net> {
    let mut seen = HashSet::new();
    routes.filter(|r| seen.insert(*r)).collect()
}

/// An approved subnet of a node, with its place in the approval order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovedRoute {
    pub node_id: i64,
    pub cidr: Ipv4Net,
    /// Lower was approved earlier.
    pub seq: i64,
}

/// The primary node of each approved subnet: the first (by approval, then
/// node id) that is online; when none is, the one that was primary before
/// (if it still has the subnet approved), else the first.
pub fn pick_primaries(
    approved: &[ApprovedRoute],
    online: &HashSet<i64>,
    previous: &HashMap<Ipv4Net, i64>,
) -> BTreeMap<Ipv4Net, i64> {
    let mut by_cidr: BTreeMap<Ipv4Net, Vec<&ApprovedRoute>> = BTreeMap::new();
    for r in approved {
        by_cidr.entry(r.cidr).or_default().push(r);
    }
    by_cidr
        .into_iter()
        .filter_map(|(cidr, mut candidates)| {
            candidates.sort_by_key(|r| (r.seq, r.node_id));
            let first_online = candidates.iter().find(|r| online.contains(&r.node_id));
            let kept = previous
                .get(&cidr)
                .and_then(|p| candidates.iter().find(|r| r.node_id == *p));
            first_online
                .or(kept)
                .or(candidates.first())
                .map(|r| (cidr, r.node_id))
        })
        .collect()
}

/// Subnets each node is primary for, sorted.
pub fn routes_by_node(primaries: &BTreeMap<Ipv4Net, i64>) -> HashMap<i64, Vec<Ipv4Net>> {
    let mut out: HashMap<i64, Vec<Ipv4Net>> = HashMap::new();
    for (cidr, node) in primaries {
        out.entry(*node).or_default().push(*cidr);
    }
    out
}

fn valid_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

/// Checks the server's DNS suffix, e.g. `mesh` or `corp.example`.
pub fn validate_dns_suffix(suffix: &str) -> Result<(), String> {
    if suffix.is_empty() || suffix.len() > 100 || !suffix.split('.').all(valid_label) {
        return Err(format!(
            "invalid DNS suffix {suffix:?}: use dot-separated labels of lower-case letters, digits and dashes (each 1-63 characters, not starting or ending with a dash), at most 100 characters, e.g. \"mesh\""
        ));
    }
    Ok(())
}

/// Checks the name of an extra record, relative to the account's domain.
pub fn validate_record_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_RECORD_NAME || !name.split('.').all(valid_label) {
        return Err(format!(
            "invalid record name {name:?}: use dot-separated labels of lower-case letters, digits and dashes (each 1-63 characters, not starting or ending with a dash), at most {MAX_RECORD_NAME} characters, e.g. \"db\" or \"db.prod\""
        ));
    }
    Ok(())
}

/// Checks the address of an extra record.
pub fn validate_record_addr(addr: &IpAddr) -> Result<(), String> {
    if addr.is_unspecified() || addr.is_multicast() || addr.is_loopback() {
        return Err(format!(
            "{addr} cannot be a record's address: give the address of a host (not unspecified, loopback or multicast)"
        ));
    }
    if let IpAddr::V4(v4) = addr {
        if v4.is_broadcast() {
            return Err(format!(
                "{addr} cannot be a record's address: give the address of a host"
            ));
        }
    }
    Ok(())
}

/// The domain of an account: `ACCOUNT.SUFFIX`.
pub fn account_domain(account: &str, suffix: &str) -> String {
    format!("{account}.{suffix}")
}

/// The names of one account: every node, then the extra records, sorted by name.
pub fn dns_config(
    account: &Account,
    nodes: &[Node],
    extra: &[(String, IpAddr)],
    suffix: &str,
) -> DnsConfig {
    let domain = account_domain(&account.name, suffix);
    let mut records: Vec<DnsRecord> = nodes
        .iter()
        .filter(|n| n.account_id == account.id)
        .map(|n| DnsRecord {
            name: format!("{}.{domain}", n.name),
            addr: IpAddr::V4(n.ip),
        })
        .chain(extra.iter().map(|(name, addr)| DnsRecord {
            name: format!("{name}.{domain}"),
            addr: *addr,
        }))
        .collect();
    records.sort_by(|a, b| a.name.cmp(&b.name).then(a.addr.cmp(&b.addr)));
    DnsConfig { domain, records }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn route_validation() {
        assert!(validate_route(&net("198.19.10.0/24")).is_ok());
        assert!(validate_route(&net("10.0.0.0/8")).is_ok());
        assert!(validate_route(&net("192.168.1.7/32")).is_ok());
        assert_eq!(
            validate_route(&net("198.19.10.5/24")).unwrap_err(),
            "198.19.10.5/24 has host bits set; did you mean 198.19.10.0/24?"
        );
        for overlapping in [
            "100.64.0.0/10",
            "100.65.3.0/24",
            "100.0.0.0/8",
            "100.0.0.0/9",
        ] {
            let e = validate_route(&net(overlapping)).unwrap_err();
            assert!(
                e.contains("overlaps the overlay block 100.64.0.0/10"),
                "{overlapping}: {e}"
            );
        }
        assert!(validate_route(&net("100.128.0.0/16")).is_ok(), "just above");
        assert!(validate_route(&net("100.63.0.0/16")).is_ok(), "just below");
        assert!(validate_route(&net("0.0.0.0/0"))
            .unwrap_err()
            .contains("exit nodes are not supported yet"));
        assert!(validate_route(&net("96.0.0.0/4"))
            .unwrap_err()
            .contains("too wide"));
        assert_eq!(
            validate_routes(&[net("10.1.0.0/16"), net("10.1.0.0/16"), net("10.2.0.0/16")]).unwrap(),
            [net("10.1.0.0/16"), net("10.2.0.0/16")]
        );
        let e = validate_routes(&[net("10.1.0.0/16"), net("10.2.0.1/16")]).unwrap_err();
        assert!(e.contains("did you mean 10.2.0.0/16?"), "{e}");
        assert_eq!(
            filter_routes("n", &[net("10.2.0.1/16"), net("10.3.0.0/16")]),
            [net("10.3.0.0/16")]
        );
    }

    #[test]
    fn primaries_prefer_first_online_then_stay() {
        let c = net("198.19.10.0/24");
        let r = |node_id, seq| ApprovedRoute {
            node_id,
            cidr: c,
            seq,
        };
        let approved = vec![r(5, 2), r(3, 1), r(7, 1)];
        let none = HashMap::new();
        let all: HashSet<i64> = [3, 5, 7].into();
        // Approval order first, node id breaks ties.
        assert_eq!(pick_primaries(&approved, &all, &none)[&c], 3);
        let online: HashSet<i64> = [5, 7].into();
        assert_eq!(pick_primaries(&approved, &online, &none)[&c], 7);
        let online: HashSet<i64> = [5].into();
        assert_eq!(pick_primaries(&approved, &online, &none)[&c], 5);
        // Nobody online: the previous primary stays.
        let prev: HashMap<Ipv4Net, i64> = [(c, 5)].into();
        assert_eq!(pick_primaries(&approved, &HashSet::new(), &prev)[&c], 5);
        // ...unless it no longer has the route: then the first.
        let prev: HashMap<Ipv4Net, i64> = [(c, 9)].into();
        assert_eq!(pick_primaries(&approved, &HashSet::new(), &prev)[&c], 3);
        assert!(pick_primaries(&[], &all, &prev).is_empty());
        let by_node = routes_by_node(&pick_primaries(&approved, &all, &none));
        assert_eq!(by_node[&3], [c]);
        assert!(!by_node.contains_key(&5));
    }

    #[test]
    fn dns_names() {
        assert!(validate_dns_suffix("mesh").is_ok());
        assert!(validate_dns_suffix("corp.example").is_ok());
        for bad in ["", "Mesh", "a..b", ".mesh", "mesh.", "-x", "a_b"] {
            assert!(validate_dns_suffix(bad).is_err(), "{bad:?}");
        }
        assert!(validate_record_name("db").is_ok());
        assert!(validate_record_name("db.prod").is_ok());
        for bad in ["", "DB", "db.", "a..b", "-a", "a b", "x_y"] {
            assert!(validate_record_name(bad).is_err(), "{bad:?}");
        }
        let long = [
            "a".repeat(60),
            "b".repeat(60),
            "c".repeat(60),
            "d".repeat(19),
        ]
        .join(".");
        assert_eq!(long.len(), 202);
        assert!(validate_record_name(&long).is_err());
        assert!(validate_record_addr(&"198.19.10.5".parse().unwrap()).is_ok());
        assert!(validate_record_addr(&"0.0.0.0".parse().unwrap()).is_err());
        assert!(validate_record_addr(&"224.0.0.1".parse().unwrap()).is_err());
    }
}
