//! Turning names into addresses.

use std::collections::{BTreeMap, HashMap};

use ipnet::Ipv4Net;

use crate::{Action, Directory, FilterRule, FilterSpec, Policy, PortRange, Selector};

/// Turns names into addresses. Returns the spec and warnings for names that
/// match nothing yet (a node that has not joined, a tag nobody carries).
///
/// `*` is `0.0.0.0/0`; a node name its address /32; `tag:T` every node and
/// binding carrying T; `group:G` the union of its members; `binding:B` the
/// binding's address. Each rule's prefixes are deduplicated and aggregated.
/// Rules keep their order; a rule whose sources or destinations resolved to
/// nothing is kept and matches nothing. One warning is given per name that
/// matches nothing, naming the rules that use it.
pub fn resolve(policy: &Policy, dir: &Directory) -> (FilterSpec, Vec<String>) {
    let mut nodes: HashMap<&str, Ipv4Net> = HashMap::new();
    let mut tags: HashMap<&str, Vec<Ipv4Net>> = HashMap::new();
    for n in &dir.nodes {
        nodes.insert(n.name.as_str(), host(n.ip));
        for t in &n.tags {
            tags.entry(t.as_str()).or_default().push(host(n.ip));
        }
    }
    let mut bindings: HashMap<&str, Ipv4Net> = HashMap::new();
    for b in &dir.bindings {
        bindings.insert(b.name.as_str(), host(b.ip));
        for t in &b.tags {
            tags.entry(t.as_str()).or_default().push(host(b.ip));
        }
    }

    let r = Resolver {
        policy,
        nodes,
        tags,
        bindings,
    };
    // What matched nothing -> names of the rules that use it.
    let mut missing: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut rules = Vec::with_capacity(policy.rules.len());
    for rule in &policy.rules {
        let mut side = |sels: &[Selector]| {
            let mut nets = Vec::new();
            for s in sels {
                r.selector(s, &mut nets, &mut |what| {
                    let users = missing.entry(what).or_default();
                    if users.last() != Some(&rule.name) {
                        users.push(rule.name.clone());
                    }
                });
            }
            Ipv4Net::aggregate(&nets)
        };
        let src = side(&rule.from);
        let dst = side(&rule.to);
        rules.push(FilterRule {
            name: rule.name.clone(),
            allow: rule.action == Action::Allow,
            src,
            dst,
            ports: normalize_ports(&rule.ports),
        });
    }
    let warnings = missing
        .into_iter()
        .map(|(what, users)| {
            let list = users
                .iter()
                .map(|u| format!("`{u}`"))
                .collect::<Vec<_>>()
                .join(", ");
            let s = if users.len() == 1 { "" } else { "s" };
            format!("{what} matches nothing yet (used by rule{s} {list})")
        })
        .collect();
    (
        FilterSpec {
            default_allow: policy.default == Action::Allow,
            rules,
        },
        warnings,
    )
}

fn host(ip: std::net::Ipv4Addr) -> Ipv4Net {
    Ipv4Net::new(ip, 32).expect("/32 is valid")
}

struct Resolver<'a> {
    policy: &'a Policy,
    nodes: HashMap<&'a str, Ipv4Net>,
    tags: HashMap<&'a str, Vec<Ipv4Net>>,
    bindings: HashMap<&'a str, Ipv4Net>,
}

impl Resolver<'_> {
    fn selector(&self, s: &Selector, out: &mut Vec<Ipv4Net>, missing: &mut dyn FnMut(String)) {
        match s {
            Selector::Any => out.push(Ipv4Net::default()),
            Selector::Cidr(n) => out.push(n.trunc()),
            Selector::Node(n) => match self.nodes.get(n.as_str()) {
                Some(ip) => out.push(*ip),
                None => missing(format!("node `{n}` (no node of that name has joined)")),
            },
            Selector::Binding(b) => match self.bindings.get(b.as_str()) {
                Some(ip) => out.push(*ip),
                None => missing(format!("binding `{b}` (no binding of that name exists)")),
            },
            Selector::Tag(t) => match self.tags.get(t.as_str()) {
                Some(ips) => out.extend_from_slice(ips),
                None => missing(format!("tag `{t}` (no node or binding carries it)")),
            },
            Selector::Group(g) => match self.policy.groups.get(g) {
                Some(members) => {
                    let before = out.len();
                    for m in members {
                        // `parse` refuses groups inside groups; a hand-built
                        // policy that nests them gets the inner group ignored.
                        if !matches!(m, Selector::Group(_)) {
                            self.selector(m, out, missing);
                        }
                    }
                    if out.len() == before {
                        missing(format!("group `{g}` (none of its members exists yet)"));
                    }
                }
                None => missing(format!("group `{g}` (not defined in [groups])")),
            },
        }
    }
}

/// Sorts and merges port ranges; `*` anywhere (or an empty list, as in a
/// hand-built [`Policy`]) is just `*`.
fn normalize_ports(ports: &[PortRange]) -> Vec<PortRange> {
    if ports.is_empty() || ports.iter().any(|p| p.proto.is_none()) {
        return vec![PortRange::ANY];
    }
    let mut v: Vec<PortRange> = ports
        .iter()
        .map(|p| match p.proto {
            Some(crate::PROTO_TCP) | Some(crate::PROTO_UDP) => *p,
            // Ports mean nothing for other protocols.
            _ => PortRange {
                lo: 0,
                hi: u16::MAX,
                ..*p
            },
        })
        .filter(|p| p.lo <= p.hi)
        .collect();
    v.sort_by_key(|p| (p.proto, p.lo, p.hi));
    let mut out: Vec<PortRange> = Vec::with_capacity(v.len());
    for p in v {
        if let Some(last) = out.last_mut() {
            if last.proto == p.proto && u32::from(p.lo) <= u32::from(last.hi) + 1 {
                last.hi = last.hi.max(p.hi);
                continue;
            }
        }
        out.push(p);
    }
    out
}
