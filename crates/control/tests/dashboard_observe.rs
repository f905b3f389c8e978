//! The dashboard's Policy, Logs and Audit pages and its live event streams,
//! end to end against an in-process server on 127.0.0.1: each page needs a
//! session, each form needs the session's CSRF token, changes are checked
//! through the REST API, and one account's session sees and changes nothing
//! of another account.

mod dash_support;

use std::time::Duration;

use dash_support::{field, location, Browser, Running, Ws, EMAIL};
use futures_util::SinkExt;
use reqwest::{Client, Method, Response, StatusCode};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use trellis_proto::{FlowRecord, NodeKey, NodeMessage, ServerMessage};

const OTHER_EMAIL: &str = "bo@example.com";
const OTHER_PASSWORD: &str = "another long password";

impl Running {
    /// The policy in force in `account` (version, text).
    async fn policy(&self, account: &str) -> (i64, String) {
        let (status, v) = self
            .api(
                Method::GET,
                &format!("/policy?account={account}"),
                Value::Null,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        (
            v["version"].as_i64().unwrap(),
            v["text"].as_str().unwrap().to_string(),
        )
    }

    /// Enrolls a node in `account`; returns its node secret.
    async fn enroll_in(&self, account: &str, key: u8, name: &str) -> String {
        let (status, tok) = self
            .api(
                Method::POST,
                &format!("/tokens?account={account}"),
                json!({"reusable": true}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{tok}");
        let resp = Client::new()
            .post(self.at("/api/v1/enroll"))
            .json(&json!({
                "token": tok["token"],
                "public_key": NodeKey([key; 32]).to_string(),
                "name": name,
                "hostname": "h",
                "os": "linux",
                "version": "test",
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let v: Value = resp.json().await.unwrap();
        v["node_secret"].as_str().unwrap().to_string()
    }

    /// Connects a node's control stream, says hello and reads its map.
    async fn connect_ws(&self, secret: &str) -> Ws {
        self.connect(secret).await.0
    }

    /// A second account "other" with its own admin, logged in.
    async fn other_admin(&self) -> Browser {
        let (status, _) = self
            .api(Method::POST, "/accounts", json!({"name": "other"}))
            .await;
        assert_eq!(status, StatusCode::CREATED);
        let (status, body) = self
            .api(
                Method::POST,
                "/admins?account=other",
                json!({"email": OTHER_EMAIL, "password": OTHER_PASSWORD}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let b = Browser::new();
        let (status, page) = b.get(&self.at("/login")).await;
        assert_eq!(status, StatusCode::OK);
        let resp = b
            .post(
                &self.at("/login"),
                &[
                    ("csrf", &field(&page, "csrf")),
                    ("email", OTHER_EMAIL),
                    ("password", OTHER_PASSWORD),
                ],
            )
            .await;
        assert_eq!(resp.status(), StatusCode::SEE_OTHER);
        b
    }
}

async fn send_json<T: serde::Serialize>(ws: &mut Ws, msg: &T) {
    ws.send(Message::Text(serde_json::to_string(msg).unwrap().into()))
        .await
        .unwrap();
}

async fn next_msg(ws: &mut Ws) -> ServerMessage {
    dash_support::next_msg(ws, Duration::from_secs(5)).await
}

/// Sends batch `seq` and waits for its ack (skipping map deltas).
async fn send_batch(ws: &mut Ws, seq: u64, records: Vec<FlowRecord>) {
    send_json(ws, &NodeMessage::Flows { seq, records }).await;
    loop {
        match next_msg(ws).await {
            ServerMessage::FlowsAck { seq: s } => {
                assert_eq!(s, seq);
                return;
            }
            ServerMessage::Delta { .. } => continue,
            other => panic!("expected FlowsAck {seq}, got {other:?}"),
        }
    }
}

fn flow(dst_port: u16, decision: &str, end_ms: i64) -> FlowRecord {
    FlowRecord {
        start_ms: end_ms - 1000,
        end_ms,
        proto: "tcp".into(),
        src_ip: "100.64.0.1".parse().unwrap(),
        src_port: 40000,
        dst_ip: "100.64.0.2".parse().unwrap(),
        dst_port,
        direction: "out".into(),
        packets_out: 3,
        bytes_out: 300,
        packets_in: 2,
        bytes_in: 200,
        path: "relay".into(),
        via: "edge-1".into(),
        decision: decision.into(),
        rule: if decision == "deny" {
            String::new()
        } else {
            "ssh".into()
        },
        count: 1,
        end_reason: "fin".into(),
    }
}

impl Browser {
    async fn post_page(&self, url: &str, form: &[(&str, &str)]) -> (StatusCode, String) {
        let resp = self.post(url, form).await;
        let status = resp.status();
        (status, resp.text().await.unwrap())
    }

    /// The session's CSRF token, read from the policy page (every account's
    /// admin has one).
    async fn policy_csrf(&self, r: &Running) -> String {
        let (status, page) = self.get(&r.at("/policy")).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        field(&page, "csrf")
    }
}

/// The text inside the element with id `id` (up to its first `<`).
fn text_of(page: &str, id: &str) -> String {
    let at = page
        .find(&format!(r#"id="{id}""#))
        .unwrap_or_else(|| panic!("no #{id} in {page}"));
    let start = at + page[at..].find('>').unwrap() + 1;
    let end = start + page[start..].find('<').unwrap();
    page[start..end].to_string()
}

/// Undoes askama's HTML escaping.
fn unescape(s: &str) -> String {
    s.replace("&#34;", "\"")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// Reads SSE text from `resp` until `want` shows up (or 5 s pass).
async fn read_until(resp: &mut Response, seen: &mut String, want: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !seen.contains(want) {
        let chunk = tokio::time::timeout_at(deadline, resp.chunk())
            .await
            .unwrap_or_else(|_| panic!("{want:?} did not arrive; got {seen}"))
            .unwrap()
            .expect("the stream stays open");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
}

#[tokio::test]
async fn the_pages_need_a_session() {
    let dir = tempfile::tempdir().unwrap();
    let r = Running::start(dir.path()).await;
    let _a = r.setup_admin().await;
    let anon = Browser::new();
    for path in ["/policy", "/policy/default-deny", "/logs", "/audit"] {
        let resp = anon.http.get(r.at(path)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::SEE_OTHER, "{path}");
        assert_eq!(location(&resp), "/login", "{path}");
    }
    for path in ["/policy", "/policy/test", "/policy/restore"] {
        let resp = anon.post(&r.at(path), &[("csrf", "x")]).await;
        assert_eq!(resp.status(), StatusCode::SEE_OTHER, "{path}");
        assert_eq!(location(&resp), "/login", "{path}");
    }
    for path in ["/dash/api/flows/stream", "/dash/api/events"] {
        let resp = anon.http.get(r.at(path)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{path}");
    }
    assert_eq!(r.policy("default").await.0, 1);
    r.stop().await;
}

#[tokio::test]
async fn the_policy_page_saves_refuses_tests_and_restores() {
    let dir = tempfile::tempdir().unwrap();
    let r = Running::start(dir.path()).await;
    let a = r.setup_admin().await;
    r.enroll_in("default", 1, "web").await;
    r.enroll_in("default", 2, "db").await;

    let (status, page) = a.get(&r.at("/policy")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(text_of(&page, "policy-version"), "1");
    assert!(page.contains(r#"<textarea id="policy-text" name="text""#));
    let (_, v1_text) = r.policy("default").await;
    assert!(unescape(&page).contains(&v1_text), "{page}");
    let csrf = field(&page, "csrf");

    // Without the CSRF token nothing is saved.
    let good = "default = \"deny\"\n\n[[rules]]\nname = \"ssh\"\naction = \"allow\"\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\"tcp:22\"]\n\n[[rules]]\nname = \"ghost\"\naction = \"allow\"\nfrom = [\"tag:nobody\"]\nto = [\"*\"]\n";
    let resp = a.post(&r.at("/policy"), &[("text", good)]).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let resp = a
        .post(&r.at("/policy"), &[("csrf", "wrong"), ("text", good)])
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(r.policy("default").await.0, 1);

    // A text with problems: every problem with its line and field, the text kept.
    let bad = "default = \"maybe\"\n[[rules]]\nname = \"x\"\naction = \"allow\"\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\"tcp:99999\"]\n";
    let (status, page) = a
        .post_page(&r.at("/policy"), &[("csrf", &csrf), ("text", bad)])
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{page}");
    assert!(page.contains(r#"id="policy-error""#), "{page}");
    assert!(page.contains("<strong>Line 1</strong>"), "{page}");
    assert!(page.contains("<code>default</code>"), "{page}");
    assert!(page.contains("<code>rules[0].ports[0]</code>"), "{page}");
    assert!(unescape(&page).contains(bad), "the submitted text stays");
    assert_eq!(r.policy("default").await.0, 1);
    // Not TOML at all.
    let (status, page) = a
        .post_page(&r.at("/policy"), &[("csrf", &csrf), ("text", "[[rules")])
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(page.contains("<strong>Line "), "{page}");
    assert_eq!(r.policy("default").await.0, 1);

    // A good text (CRLF as browsers send it) becomes version 2, with warnings.
    let (status, page) = a
        .post_page(
            &r.at("/policy"),
            &[("csrf", &csrf), ("text", &good.replace('\n', "\r\n"))],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(text_of(&page, "policy-ok").contains("Version 2 is now in force"));
    assert!(page.contains(r#"id="policy-warnings""#), "{page}");
    assert!(page.contains("nobody"), "{page}");
    assert_eq!(r.policy("default").await, (2, good.to_string()));
    // The same text again changes nothing.
    let (status, page) = a
        .post_page(&r.at("/policy"), &[("csrf", &csrf), ("text", good)])
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(text_of(&page, "policy-ok").contains("Nothing changed"));
    assert_eq!(r.policy("default").await.0, 2);

    // The audit log names the dashboard admin.
    let (_, audit) = r.api(Method::GET, "/audit", Value::Null).await;
    let entry = audit
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "policy.set")
        .expect("a policy.set entry");
    assert_eq!(entry["actor"], format!("dashboard:{EMAIL}"));

    // Can A reach B?
    let test = |from: &'static str, to: &'static str, port: &'static str, csrf: String| {
        let a = &a;
        let r = &r;
        async move {
            a.post_page(
                &r.at("/policy/test"),
                &[("csrf", &csrf), ("from", from), ("to", to), ("port", port)],
            )
            .await
        }
    };
    let (status, page) = test("web", "db", "tcp:22", csrf.clone()).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let answer = unescape(&text_of(&page, "test-answer"));
    assert!(answer.starts_with("Yes: web ("), "{answer}");
    assert!(answer.contains("rule \"ssh\""), "{answer}");
    assert!(answer.contains("policy version 2"), "{answer}");
    let (status, page) = test("web", "db", "tcp:5432", csrf.clone()).await;
    assert_eq!(status, StatusCode::OK);
    let answer = unescape(&text_of(&page, "test-answer"));
    assert!(answer.starts_with("No: web ("), "{answer}");
    assert!(answer.contains("default (deny)"), "{answer}");
    let (status, page) = test("web", "db", "tcp:0", csrf.clone()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(text_of(&page, "test-answer").contains("invalid port"));
    let (status, page) = test("web", "nowhere", "tcp:22", csrf.clone()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(text_of(&page, "test-answer").contains("no node named"));
    let (status, _) = test("", "db", "tcp:22", csrf.clone()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let resp = a
        .post(
            &r.at("/policy/test"),
            &[("from", "web"), ("to", "db"), ("port", "tcp:22")],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);

    // History and restore.
    let (_, page) = a.get(&r.at("/policy")).await;
    assert!(page.contains(r#"name="version" value="1""#), "{page}");
    assert!(
        !page.contains(r#"name="version" value="2""#),
        "v2 is in force"
    );
    let resp = a.post(&r.at("/policy/restore"), &[("version", "1")]).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    for (bad, code) in [
        ("abc", StatusCode::BAD_REQUEST),
        ("99", StatusCode::NOT_FOUND),
    ] {
        let (status, page) = a
            .post_page(
                &r.at("/policy/restore"),
                &[("csrf", &csrf), ("version", bad)],
            )
            .await;
        assert_eq!(status, code, "{page}");
        assert!(page.contains(r#"id="policy-error""#), "{page}");
    }
    assert_eq!(r.policy("default").await.0, 2);
    let (status, page) = a
        .post_page(
            &r.at("/policy/restore"),
            &[("csrf", &csrf), ("version", "1")],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(text_of(&page, "policy-ok").contains("Restored the text of version 1"));
    assert_eq!(r.policy("default").await, (3, v1_text.clone()));

    // The default-deny helper only shows what it would set.
    let (status, page) = a.get(&r.at("/policy/default-deny")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains(r#"id="policy-preview""#), "{page}");
    let page = unescape(&page);
    assert!(page.contains("default = \"deny\""), "{page}");
    assert!(!page.contains("default = \"allow\""), "{page}");
    assert_eq!(r.policy("default").await.0, 3, "nothing saved yet");
    r.stop().await;
}

#[tokio::test]
async fn the_logs_page_filters_pages_and_streams_live() {
    let dir = tempfile::tempdir().unwrap();
    let r = Running::start(dir.path()).await;
    let a = r.setup_admin().await;
    let secret = r.enroll_in("default", 1, "web").await;
    let mut ws = r.connect_ws(&secret).await;
    let now = trellis_control::flows::now_ms();
    let mut batch: Vec<FlowRecord> = (0..55)
        .map(|i| flow(22, "allow", now - 60_000 + i))
        .collect();
    batch.push(flow(5432, "deny", now - 1000));
    send_batch(&mut ws, 1, batch).await;

    let (status, page) = a.get(&r.at("/logs")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page.matches(r#"<tr class="flow""#).count(), 50);
    assert!(page.contains("deny"), "{page}");
    assert!(page.contains("relay via edge-1"), "{page}");
    assert!(page.contains("300 / 200"), "{page}");
    assert!(
        page.contains(r#"data-stream="/dash/api/flows/stream?""#),
        "{page}"
    );
    // The newest first, then an older page.
    let first = page.find(r#"data-decision="deny""#).unwrap();
    let allow = page.find(r#"data-decision="allow""#).unwrap();
    assert!(first < allow, "newest first");
    let older = unescape(&field(
        &page.replace(r#"id="older" href="/logs?"#, r#"name="older" value=""#),
        "older",
    ));
    let (status, page2) = a.get(&r.at(&format!("/logs?{older}"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page2.matches(r#"<tr class="flow""#).count(), 6);
    assert!(
        !page2.contains("data-stream"),
        "no live tail on older pages"
    );

    // Filters.
    let (_, page) = a
        .get(&r.at("/logs?decision=deny&since=1h&node=web&proto=tcp"))
        .await;
    assert_eq!(page.matches(r#"<tr class="flow""#).count(), 1);
    assert!(page.contains("5432"), "{page}");
    let (_, page) = a.get(&r.at("/logs?decision=allow&since=10s")).await;
    assert_eq!(page.matches(r#"<tr class="flow""#).count(), 0);
    for bad in [
        "decision=maybe",
        "since=yesterday",
        "before_id=-3",
        "node=bad%20name",
    ] {
        let (status, page) = a.get(&r.at(&format!("/logs?{bad}"))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(page.contains(r#"id="logs-error""#), "{bad}: {page}");
    }

    // The live tail: a filtered stream gets the new deny record only.
    let mut resp = a
        .http
        .get(r.at("/dash/api/flows/stream?decision=deny"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    send_batch(
        &mut ws,
        2,
        vec![flow(8080, "allow", now), flow(6379, "deny", now)],
    )
    .await;
    let mut seen = String::new();
    read_until(&mut resp, &mut seen, "6379").await;
    assert!(!seen.contains("8080"), "{seen}");
    let (status, _) = a.get(&r.at("/dash/api/flows/stream?decision=maybe")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Another account sees none of it, live or stored.
    let b = r.other_admin().await;
    let (_, page) = b.get(&r.at("/logs")).await;
    assert_eq!(page.matches(r#"<tr class="flow""#).count(), 0);
    let mut theirs = b
        .http
        .get(r.at("/dash/api/flows/stream"))
        .send()
        .await
        .unwrap();
    assert_eq!(theirs.status(), StatusCode::OK);
    send_batch(&mut ws, 3, vec![flow(9999, "deny", now)]).await;
    read_until(&mut resp, &mut seen, "9999").await;
    let quiet = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            let c = theirs.chunk().await.unwrap().unwrap();
            if String::from_utf8_lossy(&c).contains("data:") {
                return c;
            }
        }
    })
    .await;
    assert!(quiet.is_err(), "another account's stream got a record");
    drop(resp);
    drop(theirs);
    r.stop().await;
}

#[tokio::test]
async fn the_audit_page_lists_pages_and_filters() {
    let dir = tempfile::tempdir().unwrap();
    let r = Running::start(dir.path()).await;
    let a = r.setup_admin().await;
    for i in 0..55 {
        let (status, v) = r
            .api(
                Method::PUT,
                "/policy",
                json!({"text": format!("# v{i}\ndefault = \"allow\"\n")}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{v}");
    }
    let (status, page) = a.get(&r.at("/audit")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page.matches("<code>policy.set</code>").count(), 50);
    assert!(page.contains("policy v56"), "newest first: {page}");
    assert!(page.contains("operator"), "{page}");
    let older = unescape(&field(
        &page.replace(r#"id="older" href="/audit?"#, r#"name="older" value=""#),
        "older",
    ));
    let (status, page2) = a.get(&r.at(&format!("/audit?{older}"))).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page2.contains("policy v2<"), "{page2}");
    assert!(!page2.contains("policy v56"));
    let (_, page) = a.get(&r.at("/audit?since=1h")).await;
    assert_eq!(page.matches("<code>policy.set</code>").count(), 50);
    for bad in ["since=soon", "before_id=x"] {
        let (status, page) = a.get(&r.at(&format!("/audit?{bad}"))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(page.contains(r#"id="audit-error""#), "{page}");
    }
    // Another account's admin sees none of it.
    let b = r.other_admin().await;
    let (_, page) = b.get(&r.at("/audit")).await;
    assert!(!page.contains("policy.set"), "{page}");
    r.stop().await;
}

#[tokio::test]
async fn another_accounts_session_cannot_see_or_change_this_policy() {
    let dir = tempfile::tempdir().unwrap();
    let r = Running::start(dir.path()).await;
    let _a = r.setup_admin().await;
    r.enroll_in("default", 1, "secret-db").await;
    let (status, _) = r
        .api(
            Method::PUT,
            "/policy",
            json!({"text": "# only-in-default\ndefault = \"deny\"\n"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let b = r.other_admin().await;
    let (_, page) = b.get(&r.at("/policy")).await;
    assert!(!page.contains("only-in-default"), "{page}");
    assert!(!page.contains("secret-db"), "{page}");
    let csrf = b.policy_csrf(&r).await;
    // B's save changes B's policy only.
    let resp = b
        .post(
            &r.at("/policy"),
            &[("csrf", &csrf), ("text", "default = \"deny\"\n# bo\n")],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(r.policy("other").await.0, 2);
    assert_eq!(r.policy("default").await.0, 2);
    assert!(r.policy("default").await.1.contains("only-in-default"));
    // B cannot restore A's versions nor test A's nodes.
    let (status, _) = b
        .post_page(
            &r.at("/policy/restore"),
            &[("csrf", &csrf), ("version", "3")],
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, page) = b
        .post_page(
            &r.at("/policy/test"),
            &[
                ("csrf", &csrf),
                ("from", "secret-db"),
                ("to", "100.64.0.9"),
                ("port", "tcp:22"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{page}");
    // A's CSRF token does not work in B's session.
    let a_csrf = _a.policy_csrf(&r).await;
    let resp = b
        .post(
            &r.at("/policy/restore"),
            &[("csrf", &a_csrf), ("version", "1")],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(r.policy("other").await.0, 2);
    r.stop().await;
}

#[tokio::test]
async fn the_overview_events_push_the_device_list() {
    let dir = tempfile::tempdir().unwrap();
    let r = Running::start(dir.path()).await;
    let a = r.setup_admin().await;
    let b = r.other_admin().await;
    let mut mine = a.http.get(r.at("/dash/api/events")).send().await.unwrap();
    assert_eq!(mine.status(), StatusCode::OK);
    let mut theirs = b.http.get(r.at("/dash/api/events")).send().await.unwrap();
    let mut seen = String::new();
    read_until(&mut mine, &mut seen, "\"total\":0").await;
    assert!(seen.contains("event: nodes"), "{seen}");
    let mut seen_b = String::new();
    read_until(&mut theirs, &mut seen_b, "\"network\":\"other\"").await;

    // A device joins and comes online: the list is pushed.
    let secret = r.enroll_in("default", 1, "laptop").await;
    read_until(&mut mine, &mut seen, "\"name\":\"laptop\"").await;
    let _ws = r.connect_ws(&secret).await;
    read_until(&mut mine, &mut seen, "\"online\":true").await;
    // Nothing of it reaches the other account.
    let quiet = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            let c = theirs.chunk().await.unwrap().unwrap();
            if String::from_utf8_lossy(&c).contains("laptop") {
                return c;
            }
        }
    })
    .await;
    assert!(quiet.is_err(), "another account saw the device");
    assert!(!seen_b.contains("laptop"));
    drop(mine);
    drop(theirs);
    r.stop().await;
}
