//! The setup wizard in a real browser: headless Chromium, driven through
//! WebDriver (chromedriver) with `fantoccini`, walks the dashboard as a new
//! user would — setup link from the server's output, admin account, network
//! name, the join command run on two fresh machines, the devices coming
//! online, "test the connection", a binding for an agent (the optional
//! step; the page shows its `MESH=http://b_...` line) — and times it from
//! the server's start.
//!
//! The browser runs in the server's network namespace (chromedriver listens
//! on that namespace's loopback; the WebDriver client runs on a thread that
//! entered it). Needs root, /dev/net/tun, iproute2, curl, and Debian's
//! `chromium` and `chromium-driver`; without them the test prints
//! `SKIPPED: <why>` and passes — except with CI=true, where it fails.
//!
//! Screenshots of every step go to `target/dashboard-screenshots/`.

mod harness;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use harness::*;
use serde_json::json;

/// chromedriver's port on the server namespace's loopback.
const WEBDRIVER_PORT: u16 = 9515;
/// The whole wizard should take a new user less than this (goal, printed).
const GOAL: Duration = Duration::from_secs(60);
/// How long one page may take to show what the test waits for.
const STEP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the two devices may take to show up online after their join
/// commands ran.
const ONLINE_TIMEOUT: Duration = Duration::from_secs(45);

fn in_ci() -> bool {
    std::env::var("CI")
        .map(|v| v.eq_ignore_ascii_case("true") || v == "1")
        .unwrap_or(false)
}

/// `program` on PATH.
fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// (chromium, chromedriver), or None after printing `SKIPPED` (a panic
/// under CI=true).
fn browser_tools() -> Option<(PathBuf, PathBuf)> {
    let mut missing = Vec::new();
    let chromium = which("chromium").or_else(|| {
        missing.push("chromium");
        None
    });
    let driver = which("chromedriver").or_else(|| {
        missing.push("chromedriver");
        None
    });
    let curl = which("curl");
    if curl.is_none() {
        missing.push("curl");
    }
    match (chromium, driver) {
        (Some(c), Some(d)) if curl.is_some() => Some((c, d)),
        _ => {
            let why = format!(
                "the dashboard test needs {} (Debian packages chromium, chromium-driver, curl)",
                missing.join(" and ")
            );
            if in_ci() {
                panic!("CI=true and {why}");
            }
            println!("SKIPPED: {why}");
            eprintln!("SKIPPED: {why}");
            None
        }
    }
}

/// `target/dashboard-screenshots/`, created (the test binary lives in
/// `target/<profile>/deps/`).
fn screenshot_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let target = exe
        .ancestors()
        .nth(3)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("target"));
    let dir = target.join("dashboard-screenshots");
    std::fs::create_dir_all(&dir).expect("create target/dashboard-screenshots");
    dir
}

/// The setup link the server printed (`Set up Trellis: URL`), if it did.
fn setup_link(log: &str) -> Option<String> {
    let line = log.lines().find(|l| l.contains("Set up Trellis:"))?;
    let rest = &line[line.find("Set up Trellis:")? + "Set up Trellis:".len()..];
    let url: String = rest
        .trim_start()
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '\u{1b}')
        .collect();
    url.starts_with("http").then_some(url)
}

/// One machine the join command is run on.
struct Device {
    name: String,
    host: Host,
    prefix: PathBuf,
    state_dir: PathBuf,
}

/// What the walk through the wizard saw.
struct Walk {
    steps: Vec<(String, Duration)>,
    result: String,
}

/// The browser side: everything the wizard asks of a user, in order.
struct Browser<'a> {
    client: Client,
    shots: PathBuf,
    n: usize,
    t0: Instant,
    steps: Vec<(String, Duration)>,
    lab: &'a Lab,
}

impl Browser<'_> {
    async fn shot(&mut self, step: &str) {
        self.n += 1;
        let path = self.shots.join(format!("{:02}-{step}.png", self.n));
        match self.client.screenshot().await {
            Ok(png) => {
                if let Err(e) = std::fs::write(&path, png) {
                    eprintln!("[dashboard] could not save {}: {e}", path.display());
                }
            }
            Err(e) => eprintln!("[dashboard] screenshot {step} failed: {e}"),
        }
        let at = self.t0.elapsed();
        println!("[dashboard] {:>6.1} s  {step}", at.as_secs_f64());
        self.steps.push((step.to_string(), at));
    }

    async fn wait_for(
        &self,
        css: &str,
        what: &str,
    ) -> Result<fantoccini::elements::Element, String> {
        self.client
            .wait()
            .at_most(STEP_TIMEOUT)
            .every(Duration::from_millis(100))
            .for_element(Locator::Css(css))
            .await
            .map_err(|e| format!("{what}: no `{css}` within {STEP_TIMEOUT:?}: {e}"))
    }

    async fn fill(&self, css: &str, value: &str) -> Result<(), String> {
        let el = self.wait_for(css, "filling a form").await?;
        el.clear()
            .await
            .map_err(|e| format!("clearing `{css}`: {e}"))?;
        el.send_keys(value)
            .await
            .map_err(|e| format!("typing into `{css}`: {e}"))
    }

    async fn click(&self, css: &str) -> Result<(), String> {
        self.wait_for(css, "clicking")
            .await?
            .click()
            .await
            .map_err(|e| format!("clicking `{css}`: {e}"))
    }

    /// Picks the option of `select` whose value is `name` (or whose label
    /// starts with it).
    async fn pick(&self, select: &str, name: &str) -> Result<(), String> {
        let el = self.wait_for(select, "picking a device").await?;
        if el.select_by_value(name).await.is_ok() {
            return Ok(());
        }
        let picked = self
            .client
            .execute(
                "const s = document.querySelector(arguments[0]);
                 for (const o of s.options) {
                   if (o.value === arguments[1] || o.text.trim().startsWith(arguments[1])) {
                     s.value = o.value;
                     s.dispatchEvent(new Event('change', { bubbles: true }));
                     return true;
                   }
                 }
                 return false;",
                vec![json!(select), json!(name)],
            )
            .await
            .map_err(|e| format!("choosing {name} in `{select}`: {e}"))?;
        if picked == json!(true) {
            Ok(())
        } else {
            Err(format!("`{select}` has no option for device {name}"))
        }
    }

    /// The names of the devices shown online.
    async fn online(&self) -> Result<Vec<String>, String> {
        let items = self
            .client
            .find_all(Locator::Css("ul#devices li.device[data-online=\"true\"]"))
            .await
            .map_err(|e| format!("listing devices: {e}"))?;
        let mut names = Vec::new();
        for li in items {
            if let Ok(Some(n)) = li.attr("data-name").await {
                names.push(n);
            }
        }
        Ok(names)
    }

    async fn walk(&mut self, link: &str, devices: &[Device]) -> Result<String, String> {
        // 1. The setup link: create the admin.
        self.client
            .goto(link)
            .await
            .map_err(|e| format!("opening {link}: {e}"))?;
        self.wait_for("form#admin", "setup page").await?;
        self.shot("setup-admin").await;
        self.fill("form#admin input[name=email]", "admin@example.com")
            .await?;
        self.fill(
            "form#admin input[name=password]",
            "correct horse battery staple",
        )
        .await?;
        self.click("form#admin button[type=submit]").await?;

        // 2. Name the network.
        self.wait_for("form#network", "after creating the admin")
            .await?;
        self.wait_for("form#network input[name=cidr]", "network page (advanced)")
            .await?;
        self.shot("setup-network").await;
        self.fill("form#network input[name=name]", "home-lab")
            .await?;
        self.click("form#network button[type=submit]").await?;

        // 3. The join command, run on two fresh machines.
        let pre = self
            .wait_for("pre#join-command", "after naming the network")
            .await?;
        let command = pre
            .text()
            .await
            .map_err(|e| format!("reading pre#join-command: {e}"))?
            .trim()
            .to_string();
        self.shot("setup-devices").await;
        if command.lines().count() != 1 || !command.contains("--token") {
            return Err(format!(
                "pre#join-command should hold one shell command with a token; it holds {command:?}"
            ));
        }
        println!("[dashboard] join command: {command}");
        for d in devices {
            run_join(self.lab, d, &command)?;
        }
        self.steps
            .push(("join commands ran".into(), self.t0.elapsed()));

        // 4. Both show up online, live.
        let deadline = Instant::now() + ONLINE_TIMEOUT;
        loop {
            let online = self.online().await?;
            if devices.iter().all(|d| online.contains(&d.name)) {
                break;
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "after {ONLINE_TIMEOUT:?} the devices page shows online only {online:?}; expected {:?}",
                    devices.iter().map(|d| &d.name).collect::<Vec<_>>()
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.shot("devices-online").await;

        // 5. Test the connection.
        match self.client.find(Locator::Css("a#next")).await {
            Ok(next) => next
                .click()
                .await
                .map_err(|e| format!("clicking a#next on the devices page: {e}"))?,
            Err(_) => {
                return Err("the devices page has no a#next link to the test page".into());
            }
        }
        self.wait_for("select#from", "test page").await?;
        self.pick("select#from", &devices[0].name).await?;
        self.pick("select#to", &devices[1].name).await?;
        self.shot("test-page").await;
        let mut result = String::new();
        for attempt in 1..=3 {
            self.click("button#test-connection").await?;
            let deadline = Instant::now() + STEP_TIMEOUT;
            let mut settled = None;
            while Instant::now() < deadline {
                if let Ok(el) = self.client.find(Locator::Css("#test-result")).await {
                    let ok = el.attr("data-ok").await.ok().flatten();
                    let text = el.text().await.unwrap_or_default();
                    if ok.as_deref() == Some("true") {
                        settled = Some((true, text));
                        break;
                    }
                    if ok.as_deref() == Some("false") {
                        settled = Some((false, text));
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            match settled {
                Some((true, text)) => {
                    result = text;
                    break;
                }
                Some((false, text)) => {
                    println!("[dashboard] test attempt {attempt} failed: {text}");
                    result = text;
                }
                None => {
                    return Err(format!(
                        "#test-result got no data-ok within {STEP_TIMEOUT:?} of clicking #test-connection"
                    ))
                }
            }
            if attempt == 3 {
                return Err(format!("the connection test failed 3 times: {result:?}"));
            }
        }
        self.shot("test-ok").await;
        let expect = format!("{} reached {}", devices[0].name, devices[1].name);
        if !result.contains(&expect) {
            return Err(format!(
                "#test-result says {result:?}; expected it to start with {expect:?}"
            ));
        }

        // 6. Optional: connect an agent with a binding.
        self.click("a#next").await?;
        let name = self
            .wait_for("form#create-binding input[name=name]", "the agent step")
            .await?;
        let prefilled = name
            .prop("value")
            .await
            .map_err(|e| format!("reading the binding name: {e}"))?
            .unwrap_or_default();
        if prefilled != "agent" {
            return Err(format!(
                "the agent step should suggest the name \"agent\"; it shows {prefilled:?}"
            ));
        }
        self.shot("agent-step").await;
        self.click("form#create-binding button[type=submit]")
            .await?;
        let line = self
            .wait_for("pre#binding-line", "after creating the binding")
            .await?
            .text()
            .await
            .map_err(|e| format!("reading pre#binding-line: {e}"))?
            .trim()
            .to_string();
        if !line.starts_with("MESH=http://b_") || line.lines().count() != 1 {
            return Err(format!(
                "pre#binding-line should hold one line MESH=http://b_...; it holds {line:?}"
            ));
        }
        let curl = self
            .wait_for("pre#snippet-curl", "the curl snippet")
            .await?
            .text()
            .await
            .map_err(|e| format!("reading pre#snippet-curl: {e}"))?;
        if !curl.contains("curl --proxy \"$MESH\" http://") || !curl.contains(".home-lab.mesh/") {
            return Err(format!("the curl snippet is {curl:?}"));
        }
        self.shot("wizard-binding").await;

        // 7. Done.
        self.click("a#finish").await?;
        self.wait_for("#done", "after the agent step").await?;
        self.shot("done").await;
        Ok(result)
    }
}

/// Runs the join command the page showed on `d`, as the page says (piped
/// into `sudo sh`), with `--name` and `--accept-dns=false` added after `--`,
/// installing into `d.prefix` and keeping state in `d.state_dir`.
fn run_join(lab: &Lab, d: &Device, command: &str) -> Result<(), String> {
    // The test runs as root; `sudo` here only runs its arguments with the
    // environment kept (the real one may be missing, and would reset it).
    let shim = lab.path("sudo-shim");
    std::fs::create_dir_all(&shim).map_err(|e| e.to_string())?;
    let sudo = shim.join("sudo");
    if !sudo.exists() {
        std::fs::write(&sudo, "#!/bin/sh\nexec \"$@\"\n").map_err(|e| e.to_string())?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&sudo, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| e.to_string())?;
    }
    let script = format!(
        "export PATH='{}':\"$PATH\" TRELLIS_PREFIX='{}' TRELLIS_STATE_DIR='{}'; {command} --name {} --accept-dns=false",
        shim.display(),
        d.prefix.display(),
        d.state_dir.display(),
        d.name
    );
    let out = lab.run(&d.host.ns, "sh", &["-c", &script], Duration::from_secs(120));
    if !out.success() {
        return Err(format!(
            "the join command failed on {}:\n{}",
            d.name,
            out.describe()
        ));
    }
    Ok(())
}

/// Starts a WebDriver session with headless Chromium (the calling thread
/// must be in the server's namespace).
async fn connect(chromium: &Path, profile: &Path) -> Result<Client, String> {
    // Both rustls back-ends are in the build; pick one as the binary does.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut caps = serde_json::Map::new();
    caps.insert("browserName".into(), json!("chrome"));
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium.to_string_lossy(),
            "args": [
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--window-size=1280,900",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    ClientBuilder::rustls()
        .map_err(|e| format!("setting up the WebDriver client: {e}"))?
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{WEBDRIVER_PORT}"))
        .await
        .map_err(|e| format!("starting Chromium through chromedriver: {e}"))
}

#[test]
fn wizard_from_setup_link_to_successful_connection_test() {
    let Some((chromium, chromedriver)) = browser_tools() else {
        return;
    };
    let t0 = Instant::now();
    let Some(mut net) = ServerLab::new() else {
        return;
    };
    let server_up = t0.elapsed();
    println!("[dashboard] {:>6.1} s  server up", server_up.as_secs_f64());

    // The machines the user will add (namespaces only: nothing runs there yet).
    let devices: Vec<Device> = ["laptop", "db-server"]
        .into_iter()
        .map(|name| {
            let host = net.new_host(name);
            Device {
                name: name.to_string(),
                host,
                prefix: net.lab.path(&format!("{name}-prefix")),
                state_dir: net.lab.path(&format!("{name}-state")),
            }
        })
        .collect();
    let lab = &net.lab;
    let srv = &net.srv;

    let link = lab.check(
        eventually(secs(10.0), || {
            setup_link(&lab.log_of(srv.proc))
                .ok_or_else(|| "no `Set up Trellis: URL` line in the server's output".to_string())
        }),
        "the server's setup link",
    );
    println!("[dashboard] setup link: {link}");
    lab.ensure(
        link.starts_with(&format!("{}/setup?token=", srv.url)),
        format!(
            "setup link {link:?} does not point at {}/setup?token=…",
            srv.url
        ),
    );

    let driver_log = lab.path("chromedriver.log");
    let port = format!("--port={WEBDRIVER_PORT}");
    let log_arg = format!("--log-path={}", driver_log.display());
    let driver = lab.spawn(
        &srv.host,
        "chromedriver",
        &chromedriver.to_string_lossy(),
        &[&port, &log_arg],
    );
    let ready = eventually(secs(15.0), || {
        if let Some(st) = lab.exited(driver) {
            return Err(format!("chromedriver exited: {st}"));
        }
        // (chromedriver does not answer HTTP/1.0, so no `http_get` here.)
        let addr = SocketAddr::from(([127, 0, 0, 1], WEBDRIVER_PORT));
        in_netns(&srv.host.ns, move || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                .map(drop)
                .map_err(|e| format!("connect {addr}: {e}"))
        })
    });
    lab.check(ready, "chromedriver did not start");

    let shots = screenshot_dir();
    for old in std::fs::read_dir(&shots).into_iter().flatten().flatten() {
        if old.path().extension().is_some_and(|e| e == "png") {
            let _ = std::fs::remove_file(old.path());
        }
    }
    let profile = lab.path("chromium-profile");
    let ns = srv.host.ns.clone();
    let walked: Result<Walk, String> = std::thread::scope(|s| {
        s.spawn(|| {
            enter_netns(&ns)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("tokio runtime: {e}"))?;
            rt.block_on(async {
                let client = connect(&chromium, &profile).await?;
                let mut b = Browser {
                    client,
                    shots: shots.clone(),
                    n: 0,
                    t0,
                    steps: Vec::new(),
                    lab,
                };
                let r = b.walk(&link, &devices).await;
                let r = match r {
                    Ok(result) => Ok(result),
                    Err(e) => {
                        b.shot("failure").await;
                        let url = b
                            .client
                            .current_url()
                            .await
                            .map(|u| u.to_string())
                            .unwrap_or_default();
                        let src = b.client.source().await.unwrap_or_default();
                        let src: String = src.chars().take(4000).collect();
                        Err(format!("{e}\n\nbrowser at {url}; page:\n{src}"))
                    }
                };
                let steps = std::mem::take(&mut b.steps);
                let _ = b.client.close().await;
                r.map(|result| Walk { steps, result })
            })
        })
        .join()
        .unwrap_or_else(|_| Err("the browser thread panicked".into()))
    });

    let walk = match walked {
        Ok(w) => w,
        Err(e) => {
            let mut agents = String::new();
            for d in &devices {
                let log = std::fs::read_to_string(d.state_dir.join("agent.log"))
                    .unwrap_or_else(|e| format!("(no agent.log: {e})"));
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                agents.push_str(&format!(
                    "\n===== {} agent.log (last lines) =====\n{}",
                    d.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                ));
            }
            lab.fail(&format!("the wizard walk failed: {e}\n{agents}"));
        }
    };
    let total = walk.steps.last().map(|s| s.1).unwrap_or_default();
    let tested = walk
        .steps
        .iter()
        .find(|(s, _)| s == "test-ok")
        .map(|s| s.1)
        .unwrap_or(total);
    println!(
        "[dashboard] server start to a successful connection test: {:.1} s (goal: under {} s); result: {:?}",
        tested.as_secs_f64(),
        GOAL.as_secs(),
        walk.result
    );
    println!("[dashboard] screenshots in {}", shots.display());
    if tested > GOAL {
        println!(
            "[dashboard] NOTE: slower than the {} s goal",
            GOAL.as_secs()
        );
    }

    // The devices the browser saw are real: the CLI agrees they are online.
    let list = lab.nodes_list(srv, &net.key, Some("home-lab"));
    for d in &devices {
        lab.ensure(
            list.iter()
                .any(|n| n["name"] == d.name.as_str() && n["online"] == true),
            format!("{} is not online in `trellis nodes list`: {list:?}", d.name),
        );
    }
}
