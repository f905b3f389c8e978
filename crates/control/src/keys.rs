//! API keys of an account: more than the one `account create` printed,
//! named, listed and revocable. Every request looks its key up, so a revoked
//! key is refused from the next request on.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use sqlx::FromRow;
use trellis_proto::{ApiError, ApiKeyInfo, CreateApiKeyRequest, CreateApiKeyResponse};

use crate::api::{now, Admin, ApiErr, ApiJson, AppState};
use crate::audit::{self, action};
use crate::store::{hash_secret, new_secret, Account, Store, StoreError};

const MAX_NAME: usize = 64;

#[derive(FromRow)]
struct KeyRow {
    id: i64,
    name: String,
    operator: bool,
    created_at: i64,
    revoked_at: Option<i64>,
}

/// Lists the account's API keys, newest first.
#[utoipa::path(get, path = "/api/v1/keys", tag = "keys",
    params(("account" = Option<String>, Query, description = "Account to act on (operator key only; default: the key's own)")),
    security(("bearer" = [])),
    responses((status = 200, body = Vec<ApiKeyInfo>),
        (status = 401, body = ApiError), (status = 403, body = ApiError)))]
pub async fn list_keys(
    State(st): State<AppState>,
    admin: Admin,
) -> Result<Json<Vec<ApiKeyInfo>>, ApiErr> {
    Ok(Json(list(&st.store, admin.account.id).await?))
}

/// The API keys of `account_id`, newest first (the API and the dashboard).
pub(crate) async fn list(store: &Store, account_id: i64) -> Result<Vec<ApiKeyInfo>, StoreError> {
    let rows: Vec<KeyRow> = sqlx::query_as(
        "SELECT id, name, operator, created_at, revoked_at FROM api_keys \
         WHERE account_id = ? ORDER BY id DESC",
    )
    .bind(account_id)
    .fetch_all(&store.pool)
    .await?;
    Ok(rows.into_iter().map(info).collect())
}

fn info(r: KeyRow) -> ApiKeyInfo {
    ApiKeyInfo {
        id: r.id,
        name: r.name,
        operator: r.operator,
        created_at: r.created_at,
        revoked_at: r.revoked_at,
    }
}

/// Makes a new API key for the account; the key is shown once.
#[utoipa::path(post, path = "/api/v1/keys", tag = "keys",
    request_body = CreateApiKeyRequest,
    params(("account" = Option<String>, Query, description = "Account to act on (operator key only; default: the key's own)")),
    security(("bearer" = [])),
    responses((status = 200, body = CreateApiKeyResponse),
        (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError)))]
pub async fn create_key(
    State(st): State<AppState>,
    admin: Admin,
    ApiJson(req): ApiJson<CreateApiKeyRequest>,
) -> Result<Json<CreateApiKeyResponse>, ApiErr> {
    Ok(Json(
        create(&st.store, &admin.account, &req.name, &admin.actor).await?,
    ))
}

/// Makes a new API key named `name` for `account` (the API and the dashboard).
pub(crate) async fn create(
    store: &Store,
    account: &Account,
    name: &str,
    actor: &str,
) -> Result<CreateApiKeyResponse, ApiErr> {
    let name = name.trim().to_string();
    if name.chars().count() > MAX_NAME || name.chars().any(char::is_control) {
        return Err(ApiErr::new(
            StatusCode::BAD_REQUEST,
            format!("invalid key name: at most {MAX_NAME} characters, no control characters"),
        ));
    }
    let key = new_secret("trk_");
    let store_err = crate::store::StoreError::from;
    let mut tx = store.pool.begin().await.map_err(store_err)?;
    let (id,): (i64,) = sqlx::query_as(
        "INSERT INTO api_keys (key_hash, account_id, operator, created_at, name) \
         VALUES (?, ?, 0, ?, ?) RETURNING id",
    )
    .bind(hash_secret(&key))
    .bind(account.id)
    .bind(now())
    .bind(&name)
    .fetch_one(&mut *tx)
    .await
    .map_err(store_err)?;
    audit::record(
        &mut tx,
        account.id,
        actor,
        action::KEY_CREATE,
        &format!("key {id}"),
        &name,
    )
    .await
    .map_err(store_err)?;
    tx.commit().await.map_err(store_err)?;
    tracing::info!(account = %account.name, key = id, actor = %actor, "API key created");
    Ok(CreateApiKeyResponse {
        id,
        name,
        api_key: key,
    })
}

/// Revokes an API key: the next request made with it is refused.
#[utoipa::path(delete, path = "/api/v1/keys/{id}", tag = "keys",
    params(("id" = i64, Path, description = "Key id (see GET /api/v1/keys)"),
        ("account" = Option<String>, Query, description = "Account to act on (operator key only; default: the key's own)")),
    security(("bearer" = [])),
    responses((status = 204, description = "Revoked"),
        (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError),
        (status = 404, body = ApiError)))]
pub async fn revoke_key(
    State(st): State<AppState>,
    admin: Admin,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiErr> {
    let id: i64 = id.parse().map_err(|_| {
        ApiErr::new(
            StatusCode::BAD_REQUEST,
            format!("invalid key id {id:?}: give the number shown by `trellis keys list`"),
        )
    })?;
    revoke(&st.store, &admin.account, id, &admin.actor).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Revokes API key `id` of `account` (the API and the dashboard). The
/// operator key is refused (403); revoking a revoked key changes nothing.
pub(crate) async fn revoke(
    store: &Store,
    account: &Account,
    id: i64,
    actor: &str,
) -> Result<(), ApiErr> {
    let store_err = crate::store::StoreError::from;
    let mut tx = store
        .pool
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(store_err)?;
    let row: Option<KeyRow> = sqlx::query_as(
        "SELECT id, name, operator, created_at, revoked_at FROM api_keys \
         WHERE id = ? AND account_id = ?",
    )
    .bind(id)
    .bind(account.id)
    .fetch_optional(&mut *tx)
    .await
    .map_err(store_err)?;
    let Some(row) = row else {
        return Err(ApiErr::new(
            StatusCode::NOT_FOUND,
            format!(
                "no API key with id {id} in account {:?}; see `trellis keys list`",
                account.name
            ),
        ));
    };
    if row.operator {
        return Err(ApiErr::new(
            StatusCode::FORBIDDEN,
            "the operator key cannot be revoked through the API: replace DATA_DIR/admin.key's key on the server instead",
        ));
    }
    if row.revoked_at.is_some() {
        return Ok(());
    }
    sqlx::query("UPDATE api_keys SET revoked_at = ? WHERE id = ?")
        .bind(now())
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(store_err)?;
    audit::record(
        &mut tx,
        account.id,
        actor,
        action::KEY_REVOKE,
        &format!("key {id}"),
        &row.name,
    )
    .await
    .map_err(store_err)?;
    tx.commit().await.map_err(store_err)?;
    tracing::info!(account = %account.name, key = id, actor = %actor, "API key revoked");
    Ok(())
}
