//! API bodies of policies, node tags, join-token management and the audit log.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The policy in force (the newest version).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PolicyInfo {
    /// 1 for the policy every account starts with; +1 per change.
    pub version: i64,
    /// The policy as written (TOML).
    pub text: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Who stored this version: `operator`, `account-key:ACCOUNT` or `system`.
    pub author: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SetPolicyRequest {
    /// The whole policy (TOML).
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SetPolicyResponse {
    /// The version in force now.
    pub version: i64,
    /// False when the text was the one already in force (nothing stored).
    pub changed: bool,
    /// Names that match nothing yet (a node that has not joined, a tag nobody carries).
    pub warnings: Vec<String>,
}

/// One problem of a refused policy text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PolicyProblem {
    /// 1-based line.
    pub line: usize,
    /// Where in the document, e.g. `rules[1].ports[0]`.
    pub field: String,
    pub message: String,
}

/// Body of a 400 answer to a policy that does not validate. Nothing was changed.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PolicyRejected {
    /// Every problem, one per line: `line 7, rules[1].ports[0]: message`.
    pub error: String,
    pub errors: Vec<PolicyProblem>,
}

/// One stored version of the policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PolicyVersionInfo {
    pub version: i64,
    /// Unix seconds.
    pub created_at: i64,
    pub author: String,
    /// How many rules it holds.
    pub rules: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RestorePolicyRequest {
    /// The version whose text becomes the new version.
    pub version: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PolicyTestRequest {
    /// A node name, an IPv4 address or `binding:NAME`.
    pub from: String,
    /// A node name or an IPv4 address (subnets behind mesh nodes too).
    pub to: String,
    /// `tcp:5432`, `udp:53` or `icmp`.
    pub port: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PolicyTestResponse {
    pub allow: bool,
    /// The rule that decided; null when the policy's default decided.
    pub rule: Option<String>,
    /// The policy version that was asked.
    pub version: i64,
    #[schema(value_type = String, example = "100.64.0.2")]
    pub from_ip: Ipv4Addr,
    #[schema(value_type = String, example = "100.64.0.3")]
    pub to_ip: Ipv4Addr,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SetTagsRequest {
    /// The node's tags from now on (replaces the set); each a name like a node's.
    pub tags: Vec<String>,
}

/// A join token (its secret is never shown again).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TokenInfo {
    pub id: i64,
    pub reusable: bool,
    pub routes_auto_approve: bool,
    /// Unix seconds.
    pub expires_at: i64,
    /// Nodes enrolled with it.
    pub uses: i64,
    pub tags: Vec<String>,
    pub revoked: bool,
    /// Unix seconds.
    pub created_at: i64,
}

/// One admin change. The log is append-only: entries are never edited or removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    /// Grows with every entry; pass the last one seen as `before_id` for the next page.
    pub id: i64,
    /// Unix milliseconds.
    pub at_ms: i64,
    /// The credential that acted: `operator` or `account-key:ACCOUNT`.
    pub actor: String,
    /// e.g. `policy.set`, `node.rename`, `token.revoke`.
    pub action: String,
    /// What it acted on (a node, a token id, a subnet, a record, a version).
    pub target: String,
    /// What changed, e.g. `v3 -> v4` or `web-1 -> web-2`.
    pub detail: String,
}

/// An API key of an account (its secret is never shown again).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ApiKeyInfo {
    pub id: i64,
    pub name: String,
    /// The server's operator key (DATA_DIR/admin.key); it cannot be revoked here.
    pub operator: bool,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds when it was revoked.
    pub revoked_at: Option<i64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct CreateApiKeyRequest {
    /// What the key is for, shown in `keys list` and the audit log.
    #[serde(default)]
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateApiKeyResponse {
    pub id: i64,
    pub name: String,
    /// The key. Shown once; the server keeps only its hash.
    pub api_key: String,
}
