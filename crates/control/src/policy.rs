//! Policies: versioned per account, validated before anything is stored,
//! resolved against the account's nodes into the packet filter every node's
//! network map carries.
//!
//! Every account has a policy from its creation on (version 1 is
//! [`trellis_policy::DEFAULT_POLICY`], allow all). A change stores a new
//! version; nothing is ever rewritten, so a restore stores an old text as a
//! new version too.
//!
//! A stored version always passed [`trellis_policy::parse`]. Should it fail
//! to parse later anyway (a stricter parser after an upgrade), the maps carry
//! the newest version that still parses — the last good policy — and the
//! failure is logged as an error; nodes are never left without a filter nor
//! switched to deny-all by a text an admin already saw accepted.

use std::net::Ipv4Addr;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use sqlx::{FromRow, SqliteConnection, SqlitePool};
use trellis_policy::{
    Directory, Filter, FilterSpec, Member, Policy, PolicyError, DEFAULT_POLICY, PROTO_ICMP,
    PROTO_TCP, PROTO_UDP,
};
use trellis_proto::{
    ApiError, PolicyInfo, PolicyProblem, PolicyRejected, PolicyTestRequest, PolicyTestResponse,
    PolicyVersionInfo, RestorePolicyRequest, SetPolicyRequest, SetPolicyResponse,
};

use crate::api::{now, Admin, ApiErr, ApiJson, AppState};
use crate::audit::{self, action};
use crate::bindings::Binding;
use crate::store::{Account, Node, Store, StoreError, StoreResult};

/// Author of the versions the server writes itself (version 1).
pub const SYSTEM_AUTHOR: &str = "system";
/// Longest policy text accepted.
pub const MAX_POLICY_BYTES: usize = 1024 * 1024;

/// Gives version 1 (the default policy) to every account that has no policy yet.
pub async fn ensure_policies(pool: &SqlitePool, now: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO policies (account_id, version, text, rules, created_at, author) \
         SELECT a.id, 1, ?, 0, ?, ? FROM accounts a \
         WHERE NOT EXISTS (SELECT 1 FROM policies p WHERE p.account_id = a.id)",
    )
    .bind(DEFAULT_POLICY)
    .bind(now)
    .bind(SYSTEM_AUTHOR)
    .execute(pool)
    .await?;
    Ok(())
}

/// Stores version 1 of a new account's policy (inside its creation).
pub(crate) async fn insert_initial(
    conn: &mut SqliteConnection,
    account_id: i64,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO policies (account_id, version, text, rules, created_at, author) \
         VALUES (?, 1, ?, 0, ?, ?)",
    )
    .bind(account_id)
    .bind(DEFAULT_POLICY)
    .bind(now)
    .bind(SYSTEM_AUTHOR)
    .execute(conn)
    .await?;
    Ok(())
}

/// One stored version.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct StoredPolicy {
    pub version: i64,
    pub text: String,
    pub rules: i64,
    pub created_at: i64,
    pub author: String,
}

const POLICY_COLUMNS: &str = "version, text, rules, created_at, author";

/// What [`Store::store_policy`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// The version in force now.
    pub version: i64,
    /// False when the text was already in force (nothing stored).
    pub changed: bool,
}

impl Store {
    /// The policy in force in `account_id` (its newest version).
    pub async fn current_policy(&self, account_id: i64) -> StoreResult<StoredPolicy> {
        let row: Option<StoredPolicy> = sqlx::query_as(&format!(
            "SELECT {POLICY_COLUMNS} FROM policies WHERE account_id = ? ORDER BY version DESC LIMIT 1"
        ))
        .bind(account_id)
        .fetch_optional(&self.pool)
        .await?;
        row.ok_or_else(|| StoreError::Corrupt(format!("account {account_id} has no policy")))
    }

    /// Version `version` of the policy of `account_id`, if stored.
    pub async fn policy_version(
        &self,
        account_id: i64,
        version: i64,
    ) -> StoreResult<Option<StoredPolicy>> {
        Ok(sqlx::query_as(&format!(
            "SELECT {POLICY_COLUMNS} FROM policies WHERE account_id = ? AND version = ?"
        ))
        .bind(account_id)
        .bind(version)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Every version of the policy of `account_id`, newest first.
    pub async fn policy_history(&self, account_id: i64) -> StoreResult<Vec<StoredPolicy>> {
        Ok(sqlx::query_as(&format!(
            "SELECT {POLICY_COLUMNS} FROM policies WHERE account_id = ? ORDER BY version DESC"
        ))
        .bind(account_id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Stores `text` (already validated; `rules` rules) as the next version of
    /// the account's policy, with its audit entry, in one transaction. A text
    /// identical to the one in force stores nothing. `restored_from` names the
    /// version a restore copies.
    pub async fn store_policy(
        &self,
        account: &Account,
        text: &str,
        rules: i64,
        actor: &str,
        restored_from: Option<i64>,
        now: i64,
    ) -> StoreResult<Stored> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let current: Option<(i64, String)> = sqlx::query_as(
            "SELECT version, text FROM policies WHERE account_id = ? ORDER BY version DESC LIMIT 1",
        )
        .bind(account.id)
        .fetch_optional(&mut *tx)
        .await?;
        let (version, current_text) = current.ok_or_else(|| {
            StoreError::Corrupt(format!("account {:?} has no policy", account.name))
        })?;
        if current_text == text {
            return Ok(Stored {
                version,
                changed: false,
            });
        }
        let next = version + 1;
        sqlx::query(
            "INSERT INTO policies (account_id, version, text, rules, created_at, author) \
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(account.id)
        .bind(next)
        .bind(text)
        .bind(rules)
        .bind(now)
        .bind(actor)
        .execute(&mut *tx)
        .await?;
        let (act, detail) = match restored_from {
            None => (action::POLICY_SET, format!("v{version} -> v{next}")),
            Some(from) => (
                action::POLICY_RESTORE,
                format!("v{version} -> v{next} (the text of v{from})"),
            ),
        };
        audit::record(
            &mut tx,
            account.id,
            actor,
            act,
            &format!("policy v{next}"),
            &detail,
        )
        .await?;
        tx.commit().await?;
        Ok(Stored {
            version: next,
            changed: true,
        })
    }
}

/// What policies resolve names against: the account's nodes and its live
/// bindings (see [`Store::live_bindings`]), with their tags.
pub fn directory_of(nodes: &[Node], bindings: &[Binding]) -> Directory {
    Directory {
        nodes: nodes
            .iter()
            .map(|n| Member {
                name: n.name.clone(),
                ip: n.ip,
                tags: n.tags.clone(),
            })
            .collect(),
        bindings: bindings
            .iter()
            .map(|b| Member {
                name: b.name.clone(),
                ip: b.ip,
                tags: b.tags.clone(),
            })
            .collect(),
    }
}

/// The directory of `account` now: `nodes` and its live bindings.
pub async fn directory_now(
    store: &Store,
    account: &Account,
    nodes: &[Node],
) -> StoreResult<Directory> {
    let bindings = store.live_bindings(account.id, now()).await?;
    Ok(directory_of(nodes, &bindings))
}

/// The filter the account's nodes enforce, and the version it comes from:
/// the newest version that parses (see the module documentation), resolved
/// against `nodes`. None only if no stored version parses at all; the maps
/// then carry no filter and nodes keep the one they have.
pub async fn effective_filter(
    store: &Store,
    account: &Account,
    nodes: &[Node],
) -> StoreResult<Option<(i64, FilterSpec)>> {
    let bindings = store.live_bindings(account.id, now()).await?;
    effective_filter_with(store, account, nodes, &bindings).await
}

/// [`effective_filter`] with the account's live bindings already loaded.
pub async fn effective_filter_with(
    store: &Store,
    account: &Account,
    nodes: &[Node],
    bindings: &[Binding],
) -> StoreResult<Option<(i64, FilterSpec)>> {
    let current = store.current_policy(account.id).await?;
    let dir = directory_of(nodes, bindings);
    match trellis_policy::parse(&current.text) {
        Ok(p) => return Ok(Some((current.version, trellis_policy::resolve(&p, &dir).0))),
        Err(errors) => log_unparsable(account, current.version, &errors),
    }
    for older in store.policy_history(account.id).await? {
        if older.version >= current.version {
            continue;
        }
        match trellis_policy::parse(&older.text) {
            Ok(p) => {
                tracing::error!(
                    account = %account.name,
                    version = older.version,
                    "enforcing the newest policy version that still parses"
                );
                return Ok(Some((older.version, trellis_policy::resolve(&p, &dir).0)));
            }
            Err(errors) => log_unparsable(account, older.version, &errors),
        }
    }
    Ok(None)
}

fn log_unparsable(account: &Account, version: i64, errors: &[PolicyError]) {
    tracing::error!(
        account = %account.name,
        version,
        errors = %problems_text(errors),
        "a stored policy version no longer parses; it is not enforced"
    );
}

fn problems_text(errors: &[PolicyError]) -> String {
    errors
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// A failed policy change: a plain API error, or a text that does not validate.
pub enum PolicyErr {
    Api(ApiErr),
    /// Answered 400 with every problem.
    Rejected(PolicyRejected),
}

impl From<ApiErr> for PolicyErr {
    fn from(e: ApiErr) -> PolicyErr {
        PolicyErr::Api(e)
    }
}

impl From<StoreError> for PolicyErr {
    fn from(e: StoreError) -> PolicyErr {
        PolicyErr::Api(e.into())
    }
}

impl IntoResponse for PolicyErr {
    fn into_response(self) -> Response {
        match self {
            PolicyErr::Api(e) => e.into_response(),
            PolicyErr::Rejected(r) => (StatusCode::BAD_REQUEST, Json(r)).into_response(),
        }
    }
}

/// The answer to a text that does not validate.
fn rejected(intro: &str, errors: Vec<PolicyError>) -> PolicyErr {
    let error = format!(
        "{intro}; nothing was changed ({} problem{}):\n{}",
        errors.len(),
        if errors.len() == 1 { "" } else { "s" },
        problems_text(&errors)
    );
    let errors = errors
        .into_iter()
        .map(|e| PolicyProblem {
            line: e.line,
            field: e.field,
            message: e.message,
        })
        .collect();
    PolicyErr::Rejected(PolicyRejected { error, errors })
}

pub(crate) fn validate(text: &str, intro: &str) -> Result<Policy, PolicyErr> {
    if text.len() > MAX_POLICY_BYTES {
        return Err(ApiErr::new(
            StatusCode::BAD_REQUEST,
            format!(
                "the policy is {} bytes long; at most {MAX_POLICY_BYTES} are accepted. Nothing was changed",
                text.len()
            ),
        )
        .into());
    }
    trellis_policy::parse(text).map_err(|errors| rejected(intro, errors))
}

fn policy_info(p: StoredPolicy) -> PolicyInfo {
    PolicyInfo {
        version: p.version,
        text: p.text,
        created_at: p.created_at,
        author: p.author,
    }
}

/// Validates, stores and announces a text; the answer of PUT and restore.
pub(crate) async fn apply(
    st: &AppState,
    admin: &Admin,
    policy: &Policy,
    text: &str,
    restored_from: Option<i64>,
) -> Result<SetPolicyResponse, ApiErr> {
    let rules = i64::try_from(policy.rules.len()).unwrap_or(i64::MAX);
    let stored = st
        .store
        .store_policy(
            &admin.account,
            text,
            rules,
            &admin.actor,
            restored_from,
            now(),
        )
        .await?;
    if stored.changed {
        st.hub.notify(admin.account.id);
        tracing::info!(account = %admin.account.name, version = stored.version, actor = %admin.actor, "policy changed");
    }
    let nodes = st.store.list_nodes(admin.account.id).await?;
    let dir = directory_now(&st.store, &admin.account, &nodes).await?;
    let (_, warnings) = trellis_policy::resolve(policy, &dir);
    Ok(SetPolicyResponse {
        version: stored.version,
        changed: stored.changed,
        warnings,
    })
}

/// The policy in force.
#[utoipa::path(get, path = "/api/v1/policy", tag = "policy",
    params(("account" = Option<String>, Query, description = "Account to act on (operator key only; default: the key's own)")),
    security(("bearer" = [])),
    responses((status = 200, body = PolicyInfo),
        (status = 401, body = ApiError), (status = 403, body = ApiError)))]
pub async fn get_policy(
    State(st): State<AppState>,
    admin: Admin,
) -> Result<Json<PolicyInfo>, ApiErr> {
    Ok(Json(policy_info(
        st.store.current_policy(admin.account.id).await?,
    )))
}

/// Replaces the policy. The text is validated first: on any problem the
/// answer is 400 with every problem (line, field, message) and nothing
/// changes. Otherwise it becomes the next version and reaches every node
/// within a second. Setting the text in force again changes nothing.
#[utoipa::path(put, path = "/api/v1/policy", tag = "policy",
    request_body = SetPolicyRequest,
    params(("account" = Option<String>, Query, description = "Account to act on (operator key only; default: the key's own)")),
    security(("bearer" = [])),
    responses((status = 200, body = SetPolicyResponse),
        (status = 400, body = PolicyRejected, description = "The policy does not validate; nothing changed"),
        (status = 401, body = ApiError), (status = 403, body = ApiError)))]
pub async fn put_policy(
    State(st): State<AppState>,
    admin: Admin,
    ApiJson(req): ApiJson<SetPolicyRequest>,
) -> Result<Json<SetPolicyResponse>, PolicyErr> {
    let policy = validate(&req.text, "the policy was refused")?;
    Ok(Json(apply(&st, &admin, &policy, &req.text, None).await?))
}

/// Every version of the policy, newest first.
#[utoipa::path(get, path = "/api/v1/policy/history", tag = "policy",
    params(("account" = Option<String>, Query, description = "Account to act on (operator key only; default: the key's own)")),
    security(("bearer" = [])),
    responses((status = 200, body = Vec<PolicyVersionInfo>),
        (status = 401, body = ApiError), (status = 403, body = ApiError)))]
pub async fn policy_history(
    State(st): State<AppState>,
    admin: Admin,
) -> Result<Json<Vec<PolicyVersionInfo>>, ApiErr> {
    Ok(Json(
        st.store
            .policy_history(admin.account.id)
            .await?
            .into_iter()
            .map(|p| PolicyVersionInfo {
                version: p.version,
                created_at: p.created_at,
                author: p.author,
                rules: p.rules,
            })
            .collect(),
    ))
}

/// Puts an earlier version back in force, as a new version (history is
/// never rewritten).
#[utoipa::path(post, path = "/api/v1/policy/restore", tag = "policy",
    request_body = RestorePolicyRequest,
    params(("account" = Option<String>, Query, description = "Account to act on (operator key only; default: the key's own)")),
    security(("bearer" = [])),
    responses((status = 200, body = SetPolicyResponse),
        (status = 400, body = PolicyRejected, description = "That version no longer validates; nothing changed"),
        (status = 401, body = ApiError), (status = 403, body = ApiError), (status = 404, body = ApiError)))]
pub async fn restore_policy(
    State(st): State<AppState>,
    admin: Admin,
    ApiJson(req): ApiJson<RestorePolicyRequest>,
) -> Result<Json<SetPolicyResponse>, PolicyErr> {
    Ok(Json(restore(&st, &admin, req.version).await?))
}

/// Stores the text of version `version` as a new version (the restore of the
/// API and the dashboard).
pub(crate) async fn restore(
    st: &AppState,
    admin: &Admin,
    version: i64,
) -> Result<SetPolicyResponse, PolicyErr> {
    let req = RestorePolicyRequest { version };
    let old = st
        .store
        .policy_version(admin.account.id, req.version)
        .await?
        .ok_or_else(|| {
            ApiErr::new(
                StatusCode::NOT_FOUND,
                format!(
                    "account {:?} has no policy version {}; see `trellis policy history`",
                    admin.account.name, req.version
                ),
            )
        })?;
    let policy = validate(
        &old.text,
        &format!("policy version {} no longer validates", req.version),
    )?;
    Ok(apply(st, admin, &policy, &old.text, Some(req.version)).await?)
}

/// `tcp:5432`, `udp:53`, `icmp` → (protocol, port).
pub fn parse_probe_port(s: &str) -> Result<(u8, u16), String> {
    let bad =
        || format!("invalid port {s:?}: give tcp:PORT, udp:PORT (1-65535) or icmp, e.g. tcp:5432");
    let s = s.trim().to_ascii_lowercase();
    if s == "icmp" {
        return Ok((PROTO_ICMP, 0));
    }
    let (proto, port) = s.split_once(':').ok_or_else(bad)?;
    let proto = match proto {
        "tcp" => PROTO_TCP,
        "udp" => PROTO_UDP,
        _ => return Err(bad()),
    };
    let port: u16 = port.parse().map_err(|_| bad())?;
    if port == 0 {
        return Err(bad());
    }
    Ok((proto, port))
}

/// A `from` or `to` of a policy test as an address.
fn probe_addr(
    dir: &Directory,
    account: &Account,
    s: &str,
    binding_ok: bool,
) -> Result<Ipv4Addr, ApiErr> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<Ipv4Addr>() {
        return Ok(ip);
    }
    if let Some(b) = s.strip_prefix("binding:") {
        if !binding_ok {
            return Err(ApiErr::new(
                StatusCode::BAD_REQUEST,
                format!("{s:?} cannot be a destination: give a node name or an IPv4 address"),
            ));
        }
        return dir
            .bindings
            .iter()
            .find(|m| m.name == b)
            .map(|m| m.ip)
            .ok_or_else(|| {
                ApiErr::new(
                    StatusCode::NOT_FOUND,
                    format!("no binding named {b:?} in account {:?}", account.name),
                )
            });
    }
    dir.nodes
        .iter()
        .find(|m| m.name == s)
        .map(|m| m.ip)
        .ok_or_else(|| {
            ApiErr::new(
                StatusCode::NOT_FOUND,
                format!(
                    "no node named {s:?} in account {:?}: give a node name (see `trellis nodes list`) or an IPv4 address",
                    account.name
                ),
            )
        })
}

/// Asks the policy in force whether a connection would be allowed, and which rule decides.
#[utoipa::path(post, path = "/api/v1/policy/test", tag = "policy",
    request_body = PolicyTestRequest,
    params(("account" = Option<String>, Query, description = "Account to act on (operator key only; default: the key's own)")),
    security(("bearer" = [])),
    responses((status = 200, body = PolicyTestResponse),
        (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError),
        (status = 404, body = ApiError)))]
pub async fn test_policy(
    State(st): State<AppState>,
    admin: Admin,
    ApiJson(req): ApiJson<PolicyTestRequest>,
) -> Result<Json<PolicyTestResponse>, ApiErr> {
    Ok(Json(decide(&st, &admin.account, &req).await?))
}

/// Whether the policy in force lets `req.from` reach `req.to` on `req.port`
/// (the policy test of the API and the dashboard).
pub(crate) async fn decide(
    st: &AppState,
    account: &Account,
    req: &PolicyTestRequest,
) -> Result<PolicyTestResponse, ApiErr> {
    let (proto, port) =
        parse_probe_port(&req.port).map_err(|e| ApiErr::new(StatusCode::BAD_REQUEST, e))?;
    let nodes = st.store.list_nodes(account.id).await?;
    let dir = directory_now(&st.store, account, &nodes).await?;
    let from_ip = probe_addr(&dir, account, &req.from, true)?;
    let to_ip = probe_addr(&dir, account, &req.to, false)?;
    let (version, spec) = effective_filter(&st.store, account, &nodes)
        .await?
        .ok_or_else(|| {
            ApiErr::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "no stored policy version parses; see the server log",
            )
        })?;
    let filter = Filter::compile(&spec);
    let decision = filter.decide(from_ip, to_ip, proto, port);
    Ok(PolicyTestResponse {
        allow: decision.allow,
        rule: decision.rule.map(|i| filter.rule_name(i).to_string()),
        version,
        from_ip,
        to_ip,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_ports() {
        assert_eq!(parse_probe_port("tcp:5432"), Ok((PROTO_TCP, 5432)));
        assert_eq!(parse_probe_port("UDP:53"), Ok((PROTO_UDP, 53)));
        assert_eq!(parse_probe_port("icmp"), Ok((PROTO_ICMP, 0)));
        for bad in ["tcp", "tcp:0", "tcp:70000", "sctp:1", "", "tcp:-1", "5432"] {
            let e = parse_probe_port(bad).unwrap_err();
            assert!(e.contains("invalid port"), "{bad}: {e}");
        }
    }
}
