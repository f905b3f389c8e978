//! What the agent changes on the machine beyond its TUN device, and puts
//! back when it stops: kernel routes for subnets behind mesh nodes, IP
//! forwarding and masquerading on a mesh node, and the system resolver.
//!
//! Routes and nftables go through the `ip` and `nft` commands (iproute2 and
//! nftables, present on every Linux this runs on); the resolver through
//! `resolvectl` where systemd-resolved manages `/etc/resolv.conf`, else by
//! editing the file in place (it may be a bind mount, as under
//! `ip netns exec`) with a backup in the state directory.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use ipnet::Ipv4Net;

fn run(cmd: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd} (is it installed?)"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn run_stdin(cmd: &str, args: &[&str], input: &str) -> anyhow::Result<()> {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd} (is it installed?)"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{cmd} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Metric of the routes the agent adds for subnets behind mesh nodes.
const ROUTE_METRIC: &str = "500";
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// Kernel routes into the tunnel for subnets behind other mesh nodes, and,
/// on a mesh node, forwarding and masquerading into its own subnets.
pub struct Routing {
    ifname: String,
    table: String,
    installed: BTreeSet<Ipv4Net>,
    served: Vec<Ipv4Net>,
    nat_installed: bool,
    forward_before: Option<String>,
}

impl Routing {
    pub fn new(ifname: &str) -> Routing {
        // nftables names: letters, digits, underscores.
        let table = format!(
            "trellis_{}",
            ifname.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        );
        Routing {
            ifname: ifname.to_string(),
            table,
            installed: BTreeSet::new(),
            served: Vec::new(),
            nat_installed: false,
            forward_before: None,
        }
    }

    /// Makes the subnets routed into the tunnel exactly `wanted`.
    pub fn set_peer_routes(&mut self, wanted: BTreeSet<Ipv4Net>) {
        for gone in self
            .installed
            .difference(&wanted)
            .copied()
            .collect::<Vec<_>>()
        {
            if let Err(e) = run(
                "ip",
                &[
                    "route",
                    "del",
                    &gone.to_string(),
                    "dev",
                    &self.ifname,
                    "metric",
                    ROUTE_METRIC,
                ],
            ) {
                tracing::debug!(error = %e, "removing a route");
            }
            self.installed.remove(&gone);
        }
        for new in wanted
            .difference(&self.installed)
            .copied()
            .collect::<Vec<_>>()
        {
            // A metric above the kernel's connected routes: a subnet this
            // machine is itself attached to keeps going out of that interface.
            match run(
                "ip",
                &[
                    "route",
                    "replace",
                    &new.to_string(),
                    "dev",
                    &self.ifname,
                    "metric",
                    ROUTE_METRIC,
                ],
            ) {
                Ok(()) => {
                    tracing::info!(route = %new, "routing a subnet behind a mesh node");
                    self.installed.insert(new);
                }
                Err(e) => tracing::warn!(error = %e, route = %new, "cannot add the route"),
            }
        }
    }

    /// On a mesh node: forwards traffic from the overlay into `served`, with
    /// masquerading unless `snat` is false.
    pub fn set_served(&mut self, served: Vec<Ipv4Net>, overlay: Ipv4Net, snat: bool) {
        if served == self.served {
            return;
        }
        self.served = served;
        self.remove_nat();
        if self.served.is_empty() {
            return;
        }
        if self.forward_before.is_none() {
            self.forward_before = fs::read_to_string(IP_FORWARD).ok();
        }
        if let Err(e) = fs::write(IP_FORWARD, "1\n") {
            tracing::warn!(error = %e, "cannot enable IP forwarding; subnet routing will not work");
        }
        tracing::info!(routes = ?self.served, snat, "forwarding into advertised subnets");
        if !snat {
            return;
        }
        let set: Vec<String> = self.served.iter().map(|n| n.to_string()).collect();
        let script = format!(
            "table ip {t} {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    ip saddr {overlay} ip daddr {{ {set} }} masquerade\n  }}\n}}\n",
            t = self.table,
            set = set.join(", ")
        );
        match run_stdin("nft", &["-f", "-"], &script) {
            Ok(()) => self.nat_installed = true,
            Err(e) => {
                tracing::warn!(error = %e, "cannot install masquerading for advertised subnets")
            }
        }
    }

    fn remove_nat(&mut self) {
        if self.nat_installed {
            if let Err(e) = run("nft", &["delete", "table", "ip", &self.table]) {
                tracing::debug!(error = %e, "removing the NAT table");
            }
            self.nat_installed = false;
        }
    }

    /// Puts everything back as it was.
    pub fn cleanup(&mut self) {
        self.set_peer_routes(BTreeSet::new());
        self.remove_nat();
        self.served.clear();
        if let Some(before) = self.forward_before.take() {
            let _ = fs::write(IP_FORWARD, before);
        }
    }
}

impl Drop for Routing {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// How the agent pointed the system at its resolver.
enum ResolverMode {
    /// systemd-resolved: per-link DNS for the account's domain only.
    Resolved,
    /// `/etc/resolv.conf` rewritten; the original bytes are kept.
    File { path: PathBuf, original: Vec<u8> },
}

/// The system resolver configuration, restored when dropped.
pub struct ResolverGuard {
    mode: ResolverMode,
    ifname: String,
    backup: PathBuf,
}

const RESOLV_CONF: &str = "/etc/resolv.conf";

fn uses_resolved(content: &str) -> bool {
    content
        .lines()
        .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["nameserver", "127.0.0.53"])
        && Path::new("/run/systemd/resolve").exists()
        && Command::new("resolvectl").arg("--version").output().is_ok()
}

/// Name servers listed in a resolv.conf, as upstreams for forwarding.
pub fn parse_nameservers(content: &str, except: IpAddr) -> Vec<SocketAddr> {
    content
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver"))
                .then(|| w.next())
                .flatten()
                .and_then(|a| a.parse::<IpAddr>().ok())
        })
        .filter(|a| *a != except)
        .map(|a| SocketAddr::new(a, 53))
        .collect()
}

/// The resolv.conf the agent writes: its resolver first, the old search
/// domains and options kept.
pub fn render_resolv_conf(original: &str, dns_ip: Ipv4Addr, domain: &str) -> String {
    let mut search: Vec<String> = vec![domain.to_string()];
    let mut options = Vec::new();
    for l in original.lines() {
        let mut w = l.split_whitespace();
        match w.next() {
            Some("search") | Some("domain") => {
                for d in w {
                    if !search.iter().any(|s| s == d) {
                        search.push(d.to_string());
                    }
                }
            }
            Some("options") => options.push(l.to_string()),
            _ => {}
        }
    }
    let mut out = String::from(
        "# Written by the trellis agent; the previous file is restored when it stops.\n",
    );
    out.push_str(&format!("nameserver {dns_ip}\n"));
    out.push_str(&format!("search {}\n", search.join(" ")));
    for o in options {
        out.push_str(&o);
        out.push('\n');
    }
    out
}

fn write_in_place(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    // Not write-and-rename: the file may be a bind mount (ip netns exec, containers).
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

impl ResolverGuard {
    /// Points the system at the agent's resolver on `dns_ip` for `domain`.
    /// Returns the guard and the resolvers to forward other names to.
    pub fn install(
        state_dir: &Path,
        ifname: &str,
        dns_ip: Ipv4Addr,
        domain: &str,
    ) -> anyhow::Result<(ResolverGuard, Vec<SocketAddr>)> {
        let backup = state_dir.join("resolv.conf.orig");
        // A backup left by an agent that crashed: put it back first.
        if let Ok(old) = fs::read(&backup) {
            write_in_place(Path::new(RESOLV_CONF), &old)?;
            let _ = fs::remove_file(&backup);
            tracing::info!("restored /etc/resolv.conf left behind by a previous run");
        }
        let original = fs::read(RESOLV_CONF).unwrap_or_default();
        let text = String::from_utf8_lossy(&original).into_owned();
        if uses_resolved(&text) {
            run("resolvectl", &["dns", ifname, &dns_ip.to_string()])?;
            run("resolvectl", &["domain", ifname, &format!("~{domain}")])?;
            tracing::info!(%domain, "systemd-resolved sends names under the domain to the agent");
            return Ok((
                ResolverGuard {
                    mode: ResolverMode::Resolved,
                    ifname: ifname.to_string(),
                    backup,
                },
                Vec::new(),
            ));
        }
        let upstreams = parse_nameservers(&text, IpAddr::V4(dns_ip));
        {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&backup)
                .with_context(|| format!("writing {}", backup.display()))?;
            f.write_all(&original)?;
            f.sync_all()?;
        }
        write_in_place(
            Path::new(RESOLV_CONF),
            render_resolv_conf(&text, dns_ip, domain).as_bytes(),
        )?;
        tracing::info!(%domain, upstreams = upstreams.len(), "resolv.conf points at the agent");
        Ok((
            ResolverGuard {
                mode: ResolverMode::File {
                    path: PathBuf::from(RESOLV_CONF),
                    original,
                },
                ifname: ifname.to_string(),
                backup,
            },
            upstreams,
        ))
    }

    fn restore(&mut self) {
        match &self.mode {
            ResolverMode::Resolved => {
                let _ = run("resolvectl", &["revert", &self.ifname]);
            }
            ResolverMode::File { path, original } => match write_in_place(path, original) {
                Ok(()) => {
                    let _ = fs::remove_file(&self.backup);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot restore /etc/resolv.conf; the original is in {}", self.backup.display())
                }
            },
        }
    }
}

impl Drop for ResolverGuard {
    fn drop(&mut self) {
        self.restore();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_keeps_search_and_options_and_forwards_to_old_servers() {
        let orig = "# comment\nnameserver 198.18.0.53\nnameserver 100.64.0.2\nsearch corp.example\noptions ndots:2\n";
        let ups = parse_nameservers(orig, "100.64.0.2".parse().unwrap());
        assert_eq!(ups, vec!["198.18.0.53:53".parse::<SocketAddr>().unwrap()]);
        let new = render_resolv_conf(orig, "100.64.0.2".parse().unwrap(), "prod.mesh");
        assert!(new.contains("nameserver 100.64.0.2\n"));
        assert!(!new.contains("198.18.0.53"));
        assert!(new.contains("search prod.mesh corp.example\n"));
        assert!(new.contains("options ndots:2\n"));
    }

    #[test]
    fn nft_table_names_are_safe() {
        assert_eq!(Routing::new("trellis0").table, "trellis_trellis0");
        assert_eq!(Routing::new("tr-x.1").table, "trellis_tr_x_1");
    }
}
