//! A stand-in for the Kubernetes API server's list and watch of Services, EndpointSlices and
//! Pods, answering from a JSON state file the test rewrites and from single-object changes on
//! stdin (see `lb_testkit::KubeMock`). Plain HTTP, no authentication, one request per
//! connection.
//!
//! Collections, cluster-wide and per namespace: `/api/v1[/namespaces/NS]/services`,
//! `/api/v1[/namespaces/NS]/pods` and `/apis/discovery.k8s.io/v1[/namespaces/NS]/endpointslices`.
//! Contract followed (Kubernetes "API concepts": efficient detection of changes, retrieving
//! large results in chunks, receiving resources as metadata only):
//!
//! - The state file is `{"services": [..], "endpointslices": [..], "pods": [..],
//!   "disconnect": N, "compact": N}`, read at start and on each `{"reload": true}` line on
//!   stdin, which is answered with a `reloaded` line on stdout once applied. Objects (keyed by
//!   kind, namespace, name) are diffed against the previous set; every added, changed or
//!   removed one takes the next global resourceVersion (integers, as strings) and an
//!   ADDED/MODIFIED/DELETED event is logged. The server fills in `kind`, `apiVersion`,
//!   `metadata.namespace` (`default` if absent), `uid` (unless the object names its own, as a
//!   test of pods' cgroups needs) and `resourceVersion`.
//! - One object at a time, without rewriting the file (a stream of changes at any rate, in the
//!   order of the lines): `{"kind": "services"|"endpointslices"|"pods", "put": <object>}` adds
//!   or replaces it, `{"kind": .., "delete": {"namespace": .., "name": ..}}` removes it. With a
//!   `"tag"`, each time its event is written to a watch the line `<tag> <CLOCK_MONOTONIC µs>`
//!   goes to `<state>.emitted`, taken right after the write: when the client could first read
//!   it.
//! - A list answers the current objects; `resourceVersion` is the current global one. `limit`
//!   pages with a `continue` token (later pages come from the state at the time they are asked
//!   for, with the first page's resourceVersion). `labelSelector` takes `k=v`, `k==v`, `k!=v`,
//!   `k`, `!k` terms joined by commas; `fieldSelector` honours `metadata.name`,
//!   `metadata.namespace` and, for pods, `spec.nodeName`, and ignores other fields.
//! - `Accept: application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1` (or `as=
//!   PartialObjectMetadata` for a watch) answers each object as a `meta.k8s.io/v1`
//!   `PartialObjectMetadata`: its metadata alone.
//! - A watch (`watch=true|1`) streams one JSON event per line in a chunked response: every event
//!   after the requested `resourceVersion`, then new ones as they happen, until `timeoutSeconds`
//!   (default 30 min) passes, at which point the response ends properly. Without a
//!   resourceVersion (or `0`) it starts with an ADDED event per current object; with
//!   `sendInitialEvents=true` those are followed by a BOOKMARK annotated
//!   `k8s.io/initial-events-end`. With a selector, an object changing into or out of the
//!   selection is ADDED or DELETED, as the API server does.
//! - `disconnect` increasing closes every open watch abruptly (no final chunk), as a dropped
//!   connection. `compact` increasing advances the resourceVersion and forgets the history: a
//!   watch from any earlier resourceVersion gets a 410 Expired ERROR event and ends, as do list
//!   continuations started earlier (HTTP 410). Watches already open keep streaming.
//! - Each request is logged as `<METHOD> <path?query>` to `<state>.requests` before it is
//!   answered or waits.

use crate::http::{query_pairs, read_head, Head};
use anyhow::{Context, Result};
use lb_testkit::procs::monotonic_micros;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A watch without `timeoutSeconds` (the API server picks 30–60 min).
const DEFAULT_WATCH: Duration = Duration::from_secs(30 * 60);
/// How often a waiting watch checks whether its client went away.
const WATCH_TICK: Duration = Duration::from_millis(500);

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Kind {
    Service,
    EndpointSlice,
    Pod,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Pod];

    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Pod => "Pod",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::Pod => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    /// The collection's name, in paths and in the state file.
    fn state_field(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Pod => "pods",
        }
    }

    /// Field selectors this kind honours beyond `metadata.name` and `metadata.namespace`.
    fn own_fields(self) -> &'static [&'static str] {
        match self {
            Kind::Pod => &["spec.nodeName"],
            _ => &[],
        }
    }
}

/// (kind, namespace, name)
type Key = (Kind, String, String);

struct Stored {
    /// As the test wrote it, to tell whether it changed.
    raw: Value,
    /// As served, with kind, apiVersion, namespace, uid and resourceVersion.
    served: Value,
}

struct Event {
    rv: u64,
    kind: Kind,
    /// The object before this change (None when added), to tell selection changes.
    old: Option<Value>,
    /// The object after it (for a deletion: the last state, at the deletion's version).
    new: Value,
    deleted: bool,
    /// Logged to `<state>.emitted` when written to a watch.
    tag: Option<String>,
}

struct Store {
    /// The current (latest assigned) resourceVersion.
    rv: u64,
    objects: BTreeMap<Key, Stored>,
    events: Vec<Event>,
    /// Watches from a resourceVersion below this get 410 Expired.
    oldest: u64,
    disconnect: u64,
    compact: u64,
    next_uid: u64,
}

impl Store {
    fn new() -> Self {
        Store {
            rv: 1,
            objects: BTreeMap::new(),
            events: Vec::new(),
            oldest: 0,
            disconnect: 0,
            compact: 0,
            next_uid: 1,
        }
    }
}

struct Shared {
    state: PathBuf,
    log: Mutex<File>,
    emitted: Mutex<File>,
    store: Mutex<Store>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Logs the tagged events just written to a watch, stamped once for the whole write.
    fn emitted(&self, tags: &[String]) {
        if tags.is_empty() {
            return;
        }
        let at = monotonic_micros();
        let lines: String = tags.iter().map(|t| format!("{t} {at}\n")).collect();
        if let Ok(mut f) = self.emitted.lock() {
            let _ = f.write_all(lines.as_bytes());
        }
    }
}

/// Serves until stdin closes (the test's wrapper going away), like `consul-mock`, taking the
/// wrapper's commands from stdin in order.
pub fn run(listen: SocketAddr, state: PathBuf) -> Result<()> {
    let log = crate::http::open_request_log(&state)?;
    let emitted = crate::http::open_log(&crate::http::beside(&state, ".emitted"))?;
    let shared = Arc::new(Shared {
        state,
        log,
        emitted,
        store: Mutex::new(Store::new()),
        changed: Condvar::new(),
    });
    reload(&shared);
    let listener = TcpListener::bind(listen).with_context(|| format!("bind tcp {listen}"))?;
    let commands = shared.clone();
    crate::http::serve_reading_stdin(
        listener,
        move |conn| handle(conn, &shared),
        move |line| command(&commands, line),
    );
    Ok(())
}

/// Reads the state file and applies the difference.
fn reload(shared: &Shared) {
    // A missing file is an empty state (the wrapper writes one before starting us anyway).
    let text = std::fs::read_to_string(&shared.state).unwrap_or_else(|_| "{}".into());
    let state: Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "kube-mock: state file: {e}; kept the old state"
            );
            return;
        }
    };
    apply(&mut shared.lock(), &state);
    shared.changed.notify_all();
}

/// What a line on stdin asks for.
#[derive(Debug, PartialEq)]
enum Command {
    Reload,
    /// `None`: delete.
    Change(Key, Option<Value>, Option<String>),
}

fn parse_command(line: &str) -> Result<Command, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
    if v["reload"] == json!(true) {
        return Ok(Command::Reload);
    }
    let named = v["kind"].as_str();
    let kind = Kind::ALL
        .into_iter()
        .find(|k| Some(k.state_field()) == named)
        .ok_or_else(|| format!("unknown kind {named:?}"))?;
    let tag = v["tag"].as_str().map(String::from);
    let (meta, object) = match (&v["put"], &v["delete"]) {
        (Value::Object(_), Value::Null) => (&v["put"]["metadata"], Some(v["put"].clone())),
        (Value::Null, Value::Object(_)) => (&v["delete"], None),
        _ => return Err("a change needs one of put (an object) or delete".into()),
    };
    let name = meta["name"].as_str().ok_or("no metadata.name")?;
    let ns = meta["namespace"].as_str().unwrap_or("default");
    Ok(Command::Change(
        (kind, ns.to_string(), name.to_string()),
        object,
        tag,
    ))
}

/// One line from the wrapper. A bad line is reported and skipped: the stream goes on.
fn command(shared: &Shared, line: &str) {
    match parse_command(line) {
        Ok(Command::Reload) => {
            reload(shared);
            // The wrapper waits for this, so that every request it makes later sees the file.
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "reloaded");
            let _ = out.flush();
        }
        Ok(Command::Change(key, object, tag)) => {
            let mut store = shared.lock();
            match object {
                Some(raw) => put(&mut store, key, raw, tag),
                None => remove(&mut store, &key, tag),
            }
            drop(store);
            shared.changed.notify_all();
        }
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "kube-mock: command {line:?}: {e}; skipped"
            );
        }
    }
}

fn apply(store: &mut Store, state: &Value) {
    let mut new: BTreeMap<Key, Value> = BTreeMap::new();
    for kind in Kind::ALL {
        let items = state[kind.state_field()].as_array();
        for item in items.map(Vec::as_slice).unwrap_or_default() {
            let Some(name) = item["metadata"]["name"].as_str() else {
                let _ = writeln!(
                    std::io::stderr(),
                    "kube-mock: a {} without metadata.name, skipped",
                    kind.name()
                );
                continue;
            };
            let ns = item["metadata"]["namespace"].as_str().unwrap_or("default");
            new.insert((kind, ns.to_string(), name.to_string()), item.clone());
        }
    }
    let gone: Vec<Key> = store
        .objects
        .keys()
        .filter(|k| !new.contains_key(*k))
        .cloned()
        .collect();
    for key in gone {
        remove(store, &key, None);
    }
    for (key, raw) in new {
        put(store, key, raw, None);
    }
    let disconnect = state["disconnect"].as_u64().unwrap_or(0);
    store.disconnect = store.disconnect.max(disconnect);
    let compact = state["compact"].as_u64().unwrap_or(0);
    if compact > store.compact {
        store.compact = compact;
        // Every version handed out so far becomes too old to watch from.
        store.rv += 1;
        store.oldest = store.rv;
    }
}

/// Removes an object (if present) with a DELETED event.
fn remove(store: &mut Store, key: &Key, tag: Option<String>) {
    let Some(old) = store.objects.remove(key) else {
        return;
    };
    store.rv += 1;
    let mut last = old.served.clone();
    last["metadata"]["resourceVersion"] = json!(store.rv.to_string());
    store.events.push(Event {
        rv: store.rv,
        kind: key.0,
        old: Some(old.served),
        new: last,
        deleted: true,
        tag,
    });
}

/// Adds or replaces an object with an ADDED or MODIFIED event; the same content again is no
/// change and no event.
fn put(store: &mut Store, key: Key, raw: Value, tag: Option<String>) {
    let old = store.objects.get(&key);
    if old.is_some_and(|o| o.raw == raw) {
        return;
    }
    let given = raw["metadata"]["uid"].as_str();
    let uid = match given.or_else(|| old.and_then(|o| o.served["metadata"]["uid"].as_str())) {
        Some(u) => u.to_string(),
        None => {
            store.next_uid += 1;
            format!("6b75626d-0000-4000-8000-{:012x}", store.next_uid)
        }
    };
    let old = old.map(|o| o.served.clone());
    store.rv += 1;
    let served = serve_form(&key, &raw, &uid, store.rv);
    store.events.push(Event {
        rv: store.rv,
        kind: key.0,
        old,
        new: served.clone(),
        deleted: false,
        tag,
    });
    store.objects.insert(key, Stored { raw, served });
}

fn serve_form(key: &Key, raw: &Value, uid: &str, rv: u64) -> Value {
    let mut obj = match raw {
        Value::Object(m) => m.clone(),
        _ => Map::new(),
    };
    obj.insert("kind".into(), json!(key.0.name()));
    obj.insert("apiVersion".into(), json!(key.0.api_version()));
    let meta = obj
        .entry("metadata")
        .or_insert_with(|| json!({}))
        .as_object_mut();
    if let Some(meta) = meta {
        meta.insert("namespace".into(), json!(key.1));
        meta.insert("uid".into(), json!(uid));
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
    }
    Value::Object(obj)
}

/// A Kubernetes `Status` failure body.
fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn send_json(conn: &mut TcpStream, code: u16, body: &Value) {
    let body = body.to_string();
    let reason = match code {
        410 => "Gone",
        c => crate::http::reason(c),
    };
    let out = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.write_all(out.as_bytes());
    let _ = conn.shutdown(Shutdown::Write);
}

fn handle(mut conn: TcpStream, shared: &Shared) {
    let text = match read_head(&mut conn) {
        Ok(t) => t,
        Err(msg) => return send_json(&mut conn, 400, &status(400, "BadRequest", msg)),
    };
    let head = match Head::parse(&text) {
        Ok(h) => h,
        Err(msg) => return send_json(&mut conn, 400, &status(400, "BadRequest", msg)),
    };
    if let Ok(mut log) = shared.log.lock() {
        let _ = writeln!(log, "{} {}", head.method, head.target);
        let _ = log.flush();
    }
    if head.method != "GET" {
        let msg = "the server does not allow this method on the requested resource";
        return send_json(&mut conn, 405, &status(405, "MethodNotAllowed", msg));
    }
    let (path, query) = head.path_query();
    let Some((kind, ns)) = route(path) else {
        let msg = "the server could not find the requested resource";
        return send_json(&mut conn, 404, &status(404, "NotFound", msg));
    };
    let q = match Query::parse(query) {
        Ok(q) => q,
        Err(msg) => return send_json(&mut conn, 400, &status(400, "BadRequest", &msg)),
    };
    let accept = head.header("accept").unwrap_or_default();
    let metadata_only = accept.contains("as=PartialObjectMetadata");
    let sel = Selection {
        kind,
        ns,
        q: &q,
        metadata_only,
    };
    if q.watch {
        watch(conn, shared, &sel);
    } else {
        let (code, body) = list(shared, &sel);
        send_json(&mut conn, code, &body);
    }
}

/// The collection a path names: its kind and namespace (None: all namespaces).
fn route(path: &str) -> Option<(Kind, Option<String>)> {
    let (group, rest) = if let Some(r) = path.strip_prefix("/api/v1") {
        ("v1", r)
    } else if let Some(r) = path.strip_prefix("/apis/discovery.k8s.io/v1") {
        ("discovery.k8s.io/v1", r)
    } else {
        return None;
    };
    let segs: Vec<&str> = rest.strip_prefix('/')?.split('/').collect();
    let (ns, plural) = match segs[..] {
        [p] => (None, p),
        ["namespaces", ns, p] if !ns.is_empty() => (Some(crate::http::percent_decode(ns)), p),
        _ => return None,
    };
    let kind = Kind::ALL
        .into_iter()
        .find(|k| k.state_field() == plural && k.api_version() == group)?;
    Some((kind, ns))
}

enum Term {
    Eq(String, String),
    NotEq(String, String),
    Exists(String),
    NotExists(String),
}

#[derive(Default)]
struct Query {
    watch: bool,
    labels: Vec<Term>,
    fields: Vec<Term>,
    limit: Option<usize>,
    cont: Option<String>,
    /// None: absent (or empty).
    rv: Option<String>,
    rv_match: Option<String>,
    timeout: Option<Duration>,
    initial_events: bool,
}

impl Query {
    fn parse(query: &str) -> Result<Self, String> {
        let mut q = Query::default();
        for (k, v) in query_pairs(query) {
            match k.as_str() {
                "watch" => q.watch = matches!(v.as_str(), "true" | "1"),
                "labelSelector" => q.labels = selector(&v)?,
                "fieldSelector" => q.fields = selector(&v)?,
                "limit" => {
                    let n: usize = v.parse().map_err(|_| format!("invalid limit {v:?}"))?;
                    q.limit = (n > 0).then_some(n);
                }
                "continue" => q.cont = Some(v).filter(|v| !v.is_empty()),
                "resourceVersion" => q.rv = Some(v).filter(|v| !v.is_empty()),
                "resourceVersionMatch" => q.rv_match = Some(v).filter(|v| !v.is_empty()),
                "timeoutSeconds" => {
                    let s: u64 = v
                        .parse()
                        .map_err(|_| format!("invalid timeoutSeconds {v:?}"))?;
                    q.timeout = Some(Duration::from_secs(s));
                }
                "sendInitialEvents" => q.initial_events = v == "true",
                // allowWatchBookmarks (no periodic bookmarks here), pretty, …: no effect.
                _ => {}
            }
        }
        Ok(q)
    }
}

/// Equality-based selector terms: `k=v`, `k==v`, `k!=v`, `k`, `!k`, comma-joined.
fn selector(s: &str) -> Result<Vec<Term>, String> {
    if s.contains(['(', ')']) {
        return Err(format!("unsupported selector {s:?} (equality-based only)"));
    }
    let mut terms = Vec::new();
    for t in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let bad = || format!("unsupported selector term {t:?} (equality-based only)");
        if t.contains(' ') {
            return Err(bad());
        }
        let term = if let Some((k, v)) = t.split_once("!=") {
            Term::NotEq(k.into(), v.into())
        } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
            Term::Eq(k.into(), v.into())
        } else if let Some(k) = t.strip_prefix('!') {
            Term::NotExists(k.into())
        } else {
            Term::Exists(t.into())
        };
        match &term {
            Term::Eq(k, _) | Term::NotEq(k, _) | Term::Exists(k) | Term::NotExists(k)
                if k.is_empty() || k.contains(['=', '!']) =>
            {
                return Err(bad())
            }
            _ => {}
        }
        terms.push(term);
    }
    Ok(terms)
}

fn term_matches(term: &Term, value: impl Fn(&str) -> Option<String>) -> bool {
    match term {
        Term::Eq(k, v) => value(k).as_deref() == Some(v.as_str()),
        Term::NotEq(k, v) => value(k).as_deref() != Some(v.as_str()),
        Term::Exists(k) => value(k).is_some(),
        Term::NotExists(k) => value(k).is_none(),
    }
}

/// Which objects a request is about, and in which form.
struct Selection<'a> {
    kind: Kind,
    ns: Option<String>,
    q: &'a Query,
    /// Metadata only (`PartialObjectMetadata`).
    metadata_only: bool,
}

impl Selection<'_> {
    fn matches(&self, kind: Kind, obj: &Value) -> bool {
        let meta = &obj["metadata"];
        if kind != self.kind
            || self
                .ns
                .as_deref()
                .is_some_and(|ns| meta["namespace"].as_str() != Some(ns))
        {
            return false;
        }
        let label = |k: &str| meta["labels"][k].as_str().map(String::from);
        let known = |k: &str| {
            k == "metadata.name" || k == "metadata.namespace" || kind.own_fields().contains(&k)
        };
        // A dotted path into the object: `spec.nodeName` is obj["spec"]["nodeName"].
        let field = |k: &str| {
            let value = k.split('.').fold(obj, |v, part| &v[part]);
            value.as_str().map(String::from)
        };
        let known_field = |t: &Term| match t {
            Term::Eq(k, _) | Term::NotEq(k, _) | Term::Exists(k) | Term::NotExists(k) => known(k),
        };
        self.q.labels.iter().all(|t| term_matches(t, label))
            && self
                .q
                .fields
                .iter()
                .filter(|t| known_field(t))
                .all(|t| term_matches(t, field))
    }

    /// The watch event an event is for this selection, if any.
    fn event_line(&self, ev: &Event) -> Option<String> {
        if ev.kind != self.kind {
            return None;
        }
        let was = ev.old.as_ref().is_some_and(|o| self.matches(ev.kind, o));
        let is = !ev.deleted && self.matches(ev.kind, &ev.new);
        let ty = match (was, is) {
            (false, false) => return None,
            (false, true) => "ADDED",
            (true, true) => "MODIFIED",
            (true, false) => "DELETED",
        };
        // An object leaving the selection (deleted or not) goes out as its new state.
        Some(json!({"type": ty, "object": self.form(&ev.new)}).to_string())
    }

    /// An object as this request asked for it: whole, or its metadata alone.
    fn form(&self, obj: &Value) -> Value {
        if !self.metadata_only {
            return obj.clone();
        }
        json!({
            "apiVersion": "meta.k8s.io/v1",
            "kind": "PartialObjectMetadata",
            "metadata": obj["metadata"],
        })
    }
}

fn list(shared: &Shared, sel: &Selection) -> (u16, Value) {
    let store = shared.lock();
    let q = sel.q;
    // Continue token: `<list resourceVersion>/<namespace>/<name>` of the last item sent.
    let (list_rv, after) = match &q.cont {
        None => (store.rv, None),
        Some(token) => {
            let mut parts = token.splitn(3, '/');
            let (Some(Ok(rv)), Some(ns), Some(name)) = (
                parts.next().map(str::parse::<u64>),
                parts.next(),
                parts.next(),
            ) else {
                return (400, status(400, "BadRequest", "invalid continue token"));
            };
            if rv < store.oldest {
                let msg = "The provided continue parameter is too old to display a consistent \
                           list result. You can start a new list without the continue parameter.";
                return (410, status(410, "Expired", msg));
            }
            (rv, Some((ns.to_string(), name.to_string())))
        }
    };
    if q.cont.is_none() && q.rv_match.as_deref() == Some("Exact") {
        let exact = q.rv.as_deref().and_then(|v| v.parse::<u64>().ok());
        if exact != Some(store.rv) {
            return (410, status(410, "Expired", "too old resource version"));
        }
    }
    let mut items = store
        .objects
        .iter()
        .filter(|((_, ns, name), _)| {
            after
                .as_ref()
                .is_none_or(|(a_ns, a_name)| (ns, name) > (a_ns, a_name))
        })
        .filter(|((kind, _, _), o)| sel.matches(*kind, &o.served))
        .map(|(_, o)| &o.served);
    let mut page: Vec<Value> = Vec::new();
    let mut more = 0usize;
    for item in items.by_ref() {
        if q.limit.is_some_and(|l| page.len() >= l) {
            more = 1;
            break;
        }
        page.push(sel.form(item));
    }
    more += items.count();
    let mut metadata = json!({"resourceVersion": list_rv.to_string()});
    if more > 0 {
        if let Some(last) = page.last() {
            let m = &last["metadata"];
            metadata["continue"] = json!(format!(
                "{list_rv}/{}/{}",
                m["namespace"].as_str().unwrap_or(""),
                m["name"].as_str().unwrap_or("")
            ));
            metadata["remainingItemCount"] = json!(more);
        }
    }
    let (kind, api_version) = match sel.metadata_only {
        true => ("PartialObjectMetadataList".to_owned(), "meta.k8s.io/v1"),
        false => (format!("{}List", sel.kind.name()), sel.kind.api_version()),
    };
    let body = json!({
        "kind": kind,
        "apiVersion": api_version,
        "metadata": metadata,
        "items": page,
    });
    (200, body)
}

fn chunk(line: &str) -> String {
    format!("{:x}\r\n{line}\n\r\n", line.len() + 1)
}

fn watch(mut conn: TcpStream, shared: &Shared, sel: &Selection) {
    let q = sel.q;
    let from = match q.rv.as_deref() {
        None | Some("0") => None,
        Some(v) => match v.parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => {
                let msg = format!("invalid resource version {v:?}");
                return send_json(&mut conn, 400, &status(400, "BadRequest", &msg));
            }
        },
    };
    let deadline = Instant::now() + q.timeout.unwrap_or(DEFAULT_WATCH);
    let mut out = String::from(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\
         Connection: close\r\n\r\n",
    );
    let mut store = shared.lock();
    let generation = store.disconnect;
    let mut cursor = match from {
        Some(rv) if rv < store.oldest => {
            drop(store);
            let st = status(410, "Expired", "too old resource version");
            out += &chunk(&json!({"type": "ERROR", "object": st}).to_string());
            out += "0\r\n\r\n";
            let _ = conn.write_all(out.as_bytes());
            let _ = conn.shutdown(Shutdown::Write);
            return;
        }
        Some(rv) => rv,
        None => {
            for (key, o) in &store.objects {
                if sel.matches(key.0, &o.served) {
                    let object = sel.form(&o.served);
                    out += &chunk(&json!({"type": "ADDED", "object": object}).to_string());
                }
            }
            if q.initial_events {
                let bookmark = json!({"type": "BOOKMARK", "object": {
                    "kind": sel.kind.name(),
                    "apiVersion": sel.kind.api_version(),
                    "metadata": {
                        "resourceVersion": store.rv.to_string(),
                        "annotations": {"k8s.io/initial-events-end": "true"},
                    },
                }});
                out += &chunk(&bookmark.to_string());
            }
            store.rv
        }
    };
    // Tags of the events in `out`, logged once it is written.
    let mut tags: Vec<String> = Vec::new();
    loop {
        if store.disconnect != generation {
            drop(store);
            // Abrupt: no last chunk, as a dropped connection.
            let _ = conn.shutdown(Shutdown::Both);
            return;
        }
        let start = store.events.partition_point(|e| e.rv <= cursor);
        for ev in &store.events[start..] {
            if let Some(line) = sel.event_line(ev) {
                out += &chunk(&line);
                tags.extend(ev.tag.clone());
            }
        }
        cursor = cursor.max(store.rv);
        let now = Instant::now();
        if now >= deadline {
            drop(store);
            out += "0\r\n\r\n";
            if conn.write_all(out.as_bytes()).is_ok() {
                shared.emitted(&tags);
            }
            let _ = conn.shutdown(Shutdown::Write);
            return;
        }
        if !out.is_empty() {
            drop(store);
            if conn.write_all(out.as_bytes()).is_err() {
                return;
            }
            shared.emitted(&tags);
            tags.clear();
            out.clear();
            store = shared.lock();
            continue;
        }
        let wait = (deadline - now).min(WATCH_TICK);
        let (s, timed_out) = shared
            .changed
            .wait_timeout(store, wait)
            .unwrap_or_else(|e| e.into_inner());
        store = s;
        if timed_out.timed_out() && client_gone(&conn) {
            return;
        }
    }
}

/// Whether the client closed its side (it sends nothing after the request head).
fn client_gone(conn: &TcpStream) -> bool {
    let mut buf = [0u8; 1];
    if conn.set_nonblocking(true).is_err() {
        return true;
    }
    let gone = match conn.peek(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    let _ = conn.set_nonblocking(false);
    gone
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_a_reload_or_one_object() {
        assert_eq!(parse_command(r#"{"reload": true}"#), Ok(Command::Reload));
        let put = r#"{"kind": "endpointslices", "tag": "7",
                      "put": {"metadata": {"name": "web-1", "namespace": "shop"}}}"#;
        let Ok(Command::Change(key, Some(object), tag)) = parse_command(put) else {
            panic!("{put}");
        };
        assert_eq!(key, (Kind::EndpointSlice, "shop".into(), "web-1".into()));
        assert_eq!(object["metadata"]["name"], "web-1");
        assert_eq!(tag.as_deref(), Some("7"));
        let delete = r#"{"kind": "services", "delete": {"name": "web"}}"#;
        assert_eq!(
            parse_command(delete),
            Ok(Command::Change(
                (Kind::Service, "default".into(), "web".into()),
                None,
                None
            ))
        );
        for bad in [
            "",
            "not json",
            r#"{"kind": "nodes", "delete": {"name": "a"}}"#,
            r#"{"kind": "services"}"#,
            r#"{"kind": "services", "put": {"metadata": {}}}"#,
            r#"{"kind": "services", "put": {"metadata": {"name": "a"}}, "delete": {"name": "a"}}"#,
        ] {
            assert!(parse_command(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_put_of_the_same_content_is_no_event() {
        let mut store = Store::new();
        let key = (Kind::Service, "shop".to_string(), "web".to_string());
        let obj = json!({"metadata": {"name": "web"}, "spec": {}});
        put(&mut store, key.clone(), obj.clone(), Some("a".into()));
        put(&mut store, key.clone(), obj, Some("b".into()));
        remove(&mut store, &key, Some("c".into()));
        remove(&mut store, &key, Some("d".into()));
        let tags: Vec<_> = store.events.iter().map(|e| e.tag.as_deref()).collect();
        assert_eq!(tags, [Some("a"), Some("c")]);
        assert!(store.events[1].deleted);
    }
}
