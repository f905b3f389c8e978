//! Runs the SDKs' own test suites (sdk/js with Node's test runner, sdk/python
//! with pytest) so that `cargo test` covers them. Both suites are loopback
//! only: they test the SDKs against a fake gateway written in the test.
//!
//! Without node (>= 18), python3, httpx or pytest a test prints
//! `SKIPPED: <why>` and passes — except with CI=true, where it fails
//! (.ci/run installs them).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Each suite finishes in seconds; this only stops a hung one.
const SUITE_TIMEOUT: Duration = Duration::from_secs(300);

fn in_ci() -> bool {
    std::env::var("CI")
        .map(|v| v.eq_ignore_ascii_case("true") || v == "1")
        .unwrap_or(false)
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Prints why the suite cannot run and returns, or panics under CI=true.
fn skip(why: &str) {
    if in_ci() {
        panic!("CI=true and the SDK tests cannot run: {why}");
    }
    println!("SKIPPED: {why}");
    eprintln!("SKIPPED: {why}");
}

struct Output {
    success: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `cmd`, capturing its output; kills it after `SUITE_TIMEOUT`.
fn run(mut cmd: Command) -> std::io::Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_t = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let err_t = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let deadline = Instant::now() + SUITE_TIMEOUT;
    let (status, timed_out) = loop {
        if let Some(st) = child.try_wait()? {
            break (st, false);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break (child.wait()?, true);
        }
        thread::sleep(Duration::from_millis(50));
    };
    let stdout = out_t.join().unwrap_or_default();
    let mut stderr = err_t.join().unwrap_or_default();
    if timed_out {
        stderr.push_str(&format!("\n(killed after {SUITE_TIMEOUT:?})\n"));
    }
    Ok(Output {
        success: status.success() && !timed_out,
        code: status.code(),
        stdout,
        stderr,
    })
}

fn assert_suite(what: &str, cmd: Command) {
    let shown = format!("{cmd:?}");
    let out = run(cmd).unwrap_or_else(|e| panic!("{what}: cannot start {shown}: {e}"));
    if !out.success {
        panic!(
            "{what} failed (exit code {:?}): {shown}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.code, out.stdout, out.stderr
        );
    }
    println!("{what}: {shown} passed\n{}", out.stdout);
}

#[test]
fn js_sdk() {
    let root = repo_root();
    let version = match Command::new("node").arg("--version").output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        Ok(o) => {
            return skip(&format!(
                "`node --version` failed: {}",
                String::from_utf8_lossy(&o.stderr)
            ))
        }
        Err(e) => return skip(&format!("node is not installed ({e})")),
    };
    let major: u32 = version
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if major < 18 {
        return skip(&format!(
            "node {version} is too old; the JS SDK needs node >= 18"
        ));
    }
    // The files are named explicitly: `node --test DIR` means different things
    // across Node versions (a directory in 18/20, a glob pattern from 21).
    let dir = root.join("sdk/js/test");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(".test.js") || n.ends_with(".test.mjs"))
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no *.test.js files in {}", dir.display());
    let mut cmd = Command::new("node");
    cmd.current_dir(&root).arg("--test").args(&files);
    cmd.env_remove("MESH");
    assert_suite("the JS SDK tests", cmd);
}

#[test]
fn python_sdk() {
    let root = repo_root();
    match Command::new("python3")
        .args([
            "-c",
            "import httpx, pytest; print(httpx.__version__, pytest.__version__)",
        ])
        .output()
    {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            return skip(&format!(
                "python3 cannot import httpx and pytest (python3 -m pip install httpx pytest): {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ))
        }
        Err(e) => return skip(&format!("python3 is not installed ({e})")),
    }
    let mut cmd = Command::new("python3");
    cmd.current_dir(&root)
        // No .pytest_cache or __pycache__ left in the source tree.
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "sdk/python"])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env_remove("MESH");
    assert_suite("the Python SDK tests", cmd);
}
