//! Join-token management (list, revoke) and node tags.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use trellis_proto::{ApiError, NodeInfo, SetTagsRequest, TokenInfo};

use crate::api::{node_info, now, Admin, ApiErr, ApiJson, AppState};

/// Lists the account's join tokens, newest first (their secrets are never shown again).
#[utoipa::path(get, path = "/api/v1/tokens", tag = "tokens",
    params(("account" = Option<String>, Query, description = "Account to act on (operator key only; default: the key's own)")),
    security(("bearer" = [])),
    responses((status = 200, body = Vec<TokenInfo>),
        (status = 401, body = ApiError), (status = 403, body = ApiError)))]
pub async fn list_tokens(
    State(st): State<AppState>,
    admin: Admin,
) -> Result<Json<Vec<TokenInfo>>, ApiErr> {
    Ok(Json(st.store.list_tokens(admin.account.id).await?))
}

/// Revokes a join token: enrolling with it fails from now on. Nodes that
/// already enrolled with it stay (remove them with DELETE /nodes/{name}).
#[utoipa::path(delete, path = "/api/v1/tokens/{id}", tag = "tokens",
    params(("id" = i64, Path, description = "Token id (see GET /api/v1/tokens)"),
        ("account" = Option<String>, Query, description = "Account to act on (operator key only; default: the key's own)")),
    security(("bearer" = [])),
    responses((status = 204, description = "Revoked"),
        (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError),
        (status = 404, body = ApiError)))]
pub async fn revoke_token(
    State(st): State<AppState>,
    admin: Admin,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiErr> {
    let id: i64 = id.parse().map_err(|_| {
        ApiErr::new(
            StatusCode::BAD_REQUEST,
            format!("invalid token id {id:?}: give the number shown by `trellis token list`"),
        )
    })?;
    st.store
        .revoke_token(&admin.account, id, now(), &admin.actor)
        .await?;
    tracing::info!(account = %admin.account.name, token = id, actor = %admin.actor, "join token revoked");
    Ok(StatusCode::NO_CONTENT)
}

/// Disables a node: it stays enrolled (same key, name and IP) but within a
/// second no peer accepts its packets, open connections included, and the
/// relay stops carrying them, until it is enabled again.
#[utoipa::path(post, path = "/api/v1/nodes/{name}/disable", tag = "nodes",
    params(("name" = String, Path, description = "Node name"),
        ("account" = Option<String>, Query, description = "Account to act on (operator key only; default: the key's own)")),
    security(("bearer" = [])),
    responses((status = 200, body = NodeInfo),
        (status = 401, body = ApiError), (status = 403, body = ApiError),
        (status = 404, body = ApiError)))]
pub async fn disable_node(
    State(st): State<AppState>,
    admin: Admin,
    Path(name): Path<String>,
) -> Result<Json<NodeInfo>, ApiErr> {
    set_disabled(st, admin, name, true).await
}

/// Enables a disabled node: its peers accept it again.
#[utoipa::path(post, path = "/api/v1/nodes/{name}/enable", tag = "nodes",
    params(("name" = String, Path, description = "Node name"),
        ("account" = Option<String>, Query, description = "Account to act on (operator key only; default: the key's own)")),
    security(("bearer" = [])),
    responses((status = 200, body = NodeInfo),
        (status = 401, body = ApiError), (status = 403, body = ApiError),
        (status = 404, body = ApiError)))]
pub async fn enable_node(
    State(st): State<AppState>,
    admin: Admin,
    Path(name): Path<String>,
) -> Result<Json<NodeInfo>, ApiErr> {
    set_disabled(st, admin, name, false).await
}

async fn set_disabled(
    st: AppState,
    admin: Admin,
    name: String,
    disabled: bool,
) -> Result<Json<NodeInfo>, ApiErr> {
    let (node, changed) = st
        .store
        .set_node_disabled(&admin.account, &name, disabled, &admin.actor, now())
        .await?;
    if changed {
        st.hub.notify(admin.account.id);
        tracing::info!(account = %admin.account.name, node = %name, disabled, "node disabled or enabled");
    }
    Ok(Json(node_info(&st, &admin.account, &node)))
}

/// Replaces a node's tags. Policies that name its tags follow within a second.
#[utoipa::path(put, path = "/api/v1/nodes/{name}/tags", tag = "nodes",
    request_body = SetTagsRequest,
    params(("name" = String, Path, description = "Node name"),
        ("account" = Option<String>, Query, description = "Account to act on (operator key only; default: the key's own)")),
    security(("bearer" = [])),
    responses((status = 200, body = NodeInfo),
        (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError),
        (status = 404, body = ApiError)))]
pub async fn set_node_tags(
    State(st): State<AppState>,
    admin: Admin,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<SetTagsRequest>,
) -> Result<Json<NodeInfo>, ApiErr> {
    let (node, changed) = st
        .store
        .set_node_tags(&admin.account, &name, &req.tags, &admin.actor)
        .await?;
    if changed {
        st.hub.notify(admin.account.id);
        tracing::info!(account = %admin.account.name, node = %name, tags = ?node.tags, "node tags set");
    }
    Ok(Json(node_info(&st, &admin.account, &node)))
}
