//! Paths to peers: a fake node on the control stream reports them, the API
//! shows them while the node is connected, and forgets them when it leaves.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use trellis_proto::{NodeMessage, PeerPath};

mod dash_support;
use dash_support::Running;

impl Running {
    /// The node `name` as GET /api/v1/nodes shows it.
    async fn node(&self, name: &str) -> Value {
        let nodes = self.nodes().await;
        nodes
            .iter()
            .find(|n| n["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no node {name} in {nodes:?}"))
    }

    /// Waits until the node `name` satisfies `ok`; its last state otherwise.
    async fn wait_node(&self, name: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n = self.node(name).await;
            if ok(&n) {
                return n;
            }
            assert!(Instant::now() < deadline, "{name}: {what}; last seen {n}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A fake node: says hello, then sends whatever text comes on the returned
/// channel, answering pings meanwhile. Dropping the sender closes the stream.
async fn fake_node(
    server: &Running,
    secret: &str,
) -> (mpsc::UnboundedSender<String>, JoinHandle<()>) {
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
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                out = rx.recv() => match out {
                    Some(t) => {
                        if ws.send(Message::Text(t.into())).await.is_err() {
                            return;
                        }
                    }
                    None => {
                        let _ = ws.close(None).await;
                        return;
                    }
                },
                m = ws.next() => match m {
                    Some(Ok(_)) => {}
                    _ => return,
                },
            }
        }
    });
    (tx, task)
}

fn report(peers: Vec<PeerPath>) -> String {
    serde_json::to_string(&NodeMessage::PeerPaths { peers }).unwrap()
}

fn path(name: &str, path: &str, hs: Option<u64>) -> PeerPath {
    PeerPath {
        name: name.into(),
        path: path.into(),
        last_handshake_secs: hs,
    }
}

#[tokio::test]
async fn peer_paths_show_while_connected_and_bad_reports_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Running::start(dir.path()).await;
    let laptop = server.enroll_fresh(1, "laptop").await;
    server.enroll_fresh(2, "db-server").await;
    server.enroll_fresh(3, "printer").await;

    // Offline, nothing reported: an empty list.
    let n = server.node("laptop").await;
    assert_eq!(n["peer_paths"], json!([]), "{n}");

    let (tx, task) = fake_node(&server, &laptop.node_secret).await;
    server
        .wait_node("laptop", "never came online", |n| n["online"] == true)
        .await;
    assert_eq!(server.node("laptop").await["peer_paths"], json!([]));

    tx.send(report(vec![
        path("printer", "none", None),
        path("db-server", "direct", Some(12)),
    ]))
    .unwrap();
    let n = server
        .wait_node("laptop", "report never shown", |n| {
            n["peer_paths"].as_array().is_some_and(|a| !a.is_empty())
        })
        .await;
    // Sorted by peer name; an absent handshake is left out.
    assert_eq!(
        n["peer_paths"],
        json!([
            {"name": "db-server", "path": "direct", "last_handshake_secs": 12},
            {"name": "printer", "path": "none"},
        ]),
        "{n}"
    );
    // The other nodes reported nothing.
    assert_eq!(server.node("db-server").await["peer_paths"], json!([]));

    // Malformed reports and a report naming too many peers are refused; the
    // last good report stays, and the stream lives on.
    tx.send(r#"{"type":"peer_paths","peers":[{"name":5}]}"#.into())
        .unwrap();
    tx.send(r#"{"type":"peer_paths","peers":"lots"}"#.into())
        .unwrap();
    let many: Vec<PeerPath> = (0..1001)
        .map(|i| path(&format!("p{i}"), "direct", Some(1)))
        .collect();
    tx.send(report(many)).unwrap();
    // None of them replaced the good report.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let n = server.node("laptop").await;
    assert_eq!(n["online"], true, "{n}");
    assert_eq!(n["peer_paths"].as_array().unwrap().len(), 2, "{n}");
    assert_eq!(n["peer_paths"][0]["name"], "db-server", "{n}");
    // Over-long strings are cut; the stream still takes reports.
    tx.send(report(vec![path(
        &"x".repeat(500),
        &"relay-udp".repeat(50),
        Some(3),
    )]))
    .unwrap();
    let n = server
        .wait_node("laptop", "the report after the bad ones never shown", |n| {
            n["peer_paths"][0]["last_handshake_secs"] == 3
        })
        .await;
    assert_eq!(n["online"], true, "{n}");
    let p = &n["peer_paths"][0];
    assert_eq!(p["name"].as_str().unwrap().len(), 64, "{p}");
    assert_eq!(p["path"].as_str().unwrap().len(), 64, "{p}");
    assert_eq!(n["peer_paths"].as_array().unwrap().len(), 1, "{n}");

    // Exactly 1,000 peers is fine.
    let thousand: Vec<PeerPath> = (0..1000)
        .map(|i| path(&format!("p{i:04}"), "relay-tcp", Some(7)))
        .collect();
    tx.send(report(thousand)).unwrap();
    server
        .wait_node("laptop", "1,000 peers never shown", |n| {
            n["peer_paths"].as_array().is_some_and(|a| a.len() == 1000)
        })
        .await;

    // Gone with the connection.
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    let n = server
        .wait_node("laptop", "never went offline", |n| n["online"] == false)
        .await;
    assert_eq!(n["peer_paths"], json!([]), "{n}");

    // A new connection starts with no report.
    let (tx, _task) = fake_node(&server, &laptop.node_secret).await;
    let n = server
        .wait_node("laptop", "never came back", |n| n["online"] == true)
        .await;
    assert_eq!(n["peer_paths"], json!([]), "{n}");
    drop(tx);

    server.stop().await;
}
