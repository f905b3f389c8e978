//! The policy language: who may reach what inside one account.
//!
//! Pure (no IO, no clock): shared by the control plane (validation,
//! `policy test`, resolving names into addresses), the nodes and the edge
//! (deciding packets).
//!
//! Three layers:
//! 1. [`parse`] reads the TOML a person writes into a [`Policy`] and refuses
//!    bad input with errors that name the line and the field.
//! 2. [`resolve`] turns names (nodes, tags, groups, bindings) into addresses
//!    with a [`Directory`] of the account, giving a [`FilterSpec`]: the
//!    IP-level rules that travel to nodes and the edge in the network map.
//! 3. [`Filter::compile`] builds the structure that decides packets:
//!    [`Filter::decide`] answers allow or deny and names the rule.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

mod compile;
mod parse;
mod resolve;
#[cfg(test)]
mod tests;

pub use compile::{Filter, FilterStats};
pub use parse::{parse, parse_ports, parse_selector};
pub use resolve::resolve;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// The policy every new account starts with: everyone in the account may
/// reach everyone.
pub const DEFAULT_POLICY: &str = r#"# Who may reach what in this network. First matching rule wins;
# `default` decides when no rule matches.
default = "allow"

# Example: allow only the web servers' HTTP port and deny the rest.
# default = "deny"
# [[rules]]
# name = "web"
# action = "allow"
# from = ["*"]
# to = ["tag:web"]
# ports = ["tcp:80"]
"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

/// A source or destination as written in a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// `*`
    Any,
    /// A node's name: its overlay address.
    Node(String),
    /// `tag:T`: every node carrying tag T.
    Tag(String),
    /// `group:G`: the members of `[groups] G`.
    Group(String),
    /// `binding:B`: the overlay address of binding B.
    Binding(String),
    /// An address or a CIDR (`100.64.0.7`, `198.19.10.0/24`).
    Cidr(Ipv4Net),
}

/// One entry of `ports`: `tcp:80`, `tcp:8000-8100`, `udp:53`, `tcp` (all
/// TCP ports), `icmp`, `*` (everything).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRange {
    /// IP protocol number; `None` is any protocol.
    pub proto: Option<u8>,
    /// Inclusive port range; ignored for protocols without ports (ICMP).
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub const ANY: PortRange = PortRange {
        proto: None,
        lo: 0,
        hi: u16::MAX,
    };

    pub fn matches(&self, proto: u8, port: u16) -> bool {
        match self.proto {
            None => true,
            Some(p) if p != proto => false,
            Some(PROTO_TCP) | Some(PROTO_UDP) => self.lo <= port && port <= self.hi,
            Some(_) => true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Shown in logs; `rule N` (1-based) when the author gave none.
    pub name: String,
    pub action: Action,
    pub from: Vec<Selector>,
    pub to: Vec<Selector>,
    /// Empty means any protocol and port (as `["*"]`).
    pub ports: Vec<PortRange>,
    /// 1-based line of the rule's `[[rules]]` header.
    pub line: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub default: Action,
    pub groups: BTreeMap<String, Vec<Selector>>,
    pub rules: Vec<Rule>,
}

/// Why a policy text was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("line {line}, {field}: {message}")]
pub struct PolicyError {
    /// 1-based line of the offending value (or of the table that lacks it).
    pub line: usize,
    /// Where in the document, e.g. `rules[2].ports[0]` or `default`.
    pub field: String,
    pub message: String,
}

/// What [`resolve`] needs to know about an account.
#[derive(Debug, Clone, Default)]
pub struct Directory {
    pub nodes: Vec<Member>,
    pub bindings: Vec<Member>,
}

#[derive(Debug, Clone)]
pub struct Member {
    pub name: String,
    pub ip: Ipv4Addr,
    pub tags: Vec<String>,
}

/// The IP-level form of a policy that nodes and the edge enforce. Names are
/// gone: every selector became addresses. Travels in the network map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilterSpec {
    /// Decision when no rule matches.
    pub default_allow: bool,
    pub rules: Vec<FilterRule>,
}

impl FilterSpec {
    /// Everything allowed, no rules: what a node enforces before it has heard
    /// of any policy.
    pub fn allow_all() -> FilterSpec {
        FilterSpec {
            default_allow: true,
            rules: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilterRule {
    pub name: String,
    pub allow: bool,
    /// Source prefixes; `0.0.0.0/0` for any. Empty matches nothing.
    pub src: Vec<Ipv4Net>,
    /// Destination prefixes; `0.0.0.0/0` for any. Empty matches nothing.
    pub dst: Vec<Ipv4Net>,
    /// Protocols and ports; empty matches nothing.
    pub ports: Vec<PortRange>,
}

/// The outcome of a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allow: bool,
    /// Index of the matching rule in the spec; `None` when the default decided.
    pub rule: Option<u32>,
}
