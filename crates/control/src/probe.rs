//! PLACEHOLDER — replaced by the integrator with the real control→node probe
//! (another helper writes it: the control plane asks node `from` over its
//! control stream to reach node `to` and reports the result). Only the
//! signature and [`ProbeOutcome`] are the contract the dashboard codes against.

use crate::api::AppState;

/// The result of one connection test.
#[derive(Debug, Clone)]
pub struct ProbeOutcome {
    pub ok: bool,
    pub rtt_ms: Option<f64>,
    /// "direct" or "relay", when known.
    pub path: Option<String>,
    /// The plain sentence to show, e.g. "laptop reached db-server in 3 ms, directly".
    pub message: String,
}

/// Asks node `from_name` of `account_id` to reach node `to_name` through the mesh.
/// PLACEHOLDER: always fails until the real probe lands.
pub async fn probe(
    _state: &AppState,
    _account_id: i64,
    _from_name: &str,
    _to_name: &str,
) -> Result<ProbeOutcome, String> {
    Err("connection test not available yet".into())
}
