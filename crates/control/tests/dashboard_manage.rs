//! The management pages of the dashboard (devices, join tokens, routes,
//! admins and API keys, settings) end to end against an in-process server:
//! each page needs a session, each form needs the session's CSRF token,
//! refuses bad input with a message and changes nothing then, acts through
//! the store (checked through the REST API) and only on the session's account.

#![allow(dead_code)]

use std::time::Duration;

use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use trellis_proto::NodeKey;

mod dash_support;
use dash_support::*;

impl Running {
    /// Enrolls a fake node that advertises `routes`.
    async fn enroll_routes(&self, token: &str, key: u8, name: &str, routes: &[&str]) {
        let resp = Client::new()
            .post(self.at("/api/v1/enroll"))
            .json(
                &json!({"token": token, "public_key": NodeKey([key; 32]).to_string(),
                "name": name, "advertise_routes": routes}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }

    /// A reusable join token made through the API (for `account`, or the default one).
    async fn token(&self, account: Option<&str>) -> String {
        let path = match account {
            Some(a) => format!("/tokens?account={a}"),
            None => "/tokens".to_string(),
        };
        let (status, tok) = self
            .api(reqwest::Method::POST, &path, json!({"reusable": true}))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{tok}");
        tok["token"].as_str().unwrap().to_string()
    }

    async fn get(&self, path: &str) -> Value {
        let (status, v) = self.api(reqwest::Method::GET, path, Value::Null).await;
        assert_eq!(status, StatusCode::OK, "{path}: {v}");
        v
    }

    async fn node(&self, name: &str) -> Option<Value> {
        self.get("/nodes")
            .await
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == name)
            .cloned()
    }

    /// A second account "other" with admin bo@example.com, logged in.
    async fn other_admin(&self) -> Browser {
        let (status, _) = self
            .api(reqwest::Method::POST, "/accounts", json!({"name": "other"}))
            .await;
        assert_eq!(status, StatusCode::CREATED);
        let (status, body) = self
            .api(
                reqwest::Method::POST,
                "/admins?account=other",
                json!({"email": "bo@example.com", "password": "another long password"}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        self.login("bo@example.com", "another long password").await
    }
}

impl Browser {
    /// The session's CSRF token, read from the devices page.
    async fn token_of(&self, r: &Running) -> String {
        let (status, page) = self.get(&r.at("/devices")).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        field(&page, "csrf")
    }

    async fn post_text(&self, url: &str, form: &[(&str, &str)]) -> (StatusCode, String) {
        let resp = self.post(url, form).await;
        let status = resp.status();
        (status, resp.text().await.unwrap())
    }
}

const PAGES: [&str; 5] = ["/devices", "/tokens", "/routes", "/access", "/settings"];

#[tokio::test]
async fn every_page_renders_for_an_admin_and_needs_a_session() {
    let dir = tempfile::tempdir().unwrap();
    let r = Running::start(dir.path()).await;
    let a = r.setup_admin().await;
    let tok = r.token(None).await;
    r.enroll(&tok, 1, "laptop").await;
    for (path, current) in PAGES.iter().zip([
        "Devices",
        "Join tokens",
        "Routes",
        "Admins &amp; keys",
        "Settings",
    ]) {
        let (status, page) = a.get(&r.at(path)).await;
        assert_eq!(status, StatusCode::OK, "{path}: {page}");
        assert!(page.contains("<h1>"), "{path}");
        assert!(
            page.contains(&format!(r#"aria-current="page">{current}</a>"#)),
            "{path} is not marked in the nav"
        );
        let resp = Browser::new().http.get(r.at(path)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::SEE_OTHER, "{path}");
        assert_eq!(location(&resp), "/login");
    }
    for path in ["/devices/laptop", "/devices/laptop/delete"] {
        let (status, page) = a.get(&r.at(path)).await;
        assert_eq!(status, StatusCode::OK, "{path}: {page}");
        let resp = Browser::new().http.get(r.at(path)).send().await.unwrap();
        assert_eq!(location(&resp), "/login", "{path}");
    }
    // Posts without a session go to the login page and change nothing.
    for path in [
        "/devices/laptop/rename",
        "/devices/laptop/disable",
        "/devices/laptop/delete",
        "/tokens",
        "/access/keys",
        "/access/admins",
        "/routes/approve",
    ] {
        let resp = Browser::new()
            .post(&r.at(path), &[("csrf", "x"), ("name", "stolen")])
            .await;
        assert_eq!(resp.status(), StatusCode::SEE_OTHER, "{path}");
        assert_eq!(location(&resp), "/login", "{path}");
    }
    assert!(r.node("laptop").await.is_some());
    let (status, page) = a.get(&r.at("/devices/nope")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{page}");
    r.stop().await;
}

#[tokio::test]
async fn devices_are_renamed_tagged_disabled_and_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let r = Running::start(dir.path()).await;
    let a = r.setup_admin().await;
    let tok = r.token(None).await;
    r.enroll(&tok, 1, "laptop").await;
    r.enroll(&tok, 2, "server").await;
    let (_, page) = a.get(&r.at("/devices")).await;
    assert!(page.contains(r#"id="manage-devices" data-live="/dash/api/nodes""#));
    assert!(page.contains(r#"data-name="laptop""#) && page.contains(r#"data-name="server""#));
    let csrf = a.token_of(&r).await;

    // Rename: CSRF, bad input, then for real.
    let url = r.at("/devices/laptop/rename");
    let (status, _) = a.post_text(&url, &[("name", "laptop-2")]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = a
        .post_text(&url, &[("csrf", "wrong"), ("name", "laptop-2")])
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, page) = a
        .post_text(&url, &[("csrf", &csrf), ("name", "Bad Name!")])
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        text_of(&page, "error").contains("invalid node name"),
        "{page}"
    );
    let (status, page) = a
        .post_text(&url, &[("csrf", &csrf), ("name", "server")])
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{page}");
    assert!(page.contains(r#"id="error""#), "{page}");
    assert!(r.node("laptop").await.is_some());
    let resp = a.post(&url, &[("csrf", &csrf), ("name", "laptop-2")]).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&resp), "/devices?done=renamed");
    assert!(r.node("laptop").await.is_none());
    assert!(r.node("laptop-2").await.is_some());
    let (_, page) = a.get(&r.at("/devices?done=renamed")).await;
    assert!(text_of(&page, "notice").contains("renamed"));

    // Tags.
    let url = r.at("/devices/laptop-2/tags");
    let (status, _) = a.post_text(&url, &[("tags", "web")]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, page) = a
        .post_text(&url, &[("csrf", &csrf), ("tags", "web, bad tag")])
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        text_of(&page, "error").contains("invalid tag name"),
        "{page}"
    );
    assert_eq!(r.node("laptop-2").await.unwrap()["tags"], json!([]));
    let resp = a
        .post(&url, &[("csrf", &csrf), ("tags", " web, DB ,,web")])
        .await;
    assert_eq!(location(&resp), "/devices?done=tagged");
    assert_eq!(
        r.node("laptop-2").await.unwrap()["tags"],
        json!(["web", "db"])
    );
    let (_, page) = a.get(&r.at("/devices/laptop-2")).await;
    assert_eq!(field(&page, "tags"), "web, db");

    // Disable and enable.
    let (status, _) = a.post_text(&r.at("/devices/laptop-2/disable"), &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(r.node("laptop-2").await.unwrap()["disabled"], false);
    let resp = a
        .post(&r.at("/devices/laptop-2/disable"), &[("csrf", &csrf)])
        .await;
    assert_eq!(location(&resp), "/devices?done=disabled");
    assert_eq!(r.node("laptop-2").await.unwrap()["disabled"], true);
    let (_, page) = a.get(&r.at("/devices")).await;
    assert!(page.contains(r#"action="/devices/laptop-2/enable""#));
    let resp = a
        .post(&r.at("/devices/laptop-2/enable"), &[("csrf", &csrf)])
        .await;
    assert_eq!(location(&resp), "/devices?done=enabled");
    assert_eq!(r.node("laptop-2").await.unwrap()["disabled"], false);

    // Delete: a confirmation page, then the post.
    let (_, page) = a.get(&r.at("/devices/laptop-2/delete")).await;
    assert!(page.contains(r#"<form method="post" action="/devices/laptop-2/delete" id="delete">"#));
    let (status, _) = a
        .post_text(&r.at("/devices/laptop-2/delete"), &[("csrf", "")])
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(r.node("laptop-2").await.is_some());
    let resp = a
        .post(&r.at("/devices/laptop-2/delete"), &[("csrf", &csrf)])
        .await;
    assert_eq!(location(&resp), "/devices?done=deleted");
    assert!(r.node("laptop-2").await.is_none());
    assert!(r.node("server").await.is_some());

    // The audit log names the dashboard admin.
    let audit = r.get("/audit").await;
    let entries = audit
        .as_array()
        .or_else(|| audit["entries"].as_array())
        .expect("audit entries")
        .clone();
    for act in [
        "node.rename",
        "node.tag",
        "node.disable",
        "node.enable",
        "node.delete",
    ] {
        assert!(
            entries
                .iter()
                .any(|e| e["action"] == act && e["actor"] == format!("dashboard:{EMAIL}")),
            "{act} by dashboard:{EMAIL} missing from {audit}"
        );
    }
    r.stop().await;
}

#[tokio::test]
async fn join_tokens_are_created_shown_once_and_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let r = Running::start(dir.path()).await;
    let a = r.setup_admin().await;
    let csrf = a.token_of(&r).await;
    let count = |v: Value| v.as_array().unwrap().len();
    let before = count(r.get("/tokens").await);

    let (status, _) = a
        .post_text(&r.at("/tokens"), &[("ttl", "7d"), ("reusable", "on")])
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, page) = a
        .post_text(&r.at("/tokens"), &[("csrf", &csrf), ("ttl", "99y")])
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        text_of(&page, "error").contains("1 hour, 24 hours or 7 days"),
        "{page}"
    );
    let (status, page) = a
        .post_text(
            &r.at("/tokens"),
            &[("csrf", &csrf), ("ttl", "1h"), ("tags", "ok, not ok")],
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        text_of(&page, "error").contains("invalid tag name"),
        "{page}"
    );
    assert_eq!(field(&page, "tags"), "ok, not ok");
    assert_eq!(count(r.get("/tokens").await), before);

    let (status, page) = a
        .post_text(
            &r.at("/tokens"),
            &[
                ("csrf", &csrf),
                ("reusable", "on"),
                ("ttl", "7d"),
                ("tags", "ci, build"),
                ("routes_auto_approve", "on"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let cmd = text_of(&page, "join-command");
    let prefix = format!(
        "curl -fsSL {}/install.sh | sudo sh -s -- --token trj_",
        r.url
    );
    assert!(cmd.starts_with(&prefix), "{cmd}");
    let token = cmd.rsplit(' ').next().unwrap().to_string();
    assert_eq!(text_of(&page, "token-value"), token);
    let list = r.get("/tokens").await;
    assert_eq!(count(list.clone()), before + 1);
    let t = &list[0];
    assert_eq!(t["reusable"], true);
    assert_eq!(t["routes_auto_approve"], true);
    assert_eq!(t["tags"], json!(["ci", "build"]));
    let left = t["expires_at"].as_i64().unwrap() - t["created_at"].as_i64().unwrap();
    assert_eq!(left, 7 * 86_400);
    // The token works, and is never shown again.
    r.enroll(&token, 5, "builder").await;
    assert_eq!(
        r.node("builder").await.unwrap()["tags"],
        json!(["ci", "build"])
    );
    let (_, page) = a.get(&r.at("/tokens")).await;
    assert!(!page.contains(&token));
    assert!(!page.contains(r#"id="join-command""#));
    let id = t["id"].as_i64().unwrap();
    assert!(
        page.contains(&format!(r#"<tr data-id="{id}" data-state="active">"#)),
        "{page}"
    );

    // Revoke.
    let url = r.at(&format!("/tokens/{id}/revoke"));
    let (status, _) = a.post_text(&url, &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(r.get("/tokens").await[0]["revoked"], false);
    let (status, page) = a
        .post_text(&r.at("/tokens/abc/revoke"), &[("csrf", &csrf)])
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(page.contains(r#"id="error""#));
    let (status, _) = a
        .post_text(&r.at("/tokens/99999/revoke"), &[("csrf", &csrf)])
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let resp = a.post(&url, &[("csrf", &csrf)]).await;
    assert_eq!(location(&resp), "/tokens?done=revoked");
    assert_eq!(r.get("/tokens").await[0]["revoked"], true);
    let (_, page) = a.get(&r.at("/tokens")).await;
    assert!(page.contains(&format!(r#"<tr data-id="{id}" data-state="revoked">"#)));
    r.stop().await;
}

#[tokio::test]
async fn advertised_routes_are_listed_and_approved() {
    let dir = tempfile::tempdir().unwrap();
    let r = Running::start(dir.path()).await;
    let a = r.setup_admin().await;
    let tok = r.token(None).await;
    r.enroll_routes(&tok, 3, "gateway", &["198.19.7.0/24"])
        .await;
    let csrf = a.token_of(&r).await;
    let (_, page) = a.get(&r.at("/routes")).await;
    assert!(
        page.contains(
            r#"<tr data-node="gateway" data-cidr="198.19.7.0/24" data-approved="false">"#
        ),
        "{page}"
    );
    let approved = || async { r.get("/routes").await[0]["approved"].clone() };

    let url = r.at("/routes/approve");
    let (status, _) = a
        .post_text(&url, &[("node", "gateway"), ("cidr", "198.19.7.0/24")])
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, page) = a
        .post_text(
            &url,
            &[("csrf", &csrf), ("node", "gateway"), ("cidr", "192.168.7")],
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(text_of(&page, "error").contains("not a subnet"), "{page}");
    let (status, page) = a
        .post_text(
            &url,
            &[
                ("csrf", &csrf),
                ("node", "gateway"),
                ("cidr", "198.19.7.1/24"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(text_of(&page, "error").contains("host bits"), "{page}");
    let (status, page) = a
        .post_text(
            &url,
            &[
                ("csrf", &csrf),
                ("node", "nobody"),
                ("cidr", "198.19.7.0/24"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(page.contains(r#"id="error""#), "{page}");
    assert_eq!(approved().await, false);

    let resp = a
        .post(
            &url,
            &[
                ("csrf", &csrf),
                ("node", "gateway"),
                ("cidr", "198.19.7.0/24"),
            ],
        )
        .await;
    assert_eq!(location(&resp), "/routes?done=approved");
    assert_eq!(approved().await, true);
    let (_, page) = a.get(&r.at("/routes?done=approved")).await;
    assert!(page.contains(r#"data-approved="true""#));
    assert!(!page.contains(r#"action="/routes/approve""#));
    r.stop().await;
}

#[tokio::test]
async fn api_keys_and_admins_are_managed() {
    let dir = tempfile::tempdir().unwrap();
    let r = Running::start(dir.path()).await;
    let a = r.setup_admin().await;
    let csrf = a.token_of(&r).await;
    let (_, page) = a.get(&r.at("/access")).await;
    assert!(page.contains("Operator key"));
    assert!(page.contains("Cannot be revoked here"));
    assert!(
        !page.contains(r#"action="/access/keys/1/revoke""#),
        "{page}"
    );
    assert!(text_of(&page, "admins").is_empty() || page.contains(EMAIL));

    // API keys.
    let (status, _) = a
        .post_text(&r.at("/access/keys"), &[("name", "backup")])
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, page) = a
        .post_text(&r.at("/access/keys"), &[("csrf", &csrf), ("name", "  ")])
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(text_of(&page, "key-error").contains("name"), "{page}");
    let long = "x".repeat(65);
    let (status, page) = a
        .post_text(&r.at("/access/keys"), &[("csrf", &csrf), ("name", &long)])
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(page.contains(r#"id="key-error""#));
    assert_eq!(r.get("/keys").await.as_array().unwrap().len(), 1);
    let (status, page) = a
        .post_text(
            &r.at("/access/keys"),
            &[("csrf", &csrf), ("name", "backup")],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let key = text_of(&page, "api-key");
    assert!(key.starts_with("trk_"), "{key}");
    let with_key = |k: String| {
        let url = r.at("/api/v1/nodes");
        async move {
            Client::new()
                .get(url)
                .bearer_auth(k)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(with_key(key.clone()).await, StatusCode::OK);
    let keys = r.get("/keys").await;
    let id = keys[0]["id"].as_i64().unwrap();
    assert_eq!(keys[0]["name"], "backup");
    let (_, page) = a.get(&r.at("/access")).await;
    assert!(!page.contains(&key), "the key is shown once");
    let (status, _) = a
        .post_text(&r.at(&format!("/access/keys/{id}/revoke")), &[])
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(with_key(key.clone()).await, StatusCode::OK);
    let resp = a
        .post(
            &r.at(&format!("/access/keys/{id}/revoke")),
            &[("csrf", &csrf)],
        )
        .await;
    assert_eq!(location(&resp), "/access?done=key-revoked");
    assert_eq!(with_key(key).await, StatusCode::UNAUTHORIZED);
    // The operator key is refused.
    let op = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["operator"] == true)
        .unwrap()["id"]
        .as_i64()
        .unwrap();
    let (status, page) = a
        .post_text(
            &r.at(&format!("/access/keys/{op}/revoke")),
            &[("csrf", &csrf)],
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(text_of(&page, "key-error").contains("operator key cannot be revoked"));
    assert_eq!(with_key(r.operator.clone()).await, StatusCode::OK);

    // Admins.
    let url = r.at("/access/admins");
    let good = [
        ("email", "kim@example.com"),
        ("password", "a long enough one"),
    ];
    let (status, _) = a.post_text(&url, &good).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, page) = a
        .post_text(
            &url,
            &[
                ("csrf", &csrf),
                ("email", "kim@example.com"),
                ("password", "short"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        text_of(&page, "admin-error").contains("at least 10"),
        "{page}"
    );
    assert_eq!(field(&page, "email"), "kim@example.com");
    let (status, page) = a
        .post_text(
            &url,
            &[
                ("csrf", &csrf),
                ("email", "kim"),
                ("password", "a long enough one"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        text_of(&page, "admin-error").contains("not an email"),
        "{page}"
    );
    let b = Browser::new();
    assert_eq!(
        b.login(&r, "kim@example.com", "a long enough one")
            .await
            .status(),
        StatusCode::UNAUTHORIZED
    );
    let resp = a
        .post(
            &url,
            &[
                ("csrf", &csrf),
                ("email", "Kim@Example.com"),
                ("password", "a long enough one"),
            ],
        )
        .await;
    assert_eq!(location(&resp), "/access?done=admin-added");
    let (_, page) = a.get(&r.at("/access")).await;
    assert!(page.contains("kim@example.com"));
    let (status, page) = a
        .post_text(
            &url,
            &[
                ("csrf", &csrf),
                ("email", "kim@example.com"),
                ("password", "a long enough one"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(
        text_of(&page, "admin-error").contains("already exists"),
        "{page}"
    );
    let kim = r.login("kim@example.com", "a long enough one").await;
    let (status, _) = kim.get(&r.at("/devices")).await;
    assert_eq!(status, StatusCode::OK);
    r.stop().await;
}

#[tokio::test]
async fn settings_show_the_network_and_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let r = Running::start(dir.path()).await;
    let a = r.setup_admin().await;
    let (status, page) = a.get(&r.at("/settings")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(text_of(&page, "network-name"), "default");
    let acc = r.get("/accounts").await;
    assert_eq!(
        text_of(&page, "network-cidr"),
        acc[0]["cidr"].as_str().unwrap()
    );
    assert_eq!(text_of(&page, "dns-domain"), "default.mesh");
    assert_eq!(text_of(&page, "flow-retention"), "30 days");
    assert_eq!(text_of(&page, "public-url"), r.url);
    r.stop().await;
}

#[tokio::test]
async fn another_accounts_admin_can_neither_see_nor_change() {
    let dir = tempfile::tempdir().unwrap();
    let r = Running::start(dir.path()).await;
    let a = r.setup_admin().await;
    let tok = r.token(None).await;
    r.enroll_routes(&tok, 7, "secret-db", &["198.19.0.0/16"])
        .await;
    let a_csrf = a.token_of(&r).await;
    let (_, page) = a
        .post_text(
            &r.at("/access/keys"),
            &[("csrf", &a_csrf), ("name", "a-script")],
        )
        .await;
    let a_key = text_of(&page, "api-key");
    let a_token_id = r.get("/tokens").await[0]["id"]
        .as_i64()
        .unwrap()
        .to_string();
    let a_key_id = r.get("/keys").await[0]["id"].as_i64().unwrap().to_string();

    let b = r.other_admin().await;
    let csrf = b.token_of(&r).await;
    for path in PAGES {
        let (status, page) = b.get(&r.at(path)).await;
        assert_eq!(status, StatusCode::OK);
        for secret in ["secret-db", "198.19.0.0/16", "a-script", EMAIL] {
            assert!(!page.contains(secret), "{path} shows {secret}");
        }
    }
    for path in ["/devices/secret-db", "/devices/secret-db/delete"] {
        let (status, page) = b.get(&r.at(path)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert!(!page.contains("10.9."), "{path}");
    }
    for (path, extra) in [
        ("/devices/secret-db/rename", ("name", "mine")),
        ("/devices/secret-db/tags", ("tags", "mine")),
        ("/devices/secret-db/disable", ("x", "")),
        ("/devices/secret-db/delete", ("x", "")),
    ] {
        let (status, _) = b.post_text(&r.at(path), &[("csrf", &csrf), extra]).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    let (status, _) = b
        .post_text(
            &r.at(&format!("/tokens/{a_token_id}/revoke")),
            &[("csrf", &csrf)],
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = b
        .post_text(
            &r.at(&format!("/access/keys/{a_key_id}/revoke")),
            &[("csrf", &csrf)],
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = b
        .post_text(
            &r.at("/routes/approve"),
            &[
                ("csrf", &csrf),
                ("node", "secret-db"),
                ("cidr", "198.19.0.0/16"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // A's session token does not work in B's session either.
    let (status, _) = b
        .post_text(&r.at("/access/keys"), &[("csrf", &a_csrf), ("name", "x")])
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Nothing of A's changed.
    let node = r.node("secret-db").await.expect("A's node is still there");
    assert_eq!(node["disabled"], false);
    assert_eq!(node["tags"], json!([]));
    assert_eq!(r.get("/tokens").await[0]["revoked"], false);
    assert_eq!(r.get("/routes").await[0]["approved"], false);
    let status = Client::new()
        .get(r.at("/api/v1/nodes"))
        .bearer_auth(&a_key)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, StatusCode::OK);
    r.stop().await;
}

#[tokio::test]
async fn device_page_shows_paths_to_peers() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    use trellis_proto::{NodeMessage, PeerPath};

    let dir = tempfile::tempdir().unwrap();
    let r = Running::start(dir.path()).await;
    let a = r.setup_admin().await;
    let tok = r.token(None).await;
    let laptop = r.enroll(&tok, 1, "laptop").await;
    for (key, name) in [(2, "db"), (3, "nas"), (4, "phone"), (5, "printer")] {
        r.enroll(&tok, key, name).await;
    }

    // Offline: no table, a sentence.
    let (status, page) = a.get(&r.at("/devices/laptop")).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains("<h2>Paths to peers</h2>"), "{page}");
    assert!(text_of(&page, "paths-none").contains("offline"), "{page}");
    assert!(!page.contains(r#"id="peer-paths""#), "{page}");

    // A fake laptop connects and reports its paths.
    let url = format!(
        "{}/api/v1/node/stream",
        r.url.replacen("http://", "ws://", 1)
    );
    let mut req = url.into_client_request().unwrap();
    let secret = laptop["node_secret"].as_str().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {secret}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let path = |name: &str, path: &str, hs: Option<u64>| PeerPath {
        name: name.into(),
        path: path.into(),
        last_handshake_secs: hs,
    };
    for m in [
        NodeMessage::Hello {
            listen_port: 41641,
            local_addrs: vec!["198.18.0.9".parse().unwrap()],
            reflexive: None,
            advertise_routes: Vec::new(),
            os: "linux".into(),
            version: "test".into(),
        },
        NodeMessage::PeerPaths {
            peers: vec![
                path("db", "direct", Some(4)),
                path("nas", "relay-udp", Some(70)),
                path("phone", "relay-tcp", Some(3)),
                path("printer", "none", None),
            ],
        },
    ] {
        ws.send(Message::Text(serde_json::to_string(&m).unwrap().into()))
            .await
            .unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let page = loop {
        let (_, page) = a.get(&r.at("/devices/laptop")).await;
        if page.contains(r#"id="peer-paths""#) {
            break page;
        }
        assert!(std::time::Instant::now() < deadline, "{page}");
        // Keep reading (pings) while waiting.
        let _ = tokio::time::timeout(Duration::from_millis(20), ws.next()).await;
    };
    for (peer, kind, words, hs) in [
        ("db", "direct", "direct", "4 s ago"),
        ("nas", "relay-udp", "through the relay (UDP)", "1 min ago"),
        ("phone", "relay-tcp", "through the relay (TCP)", "3 s ago"),
        ("printer", "none", "no connection yet", "never"),
    ] {
        let row = format!(r#"<tr class="peer-path" data-peer="{peer}" data-path="{kind}">"#);
        let at = page
            .find(&row)
            .unwrap_or_else(|| panic!("no row {row} in {page}"));
        let rest = &page[at..at + page[at..].find("</tr>").unwrap()];
        assert!(
            rest.contains(&format!("<td>{words}</td><td>{hs}</td>")),
            "{rest}"
        );
    }
    // The existing parts of the page are still there.
    assert!(page.contains(r#"id="rename""#) && page.contains(r#"id="tags""#));

    drop(ws);
    r.stop().await;
}
