//! "Test the connection" through the control plane: a real server on
//! 127.0.0.1, fake nodes on WebSockets that answer (or do not answer) the
//! server's probes.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use trellis_control::probe::ProbeOutcome;
use trellis_proto::{NodeMessage, ServerMessage};

mod dash_support;
use dash_support::Running;

impl Running {
    async fn probe(&self, from: &str, to: &str) -> (StatusCode, Value) {
        self.post_api(&format!("/nodes/{from}/probe"), json!({ "to": to }))
            .await
    }

    async fn node_online(&self, name: &str) -> bool {
        self.nodes()
            .await
            .iter()
            .any(|n| n["name"] == name && n["online"] == true)
    }
}

/// How a fake node answers a probe: given (id, target), what to send back
/// (None: stay silent).
type Answer = Box<dyn Fn(u64, Ipv4Addr) -> Option<NodeMessage> + Send>;

/// A fake node on the control stream: says hello, then answers probes as
/// `answer` says and reports every probe it got on the returned channel.
async fn fake_node(
    server: &Running,
    secret: &str,
    answer: Answer,
) -> (JoinHandle<()>, mpsc::UnboundedReceiver<(u64, Ipv4Addr)>) {
    let url = format!(
        "{}/api/v1/node/stream",
        server.url.replacen("http://", "ws://", 1)
    );
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {secret}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let hello = NodeMessage::Hello {
        listen_port: 41641,
        local_addrs: vec!["198.18.0.9".parse().unwrap()],
        reflexive: None,
        advertise_routes: Vec::new(),
        os: "linux".into(),
        version: "test".into(),
    };
    ws.send(Message::Text(serde_json::to_string(&hello).unwrap().into()))
        .await
        .unwrap();
    let (seen_tx, seen_rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Some(Ok(msg)) = ws.next().await {
            let Message::Text(t) = msg else { continue };
            let Ok(ServerMessage::Probe { id, target }) = serde_json::from_str(&t) else {
                continue;
            };
            let _ = seen_tx.send((id, target));
            if let Some(reply) = answer(id, target) {
                let text = serde_json::to_string(&reply).unwrap();
                if ws.send(Message::Text(text.into())).await.is_err() {
                    return;
                }
            }
        }
    });
    (task, seen_rx)
}

async fn wait_online(server: &Running, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !server.node_online(name).await {
        assert!(Instant::now() < deadline, "{name} never came online");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn outcome(status: StatusCode, v: Value) -> ProbeOutcome {
    assert_eq!(status, StatusCode::OK, "{v}");
    serde_json::from_value(v).unwrap()
}

#[tokio::test]
async fn probe_reports_rtt_and_path_in_plain_words() {
    let dir = tempfile::tempdir().unwrap();
    let server = Running::start(dir.path()).await;
    let laptop = server.enroll_fresh(1, "laptop").await;
    let db = server.enroll_fresh(2, "db-server").await;

    // Nobody connected yet: the asking node is offline.
    let (status, v) = server.probe("laptop", "db-server").await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("laptop is offline"),
        "{v}"
    );

    let (task, mut seen) = fake_node(
        &server,
        &laptop.node_secret,
        Box::new(|id, _| {
            Some(NodeMessage::ProbeResult {
                id,
                ok: true,
                rtt_ms: Some(3.2),
                path: Some("direct".into()),
                error: None,
            })
        }),
    )
    .await;
    wait_online(&server, "laptop").await;

    let (s, v) = server.probe("laptop", "db-server").await;
    let out = outcome(s, v);
    assert!(out.ok, "{out:?}");
    assert_eq!(out.path.as_deref(), Some("direct"));
    assert_eq!(out.rtt_ms, Some(3.2));
    assert_eq!(out.message, "laptop reached db-server in 3 ms, directly");
    // The node was asked to reach the target's overlay address.
    let (_, target) = seen.recv().await.unwrap();
    assert_eq!(target, db.ip);

    // A policy that stops ping: the path still works, and the answer says
    // the policy would stop a real ping.
    let (status, v) = server
        .api(
            reqwest::Method::PUT,
            "/policy",
            json!({ "text": "default = \"deny\"\n[[rules]]\nname = \"db\"\naction = \"allow\"\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\"tcp:5432\"]\n" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (s, v) = server.probe("laptop", "db-server").await;
    let out = outcome(s, v);
    assert!(out.ok);
    assert!(
        out.message.starts_with("laptop reached db-server in 3 ms, directly; note: the policy does not let laptop ping db-server"),
        "{}",
        out.message
    );

    // Bad requests say what is wrong.
    let (status, v) = server.probe("laptop", "laptop").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("two different"),
        "{v}"
    );
    let (status, v) = server.probe("laptop", "nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    assert!(v["error"].as_str().unwrap().contains("\"nope\""), "{v}");
    let (status, v) = server.probe("ghost", "laptop").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    let (status, v) = server.post_api("/nodes/laptop/probe", json!({})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");

    // The operation is in the OpenAPI document.
    let doc: Value = reqwest::Client::new()
        .get(format!("{}/api/v1/openapi.json", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        doc["paths"]["/api/v1/nodes/{name}/probe"]["post"].is_object(),
        "probe missing from the OpenAPI document"
    );
    assert!(doc["components"]["schemas"]["ProbeOutcome"].is_object());

    task.abort();
    server.stop().await;
}

#[tokio::test]
async fn probe_failures_are_sentences_and_foreign_answers_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let server = Running::start(dir.path()).await;
    let a = server.enroll_fresh(1, "a").await;
    let b = server.enroll_fresh(2, "b").await;
    server.enroll_fresh(3, "c").await;

    // a relays; b answers every probe with a failure.
    let (ta, _sa) = fake_node(
        &server,
        &a.node_secret,
        Box::new(|id, _| {
            Some(NodeMessage::ProbeResult {
                id,
                ok: true,
                rtt_ms: Some(0.4),
                path: Some("relay-udp".into()),
                error: None,
            })
        }),
    )
    .await;
    let (tb, _sb) = fake_node(
        &server,
        &b.node_secret,
        Box::new(|id, _| {
            Some(NodeMessage::ProbeResult {
                id,
                ok: false,
                rtt_ms: None,
                path: None,
                error: Some("no answer within 3 s".into()),
            })
        }),
    )
    .await;
    wait_online(&server, "a").await;
    wait_online(&server, "b").await;

    let (s, v) = server.probe("a", "b").await;
    let out = outcome(s, v);
    assert_eq!(
        out.message,
        "a reached b in less than 1 ms through the relay"
    );
    assert_eq!(out.path.as_deref(), Some("relay-udp"));

    // c is offline: the failure says so.
    let (s, v) = server.probe("b", "c").await;
    let out = outcome(s, v);
    assert!(!out.ok);
    assert_eq!(out.rtt_ms, None);
    assert_eq!(
        out.message,
        "b could not reach c: c is offline (no answer within 3 s)"
    );
    // a is online: just the node's reason.
    let (s, v) = server.probe("b", "a").await;
    let out = outcome(s, v);
    assert_eq!(out.message, "b could not reach a: no answer within 3 s");
    ta.abort();
    tb.abort();

    // d answers with a made-up id (and so never answers the real one): it
    // cannot complete anyone else's probe. The server gives up after 5 s.
    let d = server.enroll_fresh(4, "d").await;
    let (td, mut sd) = fake_node(
        &server,
        &d.node_secret,
        Box::new(|id, _| {
            Some(NodeMessage::ProbeResult {
                id: id + 1000,
                ok: true,
                rtt_ms: Some(1.0),
                path: Some("direct".into()),
                error: None,
            })
        }),
    )
    .await;
    wait_online(&server, "d").await;
    let started = Instant::now();
    let (s, v) = server.probe("d", "a").await;
    let out = outcome(s, v);
    assert!(!out.ok, "{out:?}");
    assert!(
        out.message
            .starts_with("d could not reach a: d did not answer within 5 s"),
        "{}",
        out.message
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(8),
        "{took:?}"
    );
    assert!(sd.recv().await.is_some(), "d was never asked");

    // A node that goes away while asked: the call ends at once, not after 5 s.
    let e = server.enroll_fresh(5, "e").await;
    let (te, _se) = fake_node(&server, &e.node_secret, Box::new(|_, _| None)).await;
    wait_online(&server, "e").await;
    let probe = server.probe("e", "d");
    let kill = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        te.abort();
    };
    let started = Instant::now();
    let ((s, v), ()) = tokio::join!(probe, kill);
    let out = outcome(s, v);
    assert!(!out.ok);
    assert!(out.message.contains("e disconnected"), "{}", out.message);
    assert!(started.elapsed() < Duration::from_secs(4));

    td.abort();
    server.stop().await;
}
