//! The worker pools this build can run, and how each is started.

use anyhow::{bail, Result};
use mtx_runtime::process::Process;

/// Every pool of the pipeline, in data-flow order. `run all` runs the ones
/// this build implements.
pub const ALL: &[&str] = &[
    "gateway",
    "bridge",
    "standardizer",
    "cerebro",
    "execution",
    "accounts",
    "sink",
];

/// Resolve `run` arguments to pool names.
pub fn select(names: &[String]) -> Result<Vec<&'static str>> {
    if names.is_empty() {
        bail!(
            "name the workers to run: `mtx run all` or one of: {}",
            ALL.join(", ")
        );
    }
    if names.iter().any(|n| n == "all") {
        return Ok(ALL.to_vec());
    }
    let mut out = Vec::new();
    for n in names {
        match ALL.iter().find(|w| **w == n.as_str()) {
            Some(w) => out.push(*w),
            None => bail!("unknown worker `{n}`; available: {}", ALL.join(", ")),
        }
    }
    Ok(out)
}

/// Start one pool inside the process.
pub async fn spawn(name: &str, process: &mut Process) -> Result<()> {
    match name {
        "gateway" => {
            mtx_gateway::serve(process).await?;
        }
        "bridge" => mtx_gateway::bridge::spawn(process).await?,
        "standardizer" => mtx_standardizer::worker::spawn(process)?,
        "cerebro" => {
            mtx_cerebro::worker::spawn(process).await?;
        }
        "execution" => {
            mtx_execution::worker::spawn(process)?;
        }
        "accounts" => {
            mtx_accounts::worker::spawn(process)?;
        }
        "sink" => {
            mtx_sink::spawn(process).await?;
        }
        _ => bail!("worker `{name}` has no runner"),
    }
    Ok(())
}
