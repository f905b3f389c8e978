//! The web dashboard: first-run wizard, login, sessions and the overview page.
//!
//! Pages are server-rendered with askama (templates compiled in), CSS and JS
//! are embedded and served from the binary. Every POST carries the session's
//! CSRF token (forms shown before login use a double-submit cookie instead);
//! a wrong or missing one is refused with 403. A session acts only on the
//! account of the admin who logged in.

// Handlers pass finished pages (an error page, a redirect) up as `Err(Response)`.
#![allow(clippy::result_large_err)]

pub mod auth;
mod bindings;
pub mod db;
pub mod install;
mod manage;
mod observe;
mod pages;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use askama::Template;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::map_response;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use trellis_proto::ApiError;

use crate::api::{node_info, now, Admin, ApiErr, ApiJson, AppState};
use crate::store::{rfc3339, Account, StoreError};
use auth::{ct_eq, PRE_CSRF_COOKIE, SESSION_COOKIE};
use db::{check_password, normalize_email, SessionRow, SESSION_TTL_SECS};
use pages::*;

/// How long the wizard's join token lives.
pub const WIZARD_TOKEN_TTL_SECS: u64 = 3600;
/// A wizard join token with less time left than this is replaced.
const WIZARD_TOKEN_MIN_LEFT_SECS: i64 = 15 * 60;
/// Longest a connection test may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// The dashboard's in-memory state.
pub struct DashState {
    /// The URL browsers and nodes use to reach this server (no trailing slash).
    pub url: String,
    /// Whether cookies get the Secure flag (the URL is https).
    pub secure: bool,
    pub limiter: auth::LoginLimiter,
    /// The join token the wizard shows, per account: (token, expires_at).
    join_tokens: Mutex<HashMap<i64, (String, i64)>>,
}

impl DashState {
    pub fn new(url: &str) -> DashState {
        let url = url.trim_end_matches('/').to_string();
        DashState {
            secure: url.starts_with("https://"),
            url,
            limiter: auth::LoginLimiter::default(),
            join_tokens: Mutex::new(HashMap::new()),
        }
    }
}

/// The dashboard's routes (merged beside `/api/v1`).
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(home))
        .route("/login", get(login_page).post(login_submit))
        .route("/logout", post(logout))
        .route("/logout/everywhere", post(logout_everywhere))
        .route("/setup", get(setup_page).post(setup_submit))
        .route("/setup/network", get(network_page).post(network_submit))
        .route("/setup/devices", get(devices_page))
        .route("/setup/test", get(test_page).post(test_submit))
        .route("/setup/done", get(done_page))
        .route("/dash/api/nodes", get(api_nodes))
        .merge(observe::routes())
        .route("/install.sh", get(install::script))
        .route("/download/trellis", get(install::download))
        .route("/assets/dash.css", get(css))
        .route("/assets/dash.js", get(js))
        .merge(manage::routes())
        .merge(bindings::routes())
        .fallback(not_found)
        .layer(map_response(security_headers))
}

async fn security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

async fn css() -> Response {
    asset("text/css; charset=utf-8", include_str!("assets/dash.css"))
}

async fn js() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("assets/dash.js"),
    )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        body,
    )
        .into_response()
}

/// Renders a page (never cached: pages carry CSRF tokens).
fn render(status: StatusCode, t: &impl Template) -> Response {
    match t.render() {
        Ok(html) => (
            status,
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            html,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "rendering a dashboard page failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "rendering the page failed; see the server log",
            )
                .into_response()
        }
    }
}

/// A page with a title and one message.
fn message(status: StatusCode, title: &str, text: &str, nav: Option<Nav>) -> Response {
    render(
        status,
        &MessagePage {
            nav,
            title: title.to_string(),
            text: text.to_string(),
        },
    )
}

fn store_failed(e: StoreError) -> Response {
    tracing::error!(error = %e, "dashboard: store failure");
    message(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Something went wrong",
        "The server's database failed; see the server log.",
        None,
    )
}

fn csrf_refused() -> Response {
    message(
        StatusCode::FORBIDDEN,
        "Form refused",
        "This form was out of date or did not come from this dashboard. Go back, reload the page and try again.",
        None,
    )
}

async fn not_found() -> Response {
    message(
        StatusCode::NOT_FOUND,
        "Not found",
        "There is no page here. Go to the overview.",
        None,
    )
}

/// A see-other redirect (after a POST, or to the right step).
fn to(path: &str) -> Response {
    Redirect::to(path).into_response()
}

fn with_cookie(mut resp: Response, cookie: String) -> Response {
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp
}

/// A logged-in browser.
struct Sess {
    sid: String,
    row: SessionRow,
}

impl Sess {
    fn nav(&self, current: &'static str) -> Option<Nav> {
        Some(Nav {
            email: self.row.admin.email.clone(),
            network: self.row.account.name.clone(),
            csrf: self.row.csrf.clone(),
            current,
        })
    }

    fn account(&self) -> &Account {
        &self.row.account
    }

    fn actor(&self) -> String {
        format!("dashboard:{}", self.row.admin.email)
    }

    fn csrf_ok(&self, sent: &str) -> bool {
        !sent.is_empty() && ct_eq(sent, &self.row.csrf)
    }
}

async fn session(st: &AppState, headers: &HeaderMap) -> Result<Option<Sess>, Response> {
    let Some(sid) = auth::cookie(headers, SESSION_COOKIE) else {
        return Ok(None);
    };
    match st.store.session(sid, now()).await {
        Ok(row) => Ok(row.map(|row| Sess {
            sid: sid.to_string(),
            row,
        })),
        Err(e) => Err(store_failed(e)),
    }
}

/// The session, or a redirect to the login page (or the setup notice).
async fn need_session(st: &AppState, headers: &HeaderMap) -> Result<Sess, Response> {
    if let Some(s) = session(st, headers).await? {
        return Ok(s);
    }
    match st.store.dashboard_admin_exists().await {
        Ok(true) => Err(to("/login")),
        Ok(false) => Err(not_set_up()),
        Err(e) => Err(store_failed(e)),
    }
}

fn not_set_up() -> Response {
    message(
        StatusCode::OK,
        "Set up Trellis",
        "No admin exists yet. Open the setup link that `trellis server` printed when it started (it looks like http://HOST:PORT/setup?token=...); restart the server to see it again.",
        None,
    )
}

/// Parses a url-encoded form body.
fn form<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, Response> {
    serde_urlencoded::from_bytes(body).map_err(|e| {
        message(
            StatusCode::BAD_REQUEST,
            "Bad form",
            &format!("The form could not be read: {e}."),
            None,
        )
    })
}

/// A fresh pre-login CSRF token and the cookie that carries it.
fn pre_csrf(st: &AppState, headers: &HeaderMap) -> (String, Option<String>) {
    match auth::cookie(headers, PRE_CSRF_COOKIE) {
        Some(v) => (v.to_string(), None),
        None => {
            let v = crate::store::new_secret("");
            let c = auth::set_cookie(PRE_CSRF_COOKIE, &v, st.dash.secure, None);
            (v, Some(c))
        }
    }
}

fn pre_csrf_ok(headers: &HeaderMap, sent: &str) -> bool {
    auth::cookie(headers, PRE_CSRF_COOKIE).is_some_and(|c| !sent.is_empty() && ct_eq(c, sent))
}

fn maybe_cookie(resp: Response, cookie: Option<String>) -> Response {
    match cookie {
        Some(c) => with_cookie(resp, c),
        None => resp,
    }
}

/// Starts a session for `admin_id` and sends the browser to `next`.
async fn log_in(st: &AppState, admin_id: i64, next: &str) -> Response {
    match st.store.create_session(admin_id, now()).await {
        Ok((sid, _csrf)) => {
            let resp = with_cookie(
                to(next),
                auth::set_cookie(SESSION_COOKIE, &sid, st.dash.secure, Some(SESSION_TTL_SECS)),
            );
            with_cookie(resp, auth::clear_cookie(PRE_CSRF_COOKIE, st.dash.secure))
        }
        Err(e) => store_failed(e),
    }
}

/// Where an account's wizard resumes ("/" once done).
async fn resume_path(st: &AppState, account: &Account) -> Result<&'static str, Response> {
    let wizard = st.store.wizard(account.id).await.map_err(store_failed)?;
    if wizard.done {
        return Ok("/");
    }
    if !wizard.network_named {
        return Ok("/setup/network");
    }
    if st.hub.online_in(account.id).len() < 2 {
        return Ok("/setup/devices");
    }
    Ok("/setup/test")
}

// ---- login and logout ----

#[derive(Deserialize, Default)]
#[serde(default)]
struct LoginForm {
    email: String,
    password: String,
    csrf: String,
}

async fn login_page(State(st): State<AppState>, headers: HeaderMap) -> Response {
    if let Ok(Some(_)) = session(&st, &headers).await {
        return to("/");
    }
    let no_admin = !st.store.dashboard_admin_exists().await.unwrap_or(true);
    let (csrf, cookie) = pre_csrf(&st, &headers);
    let page = LoginPage {
        nav: None,
        csrf,
        email: String::new(),
        error: None,
        no_admin,
    };
    maybe_cookie(render(StatusCode::OK, &page), cookie)
}

async fn login_submit(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let f: LoginForm = match form(&body) {
        Ok(f) => f,
        Err(r) => return r,
    };
    if !pre_csrf_ok(&headers, &f.csrf) {
        return csrf_refused();
    }
    let email = f.email.trim().to_lowercase();
    let again = |status: StatusCode, error: String| {
        render(
            status,
            &LoginPage {
                nav: None,
                csrf: f.csrf.clone(),
                email: f.email.trim().to_string(),
                error: Some(error),
                no_admin: false,
            },
        )
    };
    if let Some(wait) = st.dash.limiter.locked(&email, peer.ip()) {
        return again(
            StatusCode::TOO_MANY_REQUESTS,
            format!("Too many failed logins for this email from your address. Wait {wait} seconds and try again."),
        );
    }
    let found = match st.store.admin_by_email(&email).await {
        Ok(f) => f,
        Err(e) => return store_failed(e),
    };
    let password = f.password.clone();
    let (admin, hash) = match found {
        Some((a, h)) => (Some(a), h),
        None => (None, auth::dummy_hash().to_string()),
    };
    let ok = tokio::task::spawn_blocking(move || auth::verify_password(&password, &hash))
        .await
        .unwrap_or(false);
    match admin {
        Some(admin) if ok => {
            st.dash.limiter.succeeded(&email, peer.ip());
            tracing::info!(email = %admin.email, "dashboard login");
            let account = match st.store.account_by_id(admin.account_id).await {
                Ok(Some(a)) => a,
                Ok(None) => return not_found().await,
                Err(e) => return store_failed(e),
            };
            let next = match resume_path(&st, &account).await {
                Ok(p) => p,
                Err(r) => return r,
            };
            log_in(&st, admin.id, next).await
        }
        _ => {
            st.dash.limiter.failed(&email, peer.ip());
            again(
                StatusCode::UNAUTHORIZED,
                "Wrong email or password.".to_string(),
            )
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct CsrfForm {
    csrf: String,
}

async fn logout(State(st): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let s = match need_session(&st, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let f: CsrfForm = match form(&body) {
        Ok(f) => f,
        Err(r) => return r,
    };
    if !s.csrf_ok(&f.csrf) {
        return csrf_refused();
    }
    if let Err(e) = st.store.delete_session(&s.sid).await {
        return store_failed(e);
    }
    with_cookie(
        to("/login"),
        auth::clear_cookie(SESSION_COOKIE, st.dash.secure),
    )
}

async fn logout_everywhere(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let s = match need_session(&st, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let f: CsrfForm = match form(&body) {
        Ok(f) => f,
        Err(r) => return r,
    };
    if !s.csrf_ok(&f.csrf) {
        return csrf_refused();
    }
    match st.store.delete_admin_sessions(s.row.admin.id).await {
        Ok(n) => tracing::info!(email = %s.row.admin.email, sessions = n, "logged out everywhere"),
        Err(e) => return store_failed(e),
    }
    with_cookie(
        to("/login"),
        auth::clear_cookie(SESSION_COOKIE, st.dash.secure),
    )
}

// ---- wizard step 1: the first admin ----

#[derive(Deserialize)]
struct SetupQuery {
    token: Option<String>,
}

async fn setup_page(
    State(st): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<SetupQuery>,
) -> Response {
    let sess = match session(&st, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    if let Some(s) = sess {
        return match resume_path(&st, s.account()).await {
            Ok("/") => to("/setup/network"),
            Ok(p) => to(p),
            Err(r) => r,
        };
    }
    let token = q.token.unwrap_or_default();
    let valid = match st.store.setup_token_valid(&token).await {
        Ok(v) => v,
        Err(e) => return store_failed(e),
    };
    if !valid {
        let exists = st.store.dashboard_admin_exists().await.unwrap_or(false);
        return if exists {
            message(
                StatusCode::FORBIDDEN,
                "Setup link already used",
                "This setup link was used already: an admin exists. Log in instead.",
                None,
            )
        } else {
            message(
                StatusCode::FORBIDDEN,
                "Setup link not valid",
                "This setup link is not valid (it changes each time the server starts). Use the newest link that `trellis server` printed.",
                None,
            )
        };
    }
    let (csrf, cookie) = pre_csrf(&st, &headers);
    let page = SetupAdminPage {
        nav: None,
        step: 1,
        token,
        csrf,
        email: String::new(),
        error: None,
    };
    maybe_cookie(render(StatusCode::OK, &page), cookie)
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct SetupForm {
    token: String,
    email: String,
    password: String,
    csrf: String,
}

async fn setup_submit(State(st): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let f: SetupForm = match form(&body) {
        Ok(f) => f,
        Err(r) => return r,
    };
    if !pre_csrf_ok(&headers, &f.csrf) {
        return csrf_refused();
    }
    let again = |error: String| {
        render(
            StatusCode::BAD_REQUEST,
            &SetupAdminPage {
                nav: None,
                step: 1,
                token: f.token.clone(),
                csrf: f.csrf.clone(),
                email: f.email.trim().to_string(),
                error: Some(error),
            },
        )
    };
    let email = match normalize_email(&f.email) {
        Ok(e) => e,
        Err(e) => return again(e),
    };
    if let Err(e) = check_password(&f.password) {
        return again(e);
    }
    let password = f.password.clone();
    let hash = match tokio::task::spawn_blocking(move || auth::hash_password(&password)).await {
        Ok(Ok(h)) => h,
        _ => return again("hashing the password failed; try again".into()),
    };
    match st
        .store
        .create_first_admin(&f.token, &email, &hash, now())
        .await
    {
        Ok(admin) => {
            tracing::info!(email = %admin.email, "first dashboard admin created");
            log_in(&st, admin.id, "/setup/network").await
        }
        Err(StoreError::Forbidden(m)) => message(
            StatusCode::FORBIDDEN,
            "Setup link already used",
            &format!("{m}."),
            None,
        ),
        Err(e) => store_failed(e),
    }
}

// ---- wizard step 2: the network's name ----

async fn network_page(State(st): State<AppState>, headers: HeaderMap) -> Response {
    let s = match need_session(&st, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let has_nodes = match st.store.list_nodes(s.account().id).await {
        Ok(n) => !n.is_empty(),
        Err(e) => return store_failed(e),
    };
    let acc = s.account();
    let name = if acc.name == crate::store::DEFAULT_ACCOUNT {
        String::new()
    } else {
        acc.name.clone()
    };
    let page = NetworkPage {
        nav: s.nav("setup"),
        step: 2,
        csrf: s.row.csrf.clone(),
        name,
        cidr: acc.cidr.to_string(),
        has_nodes,
        current: acc.name.clone(),
        error: None,
    };
    render(StatusCode::OK, &page)
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct NetworkForm {
    name: String,
    cidr: String,
    csrf: String,
}

async fn network_submit(State(st): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let s = match need_session(&st, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let f: NetworkForm = match form(&body) {
        Ok(f) => f,
        Err(r) => return r,
    };
    if !s.csrf_ok(&f.csrf) {
        return csrf_refused();
    }
    let has_nodes = st
        .store
        .list_nodes(s.account().id)
        .await
        .map(|n| !n.is_empty())
        .unwrap_or(false);
    let again = |error: String| {
        render(
            StatusCode::BAD_REQUEST,
            &NetworkPage {
                nav: s.nav("setup"),
                step: 2,
                csrf: s.row.csrf.clone(),
                name: f.name.clone(),
                cidr: f.cidr.clone(),
                has_nodes,
                current: s.account().name.clone(),
                error: Some(error),
            },
        )
    };
    let name = f.name.trim();
    if name.is_empty() {
        return again("Give the network a name, e.g. home or acme.".into());
    }
    if let Err(e) = trellis_proto::validate_name("network", name) {
        return again(format!(
            "{e}. Example: {}",
            trellis_proto::sanitize_name(name).trim_matches('-')
        ));
    }
    let cidr_text = f.cidr.trim();
    let cidr = if cidr_text.is_empty() || cidr_text == s.account().cidr.to_string() {
        None
    } else {
        match cidr_text.parse::<ipnet::Ipv4Net>() {
            Ok(c) => Some(c),
            Err(_) => {
                return again(format!(
                    "{cidr_text:?} is not an address block; write it like 100.64.0.0/16"
                ))
            }
        }
    };
    match st
        .store
        .name_network(s.account(), name, cidr, now(), &s.actor())
        .await
    {
        Ok(acc) => {
            tracing::info!(network = %acc.name, cidr = %acc.cidr, "network named in the dashboard");
            to("/setup/devices")
        }
        Err(StoreError::Invalid(m) | StoreError::Conflict(m) | StoreError::NotFound(m)) => again(m),
        Err(e) => store_failed(e),
    }
}

// ---- wizard steps 3 and 4: devices ----

/// The wizard's join token for `account` (reused while it has 15 min left).
async fn wizard_token(st: &AppState, s: &Sess) -> Result<(String, i64), StoreError> {
    let account = s.account().id;
    let now = now();
    if let Some((t, exp)) = st
        .dash
        .join_tokens
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&account)
        .cloned()
    {
        if exp - now > WIZARD_TOKEN_MIN_LEFT_SECS {
            return Ok((t, exp));
        }
    }
    let (_, token, exp) = st
        .store
        .create_token(
            account,
            true,
            false,
            WIZARD_TOKEN_TTL_SECS,
            &[],
            now,
            &s.actor(),
        )
        .await?;
    st.dash
        .join_tokens
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(account, (token.clone(), exp));
    Ok((token, exp))
}

/// The command that installs and joins a Linux machine.
pub fn join_command(url: &str, token: &str) -> String {
    format!("curl -fsSL {url}/install.sh | sudo sh -s -- --token {token}")
}

/// The account's devices as the pages and the JSON endpoint show them.
async fn devices(st: &AppState, account: &Account) -> Result<Vec<DeviceView>, StoreError> {
    let nodes = st.store.list_nodes(account.id).await?;
    let now = now();
    Ok(nodes
        .iter()
        .map(|n| {
            let info = node_info(st, account, n);
            DeviceView {
                name: info.name,
                ip: info.ip.to_string(),
                online: info.online,
                last_seen: match info.last_seen {
                    _ if info.online => "now".to_string(),
                    Some(t) => ago(now, t),
                    None => "never".to_string(),
                },
                last_seen_at: info.last_seen.map(rfc3339).unwrap_or_default(),
                os: info.os,
                version: info.version,
                tags: info.tags,
            }
        })
        .collect())
}

/// "12 s ago", "3 min ago", "5 h ago", "2 days ago".
fn ago(now: i64, then: i64) -> String {
    let d = (now - then).max(0);
    match d {
        0..=59 => format!("{d} s ago"),
        60..=3599 => format!("{} min ago", d / 60),
        3600..=86_399 => format!("{} h ago", d / 3600),
        _ => format!("{} days ago", d / 86_400),
    }
}

async fn devices_page(State(st): State<AppState>, headers: HeaderMap) -> Response {
    let s = match need_session(&st, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let (token, exp) = match wizard_token(&st, &s).await {
        Ok(t) => t,
        Err(e) => return store_failed(e),
    };
    let list = match devices(&st, s.account()).await {
        Ok(d) => d,
        Err(e) => return store_failed(e),
    };
    let online = list.iter().filter(|d| d.online).count();
    let page = DevicesPage {
        nav: s.nav("setup"),
        step: 3,
        join_command: join_command(&st.dash.url, &token),
        expires: rfc3339(exp),
        network: s.account().name.clone(),
        devices: list,
        online,
    };
    render(StatusCode::OK, &page)
}

/// What `/dash/api/nodes` returns.
#[derive(Serialize)]
struct NodesJson {
    network: String,
    online: usize,
    total: usize,
    devices: Vec<DeviceView>,
}

async fn api_nodes(State(st): State<AppState>, headers: HeaderMap) -> Response {
    let s = match session(&st, &headers).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            return (
                StatusCode::UNAUTHORIZED,
                Json(ApiError {
                    error: "not logged in: log in to the dashboard first".into(),
                }),
            )
                .into_response()
        }
        Err(r) => return r,
    };
    match devices(&st, s.account()).await {
        Ok(list) => {
            let out = NodesJson {
                network: s.account().name.clone(),
                online: list.iter().filter(|d| d.online).count(),
                total: list.len(),
                devices: list,
            };
            ([(header::CACHE_CONTROL, "no-store")], Json(out)).into_response()
        }
        Err(e) => ApiErr::from(e).into_response(),
    }
}

// ---- wizard step 5: the connection test ----

async fn test_page(State(st): State<AppState>, headers: HeaderMap) -> Response {
    let s = match need_session(&st, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    test_render(&st, &s, None, String::new(), String::new()).await
}

async fn test_render(
    st: &AppState,
    s: &Sess,
    result: Option<TestResult>,
    from: String,
    to: String,
) -> Response {
    let list = match devices(st, s.account()).await {
        Ok(d) => d,
        Err(e) => return store_failed(e),
    };
    // Preselect two online devices (any two when fewer are online).
    let mut online: Vec<&DeviceView> = list.iter().filter(|d| d.online).collect();
    if online.len() < 2 {
        online = list.iter().collect();
    }
    let from = if from.is_empty() {
        online.first().map(|d| d.name.clone()).unwrap_or_default()
    } else {
        from
    };
    let to = if to.is_empty() {
        online
            .iter()
            .find(|d| d.name != from)
            .map(|d| d.name.clone())
            .unwrap_or_default()
    } else {
        to
    };
    render(
        StatusCode::OK,
        &TestPage {
            nav: s.nav("setup"),
            step: 5,
            csrf: s.row.csrf.clone(),
            devices: list,
            from,
            to,
            result,
        },
    )
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct TestForm {
    from: String,
    to: String,
    csrf: String,
}

async fn test_submit(State(st): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let wants_json = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/json"));
    let s = match session(&st, &headers).await {
        Ok(Some(s)) => s,
        Ok(None) if wants_json => {
            return (
                StatusCode::UNAUTHORIZED,
                Json(ApiError {
                    error: "not logged in: log in to the dashboard first".into(),
                }),
            )
                .into_response()
        }
        Ok(None) => return to("/login"),
        Err(r) => return r,
    };
    let f: TestForm = match form(&body) {
        Ok(f) => f,
        Err(r) => return r,
    };
    if !s.csrf_ok(&f.csrf) {
        return csrf_refused();
    }
    let result = run_test(&st, s.account(), f.from.trim(), f.to.trim()).await;
    if wants_json {
        return ([(header::CACHE_CONTROL, "no-store")], Json(result)).into_response();
    }
    test_render(&st, &s, Some(result), f.from, f.to).await
}

/// Runs one connection test and words its result.
async fn run_test(st: &AppState, account: &Account, from: &str, to: &str) -> TestResult {
    let fail = |message: String| TestResult {
        ok: false,
        message,
        rtt_ms: None,
        path: None,
    };
    if from.is_empty() || to.is_empty() {
        return fail("Pick two devices: one to start from and one to reach.".into());
    }
    if from == to {
        return fail(format!(
            "Pick two different devices: {from} would only be talking to itself."
        ));
    }
    match tokio::time::timeout(PROBE_TIMEOUT, crate::probe::probe(st, account.id, from, to)).await {
        Err(_) => fail(format!(
            "The test from {from} to {to} took longer than {} seconds and was given up.",
            PROBE_TIMEOUT.as_secs()
        )),
        Ok(Err(m)) => fail(m),
        Ok(Ok(o)) => TestResult {
            ok: o.ok,
            message: o.message,
            rtt_ms: o.rtt_ms,
            path: o.path,
        },
    }
}

// ---- wizard step 7: done ----

async fn done_page(State(st): State<AppState>, headers: HeaderMap) -> Response {
    let s = match need_session(&st, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    if let Err(e) = st.store.wizard_done(s.account().id, now()).await {
        return store_failed(e);
    }
    let list = match devices(&st, s.account()).await {
        Ok(d) => d,
        Err(e) => return store_failed(e),
    };
    let acc = s.account();
    render(
        StatusCode::OK,
        &DonePage {
            nav: s.nav("setup"),
            step: 7,
            network: acc.name.clone(),
            cidr: acc.cidr.to_string(),
            domain: crate::mesh::account_domain(&acc.name, &st.dash_suffix()),
            online: list.iter().filter(|d| d.online).count(),
            devices: list,
        },
    )
}

// ---- the overview ----

async fn home(State(st): State<AppState>, headers: HeaderMap) -> Response {
    let s = match need_session(&st, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    match resume_path(&st, s.account()).await {
        Ok("/") => {}
        Ok(p) => return to(p),
        Err(r) => return r,
    }
    let list = match devices(&st, s.account()).await {
        Ok(d) => d,
        Err(e) => return store_failed(e),
    };
    let acc = s.account();
    let day_ago = crate::flows::now_ms() - 24 * 3600 * 1000;
    let traffic = match st.store.traffic_summary(acc.id, day_ago).await {
        Ok(t) => traffic_words(&t),
        Err(e) => return store_failed(e),
    };
    render(
        StatusCode::OK,
        &HomePage {
            edge: edge_words(&st),
            traffic,
            nav: s.nav("overview"),
            network: acc.name.clone(),
            cidr: acc.cidr.to_string(),
            domain: crate::mesh::account_domain(&acc.name, &st.dash_suffix()),
            online: list.iter().filter(|d| d.online).count(),
            devices: list,
        },
    )
}

/// The edge's health in words.
fn edge_words(st: &AppState) -> String {
    match &st.relay.udp {
        None => "no edge on this server: nodes reach each other only directly".into(),
        Some(addr) => {
            let s = st.relay.hub.stats();
            format!(
                "edge up on {addr} (discovery and relay): {} registrations, {} packets relayed, {} kept apart by the policy",
                s.registrations, s.relayed_packets, s.dropped_policy
            )
        }
    }
}

/// "12 connections, 3.4 MiB, 2 denied attempts".
fn traffic_words(t: &trellis_proto::TrafficSummary) -> String {
    let plural = |n: u64, one: &str, many: &str| {
        if n == 1 {
            format!("1 {one}")
        } else {
            format!("{n} {many}")
        }
    };
    let b = t.bytes as f64;
    let bytes = if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{} bytes", t.bytes)
    };
    format!(
        "{}, {bytes}, {}",
        plural(t.connections, "connection", "connections"),
        plural(t.denied, "denied attempt", "denied attempts")
    )
}

impl AppState {
    fn dash_suffix(&self) -> String {
        self.dns_suffix.to_string()
    }
}

// ---- the API: dashboard admins ----

/// Body of `POST /api/v1/admins`.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreateAdminRequest {
    /// The admin's email (their login name; unique on this server).
    pub email: String,
    /// At least 10 characters.
    pub password: String,
}

/// An admin as the API shows it.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct AdminInfo {
    pub email: String,
    pub account: String,
}

/// Lists the account's dashboard admins (never their passwords).
#[utoipa::path(get, path = "/api/v1/admins", tag = "accounts",
    params(("account" = Option<String>, Query, description = "Account to act on (operator key only; default: the key's own)")),
    security(("bearer" = [])),
    responses((status = 200, body = Vec<AdminInfo>),
        (status = 401, body = ApiError), (status = 403, body = ApiError)))]
pub async fn list_admins(
    State(st): State<AppState>,
    admin: Admin,
) -> Result<Json<Vec<AdminInfo>>, ApiErr> {
    let rows = manage::list_admins(&st, admin.account.id).await?;
    Ok(Json(
        rows.into_iter()
            .map(|(email, _)| AdminInfo {
                email,
                account: admin.account.name.clone(),
            })
            .collect(),
    ))
}

/// Adds a dashboard admin (email and password) to the account.
#[utoipa::path(post, path = "/api/v1/admins", tag = "accounts",
    request_body = CreateAdminRequest,
    params(("account" = Option<String>, Query, description = "Account to act on (operator key only; default: the key's own)")),
    security(("bearer" = [])),
    responses((status = 201, body = AdminInfo),
        (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, body = ApiError),
        (status = 409, body = ApiError)))]
pub async fn create_admin(
    State(st): State<AppState>,
    admin: Admin,
    ApiJson(req): ApiJson<CreateAdminRequest>,
) -> Result<(StatusCode, Json<AdminInfo>), ApiErr> {
    let email = normalize_email(&req.email).map_err(|e| ApiErr::new(StatusCode::BAD_REQUEST, e))?;
    check_password(&req.password).map_err(|e| ApiErr::new(StatusCode::BAD_REQUEST, e))?;
    let password = req.password;
    let hash = tokio::task::spawn_blocking(move || auth::hash_password(&password))
        .await
        .map_err(|_| {
            ApiErr::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "hashing the password failed",
            )
        })?
        .map_err(|e| ApiErr::new(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    let created = st
        .store
        .create_admin(&admin.account, &email, &hash, now(), &admin.actor)
        .await?;
    tracing::info!(account = %admin.account.name, email = %created.email, actor = %admin.actor, "dashboard admin created");
    Ok((
        StatusCode::CREATED,
        Json(AdminInfo {
            email: created.email,
            account: admin.account.name,
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_naturally() {
        assert_eq!(ago(100, 88), "12 s ago");
        assert_eq!(ago(1000, 100), "15 min ago");
        assert_eq!(ago(20_000, 0), "5 h ago");
        assert_eq!(ago(200_000, 0), "2 days ago");
        assert_eq!(ago(0, 10), "0 s ago");
    }

    #[test]
    fn cookies_are_secure_exactly_when_the_url_is_https() {
        let d = DashState::new("https://mesh.example.com/");
        assert!(d.secure);
        assert_eq!(d.url, "https://mesh.example.com");
        assert!(!DashState::new("http://127.0.0.1:8080").secure);
    }

    #[test]
    fn the_join_command_installs_from_this_server() {
        assert_eq!(
            join_command("http://198.18.0.1:8080", "trj_x"),
            "curl -fsSL http://198.18.0.1:8080/install.sh | sudo sh -s -- --token trj_x"
        );
    }
}
