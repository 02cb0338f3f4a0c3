//! Static checks of the Kubernetes manifests in `deploy/kubernetes/` (no cluster, no root).
//!
//! Every document is deserialized into the k8s-openapi type of its `kind` and serialized back;
//! a field lost on the way (k8s-openapi ignores unknown fields, so a misspelt key would be
//! silently dropped by a typed reader, and rejected or ignored by the API server) fails the
//! test. Then the security-relevant shape is checked: minimal RBAC, the DaemonSet's
//! capabilities, host mounts, probes and the wiring between the objects.

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, PodSpec, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

/// One YAML document of one file.
struct Doc {
    file: String,
    value: Value,
}

enum Object {
    Namespace(Namespace),
    ServiceAccount(ServiceAccount),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    ConfigMap(ConfigMap),
    DaemonSet(Box<DaemonSet>),
}

/// Splits a (possibly multi-document) YAML text into JSON values; empty documents (a leading
/// or trailing `---`) are skipped.
fn split_documents(file: &str, text: &str) -> Result<Vec<Doc>, String> {
    let mut docs = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(de).map_err(|e| format!("{file}: document {i}: {e}"))?;
        if !value.is_null() {
            docs.push(Doc {
                file: file.to_string(),
                value,
            });
        }
    }
    Ok(docs)
}

/// Every document of every `*.yaml` file in `deploy/kubernetes`, in file name order.
fn load_all() -> Vec<Doc> {
    let dir = manifests_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no *.yaml in {}", dir.display());
    let mut docs = Vec::new();
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).expect("read manifest");
        docs.extend(split_documents(&name, &text).unwrap_or_else(|e| panic!("{e}")));
    }
    docs
}

/// Path of the first value present in `orig` that is absent or different in `back`, with what
/// happened to it. Values only `back` has (none expected) are not losses and are ignored.
fn first_loss(orig: &Value, back: &Value, path: &str) -> Option<String> {
    match (orig, back) {
        (Value::Object(o), Value::Object(b)) => o.iter().find_map(|(k, v)| match b.get(k) {
            None => Some(format!(
                "{path}.{k}: unknown field (lost in the round trip)"
            )),
            Some(bv) => first_loss(v, bv, &format!("{path}.{k}")),
        }),
        (Value::Array(o), Value::Array(b)) if o.len() == b.len() => o
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (v, bv))| first_loss(v, bv, &format!("{path}[{i}]"))),
        // Scalars compare as written. Quantities ("50m", "64Mi") are kept as their string by
        // k8s-openapi, and IntOrString keeps an int an int and a string a string, so no value
        // in these manifests changes form; a manifest that writes e.g. a port as "9901" or a
        // quantity as a bare number is reported here rather than silently normalized.
        _ if orig == back => None,
        _ => Some(format!(
            "{path}: was {orig}, became {back} in the round trip"
        )),
    }
}

/// Deserializes `value` as `T` and checks nothing was lost on the way back.
fn typed<T: DeserializeOwned + Serialize>(value: &Value) -> Result<T, String> {
    let t: T = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&t).map_err(|e| e.to_string())?;
    match first_loss(value, &back, "") {
        None => Ok(t),
        Some(loss) => Err(loss),
    }
}

/// The typed object for one document; errors name the file, the kind and the field path.
fn parse(doc: &Doc) -> Result<Object, String> {
    let kind = doc.value.get("kind").and_then(Value::as_str).unwrap_or("");
    let name = doc
        .value
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("?");
    let v = &doc.value;
    let obj = match kind {
        "Namespace" => typed(v).map(Object::Namespace),
        "ServiceAccount" => typed(v).map(Object::ServiceAccount),
        "ClusterRole" => typed(v).map(Object::ClusterRole),
        "ClusterRoleBinding" => typed(v).map(Object::ClusterRoleBinding),
        "ConfigMap" => typed(v).map(Object::ConfigMap),
        "DaemonSet" => typed(v).map(|d| Object::DaemonSet(Box::new(d))),
        other => Err(format!("unexpected kind {other:?}")),
    };
    obj.map_err(|e| format!("{}: {kind} {name}: {e}", doc.file))
}

/// All objects of the manifests, sorted by kind.
#[derive(Default)]
struct Objects {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    config_maps: Vec<ConfigMap>,
    daemon_sets: Vec<DaemonSet>,
}

fn objects() -> Objects {
    let mut all = Objects::default();
    let mut errors = Vec::new();
    for doc in load_all() {
        match parse(&doc) {
            Ok(Object::Namespace(o)) => all.namespaces.push(o),
            Ok(Object::ServiceAccount(o)) => all.service_accounts.push(o),
            Ok(Object::ClusterRole(o)) => all.cluster_roles.push(o),
            Ok(Object::ClusterRoleBinding(o)) => all.bindings.push(o),
            Ok(Object::ConfigMap(o)) => all.config_maps.push(o),
            Ok(Object::DaemonSet(o)) => all.daemon_sets.push(*o),
            Err(e) => errors.push(e),
        }
    }
    assert!(
        errors.is_empty(),
        "invalid manifests:\n{}",
        errors.join("\n")
    );
    all
}

fn name_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    meta.name.as_deref().expect("metadata.name")
}

#[test]
fn every_document_is_a_known_kind_and_round_trips() {
    let all = objects();
    assert_eq!(all.namespaces.len(), 1, "one Namespace");
    assert_eq!(all.service_accounts.len(), 1, "one ServiceAccount");
    assert_eq!(all.bindings.len(), 1, "one ClusterRoleBinding");
    assert_eq!(all.config_maps.len(), 1, "one ConfigMap");
    assert_eq!(all.daemon_sets.len(), 1, "one DaemonSet");
    let ns = name_of(&all.namespaces[0].metadata);
    for (kind, meta) in [
        ("ServiceAccount", &all.service_accounts[0].metadata),
        ("ConfigMap", &all.config_maps[0].metadata),
        ("DaemonSet", &all.daemon_sets[0].metadata),
    ] {
        assert_eq!(
            meta.namespace.as_deref(),
            Some(ns),
            "{kind} must be in namespace {ns}"
        );
    }
}

#[test]
fn cluster_role_is_read_only_on_services_endpointslices_pods_and_nodes() {
    let all = objects();
    assert_eq!(all.cluster_roles.len(), 1, "exactly one ClusterRole");
    let role = &all.cluster_roles[0];
    assert!(role.aggregation_rule.is_none(), "no aggregationRule");
    let mut granted: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for rule in role.rules.as_deref().unwrap_or_default() {
        assert!(
            rule.resource_names
                .as_deref()
                .unwrap_or_default()
                .is_empty(),
            "no resourceNames: {rule:?}"
        );
        assert!(
            rule.non_resource_urls
                .as_deref()
                .unwrap_or_default()
                .is_empty(),
            "no nonResourceURLs: {rule:?}"
        );
        let groups = rule.api_groups.as_deref().unwrap_or_default();
        let resources = rule.resources.as_deref().unwrap_or_default();
        assert!(
            !groups.is_empty() && !resources.is_empty() && !rule.verbs.is_empty(),
            "incomplete rule: {rule:?}"
        );
        for g in groups {
            for r in resources {
                granted
                    .entry((g.clone(), r.clone()))
                    .or_default()
                    .extend(rule.verbs.iter().cloned());
            }
        }
    }
    let read: BTreeSet<String> = ["get", "list", "watch"].map(String::from).into();
    let expected = BTreeMap::from([
        (("".to_string(), "services".to_string()), read.clone()),
        (
            ("discovery.k8s.io".to_string(), "endpointslices".to_string()),
            read,
        ),
        // Its own node's pods, for the bypass annotation: list and watch only.
        (
            ("".to_string(), "pods".to_string()),
            BTreeSet::from(["list".to_string(), "watch".to_string()]),
        ),
        // Its own Node's zone label: get only.
        (
            ("".to_string(), "nodes".to_string()),
            BTreeSet::from(["get".to_string()]),
        ),
    ]);
    assert_eq!(granted, expected, "ClusterRole rules must be exactly this");
}

/// The value following `flag` in the container's command line.
fn flag_value<'a>(argv: &'a [String], flag: &str) -> Option<&'a str> {
    argv.iter()
        .position(|a| a == flag)
        .and_then(|i| argv.get(i + 1))
        .map(String::as_str)
}

fn the_container(spec: &PodSpec) -> &Container {
    assert_eq!(spec.containers.len(), 1, "one container");
    assert!(
        spec.init_containers
            .as_deref()
            .unwrap_or_default()
            .is_empty(),
        "no init containers"
    );
    &spec.containers[0]
}

#[test]
fn daemonset_security_mounts_probes_and_wiring() {
    let all = objects();
    let ds = &all.daemon_sets[0];
    let ns = ds
        .metadata
        .namespace
        .as_deref()
        .expect("DaemonSet namespace");
    let ds_spec = ds.spec.as_ref().expect("DaemonSet spec");
    let spec = ds_spec.template.spec.as_ref().expect("pod spec");
    let c = the_container(spec);

    // Node-level placement and update behaviour.
    assert_eq!(spec.host_network, Some(true), "hostNetwork: true");
    assert_ne!(spec.host_pid, Some(true), "no hostPID");
    assert!(
        spec.tolerations
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "a toleration `operator: Exists` (every taint) is required"
    );
    let strategy = ds_spec.update_strategy.as_ref().expect("updateStrategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy.rolling_update.as_ref().expect("rollingUpdate");
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(1)));

    // Security context: unprivileged, exactly the three capabilities.
    let sc = c
        .security_context
        .as_ref()
        .expect("container securityContext");
    assert_eq!(sc.privileged, Some(false), "privileged: false");
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    let caps = sc.capabilities.as_ref().expect("capabilities");
    let mut add = caps.add.clone().unwrap_or_default();
    add.sort();
    assert_eq!(add, ["BPF", "NET_ADMIN", "PERFMON"]);
    assert_eq!(caps.drop.as_deref().unwrap_or_default(), ["ALL"]);
    let seccomp = sc.seccomp_profile.as_ref().expect("seccompProfile");
    assert_eq!(seccomp.type_, "Unconfined");
    if let Some(pod_sc) = &spec.security_context {
        assert!(pod_sc.sysctls.is_none(), "no sysctls");
    }

    // Resources: requests, a memory limit, no CPU limit.
    let res = c.resources.as_ref().expect("resources");
    let requests = res.requests.as_ref().expect("requests");
    assert!(requests.contains_key("cpu") && requests.contains_key("memory"));
    let limits = res.limits.as_ref().expect("limits");
    assert!(limits.contains_key("memory"), "memory limit");
    assert!(!limits.contains_key("cpu"), "no CPU limit (throttling)");

    // Command line.
    let argv: Vec<String> = c
        .command
        .iter()
        .chain(c.args.iter())
        .flatten()
        .cloned()
        .collect();
    assert!(
        argv.iter().any(|a| a == "run"),
        "`run` subcommand: {argv:?}"
    );
    let listen = flag_value(&argv, "--http-listen").expect("--http-listen <addr>");
    let (listen_host, listen_port) = listen.rsplit_once(':').expect("host:port");
    let listen_port: i32 = listen_port.parse().expect("numeric port");
    assert_eq!(flag_value(&argv, "--cgroup"), Some("/host/cgroup"));
    assert_eq!(flag_value(&argv, "--pin-dir"), Some("/sys/fs/bpf/lb"));
    let config_path = flag_value(&argv, "--config").expect("--config <file>");

    // Probes hit the agent's loopback listener.
    for (what, probe, path) in [
        ("livenessProbe", &c.liveness_probe, "/healthz"),
        ("readinessProbe", &c.readiness_probe, "/readyz"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("{what} must be an httpGet"));
        assert_eq!(get.path.as_deref(), Some(path), "{what} path");
        assert_eq!(get.host.as_deref(), Some("127.0.0.1"), "{what} host");
        assert_eq!(listen_host, "127.0.0.1", "--http-listen on loopback");
        assert_eq!(get.port, IntOrString::Int(listen_port), "{what} port");
    }

    // Host mounts.
    let volumes = spec.volumes.as_deref().unwrap_or_default();
    let mounts = c.volume_mounts.as_deref().unwrap_or_default();
    let mount = |path: &str| {
        mounts
            .iter()
            .find(|m| m.mount_path == path)
            .unwrap_or_else(|| panic!("no volumeMount at {path}"))
    };
    let volume = |name: &str| {
        volumes
            .iter()
            .find(|v| v.name == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
    };
    for (mount_path, host_path, read_only) in [
        ("/sys/fs/bpf/lb", "/sys/fs/bpf/lb", false),
        ("/host/cgroup", "/sys/fs/cgroup", true),
        ("/run/lb-agent", "/run/lb-agent", false),
    ] {
        let m = mount(mount_path);
        assert_eq!(
            m.read_only.unwrap_or(false),
            read_only,
            "{mount_path} readOnly"
        );
        let hp = volume(&m.name)
            .host_path
            .as_ref()
            .unwrap_or_else(|| panic!("{mount_path} must be a hostPath"));
        assert_eq!(hp.path, host_path, "{mount_path} host path");
    }
    assert_eq!(
        mount("/sys/fs/bpf/lb").mount_propagation.as_deref(),
        Some("HostToContainer")
    );

    // ServiceAccount → ClusterRoleBinding → ClusterRole.
    let sa = spec
        .service_account_name
        .as_deref()
        .expect("serviceAccountName");
    assert!(
        all.service_accounts
            .iter()
            .any(|s| name_of(&s.metadata) == sa && s.metadata.namespace.as_deref() == Some(ns)),
        "ServiceAccount {ns}/{sa} is not defined"
    );
    let role = name_of(&all.cluster_roles[0].metadata);
    assert!(
        all.bindings.iter().any(|b| {
            b.role_ref.kind == "ClusterRole"
                && b.role_ref.name == role
                && b.role_ref.api_group == "rbac.authorization.k8s.io"
                && b.subjects.as_deref().unwrap_or_default().iter().any(|s| {
                    s.kind == "ServiceAccount" && s.name == sa && s.namespace.as_deref() == Some(ns)
                })
        }),
        "no ClusterRoleBinding binds ServiceAccount {ns}/{sa} to ClusterRole {role}"
    );

    // The config file: a ConfigMap key mounted at --config, valid TOML with [kubernetes].
    let (dir, file) = config_path
        .rsplit_once('/')
        .expect("absolute --config path");
    let (m, key_path) = match mounts.iter().find(|m| m.mount_path == config_path) {
        // A file mounted with subPath (then it is never updated in place).
        Some(m) => (m, m.sub_path.clone().expect("subPath for a file mount")),
        None => (mount(dir), file.to_string()),
    };
    let cm_source = volume(&m.name)
        .config_map
        .as_ref()
        .unwrap_or_else(|| panic!("{config_path} must come from a ConfigMap"));
    let key = match cm_source.items.as_deref() {
        Some(items) => items
            .iter()
            .find(|i| i.path == key_path)
            .unwrap_or_else(|| panic!("ConfigMap volume has no item with path {key_path}"))
            .key
            .clone(),
        None => key_path,
    };
    let cm = all
        .config_maps
        .iter()
        .find(|c| {
            name_of(&c.metadata) == cm_source.name && c.metadata.namespace.as_deref() == Some(ns)
        })
        .unwrap_or_else(|| panic!("ConfigMap {ns}/{} is not defined", cm_source.name));
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get(&key))
        .unwrap_or_else(|| panic!("ConfigMap has no key {key}"));
    let config: toml::Table = text
        .parse()
        .unwrap_or_else(|e| panic!("{key} is not valid TOML: {e}"));
    assert!(
        config.get("kubernetes").is_some_and(toml::Value::is_table),
        "{key} needs a [kubernetes] table"
    );
    // The agent accepts it, and reaches the API server without the `kubernetes` Service's
    // ClusterIP, which nothing translates before the agent runs on a node without kube-proxy.
    let env = lb_userspace::config::Env::default();
    let agent_config = lb_userspace::config::parse_with_env(text, &key, env)
        .unwrap_or_else(|e| panic!("{key} is not a valid agent config: {e}"));
    let kubernetes = agent_config.kubernetes.expect("[kubernetes]");
    assert!(
        kubernetes.api_server.is_some(),
        "{key}: [kubernetes] api_server"
    );

    // The node's name from the downward API (internalTrafficPolicy: Local, topology hints).
    let node_name = c
        .env
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .and_then(|e| e.value_from.as_ref()?.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert_eq!(
        node_name,
        Some("spec.nodeName"),
        "NODE_NAME from spec.nodeName"
    );
}

const DAEMONSET_SNIPPET: &str = "\
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: x
spec:
  selector:
    matchLabels: {app: x}
  template:
    metadata:
      labels: {app: x}
    spec:
      hostNetwork: true
      containers:
        - name: x
          image: x
          ports: [{containerPort: 9901}]
          resources:
            limits: {memory: 256Mi}
          securityContext:
            readOnlyRootFilesystem: true
";

fn check_text(text: &str) -> Result<(), String> {
    for doc in split_documents("inline.yaml", text)? {
        parse(&doc)?;
    }
    Ok(())
}

/// The checker itself must be able to fail: misspelt keys at any depth, a value that does not
/// survive as written, and unknown kinds are reported with file, kind and field path.
#[test]
fn round_trip_check_reports_typos() {
    check_text(DAEMONSET_SNIPPET).expect("the correct snippet passes");
    // Two documents in one text, as in a multi-resource file.
    let two = format!("---\n{DAEMONSET_SNIPPET}---\n{DAEMONSET_SNIPPET}---\n");
    check_text(&two).expect("multi-document text passes");

    let cases = [
        (
            "hostNetwork",
            "hostNetwrok",
            ".spec.template.spec.hostNetwrok",
        ),
        (
            "readOnlyRootFilesystem",
            "readOnlyRootFileSystem",
            ".spec.template.spec.containers[0].securityContext.readOnlyRootFileSystem",
        ),
        ("matchLabels", "matchLabel", ".spec.selector.matchLabel"),
    ];
    for (right, wrong, path) in cases {
        let bad = DAEMONSET_SNIPPET.replacen(right, wrong, 1);
        let err = check_text(&bad).expect_err(wrong);
        assert!(
            err.contains("inline.yaml: DaemonSet x:") && err.contains(path),
            "{wrong}: {err}"
        );
    }

    let unknown = DAEMONSET_SNIPPET.replace("kind: DaemonSet", "kind: Deployment");
    let err = check_text(&unknown).expect_err("unknown kind");
    assert!(err.contains("unexpected kind \"Deployment\""), "{err}");

    // A diff in a scalar is reported too (the comparison itself, independent of k8s-openapi).
    let orig: Value = serde_json::json!({"a": {"b": [1, "64Mi"]}});
    let back: Value = serde_json::json!({"a": {"b": [1, "67108864"]}, "extra": 1});
    let loss = first_loss(&orig, &back, "").expect("changed value");
    assert!(loss.starts_with(".a.b[1]: was \"64Mi\""), "{loss}");
}
