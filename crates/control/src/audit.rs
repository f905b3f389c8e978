//! The audit log: every admin change, who made it and when, append-only.
//!
//! Entries are written inside the transaction of the change they describe
//! ([`record`]), so a change and its entry are stored together or not at all.
//! SQLite triggers refuse every UPDATE and DELETE of the table.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use sqlx::FromRow;
use trellis_proto::{ApiError, AuditEntry};

use crate::api::{now, Admin, ApiErr, AppState};
use crate::store::{Store, StoreResult};

/// Actions recorded in the log.
pub mod action {
    pub const ACCOUNT_CREATE: &str = "account.create";
    pub const TOKEN_CREATE: &str = "token.create";
    pub const TOKEN_REVOKE: &str = "token.revoke";
    pub const KEY_CREATE: &str = "key.create";
    pub const KEY_REVOKE: &str = "key.revoke";
    pub const NODE_DELETE: &str = "node.delete";
    pub const NODE_RENAME: &str = "node.rename";
    pub const NODE_TAG: &str = "node.tag";
    pub const NODE_DISABLE: &str = "node.disable";
    pub const NODE_ENABLE: &str = "node.enable";
    pub const ROUTE_APPROVE: &str = "route.approve";
    pub const DNS_ADD: &str = "dns.add";
    pub const DNS_REMOVE: &str = "dns.remove";
    pub const POLICY_SET: &str = "policy.set";
    pub const POLICY_RESTORE: &str = "policy.restore";
    pub const ACCOUNT_RENAME: &str = "account.rename";
    pub const ADMIN_CREATE: &str = "admin.create";
    pub const BINDING_CREATE: &str = "binding.create";
    pub const BINDING_REVOKE: &str = "binding.revoke";
}

/// Most entries one call returns.
pub const MAX_LIMIT: i64 = 1000;
/// Entries one call returns unless told.
pub const DEFAULT_LIMIT: i64 = 100;

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Appends one entry; call it on the transaction of the change it describes.
pub async fn record(
    conn: &mut sqlx::SqliteConnection,
    account_id: i64,
    actor: &str,
    action: &str,
    target: &str,
    detail: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO audit_log (account_id, at_ms, actor, action, target, detail) \
         VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(account_id)
    .bind(now_ms())
    .bind(actor)
    .bind(action)
    .bind(target)
    .bind(detail)
    .execute(conn)
    .await?;
    Ok(())
}

#[derive(FromRow)]
struct Row {
    id: i64,
    at_ms: i64,
    actor: String,
    action: String,
    target: String,
    detail: String,
}

impl Store {
    /// Entries of `account_id`, newest first: at or after `since_ms`, older
    /// than entry `before_id`, at most `limit`.
    pub async fn audit_entries(
        &self,
        account_id: i64,
        since_ms: Option<i64>,
        before_id: Option<i64>,
        limit: i64,
    ) -> StoreResult<Vec<AuditEntry>> {
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, at_ms, actor, action, target, detail FROM audit_log \
             WHERE account_id = ? AND at_ms >= ? AND id < ? ORDER BY id DESC LIMIT ?",
        )
        .bind(account_id)
        .bind(since_ms.unwrap_or(i64::MIN))
        .bind(before_id.unwrap_or(i64::MAX))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| AuditEntry {
                id: r.id,
                at_ms: r.at_ms,
                actor: r.actor,
                action: r.action,
                target: r.target,
                detail: r.detail,
            })
            .collect())
    }
}

/// Values of `since` below this are an age in seconds; others are unix seconds.
const UNIX_THRESHOLD: i64 = 1_000_000_000;

/// `since` as unix milliseconds: `600` or `10m` (an age: s, m, h, d) or unix
/// seconds (`1700000000`).
pub fn parse_since(raw: &str, now_secs: i64) -> Result<i64, String> {
    let s = raw.trim();
    let bad = || {
        format!(
            "invalid since {raw:?}: give an age such as 600, 10m, 2h or 7d, or unix seconds such as 1700000000"
        )
    };
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, ""),
    };
    let n: i64 = num.parse().map_err(|_| bad())?;
    let secs_ago = match unit {
        "" if n >= UNIX_THRESHOLD => return n.checked_mul(1000).ok_or_else(bad),
        "" | "s" => n,
        "m" => n.checked_mul(60).ok_or_else(bad)?,
        "h" => n.checked_mul(3600).ok_or_else(bad)?,
        "d" => n.checked_mul(86_400).ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    now_secs
        .checked_sub(secs_ago)
        .and_then(|t| t.checked_mul(1000))
        .ok_or_else(bad)
}

#[derive(Deserialize)]
pub struct AuditQuery {
    since: Option<String>,
    limit: Option<i64>,
    before_id: Option<i64>,
}

/// The account's audit log, newest first: every admin change with the
/// credential that made it. Page with `before_id` (the last id seen).
#[utoipa::path(get, path = "/api/v1/audit", tag = "audit",
    params(
        ("since" = Option<String>, Query, description = "Only entries this recent: an age (600, 10m, 2h, 7d) or unix seconds"),
        ("limit" = Option<i64>, Query, description = "At most this many entries (default 100, at most 1000)"),
        ("before_id" = Option<i64>, Query, description = "Only entries older than this id (the next page)"),
        ("account" = Option<String>, Query, description = "Account to act on (operator key only; default: the key's own)")),
    security(("bearer" = [])),
    responses((status = 200, body = Vec<AuditEntry>),
        (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError)))]
pub async fn list_audit(
    State(st): State<AppState>,
    admin: Admin,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<AuditEntry>>, ApiErr> {
    let bad = |m: String| ApiErr::new(StatusCode::BAD_REQUEST, m);
    let Query(q) = query.map_err(|e| bad(format!("bad query string: {}", e.body_text())))?;
    let since = q
        .since
        .as_deref()
        .map(|s| parse_since(s, now()))
        .transpose()
        .map_err(bad)?;
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(bad(format!(
            "limit {limit} is out of range: give 1 to {MAX_LIMIT}"
        )));
    }
    Ok(Json(
        st.store
            .audit_entries(admin.account.id, since, q.before_id, limit)
            .await?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_is_an_age_or_unix_seconds() {
        let now = 1_700_000_000;
        assert_eq!(parse_since("600", now).unwrap(), (now - 600) * 1000);
        assert_eq!(parse_since("10m", now).unwrap(), (now - 600) * 1000);
        assert_eq!(parse_since("2h", now).unwrap(), (now - 7200) * 1000);
        assert_eq!(parse_since("1d", now).unwrap(), (now - 86_400) * 1000);
        assert_eq!(
            parse_since("1690000000", now).unwrap(),
            1_690_000_000 * 1000
        );
        for bad in ["", "m", "10w", "-5", "1.5h", "99999999999999999999"] {
            let e = parse_since(bad, now).unwrap_err();
            assert!(e.contains("invalid since"), "{bad}: {e}");
        }
    }
}
