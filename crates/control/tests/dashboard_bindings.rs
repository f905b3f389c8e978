//! The dashboard's binding pages end to end against an in-process server
//! that runs a fetch gateway: the list and create form (the line shown once,
//! never again), revocation (confirmed, CSRF-checked, audited), errors that
//! change nothing, the request log, and the wizard's optional step
//! "Connect an agent or function".

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use trellis_edge::gateway::hash_secret;
use trellis_proto::{AuditEntry, BindingInfo};

mod dash_support;
use dash_support::*;

/// The default account is the first one.
const DEFAULT_ACCOUNT: i64 = 1;

async fn start(dir: &std::path::Path) -> Running {
    Running::start_with(dir, |c| {
        c.gateway_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await
}

async fn list(r: &Running) -> Vec<BindingInfo> {
    let (status, v) = r.api(Method::GET, "/bindings", Value::Null).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    serde_json::from_value(v).unwrap()
}

async fn audit(r: &Running) -> Vec<AuditEntry> {
    let (status, v) = r.api(Method::GET, "/audit", Value::Null).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    serde_json::from_value(v).unwrap()
}

/// The text of a page as a browser shows it (the escapes askama writes undone).
fn unescape(s: &str) -> String {
    s.replace("&#34;", "\"")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// The text of `#id`, unescaped.
fn shown(page: &str, id: &str) -> String {
    unescape(&text_of(page, id))
}

/// The secret of a `MESH=http://b_<id>:<secret>@host:port` line.
fn secret_of(line: &str) -> String {
    let rest = line
        .strip_prefix("MESH=http://b_")
        .unwrap_or_else(|| panic!("{line:?} is not MESH=http://b_..."));
    let (user, _) = rest.split_once('@').expect("credentials@host");
    let (id, secret) = user.split_once(':').expect("id:secret");
    assert_eq!(id.len(), 16, "{id}");
    assert_eq!(secret.len(), 32, "{secret}");
    secret.to_string()
}

async fn post_text(b: &Browser, url: &str, form: &[(&str, &str)]) -> (StatusCode, String) {
    let resp = b.post(url, form).await;
    let status = resp.status();
    (status, resp.text().await.unwrap())
}

/// The session's CSRF token, read from the bindings page.
async fn csrf(b: &Browser, r: &Running) -> String {
    let (status, page) = b.get(&r.at("/bindings")).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    field(&page, "csrf")
}

#[tokio::test]
async fn the_pages_need_a_session_and_sit_in_the_nav() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path()).await;
    let a = r.setup_admin().await;
    for (path, current) in [("/bindings", "Bindings"), ("/requests", "Requests")] {
        let (status, page) = a.get(&r.at(path)).await;
        assert_eq!(status, StatusCode::OK, "{path}: {page}");
        assert!(
            page.contains(&format!(r#"aria-current="page">{current}</a>"#)),
            "{path} is not marked in the nav: {page}"
        );
        let resp = Browser::new().http.get(r.at(path)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::SEE_OTHER, "{path}");
        assert_eq!(location(&resp), "/login");
    }
    // Posting without a session goes to the login page and creates nothing.
    let resp = Browser::new()
        .post(
            &r.at("/bindings"),
            &[("csrf", "x"), ("name", "agent"), ("ttl", "never")],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert!(list(&r).await.is_empty());
    r.stop().await;
}

#[tokio::test]
async fn create_shows_the_line_once_and_the_list_never_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path()).await;
    let a = r.setup_admin().await;
    let (status, page) = a.get(&r.at("/bindings")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains(r#"<form method="post" action="/bindings" id="create-binding">"#));
    assert!(page.contains(r#"id="no-bindings""#), "{page}");
    let csrf = field(&page, "csrf");

    let (status, page) = post_text(
        &a,
        &r.at("/bindings"),
        &[
            ("csrf", &csrf),
            ("name", "ci-runner"),
            ("tags", "agents, CI,agents"),
            ("ttl", "30d"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let line = shown(&page, "binding-line");
    let gw = r.gateway_url.clone().unwrap();
    assert!(
        line.ends_with(&format!("@{}", gw.trim_start_matches("http://"))),
        "{line} names the gateway {gw}"
    );
    let secret = secret_of(&line);
    assert!(
        page.contains(r#"data-copy="binding-line""#),
        "a copy button"
    );
    assert_eq!(
        shown(&page, "snippet-curl"),
        r#"curl --proxy "$MESH" http://NODE.default.mesh/"#
    );
    assert!(
        shown(&page, "snippet-python")
            .contains(r#"Mesh.from_env().get("http://NODE.default.mesh/")"#),
        "{page}"
    );
    assert!(
        shown(&page, "snippet-js").contains("mesh(env.MESH).fetch('http://NODE.default.mesh/')"),
        "{page}"
    );

    // It is real: stored with its tags and lifetime, the gateway knows its secret.
    let all = list(&r).await;
    assert_eq!(all.len(), 1);
    let b = &all[0];
    assert_eq!(b.name, "ci-runner");
    assert_eq!(b.tags, ["agents", "ci"]);
    let ttl = b.expires_at.unwrap() - b.created_at;
    assert!((ttl - 30 * 86_400).abs() <= 1, "{ttl}");
    assert!(line.contains(&format!("b_{}:", b.public_id)));
    let gateway = r.gateway.clone().unwrap();
    assert!(
        eventually(Duration::from_secs(1), || gateway
            .account(DEFAULT_ACCOUNT)
            .is_some_and(|s| s
                .bindings
                .iter()
                .any(|e| e.secret_hash == hash_secret(&secret))))
        .await,
        "the gateway accepts the line's secret within a second"
    );
    let created = audit(&r)
        .await
        .into_iter()
        .find(|e| e.action == "binding.create")
        .expect("the creation is audited");
    assert_eq!(created.actor, format!("dashboard:{EMAIL}"));
    assert_eq!(created.target, "ci-runner");

    // Shown once: the list has the binding, never the secret or the line.
    let (status, page) = a.get(&r.at("/bindings")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        page.contains(r#"<tr data-name="ci-runner" data-state="live">"#),
        "{page}"
    );
    assert!(page.contains(&b.ip.to_string()));
    assert!(page.contains("agents, ci"));
    assert!(!page.contains(&secret), "the list shows the secret");
    assert!(!page.contains("binding-line"));
    assert!(!page.contains("MESH="));
    r.stop().await;
}

#[tokio::test]
async fn forms_without_the_csrf_token_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path()).await;
    let a = r.setup_admin().await;
    for token in ["", "wrong"] {
        let (status, page) = post_text(
            &a,
            &r.at("/bindings"),
            &[("csrf", token), ("name", "agent"), ("ttl", "never")],
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{page}");
        assert!(!page.contains("MESH="));
        let (status, _) = post_text(
            &a,
            &r.at("/setup/agent"),
            &[("csrf", token), ("name", "agent"), ("ttl", "never")],
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN);
    }
    let resp = a
        .http
        .post(r.at("/bindings"))
        .form(&[("name", "agent"), ("ttl", "never")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert!(list(&r).await.is_empty(), "nothing was created");

    // Revoking needs it too.
    let (status, v) = r
        .api(Method::POST, "/bindings", json!({"name": "keep"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    for token in ["", "wrong"] {
        let (status, _) = post_text(&a, &r.at("/bindings/keep/revoke"), &[("csrf", token)]).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
    }
    let all = list(&r).await;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].revoked_at, None, "still live");
    assert!(!audit(&r).await.iter().any(|e| e.action == "binding.revoke"));
    r.stop().await;
}

#[tokio::test]
async fn revoking_asks_first_then_revokes_and_is_audited() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path()).await;
    let a = r.setup_admin().await;
    let (status, v) = r
        .api(Method::POST, "/bindings", json!({"name": "ci"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let (_, page) = a.get(&r.at("/bindings")).await;
    assert!(page.contains(r#"href="/bindings/ci/revoke""#), "{page}");

    // The confirmation page changes nothing by itself.
    let (status, page) = a.get(&r.at("/bindings/ci/revoke")).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains(r#"<form method="post" action="/bindings/ci/revoke" id="revoke">"#));
    assert_eq!(list(&r).await[0].revoked_at, None);

    let csrf = field(&page, "csrf");
    let resp = a
        .post(&r.at("/bindings/ci/revoke"), &[("csrf", &csrf)])
        .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&resp), "/bindings?done=revoked");
    assert!(list(&r).await[0].revoked_at.is_some(), "revoked");
    let entry = audit(&r)
        .await
        .into_iter()
        .find(|e| e.action == "binding.revoke")
        .expect("the revocation is audited");
    assert_eq!(entry.actor, format!("dashboard:{EMAIL}"));
    assert_eq!(entry.target, "ci");
    let gateway = r.gateway.clone().unwrap();
    assert!(
        eventually(Duration::from_secs(1), || gateway
            .account(DEFAULT_ACCOUNT)
            .is_some_and(|s| s.bindings.is_empty()))
        .await,
        "the gateway drops it within a second"
    );

    let (_, page) = a.get(&r.at("/bindings?done=revoked")).await;
    assert!(text_of(&page, "notice").contains("revoked"), "{page}");
    assert!(
        page.contains(r#"<tr data-name="ci" data-state="revoked">"#),
        "{page}"
    );
    assert!(!page.contains(r#"href="/bindings/ci/revoke""#));

    // Again: nothing left to revoke, said on the page, nothing audited.
    let before = audit(&r).await.len();
    let (status, page) = post_text(&a, &r.at("/bindings/ci/revoke"), &[("csrf", &csrf)]).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{page}");
    assert!(
        shown(&page, "error").contains("no binding named \"ci\""),
        "{page}"
    );
    let (status, _) = a.get(&r.at("/bindings/ci/revoke")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(audit(&r).await.len(), before);
    r.stop().await;
}

#[tokio::test]
async fn bad_input_is_shown_on_the_page_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path()).await;
    let a = r.setup_admin().await;
    let csrf = csrf(&a, &r).await;
    let (status, _) = post_text(
        &a,
        &r.at("/bindings"),
        &[("csrf", &csrf), ("name", "agent"), ("ttl", "never")],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let before = audit(&r).await.len();
    for (name, tags, ttl, status, words) in [
        (
            "Bad Name",
            "",
            "never",
            StatusCode::BAD_REQUEST,
            "Invalid binding name \"Bad Name\"",
        ),
        (
            "-x",
            "",
            "never",
            StatusCode::BAD_REQUEST,
            "Invalid binding name",
        ),
        (
            "",
            "",
            "never",
            StatusCode::BAD_REQUEST,
            "Give the binding a name",
        ),
        (
            "x",
            "good, bad tag",
            "never",
            StatusCode::BAD_REQUEST,
            "Invalid tag name",
        ),
        ("x", "", "5y", StatusCode::BAD_REQUEST, "how long"),
        (
            "agent",
            "",
            "never",
            StatusCode::CONFLICT,
            "already has a binding named \"agent\"",
        ),
    ] {
        let (got, page) = post_text(
            &a,
            &r.at("/bindings"),
            &[
                ("csrf", &csrf),
                ("name", name),
                ("tags", tags),
                ("ttl", ttl),
            ],
        )
        .await;
        assert_eq!(got, status, "{name}: {page}");
        let error = shown(&page, "error");
        assert!(error.contains(words), "{name}: {error}");
        assert!(!page.contains("binding-line"), "{name}: no line shown");
        // The form keeps what was typed.
        assert_eq!(unescape(&field(&page, "name")), name);
    }
    assert_eq!(list(&r).await.len(), 1, "nothing was created");
    assert_eq!(audit(&r).await.len(), before, "nothing was audited");
    r.stop().await;

    // A server without a gateway says so and creates nothing.
    let dir = tempfile::tempdir().unwrap();
    let r = Running::start(dir.path()).await;
    let a = r.setup_admin().await;
    let (_, page) = a.get(&r.at("/bindings")).await;
    assert!(text_of(&page, "no-gateway").contains("runs no fetch gateway"));
    assert!(!page.contains(r#"id="create-binding""#));
    let csrf = field(&page, "csrf");
    let (status, page) = post_text(
        &a,
        &r.at("/bindings"),
        &[("csrf", &csrf), ("name", "agent"), ("ttl", "never")],
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{page}");
    assert!(shown(&page, "error").contains("--gateway-listen"), "{page}");
    let (_, page) = a.get(&r.at("/setup/agent")).await;
    assert!(page.contains(r#"id="no-gateway""#), "{page}");
    assert!(page.contains(r#"<a id="skip""#));
    assert!(list(&r).await.is_empty());
    r.stop().await;
}

#[tokio::test]
async fn the_requests_page_lists_records_newest_first_and_filters() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path()).await;
    let a = r.setup_admin().await;
    let (_, page) = a.get(&r.at("/requests")).await;
    assert!(page.contains(r#"id="no-requests""#), "{page}");
    assert!(
        page.contains(r#"<a id="refresh" href="/requests">"#),
        "{page}"
    );
    let (status, v) = r
        .api(Method::POST, "/bindings", json!({"name": "ci"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let gw = r.gateway.clone().unwrap();
    assert!(
        eventually(Duration::from_secs(1), || gw
            .account(DEFAULT_ACCOUNT)
            .is_some_and(|s| !s.bindings.is_empty()))
        .await
    );
    let id = gw.account(DEFAULT_ACCOUNT).unwrap().bindings[0].id;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    gw.record(request_record(Some(id), "ci", now_ms - 30_000, "/health"));
    let mut denied = request_record(None, "b_unknown", now_ms - 1000, "/");
    denied.status = 407;
    denied.decision = "deny".into();
    denied.rule = None;
    denied.error = Some("bad_credentials".into());
    denied.node = None;
    gw.record(denied);

    let mut page = String::new();
    for _ in 0..40 {
        page = a.get(&r.at("/requests")).await.1;
        if page.matches(r#"<tr class="request""#).count() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        page.matches(r#"<tr class="request""#).count(),
        2,
        "both records within 2 s: {page}"
    );
    // Newest first.
    let unknown = page.find("<td>b_unknown</td>").expect("the denied one");
    let health = page.find("<td>/health</td>").expect("the allowed one");
    assert!(unknown < health, "newest first");
    for needle in [
        "<td>ci</td><td>GET</td><td>db.default.mesh:8080</td><td>/health</td>",
        "<td>200</td><td>100 / 2048</td><td>42 ms</td><td>allow</td><td>ci-db</td><td></td>",
        "<td>407</td>",
        "<td>deny</td><td></td><td>bad_credentials</td>",
    ] {
        assert!(page.contains(needle), "{needle} missing in {page}");
    }
    assert!(page.contains(r#"<option value="ci">ci</option>"#), "{page}");

    // By binding.
    let (status, page) = a.get(&r.at("/requests?binding=ci")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page.matches(r#"<tr class="request""#).count(), 1, "{page}");
    assert!(page.contains(r#"<option value="ci" selected>"#));
    assert!(page.contains(r#"<a id="refresh" href="/requests?binding=ci">"#));
    // Bad filters are said on the page.
    let (status, page) = a.get(&r.at("/requests?since=yesterday")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(text_of(&page, "requests-error").contains("since"), "{page}");
    let (status, page) = a.get(&r.at("/requests?binding=Not_A_Name")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        text_of(&page, "requests-error").contains("binding"),
        "{page}"
    );

    // The list counts the request and links to them.
    let (_, page) = a.get(&r.at("/bindings")).await;
    assert!(
        page.contains(r#"<a href="/requests?binding=ci">1</a>"#),
        "{page}"
    );
    r.stop().await;
}

#[tokio::test]
async fn the_wizard_offers_to_connect_an_agent_after_the_test() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path()).await;
    let a = r.setup_admin().await;
    let csrf = a.csrf(&r).await;
    let resp = a
        .post(
            &r.at("/setup/network"),
            &[("csrf", &csrf), ("name", "home"), ("cidr", "100.70.0.0/16")],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let (_, page) = a.get(&r.at("/setup/test")).await;
    assert!(
        page.contains(r#"<a id="next" class="button" href="/setup/agent">"#),
        "{page}"
    );

    let (status, page) = a.get(&r.at("/setup/agent")).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(
        page.contains(r#"aria-current="step">Agents (optional)"#),
        "{page}"
    );
    assert_eq!(field(&page, "name"), "agent", "the name is prefilled");
    assert!(page.contains(r#"<a id="skip" class="button secondary" href="/setup/done">"#));
    assert!(!page.contains(r#"id="finish""#));
    assert!(
        list(&r).await.is_empty(),
        "showing the step creates nothing"
    );

    // A bad name: said, nothing created.
    let (status, page) = post_text(
        &a,
        &r.at("/setup/agent"),
        &[("csrf", &csrf), ("name", "My Agent"), ("ttl", "never")],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(shown(&page, "error").contains("Invalid binding name"));
    assert!(list(&r).await.is_empty());

    let (status, page) = post_text(
        &a,
        &r.at("/setup/agent"),
        &[("csrf", &csrf), ("name", "agent"), ("ttl", "7d")],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let line = shown(&page, "binding-line");
    secret_of(&line);
    assert_eq!(
        shown(&page, "snippet-curl"),
        r#"curl --proxy "$MESH" http://NODE.home.mesh/"#
    );
    assert!(page.contains(r#"<a id="finish" class="button" href="/setup/done">"#));
    let all = list(&r).await;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].name, "agent");
    assert!(all[0].ip.to_string().starts_with("100.70."));

    let (status, page) = a.get(&r.at("/setup/done")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains(r#"id="done""#));
    r.stop().await;
}
