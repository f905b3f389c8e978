//! End-to-end tests of mesh nodes (subnet routes) and names (DNS): the real
//! `trellis` server and agents in network namespaces made by each test (see
//! tests/harness/mod.rs for the rules).
//!
//! Topology used by the subnet tests:
//!
//! ```text
//!   underlay switch 198.18.0.0/24            LAN switch 198.19.10.0/24
//!   server   198.18.0.1                      lanhost 198.19.10.5 (HTTP :8080, no Trellis)
//!   gw       198.18.0.11 ──── eth1 ───────── gw      198.19.10.1
//!   remote   198.18.0.12
//! ```
//!
//! Needs root, /dev/net/tun and iproute2; otherwise each test prints
//! `SKIPPED: <why>` and passes — except with CI=true, where it fails.

mod harness;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use harness::*;
use serde_json::Value;

const LAN_CIDR: &str = "198.19.10.0/24";
const LAN_HOST: Ipv4Addr = Ipv4Addr::new(198, 19, 10, 5);
const HTTP_PORT: u16 = 8080;
const OVERLAY: &str = "100.64.0.0/10";

fn lan_url() -> SocketAddr {
    SocketAddr::from((LAN_HOST, HTTP_PORT))
}

/// The server lab, with the helpers these tests share.
type Mesh = ServerLab;

impl ServerLab {
    fn token(&self, auto_approve: bool) -> String {
        self.lab.create_token(
            &self.srv,
            TokenOpts {
                reusable: true,
                routes_auto_approve: auto_approve,
                ..Default::default()
            },
        )
    }

    /// `trellis routes list --json` (default account).
    fn routes(&self) -> Vec<Value> {
        self.routes_raw().unwrap_or_else(|e| self.lab.fail(&e))
    }

    fn routes_raw(&self) -> Result<Vec<Value>, String> {
        let out = self
            .lab
            .admin(&self.srv, &self.key, &["routes", "list", "--json"]);
        if !out.success() {
            return Err(format!("routes list failed:\n{}", out.describe()));
        }
        match serde_json::from_str::<Value>(out.stdout.trim()) {
            Ok(Value::Array(a)) => Ok(a),
            other => Err(format!(
                "routes list --json is not a JSON array: {other:?}\n{}",
                out.stdout
            )),
        }
    }

    /// Waits until `routes list` has an entry (node, cidr) for which `pred`
    /// holds; returns it.
    fn wait_route(
        &self,
        node: &str,
        cidr: &str,
        within: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let r = eventually(Instant::now() + within, || {
            let list = self.routes_raw()?;
            match find_route(&list, node, cidr) {
                Some(e) if pred(e) => Ok(e.clone()),
                Some(e) => Err(format!("route entry is {e} (whole list: {list:?})")),
                None => Err(format!("no route {node} {cidr} in {list:?}")),
            }
        });
        match r {
            Ok(v) => v,
            Err(e) => self.lab.fail(&format!("{what}: {e}")),
        }
    }

    /// Joins `host` with `extra` flags and waits until the agent is ready.
    fn join(&self, host: &Host, name: &str, token: &str, extra: &[&str]) -> (Node, Ipv4Addr) {
        let node = self
            .lab
            .join_with(host, &self.srv, name, token, None, extra);
        let st = self.lab.wait_ready(&node);
        (node, st.ip.expect("ready"))
    }

    /// Everything that explains a routing failure: addresses, routes,
    /// nftables, forwarding, agent status, the server's route list.
    fn diag(&self, hosts: &[&Host], nodes: &[&Node]) -> String {
        let mut s = String::new();
        for h in hosts {
            s.push_str(&format!("----- {} ({}) -----\n", h.name, h.ns));
            for (prog, args) in [
                ("ip", vec!["-4", "-br", "addr"]),
                ("ip", vec!["-4", "route"]),
                ("cat", vec!["/proc/sys/net/ipv4/ip_forward"]),
                ("nft", vec!["list", "ruleset"]),
            ] {
                let out = self.lab.run(&h.ns, prog, &args, Duration::from_secs(10));
                s.push_str(&format!(
                    "$ {prog} {}\n{}{}\n",
                    args.join(" "),
                    out.stdout,
                    out.stderr
                ));
            }
        }
        for n in nodes {
            match self.lab.status(n) {
                Ok(st) => s.push_str(&format!("status {}: {}\n", n.name, st.raw)),
                Err(e) => s.push_str(&format!("status {}: {e}\n", n.name)),
            }
        }
        match self.routes_raw() {
            Ok(l) => s.push_str(&format!("routes list: {}\n", Value::Array(l))),
            Err(e) => s.push_str(&format!("routes list: {e}\n")),
        }
        s
    }

    fn fail_diag(&self, msg: &str, hosts: &[&Host], nodes: &[&Node]) -> ! {
        let d = self.diag(hosts, nodes);
        self.lab
            .fail(&format!("{msg}\n\n===== diagnostics =====\n{d}"))
    }
}

fn find_route<'a>(list: &'a [Value], node: &str, cidr: &str) -> Option<&'a Value> {
    list.iter()
        .find(|e| e["node"] == node && e["cidr"].as_str() == Some(cidr))
}

fn flag(e: &Value, k: &str) -> bool {
    e[k] == Value::Bool(true)
}

/// One HTTP GET of the LAN host from `ns`; returns the peer address the LAN
/// host saw.
fn fetch_peer(ns: &str, to: SocketAddr, timeout: Duration) -> Result<SocketAddr, String> {
    let (code, body) = http_get(ns, to, "/", timeout)?;
    if code != 200 {
        return Err(format!("HTTP {code}: {body:?}"));
    }
    http_body_peer(&body)
        .map(|(_, p)| p)
        .ok_or_else(|| format!("unexpected body {body:?}"))
}

fn peer_ip(p: SocketAddr) -> Ipv4Addr {
    match p.ip() {
        std::net::IpAddr::V4(a) => a,
        std::net::IpAddr::V6(a) => a.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED),
    }
}

/// The LAN side: a switch with a plain host serving HTTP on 198.19.10.5:8080.
struct Lan {
    sw: Switch,
    host: Host,
    web: HttpServer,
}

fn make_lan(lab: &Lab) -> Lan {
    let sw = lab.new_switch("lan");
    let host = lab.host_on(&sw, "lanhost", "198.19.10.5/24");
    let web = lab.check(
        http_serve(&host.ns, lan_url(), "lanhost"),
        "http server on lanhost",
    );
    Lan { sw, host, web }
}

/// Kernel route for the LAN on `host` (`ip -4 route show 198.19.10.0/24`).
fn lan_route(lab: &Lab, host: &Host) -> String {
    let out = lab.run(
        &host.ns,
        "ip",
        &["-4", "route", "show", LAN_CIDR],
        Duration::from_secs(10),
    );
    out.stdout.trim().to_string()
}

// ---------------------------------------------------------------------------
// 1. a mesh node routes its LAN after approval (masquerading)
// ---------------------------------------------------------------------------

#[test]
fn subnet_route_after_approval_with_snat() {
    let Some(mut m) = Mesh::new() else { return };
    let lan = make_lan(&m.lab);
    let gwh = m.new_host("gw");
    m.lab.attach(&gwh, &lan.sw, "eth1", "198.19.10.1/24");
    let remh = m.new_host("remote");
    let lab = &m.lab;

    // Control: the gateway host itself reaches the LAN host on the LAN.
    let p = lab.check(
        eventually(secs(5.0), || {
            fetch_peer(&gwh.ns, lan_url(), Duration::from_secs(2))
        }),
        "gw host -> lanhost over the LAN (no Trellis involved)",
    );
    lab.ensure(
        peer_ip(p) == Ipv4Addr::new(198, 19, 10, 1),
        format!("lanhost saw {p} for a direct fetch from gw"),
    );

    let tok = m.token(false);
    let (gw, gw_ip) = m.join(&gwh, "gw", &tok, &["--advertise-routes", LAN_CIDR]);
    let (rem, rem_ip) = m.join(&remh, "remote", &tok, &[]);
    let _lg = lab.listen(&gw);
    let _lr = lab.listen(&rem);
    let fails = all_reach(
        &pair_probes(&[(&gw, gw_ip), (&rem, rem_ip)]),
        Instant::now() + Duration::from_secs(20),
        Duration::from_secs(3),
    );
    if !fails.is_empty() {
        m.fail_diag(
            &format!("gw and remote do not reach each other over the overlay: {fails:?}"),
            &[&gwh, &remh],
            &[&gw, &rem],
        );
    }

    // The route is known to the server but not approved.
    let e = m.wait_route(
        "gw",
        LAN_CIDR,
        Duration::from_secs(10),
        "advertised route",
        |_| true,
    );
    lab.ensure(
        !flag(&e, "approved") && !flag(&e, "primary"),
        format!("route is approved/primary before `routes approve`: {e}"),
    );
    eprintln!("before approval: {e}");

    // Before approval: no kernel route on the remote, and no fetch.
    let r = lan_route(lab, &remh);
    lab.ensure(
        r.is_empty(),
        format!("remote has a route for {LAN_CIDR} before approval: {r:?}"),
    );
    // Even with a route into the tunnel forced by hand, nothing passes:
    // no peer is allowed to carry the subnet yet.
    lab.ip(&remh, &["route", "add", LAN_CIDR, "dev", "trellis0"]);
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        if let Ok(p) = fetch_peer(&remh.ns, lan_url(), Duration::from_millis(700)) {
            m.fail_diag(
                &format!(
                    "remote fetched http://{}/ before approval (lanhost saw {p})",
                    lan_url()
                ),
                &[&gwh, &remh, &lan.host],
                &[&gw, &rem],
            );
        }
        thread::sleep(Duration::from_millis(200));
    }
    lab.ip(&remh, &["route", "del", LAN_CIDR, "dev", "trellis0"]);
    lab.ensure(
        lan.web
            .seen()
            .iter()
            .all(|p| peer_ip(*p) == Ipv4Addr::new(198, 19, 10, 1)),
        format!(
            "lanhost got connections before approval: {:?}",
            lan.web.seen()
        ),
    );
    let seen_before = lan.web.seen().len();

    // Approve.
    lab.admin_ok(&m.srv, &m.key, &["routes", "approve", "gw", LAN_CIDR]);
    let t0 = Instant::now();
    let r = eventually(t0 + Duration::from_secs(5), || {
        fetch_peer(&remh.ns, lan_url(), Duration::from_secs(1))
    });
    let p = match r {
        Ok(p) => p,
        Err(e) => m.fail_diag(
            &format!(
                "remote cannot fetch http://{}/ within 5 s of `routes approve`: {e}",
                lan_url()
            ),
            &[&gwh, &remh, &lan.host],
            &[&gw, &rem],
        ),
    };
    eprintln!(
        "remote fetched the LAN host {:?} after `routes approve`; lanhost saw {p}",
        t0.elapsed()
    );
    lab.ensure(
        peer_ip(p) == Ipv4Addr::new(198, 19, 10, 1),
        format!("with SNAT the LAN host must see the mesh node's LAN address 198.19.10.1, saw {p}"),
    );
    lab.ensure(
        lan.web.seen().len() > seen_before,
        "the LAN host's server did not record the fetch",
    );
    // The flow logs show the fetch from both ends, through the mesh node.
    let lan_ip = LAN_HOST.to_string();
    let r = eventually(secs(15.0), || {
        let out = lab.admin(
            &m.srv,
            &m.key,
            &["logs", "flows", "--json", "--limit", "1000"],
        );
        let recs: Vec<Value> = out
            .stdout
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|f: &Value| f["dst_ip"] == lan_ip.as_str() && f["dst_port"] == HTTP_PORT)
            .collect();
        let by = |node: &str| recs.iter().find(|f| f["node"] == node).cloned();
        match (by("remote"), by("gw")) {
            (Some(a), Some(b)) => Ok((a, b)),
            _ => Err(format!("flow records to the LAN host so far: {recs:?}")),
        }
    });
    let (from_remote, at_gw) = lab.check(r, "flow records of the fetch through the mesh node");
    for f in [&from_remote, &at_gw] {
        lab.ensure(
            f["via"] == "gw" && f["decision"] == "allow" && f["src_node"] == "remote",
            format!("flow record of the subnet fetch: {f}"),
        );
    }

    let r = lan_route(lab, &remh);
    lab.ensure(
        r.contains("dev trellis0"),
        format!("remote's kernel route for {LAN_CIDR} is {r:?}, expected one via trellis0"),
    );
    eprintln!("remote: ip route show {LAN_CIDR}: {r}");
    // The mesh node itself does not route its own LAN into the tunnel.
    let r = lan_route(lab, &gwh);
    lab.ensure(
        !r.contains("trellis0"),
        format!("gw routes its own LAN into the tunnel: {r:?}"),
    );
    let fwd = lab.run(
        &gwh.ns,
        "cat",
        &["/proc/sys/net/ipv4/ip_forward"],
        Duration::from_secs(5),
    );
    lab.ensure(
        fwd.stdout.trim() == "1",
        format!("ip_forward on gw is {:?}", fwd.stdout.trim()),
    );

    let e = m.wait_route(
        "gw",
        LAN_CIDR,
        Duration::from_secs(5),
        "approved route",
        |e| flag(e, "approved") && flag(e, "primary") && flag(e, "online"),
    );
    eprintln!("after approval: {e}");

    // Several more fetches in a row, all through the mesh node.
    for i in 0..5 {
        let p = lab.check(
            fetch_peer(&remh.ns, lan_url(), Duration::from_secs(2)),
            &format!("fetch #{i} after approval"),
        );
        lab.ensure(
            peer_ip(p) == Ipv4Addr::new(198, 19, 10, 1),
            format!("fetch #{i}: saw {p}"),
        );
    }
}

// ---------------------------------------------------------------------------
// 2. --snat=false: the LAN sees overlay addresses, and reaches the overlay
// ---------------------------------------------------------------------------

#[test]
fn subnet_route_without_snat_both_ways() {
    let Some(mut m) = Mesh::new() else { return };
    let lan = make_lan(&m.lab);
    let gwh = m.new_host("gw");
    m.lab.attach(&gwh, &lan.sw, "eth1", "198.19.10.1/24");
    let remh = m.new_host("remote");
    // The LAN host sends the overlay back through the mesh node.
    m.lab
        .ip(&lan.host, &["route", "add", OVERLAY, "via", "198.19.10.1"]);
    let lab = &m.lab;

    let tok = m.token(false);
    let (gw, _gw_ip) = m.join(
        &gwh,
        "gw",
        &tok,
        &["--advertise-routes", LAN_CIDR, "--snat=false"],
    );
    let (rem, rem_ip) = m.join(&remh, "remote", &tok, &[]);
    let _lr = lab.listen(&rem);
    let rem_web = lab.check(
        http_serve(&remh.ns, SocketAddr::from(([0, 0, 0, 0], 8081)), "remote"),
        "http server on remote",
    );
    m.wait_route(
        "gw",
        LAN_CIDR,
        Duration::from_secs(10),
        "advertised route",
        |_| true,
    );
    lab.admin_ok(&m.srv, &m.key, &["routes", "approve", "gw", LAN_CIDR]);

    let t0 = Instant::now();
    let r = eventually(t0 + Duration::from_secs(10), || {
        fetch_peer(&remh.ns, lan_url(), Duration::from_secs(1))
    });
    let p = match r {
        Ok(p) => p,
        Err(e) => m.fail_diag(
            &format!(
                "remote cannot fetch http://{}/ after approval (--snat=false): {e}",
                lan_url()
            ),
            &[&gwh, &remh, &lan.host],
            &[&gw, &rem],
        ),
    };
    eprintln!(
        "remote -> LAN with --snat=false after {:?}: lanhost saw {p}",
        t0.elapsed()
    );
    if peer_ip(p) != rem_ip {
        m.fail_diag(
            &format!("with --snat=false the LAN host must see the remote's overlay address {rem_ip}, saw {p}"),
            &[&gwh],
            &[&gw],
        );
    }
    m.wait_route(
        "gw",
        LAN_CIDR,
        Duration::from_secs(5),
        "approved route",
        |e| flag(e, "approved") && flag(e, "primary"),
    );

    // The LAN host (no Trellis) reaches the remote's overlay IP through gw.
    let to = SocketAddr::from((rem_ip, APP_PORT));
    let r = eventually(secs(10.0), || {
        tcp_exchange(&lan.host.ns, to, PAYLOAD, Duration::from_secs(2))
    });
    match r {
        Ok(name) if name == "remote" => {}
        Ok(name) => lab.fail(&format!("lanhost -> {to} answered by {name:?}")),
        Err(e) => m.fail_diag(
            &format!("lanhost cannot reach the remote's overlay address {to} through gw: {e}"),
            &[&lan.host, &gwh, &remh],
            &[&gw, &rem],
        ),
    }
    let (code, body) = lab.check(
        http_get(
            &lan.host.ns,
            SocketAddr::from((rem_ip, 8081)),
            "/",
            Duration::from_secs(3),
        ),
        "lanhost -> remote HTTP over the overlay",
    );
    lab.ensure(code == 200, format!("HTTP {code}: {body}"));
    eprintln!(
        "lanhost -> remote {rem_ip}:8081: remote saw {:?}",
        rem_web.seen().last()
    );
}

// ---------------------------------------------------------------------------
// 3. two mesh nodes for one subnet: fail-over when the primary dies
// ---------------------------------------------------------------------------

#[test]
fn subnet_route_failover() {
    let Some(mut m) = Mesh::new() else { return };
    let lan = make_lan(&m.lab);
    let m1h = m.new_host("m1");
    m.lab.attach(&m1h, &lan.sw, "eth1", "198.19.10.1/24");
    let m2h = m.new_host("m2");
    m.lab.attach(&m2h, &lan.sw, "eth1", "198.19.10.2/24");
    let remh = m.new_host("remote");
    let m1_lan = Ipv4Addr::new(198, 19, 10, 1);
    let m2_lan = Ipv4Addr::new(198, 19, 10, 2);

    let tok = m.token(true);
    let (m1, _) = m.join(&m1h, "m1", &tok, &["--advertise-routes", LAN_CIDR]);
    let e = m.wait_route(
        "m1",
        LAN_CIDR,
        Duration::from_secs(10),
        "m1's auto-approved route",
        |e| flag(e, "approved") && flag(e, "primary"),
    );
    eprintln!("m1 alone: {e}");
    let (m2, _) = m.join(&m2h, "m2", &tok, &["--advertise-routes", LAN_CIDR]);
    let e2 = m.wait_route(
        "m2",
        LAN_CIDR,
        Duration::from_secs(10),
        "m2's auto-approved route",
        |e| flag(e, "approved"),
    );
    let list = m.routes();
    let e1 = find_route(&list, "m1", LAN_CIDR)
        .cloned()
        .unwrap_or_default();
    m.lab.ensure(
        flag(&e1, "primary") && !flag(&e2, "primary"),
        format!("m1 (approved first) must be primary, m2 not: {list:?}"),
    );
    let (rem, _) = m.join(&remh, "remote", &tok, &[]);
    let lab = &m.lab;

    let r = eventually(secs(15.0), || {
        fetch_peer(&remh.ns, lan_url(), Duration::from_secs(1))
    });
    let p = match r {
        Ok(p) => p,
        Err(e) => m.fail_diag(
            &format!("remote cannot fetch the LAN host through the primary: {e}"),
            &[&m1h, &m2h, &remh],
            &[&m1, &m2, &rem],
        ),
    };
    lab.ensure(
        peer_ip(p) == m1_lan,
        format!("before fail-over the LAN host must see m1 (198.19.10.1), saw {p}"),
    );

    // Continuous fetches from the remote: (time, Ok(peer) | Err).
    type Sample = (Instant, Result<SocketAddr, String>);
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let fetcher = {
        let (samples, stop, ns) = (samples.clone(), stop.clone(), remh.ns.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let r = fetch_peer(&ns, lan_url(), Duration::from_millis(800));
                let failed = r.is_err();
                samples.lock().unwrap().push((Instant::now(), r));
                thread::sleep(Duration::from_millis(if failed { 50 } else { 100 }));
            }
        })
    };
    thread::sleep(Duration::from_secs(3));
    // How the standby reaches the LAN right before the kill (it must be its
    // own eth1, never the tunnel).
    let m2_routes_before = lab
        .run(&m2h.ns, "ip", &["-4", "route"], Duration::from_secs(5))
        .stdout;
    eprintln!("m2 (standby) `ip -4 route` before the kill:\n{m2_routes_before}");
    lab.kill(m1.proc); // SIGKILL: a crash, no goodbye to the server
    let t_kill = Instant::now();
    eprintln!("SIGKILLed m1 (the primary)");
    // Wait for fetches via m2 (or 20 s), then a few more seconds of samples.
    let give_up = t_kill + Duration::from_secs(20);
    loop {
        let via_m2 = samples
            .lock()
            .unwrap()
            .iter()
            .any(|(t, r)| *t > t_kill && matches!(r, Ok(p) if peer_ip(*p) == m2_lan));
        if via_m2 || Instant::now() > give_up {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    let _ = fetcher.join();
    let samples = samples.lock().unwrap().clone();

    let before: Vec<&Sample> = samples.iter().filter(|(t, _)| *t <= t_kill).collect();
    let after: Vec<&Sample> = samples.iter().filter(|(t, _)| *t > t_kill).collect();
    let ok_before = before.iter().filter(|(_, r)| r.is_ok()).count();
    let last_ok_before = before
        .iter()
        .rev()
        .find(|(_, r)| r.is_ok())
        .map(|(t, _)| *t);
    let first_ok_after = after
        .iter()
        .find(|(_, r)| matches!(r, Ok(p) if peer_ip(*p) == m2_lan))
        .map(|(t, _)| *t);
    let errors_after: Vec<String> = after
        .iter()
        .filter_map(|(t, r)| {
            r.as_ref()
                .err()
                .map(|e| format!("+{:?}: {e}", t.duration_since(t_kill)))
        })
        .collect();
    let via_m1_after: Vec<String> = after
        .iter()
        .filter_map(|(t, r)| match r {
            Ok(p) if peer_ip(*p) == m1_lan => Some(format!("+{:?}", t.duration_since(t_kill))),
            _ => None,
        })
        .collect();
    lab.ensure(
        ok_before >= 5,
        format!("only {ok_before} fetches succeeded in the 3 s before the kill"),
    );
    let Some(first_ok_after) = first_ok_after else {
        let d = m.diag(&[&m2h, &remh], &[&m2, &rem]);
        // Diagnosis only (the test fails either way): does putting m2's own
        // LAN route back by hand make the fail-over work?
        let fix = lab.run(
            &m2h.ns,
            "ip",
            &[
                "route",
                "replace",
                LAN_CIDR,
                "dev",
                "eth1",
                "src",
                "198.19.10.2",
            ],
            Duration::from_secs(5),
        );
        let t_fix = Instant::now();
        let with_fix = eventually(secs(5.0), || {
            fetch_peer(&remh.ns, lan_url(), Duration::from_millis(800))
        });
        lab.fail(&format!(
            "no fetch through m2 within 20 s of killing m1; {} attempts after the kill, errors: {:?}\n\
             m2 (standby) `ip -4 route` right before the kill:\n{m2_routes_before}\n\
             diagnosis: after `ip route replace {LAN_CIDR} dev eth1` on m2 by hand ({}), \
             the remote's fetch gives {with_fix:?} after {:?}\n\n===== diagnostics (before that) =====\n{d}",
            after.len(),
            errors_after.iter().take(10).collect::<Vec<_>>(),
            if fix.success() { "ok" } else { "failed" },
            t_fix.elapsed(),
        ));
    };
    let gap_from_kill = first_ok_after.duration_since(t_kill);
    let outage = last_ok_before.map(|t| first_ok_after.duration_since(t));
    eprintln!(
        "FAIL-OVER: first fetch through m2 {:.2?} after SIGKILL of m1 (outage from the last good fetch: {:.2?}); \
         {} fetches before the kill, {} after ({} failed, {} still answered via m1's address)",
        gap_from_kill,
        outage,
        ok_before,
        after.len(),
        errors_after.len(),
        via_m1_after.len()
    );
    // Once through m2, it stays through m2.
    let later_failures: Vec<&String> = after
        .iter()
        .filter(|(t, _)| *t > first_ok_after)
        .filter_map(|(_, r)| r.as_ref().err())
        .collect();
    lab.ensure(
        gap_from_kill <= Duration::from_secs(10),
        format!("fail-over took {gap_from_kill:?} (> 10 s)"),
    );
    lab.ensure(
        later_failures.is_empty(),
        format!("fetches failed again after the fail-over: {later_failures:?}"),
    );

    // The server shows m2 as primary, m1 offline and not primary.
    let r = eventually(secs(10.0), || {
        let list = m.routes_raw()?;
        let a = find_route(&list, "m1", LAN_CIDR)
            .cloned()
            .unwrap_or_default();
        let b = find_route(&list, "m2", LAN_CIDR)
            .cloned()
            .unwrap_or_default();
        if flag(&b, "primary") && !flag(&a, "primary") && !flag(&a, "online") && flag(&b, "online")
        {
            Ok(list)
        } else {
            Err(format!("routes list: {list:?}"))
        }
    });
    let list = lab.check(r, "after fail-over m2 must be primary and m1 offline");
    eprintln!("routes list after fail-over: {}", Value::Array(list));
    lab.ensure(
        !lan_route(lab, &m2h).is_empty()
            && !m2_routes_before.contains(&format!("{LAN_CIDR} dev trellis0")),
        format!(
            "m2 routed its own LAN into the tunnel while standby:\n{m2_routes_before}\nnow: {}",
            lan_route(lab, &m2h)
        ),
    );
}

// ---------------------------------------------------------------------------
// 4. invalid --advertise-routes values are refused and store nothing
// ---------------------------------------------------------------------------

#[test]
fn invalid_advertise_routes_are_refused() {
    let Some(mut m) = Mesh::new() else { return };
    let tok = m.token(false);
    let url = m.srv.url.clone();
    let h = m.new_host("bad");
    let lab = &m.lab;
    let cases = [
        ("inside the overlay", "100.64.0.0/16", "100.64.0.0/16"),
        ("the whole overlay", "100.64.0.0/10", "100.64.0.0/10"),
        ("a supernet of the overlay", "100.0.0.0/8", "100.0.0.0/8"),
        ("host bits set", "198.19.10.5/24", "198.19.10.5/24"),
        ("default route", "0.0.0.0/0", "0.0.0.0/0"),
        ("garbage", "garbage", "garbage"),
        ("bad prefix length", "198.19.10.0/33", "198.19.10.0/33"),
        ("one bad in a list", "198.19.10.0/24,0.0.0.0/0", "0.0.0.0/0"),
    ];
    for (i, (what, value, culprit)) in cases.iter().enumerate() {
        let sd = lab.path(&format!("bad{i}-state"));
        let out = lab.join_once_with(
            &h,
            &url,
            &format!("bad{i}"),
            Some(&tok),
            &sd,
            Duration::from_secs(30),
            &["--advertise-routes", value],
        );
        lab.ensure(
            out.status.is_some(),
            format!("{what}: join did not exit within 30 s:\n{}", out.describe()),
        );
        lab.ensure(
            !out.success(),
            format!(
                "{what}: `--advertise-routes {value}` was accepted:\n{}",
                out.describe()
            ),
        );
        let err = out.stderr.to_lowercase();
        lab.ensure(
            err.contains(&culprit.to_lowercase()) || err.contains("route"),
            format!(
                "{what}: stderr does not say what is wrong (neither names {culprit:?} nor mentions routes):\n{}",
                out.describe()
            ),
        );
        lab.ensure(
            dir_is_empty_or_absent(&sd),
            format!(
                "{what}: state dir not empty afterwards: {:?}",
                list_dir(&sd)
            ),
        );
        // The agent never came up: no TUN device, no changed resolver.
        let links = lab.run(&h.ns, "ip", &["-o", "link"], Duration::from_secs(5));
        lab.ensure(
            !links.stdout.contains("trellis0"),
            format!(
                "{what}: trellis0 exists after a refused join:\n{}",
                links.stdout
            ),
        );
        lab.ensure(
            lab.resolv_conf(&h) == LAB_RESOLV_CONF.as_bytes(),
            format!("{what}: resolv.conf changed by a refused join"),
        );
        eprintln!(
            "{what} ({value}): refused: {}",
            out.stderr.trim().lines().last().unwrap_or_default()
        );
    }
    // Nothing was stored on the server.
    let nodes = lab.nodes_list(&m.srv, &m.key, None);
    lab.ensure(
        nodes.is_empty(),
        format!("refused joins left nodes: {nodes:?}"),
    );
    let routes = m.routes();
    lab.ensure(
        routes.is_empty(),
        format!("refused joins left routes: {routes:?}"),
    );

    // Control: the same token and host with a valid route join fine.
    let (good, _) = m.join(&h, "good", &tok, &["--advertise-routes", LAN_CIDR]);
    let e = m.wait_route(
        "good",
        LAN_CIDR,
        Duration::from_secs(10),
        "valid route",
        |_| true,
    );
    m.lab.ensure(
        !flag(&e, "approved"),
        format!("route approved without approval or auto-approve token: {e}"),
    );
    let routes = m.routes();
    m.lab.ensure(
        routes.len() == 1,
        format!("expected exactly the valid route, got {routes:?}"),
    );
    m.lab.ensure(
        m.lab.is_running(good.proc),
        "the valid mesh node's agent died",
    );
}

// ---------------------------------------------------------------------------
// 5. names: NODE.ACCOUNT.mesh, forwarding, dns add, rename, isolation, restore
// ---------------------------------------------------------------------------

const ORIG_RESOLV: &str = "nameserver 198.18.0.53\nsearch example.test\noptions ndots:1\n";

/// `getent hosts NAME` in `ns`: Ok(first address) or Err(description).
fn getent(lab: &Lab, ns: &str, name: &str) -> Result<String, String> {
    let t = Instant::now();
    let out = lab.run(ns, "getent", &["hosts", name], Duration::from_secs(15));
    if !out.success() {
        return Err(format!(
            "getent hosts {name} -> {:?} after {:?} {}",
            out.status.and_then(|s| s.code()),
            t.elapsed(),
            out.stderr.trim()
        ));
    }
    out.stdout
        .split_whitespace()
        .next()
        .map(str::to_string)
        .ok_or_else(|| format!("getent hosts {name}: empty output"))
}

fn must_resolve(lab: &Lab, ns: &str, name: &str, want: &str, within: Duration) -> Duration {
    let t0 = Instant::now();
    let r = eventually(t0 + within, || match getent(lab, ns, name) {
        Ok(a) if a == want => Ok(()),
        Ok(a) => Err(format!("getent hosts {name} -> {a}, want {want}")),
        Err(e) => Err(e),
    });
    lab.check(
        r,
        &format!("{name} must resolve to {want} in {ns} within {within:?}"),
    );
    t0.elapsed()
}

fn must_not_resolve(lab: &Lab, ns: &str, name: &str, what: &str) {
    if let Ok(a) = getent(lab, ns, name) {
        lab.fail(&format!("{what}: {name} resolves to {a} in {ns}"));
    }
}

#[test]
fn names_resolve_forward_rename_isolate_restore() {
    let Some(mut m) = Mesh::new() else { return };
    // The lab's upstream resolver: one fixed name, NXDOMAIN for the rest.
    let up = m.lab.host("dns", "198.18.0.53/24");
    let upstream = m.lab.check(
        dns_serve(
            &up.ns,
            SocketAddr::from(([198, 18, 0, 53], 53)),
            &[("plain.example.test", Ipv4Addr::new(198, 18, 0, 77))],
        ),
        "upstream DNS responder",
    );
    let n1h = m.new_host("n1");
    let n2h = m.new_host("n2");
    let b1h = m.new_host("b1");
    let n3h = m.new_host("n3");
    for h in [&n1h, &n2h, &b1h, &n3h] {
        m.lab.set_resolv_conf(h, ORIG_RESOLV.as_bytes());
    }
    // Control: the upstream answers directly (before any agent runs).
    must_resolve(
        &m.lab,
        &n1h.ns,
        "plain.example.test",
        "198.18.0.77",
        Duration::from_secs(5),
    );
    must_not_resolve(&m.lab, &n1h.ns, "nothing.example.test", "upstream control");

    let tok = m.token(false);
    let blue_key = m.lab.create_account(&m.srv, "blue", None);
    let btok = m.lab.create_token(
        &m.srv,
        TokenOpts {
            reusable: true,
            api_key: Some(&blue_key),
            ..Default::default()
        },
    );
    let (n1, n1_ip) = m.join(&n1h, "n1", &tok, &[]);
    let (n2, n2_ip) = m.join(&n2h, "n2", &tok, &[]);
    let (b1, b1_ip) = m.join(&b1h, "b1", &btok, &[]);
    let lab = &m.lab;
    let web = lab.check(
        http_serve(&n2h.ns, SocketAddr::from(([0, 0, 0, 0], 8081)), "n2"),
        "http server on n2",
    );

    // Each agent points its namespace's resolver at itself.
    for (h, ip, domain) in [
        (&n1h, n1_ip, "default.mesh"),
        (&n2h, n2_ip, "default.mesh"),
        (&b1h, b1_ip, "blue.mesh"),
    ] {
        let r = eventually(secs(15.0), || {
            let text = String::from_utf8_lossy(&lab.resolv_conf(h)).into_owned();
            let ns: Vec<&str> = text
                .lines()
                .filter_map(|l| l.strip_prefix("nameserver"))
                .map(str::trim)
                .collect();
            let search: Vec<&str> = text
                .lines()
                .find_map(|l| l.strip_prefix("search"))
                .map(|s| s.split_whitespace().collect())
                .unwrap_or_default();
            let ip_s = ip.to_string();
            if ns.first() != Some(&ip_s.as_str()) {
                return Err(format!("first nameserver is not {ip}: {text:?}"));
            }
            if search.first() != Some(&domain) || !search.contains(&"example.test") {
                return Err(format!(
                    "search is not `{domain} ... example.test`: {text:?}"
                ));
            }
            if !text.lines().any(|l| l.trim() == "options ndots:1") {
                return Err(format!("options ndots:1 was dropped: {text:?}"));
            }
            Ok(text)
        });
        let text = lab.check(r, &format!("resolv.conf of {}", h.name));
        eprintln!("resolv.conf of {} while the agent runs:\n{text}", h.name);
    }

    // Node names, own and other, full and short (search domain).
    let t = must_resolve(
        lab,
        &n1h.ns,
        "n2.default.mesh",
        &n2_ip.to_string(),
        Duration::from_secs(10),
    );
    eprintln!("n1: n2.default.mesh -> {n2_ip} (after {t:?})");
    must_resolve(
        lab,
        &n1h.ns,
        "n1.default.mesh",
        &n1_ip.to_string(),
        Duration::from_secs(5),
    );
    must_resolve(
        lab,
        &n2h.ns,
        "n1.default.mesh",
        &n1_ip.to_string(),
        Duration::from_secs(5),
    );
    must_resolve(
        lab,
        &n1h.ns,
        "N2.Default.Mesh",
        &n2_ip.to_string(),
        Duration::from_secs(5),
    );
    must_resolve(
        lab,
        &n1h.ns,
        "n2",
        &n2_ip.to_string(),
        Duration::from_secs(5),
    );
    must_not_resolve(lab, &n1h.ns, "nope.default.mesh", "unknown node");

    // Everything else is forwarded to the previous nameserver.
    let before = upstream.queries().len();
    let t = Instant::now();
    must_resolve(
        lab,
        &n1h.ns,
        "plain.example.test",
        "198.18.0.77",
        Duration::from_secs(5),
    );
    eprintln!(
        "n1: plain.example.test -> 198.18.0.77 via the agent ({:?})",
        t.elapsed()
    );
    lab.ensure(
        upstream.queries().len() > before,
        "plain.example.test resolved but the upstream saw no query",
    );
    must_not_resolve(lab, &n1h.ns, "nothing.example.test", "forwarded NXDOMAIN");
    must_resolve(
        lab,
        &b1h.ns,
        "plain.example.test",
        "198.18.0.77",
        Duration::from_secs(5),
    );

    // HTTP by name, with curl, over the overlay.
    let out = lab.run(
        &n1h.ns,
        "curl",
        &["-sS", "--max-time", "10", "http://n2.default.mesh:8081/"],
        Duration::from_secs(15),
    );
    lab.ensure(
        out.success() && out.stdout.contains("server=n2"),
        format!("curl by name failed:\n{}", out.describe()),
    );
    let seen = http_body_peer(&out.stdout).map(|(_, p)| p);
    lab.ensure(
        seen.map(peer_ip) == Some(n1_ip),
        format!("n2's HTTP server saw {seen:?}, expected n1's overlay address {n1_ip}"),
    );
    drop(web);

    // An extra record.
    lab.admin_ok(&m.srv, &m.key, &["dns", "add", "db.prod", "198.19.10.5"]);
    let t = must_resolve(
        lab,
        &n1h.ns,
        "db.prod.default.mesh",
        "198.19.10.5",
        Duration::from_secs(5),
    );
    eprintln!("dns add db.prod: resolves on n1 after {t:?}");
    must_resolve(
        lab,
        &n2h.ns,
        "db.prod.default.mesh",
        "198.19.10.5",
        Duration::from_secs(5),
    );

    // Rename: the new name within 2 s, the old one gone within 2 s.
    lab.admin_ok(&m.srv, &m.key, &["nodes", "rename", "n2", "web"]);
    let t0 = Instant::now();
    let new_ok = eventually(t0 + Duration::from_secs(2), || {
        match getent(lab, &n1h.ns, "web.default.mesh") {
            Ok(a) if a == n2_ip.to_string() => Ok(t0.elapsed()),
            Ok(a) => Err(format!("web.default.mesh -> {a}")),
            Err(e) => Err(e),
        }
    });
    let old_gone = eventually(t0 + Duration::from_secs(2), || {
        match getent(lab, &n1h.ns, "n2.default.mesh") {
            Ok(a) => Err(format!("n2.default.mesh still -> {a}")),
            Err(_) => Ok(t0.elapsed()),
        }
    });
    match (&new_ok, &old_gone) {
        (Ok(a), Ok(b)) => {
            eprintln!("rename n2 -> web: new name after {a:?}, old name gone after {b:?}")
        }
        _ => {
            // Tell apart "slow" from "broken".
            let later_new = getent(lab, &n1h.ns, "web.default.mesh");
            let later_old = getent(lab, &n1h.ns, "n2.default.mesh");
            thread::sleep(Duration::from_secs(10));
            let much_later_new = getent(lab, &n1h.ns, "web.default.mesh");
            let much_later_old = getent(lab, &n1h.ns, "n2.default.mesh");
            let nodes = lab.nodes_list(&m.srv, &m.key, None);
            lab.fail(&format!(
                "rename n2 -> web not reflected within 2 s: new {new_ok:?}, old gone {old_gone:?}; \
                 right after: web {later_new:?}, n2 {later_old:?}; 10 s later: web {much_later_new:?}, \
                 n2 {much_later_old:?}; nodes list {nodes:?}"
            ));
        }
    }
    must_resolve(
        lab,
        &n2h.ns,
        "web.default.mesh",
        &n2_ip.to_string(),
        Duration::from_secs(2),
    );

    // Accounts never see each other's names.
    must_resolve(
        lab,
        &b1h.ns,
        "b1.blue.mesh",
        &b1_ip.to_string(),
        Duration::from_secs(5),
    );
    for name in [
        "n1.default.mesh",
        "web.default.mesh",
        "db.prod.default.mesh",
    ] {
        must_not_resolve(
            lab,
            &b1h.ns,
            name,
            "blue node resolving a default-account name",
        );
    }
    must_not_resolve(lab, &b1h.ns, "db.prod", "blue node, search domain");
    must_not_resolve(
        lab,
        &n1h.ns,
        "b1.blue.mesh",
        "default node resolving a blue name",
    );
    eprintln!("upstream saw: {:?}", upstream.queries());

    // A node joined with --accept-dns=false keeps its resolver as it is,
    // but still has a name for the others.
    let (n3, n3_ip) = m.join(&n3h, "n3", &tok, &["--accept-dns=false"]);
    must_resolve(
        lab,
        &n1h.ns,
        "n3.default.mesh",
        &n3_ip.to_string(),
        Duration::from_secs(5),
    );
    thread::sleep(Duration::from_secs(1));
    lab.ensure(
        lab.resolv_conf(&n3h) == ORIG_RESOLV.as_bytes(),
        format!(
            "--accept-dns=false: n3's resolv.conf changed: {:?}",
            String::from_utf8_lossy(&lab.resolv_conf(&n3h))
        ),
    );

    // Stopping the agents (SIGTERM) puts resolv.conf back byte for byte.
    for (node, h) in [(&n1, &n1h), (&n2, &n2h), (&b1, &b1h), (&n3, &n3h)] {
        lab.stop_node(node);
        let now = lab.resolv_conf(h);
        lab.ensure(
            now == ORIG_RESOLV.as_bytes(),
            format!(
                "resolv.conf of {} after the agent stopped is {:?}, was {:?}",
                h.name,
                String::from_utf8_lossy(&now),
                ORIG_RESOLV
            ),
        );
    }
    must_resolve(
        lab,
        &n1h.ns,
        "plain.example.test",
        "198.18.0.77",
        Duration::from_secs(5),
    );
}

fn dir_is_empty_or_absent(p: &Path) -> bool {
    match std::fs::read_dir(p) {
        Ok(mut rd) => rd.next().is_none(),
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

fn list_dir(p: &Path) -> Vec<String> {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default()
}
