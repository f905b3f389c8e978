//! API bodies of bindings: credentials that let code without a VPN client
//! reach an account's network through the edge's fetch gateway
//! (`docs/gateway.md`).

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Body of `POST /api/v1/bindings`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CreateBindingRequest {
    /// 1-63 lower-case letters, digits and dashes; unique among the
    /// account's bindings that are not revoked.
    pub name: String,
    /// Tags policies can name the binding by (`tag:T`).
    #[serde(default)]
    pub tags: Vec<String>,
    /// Lifetime in seconds; absent never expires.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

/// A binding as the API shows it (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BindingInfo {
    pub name: String,
    /// The `<id>` of the URL's user name `b_<id>`.
    pub public_id: String,
    pub account: String,
    /// The binding's overlay address: its requests reach nodes from it.
    #[schema(value_type = String)]
    pub ip: Ipv4Addr,
    pub tags: Vec<String>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds after which it is refused; absent never expires.
    #[serde(default)]
    pub expires_at: Option<i64>,
    /// Unix seconds it was revoked; absent while it is not.
    #[serde(default)]
    pub revoked_at: Option<i64>,
    /// Requests made with it so far.
    pub requests: u64,
    /// Unix seconds of its last request.
    #[serde(default)]
    pub last_used_at: Option<i64>,
}

impl BindingInfo {
    /// `active`, `expired` or `revoked` at unix time `now`.
    pub fn state(&self, now: i64) -> &'static str {
        if self.revoked_at.is_some() {
            "revoked"
        } else if self.expires_at.is_some_and(|t| t <= now) {
            "expired"
        } else {
            "active"
        }
    }
}

/// Answer to `POST /api/v1/bindings`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CreateBindingResponse {
    pub binding: BindingInfo,
    /// `SCHEME://b_<id>:<secret>@HOST:PORT` — the proxy URL agents use.
    /// Shown once: the server keeps only a hash of the secret.
    pub url: String,
}
