//! Measuring a benchmark run: latency summaries, CPU time and peak RSS of
//! this process (and, best effort, of the host and of a local nats-server),
//! and reading back what a stream stored together with the server's store
//! timestamps.
//!
//! | item | what |
//! |---|---|
//! | [`Summary`] | count, min, mean, p50 / p95 / p99 (nearest rank), max of a set of durations, in ms |
//! | [`Usage`] / [`UsageDelta`] | `getrusage(RUSAGE_SELF)` (CPU, context switches), `/proc/stat`, `/proc/<server>/stat` and its threads' `status` at two instants |
//! | [`peak_rss_bytes`] / [`reset_peak_rss`] | `VmHWM` of `/proc/self/status`; reset through `/proc/self/clear_refs` |
//! | [`pid_listening_on`] | the local process listening on a loopback TCP port (the nats-server) |
//! | [`go_runtime_env`] | the Go runtime variables (`GOGC`, `GOMEMLIMIT`, ...) a local nats-server runs with |
//! | [`read_stream`] | every message of a stream from a sequence on, with its store time |

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, consumer};
use async_nats::HeaderMap;
use bytes::Bytes;
use mtx_runtime::pull::PullRequest;
use serde::Serialize;

/// Unix epoch nanoseconds now (wall clock, the clock JetStream stamps with).
pub fn unix_nanos() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// Distribution of a set of durations, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Samples.
    pub count: usize,
    /// Smallest.
    pub min_ms: f64,
    /// Mean.
    pub mean_ms: f64,
    /// Median (nearest rank).
    pub p50_ms: f64,
    /// 95th percentile (nearest rank).
    pub p95_ms: f64,
    /// 99th percentile (nearest rank).
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

impl Summary {
    /// Summarize durations given in nanoseconds (negative values, from clock
    /// steps, count as zero).
    pub fn of_nanos(mut v: Vec<i128>) -> Summary {
        if v.is_empty() {
            return Summary::default();
        }
        for x in &mut v {
            *x = (*x).max(0);
        }
        v.sort_unstable();
        let ms = |x: i128| x as f64 / 1e6;
        let rank = |q: f64| {
            let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
            ms(v[i])
        };
        Summary {
            count: v.len(),
            min_ms: ms(v[0]),
            mean_ms: v.iter().map(|x| *x as f64).sum::<f64>() / v.len() as f64 / 1e6,
            p50_ms: rank(0.50),
            p95_ms: rank(0.95),
            p99_ms: rank(0.99),
            max_ms: ms(v[v.len() - 1]),
        }
    }
}

/// Resource counters at one instant.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    at: Instant,
    user: Duration,
    system: Duration,
    host: Option<(Duration, Duration)>,
    server: Option<Duration>,
    switches: u64,
    server_switches: Option<u64>,
}

/// What happened between two [`Usage`] snapshots.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct UsageDelta {
    /// Wall time, seconds.
    pub wall_secs: f64,
    /// This process, user CPU seconds.
    pub user_secs: f64,
    /// This process, system CPU seconds.
    pub system_secs: f64,
    /// This process, user + system.
    pub cpu_secs: f64,
    /// `cpu_secs / wall_secs`: cores this process kept busy on average.
    pub cores: f64,
    /// The whole host, busy CPU seconds (every process: the server, this
    /// one, and anything else running), from `/proc/stat`.
    pub host_busy_secs: Option<f64>,
    /// CPUs of the host.
    pub host_cpus: usize,
    /// The nats-server, CPU seconds, when it runs locally and was found.
    pub server_cpu_secs: Option<f64>,
    /// Busy CPU seconds of everything else on the host (other processes'
    /// load, which disturbs the figures): host busy − this process − server.
    pub other_busy_secs: Option<f64>,
    /// Peak resident set size of this process during the interval, bytes
    /// (`VmHWM`, reset at the start of the interval when the kernel allows it).
    pub peak_rss_bytes: Option<u64>,
    /// This process, context switches (voluntary and not, all threads): how
    /// often its threads slept and were woken, the cost that grows with
    /// round trips and wake-ups rather than with bytes.
    pub context_switches: u64,
    /// The nats-server, context switches of its threads, when it runs
    /// locally and was found.
    pub server_context_switches: Option<u64>,
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

fn ticks(n: u64) -> Duration {
    Duration::from_secs_f64(n as f64 / clock_ticks())
}

/// `(busy, total)` CPU time of the host since boot.
fn host_cpu() -> Option<(Duration, Duration)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 5 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest is inside user)
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v[4];
    Some((ticks(total - idle), ticks(total)))
}

/// Context switches (voluntary + involuntary) of every thread of another
/// process, summed from `/proc/<pid>/task/*/status`.
fn process_switches(pid: u32) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0;
    for t in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(t.path().join("status")) else {
            continue; // the thread exited meanwhile
        };
        total += switches_in_status(&status);
    }
    Some(total)
}

/// `voluntary_ctxt_switches` + `nonvoluntary_ctxt_switches` of a
/// `/proc/.../status` text.
fn switches_in_status(status: &str) -> u64 {
    status
        .lines()
        .filter(|l| {
            l.starts_with("voluntary_ctxt_switches:")
                || l.starts_with("nonvoluntary_ctxt_switches:")
        })
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// User + system CPU time of another process.
fn process_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(ticks(utime + stime))
}

fn timeval(t: libc::timeval) -> Duration {
    Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
}

impl Usage {
    /// Counters now; `server` is the pid of a local nats-server, if known.
    pub fn now(server: Option<u32>) -> Usage {
        // SAFETY: getrusage writes into the zeroed struct we own.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        let ok = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } == 0;
        let (user, system, switches) = if ok {
            let n = |x: libc::c_long| u64::try_from(x).unwrap_or(0);
            (
                timeval(ru.ru_utime),
                timeval(ru.ru_stime),
                n(ru.ru_nvcsw) + n(ru.ru_nivcsw),
            )
        } else {
            (Duration::ZERO, Duration::ZERO, 0)
        };
        Usage {
            at: Instant::now(),
            user,
            system,
            host: host_cpu(),
            server: server.and_then(process_cpu),
            switches,
            server_switches: server.and_then(process_switches),
        }
    }

    /// The interval from `self` to `later`, with the current peak RSS.
    pub fn delta(&self, later: &Usage) -> UsageDelta {
        let wall = later.at.duration_since(self.at).as_secs_f64();
        let user = later.user.saturating_sub(self.user).as_secs_f64();
        let system = later.system.saturating_sub(self.system).as_secs_f64();
        let host_busy_secs = match (self.host, later.host) {
            (Some((a, _)), Some((b, _))) => Some(b.saturating_sub(a).as_secs_f64()),
            _ => None,
        };
        let server_cpu_secs = match (self.server, later.server) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a).as_secs_f64()),
            _ => None,
        };
        UsageDelta {
            wall_secs: wall,
            user_secs: user,
            system_secs: system,
            cpu_secs: user + system,
            cores: if wall > 0.0 {
                (user + system) / wall
            } else {
                0.0
            },
            host_busy_secs,
            host_cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            server_cpu_secs,
            other_busy_secs: host_busy_secs
                .map(|h| (h - user - system - server_cpu_secs.unwrap_or(0.0)).max(0.0)),
            peak_rss_bytes: peak_rss_bytes(),
            context_switches: later.switches.saturating_sub(self.switches),
            server_context_switches: match (self.server_switches, later.server_switches) {
                (Some(a), Some(b)) => Some(b.saturating_sub(a)),
                _ => None,
            },
        }
    }
}

/// Peak resident set size of this process (`VmHWM`), bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Reset the peak RSS to the current RSS (`echo 5 > /proc/self/clear_refs`);
/// false when the kernel does not allow it (the peak then covers the whole
/// process lifetime).
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Go runtime variables that shape a Go server's CPU use and latency tail,
/// its garbage collector above all: at a steady 1,000 signals/s a
/// nats-server with Go's default `GOGC=100` collects every second or so, and
/// each collection keeps both cores of a 2-core host busy for about 20 ms,
/// which makes the pipeline's raw → order p99 there.
pub const GO_RUNTIME_VARS: [&str; 4] = ["GOGC", "GOMEMLIMIT", "GOMAXPROCS", "GODEBUG"];

/// The [`GO_RUNTIME_VARS`] set in the environment local process `pid` was
/// started with (empty: Go's defaults, `GOGC=100` and no memory limit), so
/// a benchmark report says how the server it measured was tuned. `None`
/// when the environment cannot be read (another user's process).
pub fn go_runtime_env(pid: u32) -> Option<BTreeMap<String, String>> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    Some(parse_go_env(&raw))
}

/// The [`GO_RUNTIME_VARS`] of a NUL-separated `KEY=value` environment block.
fn parse_go_env(raw: &[u8]) -> BTreeMap<String, String> {
    raw.split(|b| *b == 0)
        .filter_map(|kv| {
            let (k, v) = std::str::from_utf8(kv).ok()?.split_once('=')?;
            GO_RUNTIME_VARS
                .contains(&k)
                .then(|| (k.to_string(), v.to_string()))
        })
        .collect()
}

/// Whether a Go server with runtime variables `env` collects garbage at
/// Go's default pace (`GOGC` unset or 100).
pub fn default_go_gc(env: &BTreeMap<String, String>) -> bool {
    env.get("GOGC").is_none_or(|v| v.trim() == "100")
}

/// The pid of the local process listening on `127.0.0.1:<port>` (or any
/// address) over TCP, found through `/proc/net/tcp{,6}` and the processes'
/// socket descriptors. `None` when it is remote or not visible to us.
pub fn pid_listening_on(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(t) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in t.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st ... inode (field 9)
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                continue;
            };
            let p = local
                .rsplit(':')
                .next()
                .and_then(|h| u16::from_str_radix(h, 16).ok());
            if p == Some(port) && *state == "0A" {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                if inodes.iter().any(|i| target.as_os_str() == i.as_str()) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

/// One message as a stream stored it.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Stream sequence.
    pub seq: u64,
    /// Subject.
    pub subject: String,
    /// Headers (empty when none).
    pub headers: HeaderMap,
    /// Body (empty when read headers-only).
    pub payload: Bytes,
    /// Body size, bytes (also when read headers-only).
    pub size: usize,
    /// When the server stored it, Unix epoch nanoseconds (server clock).
    pub stored_at: i128,
}

impl Stored {
    /// A header value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.as_str())
    }
}

/// Every message of `stream` with a sequence `>= from_seq` that was stored
/// when the call started, in stream order, read with an ephemeral
/// memory-storage consumer (no acks). `headers_only` skips the bodies.
pub async fn read_stream(
    js: &jetstream::Context,
    stream: &str,
    from_seq: u64,
    headers_only: bool,
) -> Result<Vec<Stored>, String> {
    let err = |what: &str, e: &dyn std::fmt::Display| format!("reading {stream}: {what}: {e}");
    let mut st = js.get_stream(stream).await.map_err(|e| err("stream", &e))?;
    let last = st
        .info()
        .await
        .map_err(|e| err("info", &e))?
        .state
        .last_sequence;
    let from = from_seq.max(1);
    if last < from {
        return Ok(Vec::new());
    }
    let c = st
        .create_consumer(consumer::pull::Config {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: from,
            },
            ack_policy: consumer::AckPolicy::None,
            headers_only,
            memory_storage: true,
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .map_err(|e| err("consumer", &e))?;
    let name = c.cached_info().name.clone();
    let mut out = Vec::new();
    let result = async {
        let mut seq = from - 1;
        while seq < last {
            let mut req =
                PullRequest::start(&c, js, 2000, Duration::from_secs(5), Duration::from_secs(1))
                    .await
                    .map_err(|e| err("pull", &e))?;
            let mut got = 0;
            while !req.is_done() && seq < last {
                for m in req.next_chunk(2000).await.map_err(|e| err("pull", &e))? {
                    got += 1;
                    let info = m.info().map_err(|e| err("message info", &e))?;
                    seq = info.stream_sequence;
                    let stored_at = info.published.unix_timestamp_nanos();
                    if seq > last {
                        break;
                    }
                    let headers = m.headers.clone().unwrap_or_default();
                    let size = if headers_only {
                        headers
                            .get("Nats-Msg-Size")
                            .and_then(|v| v.as_str().parse().ok())
                            .unwrap_or(0)
                    } else {
                        m.payload.len()
                    };
                    out.push(Stored {
                        seq,
                        subject: m.subject.to_string(),
                        headers,
                        payload: m.payload.clone(),
                        size,
                        stored_at,
                    });
                }
            }
            if got == 0 {
                // Nothing more to read (messages removed by limits).
                break;
            }
        }
        Ok::<(), String>(())
    }
    .await;
    let _ = st.delete_consumer(&name).await;
    result.map(|()| out)
}

/// Average body size per key (e.g. per message kind).
pub fn mean_sizes<'a>(
    items: impl IntoIterator<Item = (&'a str, usize)>,
) -> BTreeMap<String, usize> {
    let mut acc: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (k, s) in items {
        let e = acc.entry(k.to_string()).or_default();
        e.0 += s;
        e.1 += 1;
    }
    acc.into_iter()
        .map(|(k, (sum, n))| (k, sum / n.max(1)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_runtime_variables_are_read_from_an_environment_block() {
        let env = parse_go_env(b"PATH=/bin\0GOGC=1000\0GOMEMLIMIT=3GiB\0GOGCX=1\0junk\0\0");
        assert_eq!(
            env.into_iter().collect::<Vec<_>>(),
            [
                ("GOGC".to_string(), "1000".to_string()),
                ("GOMEMLIMIT".to_string(), "3GiB".to_string())
            ]
        );
        assert!(parse_go_env(b"").is_empty());
        let with = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        assert!(default_go_gc(&BTreeMap::new()));
        assert!(default_go_gc(&with("GOGC", "100")));
        assert!(default_go_gc(&with("GOMEMLIMIT", "1GiB")));
        assert!(!default_go_gc(&with("GOGC", "1000")));
        assert!(!default_go_gc(&with("GOGC", "off")));
    }

    #[test]
    fn a_local_process_environment_is_read_from_proc() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .env("GOGC", "1234")
            .env("GOMAXPROCS", "1")
            .spawn()
            .unwrap();
        // Until the child has exec'd, /proc shows the environment it forked
        // with (ours): wait for `sleep` to run.
        let exe = format!("/proc/{}/cmdline", child.id());
        for _ in 0..500 {
            if std::fs::read(&exe).is_ok_and(|c| c.starts_with(b"sleep")) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let env = go_runtime_env(child.id());
        let _ = child.kill();
        let _ = child.wait();
        let env = env.unwrap();
        assert_eq!(env.get("GOGC").map(String::as_str), Some("1234"));
        assert_eq!(env.get("GOMAXPROCS").map(String::as_str), Some("1"));
        assert!(go_runtime_env(u32::MAX).is_none());
    }

    #[test]
    fn context_switches_are_counted_for_this_process_and_another() {
        let status = "Name:\tx\nvoluntary_ctxt_switches:\t12\nnonvoluntary_ctxt_switches:\t3\n";
        assert_eq!(switches_in_status(status), 15);
        assert_eq!(switches_in_status("Name:\tx\n"), 0);
        // Every sleep gives the CPU up: a voluntary switch. Our own pid
        // stands in for the server. Its per-thread counts are summed over
        // the threads alive at each instant, so another test's thread
        // exiting in between can shrink the sum: try again then.
        let me = std::process::id();
        let mut last = None;
        for _ in 0..20 {
            let before = Usage::now(Some(me));
            for _ in 0..5 {
                std::thread::sleep(Duration::from_millis(2));
            }
            let d = before.delta(&Usage::now(Some(me)));
            if d.context_switches >= 5 && d.server_context_switches.is_some_and(|n| n >= 5) {
                last = None;
                break;
            }
            last = Some(d);
        }
        assert!(last.is_none(), "{last:?}");
        assert_eq!(process_switches(u32::MAX), None);
    }

    #[test]
    fn nearest_rank_percentiles() {
        let s = Summary::of_nanos((1..=100).map(|i| i * 1_000_000).collect());
        assert_eq!(s.count, 100);
        assert_eq!(s.p50_ms, 50.0);
        assert_eq!(s.p95_ms, 95.0);
        assert_eq!(s.p99_ms, 99.0);
        assert_eq!(s.max_ms, 100.0);
        assert_eq!(s.min_ms, 1.0);
        assert!((s.mean_ms - 50.5).abs() < 1e-9);
        let one = Summary::of_nanos(vec![-5, 2_000_000]);
        assert_eq!(one.min_ms, 0.0);
        assert_eq!(one.p99_ms, 2.0);
        assert_eq!(Summary::of_nanos(vec![]).count, 0);
    }

    #[test]
    fn usage_and_rss_are_readable_here() {
        let a = Usage::now(Some(std::process::id()));
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        assert!(x > 0);
        let d = a.delta(&Usage::now(Some(std::process::id())));
        assert!(d.wall_secs > 0.0);
        assert!(d.server_cpu_secs.is_some());
        assert!(peak_rss_bytes().unwrap_or(0) > 0);
    }
}
