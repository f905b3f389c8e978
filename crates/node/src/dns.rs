//! The node's small resolver: answers `NODE.ACCOUNT.SUFFIX` (and the admin's
//! extra records) from the network map, and forwards every other name to the
//! resolvers the system used before.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::net::UdpSocket;
use trellis_proto::DnsConfig;

/// Answers are short-lived: a rename must show within seconds.
const TTL_SECS: u32 = 5;
const FORWARD_TIMEOUT: Duration = Duration::from_secs(3);

/// What to do with a query.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// Send these bytes back.
    Reply(Vec<u8>),
    /// Not ours: ask the upstream resolvers.
    Forward,
    /// Not a DNS query we can read: say nothing.
    Ignore,
}

fn fqdn(name: &Name) -> String {
    name.to_lowercase()
        .to_ascii()
        .trim_end_matches('.')
        .to_string()
}

/// Decides a query against the account's names (pure; no IO).
pub fn answer(cfg: &DnsConfig, query: &[u8]) -> Answer {
    let Ok(req) = Message::from_vec(query) else {
        return Answer::Ignore;
    };
    if req.metadata.message_type != MessageType::Query {
        return Answer::Ignore;
    }
    let Some(q) = req.queries.first() else {
        return Answer::Ignore;
    };
    let name = fqdn(&q.name);
    let domain = cfg.domain.to_ascii_lowercase();
    if name != domain && !name.ends_with(&format!(".{domain}")) {
        return Answer::Forward;
    }
    let mut resp = Message::new(req.metadata.id, MessageType::Response, req.metadata.op_code);
    resp.metadata.authoritative = true;
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.queries = req.queries.clone();
    let matching: Vec<IpAddr> = cfg
        .records
        .iter()
        .filter(|r| r.name.eq_ignore_ascii_case(&name))
        .map(|r| r.addr)
        .collect();
    if matching.is_empty() && name != domain {
        resp.metadata.response_code = ResponseCode::NXDomain;
    } else {
        for addr in matching {
            let rdata = match (q.query_type, addr) {
                (RecordType::A | RecordType::ANY, IpAddr::V4(v4)) => RData::A(A(v4)),
                (RecordType::AAAA | RecordType::ANY, IpAddr::V6(v6)) => RData::AAAA(AAAA(v6)),
                _ => continue,
            };
            resp.answers
                .push(Record::from_rdata(q.name.clone(), TTL_SECS, rdata));
        }
    }
    match resp.to_vec() {
        Ok(b) => Answer::Reply(b),
        Err(_) => Answer::Ignore,
    }
}

/// A SERVFAIL for a query we could not forward.
fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    let req = Message::from_vec(query).ok()?;
    let mut resp = Message::error_msg(
        req.metadata.id,
        req.metadata.op_code,
        ResponseCode::ServFail,
    );
    resp.queries = req.queries;
    resp.to_vec().ok()
}

/// Serves DNS on `socket` until the task is dropped.
pub async fn serve(
    socket: UdpSocket,
    cfg: Arc<RwLock<Option<DnsConfig>>>,
    upstreams: Vec<SocketAddr>,
) {
    let socket = Arc::new(socket);
    let upstreams = Arc::new(upstreams);
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "DNS receive error");
                continue;
            }
        };
        let query = buf[..n].to_vec();
        let decision = match cfg.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
            Some(c) => answer(c, &query),
            None => Answer::Forward,
        };
        match decision {
            Answer::Reply(b) => {
                let _ = socket.send_to(&b, from).await;
            }
            Answer::Ignore => {}
            Answer::Forward => {
                let socket = socket.clone();
                let upstreams = upstreams.clone();
                tokio::spawn(async move {
                    let reply = match forward(&query, &upstreams).await {
                        Some(r) => Some(r),
                        None => servfail(&query),
                    };
                    if let Some(r) = reply {
                        let _ = socket.send_to(&r, from).await;
                    }
                });
            }
        }
    }
}

/// Asks each upstream in turn; the first answer wins.
async fn forward(query: &[u8], upstreams: &[SocketAddr]) -> Option<Vec<u8>> {
    for up in upstreams {
        let bind: SocketAddr = if up.is_ipv4() {
            "0.0.0.0:0".parse().ok()?
        } else {
            "[::]:0".parse().ok()?
        };
        let Ok(s) = UdpSocket::bind(bind).await else {
            continue;
        };
        if s.send_to(query, up).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; 4096];
        match tokio::time::timeout(FORWARD_TIMEOUT, s.recv_from(&mut buf)).await {
            Ok(Ok((n, from))) if from == *up && n >= 2 && buf[..2] == query[..2] => {
                buf.truncate(n);
                return Some(buf);
            }
            _ => continue,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{OpCode, Query};
    use trellis_proto::DnsRecord;

    fn cfg() -> DnsConfig {
        DnsConfig {
            domain: "prod.mesh".into(),
            records: vec![
                DnsRecord {
                    name: "db.prod.mesh".into(),
                    addr: "100.64.0.3".parse().unwrap(),
                },
                DnsRecord {
                    name: "web.prod.mesh".into(),
                    addr: "100.64.0.4".parse().unwrap(),
                },
            ],
        }
    }

    fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.queries
            .push(Query::query(Name::from_ascii(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    fn reply(a: Answer) -> Message {
        match a {
            Answer::Reply(b) => Message::from_vec(&b).unwrap(),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    #[test]
    fn answers_own_names_case_insensitively() {
        let m = reply(answer(&cfg(), &query("DB.Prod.Mesh.", RecordType::A)));
        assert_eq!(m.metadata.id, 0x1234);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(m.answers.len(), 1);
        assert_eq!(
            m.answers[0].data,
            RData::A(A("100.64.0.3".parse().unwrap()))
        );
    }

    #[test]
    fn unknown_name_in_domain_is_nxdomain_and_aaaa_is_empty() {
        let m = reply(answer(&cfg(), &query("nope.prod.mesh.", RecordType::A)));
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        let m = reply(answer(&cfg(), &query("db.prod.mesh.", RecordType::AAAA)));
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
    }

    #[test]
    fn other_names_are_forwarded_and_garbage_ignored() {
        assert_eq!(
            answer(&cfg(), &query("example.org.", RecordType::A)),
            Answer::Forward
        );
        // A name of another account under the same suffix is not ours either.
        assert_eq!(
            answer(&cfg(), &query("db.other.mesh.", RecordType::A)),
            Answer::Forward
        );
        assert_eq!(answer(&cfg(), &[1, 2, 3]), Answer::Ignore);
    }

    #[tokio::test]
    async fn serves_and_forwards_over_real_udp() {
        // An "upstream" that answers every query with SERVFAIL-free empty replies.
        let upstream = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let up_addr = upstream.local_addr().unwrap();
        tokio::spawn(async move {
            let mut b = [0u8; 512];
            while let Ok((n, from)) = upstream.recv_from(&mut b).await {
                let req = Message::from_vec(&b[..n]).unwrap();
                let mut resp = Message::new(req.metadata.id, MessageType::Response, OpCode::Query);
                resp.queries = req.queries.clone();
                resp.answers.push(Record::from_rdata(
                    req.queries[0].name.clone(),
                    60,
                    RData::A(A("198.18.0.53".parse().unwrap())),
                ));
                upstream
                    .send_to(&resp.to_vec().unwrap(), from)
                    .await
                    .unwrap();
            }
        });
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let shared = Arc::new(RwLock::new(Some(cfg())));
        tokio::spawn(serve(sock, shared, vec![up_addr]));
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for (name, want) in [
            ("web.prod.mesh.", "100.64.0.4"),
            ("example.org.", "198.18.0.53"),
        ] {
            client
                .send_to(&query(name, RecordType::A), addr)
                .await
                .unwrap();
            let mut b = [0u8; 512];
            let (n, _) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut b))
                .await
                .unwrap()
                .unwrap();
            let m = Message::from_vec(&b[..n]).unwrap();
            assert_eq!(
                m.answers[0].data,
                RData::A(A(want.parse().unwrap())),
                "{name}"
            );
        }
    }
}
