//! `kind = "consul"`: instances of a service whose checks pass, from a Consul agent's
//! `/v1/health/service/<name>?passing` with blocking queries, following Consul's documented
//! rules for the index: block on the last `X-Consul-Index`, start over when it goes backwards,
//! never block on 0, and pace queries so that a busy index cannot turn into a busy loop.
//! Over http or https (rustls with the ring provider, trusting only the CA bundle of
//! `ca_file`); the config refuses a token in clear text to anything but loopback.

use super::answer::{self, Answer, Reported};
use super::Poll;
use crate::config::ConsulConfig;
use crate::private_files::{read_bounded, read_bounded_text, CERTIFICATE_LIMIT, SECRET_LIMIT};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Body;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::fmt;
use std::marker::PhantomData;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Larger answers are refused: far above what MAX_BACKENDS_PER_SERVICE instances take, even
/// with many checks and tags each. Parsing keeps only the few fields used, so an answer costs
/// little more than its bytes.
pub const MAX_BODY: usize = 16 << 20;
/// Least time between two queries.
const PACE: Duration = Duration::from_millis(100);
/// Longest string of an answer kept (for an address, in a reason); an IP address is shorter.
const MAX_TEXT: usize = 64;

pub struct Watch {
    config: ConsulConfig,
    allow_loopback: bool,
    /// `X-Consul-Index` of the last answer; 0 = ask without blocking.
    index: u64,
}

impl Watch {
    pub fn new(config: ConsulConfig, allow_loopback: bool) -> Self {
        Self {
            config,
            allow_loopback,
            index: 0,
        }
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

    async fn query(&self) -> Result<(u64, Vec<u8>), String> {
        let address = &self.config.address;
        let (https, authority) = match address.strip_prefix("https://") {
            Some(authority) => (true, authority),
            None => (false, address.strip_prefix("http://").unwrap_or(address)),
        };
        // Before connecting: an unreadable token or CA file is the error to show.
        let token = self.token()?;
        let tls = https.then(|| self.tls(authority)).transpose()?;
        let stream = TcpStream::connect(authority)
            .await
            .map_err(|e| format!("connect {authority}: {e}"))?;
        let request = self.request(authority, token)?;
        match tls {
            None => exchange(stream, request, authority).await,
            Some((connector, name)) => {
                let stream = connector
                    .connect(name, stream)
                    .await
                    .map_err(|e| format!("tls handshake with {authority}: {e}"))?;
                exchange(stream, request, authority).await
            }
        }
    }

    fn request(
        &self,
        authority: &str,
        token: Option<String>,
    ) -> Result<hyper::Request<Empty<Bytes>>, String> {
        let mut request = hyper::Request::get(self.target())
            .header(hyper::header::HOST, authority)
            .header(hyper::header::USER_AGENT, "lb-agent-discovery")
            .header(hyper::header::CONNECTION, "close");
        if let Some(token) = token {
            request = request.header("X-Consul-Token", token);
        }
        request
            .body(Empty::new())
            .map_err(|e| format!("request: {e}"))
    }

    /// The TLS client for this query and the name the certificate must carry. The CA file is
    /// read on every query, as the token is, so that a replaced bundle is picked up.
    fn tls(
        &self,
        authority: &str,
    ) -> Result<(tokio_rustls::TlsConnector, ServerName<'static>), String> {
        let path = self
            .config
            .ca_file
            .as_deref()
            .ok_or("https without discovery.ca_file")?;
        let pem = read_bounded(path, CERTIFICATE_LIMIT, "discovery.ca_file")?;
        let bad = |e: String| format!("discovery.ca_file {}: {e}", path.display());
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| bad(format!("not a PEM certificate bundle: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| bad(format!("unusable CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(bad("holds no PEM certificate".to_owned()));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("tls: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let host = match &self.config.tls_server_name {
            Some(name) => name.as_str(),
            None => host_of(authority),
        };
        let name = ServerName::try_from(host.to_owned())
            .map_err(|_| format!("{host:?} is not a name a certificate can carry"))?;
        Ok((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
    }
}

/// The host of `host:port` or `[v6]:port`, without brackets.
fn host_of(authority: &str) -> &str {
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// One request on a fresh connection: the answer's index and body.
async fn exchange<S>(
    stream: S,
    request: hyper::Request<Empty<Bytes>>,
    authority: &str,
) -> Result<(u64, Vec<u8>), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(io)
        .await
        .map_err(|e| format!("http handshake with {authority}: {e}"))?;
    let driver = tokio::spawn(conn);
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("http: {e}"))?;
        let status = response.status();
        let index = response.headers().get("X-Consul-Index").cloned();
        let body = read_body(response.into_body(), MAX_BODY).await?;
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

/// A body of at most `limit` bytes, in one buffer: a declared length over it is refused
/// before anything is read, and a body without one as soon as it passes it.
async fn read_body<B>(mut body: B, limit: usize) -> Result<Vec<u8>, String>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: fmt::Display,
{
    let too_large = |size: String| {
        format!(
            "answer is larger than {} MiB{size}, which no service needs; refusing it",
            limit >> 20
        )
    };
    let declared = usize::try_from(body.size_hint().lower()).unwrap_or(usize::MAX);
    if declared > limit {
        return Err(too_large(format!(" ({declared} bytes)")));
    }
    let mut bytes = Vec::with_capacity(declared);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("reading the answer: {e}"))?;
        if let Ok(data) = frame.into_data() {
            if bytes.len() + data.len() > limit {
                return Err(too_large(String::new()));
            }
            bytes.extend_from_slice(&data);
        }
    }
    Ok(bytes)
}

impl Poll for Watch {
    async fn poll(&mut self) -> Result<(Answer, Duration), String> {
        // Consul adds up to wait/16 of jitter to a blocking query.
        let limit = self.config.wait + self.config.wait / 16 + self.config.timeout;
        let (index, body) = match tokio::time::timeout(limit, self.query()).await {
            Ok(result) => result?,
            Err(_) => return Err(format!("no answer within {limit:?}")),
        };
        let answer = parse(&body, self.allow_loopback)?;
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
/// used is skipped (and named); an answer that is not such an array is an error. Entries are
/// read one at a time into the few fields used and everything else is skipped unkept, so the
/// memory taken stays near the body's size whatever the answer holds.
pub fn parse(body: &[u8], allow_loopback: bool) -> Result<Answer, String> {
    // Skipped fields are not decoded, so invalid UTF-8 in one would otherwise pass: JSON
    // is UTF-8 throughout, and an answer that is not is not Consul's.
    let text = std::str::from_utf8(body)
        .map_err(|e| format!("answer is not valid JSON: not UTF-8 ({e})"))?;
    let Lenient(instances) = serde_json::from_str::<Lenient<Instances>>(text)
        .map_err(|e| format!("answer is not valid JSON: {e}"))?;
    let Instances::Array(reported, answer) = instances else {
        return Err("answer is not a JSON array of instances".to_owned());
    };
    answer::build(reported, answer, allow_loopback)
}

fn instance(entry: &Entry) -> Result<Reported, String> {
    let service = entry.service.as_ref().ok_or("no Service object")?;
    // Consul's rule: an empty service address means the node's address.
    let address = match &service.address {
        Scalar::Text(text) if !text.is_empty() => text,
        _ => match &entry.node.address {
            Scalar::Text(text) => text,
            _ => return Err("no Service.Address and no Node.Address".to_owned()),
        },
    };
    let ip: IpAddr = address
        .parse()
        .map_err(|_| format!("address {} is not an IP address", address.show()))?;
    let port = match service.port {
        Scalar::Number(p) => u16::try_from(p).ok(),
        _ => None,
    }
    .ok_or("Service.Port is missing or not a port number")?;
    let weight = match service.weights.passing {
        Scalar::Absent | Scalar::Null => Some(1),
        Scalar::Number(w) => u32::try_from(w).ok(),
        _ => None,
    }
    .ok_or("Service.Weights.Passing is not a non-negative integer")?;
    Ok(Reported { ip, port, weight })
}

/// The whole answer.
enum Instances {
    /// What each entry reported, and the entries skipped.
    Array(Vec<Reported>, Answer),
    /// Valid JSON, but not an array.
    Other,
}

/// The fields of an entry used. A key that is missing, or an object that is not one, reads
/// as the default, as a lookup into a `serde_json::Value` finds nothing there.
#[derive(Default)]
struct Entry {
    /// `Some` when the key is there, whatever its value.
    service: Option<Service>,
    node: Node,
}

#[derive(Default)]
struct Service {
    address: Scalar,
    port: Scalar,
    weights: Weights,
}

#[derive(Default)]
struct Weights {
    passing: Scalar,
}

#[derive(Default)]
struct Node {
    address: Scalar,
}

/// A value where a string or a number is expected; anything else is only "something else".
#[derive(Default)]
enum Scalar {
    #[default]
    Absent,
    Null,
    Text(Text),
    Number(u64),
    Other,
}

/// At most `MAX_TEXT` bytes of a string, and whether there was more: a huge string in an
/// answer is never copied, nor repeated in a reason.
struct Text {
    start: String,
    cut: bool,
}

impl Text {
    fn new(s: &str) -> Self {
        let mut end = s.len().min(MAX_TEXT);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        Self {
            start: s[..end].to_owned(),
            cut: end < s.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.start.is_empty()
    }

    fn parse(&self) -> Result<IpAddr, ()> {
        match self.cut {
            false => self.start.parse().map_err(|_| ()),
            true => Err(()),
        }
    }

    fn show(&self) -> String {
        format!("{:?}{}", self.start, if self.cut { "…" } else { "" })
    }
}

/// The keys read; any other is `Other` and its value skipped.
enum Key {
    Service,
    Node,
    Address,
    Port,
    Weights,
    Passing,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Name;
        impl Visitor<'_> for Name {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_str<E: de::Error>(self, key: &str) -> Result<Key, E> {
                Ok(match key {
                    "Service" => Key::Service,
                    "Node" => Key::Node,
                    "Address" => Key::Address,
                    "Port" => Key::Port,
                    "Weights" => Key::Weights,
                    "Passing" => Key::Passing,
                    _ => Key::Other,
                })
            }
        }
        d.deserialize_identifier(Name)
    }
}

/// A type read from any JSON value: each kind of value goes to its hook, and the hooks not
/// given skip the value (nested ones read through, nothing kept) and give `other()`. So a
/// value of an unexpected type is never an error, only an unusable entry.
trait Read: Sized {
    fn other() -> Self;
    fn null() -> Self {
        Self::other()
    }
    fn number(_: u64) -> Self {
        Self::other()
    }
    fn text(_: &str) -> Self {
        Self::other()
    }
    fn array<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Self::other())
    }
    /// An object's fields: `field` reads the value of a key it knows and says so; the value
    /// of any other key is skipped.
    fn object<'de, A: MapAccess<'de>>(map: A) -> Result<Self, A::Error> {
        fields(map, Self::other(), |_, _, _| Ok(false))
    }
}

fn fields<'de, A: MapAccess<'de>, T>(
    mut map: A,
    mut value: T,
    field: impl Fn(&mut T, Key, &mut A) -> Result<bool, A::Error>,
) -> Result<T, A::Error> {
    while let Some(key) = map.next_key::<Key>()? {
        if !field(&mut value, key, &mut map)? {
            map.next_value::<IgnoredAny>()?;
        }
    }
    Ok(value)
}

/// `T` read through its `Read` hooks (serde's `Deserialize` cannot be given to every `Read`).
struct Lenient<T>(T);

impl<'de, T: Read> Deserialize<'de> for Lenient<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Any<T>(PhantomData<T>);
        impl<'de, T: Read> Visitor<'de> for Any<T> {
            type Value = T;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<T, E> {
                Ok(T::other())
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<T, E> {
                Ok(T::other())
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<T, E> {
                Ok(T::number(n))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<T, E> {
                Ok(T::other())
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<T, E> {
                Ok(T::text(s))
            }
            fn visit_unit<E: de::Error>(self) -> Result<T, E> {
                Ok(T::null())
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<T, A::Error> {
                T::array(seq)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::object(map)
            }
        }
        d.deserialize_any(Any(PhantomData)).map(Lenient)
    }
}

/// The value of the current key, read as `T`.
fn next<'de, A: MapAccess<'de>, T: Read>(map: &mut A) -> Result<T, A::Error> {
    map.next_value::<Lenient<T>>().map(|Lenient(value)| value)
}

impl Read for Instances {
    fn other() -> Self {
        Instances::Other
    }

    fn array<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        let mut answer = Answer::default();
        let mut reported = Vec::new();
        let mut i = 0usize;
        while let Some(Lenient(entry)) = seq.next_element::<Lenient<Entry>>()? {
            match instance(&entry) {
                Ok(r) => reported.push(r),
                Err(reason) => answer.skip(format!("instance [{i}]: {reason}")),
            }
            i += 1;
        }
        Ok(Instances::Array(reported, answer))
    }
}

impl Read for Entry {
    fn other() -> Self {
        Self::default()
    }

    fn object<'de, A: MapAccess<'de>>(map: A) -> Result<Self, A::Error> {
        fields(map, Self::default(), |entry, key, map| {
            match key {
                Key::Service => entry.service = Some(next(map)?),
                Key::Node => entry.node = next(map)?,
                _ => return Ok(false),
            }
            Ok(true)
        })
    }
}

impl Read for Service {
    fn other() -> Self {
        Self::default()
    }

    fn object<'de, A: MapAccess<'de>>(map: A) -> Result<Self, A::Error> {
        fields(map, Self::default(), |service, key, map| {
            match key {
                Key::Address => service.address = next(map)?,
                Key::Port => service.port = next(map)?,
                Key::Weights => service.weights = next(map)?,
                _ => return Ok(false),
            }
            Ok(true)
        })
    }
}

impl Read for Weights {
    fn other() -> Self {
        Self::default()
    }

    fn object<'de, A: MapAccess<'de>>(map: A) -> Result<Self, A::Error> {
        fields(map, Self::default(), |weights, key, map| {
            match key {
                Key::Passing => weights.passing = next(map)?,
                _ => return Ok(false),
            }
            Ok(true)
        })
    }
}

impl Read for Node {
    fn other() -> Self {
        Self::default()
    }

    fn object<'de, A: MapAccess<'de>>(map: A) -> Result<Self, A::Error> {
        fields(map, Self::default(), |node, key, map| {
            match key {
                Key::Address => node.address = next(map)?,
                _ => return Ok(false),
            }
            Ok(true)
        })
    }
}

impl Read for Scalar {
    fn other() -> Self {
        Scalar::Other
    }
    fn null() -> Self {
        Scalar::Null
    }
    fn number(n: u64) -> Self {
        Scalar::Number(n)
    }
    fn text(s: &str) -> Self {
        Scalar::Text(Text::new(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(address: &str) -> ConsulConfig {
        ConsulConfig {
            address: address.into(),
            ca_file: None,
            tls_server_name: None,
            service: "web".into(),
            datacenter: None,
            tag: None,
            token_file: None,
            wait: Duration::from_secs(30),
            timeout: Duration::from_secs(5),
        }
    }

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
        let a = parse(body.as_bytes(), false).unwrap();
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
            assert!(parse(body.as_bytes(), false).is_err(), "{body:?} accepted");
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
        let a = parse(body.as_bytes(), false).unwrap();
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
        let e = parse(body.as_bytes(), false).unwrap_err();
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
        let mut w = Watch::new(config("http://127.0.0.1:8500"), false);
        w.config.datacenter = Some("dc2".into());
        w.config.tag = Some("v2".into());
        w.config.wait = Duration::from_secs(30);
        assert_eq!(w.target(), "/v1/health/service/web?passing=1&dc=dc2&tag=v2");
        w.index = 42;
        assert_eq!(
            w.target(),
            "/v1/health/service/web?passing=1&index=42&wait=30000ms&dc=dc2&tag=v2"
        );
    }

    #[test]
    fn entries_of_any_shape_are_skipped_as_before() {
        // The cases a lookup into a JSON value decided: a null or non-object Service is there
        // but has nothing; a non-object entry has no Service; the last of duplicate keys wins.
        let body = r#"[
            1,
            {"Service": null, "Node": {"Address": "10.0.0.1"}},
            {"Service": [1, {"Port": 80}], "Node": {"Address": "10.0.0.2"}},
            {"Service": {"Address": 7, "Port": 80}, "Node": {"Address": "10.0.0.3"}},
            {"Service": {"Port": 80, "Weights": {"Passing": -1}}, "Node": {"Address": "10.0.0.4"}},
            {"Service": {"Port": 80.0}, "Node": {"Address": "10.0.0.5"}},
            {"Service": {"Port": 80}, "Node": {"Address": "10.0.0.6", "Address": ["x"]}},
            {"Service": {"Port": 1, "Port": 81, "Weights": {"Passing": null}, "Tags": [{"a": [[]]}]},
             "Node": {"Address": "10.0.0.1"}, "Node": {"Address": "10.0.0.7"}}
        ]"#;
        let a = parse(body.as_bytes(), false).unwrap();
        let kept: Vec<String> = a
            .backends
            .iter()
            .map(|b| format!("{}/{}", b.address, b.weight))
            .collect();
        // [3]: a non-string Service.Address is empty, so the node's address counts.
        assert_eq!(kept, ["10.0.0.3:80/1", "10.0.0.7:81/1"]);
        let want = [
            "instance [0]: no Service object",
            "instance [1]: Service.Port is missing",
            "instance [2]: Service.Port is missing",
            "instance [4]: Service.Weights.Passing is not a non-negative integer",
            "instance [5]: Service.Port is missing",
            "instance [6]: no Service.Address and no Node.Address",
        ];
        assert_eq!(a.reasons.len(), want.len(), "{:?}", a.reasons);
        for (got, want) in a.reasons.iter().zip(want) {
            assert!(got.starts_with(want), "{got:?} is not {want:?}");
        }
    }

    #[test]
    fn a_huge_address_is_not_repeated_in_the_reason() {
        let huge = "1".repeat(1 << 20);
        let body = format!(r#"[{{"Service":{{"Address":"{huge}","Port":80}}}}]"#);
        let a = parse(body.as_bytes(), false).unwrap();
        assert_eq!(a.skipped, 1);
        let reason = &a.reasons[0];
        assert!(reason.len() < 200, "{} bytes", reason.len());
        assert!(
            reason.contains("…\" is not") || reason.contains("\"… is not"),
            "{reason}"
        );
    }

    #[test]
    fn loopback_instances_are_refused_unless_allowed() {
        let body = format!(
            "[{},{}]",
            entry("127.0.0.1", "", 80, 1),
            entry("10.0.0.1", "", 80, 1)
        );
        let refused = parse(body.as_bytes(), false).unwrap();
        assert_eq!(refused.backends.len(), 1);
        assert!(
            refused.reasons[0].contains("loopback"),
            "{:?}",
            refused.reasons
        );
        assert_eq!(parse(body.as_bytes(), true).unwrap().backends.len(), 2);
    }

    #[tokio::test]
    async fn bodies_over_the_cap_are_refused_declared_or_streamed() {
        use http_body_util::{Full, StreamBody};
        let declared = Full::new(Bytes::from(vec![b' '; 2 << 20]));
        let e = read_body(declared, 1 << 20)
            .await
            .map(|b| b.len())
            .unwrap_err();
        assert!(
            e.starts_with("answer is larger than 1 MiB (2097152 bytes)"),
            "{e}"
        );
        // No length given: refused once past the cap, not after reading everything.
        let chunks = (0..64).map(|_| {
            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from(vec![
                b' ';
                64 << 10
            ])))
        });
        let streamed = StreamBody::new(futures::stream::iter(chunks));
        let e = read_body(streamed, 1 << 20)
            .await
            .map(|b| b.len())
            .unwrap_err();
        assert!(e.starts_with("answer is larger than 1 MiB,"), "{e}");
        let fits = Full::new(Bytes::from_static(b"[]"));
        assert_eq!(read_body(fits, 1 << 20).await.unwrap(), b"[]");
    }

    /// Runs `openssl` in `dir`; the test needs the command (`cargo xtask setup` installs it).
    fn openssl(dir: &std::path::Path, args: &[&str]) {
        let out = std::process::Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("the openssl command (cargo xtask setup installs it)");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "openssl {args:?}: {err}");
    }

    /// `ca.pem` and `other-ca.pem`, and `server.pem` + `server.key` that `ca.pem` signed for
    /// the name `consul.test` only (no IP address).
    fn make_certs(dir: &std::path::Path) {
        let key = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for ca in ["ca", "other-ca"] {
            let (keyout, out, subj) = (
                format!("{ca}.key"),
                format!("{ca}.pem"),
                format!("/CN={ca}"),
            );
            let args = [
                "req", "-x509", "-days", "2", "-keyout", &keyout, "-out", &out, "-subj", &subj,
            ];
            openssl(dir, &[&args[..2], &key[..], &args[2..]].concat());
        }
        let args = [
            "req",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=consul.test",
        ];
        openssl(dir, &[&args[..1], &key[..], &args[1..]].concat());
        std::fs::write(dir.join("san.cnf"), "subjectAltName=DNS:consul.test\n").unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "san.cnf",
                "-out",
                "server.pem",
            ],
        );
    }

    /// A TLS server on 127.0.0.1 answering every request with one instance; it records each
    /// request's head.
    async fn tls_consul(
        dir: &std::path::Path,
    ) -> (std::net::SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
        use rustls::pki_types::PrivateKeyDer;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let chain = CertificateDer::pem_file_iter(dir.join("server.pem"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = heads.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                // A client that refuses the certificate ends the handshake: next connection.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let mut byte = [0u8];
                    if tls.read(&mut byte).await.unwrap_or(0) == 0 {
                        break;
                    }
                    head.push(byte[0]);
                }
                seen.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&head).into_owned());
                let body = format!("[{}]", entry("10.0.0.1", "10.0.1.1", 8080, 2));
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nX-Consul-Index: 7\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(reply.as_bytes()).await;
                let _ = tls.shutdown().await;
            }
        });
        (addr, heads)
    }

    #[tokio::test]
    async fn https_with_a_ca_file_checks_the_certificate() {
        let dir = std::env::temp_dir().join(format!("lb-consul-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        make_certs(&dir);
        std::fs::write(dir.join("token"), "s3cret\n").unwrap();
        let (addr, heads) = tls_consul(&dir).await;
        let watch = |ca: &str, server_name: Option<&str>| {
            let mut c = config(&format!("https://{addr}"));
            c.ca_file = Some(dir.join(ca));
            c.tls_server_name = server_name.map(str::to_owned);
            c.token_file = Some(dir.join("token"));
            Watch::new(c, false)
        };

        // The certificate names consul.test, which the address (an IP) is not.
        let (index, body) = watch("ca.pem", Some("consul.test")).query().await.unwrap();
        assert_eq!(index, 7);
        let answer = parse(&body, false).unwrap();
        assert_eq!(answer.backends[0].address.to_string(), "10.0.1.1:8080");
        let head = heads.lock().unwrap()[0].clone();
        assert!(head.contains("x-consul-token: s3cret\r\n"), "{head}");
        assert!(
            head.starts_with("GET /v1/health/service/web?passing=1 "),
            "{head}"
        );

        let e = watch("ca.pem", None)
            .query()
            .await
            .map(|(i, b)| (i, b.len()))
            .unwrap_err();
        assert!(
            e.starts_with(&format!("tls handshake with {addr}: "))
                && e.contains("not valid for name \"127.0.0.1\""),
            "{e}"
        );
        let e = watch("other-ca.pem", Some("consul.test"))
            .query()
            .await
            .map(|(i, b)| (i, b.len()))
            .unwrap_err();
        assert!(e.contains("UnknownIssuer"), "{e}");
        // The token never left on a connection whose certificate was refused.
        assert_eq!(heads.lock().unwrap().len(), 1);

        let e = watch("server.key", Some("consul.test"))
            .query()
            .await
            .map(|(i, b)| (i, b.len()))
            .unwrap_err();
        assert!(
            e.contains("discovery.ca_file") && e.contains("holds no PEM certificate"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Found by fuzzing: a skipped field is not decoded, so its invalid UTF-8 went unseen.
    #[test]
    fn invalid_utf8_anywhere_is_not_json() {
        let mut body = format!("[{}]", entry("10.0.0.1", "", 8080, 1)).into_bytes();
        let at = body.windows(4).position(|w| w == b"\"n\",").unwrap() + 1;
        body[at] = 0xaf;
        let e = parse(&body, false).unwrap_err();
        assert!(e.contains("not UTF-8"), "{e}");
    }
}
