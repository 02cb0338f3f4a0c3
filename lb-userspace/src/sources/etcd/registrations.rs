//! What instances register under a prefix: the key names the instance (`<prefix><ip>:<port>`),
//! the value may be empty or a JSON object such as `{"weight": 3}`.

use crate::config::MAX_BACKENDS_PER_SERVICE;
use crate::sources::answer::{self, Answer, Reported};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::SocketAddr;

/// Keys under a prefix the agent keeps, and their bytes: far above what the 1024 instances a
/// service may have need, and a bound on what a prefix filled by mistake (or malice) costs.
pub(super) const MAX_KEYS: usize = 4 * MAX_BACKENDS_PER_SERVICE;
const MAX_BYTES: usize = 16 << 20;

/// A prefix over the caps is a source error: the last good set keeps serving.
pub(super) fn within_caps(keys: &BTreeMap<Vec<u8>, Vec<u8>>) -> Result<(), String> {
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
