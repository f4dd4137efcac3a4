//! Test harness: real servers per test, never mocks.
//!
//! - [`NatsServer`]: a nats-server with JetStream on a free loopback port and a
//!   temp store dir; can be killed (`SIGKILL`) and restarted on the same port
//!   and store.
//! - [`MongoServer`]: the MongoDB-wire-compatible SecantusDB on a free port
//!   with a temp storage dir; can be stopped and started again (durably:
//!   [`MongoServer::start_durable`]).
//! - [`bus`]: reading back what landed on a stream (assertions).
//! - [`unique`]: fresh stream prefixes / database names so tests run in
//!   parallel without interfering.
//!
//! Child processes are killed on drop and, through `PR_SET_PDEATHSIG`, also
//! when the test process dies (a panic that aborts, a killed test runner).
//! Binaries come from `NATS_SERVER_BIN` / `SECANTUS_BIN`, else from the
//! project-local install made by `deploy/local/servers.sh install`.

use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// The repository root (parent of this crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Locate a server binary: `$env_var`, else `.local/venv/bin/<name>`, else PATH.
pub fn server_bin(name: &str, env_var: &str) -> PathBuf {
    if let Ok(p) = std::env::var(env_var) {
        return PathBuf::from(p);
    }
    let local = repo_root().join(".local/venv/bin").join(name);
    if local.exists() {
        return local;
    }
    if let Ok(path) = std::env::var("PATH") {
        for d in std::env::split_paths(&path) {
            let c = d.join(name);
            if c.exists() {
                return c;
            }
        }
    }
    panic!("{name} not found: run `deploy/local/servers.sh install` or set {env_var}");
}

/// A free loopback TCP port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

/// A name no other test in any process uses (letters and digits only).
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}{}x{n}x{:x}", std::process::id(), t % 0xffff)
}

fn spawn_child(cmd: &mut Command, log: &Path) -> Child {
    let out = std::fs::File::create(log).expect("log file");
    let err = out.try_clone().expect("log file");
    cmd.stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .stdin(Stdio::null());
    // SAFETY: prctl is async-signal-safe; it only asks the kernel to SIGKILL
    // the child when its parent thread exits.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn()
        .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd.get_program()))
}

fn wait_port(port: u16, timeout: Duration, what: &str, log: &Path) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let tail = std::fs::read_to_string(log).unwrap_or_default();
    panic!("{what} did not listen on {port} within {timeout:?}; log:\n{tail}");
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A nats-server with JetStream for one test.
pub struct NatsServer {
    port: u16,
    dir: TempDir,
    extra: String,
    js_fields: String,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl NatsServer {
    /// Start with default JetStream settings.
    pub fn start() -> NatsServer {
        Self::start_with("", "")
    }

    /// Start with extra top-level config text (e.g. `authorization {...}`) and
    /// extra fields inside the `jetstream {}` block (e.g. `sync_interval: always`).
    pub fn start_with(extra: &str, js_fields: &str) -> NatsServer {
        Self::start_full(extra, js_fields, &[])
    }

    /// Start with default settings and extra environment variables (e.g.
    /// the Go runtime's `GOGC`), kept across [`Self::restart`].
    pub fn start_with_env(env: &[(&str, &str)]) -> NatsServer {
        Self::start_full("", "", env)
    }

    fn start_full(extra: &str, js_fields: &str, env: &[(&str, &str)]) -> NatsServer {
        let mut s = NatsServer {
            port: free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
            extra: extra.to_string(),
            js_fields: js_fields.to_string(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
        };
        s.launch();
        s
    }

    fn launch(&mut self) {
        let store = self.dir.path().join("store");
        let conf = format!(
            "listen: 127.0.0.1:{}\nserver_name: mtx_test_{}\njetstream {{\n  store_dir: \"{}\"\n  {}\n}}\n{}\n",
            self.port,
            self.port,
            store.display(),
            self.js_fields,
            self.extra
        );
        let conf_path = self.dir.path().join("nats.conf");
        std::fs::write(&conf_path, conf).expect("write nats.conf");
        let log = self.dir.path().join("nats.log");
        let mut cmd = Command::new(server_bin("nats-server", "NATS_SERVER_BIN"));
        cmd.arg("-c").arg(&conf_path);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        self.child = Some(spawn_child(&mut cmd, &log));
        wait_port(self.port, Duration::from_secs(15), "nats-server", &log);
    }

    /// `nats://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The port (stable across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// SIGKILL the server (data stays in the store dir).
    pub fn kill(&mut self) {
        kill(&mut self.child);
    }

    /// Start again on the same port and store after [`Self::kill`].
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// The server log so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The MongoDB-wire-compatible server for one test.
pub struct MongoServer {
    port: u16,
    dir: TempDir,
    durable: bool,
    child: Option<Child>,
}

impl MongoServer {
    /// Start on a free port with a temp storage dir.
    pub fn start() -> MongoServer {
        Self::launch_new(false)
    }

    /// Like [`MongoServer::start`], but every commit is synced to disk
    /// (`--sync-on-commit`) so acknowledged writes survive [`MongoServer::stop`]
    /// (a SIGKILL), as they do on a journaled MongoDB. Without it the stand-in
    /// loses its last acknowledged writes when killed. Slower per write: use it
    /// for tests that stop the server mid-run.
    pub fn start_durable() -> MongoServer {
        Self::launch_new(true)
    }

    fn launch_new(durable: bool) -> MongoServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = MongoServer {
            port: free_port(),
            dir,
            durable,
            child: None,
        };
        s.launch();
        s
    }

    fn launch(&mut self) {
        let log = self.dir.path().join("mongo.log");
        let mut cmd = Command::new(server_bin("secantusd-py", "SECANTUS_BIN"));
        cmd.arg("--host")
            .arg("127.0.0.1")
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--storage-path")
            .arg(self.dir.path().join("data"))
            .arg("--log-level")
            .arg("WARNING");
        if self.durable {
            cmd.arg("--sync-on-commit");
        }
        self.child = Some(spawn_child(&mut cmd, &log));
        wait_port(self.port, Duration::from_secs(60), "SecantusDB", &log);
    }

    /// Connection string (with the stand-in's `retryWrites=false`).
    pub fn uri(&self) -> String {
        format!(
            "mongodb://127.0.0.1:{}/?retryWrites=false&directConnection=true",
            self.port
        )
    }

    /// Stop (SIGKILL) the server; the data dir stays (with every
    /// acknowledged write only when started with [`MongoServer::start_durable`]).
    pub fn stop(&mut self) {
        kill(&mut self.child);
    }

    /// Start again on the same port and data.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }
}

impl Drop for MongoServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Poll `f` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Poll the async check `f` every 50 ms until it holds (`true`) or
/// `timeout` passes (`false`): the async counterpart of [`wait_for`].
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// [`eventually`] for a condition a test cannot go on without: panics,
/// naming `what`, once `timeout` has passed without it.
pub async fn until<F, Fut>(what: &str, timeout: Duration, f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    if !eventually(timeout, f).await {
        panic!("timed out waiting for {what}");
    }
}

/// The role users of `deploy/nats/auth.conf.tmpl` for tests.
pub mod nats_auth {
    use super::repo_root;

    /// Every role the template defines.
    pub const ROLES: &[&str] = &[
        "provider",
        "gateway",
        "bridge",
        "standardizer",
        "cerebro",
        "execution",
        "accounts",
        "sink",
        "marketdata",
        "ops",
        "admin",
    ];

    /// `deploy/nats/auth.conf.tmpl` rendered for `prefix` (same rules as
    /// `deploy/nats/render-auth.sh`: comment lines are left alone).
    pub fn render_auth(prefix: &str) -> String {
        let tmpl = std::fs::read_to_string(repo_root().join("deploy/nats/auth.conf.tmpl"))
            .expect("deploy/nats/auth.conf.tmpl");
        let (p, s, b) = if prefix.is_empty() {
            (String::new(), String::new(), String::new())
        } else {
            (
                format!("{prefix}."),
                format!("{}_", prefix.to_ascii_uppercase()),
                format!("{prefix}_"),
            )
        };
        let mut out = String::new();
        for line in tmpl.split_inclusive('\n') {
            if line.trim_start().starts_with('#') {
                out.push_str(line);
            } else {
                out.push_str(
                    &line
                        .replace("{{P}}", &p)
                        .replace("{{S}}", &s)
                        .replace("{{B}}", &b),
                );
            }
        }
        out
    }

    /// The test password of `role` (per test process).
    pub fn password(role: &str) -> String {
        format!("pw-{role}-{}", std::process::id())
    }

    /// A whole nats-server config block: the `$MTX_NATS_PW_<ROLE>` variables,
    /// the rendered template, and optionally an unrestricted `observer` user
    /// (user name = password) for a test's own setup and checks.
    pub fn config(prefix: &str, observer: Option<&str>) -> String {
        let mut conf = String::new();
        for role in ROLES {
            conf.push_str(&format!(
                "MTX_NATS_PW_{} = \"{}\"\n",
                role.to_ascii_uppercase(),
                password(role)
            ));
        }
        let mut rendered = render_auth(prefix);
        if let Some(o) = observer {
            rendered = rendered.replacen(
                "users = [",
                &format!("users = [\n    {{ user: {o}, password: \"{o}\" }}"),
                1,
            );
        }
        conf.push_str(&rendered);
        conf
    }
}

/// Reading back what landed on a stream, for assertions.
pub mod bus {
    use async_nats::jetstream::{self, consumer};
    use futures::StreamExt;
    use std::time::Duration;

    /// Every message stored in `stream` under `filter`, in order (an
    /// ephemeral, ack-less consumer, so nothing is changed).
    pub async fn read_all(
        js: &jetstream::Context,
        stream: &str,
        filter: &str,
    ) -> Vec<jetstream::Message> {
        let st = js.get_stream(stream).await.expect("stream");
        let c = st
            .create_consumer(consumer::pull::Config {
                filter_subject: filter.to_string(),
                ack_policy: consumer::AckPolicy::None,
                inactive_threshold: Duration::from_secs(30),
                ..Default::default()
            })
            .await
            .expect("ephemeral consumer");
        let mut out = Vec::new();
        loop {
            let mut batch = c
                .fetch()
                .max_messages(1000)
                .expires(Duration::from_millis(300))
                .messages()
                .await
                .expect("fetch");
            let mut got = 0;
            while let Some(Ok(m)) = batch.next().await {
                out.push(m);
                got += 1;
            }
            if got == 0 {
                break;
            }
        }
        out
    }
}
