//! `lb-testkit kube-mock`: a Kubernetes API server stand-in on 127.0.0.1:6443 inside the test
//! namespace, serving list and watch of Services, EndpointSlices and Pods (cluster-wide and
//! per namespace) over plain HTTP without authentication, from a JSON state file this wrapper
//! rewrites atomically (`set`, `set_pods`), and from single-object changes sent on the mock's
//! stdin (`put`, `delete`: a stream of changes at any rate, without rewriting a state that may
//! hold tens of thousands of objects). See `src/bin/lb-testkit/kube.rs` for the protocol
//! details.
//!
//! Objects are given without `resourceVersion`: the mock assigns one (a global counter) to each
//! object that changed and streams ADDED/MODIFIED/DELETED to open watches at once.
//! `disconnect_watches` drops every open watch (the client should resume from its last
//! resourceVersion); `compact` makes every resourceVersion handed out so far too old, so a
//! resuming watch gets a 410 Expired ERROR event (the client should list again).

use crate::paths::unique_name;
use crate::TestNet;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout};
use std::sync::Mutex;

/// The two kinds of object the mock serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Pod,
}

impl Kind {
    /// The state file's field, which also names the kind in a change line.
    fn field(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Pod => "pods",
        }
    }
}

/// (kind, namespace, name), as the mock keys objects.
type Key = (Kind, String, String);

fn key_of(kind: Kind, object: &Value) -> Key {
    let meta = &object["metadata"];
    let text = |v: &Value, default: &str| v.as_str().unwrap_or(default).to_string();
    (
        kind,
        text(&meta["namespace"], "default"),
        text(&meta["name"], ""),
    )
}

/// What the mock holds, as this wrapper last told it: what the state file is written from.
#[derive(Default)]
struct Mirror {
    objects: BTreeMap<Key, Value>,
    disconnect: u64,
    compact: u64,
}

impl Mirror {
    /// Every object of these kinds becomes the ones given; other kinds stay.
    fn replace(&mut self, kinds: &[(Kind, &[Value])]) {
        self.objects
            .retain(|key, _| !kinds.iter().any(|(kind, _)| *kind == key.0));
        for (kind, objects) in kinds {
            for o in *objects {
                self.objects.insert(key_of(*kind, o), o.clone());
            }
        }
    }

    fn file_text(&self) -> String {
        let of = |kind: Kind| -> Vec<&Value> {
            let all = self.objects.iter();
            all.filter(|(k, _)| k.0 == kind).map(|(_, v)| v).collect()
        };
        json!({
            "services": of(Kind::Service),
            "endpointslices": of(Kind::EndpointSlice),
            "pods": of(Kind::Pod),
            "disconnect": self.disconnect,
            "compact": self.compact,
        })
        .to_string()
    }
}

pub struct KubeMock {
    /// `http://127.0.0.1:6443`.
    pub url: String,
    dir: PathBuf,
    state_path: PathBuf,
    log: PathBuf,
    /// Held while a change is sent, so changes reach the mock in the order they are made.
    state: Mutex<Mirror>,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    /// Where the mock acknowledges reloads.
    stdout: Option<Mutex<BufReader<ChildStdout>>>,
}

impl KubeMock {
    /// Starts with no objects; returns once the mock listens.
    pub fn start(net: &TestNet) -> Self {
        let dir = std::env::temp_dir().join(unique_name());
        std::fs::create_dir_all(&dir).expect("create temp folder");
        let mut mock = Self {
            url: "http://127.0.0.1:6443".into(),
            state_path: dir.join("state.json"),
            log: dir.join("kube-mock.log"),
            dir,
            state: Mutex::new(Mirror::default()),
            child: None,
            stdin: None,
            stdout: None,
        };
        mock.update(|_| {});
        let (child, stdin, stdout) = crate::servers::spawn_mock(
            net,
            "kube-mock",
            "127.0.0.1:6443",
            &mock.state_path,
            &mock.log,
        );
        mock.child = Some(child);
        mock.stdin = Some(stdin);
        mock.stdout = Some(Mutex::new(stdout));
        mock
    }

    /// Serves these objects from now on (open watches see the difference at once, and so
    /// does every request made after this returns).
    pub fn set(&self, services: &[Value], slices: &[Value]) {
        self.update(|s| s.replace(&[(Kind::Service, services), (Kind::EndpointSlice, slices)]));
    }

    /// Serves these pods from now on (Services and EndpointSlices stay as they are).
    pub fn set_pods(&self, pods: &[Value]) {
        self.update(|s| s.replace(&[(Kind::Pod, pods)]));
    }

    /// What a client finds coming back from an outage during which the history was compacted
    /// and these Services and EndpointSlices came to be served, all in one step: every watch
    /// open now is dropped before it can stream the change, and resuming from any
    /// resourceVersion handed out so far gets 410 Expired.
    pub fn outage(&self, services: &[Value], slices: &[Value]) {
        self.update(|s| {
            s.replace(&[(Kind::Service, services), (Kind::EndpointSlice, slices)]);
            s.compact += 1;
            s.disconnect += 1;
        });
    }

    /// Adds or replaces one object, leaving the others as they are. With a `tag`, the mock
    /// logs when it writes the resulting event to a watch (see `emitted`). It returns before
    /// the mock has read it: later changes and `set` still apply in order.
    pub fn put(&self, kind: Kind, object: &Value, tag: Option<&str>) {
        let mut state = self.lock();
        state.objects.insert(key_of(kind, object), object.clone());
        self.send(&json!({"kind": kind.field(), "put": object, "tag": tag}));
    }

    /// Removes one object, as `put` adds one.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str, tag: Option<&str>) {
        let mut state = self.lock();
        state
            .objects
            .remove(&(kind, namespace.to_string(), name.to_string()));
        let which = json!({"namespace": namespace, "name": name});
        self.send(&json!({"kind": kind.field(), "delete": which, "tag": tag}));
    }

    /// `(tag, CLOCK_MONOTONIC µs)` for each time the event of a tagged change was written to a
    /// watch (an event goes to each watch that selects it), in the order written.
    pub fn emitted(&self) -> Vec<(String, u64)> {
        let lines = crate::servers::mock_log(&self.state_path, ".emitted");
        lines
            .iter()
            .filter_map(|l| {
                let (tag, at) = l.rsplit_once(' ')?;
                Some((tag.to_string(), at.parse().ok()?))
            })
            .collect()
    }

    /// Drops every watch open now, without a proper end of response.
    pub fn disconnect_watches(&self) {
        self.update(|s| s.disconnect += 1);
    }

    /// Forgets the event history: watches from any resourceVersion handed out so far get a
    /// 410 Expired ERROR event. Watches already open keep streaming; lists keep working.
    pub fn compact(&self) {
        self.update(|s| s.compact += 1);
    }

    /// One line per request received so far: `<METHOD> <path?query>`.
    pub fn requests(&self) -> Vec<String> {
        crate::servers::request_log(&self.state_path)
    }

    /// Writes `<dir>/kubeconfig` pointing at `url` (no credentials, namespace `default`, its
    /// context current) and returns its path.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: kube-mock\n  cluster:\n    \
             server: {}\ncontexts:\n- name: kube-mock\n  context:\n    cluster: kube-mock\n    \
             user: kube-mock\n    namespace: default\ncurrent-context: kube-mock\nusers:\n\
             - name: kube-mock\n  user: {{}}\n",
            self.url
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Mirror> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One line on the mock's stdin. A mock that has gone away is noticed by the test through
    /// what it then fails to see.
    fn send(&self, line: &Value) {
        if let Some(mut stdin) = self.stdin.as_ref() {
            let _ = stdin.write_all(format!("{line}\n").as_bytes());
        }
    }

    /// Changes the state, replaces the file atomically (temp file + rename, so the mock never
    /// reads half a file), and, once the mock runs, has it reload the file and waits until it
    /// has: the reload comes after every change sent before it.
    fn update(&self, change: impl FnOnce(&mut Mirror)) {
        let mut state = self.lock();
        change(&mut state);
        crate::servers::replace_file(&self.dir, &self.state_path, &state.file_text());
        let Some(stdout) = &self.stdout else {
            return;
        };
        self.send(&json!({"reload": true}));
        let mut stdout = stdout.lock().unwrap_or_else(|e| e.into_inner());
        let mut line = String::new();
        // Until the acknowledgement, or the end of the mock's output if it has gone away.
        while line.trim() != "reloaded" {
            line.clear();
            if stdout.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
        }
    }
}

impl Drop for KubeMock {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            // Not eprintln!, which panics (aborting, mid-unwind) if stderr is closed.
            let _ = writeln!(
                std::io::stderr(),
                "--- kube-mock log ---\n{}\n--- kube-mock requests ---\n{}",
                self.log(),
                self.requests().join("\n")
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Service; `cluster_ip` None makes it headless (`clusterIP: None`). Ports are
/// `(name, port, protocol, targetPort)`, targetPort a number or a port name; an empty name is
/// left out (a single unnamed port). Its selector is `app: <name>`.
pub fn service(
    ns: &str,
    name: &str,
    cluster_ip: Option<&str>,
    ports: &[(&str, u16, &str, Value)],
) -> Value {
    let ip = cluster_ip.unwrap_or("None");
    let ports: Vec<Value> = ports
        .iter()
        .map(|(pname, port, proto, target)| {
            let mut p = json!({"port": port, "protocol": proto, "targetPort": target});
            if !pname.is_empty() {
                p["name"] = json!(pname);
            }
            p
        })
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ip,
            "clusterIPs": [ip],
            "ports": ports,
            "selector": {"app": name},
        },
    })
}

/// An EndpointSlice endpoint for [`slice`]: `(ip, ready, serving, terminating)`.
pub type Endpoint<'a> = (&'a str, Option<bool>, Option<bool>, Option<bool>);

/// An IPv4 EndpointSlice of `service_name` (label `kubernetes.io/service-name`). Endpoints are
/// `(ip, ready, serving, terminating)`, a None condition left out; ports `(name, port,
/// protocol)`, the name as is (`""` for an unnamed service port, as the controller writes it).
pub fn slice(
    ns: &str,
    slice_name: &str,
    service_name: &str,
    endpoints: &[Endpoint],
    ports: &[(&str, u16, &str)],
) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(ip, ready, serving, terminating)| {
            let mut conditions = json!({});
            for (k, v) in [
                ("ready", ready),
                ("serving", serving),
                ("terminating", terminating),
            ] {
                if let Some(v) = v {
                    conditions[k] = json!(v);
                }
            }
            json!({"addresses": [ip], "conditions": conditions})
        })
        .collect();
    let ports: Vec<Value> = ports
        .iter()
        .map(|(name, port, proto)| json!({"name": name, "port": port, "protocol": proto}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": slice_name,
            "namespace": ns,
            "labels": {
                "kubernetes.io/service-name": service_name,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports,
    })
}

/// A Pod on `node` with this `uid` (served as given, as kubelet names the pod's cgroup after
/// it) and these annotations.
pub fn pod(ns: &str, name: &str, uid: &str, node: &str, annotations: &[(&str, &str)]) -> Value {
    let annotations: serde_json::Map<String, Value> = annotations
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": uid, "annotations": annotations},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "example"}]},
        "status": {"phase": "Running"},
    })
}
