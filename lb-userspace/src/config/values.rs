//! The checks of single values that every section shares. Each takes a TOML value and returns
//! what it means or a message for the operator; the checker attaches the message to a field.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;
use toml::Value;

/// Long values are cut in messages so that one huge string cannot swamp them.
const MAX_SHOWN_CHARS: usize = 64;
/// Bounds free text (names, user names, file paths) that is passed on to other systems.
const MAX_TEXT_LEN: usize = 1_024;
pub(super) const DURATION_FORMS: &str =
    "a duration such as \"500ms\", \"2s\", \"1m\" or \"1h\" (an unsigned integer followed by ms, s, m or h)";

/// `check` of a value that must be given; `what` tells the operator what to write.
pub(super) fn required<'v, T>(
    raw: Option<&'v Value>,
    what: &str,
    check: impl FnOnce(&'v Value) -> Result<T, String>,
) -> Result<T, String> {
    raw.map_or_else(|| Err(format!("required ({what})")), check)
}

pub(super) fn check_str(raw: &Value) -> Result<&str, String> {
    raw.as_str().ok_or_else(|| type_error("a string", raw))
}

/// A non-empty single line of bounded length.
pub(super) fn check_text(raw: &Value) -> Result<&str, String> {
    let text = check_str(raw)?;
    if text.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if text.len() > MAX_TEXT_LEN {
        return Err(format!(
            "{} is longer than {MAX_TEXT_LEN} bytes",
            show(text)
        ));
    }
    if text.chars().any(char::is_control) {
        return Err(format!("{} contains control characters", show(text)));
    }
    Ok(text)
}

/// The agent runs as a service: a relative path would depend on its working directory.
pub(super) fn absolute_path(path: &str) -> Result<PathBuf, String> {
    if !path.starts_with('/') {
        return Err(format!("must be an absolute path, got {}", show(path)));
    }
    Ok(PathBuf::from(path))
}

/// A file named as text: see `check_text` and `absolute_path`.
pub(super) fn check_file_path(raw: &Value) -> Result<PathBuf, String> {
    absolute_path(check_text(raw)?)
}

pub(super) fn check_bool(raw: &Value) -> Result<bool, String> {
    match raw {
        Value::Boolean(b) => Ok(*b),
        other => Err(type_error("a boolean", other)),
    }
}

pub(super) fn check_integer<T>(raw: &Value, range: RangeInclusive<T>) -> Result<T, String>
where
    T: TryFrom<i64> + PartialOrd + fmt::Display,
{
    let Value::Integer(n) = raw else {
        return Err(type_error("an integer", raw));
    };
    T::try_from(*n)
        .ok()
        .filter(|n| range.contains(n))
        .ok_or_else(|| {
            let (min, max) = (range.start(), range.end());
            format!("must be between {min} and {max}, got {n}")
        })
}

/// One of the strings of `choices`, compared case-sensitively.
pub(super) fn check_choice<T: Copy>(raw: &Value, choices: &[(&str, T)]) -> Result<T, String> {
    let Value::String(text) = raw else {
        return Err(type_error(&one_of(choices), raw));
    };
    match choices.iter().find(|(name, _)| name == text) {
        Some(&(_, value)) => Ok(value),
        None => Err(format!("must be {}, got {}", one_of(choices), show(text))),
    }
}

/// `"a"`, `"a" or "b"`, `"a", "b" or "c"`.
pub(super) fn one_of<T>(choices: &[(&str, T)]) -> String {
    let quoted: Vec<String> = choices
        .iter()
        .map(|(name, _)| format!("{name:?}"))
        .collect();
    match quoted.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => quoted.concat(),
    }
}

pub(super) fn check_duration(raw: &Value) -> Result<Duration, String> {
    match raw {
        Value::String(text) => parse_duration(text),
        _ => None,
    }
    .ok_or_else(|| type_error(DURATION_FORMS, raw))
}

pub(super) fn check_duration_in(
    raw: &Value,
    range: RangeInclusive<Duration>,
) -> Result<Duration, String> {
    let value = check_duration(raw)?;
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(format!(
            "must be between {} and {}, got {}",
            show_duration(*range.start()),
            show_duration(*range.end()),
            show_duration(value)
        ))
    }
}

/// A duration within `range`, or `default` when absent.
pub(super) fn check_duration_or(
    raw: Option<&Value>,
    default: Duration,
    range: RangeInclusive<Duration>,
) -> Result<Duration, String> {
    raw.map_or(Ok(default), |v| check_duration_in(v, range))
}

/// An unsigned integer directly followed by `ms`, `s`, `m` or `h`: no sign, fraction or space.
fn parse_duration(text: &str) -> Option<Duration> {
    let unit_at = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(unit_at);
    let millis_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    // `number` holds ASCII digits only, so this fails only when empty or too large.
    let number: u64 = number.parse().ok()?;
    number
        .checked_mul(millis_per_unit)
        .map(Duration::from_millis)
}

/// In the largest unit that shows it exactly, as written in the config: `1500ms`, `2s`, `1h`.
pub(super) fn show_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0ms".to_owned();
    }
    if !d.subsec_nanos().is_multiple_of(1_000_000) {
        return format!("{d:?}");
    }
    match [(3_600_000, "h"), (60_000, "m"), (1_000, "s")]
        .into_iter()
        .find(|(per_unit, _)| ms.is_multiple_of(*per_unit))
    {
        Some((per_unit, unit)) => format!("{}{unit}", ms / per_unit),
        None => format!("{ms}ms"),
    }
}

/// An `address:port` a connect can be sent to (IPv4, or IPv6 in brackets): the data plane
/// matches and rewrites exact destinations, so wildcard, broadcast and multicast addresses or
/// port 0 never make sense. A v4-mapped IPv6 address is the IPv4 address it maps.
pub(super) fn check_endpoint(raw: &Value) -> Result<SocketAddr, String> {
    let Value::String(text) = raw else {
        return Err(type_error("an address:port string", raw));
    };
    let Ok(addr) = text.parse::<SocketAddr>() else {
        return Err(explain_bad_endpoint(text));
    };
    let addr = match addr {
        SocketAddr::V6(v6) if v6.scope_id() != 0 => {
            return Err(format!(
                "a zone (%{}) is not allowed in {}: the data plane matches addresses only",
                v6.scope_id(),
                show(text)
            ))
        }
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    };
    let ip = addr.ip();
    let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    if addr.port() == 0 {
        Err(format!("port 0 is not allowed ({addr})"))
    } else if ip.is_unspecified() {
        Err(format!(
            "the unspecified address {ip} is not allowed ({addr})"
        ))
    } else if broadcast {
        Err(format!(
            "broadcast address 255.255.255.255 is not allowed ({addr})"
        ))
    } else if ip.is_multicast() {
        Err(format!("multicast address {ip} is not allowed ({addr})"))
    } else {
        Ok(addr)
    }
}

fn explain_bad_endpoint(text: &str) -> String {
    let example = "expected address:port like \"10.0.0.1:8080\" or \"[fd00::1]:8080\"";
    if text.parse::<Ipv6Addr>().is_ok() {
        return format!(
            "missing port in {}; an IPv6 address goes in brackets: \"[{text}]:8080\"",
            show(text)
        );
    }
    if text.parse::<Ipv4Addr>().is_ok() {
        return format!("missing port in {}; {example}", show(text));
    }
    match text.rsplit_once(':') {
        Some((ip, port)) if ip.parse::<Ipv4Addr>().is_ok() => {
            format!(
                "invalid port {} in {}: must be a number 1-65535",
                show(port),
                show(text)
            )
        }
        _ => format!("{example}, got {}", show(text)),
    }
}

/// A few distinct characters of `text` for which `is_bad` holds, listed for a message.
pub(super) fn offenders(text: &str, is_bad: impl Fn(char) -> bool) -> Option<String> {
    // A few distinct offenders are enough to point at the problem.
    let mut bad: Vec<String> = Vec::new();
    for shown in text
        .chars()
        .filter(|&c| is_bad(c))
        .map(|c| format!("{c:?}"))
    {
        if bad.len() == 8 {
            break;
        }
        if !bad.contains(&shown) {
            bad.push(shown);
        }
    }
    (!bad.is_empty()).then(|| bad.join(", "))
}

pub(super) fn type_error(expected: &str, got: &Value) -> String {
    let got = match got {
        Value::String(s) => format!("string {}", show(s)),
        Value::Integer(i) => format!("integer {i}"),
        Value::Float(x) => format!("float {x}"),
        Value::Boolean(b) => format!("boolean {b}"),
        other => other.type_str().to_owned(),
    };
    format!("expected {expected}, got {got}")
}

/// Quoted and escaped so that control characters or newlines in a value cannot forge log lines.
pub(super) fn show(value: &str) -> String {
    if value.chars().count() <= MAX_SHOWN_CHARS {
        format!("{value:?}")
    } else {
        let cut: String = value.chars().take(MAX_SHOWN_CHARS).collect();
        format!("{cut:?}...")
    }
}

/// Keys are shown bare, as written in TOML, unless they need quoting.
pub(super) fn show_key(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        key.to_owned()
    } else {
        show(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use crate::config::testkit::{error_after, health_error, single, web, web_with, ORIGIN};

    fn vip_error(vip: &str) -> String {
        let text = web_with(&format!("vip = \"{vip}\""));
        error_after(&text, "lb.toml: service \"web\" (service[0]): vip: ")
    }

    #[test]
    fn ipv6_vips_are_accepted_and_checked() {
        let text = web("vip = \"[fd00::10]:80\"\nbackends = [\"[fd00::1]:8080\"]");
        let config = parse(&text, ORIGIN).unwrap();
        assert_eq!(config.services[0].vip, "[fd00::10]:80".parse().unwrap());
        // A v4-mapped address is the IPv4 address: that is what the kernel sees too.
        let config = parse(&web_with("vip = \"[::ffff:10.0.0.1]:80\""), ORIGIN).unwrap();
        assert_eq!(config.services[0].vip, "10.0.0.1:80".parse().unwrap());
        assert_eq!(
            vip_error("::1"),
            "missing port in \"::1\"; an IPv6 address goes in brackets: \"[::1]:8080\""
        );
        assert_eq!(
            vip_error("[fe80::1%2]:80"),
            "a zone (%2) is not allowed in \"[fe80::1%2]:80\": the data plane matches addresses only"
        );
        assert_eq!(
            vip_error("[::]:80"),
            "the unspecified address :: is not allowed ([::]:80)"
        );
        assert_eq!(
            vip_error("[ff02::1]:80"),
            "multicast address ff02::1 is not allowed ([ff02::1]:80)"
        );
        assert!(vip_error("[2001:db8::1]").starts_with("expected address:port like"));
    }

    #[test]
    fn vip_without_port() {
        assert_eq!(
            vip_error("10.96.0.10"),
            "missing port in \"10.96.0.10\"; expected address:port like \"10.0.0.1:8080\" or \"[fd00::1]:8080\""
        );
    }

    #[test]
    fn vip_with_invalid_port() {
        assert_eq!(
            vip_error("10.96.0.10:70000"),
            "invalid port \"70000\" in \"10.96.0.10:70000\": must be a number 1-65535"
        );
        assert!(vip_error("10.96.0.10:http").starts_with("invalid port \"http\""));
        assert!(vip_error("10.96.0.10:").starts_with("invalid port \"\""));
        assert!(vip_error("10.96.0.10:80 ").starts_with("invalid port \"80 \""));
    }

    #[test]
    fn vip_rejects_port_zero_and_special_addresses() {
        assert_eq!(
            vip_error("10.96.0.10:0"),
            "port 0 is not allowed (10.96.0.10:0)"
        );
        assert_eq!(
            vip_error("0.0.0.0:80"),
            "the unspecified address 0.0.0.0 is not allowed (0.0.0.0:80)"
        );
        assert_eq!(
            vip_error("255.255.255.255:80"),
            "broadcast address 255.255.255.255 is not allowed (255.255.255.255:80)"
        );
        for ip in ["224.0.0.1", "239.255.255.255", "230.1.2.3"] {
            assert_eq!(
                vip_error(&format!("{ip}:80")),
                format!("multicast address {ip} is not allowed ({ip}:80)")
            );
        }
        // Just outside the multicast range.
        assert!(parse(&web_with("vip = \"223.255.255.255:80\""), ORIGIN).is_ok());
        assert!(parse(&web_with("vip = \"240.0.0.1:80\""), ORIGIN).is_ok());
    }

    #[test]
    fn vip_garbage() {
        for vip in [
            "",
            "web.local:80",
            "10.96.0:80",
            "10.96.0.256:80",
            " 10.96.0.10:80",
        ] {
            assert_eq!(
                vip_error(vip),
                format!("expected address:port like \"10.0.0.1:8080\" or \"[fd00::1]:8080\", got {vip:?}"),
                "{vip:?}"
            );
        }
    }

    #[test]
    fn health_durations_must_be_well_formed() {
        for key in ["interval", "timeout", "jitter"] {
            for bad in [
                "2",
                "1.5s",
                "-1s",
                "2 s",
                "",
                "10us",
                " 2s",
                "2s ",
                "+2s",
                "s",
                "2S",
                "2sec",
                "1d",
                "1m30s",
                "0x10s",
                "\u{0661}s",
                "99999999999999999999s",
                "18446744073709551615h",
            ] {
                assert_eq!(
                    health_error(&format!("kind = \"tcp\", {key} = {bad:?}")),
                    format!(
                        "health.{key}: expected a duration such as \"500ms\", \"2s\", \"1m\" or \
                         \"1h\" (an unsigned integer followed by ms, s, m or h), got string {}",
                        show(bad)
                    ),
                    "{key} = {bad:?}"
                );
            }
            assert_eq!(
                health_error(&format!("kind = \"tcp\", {key} = 2")),
                format!(
                    "health.{key}: expected a duration such as \"500ms\", \"2s\", \"1m\" or \
                     \"1h\" (an unsigned integer followed by ms, s, m or h), got integer 2"
                )
            );
        }
    }

    #[test]
    fn parse_duration_accepts_only_integer_and_unit() {
        for (text, ms) in [
            ("0ms", 0),
            ("500ms", 500),
            ("2s", 2_000),
            ("007s", 7_000),
            ("1m", 60_000),
            ("1h", 3_600_000),
            ("18446744073709551615ms", u64::MAX),
        ] {
            assert_eq!(
                parse_duration(text),
                Some(Duration::from_millis(ms)),
                "{text}"
            );
        }
        for text in [
            "",
            "2",
            "ms",
            "1.5s",
            "-1s",
            "+1s",
            "2 s",
            "10us",
            "1ns",
            "1M",
            "1H",
            "2ms ",
            "1sm",
            "18446744073709551615s",
        ] {
            assert_eq!(parse_duration(text), None, "{text:?}");
        }
    }

    #[test]
    fn show_duration_uses_the_largest_exact_unit() {
        for (ms, shown) in [
            (0, "0ms"),
            (1, "1ms"),
            (1_500, "1500ms"),
            (2_000, "2s"),
            (90_000, "90s"),
            (60_000, "1m"),
            (5_400_000, "90m"),
            (7_200_000, "2h"),
        ] {
            assert_eq!(show_duration(Duration::from_millis(ms)), shown);
        }
        assert_eq!(show_duration(Duration::from_micros(1_500)), "1.5ms");
    }

    #[test]
    fn long_values_are_cut_in_messages() {
        let huge = "x".repeat(100_000);
        let e = single(&web_with(&format!("vip = \"{huge}\"")));
        assert!(e.len() < 300, "{} bytes", e.len());
        assert!(
            e.ends_with(&format!("got \"{}\"...", "x".repeat(MAX_SHOWN_CHARS))),
            "{e}"
        );
    }
}
