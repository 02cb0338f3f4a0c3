//! The bits of HTTP/1.1 the mock servers share: reading a request head (bounded in size and
//! time), splitting its request line and headers, and decoding query strings. One request per
//! connection: the mocks always answer `Connection: close`.

use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

const MAX_HEAD: usize = 64 * 1024;
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// `<state>.requests` (appended to the full name, not replacing an extension).
pub fn requests_path(state: &Path) -> PathBuf {
    beside(state, ".requests")
}

/// `<state><suffix>`: the files a mock keeps next to its state file.
pub fn beside(state: &Path, suffix: &str) -> PathBuf {
    let mut p = state.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// The request head up to the blank line, bounded in size and time.
pub fn read_head(conn: &mut TcpStream) -> Result<String, &'static str> {
    conn.set_read_timeout(Some(HEAD_TIMEOUT))
        .map_err(|_| "socket")?;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_HEAD {
            return Err("request head too large");
        }
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return Err("incomplete request"),
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8(head).map_err(|_| "request head is not UTF-8")
}

/// A parsed request head: `GET /path?query HTTP/1.1` and its header lines.
pub struct Head<'a> {
    pub method: &'a str,
    /// Path and query as sent, starting with `/`.
    pub target: &'a str,
    lines: std::str::Split<'a, &'static str>,
}

impl<'a> Head<'a> {
    pub fn parse(head: &'a str) -> Result<Self, &'static str> {
        let mut lines = head.split("\r\n");
        let mut parts = lines.next().unwrap_or("").split(' ');
        let (Some(method), Some(target), Some(version), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("bad request line");
        };
        if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
            return Err("bad request line");
        }
        Ok(Self {
            method,
            target,
            lines,
        })
    }

    /// The first header called `name` (any case), trimmed.
    pub fn header(&self, name: &str) -> Option<&'a str> {
        self.lines
            .clone()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
    }

    /// The target split at `?`: (path, query), the query without the `?`.
    pub fn path_query(&self) -> (&'a str, &'a str) {
        self.target.split_once('?').unwrap_or((self.target, ""))
    }
}

/// `k=v&k2=v2` decoded; a pair without `=` has an empty value, empty pairs are skipped.
pub fn query_pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    query.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k), percent_decode(v))
    })
}

pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        500 => "Internal Server Error",
        _ => "Status",
    }
}

pub fn percent_decode(s: &str) -> String {
    let hex = |c: u8| (c as char).to_digit(16);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let escaped = match b.get(i..i + 3) {
            Some([b'%', h, l]) => hex(*h).zip(hex(*l)).map(|(h, l)| (h * 16 + l) as u8),
            _ => None,
        };
        match (escaped, b[i]) {
            (Some(c), _) => {
                out.push(c);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, c) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Serves each connection on its own thread, says `ready` once listening, and returns when
/// stdin closes (the test's signal to stop); connections still open end with the process.
pub fn serve_until_stdin_closes(
    listener: std::net::TcpListener,
    handle: impl Fn(TcpStream) + Send + Sync + Clone + 'static,
) {
    serve_reading_stdin(listener, handle, |_| {});
}

/// As `serve_until_stdin_closes`, passing each line read from stdin to `line` in order (the
/// wrapper's commands; invalid UTF-8 is replaced, not fatal).
pub fn serve_reading_stdin(
    listener: std::net::TcpListener,
    handle: impl Fn(TcpStream) + Send + Sync + Clone + 'static,
    mut line: impl FnMut(&str),
) {
    use std::io::BufRead;
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let handle = handle.clone();
            std::thread::spawn(move || handle(conn));
        }
    });
    println!("ready");
    let mut stdin = std::io::stdin().lock();
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match stdin.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => line(String::from_utf8_lossy(&buf).trim_end()),
        }
    }
}

/// The request log next to the state file, opened for appending (one line per request).
pub fn open_request_log(state: &Path) -> anyhow::Result<std::sync::Mutex<std::fs::File>> {
    open_log(&requests_path(state))
}

/// A log file opened for appending, for lines from several threads.
pub fn open_log(path: &Path) -> anyhow::Result<std::sync::Mutex<std::fs::File>> {
    use anyhow::Context;
    let file = std::fs::File::options()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    Ok(std::sync::Mutex::new(file))
}
