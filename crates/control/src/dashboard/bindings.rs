//! Dashboard pages for bindings (`docs/gateway.md`): the list with a create
//! form and revoke buttons, the log of requests through the fetch gateway,
//! and the wizard's optional step "Connect an agent or function".
//!
//! Creating and revoking go through `crate::bindings::{create, revoke}`, the
//! functions the REST API calls (checks, audit entry, nodes and gateway
//! told); the request log reads with the API's own filters.

// Handlers pass finished pages (an error page, a redirect) up as `Err(Response)`.
#![allow(clippy::result_large_err)]

use askama::Template;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use trellis_proto::{BindingInfo, CreateBindingRequest, CreateBindingResponse, RequestLogRecord};

use super::manage::{parse_tags, posted};
use super::pages::Nav;
use super::{message, need_session, render, store_failed, to, CsrfForm, Sess};
use crate::api::{now, ApiErr, AppState};
use crate::bindings::RequestParams;
use crate::store::{rfc3339, Account};

/// Request records one page of the log shows.
pub const REQUEST_PAGE: i64 = 50;
/// The name the wizard suggests for its binding.
pub const WIZARD_BINDING_NAME: &str = "agent";

/// The lifetimes the create form offers: (form value, label, seconds; None never expires).
const TTLS: [(&str, &str, Option<u64>); 7] = [
    ("never", "Never expires", None),
    ("1h", "1 hour", Some(3600)),
    ("24h", "24 hours", Some(86_400)),
    ("7d", "7 days", Some(7 * 86_400)),
    ("30d", "30 days", Some(30 * 86_400)),
    ("90d", "90 days", Some(90 * 86_400)),
    ("365d", "1 year", Some(365 * 86_400)),
];

/// The routes of these pages.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/bindings", get(bindings_page).post(binding_create))
        .route(
            "/bindings/{name}/revoke",
            get(revoke_page).post(binding_revoke),
        )
        .route("/requests", get(requests_page))
        .route("/setup/agent", get(agent_page).post(agent_submit))
}

macro_rules! attempt {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(r) => return r,
        }
    };
}

/// An API error a person can act on becomes `Ok((status, sentence))`.
fn readable(e: ApiErr) -> Result<(StatusCode, String), Response> {
    if e.status.is_server_error() {
        tracing::error!(error = %e.message, "dashboard: binding action failed");
        return Err(message(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Something went wrong",
            "The server's database failed; see the server log.",
            None,
        ));
    }
    Ok((e.status, sentence(&e.message)))
}

/// "first letter up, full stop at the end".
fn sentence(m: &str) -> String {
    let m = m.trim().trim_end_matches('.');
    let mut c = m.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect::<String>() + ".",
        None => String::new(),
    }
}

/// A binding just created: its line and how to use it, shown once.
pub struct NewBinding {
    pub name: String,
    pub ip: String,
    /// When it stops working; None never.
    pub expires: Option<String>,
    /// `MESH=SCHEME://b_<id>:<secret>@HOST:PORT`.
    pub line: String,
    pub curl: String,
    pub python: String,
    pub js: String,
}

/// The URL the snippets fetch: a device of the account, by its mesh name.
async fn example_url(st: &AppState, account: &Account) -> String {
    let domain = crate::mesh::account_domain(&account.name, &st.dns_suffix);
    let node = match st.store.list_nodes(account.id).await {
        Ok(nodes) => nodes
            .into_iter()
            .find(|n| !n.disabled)
            .map(|n| n.name)
            .unwrap_or_else(|| "NODE".into()),
        Err(_) => "NODE".into(),
    };
    format!("http://{node}.{domain}/")
}

fn new_binding(made: &CreateBindingResponse, example: &str) -> NewBinding {
    NewBinding {
        name: made.binding.name.clone(),
        ip: made.binding.ip.to_string(),
        expires: made.binding.expires_at.map(rfc3339),
        line: format!("MESH={}", made.url),
        curl: format!("curl --proxy \"$MESH\" {example}"),
        python: format!(
            "from trellis_mesh import Mesh\n\nr = Mesh.from_env().get(\"{example}\")  # reads MESH\nprint(r.status_code, r.text)"
        ),
        js: format!(
            "import {{ mesh }} from '@trellis-mesh/sdk';\n\nconst res = await mesh(env.MESH).fetch('{example}');\nconsole.log(res.status, await res.text());"
        ),
    }
}

/// The create form's values (kept after an error).
#[derive(Deserialize, Default, Clone)]
#[serde(default)]
pub struct BindingForm {
    pub name: String,
    pub tags: String,
    pub ttl: String,
}

impl BindingForm {
    fn fresh(name: &str) -> BindingForm {
        BindingForm {
            name: name.into(),
            tags: String::new(),
            ttl: "never".into(),
        }
    }
}

/// Checks the form and creates the binding through the API's function.
async fn create_from_form(
    st: &AppState,
    s: &Sess,
    f: &BindingForm,
) -> Result<Result<NewBinding, (StatusCode, String)>, Response> {
    let name = f.name.trim();
    if name.is_empty() {
        return Ok(Err((
            StatusCode::BAD_REQUEST,
            "Give the binding a name that says what uses it, e.g. ci-runner or agent.".into(),
        )));
    }
    let Some(&(_, _, ttl_secs)) = TTLS.iter().find(|(v, _, _)| *v == f.ttl) else {
        return Ok(Err((
            StatusCode::BAD_REQUEST,
            "Pick how long the binding works from the list.".into(),
        )));
    };
    let tags = match parse_tags(&f.tags) {
        Ok(t) => t,
        Err(e) => return Ok(Err((StatusCode::BAD_REQUEST, sentence(&e)))),
    };
    let req = CreateBindingRequest {
        name: name.to_string(),
        tags,
        ttl_secs,
    };
    match crate::bindings::create(st, s.account(), &req, &s.actor()).await {
        Ok(made) => {
            let example = example_url(st, s.account()).await;
            Ok(Ok(new_binding(&made, &example)))
        }
        Err(e) => Ok(Err(readable(e)?)),
    }
}

// ---- the list ----

/// One binding row.
pub struct BindingRow {
    pub name: String,
    pub ip: String,
    pub tags: String,
    /// "live", "expired" or "revoked".
    pub state: &'static str,
    pub created: String,
    pub expires: String,
    pub requests: u64,
    pub last_used: String,
}

fn row(b: &BindingInfo, now: i64) -> BindingRow {
    BindingRow {
        name: b.name.clone(),
        ip: b.ip.to_string(),
        tags: b.tags.join(", "),
        state: match b.state(now) {
            "active" => "live",
            other => other,
        },
        created: rfc3339(b.created_at),
        expires: b.expires_at.map(rfc3339).unwrap_or_else(|| "never".into()),
        requests: b.requests,
        last_used: b
            .last_used_at
            .map(|t| super::ago(now, t))
            .unwrap_or_else(|| "never".into()),
    }
}

#[derive(Template)]
#[template(path = "manage_bindings.html")]
pub struct BindingsPage {
    pub nav: Option<Nav>,
    pub csrf: String,
    pub gateway: bool,
    pub bindings: Vec<BindingRow>,
    pub created: Option<NewBinding>,
    pub notice: Option<String>,
    pub error: Option<String>,
    pub form: BindingForm,
    pub ttls: Vec<(&'static str, &'static str)>,
}

async fn bindings_render(
    st: &AppState,
    s: &Sess,
    status: StatusCode,
    form: BindingForm,
    created: Option<NewBinding>,
    notice: Option<String>,
    error: Option<String>,
) -> Response {
    let list = attempt!(st
        .store
        .list_bindings(s.account().id)
        .await
        .map_err(store_failed));
    let now = now();
    // Newest first; revoked ones after the others.
    let mut rows: Vec<BindingRow> = list
        .iter()
        .rev()
        .map(|b| row(&b.info(&s.account().name), now))
        .collect();
    rows.sort_by_key(|r| r.state == "revoked");
    render(
        status,
        &BindingsPage {
            nav: s.nav("bindings"),
            csrf: s.row.csrf.clone(),
            gateway: st.gateway.is_some(),
            bindings: rows,
            created,
            notice,
            error,
            form,
            ttls: TTLS.iter().map(|(v, l, _)| (*v, *l)).collect(),
        },
    )
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct DoneQuery {
    done: Option<String>,
}

async fn bindings_page(
    State(st): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<DoneQuery>,
) -> Response {
    let s = attempt!(need_session(&st, &headers).await);
    let notice = match q.done.as_deref() {
        Some("revoked") => Some(
            "The binding was revoked: the gateway refuses it within a second and its open connections end."
                .to_string(),
        ),
        _ => None,
    };
    bindings_render(
        &st,
        &s,
        StatusCode::OK,
        BindingForm::fresh(""),
        None,
        notice,
        None,
    )
    .await
}

async fn binding_create(State(st): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let (s, f): (Sess, BindingForm) = attempt!(posted(&st, &headers, &body).await);
    match attempt!(create_from_form(&st, &s, &f).await) {
        Ok(created) => {
            bindings_render(
                &st,
                &s,
                StatusCode::OK,
                BindingForm::fresh(""),
                Some(created),
                None,
                None,
            )
            .await
        }
        Err((status, m)) => bindings_render(&st, &s, status, f, None, None, Some(m)).await,
    }
}

#[derive(Template)]
#[template(path = "manage_binding_revoke.html")]
pub struct RevokeBindingPage {
    pub nav: Option<Nav>,
    pub csrf: String,
    pub binding: BindingRow,
}

/// The session's live (not revoked) binding `name`, or a 404 page.
async fn find_binding(st: &AppState, s: &Sess, name: &str) -> Result<BindingRow, Response> {
    let list = st
        .store
        .list_bindings(s.account().id)
        .await
        .map_err(store_failed)?;
    let now = now();
    list.iter()
        .find(|b| b.name == name && b.revoked_at.is_none())
        .map(|b| row(&b.info(&s.account().name), now))
        .ok_or_else(|| {
            message(
                StatusCode::NOT_FOUND,
                "No such binding",
                &format!(
                    "There is no binding named {name:?} that is not revoked in this network; see the bindings page."
                ),
                s.nav("bindings"),
            )
        })
}

async fn revoke_page(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    let s = attempt!(need_session(&st, &headers).await);
    let binding = attempt!(find_binding(&st, &s, &name).await);
    render(
        StatusCode::OK,
        &RevokeBindingPage {
            nav: s.nav("bindings"),
            csrf: s.row.csrf.clone(),
            binding,
        },
    )
}

async fn binding_revoke(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    let (s, _): (Sess, CsrfForm) = attempt!(posted(&st, &headers, &body).await);
    match crate::bindings::revoke(&st, s.account(), &name, &s.actor()).await {
        Ok(_) => to("/bindings?done=revoked"),
        Err(e) => {
            let (status, m) = attempt!(readable(e));
            bindings_render(&st, &s, status, BindingForm::fresh(""), None, None, Some(m)).await
        }
    }
}

// ---- the request log ----

/// One request record as the page shows it.
pub struct RequestView {
    pub id: i64,
    pub time: String,
    pub binding: String,
    pub method: String,
    pub target: String,
    pub path: String,
    pub status: u16,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub duration: String,
    pub decision: String,
    pub rule: String,
    pub error: String,
}

fn request_view(r: &RequestLogRecord) -> RequestView {
    RequestView {
        id: r.id,
        time: rfc3339(r.start_ms.div_euclid(1000)),
        binding: r.binding.clone(),
        method: r.method.clone(),
        target: match &r.node {
            Some(n) if !r.target.starts_with(&format!("{n}.")) => format!("{} ({n})", r.target),
            _ => r.target.clone(),
        },
        path: r.path.clone().unwrap_or_default(),
        status: r.status,
        bytes_up: r.bytes_up,
        bytes_down: r.bytes_down,
        duration: format!("{} ms", r.duration_ms),
        decision: r.decision.clone(),
        rule: r.rule.clone().unwrap_or_default(),
        error: r.error.clone().unwrap_or_default(),
    }
}

#[derive(Template)]
#[template(path = "observe_requests.html")]
pub struct RequestsPage {
    pub nav: Option<Nav>,
    pub since: String,
    pub binding: String,
    pub bindings: Vec<String>,
    pub error: Option<String>,
    pub records: Vec<RequestView>,
    /// The query of the next (older) page, if any.
    pub older: Option<String>,
    /// The query of this page (for the refresh link).
    pub current: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RequestsQuery {
    since: String,
    binding: String,
    before_id: String,
}

fn query_string(pairs: &[(&str, &str)]) -> String {
    serde_urlencoded::to_string(
        pairs
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .collect::<Vec<_>>(),
    )
    .unwrap_or_default()
}

async fn requests_page(State(st): State<AppState>, headers: HeaderMap, uri: Uri) -> Response {
    let s = attempt!(need_session(&st, &headers).await);
    let q: RequestsQuery = Query::try_from_uri(&uri).map(|q| q.0).unwrap_or_default();
    let account = s.account();
    let mut names: Vec<String> = attempt!(st
        .store
        .list_bindings(account.id)
        .await
        .map_err(store_failed))
    .into_iter()
    .map(|b| b.name)
    .collect();
    names.sort();
    names.dedup();
    let filters = [("since", q.since.trim()), ("binding", q.binding.trim())];
    let mut page = RequestsPage {
        nav: s.nav("requests"),
        since: q.since.clone(),
        binding: q.binding.trim().to_string(),
        bindings: names,
        error: None,
        records: Vec::new(),
        older: None,
        current: query_string(&[
            ("since", q.since.trim()),
            ("binding", q.binding.trim()),
            ("before_id", q.before_id.trim()),
        ]),
    };
    // The API's own parameters and checks.
    let mut pairs = filters.to_vec();
    pairs.push(("before_id", q.before_id.trim()));
    let parsed = serde_urlencoded::from_str::<RequestParams>(&query_string(&pairs))
        .map_err(|e| format!("bad filters: {e}"))
        .and_then(|p| {
            let filter = p.filter(crate::flows::now_ms()).map_err(|e| e.message)?;
            let before = p.before_id().map_err(|e| e.message)?;
            Ok((filter, before))
        });
    let (filter, before) = match parsed {
        Ok(x) => x,
        Err(m) => {
            page.error = Some(sentence(&m));
            return render(StatusCode::BAD_REQUEST, &page);
        }
    };
    let records = attempt!(st
        .store
        .query_requests(account.id, &filter, before, REQUEST_PAGE)
        .await
        .map_err(store_failed));
    if records.len() as i64 == REQUEST_PAGE {
        if let Some(last) = records.last() {
            let id = last.id.to_string();
            let mut pairs = filters.to_vec();
            pairs.push(("before_id", &id));
            page.older = Some(query_string(&pairs));
        }
    }
    page.records = records.iter().map(request_view).collect();
    render(StatusCode::OK, &page)
}

// ---- wizard step 6: connect an agent or function ----

#[derive(Template)]
#[template(path = "setup_agent.html")]
pub struct AgentPage {
    pub nav: Option<Nav>,
    pub step: u8,
    pub csrf: String,
    pub gateway: bool,
    pub form: BindingForm,
    pub ttls: Vec<(&'static str, &'static str)>,
    pub created: Option<NewBinding>,
    pub error: Option<String>,
}

fn agent_render(
    st: &AppState,
    s: &Sess,
    status: StatusCode,
    form: BindingForm,
    created: Option<NewBinding>,
    error: Option<String>,
) -> Response {
    render(
        status,
        &AgentPage {
            nav: s.nav("setup"),
            step: 6,
            csrf: s.row.csrf.clone(),
            gateway: st.gateway.is_some(),
            form,
            ttls: TTLS.iter().map(|(v, l, _)| (*v, *l)).collect(),
            created,
            error,
        },
    )
}

async fn agent_page(State(st): State<AppState>, headers: HeaderMap) -> Response {
    let s = attempt!(need_session(&st, &headers).await);
    agent_render(
        &st,
        &s,
        StatusCode::OK,
        BindingForm::fresh(WIZARD_BINDING_NAME),
        None,
        None,
    )
}

async fn agent_submit(State(st): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let (s, f): (Sess, BindingForm) = attempt!(posted(&st, &headers, &body).await);
    match attempt!(create_from_form(&st, &s, &f).await) {
        Ok(created) => agent_render(&st, &s, StatusCode::OK, f, Some(created), None),
        Err((status, m)) => agent_render(&st, &s, status, f, None, Some(m)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_proto::BindingInfo;

    fn made(url: &str) -> CreateBindingResponse {
        CreateBindingResponse {
            binding: BindingInfo {
                name: "agent".into(),
                public_id: "abcdefghijklmnop".into(),
                account: "home".into(),
                ip: "100.64.0.2".parse().unwrap(),
                tags: vec![],
                created_at: 0,
                expires_at: None,
                revoked_at: None,
                requests: 0,
                last_used_at: None,
            },
            url: url.into(),
        }
    }

    #[test]
    fn the_line_and_snippets_use_the_url_and_a_mesh_name() {
        let n = new_binding(
            &made("http://b_abcdefghijklmnop:S3cret@198.18.0.1:8443"),
            "http://db.home.mesh/",
        );
        assert_eq!(
            n.line,
            "MESH=http://b_abcdefghijklmnop:S3cret@198.18.0.1:8443"
        );
        assert_eq!(n.curl, "curl --proxy \"$MESH\" http://db.home.mesh/");
        assert!(n
            .python
            .contains("Mesh.from_env().get(\"http://db.home.mesh/\")"));
        assert!(n
            .js
            .contains("mesh(env.MESH).fetch('http://db.home.mesh/')"));
        assert_eq!(n.expires, None);
    }

    #[test]
    fn messages_become_sentences() {
        assert_eq!(sentence("invalid binding name"), "Invalid binding name.");
        assert_eq!(sentence("done."), "Done.");
    }
}
