//! `lb-testkit kube-mock`: a Kubernetes API server stand-in on 127.0.0.1:6443 inside the test
//! namespace, serving list and watch of Services, EndpointSlices and Pods (cluster-wide and
//! per namespace) over plain HTTP without authentication, from a JSON state file this wrapper
//! rewrites atomically. See `src/bin/lb-testkit/kube.rs` for the protocol details.
//!
//! Objects are given without `resourceVersion`: the mock assigns one (a global counter) to each
//! object that changed and streams ADDED/MODIFIED/DELETED to open watches within ~20 ms.
//! `disconnect_watches` drops every open watch (the client should resume from its last
//! resourceVersion); `compact` makes every resourceVersion handed out so far too old, so a
//! resuming watch gets a 410 Expired ERROR event (the client should list again).

use crate::paths::unique_name;
use crate::TestNet;
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin};
use std::sync::Mutex;

pub struct KubeMock {
    /// `http://127.0.0.1:6443`.
    pub url: String,
    dir: PathBuf,
    state_path: PathBuf,
    log: PathBuf,
    /// The state last written: objects and the disconnect/compact generations.
    state: Mutex<Value>,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
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
            state: Mutex::new(json!({
                "services": [], "endpointslices": [], "pods": [], "disconnect": 0, "compact": 0,
            })),
            child: None,
            stdin: None,
        };
        mock.update(|_| {});
        let (child, stdin) = crate::servers::spawn_mock(
            net,
            "kube-mock",
            "127.0.0.1:6443",
            &mock.state_path,
            &mock.log,
        );
        mock.child = Some(child);
        mock.stdin = Some(stdin);
        mock
    }

    /// Serves these objects from now on (open watches see the difference within ~20 ms; a
    /// request made after this returns sees them at once).
    pub fn set(&self, services: &[Value], slices: &[Value]) {
        self.update(|s| {
            s["services"] = json!(services);
            s["endpointslices"] = json!(slices);
        });
    }

    /// Serves these pods from now on (Services and EndpointSlices stay as they are).
    pub fn set_pods(&self, pods: &[Value]) {
        self.update(|s| s["pods"] = json!(pods));
    }

    /// Drops every watch open now, without a proper end of response.
    pub fn disconnect_watches(&self) {
        self.update(|s| s["disconnect"] = json!(s["disconnect"].as_u64().unwrap_or(0) + 1));
    }

    /// Forgets the event history: watches from any resourceVersion handed out so far get a
    /// 410 Expired ERROR event. Watches already open keep streaming; lists keep working.
    pub fn compact(&self) {
        self.update(|s| s["compact"] = json!(s["compact"].as_u64().unwrap_or(0) + 1));
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

    /// Changes the state and replaces the file atomically (temp file + rename), so the mock
    /// never reads half a file.
    fn update(&self, change: impl FnOnce(&mut Value)) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        change(&mut state);
        crate::servers::replace_file(&self.dir, &self.state_path, &state.to_string());
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
