//! The page templates (askama, compiled into the binary).

use askama::Template;
use serde::Serialize;

/// The navigation bar of a logged-in page.
pub struct Nav {
    pub email: String,
    pub network: String,
    pub csrf: String,
    /// Which nav entry is the current page: "overview", "setup".
    pub current: &'static str,
}

/// One device as pages and `/dash/api/nodes` show it.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceView {
    pub name: String,
    pub ip: String,
    pub online: bool,
    /// "now", "12 s ago", "never".
    pub last_seen: String,
    /// RFC 3339, or empty when never seen.
    pub last_seen_at: String,
    pub os: String,
    pub version: String,
    pub tags: Vec<String>,
}

/// The result of a connection test, as shown and as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct TestResult {
    pub ok: bool,
    /// The plain sentence to show.
    pub message: String,
    pub rtt_ms: Option<f64>,
    pub path: Option<String>,
}

#[derive(Template)]
#[template(path = "message.html")]
pub struct MessagePage {
    pub nav: Option<Nav>,
    pub title: String,
    pub text: String,
}

#[derive(Template)]
#[template(path = "login.html")]
pub struct LoginPage {
    pub nav: Option<Nav>,
    pub csrf: String,
    pub email: String,
    pub error: Option<String>,
    pub no_admin: bool,
}

#[derive(Template)]
#[template(path = "setup_admin.html")]
pub struct SetupAdminPage {
    pub nav: Option<Nav>,
    pub step: u8,
    pub token: String,
    pub csrf: String,
    pub email: String,
    pub error: Option<String>,
}

#[derive(Template)]
#[template(path = "setup_network.html")]
pub struct NetworkPage {
    pub nav: Option<Nav>,
    pub step: u8,
    pub csrf: String,
    pub name: String,
    pub cidr: String,
    pub has_nodes: bool,
    /// The network's name now.
    pub current: String,
    pub error: Option<String>,
}

#[derive(Template)]
#[template(path = "setup_devices.html")]
pub struct DevicesPage {
    pub nav: Option<Nav>,
    pub step: u8,
    pub join_command: String,
    pub expires: String,
    pub network: String,
    pub devices: Vec<DeviceView>,
    pub online: usize,
}

#[derive(Template)]
#[template(path = "setup_test.html")]
pub struct TestPage {
    pub nav: Option<Nav>,
    pub step: u8,
    pub csrf: String,
    pub devices: Vec<DeviceView>,
    pub from: String,
    pub to: String,
    pub result: Option<TestResult>,
}

#[derive(Template)]
#[template(path = "setup_done.html")]
pub struct DonePage {
    pub nav: Option<Nav>,
    pub step: u8,
    pub network: String,
    pub cidr: String,
    pub domain: String,
    pub online: usize,
    pub devices: Vec<DeviceView>,
}

#[derive(Template)]
#[template(path = "home.html")]
pub struct HomePage {
    pub nav: Option<Nav>,
    pub network: String,
    pub cidr: String,
    pub domain: String,
    pub online: usize,
    pub devices: Vec<DeviceView>,
    /// The last 24 hours, in words: connections, bytes, denied attempts.
    pub traffic: String,
    /// The edge in words: where it listens and what it relayed.
    pub edge: String,
}
