//! End-to-end test harness: isolated network labs made of Linux network
//! namespaces, plus helpers that drive the `trellis` binary through its CLI
//! contract (see DESIGN.md).
//!
//! Network rules (enforced by construction):
//! - every namespace, bridge and veth is created by the lab, inside
//!   namespaces it owns; nothing is ever created in, or attached to, the root
//!   namespace, so labs are fully isolated and may run in parallel with the
//!   same addresses;
//! - underlay addresses come from 198.18.0.0/15, overlay from 100.64.0.0/10;
//! - traffic helpers only talk to hosts inside the lab's namespaces;
//! - every namespace gets its own `/etc/netns/<ns>/resolv.conf` before any
//!   process starts in it, so `ip netns exec` shows that file as the
//!   namespace's `/etc/resolv.conf` and an agent that rewrites its resolver
//!   never touches the root namespace's file.
//!
//! Everything a lab creates (processes, namespaces, temp dirs) is released in
//! `Drop`, also while unwinding from a failed assertion; on such a panic the
//! tails of all process logs are printed.

#![allow(dead_code)]

use std::collections::HashSet;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `trellis` binary built by cargo for this test target.
pub fn trellis_bin() -> &'static str {
    env!("CARGO_BIN_EXE_trellis")
}

/// Port every test listener uses on the overlay.
pub const APP_PORT: u16 = 7000;
/// Size of the payload sent by [`tcp_exchange`] in the tests.
pub const PAYLOAD: usize = 256 * 1024;
/// Lines of each log shown when a test fails.
const LOG_TAIL_LINES: usize = 50;
/// How many labs may exist at once (the CI machine has 2 cores).
const MAX_LABS: usize = 2;

// ---------------------------------------------------------------------------
// Privileges
// ---------------------------------------------------------------------------

fn in_ci() -> bool {
    std::env::var("CI")
        .map(|v| v.eq_ignore_ascii_case("true") || v == "1")
        .unwrap_or(false)
}

/// Checks that this process can build network labs (root, /dev/net/tun,
/// `ip netns add`). Prints `SKIPPED: <why>` and returns false when it cannot,
/// except under `CI=true`, where skipping is a failure and this panics.
pub fn require_privileges() -> bool {
    static RESULT: Mutex<Option<Result<(), String>>> = Mutex::new(None);
    let res = {
        let mut g = RESULT.lock().unwrap_or_else(|e| e.into_inner());
        g.get_or_insert_with(probe_privileges).clone()
    };
    match res {
        Ok(()) => true,
        Err(why) => {
            if in_ci() {
                panic!("CI=true and the e2e tests cannot run: {why}");
            }
            println!("SKIPPED: {why}");
            eprintln!("SKIPPED: {why}");
            false
        }
    }
}

fn probe_privileges() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(format!(
            "end-to-end tests need root (network namespaces, TUN); running as uid {euid}"
        ));
    }
    if !Path::new("/dev/net/tun").exists() {
        return Err("/dev/net/tun is missing (no TUN support)".into());
    }
    let name = format!("tre-{}-probe", std::process::id());
    let out = Command::new("ip")
        .args(["netns", "add", &name])
        .output()
        .map_err(|e| format!("cannot run `ip` (iproute2 missing?): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`ip netns add` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let _ = Command::new("ip").args(["netns", "del", &name]).output();
    Ok(())
}

// ---------------------------------------------------------------------------
// Global lab bookkeeping: stale namespace cleanup, concurrency limit
// ---------------------------------------------------------------------------

static LAB_COUNTER: AtomicUsize = AtomicUsize::new(0);
static STALE_CLEANUP: Once = Once::new();
static SLOTS: (Mutex<usize>, Condvar) = (Mutex::new(0), Condvar::new());

struct LabPermit;

impl LabPermit {
    fn acquire() -> LabPermit {
        let (lock, cv) = &SLOTS;
        let mut used = lock.lock().unwrap_or_else(|e| e.into_inner());
        while *used >= MAX_LABS {
            used = cv.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += 1;
        LabPermit
    }
}

impl Drop for LabPermit {
    fn drop(&mut self) {
        let (lock, cv) = &SLOTS;
        let mut used = lock.lock().unwrap_or_else(|e| e.into_inner());
        *used -= 1;
        cv.notify_one();
    }
}

/// All namespace names currently present (`ip netns list`).
pub fn list_netns() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output();
    match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Deletes namespaces `tre-<pid>-*` left behind by test processes that no
/// longer exist (or by an earlier process that had our PID).
fn cleanup_stale_namespaces() {
    let me = std::process::id();
    for ns in list_netns() {
        let Some(rest) = ns.strip_prefix("tre-") else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let alive = Path::new(&format!("/proc/{pid}")).exists();
        if pid == me || !alive {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
    }
    // Per-namespace /etc files of dead test processes.
    if let Ok(rd) = fs::read_dir(NETNS_ETC) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix("tre-") else {
                continue;
            };
            let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if pid == me || !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Where `ip netns exec` finds per-namespace /etc files.
const NETNS_ETC: &str = "/etc/netns";

/// The resolv.conf every lab namespace starts with (a resolver address inside
/// the lab's underlay; nothing answers there unless a test starts one).
pub const LAB_RESOLV_CONF: &str =
    "# trellis e2e lab namespace (tests/harness)\nnameserver 198.18.0.53\n";

/// `/etc/netns/<ns>/resolv.conf`: what processes started with
/// `ip netns exec <ns>` see as `/etc/resolv.conf`.
pub fn netns_resolv_conf(ns: &str) -> PathBuf {
    Path::new(NETNS_ETC).join(ns).join("resolv.conf")
}

// ---------------------------------------------------------------------------
// Lab
// ---------------------------------------------------------------------------

/// A network namespace holding one host of the lab.
#[derive(Clone, Debug)]
pub struct Host {
    /// Short name given by the test ("server", "n1", ...).
    pub name: String,
    /// Namespace name (`tre-<pid>-<lab>-<name>`).
    pub ns: String,
    /// Underlay address on the lab switch.
    pub addr: Ipv4Addr,
}

/// A namespace holding the L2 switch (bridge `br0`).
#[derive(Clone, Debug)]
pub struct Switch {
    pub ns: String,
}

/// Handle to a process started by the lab.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcId(usize);

struct ProcEntry {
    label: String,
    log: PathBuf,
    child: Option<Child>,
    exit: Option<ExitStatus>,
}

#[derive(Default)]
struct LabState {
    namespaces: Vec<String>,
    procs: Vec<ProcEntry>,
    switch: Option<Switch>,
    veths: usize,
    cmds: usize,
}

/// Output of a finished one-shot command.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    pub cmdline: String,
    /// None when the command was killed after its timeout.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.status.map(|s| s.success()).unwrap_or(false)
    }
    pub fn describe(&self) -> String {
        format!(
            "`{}` -> {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmdline,
            match self.status {
                Some(s) => format!("{s}"),
                None => "TIMED OUT (killed)".into(),
            },
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

/// One isolated test topology. Owns its namespaces, processes and temp dir.
pub struct Lab {
    /// `tre-<pid>-<n>`; every namespace name starts with it.
    pub prefix: String,
    dir: PathBuf,
    state: Mutex<LabState>,
    failed: AtomicBool,
    _permit: LabPermit,
}

impl Lab {
    /// Creates an empty lab (waits while [`MAX_LABS`] labs exist).
    pub fn new() -> Lab {
        STALE_CLEANUP.call_once(cleanup_stale_namespaces);
        let permit = LabPermit::acquire();
        let n = LAB_COUNTER.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("tre-{}-{}", std::process::id(), n);
        let dir = std::env::temp_dir().join(format!("trellis-e2e-{prefix}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("logs")).expect("create lab dir");
        Lab {
            prefix,
            dir,
            state: Mutex::new(LabState::default()),
            failed: AtomicBool::new(false),
            _permit: permit,
        }
    }

    fn st(&self) -> std::sync::MutexGuard<'_, LabState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lab's temp dir (removed on drop).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A fresh path under the lab dir (not created).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn add_netns(&self, short: &str) -> String {
        let ns = format!("{}-{}", self.prefix, short);
        // The namespace's own resolv.conf exists before the namespace (and
        // so before any process in it): nothing started with
        // `ip netns exec` can ever see, or write, the root namespace's file.
        let rc = netns_resolv_conf(&ns);
        if let Some(d) = rc.parent() {
            fs::create_dir_all(d)
                .unwrap_or_else(|e| self.fail(&format!("create {}: {e}", d.display())));
        }
        self.st().namespaces.push(ns.clone());
        fs::write(&rc, LAB_RESOLV_CONF)
            .unwrap_or_else(|e| self.fail(&format!("write {}: {e}", rc.display())));
        sh(&["ip", "netns", "add", &ns]).unwrap_or_else(|e| self.fail(&e));
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]).unwrap_or_else(|e| self.fail(&e));
        ns
    }

    /// The lab's L2 switch: a namespace with a bridge `br0` (created once).
    pub fn switch(&self) -> Switch {
        if let Some(sw) = self.st().switch.clone() {
            return sw;
        }
        let ns = self.add_netns("sw");
        for args in [
            vec!["ip", "-n", &ns, "link", "add", "br0", "type", "bridge"],
            vec!["ip", "-n", &ns, "link", "set", "br0", "up"],
        ] {
            sh(&args).unwrap_or_else(|e| self.fail(&e));
        }
        let sw = Switch { ns };
        self.st().switch = Some(sw.clone());
        sw
    }

    /// A host namespace plugged into the lab switch with `addr` (CIDR form,
    /// from 198.18.0.0/15) on its `eth0`.
    pub fn host(&self, name: &str, cidr: &str) -> Host {
        let sw = self.switch();
        self.host_on(&sw, name, cidr)
    }

    /// Like [`Lab::host`] on a given switch.
    pub fn host_on(&self, sw: &Switch, name: &str, cidr: &str) -> Host {
        let addr: Ipv4Addr = cidr
            .split('/')
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("bad address {cidr}"));
        assert!(
            in_net(addr, Ipv4Addr::new(198, 18, 0, 0), 15),
            "underlay address {addr} is outside 198.18.0.0/15"
        );
        let ns = self.add_netns(name);
        let host = Host {
            name: name.to_string(),
            ns,
            addr,
        };
        self.attach(&host, sw, "eth0", cidr);
        host
    }

    /// Plugs `host` into `sw` with a new interface `ifname` carrying `cidr`
    /// (from 198.18.0.0/15): a second leg for a multi-homed host.
    pub fn attach(&self, host: &Host, sw: &Switch, ifname: &str, cidr: &str) {
        self.attach_ns(&host.ns, ifname, sw, cidr);
    }

    /// Runs `ip ARGS` inside `host`'s namespace (`ip -n`); fails the test
    /// on error.
    pub fn ip(&self, host: &Host, args: &[&str]) {
        let mut a = vec!["ip", "-n", host.ns.as_str()];
        a.extend_from_slice(args);
        sh(&a).unwrap_or_else(|e| self.fail(&e));
    }

    /// Replaces the namespace's resolv.conf (do it before starting the
    /// processes that should see it).
    pub fn set_resolv_conf(&self, host: &Host, content: &[u8]) {
        let p = netns_resolv_conf(&host.ns);
        fs::write(&p, content)
            .unwrap_or_else(|e| self.fail(&format!("write {}: {e}", p.display())));
    }

    /// The namespace's resolv.conf as processes in it see it now.
    pub fn resolv_conf(&self, host: &Host) -> Vec<u8> {
        let p = netns_resolv_conf(&host.ns);
        fs::read(&p).unwrap_or_else(|e| self.fail(&format!("read {}: {e}", p.display())))
    }

    /// Plugs a new interface `ifname` of namespace `ns` into switch `sw`
    /// with address `cidr` (a veth whose two ends are created directly
    /// inside their namespaces: no name ever exists in the root namespace).
    fn attach_ns(&self, ns: &str, ifname: &str, sw: &Switch, cidr: &str) {
        let addr: Ipv4Addr = cidr
            .split('/')
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("bad address {cidr}"));
        assert!(
            in_net(addr, Ipv4Addr::new(198, 18, 0, 0), 15),
            "underlay address {addr} is outside 198.18.0.0/15"
        );
        let port = {
            let mut st = self.st();
            st.veths += 1;
            format!("vp{}", st.veths)
        };
        let cmds: Vec<Vec<&str>> = vec![
            vec![
                "ip", "-n", ns, "link", "add", ifname, "type", "veth", "peer", "name", &port,
                "netns", &sw.ns,
            ],
            vec!["ip", "-n", &sw.ns, "link", "set", &port, "master", "br0"],
            vec!["ip", "-n", &sw.ns, "link", "set", &port, "up"],
            vec!["ip", "-n", ns, "addr", "add", cidr, "dev", ifname],
            vec!["ip", "-n", ns, "link", "set", ifname, "up"],
        ];
        for c in cmds {
            sh(&c).unwrap_or_else(|e| self.fail(&e));
        }
    }

    // -- processes ---------------------------------------------------------

    /// Starts `program args...` inside `host`'s namespace (via
    /// `ip netns exec`), stdout+stderr into `logs/<label>.log`.
    pub fn spawn(&self, host: &Host, label: &str, program: &str, args: &[&str]) -> ProcId {
        let log = {
            let st = self.st();
            let k = st.procs.iter().filter(|p| p.label == label).count();
            let file = if k == 0 {
                format!("{label}.log")
            } else {
                format!("{label}.{k}.log")
            };
            self.dir.join("logs").join(file)
        };
        let f = File::create(&log).expect("create log");
        let f2 = f.try_clone().expect("clone log fd");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &host.ns, program])
            .args(args)
            .env("RUST_BACKTRACE", "1")
            .env_remove("TRELLIS_TOKEN")
            .env_remove("TRELLIS_SERVER")
            .env_remove("TRELLIS_API_KEY")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(f2);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| self.fail(&format!("spawn {program} in {}: {e}", host.ns)));
        let mut st = self.st();
        st.procs.push(ProcEntry {
            label: label.to_string(),
            log,
            child: Some(child),
            exit: None,
        });
        ProcId(st.procs.len() - 1)
    }

    /// Exit status if the process has exited (non-blocking).
    pub fn exited(&self, id: ProcId) -> Option<ExitStatus> {
        let mut st = self.st();
        let p = &mut st.procs[id.0];
        if let Some(s) = p.exit {
            return Some(s);
        }
        if let Some(c) = p.child.as_mut() {
            if let Ok(Some(s)) = c.try_wait() {
                p.exit = Some(s);
                p.child = None;
                return Some(s);
            }
        }
        None
    }

    pub fn is_running(&self, id: ProcId) -> bool {
        self.exited(id).is_none()
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&self, id: ProcId, timeout: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(s) = self.exited(id) {
                return Some(s);
            }
            if Instant::now() >= end {
                return None;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal(&self, id: ProcId, sig: libc::c_int) {
        let st = self.st();
        if let Some(c) = st.procs[id.0].child.as_ref() {
            // SAFETY: kill(2) on a child we own and have not reaped yet.
            unsafe {
                libc::kill(c.id() as libc::pid_t, sig);
            }
        }
    }

    /// SIGTERM, wait up to 10 s, then SIGKILL. Returns the exit status and
    /// whether SIGKILL was needed.
    pub fn stop(&self, id: ProcId) -> (Option<ExitStatus>, bool) {
        if let Some(s) = self.exited(id) {
            return (Some(s), false);
        }
        self.signal(id, libc::SIGTERM);
        if let Some(s) = self.wait_exit(id, Duration::from_secs(10)) {
            return (Some(s), false);
        }
        eprintln!(
            "[harness] {} did not exit within 10 s of SIGTERM; sending SIGKILL",
            self.st().procs[id.0].label
        );
        self.signal(id, libc::SIGKILL);
        (self.wait_exit(id, Duration::from_secs(5)), true)
    }

    /// Sends SIGKILL (crash simulation) and reaps.
    pub fn kill(&self, id: ProcId) {
        self.signal(id, libc::SIGKILL);
        let _ = self.wait_exit(id, Duration::from_secs(5));
    }

    pub fn log_path(&self, id: ProcId) -> PathBuf {
        self.st().procs[id.0].log.clone()
    }

    pub fn log_of(&self, id: ProcId) -> String {
        fs::read_to_string(self.log_path(id)).unwrap_or_default()
    }

    /// Runs a one-shot command in `ns` (root namespace is never used) and
    /// waits for it, killing it after `timeout`.
    pub fn run(&self, ns: &str, program: &str, args: &[&str], timeout: Duration) -> CmdOutput {
        let k = {
            let mut st = self.st();
            st.cmds += 1;
            st.cmds
        };
        let cmddir = self.dir.join("cmds");
        let _ = fs::create_dir_all(&cmddir);
        let out_p = cmddir.join(format!("{k}.out"));
        let err_p = cmddir.join(format!("{k}.err"));
        let cmdline = format!("ip netns exec {ns} {program} {}", args.join(" "));
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, program])
            .args(args)
            .env("RUST_BACKTRACE", "1")
            .env_remove("TRELLIS_TOKEN")
            .env_remove("TRELLIS_SERVER")
            .env_remove("TRELLIS_API_KEY")
            .stdin(Stdio::null())
            .stdout(File::create(&out_p).expect("create out file"))
            .stderr(File::create(&err_p).expect("create err file"))
            .spawn()
            .unwrap_or_else(|e| self.fail(&format!("spawn `{cmdline}`: {e}")));
        let end = Instant::now() + timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() < end => thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
            }
        };
        let out = CmdOutput {
            cmdline,
            status,
            stdout: fs::read_to_string(&out_p).unwrap_or_default(),
            stderr: fs::read_to_string(&err_p).unwrap_or_default(),
        };
        // Keep a transcript of every command for failure reports.
        if let Ok(mut f) = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("logs").join("commands.log"))
        {
            let _ = writeln!(f, "{}\n", out.describe());
        }
        out
    }

    // -- failure reporting -------------------------------------------------

    /// The last [`LOG_TAIL_LINES`] lines of every log of the lab.
    pub fn log_tails(&self) -> String {
        let mut s = String::new();
        let mut files: Vec<PathBuf> = fs::read_dir(self.dir.join("logs"))
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.sort();
        for f in files {
            let text = fs::read_to_string(&f).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(LOG_TAIL_LINES);
            let _ = writeln!(
                s,
                "===== {} (last {} of {} lines) =====",
                f.file_name().unwrap_or_default().to_string_lossy(),
                lines.len() - start,
                lines.len()
            );
            for l in &lines[start..] {
                let _ = writeln!(s, "{l}");
            }
        }
        s
    }

    /// Panics with `msg` followed by the tails of all logs.
    pub fn fail(&self, msg: &str) -> ! {
        self.failed.store(true, Ordering::SeqCst);
        panic!("{msg}\n\n{}", self.log_tails());
    }

    /// Unwraps `r` or fails the test with the error, `ctx` and the logs.
    pub fn check<T, E: std::fmt::Display>(&self, r: Result<T, E>, ctx: &str) -> T {
        match r {
            Ok(v) => v,
            Err(e) => self.fail(&format!("{ctx}: {e}")),
        }
    }

    /// Asserts `cond` or fails with `msg` and the logs.
    pub fn ensure(&self, cond: bool, msg: impl AsRef<str>) {
        if !cond {
            self.fail(msg.as_ref());
        }
    }
}

impl Default for Lab {
    fn default() -> Self {
        Lab::new()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if thread::panicking() && !self.failed.load(Ordering::SeqCst) {
            eprintln!(
                "[harness] test panicked; logs of lab {}:\n{}",
                self.prefix,
                self.log_tails()
            );
        }
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // SIGTERM everyone, give them ~2 s, then SIGKILL the rest.
        for p in st.procs.iter_mut() {
            if let Some(c) = p.child.as_mut() {
                if let Ok(None) = c.try_wait() {
                    // SAFETY: signalling our own unreaped child.
                    unsafe {
                        libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
                    }
                }
            }
        }
        let end = Instant::now() + Duration::from_secs(2);
        loop {
            let mut alive = false;
            for p in st.procs.iter_mut() {
                if let Some(c) = p.child.as_mut() {
                    match c.try_wait() {
                        Ok(Some(_)) | Err(_) => p.child = None,
                        Ok(None) => alive = true,
                    }
                }
            }
            if !alive || Instant::now() >= end {
                break;
            }
            thread::sleep(Duration::from_millis(25));
        }
        for p in st.procs.iter_mut() {
            if let Some(mut c) = p.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        // Processes the lab did not start itself but that run in its
        // namespaces (agents an install script detached, a browser started
        // by a driver): SIGTERM, ~2 s, SIGKILL.
        kill_netns_procs(&st.namespaces);
        for ns in st.namespaces.drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
            let _ = fs::remove_dir_all(Path::new(NETNS_ETC).join(&ns));
        }
        if std::env::var_os("TRELLIS_E2E_KEEP").is_some() {
            eprintln!("[harness] keeping {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Pids of the processes in namespace `ns` (`ip netns pids`), never this one.
pub fn netns_pids(ns: &str) -> Vec<libc::pid_t> {
    let me = std::process::id() as libc::pid_t;
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .filter(|p| *p != me)
                .collect()
        })
        .unwrap_or_default()
}

/// Ends every process left in the namespaces `nss`: SIGTERM, up to 2 s,
/// then SIGKILL.
fn kill_netns_procs(nss: &[String]) {
    let signal_all = |sig: libc::c_int| {
        let mut any = false;
        for ns in nss {
            for pid in netns_pids(ns) {
                any = true;
                // SAFETY: kill has no memory-safety preconditions; the pid is
                // a process inside a namespace this lab created.
                unsafe {
                    libc::kill(pid, sig);
                }
            }
        }
        any
    };
    if !signal_all(libc::SIGTERM) {
        return;
    }
    let end = Instant::now() + Duration::from_secs(2);
    while Instant::now() < end {
        thread::sleep(Duration::from_millis(50));
        if nss.iter().all(|ns| netns_pids(ns).is_empty()) {
            return;
        }
    }
    signal_all(libc::SIGKILL);
}

/// Runs a command in the root namespace that only manipulates lab-owned
/// namespaces (`ip netns add/del`, `ip -n <ns> ...`).
fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("`{}`: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

pub fn in_net(a: Ipv4Addr, net: Ipv4Addr, len: u32) -> bool {
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    (u32::from(a) & mask) == (u32::from(net) & mask)
}

// ---------------------------------------------------------------------------
// Running code inside a namespace (thread-local setns)
// ---------------------------------------------------------------------------

/// Runs `f` on a fresh thread that has entered namespace `ns` (setns only
/// affects the calling thread; sockets keep the namespace they were made in).
pub fn in_netns<T, F>(ns: &str, f: F) -> Result<T, String>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, String> + Send + 'static,
{
    let ns = ns.to_string();
    thread::Builder::new()
        .name(format!("netns-{ns}"))
        .spawn(move || {
            enter_netns(&ns)?;
            f()
        })
        .map_err(|e| format!("spawn thread: {e}"))?
        .join()
        .map_err(|_| "thread in namespace panicked".to_string())?
}

/// Moves the calling thread into namespace `ns` (for good: use a thread of
/// its own).
pub fn enter_netns(ns: &str) -> Result<(), String> {
    let path = format!("/var/run/netns/{ns}");
    let f = File::open(&path).map_err(|e| format!("open {path}: {e}"))?;
    // SAFETY: valid fd of a netns file; affects only this thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(format!(
            "setns({path}): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Polls `f` every 100 ms until it returns Ok or `deadline` passes; returns
/// the last error then. `f` is always tried at least once.
pub fn eventually<T>(
    deadline: Instant,
    mut f: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) => {
                if Instant::now() >= deadline {
                    return Err(e);
                }
            }
        }
        thread::sleep(Duration::from_millis(100));
    }
}

pub fn secs(s: f64) -> Instant {
    Instant::now() + Duration::from_secs_f64(s)
}

// ---------------------------------------------------------------------------
// TCP traffic helpers
// ---------------------------------------------------------------------------
//
// Protocol: client sends u32 length + payload; the listener reads it all and
// answers u32 name length + its name + u32 length + payload with every byte
// XOR 0xA5 and the order reversed. The client checks the transform, so data
// must have flowed both ways intact.

fn transform(data: &[u8]) -> Vec<u8> {
    data.iter().rev().map(|b| b ^ 0xA5).collect()
}

/// A TCP listener inside a namespace answering the exchange protocol with
/// its `name`. Stops when dropped.
pub struct EchoListener {
    pub addr: SocketAddr,
    pub name: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub accepted: Arc<AtomicUsize>,
}

impl Drop for EchoListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Binds `addr` inside `ns` (e.g. 0.0.0.0:7000) and serves the exchange
/// protocol, answering with `name`.
pub fn tcp_listen(ns: &str, addr: SocketAddr, name: &str) -> Result<EchoListener, String> {
    let l = in_netns(ns, move || {
        TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))
    })?;
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicUsize::new(0));
    let (stop2, acc2, name2) = (stop.clone(), accepted.clone(), name.to_string());
    let thread = thread::spawn(move || {
        while !stop2.load(Ordering::SeqCst) {
            match l.accept() {
                Ok((s, _)) => {
                    acc2.fetch_add(1, Ordering::SeqCst);
                    let n = name2.clone();
                    thread::spawn(move || {
                        let _ = serve_conn(s, &n);
                    });
                }
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
    });
    Ok(EchoListener {
        addr,
        name: name.to_string(),
        stop,
        thread: Some(thread),
        accepted,
    })
}

fn serve_conn(mut s: TcpStream, name: &str) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.set_write_timeout(Some(Duration::from_secs(20)))?;
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let n = u32::from_be_bytes(len) as usize;
    if n > 64 << 20 {
        return Ok(());
    }
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf)?;
    let mut out = Vec::with_capacity(n + name.len() + 8);
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&(n as u32).to_be_bytes());
    out.extend_from_slice(&transform(&buf));
    s.write_all(&out)?;
    s.flush()?;
    let _ = s.shutdown(Shutdown::Write);
    Ok(())
}

/// From namespace `ns_from`, connects to `to` (timeout `timeout` for connect
/// and each read/write), sends `size` bytes and checks the transformed
/// answer. Returns the name the listener answered with.
pub fn tcp_exchange(
    ns_from: &str,
    to: SocketAddr,
    size: usize,
    timeout: Duration,
) -> Result<String, String> {
    in_netns(ns_from, move || {
        let started = Instant::now();
        let mut s =
            TcpStream::connect_timeout(&to, timeout).map_err(|e| format!("connect {to}: {e}"))?;
        s.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        s.set_write_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        s.set_nodelay(true).ok();
        let payload: Vec<u8> = (0..size)
            .map(|i| (i as u32).wrapping_mul(2654435761).to_be_bytes()[0])
            .collect();
        let mut msg = Vec::with_capacity(size + 4);
        msg.extend_from_slice(&(size as u32).to_be_bytes());
        msg.extend_from_slice(&payload);
        s.write_all(&msg)
            .map_err(|e| format!("send to {to}: {e}"))?;
        let mut len = [0u8; 4];
        s.read_exact(&mut len)
            .map_err(|e| format!("read reply header from {to}: {e}"))?;
        let nl = u32::from_be_bytes(len) as usize;
        if nl > 256 {
            return Err(format!("bad name length {nl} from {to}"));
        }
        let mut name = vec![0u8; nl];
        s.read_exact(&mut name)
            .map_err(|e| format!("read name from {to}: {e}"))?;
        s.read_exact(&mut len)
            .map_err(|e| format!("read len from {to}: {e}"))?;
        let n = u32::from_be_bytes(len) as usize;
        if n != size {
            return Err(format!("{to} answered {n} bytes, sent {size}"));
        }
        let mut back = vec![0u8; n];
        s.read_exact(&mut back).map_err(|e| {
            format!(
                "read payload from {to} (after {:?}): {e}",
                started.elapsed()
            )
        })?;
        if back != transform(&payload) {
            return Err(format!("{to} answered corrupted data"));
        }
        Ok(String::from_utf8_lossy(&name).into_owned())
    })
}

/// Raw HTTP/1.0 GET from inside `ns`; returns (status code, body).
pub fn http_get(
    ns: &str,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let path = path.to_string();
    in_netns(ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, timeout)
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        s.set_write_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        write!(
            s,
            "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .map_err(|e| e.to_string())?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp)
            .map_err(|e| format!("read from {addr}: {e}"))?;
        let text = String::from_utf8_lossy(&resp).into_owned();
        let code = text
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("no HTTP status line in {text:?}"))?;
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        Ok((code, body))
    })
}

// ---------------------------------------------------------------------------
// Trellis helpers (CLI contract of DESIGN.md)
// ---------------------------------------------------------------------------

/// A running (or stopped) `trellis server`.
#[derive(Clone, Debug)]
pub struct Server {
    pub host: Host,
    pub data_dir: PathBuf,
    pub url: String,
    pub listen: SocketAddr,
    pub edge_udp: SocketAddr,
    pub proc: ProcId,
}

impl Server {
    /// The operator key from DATA_DIR/admin.key.
    pub fn admin_key(&self) -> String {
        let p = self.data_dir.join("admin.key");
        fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
            .trim()
            .to_string()
    }
}

/// A `trellis join` agent.
#[derive(Clone, Debug)]
pub struct Node {
    pub host: Host,
    pub name: String,
    pub state_dir: PathBuf,
    pub server_url: String,
    pub proc: ProcId,
}

#[derive(Clone, Debug, Default)]
pub struct TokenOpts<'a> {
    pub reusable: bool,
    pub ttl: Option<&'a str>,
    pub account: Option<&'a str>,
    /// Defaults to the operator key.
    pub api_key: Option<&'a str>,
    /// `--routes-auto-approve`.
    pub routes_auto_approve: bool,
    /// `--tag T` for each.
    pub tags: &'a [&'a str],
}

#[derive(Clone, Debug)]
pub struct PeerStatus {
    /// `online` as reported (None when the agent does not report it).
    pub online: Option<bool>,
    pub name: String,
    pub ip: Option<Ipv4Addr>,
    pub path: String,
    pub endpoint: String,
    pub last_handshake_secs: Option<f64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

#[derive(Clone, Debug)]
pub struct Status {
    pub name: String,
    pub ip: Option<Ipv4Addr>,
    /// Relay connection of the agent: "udp", "tcp", "down", "none",
    /// "refused: ..." (empty when not reported).
    pub relay: String,
    /// Reflexive (public) address learnt from the edge, if any.
    pub reflexive: String,
    pub peers: Vec<PeerStatus>,
    pub raw: Value,
}

fn parse_ip(v: &Value) -> Option<Ipv4Addr> {
    v.as_str()
        .and_then(|s| s.split('/').next())
        .and_then(|s| s.parse().ok())
}

impl Status {
    pub fn parse(text: &str) -> Result<Status, String> {
        let v: Value = serde_json::from_str(text.trim())
            .map_err(|e| format!("status is not JSON ({e}): {text:?}"))?;
        let peers = v["peers"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|p| PeerStatus {
                        online: p["online"].as_bool(),
                        name: p["name"].as_str().unwrap_or_default().to_string(),
                        ip: parse_ip(&p["ip"]),
                        path: p["path"].as_str().unwrap_or_default().to_string(),
                        endpoint: p["endpoint"].as_str().unwrap_or_default().to_string(),
                        last_handshake_secs: p["last_handshake_secs"].as_f64(),
                        rx_bytes: p["rx_bytes"].as_u64().unwrap_or(0),
                        tx_bytes: p["tx_bytes"].as_u64().unwrap_or(0),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Status {
            name: v["name"].as_str().unwrap_or_default().to_string(),
            ip: parse_ip(&v["ip"]),
            relay: v["relay"].as_str().unwrap_or_default().to_string(),
            reflexive: v["reflexive"].as_str().unwrap_or_default().to_string(),
            peers,
            raw: v,
        })
    }
}

const CMD_TIMEOUT: Duration = Duration::from_secs(30);
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(60);
const NODE_READY_TIMEOUT: Duration = Duration::from_secs(30);

impl Lab {
    /// Starts `trellis server` on `host` (listen :8080, edge UDP :3478) with a
    /// data dir inside the lab and waits until GET /api/v1/health answers 200.
    pub fn start_server(&self, host: &Host) -> Server {
        let data_dir = self.path(&format!("{}-data", host.name));
        let listen = SocketAddr::from((host.addr, 8080));
        let edge_udp = SocketAddr::from((host.addr, 3478));
        let mut srv = Server {
            host: host.clone(),
            data_dir,
            url: format!("http://{listen}"),
            listen,
            edge_udp,
            proc: ProcId(usize::MAX),
        };
        self.restart_server(&mut srv);
        srv
    }

    /// (Re)starts the server process with the same data dir and addresses.
    pub fn restart_server(&self, srv: &mut Server) {
        if srv.proc.0 != usize::MAX && self.is_running(srv.proc) {
            self.stop(srv.proc);
        }
        let dd = srv.data_dir.to_string_lossy().into_owned();
        let (l, e) = (srv.listen.to_string(), srv.edge_udp.to_string());
        srv.proc = self.spawn(
            &srv.host,
            "server",
            trellis_bin(),
            &[
                "server",
                "--data-dir",
                &dd,
                "--listen",
                &l,
                "--edge-udp",
                &e,
            ],
        );
        let r = eventually(Instant::now() + SERVER_START_TIMEOUT, || {
            if let Some(st) = self.exited(srv.proc) {
                return Err(format!("server exited early: {st}"));
            }
            match http_get(
                &srv.host.ns,
                srv.listen,
                "/api/v1/health",
                Duration::from_secs(2),
            ) {
                Ok((200, body)) => Ok(body),
                Ok((code, body)) => Err(format!("health answered {code}: {body}")),
                Err(e) => Err(e),
            }
        });
        let body = self.check(r, "server did not become healthy");
        let ok = serde_json::from_str::<Value>(body.trim())
            .map(|v| v["ok"] == Value::Bool(true))
            .unwrap_or(false);
        self.ensure(ok, format!("health body is not {{\"ok\":true}}: {body:?}"));
        self.ensure(
            srv.data_dir.join("admin.key").exists(),
            "server is healthy but DATA_DIR/admin.key does not exist",
        );
    }

    /// Stops the server (SIGTERM, wait).
    pub fn stop_server(&self, srv: &Server) {
        let (st, killed) = self.stop(srv.proc);
        self.ensure(!killed, format!("server ignored SIGTERM (status {st:?})"));
    }

    /// Runs `trellis <args> --server URL --api-key KEY` in the server's
    /// namespace. The flags go after the subcommand.
    pub fn admin(&self, srv: &Server, api_key: &str, args: &[&str]) -> CmdOutput {
        let mut a: Vec<&str> = args.to_vec();
        a.extend_from_slice(&["--server", &srv.url, "--api-key", api_key]);
        self.run(&srv.host.ns, trellis_bin(), &a, CMD_TIMEOUT)
    }

    /// Like [`Lab::admin`] but fails the test on non-zero exit; returns stdout.
    pub fn admin_ok(&self, srv: &Server, api_key: &str, args: &[&str]) -> String {
        let out = self.admin(srv, api_key, args);
        if !out.success() {
            self.fail(&format!("admin command failed:\n{}", out.describe()));
        }
        out.stdout
    }

    /// `trellis token create ...`; returns the token (stdout must be exactly
    /// one line).
    pub fn create_token(&self, srv: &Server, opts: TokenOpts<'_>) -> String {
        let key = opts
            .api_key
            .map(str::to_string)
            .unwrap_or_else(|| srv.admin_key());
        let mut args = vec!["token", "create"];
        if opts.reusable {
            args.push("--reusable");
        }
        if let Some(t) = opts.ttl {
            args.extend_from_slice(&["--ttl", t]);
        }
        if let Some(a) = opts.account {
            args.extend_from_slice(&["--account", a]);
        }
        if opts.routes_auto_approve {
            args.push("--routes-auto-approve");
        }
        for t in opts.tags {
            args.extend_from_slice(&["--tag", t]);
        }
        let out = self.admin_ok(srv, &key, &args);
        one_line(self, &out, "token create")
    }

    /// `trellis account create NAME [--cidr C]` with the operator key;
    /// returns the account's API key.
    pub fn create_account(&self, srv: &Server, name: &str, cidr: Option<&str>) -> String {
        let mut args = vec!["account", "create", name];
        if let Some(c) = cidr {
            args.extend_from_slice(&["--cidr", c]);
        }
        let out = self.admin_ok(srv, &srv.admin_key(), &args);
        one_line(self, &out, "account create")
    }

    /// `trellis nodes list --json [--account A]`.
    pub fn nodes_list(&self, srv: &Server, api_key: &str, account: Option<&str>) -> Vec<Value> {
        let mut args = vec!["nodes", "list", "--json"];
        if let Some(a) = account {
            args.extend_from_slice(&["--account", a]);
        }
        let out = self.admin_ok(srv, api_key, &args);
        match serde_json::from_str::<Value>(out.trim()) {
            Ok(Value::Array(a)) => a,
            other => self.fail(&format!(
                "nodes list --json is not a JSON array: {other:?}\n{out}"
            )),
        }
    }

    /// `trellis nodes delete NAME [--account A]`, must exit 0.
    pub fn nodes_delete(&self, srv: &Server, api_key: &str, name: &str, account: Option<&str>) {
        let mut args = vec!["nodes", "delete", name];
        if let Some(a) = account {
            args.extend_from_slice(&["--account", a]);
        }
        self.admin_ok(srv, api_key, &args);
    }

    fn join_args(srv_url: &str, token: Option<&str>, name: &str, state_dir: &Path) -> Vec<String> {
        let mut a = vec!["join".to_string(), "--server".into(), srv_url.to_string()];
        if let Some(t) = token {
            a.extend(["--token".to_string(), t.to_string()]);
        }
        a.extend([
            "--name".to_string(),
            name.to_string(),
            "--state-dir".to_string(),
            state_dir.to_string_lossy().into_owned(),
        ]);
        a
    }

    /// Starts `trellis join` (foreground agent) on `host`. The state dir is
    /// `<lab>/<name>-state` unless given.
    pub fn join(
        &self,
        host: &Host,
        srv: &Server,
        name: &str,
        token: &str,
        state_dir: Option<&Path>,
    ) -> Node {
        self.join_with(host, srv, name, token, state_dir, &[])
    }

    /// Like [`Lab::join`] with extra `trellis join` flags (e.g.
    /// `--advertise-routes 198.19.10.0/24`).
    pub fn join_with(
        &self,
        host: &Host,
        srv: &Server,
        name: &str,
        token: &str,
        state_dir: Option<&Path>,
        extra: &[&str],
    ) -> Node {
        let sd = state_dir
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.path(&format!("{name}-state")));
        let mut args = Self::join_args(&srv.url, Some(token), name, &sd);
        args.extend(extra.iter().map(|s| s.to_string()));
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let proc = self.spawn(host, &format!("node-{name}"), trellis_bin(), &a);
        Node {
            host: host.clone(),
            name: name.to_string(),
            state_dir: sd,
            server_url: srv.url.clone(),
            proc,
        }
    }

    /// Restarts a node agent with its state dir and no token (stops it first
    /// if it is running).
    pub fn restart_node(&self, node: &mut Node) {
        if self.is_running(node.proc) {
            self.stop_node(node);
        }
        let args = Self::join_args(&node.server_url, None, &node.name, &node.state_dir);
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        node.proc = self.spawn(
            &node.host,
            &format!("node-{}", node.name),
            trellis_bin(),
            &a,
        );
    }

    /// SIGTERM the agent and wait for it to exit.
    pub fn stop_node(&self, node: &Node) {
        let (st, killed) = self.stop(node.proc);
        self.ensure(
            !killed,
            format!("node {} ignored SIGTERM (status {st:?})", node.name),
        );
    }

    /// Runs `trellis join` to completion (for enrollment that must fail);
    /// kills it after `timeout`.
    pub fn join_once(
        &self,
        host: &Host,
        srv_url: &str,
        name: &str,
        token: Option<&str>,
        state_dir: &Path,
        timeout: Duration,
    ) -> CmdOutput {
        self.join_once_with(host, srv_url, name, token, state_dir, timeout, &[])
    }

    /// Like [`Lab::join_once`] with extra `trellis join` flags.
    #[allow(clippy::too_many_arguments)]
    pub fn join_once_with(
        &self,
        host: &Host,
        srv_url: &str,
        name: &str,
        token: Option<&str>,
        state_dir: &Path,
        timeout: Duration,
        extra: &[&str],
    ) -> CmdOutput {
        let mut args = Self::join_args(srv_url, token, name, state_dir);
        args.extend(extra.iter().map(|s| s.to_string()));
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        self.run(&host.ns, trellis_bin(), &a, timeout)
    }

    /// `trellis status --json --state-dir D` in the node's namespace.
    pub fn status(&self, node: &Node) -> Result<Status, String> {
        let sd = node.state_dir.to_string_lossy().into_owned();
        let out = self.run(
            &node.host.ns,
            trellis_bin(),
            &["status", "--json", "--state-dir", &sd],
            Duration::from_secs(10),
        );
        if !out.success() {
            return Err(format!("status failed: {}", out.describe()));
        }
        Status::parse(&out.stdout)
    }

    /// Waits until the agent answers `status` with an overlay IP; fails the
    /// test (with logs) otherwise. Returns the status.
    pub fn wait_ready(&self, node: &Node) -> Status {
        let r = eventually(Instant::now() + NODE_READY_TIMEOUT, || {
            if let Some(st) = self.exited(node.proc) {
                return Err(format!("agent exited: {st}"));
            }
            let s = self.status(node)?;
            match s.ip {
                Some(_) => Ok(s),
                None => Err(format!("status has no ip yet: {}", s.raw)),
            }
        });
        let s = self.check(r, &format!("node {} did not become ready", node.name));
        let ip = s.ip.expect("ip");
        self.ensure(
            in_net(ip, Ipv4Addr::new(100, 64, 0, 0), 10),
            format!(
                "node {} got overlay ip {ip} outside 100.64.0.0/10",
                node.name
            ),
        );
        s
    }

    /// Starts an [`EchoListener`] on 0.0.0.0:APP_PORT in the node's namespace
    /// answering with the node's name.
    pub fn listen(&self, node: &Node) -> EchoListener {
        let r = tcp_listen(
            &node.host.ns,
            SocketAddr::from(([0, 0, 0, 0], APP_PORT)),
            &node.name,
        );
        self.check(r, &format!("listen on {}", node.name))
    }
}

fn one_line(lab: &Lab, out: &str, what: &str) -> String {
    let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.len() != 1 {
        lab.fail(&format!(
            "`{what}` should print exactly one line, got {out:?}"
        ));
    }
    lines[0].trim().to_string()
}

/// One directed connectivity check.
#[derive(Clone, Debug)]
pub struct Probe {
    pub from: String,
    pub from_ns: String,
    pub to: String,
    pub to_addr: SocketAddr,
}

impl Probe {
    pub fn new(from: &Node, to_name: &str, to_ip: Ipv4Addr) -> Probe {
        Probe {
            from: from.name.clone(),
            from_ns: from.host.ns.clone(),
            to: to_name.to_string(),
            to_addr: SocketAddr::from((to_ip, APP_PORT)),
        }
    }
}

/// Runs every probe in parallel, each retrying until it succeeds (and the
/// answering listener is the expected node) or `deadline` passes. Returns
/// the failures as text (empty = all good).
pub fn all_reach(probes: &[Probe], deadline: Instant, attempt_timeout: Duration) -> Vec<String> {
    thread::scope(|sc| {
        let hs: Vec<_> = probes
            .iter()
            .map(|p| {
                sc.spawn(move || {
                    let r = eventually(deadline, || {
                        let now = Instant::now();
                        let left = deadline
                            .saturating_duration_since(now)
                            .max(Duration::from_millis(300));
                        let name = tcp_exchange(
                            &p.from_ns,
                            p.to_addr,
                            PAYLOAD,
                            attempt_timeout.min(left),
                        )?;
                        if name == p.to {
                            Ok(())
                        } else {
                            Err(format!("answered by {name:?}, expected {:?}", p.to))
                        }
                    });
                    r.err()
                        .map(|e| format!("{} -> {} ({}): {e}", p.from, p.to, p.to_addr))
                })
            })
            .collect();
        hs.into_iter()
            .filter_map(|h| h.join().unwrap_or(Some("probe thread panicked".into())))
            .collect()
    })
}

/// All ordered pairs of `nodes` (with their overlay IPs).
pub fn pair_probes(nodes: &[(&Node, Ipv4Addr)]) -> Vec<Probe> {
    let mut v = Vec::new();
    for (a, _) in nodes {
        for (b, bip) in nodes {
            if a.name != b.name {
                v.push(Probe::new(a, &b.name, *bip));
            }
        }
    }
    v
}

/// Names of namespaces that still exist with `prefix`.
pub fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    let p = format!("{prefix}-");
    list_netns()
        .into_iter()
        .filter(|n| n.starts_with(&p))
        .collect()
}

/// Set of names found in a `nodes list --json` answer.
pub fn node_names(list: &[Value]) -> HashSet<String> {
    list.iter()
        .filter_map(|n| n["name"].as_str().map(str::to_string))
        .collect()
}

impl Lab {
    /// Drops, inside `host`'s namespace only, all TCP traffic between it and
    /// `peer` (both directions), with an nftables table `e2e_block`.
    pub fn block_tcp(&self, host: &Host, peer: SocketAddr) {
        let ip = peer.ip().to_string();
        let port = peer.port().to_string();
        let cmds: Vec<Vec<&str>> = vec![
            vec!["add", "table", "inet", "e2e_block"],
            vec![
                "add",
                "chain",
                "inet",
                "e2e_block",
                "out",
                "{ type filter hook output priority 0; }",
            ],
            vec![
                "add",
                "chain",
                "inet",
                "e2e_block",
                "in",
                "{ type filter hook input priority 0; }",
            ],
            vec![
                "add",
                "rule",
                "inet",
                "e2e_block",
                "out",
                "ip",
                "daddr",
                &ip,
                "tcp",
                "dport",
                &port,
                "drop",
            ],
            vec![
                "add",
                "rule",
                "inet",
                "e2e_block",
                "in",
                "ip",
                "saddr",
                &ip,
                "tcp",
                "sport",
                &port,
                "drop",
            ],
        ];
        for c in cmds {
            let out = self.run(&host.ns, "nft", &c, Duration::from_secs(10));
            if !out.success() {
                self.fail(&format!("nft failed:\n{}", out.describe()));
            }
        }
    }

    /// Removes what [`Lab::block_tcp`] added.
    pub fn unblock_tcp(&self, host: &Host) {
        let out = self.run(
            &host.ns,
            "nft",
            &["delete", "table", "inet", "e2e_block"],
            Duration::from_secs(10),
        );
        if !out.success() {
            self.fail(&format!("nft failed:\n{}", out.describe()));
        }
    }
}

impl Status {
    /// The peer entry named `name`, if listed.
    pub fn peer(&self, name: &str) -> Option<&PeerStatus> {
        self.peers.iter().find(|p| p.name == name)
    }
}

// ---------------------------------------------------------------------------
// An "internet" with NAT routers and firewalls
// ---------------------------------------------------------------------------
//
// The lab switch (`Lab::switch`, bridge br0 in namespace `<prefix>-sw`) plays
// the internet (198.18.0.0/24). A router is a namespace with a `wan` leg on
// that switch and a `lan` leg on a switch of its own (e.g. 198.19.1.0/24);
// hosts behind it route by default through its LAN address. Forwarding and
// NAT are switched on inside the router's namespace only.

/// How a router translates what leaves through its WAN leg.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nat {
    /// Endpoint-independent mapping (`masquerade`: Linux keeps the source
    /// port when it can); filtering by conntrack (address and port).
    Cone,
    /// A random source port per destination (`masquerade random`).
    Symmetric,
}

/// A NAT router of the lab.
#[derive(Clone, Debug)]
pub struct Router {
    pub name: String,
    pub ns: String,
    /// Address of the WAN leg (on the internet switch).
    pub wan: Ipv4Addr,
    /// Address of the LAN leg (gateway of the hosts behind it).
    pub lan: Ipv4Addr,
    pub lan_switch: Switch,
    pub nat: Nat,
}

/// "198.19.11.1/24" -> "198.19.11.0/24".
fn lan_subnet(cidr: &str) -> String {
    let a = addr_of(cidr);
    let len: u32 = cidr
        .split('/')
        .nth(1)
        .and_then(|l| l.parse().ok())
        .unwrap_or(32);
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    format!("{}/{len}", Ipv4Addr::from(u32::from(a) & mask))
}

fn addr_of(cidr: &str) -> Ipv4Addr {
    let a: Ipv4Addr = cidr
        .split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("bad address {cidr}"));
    assert!(
        in_net(a, Ipv4Addr::new(198, 18, 0, 0), 15),
        "underlay address {a} is outside 198.18.0.0/15"
    );
    a
}

impl Lab {
    /// Another L2 switch: namespace `<prefix>-sw-<short>` with a bridge `br0`.
    pub fn new_switch(&self, short: &str) -> Switch {
        let ns = self.add_netns(&format!("sw-{short}"));
        for args in [
            vec!["ip", "-n", &ns, "link", "add", "br0", "type", "bridge"],
            vec!["ip", "-n", &ns, "link", "set", "br0", "up"],
        ] {
            sh(&args).unwrap_or_else(|e| self.fail(&e));
        }
        Switch { ns }
    }

    /// A NAT router: `wan` leg with `wan_cidr` on the lab (internet) switch,
    /// `lan` leg with `lan_cidr` on a new switch of its own, forwarding on,
    /// nftables NAT of kind `nat` on what leaves through `wan`, and new
    /// connections arriving on `wan` for the router itself dropped.
    pub fn router(&self, name: &str, wan_cidr: &str, lan_cidr: &str, nat: Nat) -> Router {
        let wan = addr_of(wan_cidr);
        let lan = addr_of(lan_cidr);
        let inet = self.switch();
        let lan_switch = self.new_switch(name);
        let ns = self.add_netns(name);
        self.attach_ns(&ns, "wan", &inet, wan_cidr);
        self.attach_ns(&ns, "lan", &lan_switch, lan_cidr);
        self.sysctl(&ns, "net.ipv4.ip_forward", "1");
        let masq = match nat {
            Nat::Cone => "masquerade",
            Nat::Symmetric => "masquerade random",
        };
        // Like any home router, drop unsolicited traffic arriving on the WAN
        // leg. Dropping it before conntrack confirms it matters: otherwise
        // a peer's early hole-punching datagram leaves a conntrack entry
        // (peer -> wan:port) whose reply tuple clashes with the mapping our
        // host then needs towards that peer, and masquerade picks another
        // port: the "cone" would turn symmetric exactly when punching.
        self.nft(
            &ns,
            &[
                "add table ip nat",
                "add chain ip nat post { type nat hook postrouting priority 100; }",
                &format!("add rule ip nat post oifname \"wan\" {masq}"),
                "add table ip wanfw",
                "add chain ip wanfw in { type filter hook input priority 0; }",
                "add rule ip wanfw in iifname \"wan\" ct state new drop",
            ],
        );
        Router {
            name: name.to_string(),
            ns,
            wan,
            lan,
            lan_switch,
            nat,
        }
    }

    /// A host on `r`'s LAN (`cidr` in the LAN's subnet) whose default route
    /// goes through the router.
    pub fn host_behind(&self, r: &Router, name: &str, cidr: &str) -> Host {
        let h = self.host_on(&r.lan_switch, name, cidr);
        let gw = r.lan.to_string();
        self.ip_ok(&h.ns, &["route", "add", "default", "via", &gw]);
        h
    }

    /// Another network behind the same router, for roaming: the LAN leg
    /// gets `lan_cidr` too, and hosts on that subnet are translated to
    /// another WAN address, `wan_cidr` (endpoint-independent, source port
    /// kept). A host moving there gets a new public address with fresh
    /// mappings, as when a device changes networks. (Merely renumbering
    /// within one NAT would collide with the old host's conntrack entries
    /// and make Linux pick random ports, i.e. turn the NAT symmetric.)
    pub fn router_add_network(&self, r: &Router, lan_cidr: &str, wan_cidr: &str) {
        addr_of(lan_cidr);
        let wan2 = addr_of(wan_cidr);
        self.ip_ok(&r.ns, &["addr", "add", lan_cidr, "dev", "lan"]);
        self.ip_ok(&r.ns, &["addr", "add", wan_cidr, "dev", "wan"]);
        let net = lan_subnet(lan_cidr);
        let rule = match r.nat {
            Nat::Cone => format!("snat to {wan2}"),
            Nat::Symmetric => format!("snat to {wan2} random"),
        };
        self.nft(
            &r.ns,
            &[&format!(
                "insert rule ip nat post ip saddr {net} oifname \"wan\" {rule}"
            )],
        );
    }

    /// Roaming: gives `host`'s eth0 the address `new_cidr` (default route
    /// via `gw` when given), then removes its old address. Updates
    /// `host.addr`.
    pub fn move_host(&self, host: &mut Host, new_cidr: &str, gw: Option<Ipv4Addr>) {
        let new = addr_of(new_cidr);
        let out = self.run(
            &host.ns,
            "ip",
            &["-o", "-4", "addr", "show", "dev", "eth0"],
            Duration::from_secs(10),
        );
        let old_cidr = out
            .stdout
            .split_whitespace()
            .find(|w| w.starts_with(&format!("{}/", host.addr)))
            .map(str::to_string)
            .unwrap_or_else(|| {
                self.fail(&format!(
                    "{} has no address {} on eth0:\n{}",
                    host.name,
                    host.addr,
                    out.describe()
                ))
            });
        self.ip_ok(&host.ns, &["addr", "add", new_cidr, "dev", "eth0"]);
        if let Some(gw) = gw {
            let gw = gw.to_string();
            self.ip_ok(&host.ns, &["route", "replace", "default", "via", &gw]);
        }
        self.ip_ok(&host.ns, &["addr", "del", &old_cidr, "dev", "eth0"]);
        host.addr = new;
    }

    /// `ip -n <ns> args...`; fails the test on error.
    pub fn ip_ok(&self, ns: &str, args: &[&str]) {
        let mut a = vec!["ip", "-n", ns];
        a.extend_from_slice(args);
        sh(&a).unwrap_or_else(|e| self.fail(&e));
    }

    /// `sysctl -w key=value` inside `ns` (never in the root namespace).
    pub fn sysctl(&self, ns: &str, key: &str, value: &str) {
        let kv = format!("{key}={value}");
        let out = self.run(ns, "sysctl", &["-w", &kv], Duration::from_secs(10));
        if !out.success() {
            self.fail(&format!("sysctl failed:\n{}", out.describe()));
        }
    }

    /// Runs each nftables command (`nft <cmd>`) inside `ns`.
    pub fn nft(&self, ns: &str, cmds: &[&str]) {
        for c in cmds {
            let out = self.run(ns, "nft", &[c], Duration::from_secs(10));
            if !out.success() {
                self.fail(&format!("nft failed:\n{}", out.describe()));
            }
        }
    }

    /// A filter table `ip <table>` in `ns` with one chain on `hook`
    /// (forward, input, output) holding `rules`. Remove with
    /// [`Lab::firewall_remove`].
    pub fn firewall(&self, ns: &str, table: &str, hook: &str, rules: &[String]) {
        let mut cmds = vec![
            format!("add table ip {table}"),
            format!("add chain ip {table} c {{ type filter hook {hook} priority 0; }}"),
        ];
        for r in rules {
            cmds.push(format!("add rule ip {table} c {r}"));
        }
        let c: Vec<&str> = cmds.iter().map(String::as_str).collect();
        self.nft(ns, &c);
    }

    pub fn firewall_remove(&self, ns: &str, table: &str) {
        self.nft(ns, &[&format!("delete table ip {table}")]);
    }

    /// On router `r`, drops all forwarded UDP to and from `other` (e.g. the
    /// other router's WAN address); UDP to the server still passes.
    pub fn block_udp_between(&self, r: &Router, other: Ipv4Addr) {
        self.firewall(
            &r.ns,
            "e2e_direct",
            "forward",
            &[
                format!("ip daddr {other} ip protocol udp drop"),
                format!("ip saddr {other} ip protocol udp drop"),
            ],
        );
    }

    pub fn unblock_udp_between(&self, r: &Router) {
        self.firewall_remove(&r.ns, "e2e_direct");
    }

    /// On router `r`, drops every forwarded UDP packet from or to the LAN
    /// host `lan_host` (TCP still passes).
    pub fn block_all_udp_of(&self, r: &Router, lan_host: Ipv4Addr) {
        self.firewall(
            &r.ns,
            "e2e_noudp",
            "forward",
            &[
                format!("ip saddr {lan_host} ip protocol udp drop"),
                format!("ip daddr {lan_host} ip protocol udp drop"),
            ],
        );
    }

    /// `trellis ping PEER --count N --state-dir D` in the node's namespace.
    pub fn ping(&self, node: &Node, peer: &str, count: u32) -> CmdOutput {
        let sd = node.state_dir.to_string_lossy().into_owned();
        let n = count.to_string();
        self.run(
            &node.host.ns,
            trellis_bin(),
            &["ping", peer, "--count", &n, "--state-dir", &sd],
            Duration::from_secs(10 + 2 * count as u64),
        )
    }
}

// ---------------------------------------------------------------------------
// Long TCP streams with verified payload and progress timestamps
// ---------------------------------------------------------------------------
//
// Protocol: the sender writes u64 total length, then `total` bytes of
// `stream_byte(i)`; the sink checks every byte in order and, once it has
// them all, answers u64 count of verified bytes. The sender waits for that
// answer, so a completed send means every byte arrived intact and in order.

const PATTERN_LEN: usize = 65521; // prime: never aligned with chunk sizes

fn pattern_table() -> &'static [u8] {
    static T: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        (0..PATTERN_LEN as u64)
            .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
            .collect()
    })
}

/// Byte `i` of a stream.
pub fn stream_byte(i: u64) -> u8 {
    pattern_table()[(i % PATTERN_LEN as u64) as usize] ^ ((i / PATTERN_LEN as u64) as u8)
}

/// What a [`StreamSink`] has seen so far.
#[derive(Clone, Debug, Default)]
pub struct SinkProgress {
    pub connections: usize,
    /// Verified bytes received on the current connection.
    pub bytes: u64,
    /// (time, cumulative bytes) after every read that returned data.
    pub arrivals: Vec<(Instant, u64)>,
    /// First error (corruption, reset, timeout) of a connection.
    pub error: Option<String>,
    pub done: bool,
}

impl SinkProgress {
    /// Longest interval without any received data that ends after `from`
    /// (intervals straddling `from` count): (length, start of the gap).
    pub fn max_gap_after(&self, from: Instant) -> Option<(Duration, Instant)> {
        let mut best: Option<(Duration, Instant)> = None;
        for w in self.arrivals.windows(2) {
            let (a, b) = (w[0].0, w[1].0);
            if b <= from {
                continue;
            }
            let g = b - a;
            if best.map(|(d, _)| g > d).unwrap_or(true) {
                best = Some((g, a));
            }
        }
        best
    }

    /// Time of the first arrival strictly after `t`.
    pub fn first_arrival_after(&self, t: Instant) -> Option<Instant> {
        self.arrivals.iter().map(|a| a.0).find(|&a| a > t)
    }
}

/// A TCP listener inside a namespace that verifies [`stream_send`] streams.
pub struct StreamSink {
    pub addr: SocketAddr,
    pub progress: Arc<Mutex<SinkProgress>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StreamSink {
    pub fn snapshot(&self) -> SinkProgress {
        self.progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for StreamSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Binds `addr` inside `ns` and verifies incoming streams (one at a time).
pub fn stream_sink(ns: &str, addr: SocketAddr) -> Result<StreamSink, String> {
    let l = in_netns(ns, move || {
        TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))
    })?;
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(Mutex::new(SinkProgress::default()));
    let (stop2, prog2) = (stop.clone(), progress.clone());
    let thread = thread::spawn(move || {
        while !stop2.load(Ordering::SeqCst) {
            match l.accept() {
                Ok((s, _)) => {
                    {
                        let mut p = prog2.lock().unwrap_or_else(|e| e.into_inner());
                        p.connections += 1;
                        p.bytes = 0;
                        p.done = false;
                    }
                    if let Err(e) = sink_conn(s, &prog2, &stop2) {
                        let mut p = prog2.lock().unwrap_or_else(|e| e.into_inner());
                        p.error.get_or_insert(e);
                    }
                }
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
    });
    Ok(StreamSink {
        addr,
        progress,
        stop,
        thread: Some(thread),
    })
}

fn sink_conn(
    mut s: TcpStream,
    prog: &Arc<Mutex<SinkProgress>>,
    stop: &AtomicBool,
) -> Result<(), String> {
    s.set_nonblocking(false).map_err(|e| e.to_string())?;
    // Short timeouts so that the sink notices `stop`; stalls are measured,
    // not fatal here (the sender has its own deadline).
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut hdr = [0u8; 8];
    let mut got = 0;
    while got < 8 {
        if stop.load(Ordering::SeqCst) || started.elapsed() > Duration::from_secs(60) {
            return Err("stream header never arrived".into());
        }
        match s.read(&mut hdr[got..]) {
            Ok(0) => return Err("connection closed before the header".into()),
            Ok(n) => got += n,
            Err(e) if is_timeout(&e) => continue,
            Err(e) => return Err(format!("read header: {e}")),
        }
    }
    let total = u64::from_be_bytes(hdr);
    let table = pattern_table();
    let mut off: u64 = 0;
    let mut buf = vec![0u8; 256 * 1024];
    let mut last_data = Instant::now();
    while off < total {
        if stop.load(Ordering::SeqCst) {
            return Err(format!("sink stopped after {off} of {total} bytes"));
        }
        let want = buf.len().min((total - off) as usize);
        match s.read(&mut buf[..want]) {
            Ok(0) => return Err(format!("connection closed after {off} of {total} bytes")),
            Ok(n) => {
                for (k, &b) in buf[..n].iter().enumerate() {
                    let i = off + k as u64;
                    let want =
                        table[(i % PATTERN_LEN as u64) as usize] ^ ((i / PATTERN_LEN as u64) as u8);
                    if b != want {
                        return Err(format!(
                            "corrupted stream at byte {i}: got {b:#04x}, expected {want:#04x}"
                        ));
                    }
                }
                off += n as u64;
                last_data = Instant::now();
                let mut p = prog.lock().unwrap_or_else(|e| e.into_inner());
                p.bytes = off;
                p.arrivals.push((last_data, off));
            }
            Err(e) if is_timeout(&e) => {
                if last_data.elapsed() > Duration::from_secs(60) {
                    return Err(format!("no data for 60 s after {off} of {total} bytes"));
                }
            }
            Err(e) => return Err(format!("read after {off} of {total} bytes: {e}")),
        }
    }
    s.set_write_timeout(Some(Duration::from_secs(20)))
        .map_err(|e| e.to_string())?;
    s.write_all(&off.to_be_bytes())
        .map_err(|e| format!("write ack: {e}"))?;
    let _ = s.flush();
    prog.lock().unwrap_or_else(|e| e.into_inner()).done = true;
    let _ = s.shutdown(Shutdown::Write);
    // Let the ack drain before the socket closes.
    let _ = s.read(&mut hdr);
    Ok(())
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Result of a completed [`stream_send`].
#[derive(Clone, Debug)]
pub struct StreamReport {
    pub bytes: u64,
    pub elapsed: Duration,
}

/// From namespace `ns`, streams `total` bytes to a [`StreamSink`] at `to`,
/// paced at `rate` bytes/s, and waits for the sink's acknowledgement. Any
/// single write or the final read may block at most `stall` (a reset or a
/// longer stall fails). Runs on its own thread.
pub fn stream_send(
    ns: &str,
    to: SocketAddr,
    total: u64,
    rate: u64,
    stall: Duration,
) -> JoinHandle<Result<StreamReport, String>> {
    let ns = ns.to_string();
    thread::spawn(move || {
        in_netns(&ns, move || {
            let started = Instant::now();
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))
                .map_err(|e| format!("connect {to}: {e}"))?;
            s.set_write_timeout(Some(stall))
                .map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(stall)).map_err(|e| e.to_string())?;
            s.write_all(&total.to_be_bytes())
                .map_err(|e| format!("send header: {e}"))?;
            let mut chunk = vec![0u8; 32 * 1024];
            let mut off: u64 = 0;
            while off < total {
                let due = started + Duration::from_secs_f64(off as f64 / rate as f64);
                let now = Instant::now();
                if due > now {
                    thread::sleep(due - now);
                }
                let n = chunk.len().min((total - off) as usize);
                let table = pattern_table();
                for (k, b) in chunk[..n].iter_mut().enumerate() {
                    let i = off + k as u64;
                    *b =
                        table[(i % PATTERN_LEN as u64) as usize] ^ ((i / PATTERN_LEN as u64) as u8);
                }
                s.write_all(&chunk[..n]).map_err(|e| {
                    format!(
                        "write after {off} of {total} bytes ({:.1} s in): {e}",
                        started.elapsed().as_secs_f64()
                    )
                })?;
                off += n as u64;
            }
            let mut ack = [0u8; 8];
            s.read_exact(&mut ack).map_err(|e| {
                format!(
                    "no acknowledgement after sending {total} bytes ({:.1} s in): {e}",
                    started.elapsed().as_secs_f64()
                )
            })?;
            let acked = u64::from_be_bytes(ack);
            if acked != total {
                return Err(format!("sink acknowledged {acked} of {total} bytes"));
            }
            Ok(StreamReport {
                bytes: total,
                elapsed: started.elapsed(),
            })
        })
    })
}

// ---------------------------------------------------------------------------
// A plain HTTP server that reports who it saw (for hosts without Trellis)
// ---------------------------------------------------------------------------

/// An HTTP/1.0 server in a namespace. Every answer is `200 OK` with the body
/// `server=<name>\npeer=<ip>:<port>\n`, `peer` being the source address the
/// server saw; the peers are also recorded in `peers`. Stops when dropped.
pub struct HttpServer {
    pub addr: SocketAddr,
    pub name: String,
    pub peers: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl HttpServer {
    /// Source addresses seen so far.
    pub fn seen(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Starts an [`HttpServer`] bound to `addr` inside `ns`.
pub fn http_serve(ns: &str, addr: SocketAddr, name: &str) -> Result<HttpServer, String> {
    let l = in_netns(ns, move || {
        TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))
    })?;
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
    let stop = Arc::new(AtomicBool::new(false));
    let peers = Arc::new(Mutex::new(Vec::new()));
    let (stop2, peers2, name2) = (stop.clone(), peers.clone(), name.to_string());
    let thread = thread::spawn(move || {
        while !stop2.load(Ordering::SeqCst) {
            match l.accept() {
                Ok((s, peer)) => {
                    peers2.lock().unwrap_or_else(|e| e.into_inner()).push(peer);
                    let n = name2.clone();
                    thread::spawn(move || {
                        let _ = serve_http(s, peer, &n);
                    });
                }
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    Ok(HttpServer {
        addr,
        name: name.to_string(),
        peers,
        stop,
        thread: Some(thread),
    })
}

fn serve_http(mut s: TcpStream, peer: SocketAddr, name: &str) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16 * 1024 {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&buf[..n]);
    }
    let body = format!("server={name}\npeer={peer}\n");
    write!(
        s,
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    s.flush()?;
    let _ = s.shutdown(Shutdown::Write);
    Ok(())
}

/// `(server, peer)` from an [`HttpServer`] answer body.
pub fn http_body_peer(body: &str) -> Option<(String, SocketAddr)> {
    let mut server = None;
    let mut peer = None;
    for l in body.lines() {
        if let Some(v) = l.strip_prefix("server=") {
            server = Some(v.trim().to_string());
        } else if let Some(v) = l.strip_prefix("peer=") {
            peer = v.trim().parse().ok();
        }
    }
    Some((server?, peer?))
}

// ---------------------------------------------------------------------------
// A tiny authoritative DNS responder (an "upstream resolver" for the lab)
// ---------------------------------------------------------------------------

/// UDP DNS responder in a namespace with fixed A records. A known name gets
/// its A record (NOERROR with no answer for other types); any other name
/// NXDOMAIN. Every question is logged in `queries` as `name type`.
pub struct DnsServer {
    pub addr: SocketAddr,
    pub queries: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl DnsServer {
    pub fn queries(&self) -> Vec<String> {
        self.queries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Starts a [`DnsServer`] on UDP `addr` inside `ns` answering `records`
/// (names without a trailing dot, case-insensitive).
pub fn dns_serve(
    ns: &str,
    addr: SocketAddr,
    records: &[(&str, Ipv4Addr)],
) -> Result<DnsServer, String> {
    let sock = in_netns(ns, move || {
        std::net::UdpSocket::bind(addr).map_err(|e| format!("bind udp {addr}: {e}"))
    })?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(|e| e.to_string())?;
    let records: Vec<(String, Ipv4Addr)> = records
        .iter()
        .map(|(n, a)| (n.trim_end_matches('.').to_ascii_lowercase(), *a))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let queries = Arc::new(Mutex::new(Vec::new()));
    let (stop2, q2) = (stop.clone(), queries.clone());
    let thread = thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while !stop2.load(Ordering::SeqCst) {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                continue;
            };
            if let Some((resp, logline)) = dns_answer(&buf[..n], &records) {
                q2.lock().unwrap_or_else(|e| e.into_inner()).push(logline);
                let _ = sock.send_to(&resp, from);
            }
        }
    });
    Ok(DnsServer {
        addr,
        queries,
        stop,
        thread: Some(thread),
    })
}

/// Parses the first question of a DNS query: (name, qtype, end offset of
/// the question).
pub fn dns_parse_question(q: &[u8]) -> Option<(String, u16, usize)> {
    if q.len() < 12 || u16::from_be_bytes([q[4], q[5]]) == 0 {
        return None;
    }
    let mut i = 12;
    let mut labels: Vec<String> = Vec::new();
    loop {
        let len = *q.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        if len & 0xC0 != 0 {
            return None; // no compression in questions
        }
        let l = q.get(i..i + len)?;
        labels.push(String::from_utf8_lossy(l).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    let _qclass = u16::from_be_bytes([*q.get(i + 2)?, *q.get(i + 3)?]);
    Some((labels.join("."), qtype, i + 4))
}

fn dns_answer(q: &[u8], records: &[(String, Ipv4Addr)]) -> Option<(Vec<u8>, String)> {
    let (name, qtype, qend) = dns_parse_question(q)?;
    if q[2] & 0x80 != 0 {
        return None; // a response, not a query
    }
    let hit = records.iter().find(|(n, _)| *n == name).map(|(_, a)| *a);
    let rd = q[2] & 0x01;
    let rcode: u8 = if hit.is_some() { 0 } else { 3 };
    let answer = match hit {
        Some(a) if qtype == 1 => Some(a),
        _ => None,
    };
    let mut r = Vec::with_capacity(qend + 16);
    r.extend_from_slice(&q[0..2]); // id
    r.push(0x80 | 0x04 | rd); // QR, AA, RD copied
    r.push(0x80 | rcode); // RA, rcode
    r.extend_from_slice(&1u16.to_be_bytes()); // qdcount
    r.extend_from_slice(&(answer.is_some() as u16).to_be_bytes()); // ancount
    r.extend_from_slice(&0u16.to_be_bytes()); // nscount
    r.extend_from_slice(&0u16.to_be_bytes()); // arcount
    r.extend_from_slice(&q[12..qend]);
    if let Some(a) = answer {
        r.extend_from_slice(&[0xC0, 0x0C]); // name: pointer to the question
        r.extend_from_slice(&1u16.to_be_bytes()); // A
        r.extend_from_slice(&1u16.to_be_bytes()); // IN
        r.extend_from_slice(&60u32.to_be_bytes()); // ttl
        r.extend_from_slice(&4u16.to_be_bytes());
        r.extend_from_slice(&a.octets());
    }
    Some((r, format!("{name} {qtype}")))
}

/// A lab with a running server on 198.18.0.1 and its operator key; hosts
/// added with [`ServerLab::new_host`] get 198.18.0.11, .12, ... on the same switch.
pub struct ServerLab {
    pub lab: Lab,
    pub srv: Server,
    pub key: String,
    next_host: u8,
}

impl ServerLab {
    /// `None` (after printing why) when the machine lacks the privileges.
    pub fn new() -> Option<ServerLab> {
        if !require_privileges() {
            return None;
        }
        let lab = Lab::new();
        let h = lab.host("server", "198.18.0.1/24");
        let srv = lab.start_server(&h);
        let key = srv.admin_key();
        lab.ensure(!key.is_empty(), "admin.key is empty");
        Some(ServerLab {
            lab,
            srv,
            key,
            next_host: 10,
        })
    }

    /// A new host on the server's switch.
    pub fn new_host(&mut self, name: &str) -> Host {
        self.next_host += 1;
        self.lab
            .host(name, &format!("198.18.0.{}/24", self.next_host))
    }
}
