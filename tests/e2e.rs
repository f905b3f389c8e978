//! End-to-end tests: real `trellis` server and agents in network namespaces
//! made by each test (see tests/harness/mod.rs for the rules).
//!
//! Needs root, /dev/net/tun and iproute2; otherwise each test prints
//! `SKIPPED: <why>` and passes — except with CI=true, where it fails.

mod harness;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use harness::*;

/// The server lab, with the helpers these tests share.
type Net = ServerLab;

impl ServerLab {
    fn token(&self, reusable: bool) -> String {
        self.lab.create_token(
            &self.srv,
            TokenOpts {
                reusable,
                ..Default::default()
            },
        )
    }

    /// New host + `trellis join` + wait until ready + echo listener.
    fn node(&mut self, name: &str, token: &str) -> Member {
        let h = self.new_host(name);
        let node = self.lab.join(&h, &self.srv, name, token, None);
        let st = self.lab.wait_ready(&node);
        self.lab.ensure(
            st.name.is_empty() || st.name == name,
            format!("status of {name} reports name {:?}", st.name),
        );
        let listener = self.lab.listen(&node);
        Member {
            ip: st.ip.expect("ready"),
            node,
            _listener: listener,
        }
    }

    fn must_reach(&self, probes: &[Probe], within: Duration, what: &str) {
        let fails = all_reach(probes, Instant::now() + within, Duration::from_secs(3));
        if !fails.is_empty() {
            self.lab.fail(&format!(
                "{what}: {} failed:\n  {}",
                fails.len(),
                fails.join("\n  ")
            ));
        }
    }
}

struct Member {
    node: Node,
    ip: Ipv4Addr,
    _listener: EchoListener,
}

fn pairs(ms: &[&Member]) -> Vec<Probe> {
    let v: Vec<(&Node, Ipv4Addr)> = ms.iter().map(|m| (&m.node, m.ip)).collect();
    pair_probes(&v)
}

/// One attempt per probe, in parallel; returns the probes that got through
/// (with the answering name).
fn any_reach(probes: &[Probe], timeout: Duration) -> Vec<String> {
    thread::scope(|sc| {
        let hs: Vec<_> = probes
            .iter()
            .map(|p| {
                sc.spawn(move || {
                    tcp_exchange(&p.from_ns, p.to_addr, 64 * 1024, timeout)
                        .ok()
                        .map(|name| {
                            format!("{} -> {} ({}) answered by {name}", p.from, p.to, p.to_addr)
                        })
                })
            })
            .collect();
        hs.into_iter()
            .filter_map(|h| h.join().ok().flatten())
            .collect()
    })
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

// ---------------------------------------------------------------------------
// Harness self-tests (no trellis binary needed)
// ---------------------------------------------------------------------------

#[test]
fn harness_selftest_underlay_tcp_and_cleanup() {
    if !require_privileges() {
        return;
    }
    let lab = Lab::new();
    let prefix = lab.prefix.clone();
    let dir = lab.dir().to_path_buf();
    let h1 = lab.host("h1", "198.18.0.1/24");
    let h2 = lab.host("h2", "198.18.0.2/24");
    let _l1 = lab.check(
        tcp_listen(&h1.ns, SocketAddr::from(([0, 0, 0, 0], APP_PORT)), "h1"),
        "listen h1",
    );
    let _l2 = lab.check(
        tcp_listen(&h2.ns, SocketAddr::from(([0, 0, 0, 0], APP_PORT)), "h2"),
        "listen h2",
    );
    let to2 = SocketAddr::from((h2.addr, APP_PORT));
    let to1 = SocketAddr::from((h1.addr, APP_PORT));
    let deadline = Instant::now() + Duration::from_secs(5);
    let n = lab.check(
        eventually(deadline, || {
            tcp_exchange(&h1.ns, to2, PAYLOAD, Duration::from_secs(2))
        }),
        "h1 -> h2 over the underlay",
    );
    assert_eq!(n, "h2");
    let n = lab.check(
        tcp_exchange(&h2.ns, to1, PAYLOAD, Duration::from_secs(2)),
        "h2 -> h1 over the underlay",
    );
    assert_eq!(n, "h1");
    // Nothing answers where there is no host.
    assert!(tcp_exchange(
        &h1.ns,
        SocketAddr::from(([198, 18, 0, 99], APP_PORT)),
        16,
        Duration::from_millis(500)
    )
    .is_err());
    // The lab's hosts are not reachable from the root namespace's view:
    // every name lives in lab namespaces.
    let mine = namespaces_with_prefix(&prefix);
    assert!(
        mine.len() >= 3,
        "expected sw,h1,h2 namespaces, got {mine:?}"
    );
    // A process in a host namespace sees only eth0 and lo.
    let out = lab.run(&h1.ns, "ip", &["-o", "link"], Duration::from_secs(5));
    assert!(out.success(), "{}", out.describe());
    assert_eq!(out.stdout.lines().count(), 2, "{}", out.stdout);
    let p = lab.spawn(&h2, "sleeper", "sleep", &["600"]);
    assert!(lab.is_running(p));
    drop(_l1);
    drop(_l2);
    drop(lab);
    let left = namespaces_with_prefix(&prefix);
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    assert!(!dir.exists(), "lab dir {} left behind", dir.display());
}

#[test]
fn harness_selftest_cleanup_on_panic() {
    if !require_privileges() {
        return;
    }
    let prefix = std::sync::Mutex::new(String::new());
    let r = std::panic::catch_unwind(|| {
        let lab = Lab::new();
        *prefix.lock().unwrap() = lab.prefix.clone();
        let h = lab.host("h1", "198.18.0.1/24");
        lab.spawn(&h, "sleeper", "sleep", &["600"]);
        lab.fail("intentional failure (harness self-test)");
    });
    assert!(r.is_err());
    let prefix = prefix.into_inner().unwrap();
    assert!(!prefix.is_empty());
    let left = namespaces_with_prefix(&prefix);
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
}

// ---------------------------------------------------------------------------
// 1. three nodes: full mesh
// ---------------------------------------------------------------------------

#[test]
fn three_nodes_full_mesh() {
    let Some(mut net) = Net::new() else { return };
    let tok = net.token(true);
    let a = net.node("n1", &tok);
    let b = net.node("n2", &tok);
    let c = net.node("n3", &tok);
    let lab = &net.lab;

    let ips = [a.ip, b.ip, c.ip];
    for (m, ip) in [&a, &b, &c].iter().zip(ips) {
        lab.ensure(
            in_net(ip, Ipv4Addr::new(100, 64, 0, 0), 16),
            format!(
                "{} got {ip}, outside the default account's 100.64.0.0/16",
                m.node.name
            ),
        );
        lab.ensure(
            ip != Ipv4Addr::new(100, 64, 0, 1),
            format!("{} got the reserved 100.64.0.1", m.node.name),
        );
    }
    lab.ensure(
        ips[0] != ips[1] && ips[1] != ips[2] && ips[0] != ips[2],
        format!("overlay IPs are not distinct: {ips:?}"),
    );

    net.must_reach(
        &pairs(&[&a, &b, &c]),
        Duration::from_secs(20),
        "full mesh of 3",
    );

    // Every node sees both others as direct peers that have carried traffic.
    for m in [&a, &b, &c] {
        let st = lab.check(lab.status(&m.node), "status");
        lab.ensure(
            st.name == m.node.name,
            format!("status name {:?} != {}", st.name, m.node.name),
        );
        let r = eventually(secs(5.0), || {
            let st = lab.status(&m.node)?;
            for other in [&a, &b, &c] {
                if other.node.name == m.node.name {
                    continue;
                }
                let p = st
                    .peers
                    .iter()
                    .find(|p| p.name == other.node.name || p.ip == Some(other.ip))
                    .ok_or_else(|| format!("{} not in peers: {}", other.node.name, st.raw))?;
                if p.path != "direct" {
                    return Err(format!(
                        "path to {} is {:?}: {}",
                        other.node.name, p.path, st.raw
                    ));
                }
                if p.rx_bytes == 0 || p.tx_bytes == 0 {
                    return Err(format!(
                        "no bytes counted with {}: {}",
                        other.node.name, st.raw
                    ));
                }
            }
            Ok(())
        });
        lab.check(r, &format!("status of {}", m.node.name));
    }

    let list = lab.nodes_list(&net.srv, &net.key, None);
    lab.ensure(
        list.len() == 3,
        format!("nodes list has {} entries: {list:?}", list.len()),
    );
    for m in [&a, &b, &c] {
        let e = list.iter().find(|e| e["name"] == m.node.name.as_str());
        let Some(e) = e else {
            lab.fail(&format!("{} missing from nodes list {list:?}", m.node.name));
        };
        lab.ensure(
            e["ip"].as_str().and_then(|s| s.split('/').next()) == Some(m.ip.to_string().as_str()),
            format!(
                "nodes list ip of {} is {} (status says {})",
                m.node.name, e["ip"], m.ip
            ),
        );
        lab.ensure(
            e["online"] == serde_json::Value::Bool(true),
            format!("{} not online in nodes list: {e}", m.node.name),
        );
        for k in ["last_seen", "public_key"] {
            lab.ensure(
                e.get(k).is_some(),
                format!("nodes list entry lacks {k}: {e}"),
            );
        }
    }
}

// ---------------------------------------------------------------------------
// 2. a late joiner is reachable within 2 s of having an IP
// ---------------------------------------------------------------------------

#[test]
fn late_joiner_reachable_within_2s() {
    let Some(mut net) = Net::new() else { return };
    let tok = net.token(true);
    let a = net.node("n1", &tok);
    let b = net.node("n2", &tok);
    let c = net.node("n3", &tok);
    net.must_reach(
        &pairs(&[&a, &b, &c]),
        Duration::from_secs(20),
        "initial mesh of 3",
    );

    let h = net.new_host("n4");
    let lab = &net.lab;
    // Listen before the agent starts so that only the mesh can be late.
    let node4 = lab.join(&h, &net.srv, "n4", &tok, None);
    let _l4 = lab.listen(&node4);
    let started = Instant::now();
    let (ip4, t0) = loop {
        if let Some(s) = lab.exited(node4.proc) {
            lab.fail(&format!("n4 agent exited: {s}"));
        }
        if let Ok(st) = lab.status(&node4) {
            if let Some(ip) = st.ip {
                break (ip, Instant::now());
            }
        }
        if started.elapsed() > Duration::from_secs(30) {
            lab.fail("n4 never showed an IP in `trellis status`");
        }
        thread::sleep(Duration::from_millis(50));
    };
    let mut probes = Vec::new();
    for m in [&a, &b, &c] {
        probes.push(Probe::new(&m.node, "n4", ip4));
        probes.push(Probe::new(&node4, &m.node.name, m.ip));
    }
    let fails = all_reach(
        &probes,
        t0 + Duration::from_secs(2),
        Duration::from_millis(1500),
    );
    if !fails.is_empty() {
        // Tell apart "slow" from "broken".
        let later = all_reach(
            &probes,
            Instant::now() + Duration::from_secs(15),
            Duration::from_secs(3),
        );
        lab.fail(&format!(
            "n4 ({ip4}) not fully reachable within 2 s of showing its IP:\n  {}\n(after 15 s more: {})",
            fails.join("\n  "),
            if later.is_empty() {
                "all reachable".to_string()
            } else {
                later.join("; ")
            }
        ));
    }
}

// ---------------------------------------------------------------------------
// 3. deleting a node cuts it off
// ---------------------------------------------------------------------------

#[test]
fn deleted_node_is_cut_off() {
    let Some(mut net) = Net::new() else { return };
    let tok = net.token(true);
    let a = net.node("n1", &tok);
    let b = net.node("n2", &tok);
    let mut c = net.node("victim", &tok);
    net.must_reach(
        &pairs(&[&a, &b, &c]),
        Duration::from_secs(20),
        "initial mesh of 3",
    );
    let lab = &net.lab;

    // Cut the victim off from the control plane first, so that it cannot
    // learn of its removal and tear itself down: what is tested is that the
    // OTHER nodes stop accepting its packets.
    lab.block_tcp(&c.node.host, net.srv.listen);
    // Control: with only the control plane blocked, the mesh still carries
    // the victim's traffic (so the checks below test the deletion).
    net.must_reach(
        &pairs(&[&a, &b, &c]),
        Duration::from_secs(5),
        "mesh with the victim's control connection blocked",
    );
    lab.nodes_delete(&net.srv, &net.key, "victim", None);
    let t0 = Instant::now();
    let cut_probes = vec![
        Probe::new(&c.node, "n1", a.ip),
        Probe::new(&c.node, "n2", b.ip),
        Probe::new(&a.node, "victim", c.ip),
        Probe::new(&b.node, "victim", c.ip),
    ];
    thread::sleep((t0 + Duration::from_secs(1)).saturating_duration_since(Instant::now()));
    let victim_alive = lab.is_running(c.node.proc);
    let through = any_reach(&cut_probes, Duration::from_millis(1500));
    lab.ensure(
        through.is_empty(),
        format!(
            "1 s after `nodes delete victim`, traffic still flows (victim agent running: {victim_alive}):\n  {}",
            through.join("\n  ")
        ),
    );
    eprintln!("victim agent still running while cut off from the server: {victim_alive}");
    net.must_reach(
        &pairs(&[&a, &b]),
        Duration::from_secs(5),
        "remaining nodes after delete",
    );

    let list = lab.nodes_list(&net.srv, &net.key, None);
    lab.ensure(
        !node_names(&list).contains("victim"),
        format!("deleted node still listed: {list:?}"),
    );

    // Once it can reach the server again, the victim's agent exits, or
    // reports its removal.
    lab.unblock_tcp(&c.node.host);
    let r = eventually(secs(30.0), || {
        if let Some(s) = lab.exited(c.node.proc) {
            return Ok(format!("agent exited ({s})"));
        }
        let sd = c.node.state_dir.to_string_lossy().into_owned();
        let out = lab.run(
            &c.node.host.ns,
            trellis_bin(),
            &["status", "--json", "--state-dir", &sd],
            Duration::from_secs(5),
        );
        let text = format!("{}{}", out.stdout, out.stderr).to_lowercase();
        if ["removed", "deleted", "revoked"]
            .iter()
            .any(|w| text.contains(w))
        {
            Ok(format!("status reports removal: {}", out.stdout.trim()))
        } else {
            thread::sleep(Duration::from_millis(400));
            Err(format!(
                "agent still running and status does not report removal:\n{}",
                out.describe()
            ))
        }
    });
    let how = lab.check(r, "victim agent after delete");
    eprintln!("victim: {how}");

    // Running join again with the same state dir does not bring it back.
    lab.restart_node(&mut c.node);
    thread::sleep(Duration::from_secs(5));
    let rejoin_exit = lab.exited(c.node.proc);
    eprintln!("victim re-join: exit status after 5 s = {rejoin_exit:?}");
    let through = any_reach(&cut_probes, Duration::from_millis(1500));
    lab.ensure(
        through.is_empty(),
        format!(
            "after re-running join with the deleted node's state dir, traffic flows:\n  {}",
            through.join("\n  ")
        ),
    );
    let list = lab.nodes_list(&net.srv, &net.key, None);
    lab.ensure(
        !node_names(&list).contains("victim"),
        format!("deleted node is back in the list after re-join: {list:?}"),
    );
    net.must_reach(
        &pairs(&[&a, &b]),
        Duration::from_secs(5),
        "remaining nodes after re-join attempt",
    );
}

// ---------------------------------------------------------------------------
// 4. restart keeps identity and IP
// ---------------------------------------------------------------------------

#[test]
fn node_restart_keeps_ip() {
    let Some(mut net) = Net::new() else { return };
    let tok = net.token(true);
    let a = net.node("n1", &tok);
    let mut b = net.node("n2", &tok);
    net.must_reach(&pairs(&[&a, &b]), Duration::from_secs(20), "initial pair");
    let lab = &net.lab;

    let before = lab.nodes_list(&net.srv, &net.key, None);
    let key_before = before
        .iter()
        .find(|e| e["name"] == "n2")
        .map(|e| e["public_key"].clone())
        .unwrap_or_else(|| lab.fail(&format!("n2 not in nodes list {before:?}")));

    lab.stop_node(&b.node);
    lab.restart_node(&mut b.node);
    let st = lab.wait_ready(&b.node);
    lab.ensure(
        st.ip == Some(b.ip),
        format!("n2 came back with ip {:?}, had {}", st.ip, b.ip),
    );
    net.must_reach(
        &pairs(&[&a, &b]),
        Duration::from_secs(15),
        "pair after n2 restart",
    );

    let after = lab.nodes_list(&net.srv, &net.key, None);
    lab.ensure(
        after.len() == 2,
        format!("restart created a new node entry: {after:?}"),
    );
    let key_after = after
        .iter()
        .find(|e| e["name"] == "n2")
        .map(|e| e["public_key"].clone());
    lab.ensure(
        key_after.as_ref() == Some(&key_before),
        format!("n2's public key changed across restart: {key_before} -> {key_after:?}"),
    );
}

// ---------------------------------------------------------------------------
// 5. the mesh survives a control-plane outage
// ---------------------------------------------------------------------------

#[test]
fn mesh_survives_server_outage() {
    let Some(mut net) = Net::new() else { return };
    let tok = net.token(true);
    let a = net.node("n1", &tok);
    let b = net.node("n2", &tok);
    net.must_reach(&pairs(&[&a, &b]), Duration::from_secs(20), "initial pair");

    net.lab.stop_server(&net.srv);
    net.must_reach(
        &pairs(&[&a, &b]),
        Duration::from_secs(5),
        "pair right after server stop",
    );
    thread::sleep(Duration::from_secs(5));
    net.must_reach(
        &pairs(&[&a, &b]),
        Duration::from_secs(5),
        "pair 5 s into the server outage",
    );

    let key_before = net.key.clone();
    let mut srv = net.srv.clone();
    net.lab.restart_server(&mut srv);
    net.srv = srv;
    net.lab.ensure(
        net.srv.admin_key() == key_before,
        "admin.key changed across a server restart",
    );
    let tok2 = net.token(false);
    let c = net.node("n3", &tok2);
    net.lab.ensure(
        c.ip != a.ip && c.ip != b.ip,
        format!(
            "new node got an IP already in use after server restart: {} (n1 {}, n2 {})",
            c.ip, a.ip, b.ip
        ),
    );
    net.must_reach(
        &pairs(&[&a, &b, &c]),
        Duration::from_secs(15),
        "mesh after server restart and a new join",
    );
}

// ---------------------------------------------------------------------------
// 6. accounts are isolated, even with the same address block
// ---------------------------------------------------------------------------

#[test]
fn accounts_are_isolated() {
    let Some(mut net) = Net::new() else { return };
    let blue_key = net.lab.create_account(&net.srv, "blue", None);
    let red_key = net
        .lab
        .create_account(&net.srv, "red", Some("100.64.0.0/16"));
    net.lab.ensure(
        blue_key != net.key && red_key != net.key && blue_key != red_key,
        "account keys are not distinct",
    );
    let tok_d = net.token(true);
    // Account key acting on its own account.
    let tok_b = net.lab.create_token(
        &net.srv,
        TokenOpts {
            reusable: true,
            api_key: Some(&blue_key),
            ..Default::default()
        },
    );
    // Operator key acting on a named account.
    let tok_r = net.lab.create_token(
        &net.srv,
        TokenOpts {
            reusable: true,
            account: Some("red"),
            ..Default::default()
        },
    );

    let d1 = net.node("d1", &tok_d);
    let d2 = net.node("d2", &tok_d);
    let r1 = net.node("r1", &tok_r);
    let r2 = net.node("r2", &tok_r);
    let b1 = net.node("b1", &tok_b);
    let lab = &net.lab;

    for m in [&d1, &d2, &r1, &r2] {
        lab.ensure(
            in_net(m.ip, Ipv4Addr::new(100, 64, 0, 0), 16),
            format!("{} got {} outside 100.64.0.0/16", m.node.name, m.ip),
        );
    }
    lab.ensure(
        in_net(b1.ip, Ipv4Addr::new(100, 65, 0, 0), 16),
        format!(
            "b1 got {} outside blue's expected block 100.65.0.0/16",
            b1.ip
        ),
    );
    let overlap = [d1.ip, d2.ip].iter().any(|ip| *ip == r1.ip || *ip == r2.ip);
    lab.ensure(
        overlap,
        format!(
            "default and red (same cidr) should hand out the same addresses: d1 {} d2 {} r1 {} r2 {}",
            d1.ip, d2.ip, r1.ip, r2.ip
        ),
    );

    net.must_reach(
        &pairs(&[&d1, &d2]),
        Duration::from_secs(20),
        "default account mesh",
    );
    net.must_reach(
        &pairs(&[&r1, &r2]),
        Duration::from_secs(20),
        "red account mesh",
    );

    let accounts: [(&str, Vec<&Member>); 3] = [
        ("default", vec![&d1, &d2]),
        ("red", vec![&r1, &r2]),
        ("blue", vec![&b1]),
    ];
    let all_ips: Vec<Ipv4Addr> = {
        let mut v: Vec<Ipv4Addr> = [&d1, &d2, &r1, &r2, &b1].iter().map(|m| m.ip).collect();
        v.sort();
        v.dedup();
        v
    };
    // For each node and each address in use anywhere: the connection lands on
    // the own account's node with that address, or nowhere.
    let mut must_land: Vec<Probe> = Vec::new();
    let mut must_fail: Vec<Probe> = Vec::new();
    for (_acct, members) in &accounts {
        for m in members {
            for ip in &all_ips {
                if *ip == m.ip {
                    continue;
                }
                match members.iter().find(|o| o.ip == *ip) {
                    Some(own) => must_land.push(Probe::new(&m.node, &own.node.name, *ip)),
                    None => must_fail.push(Probe::new(&m.node, "<nobody>", *ip)),
                }
            }
        }
    }
    eprintln!(
        "isolation: {} probes must land on the own account's node, {} must fail",
        must_land.len(),
        must_fail.len()
    );
    lab.ensure(!must_fail.is_empty(), "no cross-account probes were built");
    // Attempts are repeated to give a leak several chances to show.
    for round in 0..2 {
        let fails = all_reach(
            &must_land,
            Instant::now() + Duration::from_secs(10),
            Duration::from_secs(3),
        );
        lab.ensure(
            fails.is_empty(),
            format!(
                "round {round}: connections to same-numbered IPs must land on the own account's node:\n  {}",
                fails.join("\n  ")
            ),
        );
        let leaks = any_reach(&must_fail, Duration::from_secs(2));
        lab.ensure(
            leaks.is_empty(),
            format!(
                "round {round}: traffic crossed accounts:\n  {}",
                leaks.join("\n  ")
            ),
        );
    }

    // Each account's view lists only its own nodes; no foreign peers.
    let names = |list: &[serde_json::Value]| {
        let mut v: Vec<String> = node_names(list).into_iter().collect();
        v.sort();
        v
    };
    let dl = lab.nodes_list(&net.srv, &net.key, None);
    lab.ensure(names(&dl) == ["d1", "d2"], format!("default lists {dl:?}"));
    let rl = lab.nodes_list(&net.srv, &net.key, Some("red"));
    lab.ensure(names(&rl) == ["r1", "r2"], format!("red lists {rl:?}"));
    let bl = lab.nodes_list(&net.srv, &blue_key, None);
    lab.ensure(names(&bl) == ["b1"], format!("blue (own key) lists {bl:?}"));
    // An account key must not see another account.
    let out = lab.admin(
        &net.srv,
        &blue_key,
        &["nodes", "list", "--json", "--account", "default"],
    );
    lab.ensure(
        !out.success() || !(out.stdout.contains("\"d1\"") || out.stdout.contains("\"d2\"")),
        format!("blue's key can list default's nodes:\n{}", out.describe()),
    );
    let mut peers_seen: HashMap<String, Vec<String>> = HashMap::new();
    for (_acct, members) in &accounts {
        for m in members {
            let st = lab.check(lab.status(&m.node), &format!("status of {}", m.node.name));
            let own: Vec<&str> = members.iter().map(|o| o.node.name.as_str()).collect();
            let foreign: Vec<String> = st
                .peers
                .iter()
                .filter(|p| !own.contains(&p.name.as_str()))
                .map(|p| format!("{} {:?}", p.name, p.ip))
                .collect();
            lab.ensure(
                foreign.is_empty(),
                format!(
                    "{} has peers from other accounts: {foreign:?} ({})",
                    m.node.name, st.raw
                ),
            );
            peers_seen.insert(
                m.node.name.clone(),
                st.peers.iter().map(|p| p.name.clone()).collect(),
            );
        }
    }
    eprintln!("peers per node: {peers_seen:?}");
}

// ---------------------------------------------------------------------------
// 7. bad, used and expired tokens
// ---------------------------------------------------------------------------

#[test]
fn bad_tokens_are_rejected() {
    let Some(mut net) = Net::new() else { return };
    let url = net.srv.url.clone();
    let timeout = Duration::from_secs(30);

    let check_rejected = |net: &Net, what: &str, out: &harness::CmdOutput, sd: &Path| {
        let lab = &net.lab;
        lab.ensure(
            out.status.is_some(),
            format!(
                "{what}: join did not exit within {timeout:?}:\n{}",
                out.describe()
            ),
        );
        lab.ensure(
            !out.success(),
            format!("{what}: join exited 0:\n{}", out.describe()),
        );
        lab.ensure(
            out.stderr.to_lowercase().contains("token"),
            format!(
                "{what}: stderr has no clear message about the token:\n{}",
                out.describe()
            ),
        );
        lab.ensure(
            dir_is_empty_or_absent(sd),
            format!("{what}: state dir not empty afterwards: {:?}", list_dir(sd)),
        );
        eprintln!("{what}: rejected as expected: {}", out.stderr.trim());
    };

    // Garbage.
    let h = net.new_host("bad1");
    let sd = net.lab.path("bad1-state");
    let out = net
        .lab
        .join_once(&h, &url, "bad1", Some("not-a-token"), &sd, timeout);
    check_rejected(&net, "garbage token", &out, &sd);

    // A real token with its last character changed.
    let real = net.token(true);
    let mut forged = real.clone();
    let last = forged.pop().expect("token is empty");
    forged.push(if last == 'A' { 'B' } else { 'A' });
    let h = net.new_host("bad2");
    let sd = net.lab.path("bad2-state");
    let out = net
        .lab
        .join_once(&h, &url, "bad2", Some(&forged), &sd, timeout);
    check_rejected(&net, "forged token", &out, &sd);

    // Single-use token, used twice.
    let once = net.token(false);
    let ok = net.node("ok1", &once);
    let h = net.new_host("used");
    let sd = net.lab.path("used-state");
    let out = net
        .lab
        .join_once(&h, &url, "used", Some(&once), &sd, timeout);
    check_rejected(&net, "used single-use token", &out, &sd);

    // Expired token.
    let short = net.lab.create_token(
        &net.srv,
        TokenOpts {
            ttl: Some("1s"),
            ..Default::default()
        },
    );
    thread::sleep(Duration::from_secs(3));
    let h = net.new_host("expired");
    let sd = net.lab.path("expired-state");
    let out = net
        .lab
        .join_once(&h, &url, "expired", Some(&short), &sd, timeout);
    check_rejected(&net, "expired token", &out, &sd);

    // Nothing changed on the server.
    let list = net.lab.nodes_list(&net.srv, &net.key, None);
    let names = node_names(&list);
    net.lab.ensure(
        names.len() == 1 && names.contains("ok1"),
        format!("after rejected joins the node list should be just ok1: {list:?}"),
    );
    net.lab
        .ensure(net.lab.is_running(ok.node.proc), "ok1 agent died");
}

// ---------------------------------------------------------------------------
// "Test the connection": `trellis nodes probe FROM TO`
// ---------------------------------------------------------------------------

#[test]
fn nodes_probe_reports_direct_path_and_clear_errors() {
    let Some(mut net) = Net::new() else { return };
    let tok = net.token(true);
    let a = net.node("pa", &tok);
    let b = net.node("pb", &tok);
    let lab = &net.lab;

    // Once each knows the other (the map may still be on its way), probes
    // succeed: through the relay at first perhaps, then directly (the two
    // share a switch).
    let r = eventually(secs(15.0), || {
        let out = lab.admin(&net.srv, &net.key, &["nodes", "probe", "pa", "pb"]);
        let line = out.stdout.trim().to_string();
        if !out.success() {
            return Err(out.describe());
        }
        lab.ensure(
            line.starts_with("pa reached pb in ")
                && (line.ends_with(", directly") || line.contains("through the relay")),
            format!("unexpected probe output {line:?}"),
        );
        if line.ends_with(", directly") {
            Ok(line)
        } else {
            Err(format!("not direct yet: {line:?}"))
        }
    });
    lab.check(r, "probe pa -> pb, directly");
    // JSON carries the numbers; the other way works too.
    let out = lab.admin_ok(
        &net.srv,
        &net.key,
        &["nodes", "probe", "pb", "pa", "--json"],
    );
    let v: serde_json::Value = lab.check(serde_json::from_str(&out), "probe --json output");
    lab.ensure(
        v["ok"] == true && v["path"] == "direct" && v["rtt_ms"].as_f64().is_some_and(|r| r >= 0.0),
        format!("unexpected probe JSON {v}"),
    );

    // Each node reports its paths (every 5 s when they change): the list
    // shows each with the other one at `direct`. (Its handshake age is what
    // `trellis status` says, which may still be "none" here: not checked.)
    let r = eventually(secs(15.0), || {
        let list = lab.nodes_list(&net.srv, &net.key, None);
        for (me, peer) in [("pa", "pb"), ("pb", "pa")] {
            let n = list
                .iter()
                .find(|n| n["name"] == me)
                .ok_or_else(|| format!("{me} missing from {list:?}"))?;
            let p = n["peer_paths"]
                .as_array()
                .and_then(|a| a.iter().find(|p| p["name"] == peer))
                .ok_or_else(|| format!("{me} reports no path to {peer}: {n}"))?;
            if p["path"] != "direct" {
                return Err(format!("{me} -> {peer} not direct yet: {p}"));
            }
        }
        Ok(())
    });
    lab.check(r, "nodes list shows the direct paths both ways");

    // Unknown node, the same node twice: refused with a sentence, exit != 0.
    for (args, want) in [
        (
            ["nodes", "probe", "pa", "ghost"],
            "no device named \"ghost\"",
        ),
        (["nodes", "probe", "pa", "pa"], "two different devices"),
    ] {
        let out = lab.admin(&net.srv, &net.key, &args);
        lab.ensure(
            !out.success() && out.stderr.contains(want),
            format!(
                "expected a failure mentioning {want:?}:\n{}",
                out.describe()
            ),
        );
    }

    // The target's agent stops: the test fails and says why.
    lab.stop_node(&b.node);
    let out = lab.admin(&net.srv, &net.key, &["nodes", "probe", "pa", "pb"]);
    lab.ensure(
        !out.success()
            && out
                .stdout
                .trim()
                .starts_with("pa could not reach pb: pb is offline"),
        format!("probe to a stopped node:\n{}", out.describe()),
    );
    // Its report of paths went with its connection.
    let list = lab.nodes_list(&net.srv, &net.key, None);
    let pb = list.iter().find(|n| n["name"] == "pb");
    lab.ensure(
        pb.is_some_and(|n| n["online"] == false && n["peer_paths"] == serde_json::json!([])),
        format!("a stopped node still shows paths: {pb:?}"),
    );

    // The asking node's agent stops: refused at once.
    lab.stop_node(&a.node);
    let started = Instant::now();
    let out = lab.admin(&net.srv, &net.key, &["nodes", "probe", "pa", "pb"]);
    lab.ensure(
        !out.success() && out.stderr.contains("pa is offline"),
        format!("probe from a stopped node:\n{}", out.describe()),
    );
    lab.ensure(
        started.elapsed() < Duration::from_secs(3),
        format!("refusing took {:?}", started.elapsed()),
    );
}

// ---------------------------------------------------------------------------
// Packets of a flow arrive in the order they were sent, also while both of a
// node's packet threads read its TUN device (the receive side sends the
// kernel's answers itself), the kernel answers a flood of pings, and bursts
// move a's encryption to its second thread and back.
// ---------------------------------------------------------------------------

#[test]
fn packets_keep_their_order_while_the_kernel_answers() {
    let Some(mut net) = Net::new() else { return };
    let tok = net.token(true);
    let a = net.node("oa", &tok);
    let b = net.node("ob", &tok);
    net.must_reach(&pairs(&[&a, &b]), Duration::from_secs(20), "a and b");
    let lab = &net.lab;
    const COUNT: u32 = 4000;
    const PORT: u16 = 7007;

    // b echoes every datagram back and notes the order they came in.
    let b_ns = b.node.host.ns.clone();
    let echo = thread::spawn(move || -> Result<Vec<u32>, String> {
        enter_netns(&b_ns)?;
        let sock = std::net::UdpSocket::bind(("0.0.0.0", PORT)).map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(Duration::from_secs(3)))
            .map_err(|e| e.to_string())?;
        let mut seen = Vec::new();
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            seen.push(u32::from_be_bytes(buf[..4].try_into().unwrap()));
            let _ = sock.send_to(&buf[..n], from);
        }
        Ok(seen)
    });
    thread::sleep(Duration::from_millis(300));

    // Meanwhile a floods b with pings: b's kernel answers each one while it
    // is being written, and b's receive thread sends the answers.
    let a_ns = a.node.host.ns.clone();
    let b_ip = b.ip.to_string();
    let flood = {
        let (ns, ip) = (a_ns.clone(), b_ip.clone());
        thread::spawn(move || {
            std::process::Command::new("ip")
                .args([
                    "netns", "exec", &ns, "ping", "-n", "-q", "-f", "-c", "3000", &ip,
                ])
                .output()
        })
    };

    // a sends numbered datagrams in bursts and collects the echoes.
    let b_addr = SocketAddr::from((b.ip, PORT));
    let echoed = in_netns(&a_ns, move || -> Result<Vec<u32>, String> {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(Duration::from_millis(1)))
            .map_err(|e| e.to_string())?;
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        let mut payload = vec![0x5au8; 1000];
        for seq in 0..COUNT {
            payload[..4].copy_from_slice(&seq.to_be_bytes());
            sock.send_to(&payload, b_addr).map_err(|e| e.to_string())?;
            if seq % 50 == 49 {
                while let Ok((_, _)) = sock.recv_from(&mut buf) {
                    got.push(u32::from_be_bytes(buf[..4].try_into().unwrap()));
                }
            }
        }
        sock.set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        while let Ok((_, _)) = sock.recv_from(&mut buf) {
            got.push(u32::from_be_bytes(buf[..4].try_into().unwrap()));
        }
        Ok(got)
    });
    let echoed = lab.check(echoed, "sending from a");
    let seen = lab.check(
        echo.join()
            .map_err(|_| "echo thread panicked".to_string())
            .and_then(|r| r),
        "echo on b",
    );
    let flood = flood.join().expect("flood thread");
    let flood = lab.check(flood.map_err(|e| e.to_string()), "ping -f");
    let summary = String::from_utf8_lossy(&flood.stdout).to_string();

    for (what, seqs) in [("arriving at b", &seen), ("echoed back to a", &echoed)] {
        let out_of_order = seqs.windows(2).filter(|w| w[1] <= w[0]).count();
        lab.ensure(
            out_of_order == 0,
            format!(
                "{out_of_order} of {} datagrams {what} out of order",
                seqs.len()
            ),
        );
        // Order of nothing proves nothing: most of the stream must be there.
        lab.ensure(
            seqs.len() as u32 >= COUNT * 9 / 10,
            format!("only {} of {COUNT} datagrams {what}", seqs.len()),
        );
    }
    // "3000 packets transmitted, 2999 received, ..."
    let received = summary
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .and_then(|l| {
            l.split(|c: char| !c.is_ascii_digit())
                .filter_map(|w| w.parse::<u32>().ok())
                .nth(1)
        })
        .unwrap_or(0);
    lab.ensure(
        received >= 2970,
        format!("flood ping through the tunnel lost replies:\n{summary}"),
    );
    // The order held across hand-overs of a's TUN device: a burst hands it
    // to the second thread, and it comes back when the burst ends (a
    // hand-over happens only from the first thread, so two mean a return).
    let st = lab.check(lab.status(&a.node), "status of a");
    let handovers = st.raw["data_plane"]["tun_handovers"].as_u64();
    lab.ensure(
        handovers.is_some_and(|n| n >= 2),
        format!(
            "a's TUN device went to the second thread {handovers:?} times during the bursts (expected 2 or more); status: {}",
            st.raw["data_plane"]
        ),
    );
}
