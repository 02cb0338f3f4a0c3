//! A stand-in for Consul's `GET /v1/health/service/<name>`, including blocking queries, answering
//! from a JSON state file the test rewrites (see `lb_testkit::servers::ConsulMock`).
//!
//! Contract followed (Consul API docs, "List service instances" and "Blocking queries"): `index`
//! and `wait` (Go duration, default 5m, capped at 10m, no jitter here) make the request wait
//! until the index changes; an index ahead of the current one answers at once, which is how a
//! client notices a reset. `passing` keeps instances whose checks all pass, `tag` (repeatable)
//! keeps instances having every given tag, `dc` is accepted and ignored. Each request is logged
//! to `<state>.requests` before it waits, so a test can see that a blocking query has arrived.

use crate::http::{percent_decode, query_pairs, read_head, Head};
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::fs::File;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const POLL: Duration = Duration::from_millis(20);
const DEFAULT_WAIT: Duration = Duration::from_secs(5 * 60);
const MAX_WAIT: Duration = Duration::from_secs(10 * 60);

struct Shared {
    state: PathBuf,
    log: Mutex<File>,
}

/// Serves until stdin closes (the test's wrapper going away), like `serve`.
pub fn run(listen: SocketAddr, state: PathBuf) -> Result<()> {
    let log = crate::http::open_request_log(&state)?;
    let shared = Arc::new(Shared { state, log });
    let listener = TcpListener::bind(listen).with_context(|| format!("bind tcp {listen}"))?;
    crate::http::serve_until_stdin_closes(listener, move |conn| handle(conn, &shared));
    Ok(())
}

struct Reply {
    status: u16,
    /// `X-Consul-Index`; errors, like Consul's, have none and are plain text.
    index: Option<u64>,
    body: String,
}

impl Reply {
    fn error(status: u16, msg: &str) -> Self {
        Self {
            status,
            index: None,
            body: format!("{msg}\n"),
        }
    }
}

fn handle(mut conn: TcpStream, shared: &Shared) {
    let reply = match read_head(&mut conn) {
        Ok(head) => answer(&head, shared),
        Err(msg) => Reply::error(400, msg),
    };
    let reason = crate::http::reason(reply.status);
    let mut out = format!("HTTP/1.1 {} {reason}\r\n", reply.status);
    if let Some(i) = reply.index {
        out += "Content-Type: application/json\r\n";
        out += &format!(
            "X-Consul-Index: {i}\r\nX-Consul-Knownleader: true\r\nX-Consul-Lastcontact: 0\r\n"
        );
    } else {
        out += "Content-Type: text/plain; charset=utf-8\r\n";
    }
    out += &format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n{}",
        reply.body.len(),
        reply.body
    );
    let _ = conn.write_all(out.as_bytes());
    // `Connection: close`: one request per connection, so clients never rely on keep-alive.
    let _ = conn.shutdown(std::net::Shutdown::Write);
}

fn answer(head: &str, shared: &Shared) -> Reply {
    let head = match Head::parse(head) {
        Ok(h) => h,
        Err(msg) => return Reply::error(400, msg),
    };
    let (method, target) = (head.method, head.target);
    let token = head
        .header("X-Consul-Token")
        .filter(|v| !v.is_empty())
        .unwrap_or("-");
    if let Ok(mut log) = shared.log.lock() {
        let _ = writeln!(log, "{target} token={token}");
        let _ = log.flush();
    }
    if method != "GET" {
        return Reply::error(405, "method not allowed");
    }
    let (path, query) = head.path_query();
    let Some(service) = path.strip_prefix("/v1/health/service/") else {
        return Reply::error(404, "not found");
    };
    let service = percent_decode(service);
    match Query::parse(query) {
        Ok(q) => respond(&service, &q, &shared.state),
        Err(msg) => Reply::error(400, &msg),
    }
}

#[derive(Default)]
struct Query {
    index: Option<u64>,
    wait: Option<Duration>,
    passing: bool,
    tags: Vec<String>,
}

impl Query {
    fn parse(query: &str) -> Result<Self, String> {
        let mut q = Query::default();
        for (k, v) in query_pairs(query) {
            match k.as_str() {
                "index" => {
                    q.index = Some(v.parse().map_err(|_| format!("invalid index {v:?}"))?);
                }
                "wait" => {
                    let w = parse_duration(&v).ok_or_else(|| format!("invalid wait time {v:?}"))?;
                    q.wait = Some(w.min(MAX_WAIT));
                }
                // Consul: a bare `passing` means true, otherwise Go's strconv.ParseBool.
                "passing" => {
                    q.passing = match v.as_str() {
                        "" | "1" | "t" | "T" | "true" | "TRUE" | "True" => true,
                        "0" | "f" | "F" | "false" | "FALSE" | "False" => false,
                        _ => return Err(format!("invalid passing {v:?}")),
                    }
                }
                "tag" => q.tags.push(v),
                _ => {} // dc, stale, consistent, ns, filter…: accepted, no effect here
            }
        }
        Ok(q)
    }
}

/// A Go `time.ParseDuration` subset: one or more `<number><unit>` (ns, us, µs, ms, s, m, h),
/// decimals allowed; a bare `0` is zero.
fn parse_duration(s: &str) -> Option<Duration> {
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let num: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let secs = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += num * secs;
    }
    Duration::try_from_secs_f64(total).ok()
}

fn load(state: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(state).map_err(|e| format!("read state: {e}"))?;
    serde_json::from_str(&text).map_err(|e| format!("parse state: {e}"))
}

/// Tells a replaced state file (a new file renamed over it) from the one read.
fn file_version(path: &Path) -> Option<(u64, std::time::SystemTime, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.ino(), meta.modified().ok()?, meta.len()))
}

fn index_of(state: &Value) -> u64 {
    state["index"].as_u64().unwrap_or(0)
}

fn respond(service: &str, q: &Query, path: &Path) -> Reply {
    // Taken before reading, so a replacement in between is read again below, never missed.
    let mut version = file_version(path);
    let mut state = match load(path) {
        Ok(s) => s,
        Err(e) => return Reply::error(500, &e),
    };
    // Block only while the client's index is the current one; a client index ahead of ours
    // (the index went backwards) is answered at once.
    if let Some(want) = q.index.filter(|&i| i > 0) {
        let deadline = Instant::now() + q.wait.unwrap_or(DEFAULT_WAIT);
        // Read again only when replaced: a state may hold an answer of many MiB.
        while index_of(&state) == want && Instant::now() < deadline {
            std::thread::sleep(POLL);
            if file_version(path) == version {
                continue;
            }
            version = file_version(path);
            match load(path) {
                Ok(s) => state = s,
                Err(e) => return Reply::error(500, &e),
            }
        }
    }
    let index = index_of(&state);
    if let Some(raw) = state["raw_body"].as_str() {
        let status = state["raw_status"]
            .as_u64()
            .and_then(|s| u16::try_from(s).ok())
            .unwrap_or(200);
        return Reply {
            status,
            index: Some(index),
            body: raw.to_string(),
        };
    }
    let entries: Vec<Value> = state["services"][service]
        .as_array()
        .map(|v| v.as_slice())
        .unwrap_or_default()
        .iter()
        .filter(|i| !q.passing || i["status"] == "passing")
        .filter(|i| {
            let tags = i["tags"].as_array();
            q.tags
                .iter()
                .all(|t| tags.is_some_and(|have| have.iter().any(|h| h == t.as_str())))
        })
        .map(|i| entry(service, i))
        .collect();
    Reply {
        status: 200,
        index: Some(index),
        body: Value::Array(entries).to_string(),
    }
}

/// One instance in the shape Consul returns (the fields clients read).
fn entry(service: &str, i: &Value) -> Value {
    let node = i["node"].as_str().unwrap_or("node");
    let port = i["port"].as_u64().unwrap_or(0);
    let id = i["id"]
        .as_str()
        .map(String::from)
        .unwrap_or_else(|| format!("{service}-{node}-{port}"));
    json!({
        "Node": {
            "Node": node,
            "Address": i["node_address"].as_str().unwrap_or(""),
            "Datacenter": "dc1",
        },
        "Service": {
            "ID": id,
            "Service": service,
            "Tags": i["tags"].as_array().cloned().unwrap_or_default(),
            "Address": i["address"].as_str().unwrap_or(""),
            "Port": port,
            "Weights": { "Passing": i["weight"].as_u64().unwrap_or(1), "Warning": 1 },
        },
        "Checks": [{
            "Node": node,
            "CheckID": "serfHealth",
            "Status": i["status"].as_str().unwrap_or("passing"),
            "ServiceName": "",
        }],
    })
}
