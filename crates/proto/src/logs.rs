//! API types of the logs endpoints (`/api/v1/logs/...`).

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One stored flow record, as `GET /api/v1/logs/flows` returns it: what the
/// reporting node saw ([`crate::FlowRecord`]) plus who reported it and the
/// node names of both ends (empty when an address is no node of the account).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FlowLogRecord {
    /// Increasing with arrival at the control plane; the pagination cursor.
    pub id: i64,
    /// Name of the node that reported the flow (at the time it was stored).
    pub node: String,
    /// Unix milliseconds of the first packet.
    pub start_ms: i64,
    /// Unix milliseconds of the last packet (or when the flow was cut).
    pub end_ms: i64,
    /// `tcp`, `udp`, `icmp`, or the IP protocol number.
    pub proto: String,
    #[schema(value_type = String)]
    pub src_ip: Ipv4Addr,
    pub src_port: u16,
    /// Name of the node with `src_ip`, or empty.
    pub src_node: String,
    #[schema(value_type = String)]
    pub dst_ip: Ipv4Addr,
    pub dst_port: u16,
    /// Name of the node with `dst_ip`, or empty.
    pub dst_node: String,
    /// `in` (opened towards the reporting node) or `out` (opened by it).
    pub direction: String,
    /// Initiator → responder.
    pub packets_out: u64,
    pub bytes_out: u64,
    /// Responder → initiator.
    pub packets_in: u64,
    pub bytes_in: u64,
    /// `direct`, `relay-udp` or `relay-tcp`.
    pub path: String,
    /// The mesh node the flow went through (a host on its subnet was one
    /// end); empty otherwise.
    #[serde(default)]
    pub via: String,
    /// `allow` or `deny`.
    pub decision: String,
    /// The rule that decided; empty when the policy's default did.
    pub rule: String,
    /// How many attempts the record stands for (denied attempts are summarised).
    pub count: u64,
    /// `closed`, `reset`, `idle`, `revoked`, `shutdown` or `denied`.
    pub end_reason: String,
}

/// One page of `GET /api/v1/logs/flows`, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FlowLogPage {
    pub records: Vec<FlowLogRecord>,
    /// Pass as `before_id` for the next (older) page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_before_id: Option<i64>,
}

/// What an account's network carried over a period, from its flow records.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TrafficSummary {
    /// Start of the period (unix milliseconds).
    pub since_ms: i64,
    /// Allowed connections that ended in the period (counted once, at the
    /// end that opened them).
    pub connections: u64,
    /// Their bytes, both ways.
    pub bytes: u64,
    /// Denied attempts.
    pub denied: u64,
}

/// One request through the fetch gateway, as `GET /api/v1/logs/requests`
/// returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RequestLogRecord {
    /// Increasing with arrival at the control plane; the pagination cursor.
    pub id: i64,
    /// The binding's name (as presented when no binding matched).
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
    /// The address the target resolved to.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub dst_ip: Option<Ipv4Addr>,
    pub dst_port: u16,
    /// The node that owns `dst_ip`.
    #[serde(default)]
    pub node: Option<String>,
    /// The path without its query string (absent for CONNECT).
    #[serde(default)]
    pub path: Option<String>,
    pub status: u16,
    /// Bytes from the agent to the target, and back.
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// `allow` or `deny`.
    pub decision: String,
    /// The rule that decided; absent when the policy's default did.
    #[serde(default)]
    pub rule: Option<String>,
    /// The gateway's error code, when it produced an error (see docs/gateway.md).
    #[serde(default)]
    pub error: Option<String>,
}

/// One page of `GET /api/v1/logs/requests`, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RequestLogPage {
    pub records: Vec<RequestLogRecord>,
    /// Pass as `before_id` for the next (older) page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_before_id: Option<i64>,
}
