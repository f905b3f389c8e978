//! Runs the served install script with `sh` against an in-process server on
//! 127.0.0.1, installing into a temp dir (TRELLIS_PREFIX/TRELLIS_STATE_DIR).
//! The server hands out a small fake `trellis` (TRELLIS_DOWNLOAD_BINARY) that
//! records its arguments, so nothing real is started. Its own test binary:
//! the env var is process-wide.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use trellis_control::dashboard::install::DOWNLOAD_BINARY_ENV;
use trellis_control::{Config, Server};

fn write_exec(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// `curl -fsSL URL/install.sh | sh -s -- ARGS` with the test's prefix and state dir.
fn run_installer(url: &str, prefix: &Path, state: &Path, args: &str) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(format!("curl -fsSL {url}/install.sh | sh -s -- {args}"))
        .env("TRELLIS_PREFIX", prefix)
        .env("TRELLIS_STATE_DIR", state)
        .output()
        .unwrap()
}

fn wait_for_file(path: &Path) -> String {
    let start = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            if s.ends_with('\n') {
                return s;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_script_downloads_the_binary_and_starts_the_agent_detached() {
    let dir = tempfile::tempdir().unwrap();
    let args_file = dir.path().join("args");
    // A fake agent: records its arguments, then stays up like the real one.
    let fake = dir.path().join("fake-trellis");
    write_exec(
        &fake,
        &format!(
            "#!/bin/sh\nprintf '%s\\n' \"$*\" > '{}'\necho 'fake agent running'\nexec sleep 30\n",
            args_file.display()
        ),
    );
    // A fake agent that fails at once.
    let failing = dir.path().join("failing-trellis");
    write_exec(
        &failing,
        "#!/bin/sh\necho 'error: join token not recognised' >&2\nexit 1\n",
    );
    std::env::set_var(DOWNLOAD_BINARY_ENV, &fake);

    let server = Server::start(Config {
        data_dir: dir.path().join("server"),
        listen: "127.0.0.1:0".parse().unwrap(),
        public_url: None,
        edge_udp: None,
        dns_suffix: "mesh".into(),
        flow_retention: trellis_control::flows::DEFAULT_FLOW_RETENTION,
        gateway_listen: None,
        gateway_tls: None,
    })
    .await
    .unwrap();
    let url = server.url();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(async move {
        let _ = rx.await;
    }));

    let prefix = dir.path().join("prefix");
    let state = dir.path().join("state with space");
    let u = url.clone();
    let (p, s) = (prefix.clone(), state.clone());
    let out = tokio::task::spawn_blocking(move || {
        run_installer(
            &u,
            &p,
            &s,
            "--token trj_abc --name box-1 --state-dir \"$TRELLIS_STATE_DIR\" --accept-dns=false",
        )
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    let log = state.join("agent.log");
    assert!(
        stdout.contains(&format!("its log: {}", log.display())),
        "{stdout}"
    );

    // The binary came from the server, executable.
    let bin = prefix.join("bin/trellis");
    assert_eq!(std::fs::read(&bin).unwrap(), std::fs::read(&fake).unwrap());
    let mode = std::fs::metadata(&bin).unwrap().permissions().mode();
    assert_eq!(mode & 0o111, 0o111, "{mode:o}");
    // It was started with the join arguments, detached, logging to agent.log.
    let args = wait_for_file(&args_file);
    assert_eq!(
        args.trim_end(),
        format!(
            "join --server {url} --token trj_abc --name box-1 --state-dir {} --accept-dns=false",
            state.display()
        )
    );
    let pid: i32 = std::fs::read_to_string(state.join("agent.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(unsafe { libc_kill(pid, 0) }, 0, "the agent runs on");
    let start = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("fake agent running")
    {
        assert!(start.elapsed() < Duration::from_secs(10), "no log");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Running it again replaces the running agent.
    std::fs::remove_file(&args_file).unwrap();
    let (u, p, s) = (url.clone(), prefix.clone(), state.clone());
    let out = tokio::task::spawn_blocking(move || run_installer(&u, &p, &s, "--token=trj_def"))
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("(pid {pid})")));
    let args = wait_for_file(&args_file);
    assert!(args.contains("--token trj_def"), "{args}");
    let pid2: i32 = std::fs::read_to_string(state.join("agent.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_ne!(pid, pid2);
    unsafe { libc_kill(pid2, 15) };

    // No token: a clear refusal before anything is downloaded.
    let empty = dir.path().join("empty");
    let (u, p, s) = (url.clone(), empty.join("prefix"), empty.join("state"));
    let out = tokio::task::spawn_blocking(move || run_installer(&u, &p, &s, ""))
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no join token given"));
    assert!(!empty.join("prefix/bin/trellis").exists());

    // An agent that dies at once: the script fails and shows its log.
    std::env::set_var(DOWNLOAD_BINARY_ENV, &failing);
    let (u, p, s) = (url.clone(), dir.path().join("p2"), dir.path().join("s2"));
    let out = tokio::task::spawn_blocking(move || run_installer(&u, &p, &s, "--token trj_bad"))
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("stopped right away"), "{stderr}");
    assert!(stderr.contains("join token not recognised"), "{stderr}");

    let _ = tx.send(());
    task.await.unwrap().unwrap();
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}
