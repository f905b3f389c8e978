//! The dashboard end to end against an in-process server on 127.0.0.1:
//! setup link, login, sessions, CSRF, rate limit, account isolation, the
//! wizard's pages (with the ids of the page contract), install.sh and the
//! binary download.

use reqwest::header::{ACCEPT, SET_COOKIE};
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

mod dash_support;
use dash_support::*;

#[tokio::test]
async fn setup_link_works_once_and_is_printed_until_an_admin_exists() {
    let dir = tempfile::tempdir().unwrap();
    let r = Running::start(dir.path()).await;
    let link = r.setup_url.clone().expect("no admin yet: a setup link");
    assert!(
        link.starts_with(&format!("{}/setup?token=trs_", r.url)),
        "{link}"
    );
    assert_eq!(r.line, format!("Set up Trellis: {link}"));

    // A wrong token shows no form.
    let (status, page) = Browser::new().get(&r.at("/setup?token=trs_wrong")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(!page.contains(r#"id="admin""#));
    // The login page says how to begin.
    let (_, page) = Browser::new().get(&r.at("/login")).await;
    assert!(page.contains("setup link"), "{page}");

    // Step 1 carries the contract's fields.
    let b = Browser::new();
    let (status, page) = b.get(&link).await;
    assert_eq!(status, StatusCode::OK);
    for needle in [
        r#"<form id="admin""#,
        r#"name="email""#,
        r#"name="password""#,
        r#"type="submit""#,
        r#"name="csrf""#,
    ] {
        assert!(page.contains(needle), "{needle} missing in {page}");
    }
    // Bad input is refused with a reason.
    let resp = b
        .post(
            &r.at("/setup"),
            &[
                ("csrf", &field(&page, "csrf")),
                ("token", &field(&page, "token")),
                ("email", EMAIL),
                ("password", "short"),
            ],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert!(resp.text().await.unwrap().contains("at least 10"));

    let resp = b
        .post(
            &r.at("/setup"),
            &[
                ("csrf", &field(&page, "csrf")),
                ("token", &field(&page, "token")),
                ("email", "Alex@Example.com"),
                ("password", PASSWORD),
            ],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&resp), "/setup/network");
    let cookie = resp
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .find(|c| c.starts_with("trellis_session="))
        .expect("a session cookie");
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(cookie.contains("SameSite=Strict"), "{cookie}");
    assert!(cookie.contains("Path=/"), "{cookie}");
    assert!(!cookie.contains("Secure"), "plain http: {cookie}");
    // Logged in: step 2 opens.
    let (status, page) = b.get(&r.at("/setup/network")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains(r#"<form id="network""#));

    // The link is used up, for the page and for the form.
    let other = Browser::new();
    let (status, page) = other.get(&link).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(page.contains("already used"), "{page}");
    let (_, login) = other.get(&r.at("/login")).await;
    let token = link.split("token=").nth(1).unwrap();
    let resp = other
        .post(
            &r.at("/setup"),
            &[
                ("csrf", &field(&login, "csrf")),
                ("token", token),
                ("email", "mallory@example.com"),
                ("password", PASSWORD),
            ],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    // The email was stored lower-case: logging in with it works.
    r.login(EMAIL, PASSWORD).await;
    r.stop().await;

    // After a restart the server prints the dashboard, not a setup link.
    let r = Running::start(dir.path()).await;
    assert_eq!(r.setup_url, None);
    assert_eq!(r.line, format!("Dashboard: {}/", r.url));
    r.stop().await;
}

#[tokio::test]
async fn wrong_passwords_are_refused_then_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    let r = Running::start(dir.path()).await;
    r.setup_admin().await;

    let b = Browser::new();
    for i in 0..5 {
        let resp = b.login(&r, EMAIL, "wrong password!").await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "try {i}");
        let page = resp.text().await.unwrap();
        assert!(page.contains("Wrong email or password"), "{page}");
        assert!(!page.contains("trellis_session"));
    }
    // An unknown email is refused the same way.
    let resp = b.login(&r, "nobody@example.com", PASSWORD).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    // The sixth failure within a minute locks this email from this address,
    // even with the right password.
    let resp = b.login(&r, EMAIL, PASSWORD).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let page = resp.text().await.unwrap();
    assert!(page.contains("Too many failed logins"), "{page}");
    assert!(b.get_json(&r.at("/dash/api/nodes")).await.0 == StatusCode::UNAUTHORIZED);
    r.stop().await;
}

#[tokio::test]
async fn every_post_needs_the_sessions_own_csrf_token() {
    let dir = tempfile::tempdir().unwrap();
    let r = Running::start(dir.path()).await;
    let a = r.setup_admin().await;
    let b = r.login(EMAIL, PASSWORD).await;
    let csrf_a = a.csrf(&r).await;
    let csrf_b = b.csrf(&r).await;
    assert_ne!(csrf_a, csrf_b, "each session has its own token");

    for path in [
        "/setup/network",
        "/setup/test",
        "/logout",
        "/logout/everywhere",
    ] {
        let none = a
            .post(&r.at(path), &[("name", "home"), ("from", "x"), ("to", "y")])
            .await;
        assert_eq!(none.status(), StatusCode::FORBIDDEN, "{path} without csrf");
        let wrong = a
            .post(
                &r.at(path),
                &[
                    ("csrf", &csrf_b),
                    ("name", "home"),
                    ("from", "x"),
                    ("to", "y"),
                ],
            )
            .await;
        assert_eq!(
            wrong.status(),
            StatusCode::FORBIDDEN,
            "{path} with B's csrf"
        );
    }
    // An empty POST (no form at all) is refused too.
    let resp = a.http.post(r.at("/setup/network")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    // Login without its form token.
    let resp = Browser::new()
        .post(&r.at("/login"), &[("email", EMAIL), ("password", PASSWORD)])
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    // Nothing changed: the network is still unnamed and both sessions live.
    let (_, accounts) = r.api(reqwest::Method::GET, "/accounts", Value::Null).await;
    assert_eq!(accounts[0]["name"], "default");
    assert_eq!(a.get_json(&r.at("/dash/api/nodes")).await.0, StatusCode::OK);
    assert_eq!(b.get_json(&r.at("/dash/api/nodes")).await.0, StatusCode::OK);
    // With its own token the same form works.
    let resp = a
        .post(
            &r.at("/setup/network"),
            &[("csrf", &csrf_a), ("name", "home")],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    r.stop().await;
}

#[tokio::test]
async fn a_session_sees_only_its_own_accounts_devices() {
    let dir = tempfile::tempdir().unwrap();
    let r = Running::start(dir.path()).await;
    let a = r.setup_admin().await;
    let (status, _) = r
        .api(reqwest::Method::POST, "/accounts", json!({"name": "other"}))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = r
        .api(
            reqwest::Method::POST,
            "/admins?account=other",
            json!({"email": "bo@example.com", "password": "another long password"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["account"], "other");
    let (status, body) = r
        .api(
            reqwest::Method::POST,
            "/admins?account=other",
            json!({"email": "BO@example.com", "password": "another long password"}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    // Each account lists its own admins only.
    let (status, body) = r
        .api(reqwest::Method::GET, "/admins?account=other", Value::Null)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!([{"email": "bo@example.com", "account": "other"}])
    );
    let (_, body) = r.api(reqwest::Method::GET, "/admins", Value::Null).await;
    assert!(
        body.as_array()
            .unwrap()
            .iter()
            .all(|a| a["account"] != "other"),
        "{body}"
    );

    // A device in the first admin's account.
    let (_, tok) = r
        .api(reqwest::Method::POST, "/tokens", json!({"reusable": true}))
        .await;
    r.enroll(tok["token"].as_str().unwrap(), 7, "secret-db")
        .await;

    let (status, mine) = a.get_json(&r.at("/dash/api/nodes")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(mine["devices"][0]["name"], "secret-db");

    let b = r.login("bo@example.com", "another long password").await;
    let (status, theirs) = b.get_json(&r.at("/dash/api/nodes")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(theirs["network"], "other");
    assert_eq!(theirs["total"], 0);
    for path in ["/setup/devices", "/setup/test", "/setup/done", "/"] {
        let (_, page) = b.get(&r.at(path)).await;
        assert!(
            !page.contains("secret-db"),
            "{path} shows another account's device"
        );
    }
    // B's network step renames B's account, never A's.
    let csrf = b.csrf(&r).await;
    let resp = b
        .post(
            &r.at("/setup/network"),
            &[("csrf", &csrf), ("name", "bo-net")],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let (_, accounts) = r.api(reqwest::Method::GET, "/accounts", Value::Null).await;
    let names: Vec<&str> = accounts
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default", "bo-net"]);
    // Without a session there is nothing to see.
    assert_eq!(
        Browser::new().get_json(&r.at("/dash/api/nodes")).await.0,
        StatusCode::UNAUTHORIZED
    );
    let resp = Browser::new().http.get(r.at("/")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&resp), "/login");
    r.stop().await;
}

#[tokio::test]
async fn logout_ends_one_session_and_logout_everywhere_ends_all() {
    let dir = tempfile::tempdir().unwrap();
    let r = Running::start(dir.path()).await;
    let a = r.setup_admin().await;
    let b = r.login(EMAIL, PASSWORD).await;
    let c = r.login(EMAIL, PASSWORD).await;

    let csrf = c.csrf(&r).await;
    let resp = c.post(&r.at("/logout"), &[("csrf", &csrf)]).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        c.get_json(&r.at("/dash/api/nodes")).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(a.get_json(&r.at("/dash/api/nodes")).await.0, StatusCode::OK);

    let csrf = a.csrf(&r).await;
    let resp = a
        .post(&r.at("/logout/everywhere"), &[("csrf", &csrf)])
        .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&resp), "/login");
    for browser in [&a, &b] {
        assert_eq!(
            browser.get_json(&r.at("/dash/api/nodes")).await.0,
            StatusCode::UNAUTHORIZED
        );
    }
    // Logging in again works.
    let d = r.login(EMAIL, PASSWORD).await;
    assert_eq!(d.get_json(&r.at("/dash/api/nodes")).await.0, StatusCode::OK);
    r.stop().await;
}

#[tokio::test]
async fn the_wizard_walks_its_steps_in_order_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let r = Running::start(dir.path()).await;
    let b = r.setup_admin().await;

    // Step 2: name and block, checked.
    let (_, page) = b.get(&r.at("/setup/network")).await;
    for needle in [
        r#"<form id="network""#,
        r#"name="name""#,
        "<details>",
        r#"name="cidr" value="100.64.0.0/16""#,
        r#"type="submit""#,
    ] {
        assert!(page.contains(needle), "{needle} missing in {page}");
    }
    let csrf = field(&page, "csrf");
    let resp = b
        .post(
            &r.at("/setup/network"),
            &[
                ("csrf", &csrf),
                ("name", "My Home!"),
                ("cidr", "100.64.0.0/16"),
            ],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let page = resp.text().await.unwrap();
    assert!(text_of(&page, "error").contains("lower-case"), "{page}");
    assert!(page.contains("Example: my-home"), "{page}");
    let resp = b
        .post(
            &r.at("/setup/network"),
            &[("csrf", &csrf), ("name", "home"), ("cidr", "10.0.0.0/8")],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert!(text_of(&resp.text().await.unwrap(), "error").contains("100.64.0.0/10"));
    let resp = b
        .post(
            &r.at("/setup/network"),
            &[("csrf", &csrf), ("name", "home"), ("cidr", "banana")],
        )
        .await;
    assert!(text_of(&resp.text().await.unwrap(), "error").contains("not an address block"));
    // Leaving now resumes at step 2.
    let resp = b.http.get(r.at("/")).send().await.unwrap();
    assert_eq!(location(&resp), "/setup/network");
    let resp = b
        .post(
            &r.at("/setup/network"),
            &[("csrf", &csrf), ("name", "home"), ("cidr", "100.70.0.0/16")],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&resp), "/setup/devices");
    let (_, accounts) = r.api(reqwest::Method::GET, "/accounts", Value::Null).await;
    assert_eq!(accounts[0]["name"], "home");
    assert_eq!(accounts[0]["cidr"], "100.70.0.0/16");
    let resp = b.http.get(r.at("/")).send().await.unwrap();
    assert_eq!(location(&resp), "/setup/devices");

    // Steps 3/4: the join command, reusable, and the live list.
    let (status, page) = b.get(&r.at("/setup/devices")).await;
    assert_eq!(status, StatusCode::OK);
    let command = text_of(&page, "join-command");
    let prefix = format!("curl -fsSL {}/install.sh | sudo sh -s -- --token ", r.url);
    assert!(command.starts_with(&prefix), "{command}");
    let token = command[prefix.len()..].to_string();
    assert!(token.starts_with("trj_") && !token.contains(' '), "{token}");
    assert!(page.contains(r#"<ul id="devices""#));
    assert!(page.contains(r#"<a id="next""#));
    assert!(page.contains("data-copy=\"join-command\""));
    // The page shows the same token while it is fresh.
    let (_, again) = b.get(&r.at("/setup/devices")).await;
    assert_eq!(text_of(&again, "join-command"), command);

    let laptop = r.enroll(&token, 1, "laptop").await;
    r.enroll(&token, 2, "db-server").await;
    let (_, nodes) = b.get_json(&r.at("/dash/api/nodes")).await;
    assert_eq!(nodes["total"], 2);
    assert_eq!(nodes["online"], 0);
    assert_eq!(nodes["devices"][0]["name"], "laptop");
    assert_eq!(nodes["devices"][0]["ip"], laptop["ip"]);
    assert!(nodes["devices"][0]["ip"]
        .as_str()
        .unwrap()
        .starts_with("100.70."));
    assert_eq!(nodes["devices"][0]["online"], false);
    let (_, page) = b.get(&r.at("/setup/devices")).await;
    let ip = laptop["ip"].as_str().unwrap();
    assert!(
        page.contains(&format!(
            r#"<li class="device" data-name="laptop" data-ip="{ip}" data-online="false">"#
        )),
        "{page}"
    );
    assert!(page.contains("not connected yet"), "{page}");
    // With devices in it, the network keeps its name.
    let resp = b
        .post(
            &r.at("/setup/network"),
            &[("csrf", &csrf), ("name", "other-name")],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert!(text_of(&resp.text().await.unwrap(), "error").contains("already has devices"));

    // Step 5: the test page and its endpoint.
    let (status, page) = b.get(&r.at("/setup/test")).await;
    assert_eq!(status, StatusCode::OK);
    for needle in [
        r#"<select id="from""#,
        r#"<select id="to""#,
        r#"id="test-connection""#,
        r#"id="test-result""#,
        r#"<option value="laptop""#,
        r#"<option value="db-server""#,
        r#"<a id="next""#,
    ] {
        assert!(page.contains(needle), "{needle} missing in {page}");
    }
    // Two different devices are preselected.
    assert!(
        page.contains(r#"<option value="laptop" selected>"#),
        "{page}"
    );
    assert!(
        page.contains(r#"<option value="db-server" selected>"#),
        "{page}"
    );
    let csrf = field(&page, "csrf");
    let resp = b
        .http
        .post(r.at("/setup/test"))
        .header(ACCEPT, "application/json")
        .form(&[
            ("csrf", csrf.as_str()),
            ("from", "laptop"),
            ("to", "laptop"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let result: Value = resp.json().await.unwrap();
    assert_eq!(result["ok"], false);
    assert!(result["message"]
        .as_str()
        .unwrap()
        .contains("two different devices"));
    let resp = b
        .http
        .post(r.at("/setup/test"))
        .header(ACCEPT, "application/json")
        .form(&[
            ("csrf", csrf.as_str()),
            ("from", "laptop"),
            ("to", "db-server"),
        ])
        .send()
        .await
        .unwrap();
    let result: Value = resp.json().await.unwrap();
    // Both devices are offline here, so the test cannot succeed; whatever the
    // probe says is shown as a sentence.
    assert_eq!(result["ok"], false, "{result}");
    assert!(!result["message"].as_str().unwrap().is_empty());
    // Without JavaScript the form posts and the page shows the sentence.
    let resp = b
        .post(
            &r.at("/setup/test"),
            &[("csrf", &csrf), ("from", "laptop"), ("to", "laptop")],
        )
        .await;
    let page = resp.text().await.unwrap();
    assert!(page.contains(r#"data-ok="false""#), "{page}");
    assert!(text_of(&page, "test-result").contains("two different devices"));

    // Step 7: done, then the overview.
    let (status, page) = b.get(&r.at("/setup/done")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains(r#"id="done""#));
    assert_eq!(text_of(&page, "summary-network"), "home");
    assert!(page.contains("laptop.home.mesh"), "{page}");
    let (status, page) = b.get(&r.at("/")).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains(r#"<table id="device-table""#));
    assert!(page.contains(r#"data-name="db-server""#));
    assert!(page.contains("100.70.0.0/16"));
    assert_eq!(text_of(&page, "online-count"), "0");
    assert_eq!(text_of(&page, "total-count"), "2");
    assert!(text_of(&page, "edge").starts_with("Health: "), "{page}");
    assert_eq!(
        text_of(&page, "traffic"),
        "Last 24 hours: 0 connections, 0 bytes, 0 denied attempts ("
    );
    // The wizard stays reachable, and the login lands on the overview now.
    let resp = Browser::new().login(&r, EMAIL, PASSWORD).await;
    assert_eq!(location(&resp), "/");
    // Assets are served from the binary.
    for (path, ct) in [
        ("/assets/dash.css", "text/css"),
        ("/assets/dash.js", "text/javascript"),
    ] {
        let resp = b.http.get(r.at(path)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with(ct));
    }
    r.stop().await;
}

#[tokio::test]
async fn install_script_is_served_and_the_download_is_this_executable() {
    let dir = tempfile::tempdir().unwrap();
    let r = Running::start(dir.path()).await;
    let resp = Client::new().get(r.at("/install.sh")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let script = resp.text().await.unwrap();
    assert!(script.starts_with("#!/bin/sh\n"));
    assert!(script.contains("\nset -eu\n"));
    assert!(
        script.contains(&format!("SERVER='{}'\n", r.url)),
        "{script}"
    );
    // sh parses it.
    let out = std::process::Command::new("sh")
        .arg("-n")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let resp = Client::new()
        .get(r.at("/download/trellis"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let bytes = resp.bytes().await.unwrap();
    let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
    assert_eq!(bytes.len(), me.len());
    assert!(
        bytes[..] == me[..],
        "the download is the server's own executable"
    );
    r.stop().await;
}
