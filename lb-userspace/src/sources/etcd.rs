//! `kind = "etcd"`: the registration pattern where each instance puts `<prefix><ip>:<port>`,
//! usually attached to a lease, and deletes it (or lets the lease expire) when it goes away.
//! The agent lists the prefix, then watches it from the listed revision, so no change between
//! the two is missed. A value may be empty or a JSON object such as `{"weight": 3}`.

use super::answer::{self, Answer, Reported};
use super::backoff::Backoff;
use super::Reporter;
use crate::config::{EtcdConfig, MAX_BACKENDS_PER_SERVICE};
use crate::private_files::{read_bounded_text, CERTIFICATE_LIMIT};
use etcd_client::{
    Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions, WatchOptions,
};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

/// How often an idle connection is checked, so that a vanished server is noticed even
/// without a closed connection.
const KEEP_ALIVE: Duration = Duration::from_secs(10);
/// etcd's watch event types (mvccpb.Event.EventType).
const PUT: i32 = 0;
const DELETE: i32 = 1;

/// Why a session with etcd ended.
enum End {
    /// The watch can no longer continue (compaction, cancel): list again at once.
    Relist(String),
    Failed(String),
}

pub async fn run(
    config: EtcdConfig,
    allow_loopback: bool,
    mut backoff: Backoff,
    reporter: &Reporter,
) {
    loop {
        match session(&config, allow_loopback, reporter, &mut backoff).await {
            End::Relist(why) => {
                tracing::info!(prefix = %config.prefix, "etcd watch restarts with a new list: {why}")
            }
            End::Failed(error) => {
                reporter.error(error);
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

async fn session(
    config: &EtcdConfig,
    allow_loopback: bool,
    reporter: &Reporter,
    backoff: &mut Backoff,
) -> End {
    match watch(config, allow_loopback, reporter, backoff).await {
        Ok(end) | Err(end) => end,
    }
}

async fn watch(
    config: &EtcdConfig,
    allow_loopback: bool,
    reporter: &Reporter,
    backoff: &mut Backoff,
) -> Result<End, End> {
    let mut client = within(config.timeout, "connect", connect(config)).await??;
    let list = within(
        config.timeout,
        "list",
        client.get(
            config.prefix.as_str(),
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_limit(MAX_KEYS as i64 + 1),
            ),
        ),
    )
    .await?
    .map_err(failed("list"))?;
    let revision = list
        .header()
        .map(|h| h.revision())
        .ok_or_else(|| End::Failed("list answer has no header".into()))?;
    let mut keys: BTreeMap<Vec<u8>, Vec<u8>> = list
        .kvs()
        .iter()
        .map(|kv| (kv.key().to_vec(), kv.value().to_vec()))
        .collect();
    within_caps(&keys).map_err(End::Failed)?;
    reporter.answer(to_answer(&config.prefix, &keys, allow_loopback).map_err(End::Failed)?);
    backoff.reset();
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    let mut stream = within(
        config.timeout,
        "watch",
        client.watch(config.prefix.as_str(), Some(options)),
    )
    .await?
    .map_err(failed("watch"))?;
    loop {
        let response = stream
            .message()
            .await
            .map_err(failed("watch"))?
            .ok_or_else(|| End::Failed("watch stream closed by the server".into()))?;
        if response.canceled() || response.compact_revision() > 0 {
            return Ok(End::Relist(format!(
                "watch canceled ({:?}, compacted at revision {})",
                response.cancel_reason(),
                response.compact_revision()
            )));
        }
        if response.events().is_empty() {
            continue;
        }
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            match event.0.r#type {
                PUT => keys.insert(kv.key().to_vec(), kv.value().to_vec()),
                DELETE => keys.remove(kv.key()),
                other => return Err(End::Failed(format!("watch event of unknown type {other}"))),
            };
        }
        within_caps(&keys).map_err(End::Failed)?;
        reporter.answer(to_answer(&config.prefix, &keys, allow_loopback).map_err(End::Failed)?);
    }
}

/// Keys under a prefix the agent keeps, and their bytes: far above what the 1024 instances a
/// service may have need, and a bound on what a prefix filled by mistake (or malice) costs.
const MAX_KEYS: usize = 4 * MAX_BACKENDS_PER_SERVICE;
const MAX_BYTES: usize = 16 << 20;

/// A prefix over the caps is a source error: the last good set keeps serving.
fn within_caps(keys: &BTreeMap<Vec<u8>, Vec<u8>>) -> Result<(), String> {
    let bytes: usize = keys.iter().map(|(k, v)| k.len() + v.len()).sum();
    if keys.len() > MAX_KEYS || bytes > MAX_BYTES {
        return Err(format!(
            "the prefix holds {}{} keys and {} KiB; at most {MAX_KEYS} keys and {} KiB are read",
            if keys.len() > MAX_KEYS {
                "more than "
            } else {
                ""
            },
            keys.len().min(MAX_KEYS),
            bytes >> 10,
            MAX_BYTES >> 10
        ));
    }
    Ok(())
}

fn failed(what: &'static str) -> impl Fn(etcd_client::Error) -> End {
    move |e| End::Failed(format!("{what}: {e}"))
}

async fn within<T>(
    limit: Duration,
    what: &str,
    work: impl std::future::Future<Output = T>,
) -> Result<T, End> {
    tokio::time::timeout(limit, work)
        .await
        .map_err(|_| End::Failed(format!("{what}: no answer within {limit:?}")))
}

async fn connect(config: &EtcdConfig) -> Result<Client, End> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(config.timeout)
        .with_timeout(config.timeout)
        .with_keep_alive(KEEP_ALIVE, config.timeout);
    if let Some(user) = &config.username {
        // Read at each connect so that a rotated password is picked up.
        let password = match &config.password_file {
            Some(path) => read(path, "password_file")?.trim().to_owned(),
            None => std::env::var("ETCD_PASSWORD").unwrap_or_default(),
        };
        options = options.with_user(user, password);
    }
    if config.endpoints.iter().any(|e| e.starts_with("https://")) {
        let mut tls = TlsOptions::new();
        if let Some(ca) = &config.ca_file {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca, "ca_file")?));
        }
        if let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) {
            tls = tls.identity(Identity::from_pem(
                read(cert, "cert_file")?,
                read(key, "key_file")?,
            ));
        }
        options = options.with_tls(tls);
    }
    Client::connect(&config.endpoints, Some(options))
        .await
        .map_err(|e| End::Failed(format!("connect {}: {e}", config.endpoints.join(","))))
}

fn read(path: &std::path::Path, field: &str) -> Result<String, End> {
    read_bounded_text(path, CERTIFICATE_LIMIT, &format!("discovery.{field}")).map_err(End::Failed)
}

pub fn to_answer(
    prefix: &str,
    keys: &BTreeMap<Vec<u8>, Vec<u8>>,
    allow_loopback: bool,
) -> Result<Answer, String> {
    let mut answer = Answer::default();
    let mut reported = Vec::with_capacity(keys.len());
    for (key, value) in keys {
        match instance(prefix, key, value) {
            Ok(r) => reported.push(r),
            Err(reason) => answer.skip(reason),
        }
    }
    answer::build(reported, answer, allow_loopback)
}

/// One registration: the key names the instance, the value may carry its weight.
fn instance(prefix: &str, key: &[u8], value: &[u8]) -> Result<Reported, String> {
    let shown = String::from_utf8_lossy(key);
    let name = key
        .strip_prefix(prefix.as_bytes())
        .and_then(|rest| std::str::from_utf8(rest).ok())
        .ok_or_else(|| format!("key {shown:?} is not <prefix><ip>:<port>"))?;
    let address: SocketAddr = name
        .parse()
        .map_err(|_| format!("key {shown:?}: {name:?} is not <ip>:<port>"))?;
    let weight = if value.iter().all(u8::is_ascii_whitespace) {
        1
    } else {
        weight(value).map_err(|e| format!("key {shown:?}: value {e}"))?
    };
    Ok(Reported {
        ip: address.ip(),
        port: address.port(),
        weight,
    })
}

fn weight(value: &[u8]) -> Result<u32, String> {
    let json: Value =
        serde_json::from_slice(value).map_err(|e| format!("is not valid JSON: {e}"))?;
    let Value::Object(fields) = json else {
        return Err("is not a JSON object".to_owned());
    };
    match fields.get("weight") {
        None => Ok(1),
        Some(w) => w
            .as_u64()
            .and_then(|w| u32::try_from(w).ok())
            .ok_or_else(|| format!("has a weight that is not a non-negative integer: {w}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFIX: &str = "/services/web/";

    fn one(key: &str, value: &str) -> Result<Reported, String> {
        instance(PREFIX, key.as_bytes(), value.as_bytes())
    }

    #[test]
    fn key_names_the_instance_and_value_its_weight() {
        let r = one("/services/web/10.0.0.5:8080", "").unwrap();
        assert_eq!(
            (r.ip.to_string(), r.port, r.weight),
            ("10.0.0.5".into(), 8080, 1)
        );
        let r = one(
            "/services/web/10.0.0.5:8080",
            r#"{"weight": 3, "zone": "a"}"#,
        )
        .unwrap();
        assert_eq!(r.weight, 3);
        let r = one("/services/web/10.0.0.5:8080", "{}").unwrap();
        assert_eq!(r.weight, 1);
    }

    #[test]
    fn bad_registrations_are_explained() {
        let cases = [
            ("/services/web/10.0.0.5", "", "is not <ip>:<port>"),
            ("/services/web/host:80", "", "is not <ip>:<port>"),
            ("/services/web/10.0.0.5:99999", "", "is not <ip>:<port>"),
            ("/services/web/10.0.0.5:80", "{", "value is not valid JSON"),
            (
                "/services/web/10.0.0.5:80",
                "[1]",
                "value is not a JSON object",
            ),
            (
                "/services/web/10.0.0.5:80",
                r#"{"weight":-1}"#,
                "weight that is not",
            ),
            (
                "/services/web/10.0.0.5:80",
                r#"{"weight":"2"}"#,
                "weight that is not",
            ),
            ("/other/10.0.0.5:80", "", "is not <prefix>"),
        ];
        for (key, value, expected) in cases {
            let e = one(key, value).unwrap_err();
            assert!(e.contains(expected), "{key} {value}: {e}");
        }
    }

    #[test]
    fn answer_keeps_good_keys_and_counts_bad_ones() {
        let keys: BTreeMap<Vec<u8>, Vec<u8>> = [
            ("/services/web/10.0.0.1:80", ""),
            ("/services/web/10.0.0.2:80", "{\"weight\":2}"),
            ("/services/web/garbage", ""),
            ("/services/web/10.0.0.3:0", ""),
            ("/services/web/\u{fffd}", ""),
        ]
        .into_iter()
        .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .chain([(b"/services/web/\xff\xfe".to_vec(), Vec::new())])
        .collect();
        let a = to_answer(PREFIX, &keys, false).unwrap();
        assert_eq!(a.backends.len(), 2);
        assert_eq!(a.skipped, 4, "{:?}", a.reasons);
    }

    #[test]
    fn a_prefix_over_the_caps_is_an_error() {
        let key = |i: usize| {
            (
                format!("/services/web/10.0.0.{i}:80").into_bytes(),
                Vec::new(),
            )
        };
        let fine: BTreeMap<_, _> = (0..MAX_KEYS).map(key).collect();
        assert!(within_caps(&fine).is_ok());
        let many: BTreeMap<_, _> = (0..=MAX_KEYS).map(key).collect();
        let err = within_caps(&many).unwrap_err();
        assert!(err.contains("more than 4096 keys"), "{err}");
        let big = BTreeMap::from([(b"/k".to_vec(), vec![b' '; MAX_BYTES])]);
        assert!(within_caps(&big).unwrap_err().contains("16384 KiB"));
    }
}
