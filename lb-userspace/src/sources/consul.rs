//! `kind = "consul"`: instances of a service whose checks pass, from a Consul agent's
//! `/v1/health/service/<name>?passing` with blocking queries, following Consul's documented
//! rules for the index: block on the last `X-Consul-Index`, start over when it goes backwards,
//! never block on 0, and pace queries so that a busy index cannot turn into a busy loop.

use super::answer::{self, Answer, Reported};
use super::Poll;
use crate::config::ConsulConfig;
use crate::private_files::{read_bounded_text, SECRET_LIMIT};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use serde_json::Value;
use std::net::IpAddr;
use std::time::Duration;
use tokio::net::TcpStream;

/// Larger answers are refused: far above what MAX_BACKENDS_PER_SERVICE instances take.
const MAX_BODY: usize = 16 << 20;
/// Least time between two queries.
const PACE: Duration = Duration::from_millis(100);

pub struct Watch {
    config: ConsulConfig,
    /// `X-Consul-Index` of the last answer; 0 = ask without blocking.
    index: u64,
}

impl Watch {
    pub fn new(config: ConsulConfig) -> Self {
        Self { config, index: 0 }
    }

    fn token(&self) -> Result<Option<String>, String> {
        match &self.config.token_file {
            // Read on every query so that a rotated token is picked up.
            Some(path) => read_bounded_text(path, SECRET_LIMIT, "discovery.token_file")
                .map(|t| Some(t.trim().to_owned())),
            None => Ok(std::env::var("CONSUL_HTTP_TOKEN").ok()),
        }
    }

    fn target(&self) -> String {
        let c = &self.config;
        let mut target = format!("/v1/health/service/{}?passing=1", c.service);
        if self.index > 0 {
            target += &format!("&index={}&wait={}ms", self.index, c.wait.as_millis());
        }
        if let Some(dc) = &c.datacenter {
            target += &format!("&dc={dc}");
        }
        if let Some(tag) = &c.tag {
            target += &format!("&tag={tag}");
        }
        target
    }

    async fn query(&self) -> Result<(u64, Bytes), String> {
        let authority = self
            .config
            .address
            .strip_prefix("http://")
            .unwrap_or(&self.config.address);
        let stream = TcpStream::connect(authority)
            .await
            .map_err(|e| format!("connect {authority}: {e}"))?;
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(io)
            .await
            .map_err(|e| format!("http handshake with {authority}: {e}"))?;
        let driver = tokio::spawn(conn);
        let mut request = hyper::Request::get(self.target())
            .header(hyper::header::HOST, authority)
            .header(hyper::header::USER_AGENT, "lb-agent-discovery")
            .header(hyper::header::CONNECTION, "close");
        if let Some(token) = self.token()? {
            request = request.header("X-Consul-Token", token);
        }
        let request = request
            .body(Empty::new())
            .map_err(|e| format!("request: {e}"))?;
        let result = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| format!("http: {e}"))?;
            let status = response.status();
            let index = response.headers().get("X-Consul-Index").cloned();
            let body = Limited::new(response.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| format!("reading the answer: {e}"))?
                .to_bytes();
            if !status.is_success() {
                let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
                return Err(format!("http status {status}: {text:?}"));
            }
            let index = index
                .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
                .ok_or("answer lacks a numeric X-Consul-Index header")?;
            Ok((index, body))
        }
        .await;
        driver.abort();
        result
    }
}

impl Poll for Watch {
    async fn poll(&mut self) -> Result<(Answer, Duration), String> {
        // Consul adds up to wait/16 of jitter to a blocking query.
        let limit = self.config.wait + self.config.wait / 16 + self.config.timeout;
        let (index, body) = match tokio::time::timeout(limit, self.query()).await {
            Ok(result) => result?,
            Err(_) => return Err(format!("no answer within {limit:?}")),
        };
        let answer = parse(&body)?;
        self.index = next_index(self.index, index);
        Ok((answer, PACE))
    }
}

/// The index to block on next.
fn next_index(previous: u64, answered: u64) -> u64 {
    if answered < previous {
        // The index went backwards (a Consul restart or snapshot restore): ask afresh.
        0
    } else {
        // An index of 0 would make every query return at once; Consul's docs say to use 1.
        answered.max(1)
    }
}

/// The JSON array of `/v1/health/service`: one entry per instance. An entry that cannot be
/// used is skipped (and named); an answer that is not such an array is an error.
pub fn parse(body: &[u8]) -> Result<Answer, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("answer is not valid JSON: {e}"))?;
    let Value::Array(entries) = value else {
        return Err("answer is not a JSON array of instances".to_owned());
    };
    let mut answer = Answer::default();
    let mut reported = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        match instance(entry) {
            Ok(r) => reported.push(r),
            Err(reason) => answer.skip(format!("instance [{i}]: {reason}")),
        }
    }
    answer::build(reported, answer)
}

fn instance(entry: &Value) -> Result<Reported, String> {
    let service = entry.get("Service").ok_or("no Service object")?;
    let service_address = service.get("Address").and_then(Value::as_str).unwrap_or("");
    // Consul's rule: an empty service address means the node's address.
    let address = if service_address.is_empty() {
        entry
            .pointer("/Node/Address")
            .and_then(Value::as_str)
            .ok_or("no Service.Address and no Node.Address")?
    } else {
        service_address
    };
    let ip: IpAddr = address
        .parse()
        .map_err(|_| format!("address {address:?} is not an IP address"))?;
    let port = service
        .get("Port")
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .ok_or("Service.Port is missing or not a port number")?;
    let weight = match service.pointer("/Weights/Passing") {
        None | Some(Value::Null) => 1,
        Some(w) => w
            .as_u64()
            .and_then(|w| u32::try_from(w).ok())
            .ok_or("Service.Weights.Passing is not a non-negative integer")?,
    };
    Ok(Reported { ip, port, weight })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(node: &str, address: &str, port: u64, weight: u64) -> String {
        format!(
            r#"{{"Node":{{"Node":"n","Address":"{node}"}},"Service":{{"Service":"web","Address":"{address}","Port":{port},"Weights":{{"Passing":{weight},"Warning":1}}}},"Checks":[]}}"#
        )
    }

    #[test]
    fn service_address_wins_over_node_address() {
        let body = format!(
            "[{},{}]",
            entry("10.0.0.1", "", 8080, 1),
            entry("10.0.0.2", "10.0.1.2", 9090, 3)
        );
        let a = parse(body.as_bytes()).unwrap();
        let got: Vec<String> = a
            .backends
            .iter()
            .map(|b| format!("{}/{}", b.address, b.weight))
            .collect();
        assert_eq!(got, ["10.0.0.1:8080/1", "10.0.1.2:9090/3"]);
    }

    #[test]
    fn garbage_answers_are_errors() {
        for body in ["", "{", "{\"a\":1}", "null", "[1,2", "\u{0}"] {
            assert!(parse(body.as_bytes()).is_err(), "{body:?} accepted");
        }
    }

    #[test]
    fn bad_entries_are_skipped_with_reasons() {
        let body = format!(
            "[{},{},{},{},{},{}]",
            entry("10.0.0.1", "", 0, 1),
            entry("not-an-ip", "", 80, 1),
            entry("10.0.0.3", "", 70000, 1),
            entry("10.0.0.4", "", 80, 0),
            r#"{"Node":{}}"#,
            entry("10.0.0.6", "", 80, 1),
        );
        let a = parse(body.as_bytes()).unwrap();
        assert_eq!(a.backends.len(), 1);
        assert_eq!(a.skipped, 5, "{:?}", a.reasons);
        assert!(
            a.reasons.iter().any(|r| r.contains("port 0")),
            "{:?}",
            a.reasons
        );
        assert!(a
            .reasons
            .iter()
            .any(|r| r.contains("\"not-an-ip\" is not an IP")));
        assert!(a
            .reasons
            .iter()
            .any(|r| r.starts_with("instance [4]: no Service")));
    }

    #[test]
    fn ten_thousand_instances_are_refused_whole() {
        let entries: Vec<String> = (0..10_000u32)
            .map(|i| {
                entry(
                    &std::net::Ipv4Addr::from(0x0a00_0000 + i).to_string(),
                    "",
                    80,
                    1,
                )
            })
            .collect();
        let body = format!("[{}]", entries.join(","));
        let e = parse(body.as_bytes()).unwrap_err();
        assert!(e.contains("10000 usable instances"), "{e}");
    }

    #[test]
    fn index_rules() {
        assert_eq!(next_index(0, 7), 7);
        assert_eq!(next_index(7, 7), 7);
        assert_eq!(next_index(7, 9), 9);
        assert_eq!(next_index(9, 3), 0, "backwards resets");
        assert_eq!(next_index(0, 0), 1, "never block on 0");
    }

    #[test]
    fn query_carries_passing_index_wait_dc_and_tag() {
        let mut w = Watch::new(ConsulConfig {
            address: "http://127.0.0.1:8500".into(),
            service: "web".into(),
            datacenter: Some("dc2".into()),
            tag: Some("v2".into()),
            token_file: None,
            wait: Duration::from_secs(30),
            timeout: Duration::from_secs(1),
        });
        assert_eq!(w.target(), "/v1/health/service/web?passing=1&dc=dc2&tag=v2");
        w.index = 42;
        assert_eq!(
            w.target(),
            "/v1/health/service/web?passing=1&index=42&wait=30000ms&dc=dc2&tag=v2"
        );
    }
}
