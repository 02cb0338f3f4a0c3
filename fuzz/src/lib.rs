//! What each fuzz target does with its input, and the invariants it asserts.
//!
//! Shared by the libFuzzer targets (`fuzz_targets/*.rs`, nightly, `cargo xtask fuzz`) and by
//! `lb-userspace/tests/fuzz_corpus.rs`, which includes this file with `#[path]` and replays
//! every committed corpus file on stable. So this file must only use what lb-userspace's own
//! dependencies provide (lb_userspace, serde, serde_json, k8s_openapi), and a failed invariant
//! is a panic: libFuzzer records it as a crash, the replay test as a failure.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use lb_userspace::config::{
    self, BackendConfig, Env, MAX_BACKENDS_PER_SERVICE, MAX_NAME_LEN, MAX_WEIGHT,
};
use lb_userspace::sources::answer::{is_loopback_or_link_local, Answer, MAX_REASONS};
use lb_userspace::sources::kubernetes::translate;
use lb_userspace::sources::{consul, etcd};
use serde::Deserialize;
use std::collections::{BTreeMap, HashSet};

/// One target's body: takes the raw input, panics on a broken invariant.
pub type Target = fn(&[u8]);

/// Every target by name, as `fuzz_targets/<name>.rs` and `corpus/<name>/` call it.
pub const TARGETS: &[(&str, Target)] = &[
    ("config", config),
    ("consul", consul),
    ("etcd", etcd),
    ("kubernetes", kubernetes),
];

/// Bytes → (if UTF-8) the config parser and validator, then the error's `Display` (which cuts
/// and escapes values). On success the documented rules must hold for every service.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match config::parse_with_env(text, "fuzz", Env::default()) {
        Ok(config) => {
            let mut names = HashSet::new();
            let mut vips = HashSet::new();
            for s in &config.services {
                check_service_name(&s.name);
                assert!(names.insert(&s.name), "duplicate service name {:?}", s.name);
                assert!(
                    vips.insert((s.vip, s.protocol)),
                    "duplicate vip {} {:?}",
                    s.vip,
                    s.protocol
                );
                assert!(s.vip.port() != 0, "{}: vip with port 0", s.name);
                assert!(
                    s.panic_threshold <= 100,
                    "{}: panic_threshold > 100",
                    s.name
                );
                let mut addresses = HashSet::new();
                for b in s.backends.iter() {
                    check_backend(&s.name, b);
                    assert!(
                        addresses.insert(b.address),
                        "{}: backend {} listed twice",
                        s.name,
                        b.address
                    );
                }
                assert!(
                    s.backends.len() <= MAX_BACKENDS_PER_SERVICE,
                    "{}: {} backends",
                    s.name,
                    s.backends.len()
                );
                if s.discovery.is_some() {
                    assert!(s.backends.is_empty(), "{}: discovery and backends", s.name);
                }
            }
        }
        Err(e) => {
            let shown = e.to_string();
            assert!(shown.starts_with("fuzz: "), "error without origin: {shown}");
        }
    }
}

/// Bytes → the parser of Consul's `/v1/health/service` answer.
pub fn consul(data: &[u8]) {
    let parsed = consul::parse(data, false);
    // The parser's only structural requirement: a JSON array, one entry per instance.
    let entries = match serde_json::from_slice::<serde_json::Value>(data) {
        Ok(serde_json::Value::Array(entries)) => Some(entries.len()),
        _ => None,
    };
    match (parsed, entries) {
        (Ok(answer), Some(entries)) => check_answer(&answer, entries),
        (Ok(answer), None) => panic!("not a JSON array, but accepted: {answer:?}"),
        (Err(e), Some(_)) => assert!(
            e.contains("usable instances"),
            "a JSON array refused for another reason than its size: {e}"
        ),
        (Err(_), None) => {}
    }
}

/// The etcd key prefix used when the input does not name one (as in README's example).
pub const ETCD_PREFIX: &[u8] = b"/services/web/";

/// Bytes → `(prefix, keys)` → etcd's `to_answer`. See [`decode_etcd`] for the format.
pub fn etcd(data: &[u8]) {
    let (prefix, keys) = decode_etcd(data);
    match etcd::to_answer(&prefix, &keys, false) {
        Ok(answer) => check_answer(&answer, keys.len()),
        Err(e) => assert!(e.contains("usable instances"), "unexpected error: {e}"),
    }
}

/// The etcd input format: `[len][prefix]` then `[len][key][len][value]` pairs until the data
/// ends (an incomplete last pair is dropped); each `len` is one byte. A prefix that is not
/// UTF-8 (the config only allows UTF-8) becomes [`ETCD_PREFIX`]. A later duplicate key wins,
/// as a later PUT does in etcd.
pub fn decode_etcd(data: &[u8]) -> (String, BTreeMap<Vec<u8>, Vec<u8>>) {
    let mut rest = data;
    let mut field = || -> Option<Vec<u8>> {
        let (&len, tail) = rest.split_first()?;
        let len = usize::from(len);
        if tail.len() < len {
            rest = &[];
            return None;
        }
        let (value, tail) = tail.split_at(len);
        rest = tail;
        Some(value.to_vec())
    };
    let prefix = field()
        .and_then(|p| String::from_utf8(p).ok())
        .unwrap_or_else(|| String::from_utf8(ETCD_PREFIX.to_vec()).expect("ASCII"));
    let mut keys = BTreeMap::new();
    while let (Some(key), Some(value)) = (field(), field()) {
        keys.insert(key, value);
    }
    (prefix, keys)
}

/// The encoding `decode_etcd` reads (for writing seeds and tests).
pub fn encode_etcd(prefix: &str, pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut field = |bytes: &[u8]| {
        out.push(u8::try_from(bytes.len()).expect("fields are at most 255 bytes"));
        out.extend_from_slice(bytes);
    };
    field(prefix.as_bytes());
    for (key, value) in pairs {
        field(key);
        field(value);
    }
    out
}

/// The Kubernetes objects a fuzz input holds: `{"services": [...], "slices": [...]}` with
/// objects as the API server sends them (see tests/src/kube_mock.rs).
#[derive(Debug, Deserialize)]
pub struct Objects {
    #[serde(default)]
    pub services: Vec<Service>,
    #[serde(default)]
    pub slices: Vec<EndpointSlice>,
}

/// Bytes → (if they deserialize) the objects → `translate`.
pub fn kubernetes(data: &[u8]) {
    let Ok(objects) = serde_json::from_slice::<Objects>(data) else {
        return;
    };
    let ports: usize = objects
        .services
        .iter()
        .filter_map(|s| s.spec.as_ref()?.ports.as_ref().map(Vec::len))
        .sum();
    let narrow = translate::Options {
        node_name: Some("node-a".into()),
        zone: Some("zone-a".into()),
        max_services: 2,
        max_endpoints_per_service: 3,
        allow_loopback_backends: true,
        label_selector: true,
    };
    for options in [translate::Options::default(), narrow] {
        let translation = translate::translate(&objects.services, &objects.slices, &options);
        assert!(
            translation.services.len() <= ports,
            "{} services from {ports} ports",
            translation.services.len()
        );
        let max = options.max_endpoints_per_service;
        for s in &translation.services {
            check_service_name(&s.name);
            assert!(s.vip.port() != 0, "{}: vip with port 0", s.name);
            assert!(
                s.backends.len() <= max,
                "{}: {} backends",
                s.name,
                s.backends.len()
            );
            for b in &s.backends {
                check_backend(&s.name, b);
                assert!(
                    options.allow_loopback_backends || !host_only(b.address.ip()),
                    "{}: loopback or link-local backend {}",
                    s.name,
                    b.address
                );
            }
            check_sorted_unique(&s.name, &s.backends);
        }
    }
}

/// 127/8, ::1, 169.254/16, fe80::/10, v4-mapped too (written apart from translate's).
fn host_only(ip: std::net::IpAddr) -> bool {
    let ip = match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
        v4 => v4,
    };
    match ip {
        std::net::IpAddr::V4(v4) => v4.octets()[0] == 127 || v4.octets()[..2] == [169, 254],
        std::net::IpAddr::V6(v6) => {
            v6 == std::net::Ipv6Addr::LOCALHOST || v6.segments()[0] >> 6 == 0xfe80 >> 6
        }
    }
}

fn check_service_name(name: &str) {
    assert!(
        !name.is_empty() && name.len() <= MAX_NAME_LEN,
        "service name {name:?} is {} bytes, not 1..={MAX_NAME_LEN}",
        name.len()
    );
}

/// What the data plane needs of a backend: a unicast address, a port, a weight in range.
fn check_backend(service: &str, b: &BackendConfig) {
    let ip = b.address.ip();
    assert!(
        b.address.port() != 0,
        "{service}: backend {} port 0",
        b.address
    );
    assert!(
        !ip.is_unspecified()
            && !ip.is_multicast()
            && !matches!(ip, std::net::IpAddr::V4(v4) if v4.is_broadcast()),
        "{service}: backend {} is not unicast",
        b.address
    );
    assert!(
        (1..=MAX_WEIGHT).contains(&b.weight),
        "{service}: backend {} weight {}",
        b.address,
        b.weight
    );
}

fn check_sorted_unique(service: &str, backends: &[BackendConfig]) {
    for pair in backends.windows(2) {
        assert!(
            pair[0].address < pair[1].address,
            "{service}: backends not sorted and unique: {} then {}",
            pair[0].address,
            pair[1].address
        );
    }
}

/// A discovery answer built from `reported` entries: usable backends, sorted and unique, and
/// every entry either used, a duplicate of a used one or counted as skipped.
fn check_answer(answer: &Answer, reported: usize) {
    assert!(
        answer.backends.len() <= MAX_BACKENDS_PER_SERVICE,
        "{} backends",
        answer.backends.len()
    );
    for b in &answer.backends {
        check_backend("answer", b);
        // Parsed with allow_loopback_backends off.
        assert!(
            !is_loopback_or_link_local(b.address.ip()),
            "answer: backend {} is loopback or link-local",
            b.address
        );
    }
    check_sorted_unique("answer", &answer.backends);
    assert!(
        answer.backends.len() + answer.skipped <= reported,
        "{} backends + {} skipped from {reported} entries",
        answer.backends.len(),
        answer.skipped
    );
    assert!(
        answer.reasons.len() <= MAX_REASONS && answer.reasons.len() <= answer.skipped,
        "{} reasons for {} skipped",
        answer.reasons.len(),
        answer.skipped
    );
    assert_eq!(
        answer.reasons.len(),
        answer.skipped.min(MAX_REASONS),
        "reasons lost"
    );
}
