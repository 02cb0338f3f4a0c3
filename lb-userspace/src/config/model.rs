//! What a checked config is: every type the rest of the agent reads. The checks that build them
//! from TOML are in the sibling modules, one per section.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The most services a config may list: what the maps can be sized for at most. The maps'
/// actual capacity (`lb-agent run --max-services`) is checked when they are written.
pub const MAX_SERVICES: usize = lb_common::LIMIT_SERVICES as usize;
pub const MAX_BACKENDS_PER_SERVICE: usize = 1_024;
pub const MAX_WEIGHT: u32 = 10_000;
pub const MAX_NAME_LEN: usize = lb_common::MAX_NAME_LEN;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Config {
    pub services: Vec<ServiceConfig>,
    /// Services from a Kubernetes API server, next to the listed ones.
    pub kubernetes: Option<KubernetesConfig>,
    pub dataplane: DataplaneConfig,
}

/// `[dataplane]`: switches for the kernel programs themselves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataplaneConfig {
    /// Count bytes and packets per backend: a program runs for every packet of the cgroup, so
    /// hosts that need no traffic counters can turn it off (its cost is in bench/README.md).
    /// Takes effect when the agent starts.
    pub count_bytes: bool,
    /// Cgroups whose processes (and those of the cgroups below) are never translated: glob
    /// patterns of paths relative to the cgroup2 mount, or absolute paths under it. Followed
    /// live.
    pub bypass: Vec<String>,
    /// Sockets of removed backends destroyed per second at most, node-wide.
    pub max_terminations_per_second: u32,
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        Self {
            count_bytes: true,
            bypass: Vec::new(),
            max_terminations_per_second: 1000,
        }
    }
}

/// `terminate_on_removal`: which sockets translated to a backend are destroyed when the backend
/// leaves its service (removed, unhealthy or ejected).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Terminate {
    /// Connected UDP sockets only: no handshake ever fails for them, so nothing else tells
    /// their owner that the peer is gone (a DNS client would keep asking a deleted pod).
    #[default]
    Udp,
    /// TCP connections too: they see ECONNABORTED and reconnect to a live backend at once.
    All,
    None,
}

/// A service's name, shared by the config, the services planned and the mirror of the maps
/// rather than copied into each (250,000 services: 20 MB less).
pub type Name = std::sync::Arc<str>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    pub name: Name,
    pub vip: SocketAddr,
    pub protocol: Protocol,
    pub backends: Backends,
    /// Boxed, as `outlier` and `rebalance`: most services have none, and inline they more than
    /// doubled a service's size (344 bytes instead of 152: 48 MB more for 250,000 services).
    pub health: Option<Box<HealthConfig>>,
    /// When too few backends are healthy, balance over all configured backends instead of refusing connects.
    pub fail_open: bool,
    /// Percent 0..=100: fail open when the healthy share is below this (0 = only when no backend is healthy).
    pub panic_threshold: u8,
    /// Which sockets translated to a backend are destroyed when it leaves the service.
    pub terminate: Terminate,
    /// Where `backends` come from at run time; `None` = the static list above. Boxed: most
    /// services have none, and inline it would double every service's size (250,000 services
    /// of a file take 50 MB less).
    pub discovery: Option<Box<DiscoveryConfig>>,
    pub balancing: Balancing,
    /// Passive outlier detection from kernel-observed connect outcomes.
    pub outlier: Option<Box<OutlierConfig>>,
    /// Closing idle pooled connections, so that they reconnect elsewhere.
    pub rebalance: Option<Box<RebalanceConfig>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(&self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// A service's backends, shared: the services the agent plans (`catalog::Service`) hold the
/// file's list, not a copy of it (250,000 services of four backends: 40 MB less).
pub type Backends = std::sync::Arc<[BackendConfig]>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    pub address: SocketAddr,
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    pub kind: ProbeKind,
    /// Port to probe; None = the backend's own port.
    pub port: Option<u16>,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    pub jitter: Duration,
    pub initial: InitialState,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeKind {
    Tcp,
    /// `expect_status: None` = any 2xx.
    Http {
        path: String,
        expect_status: Option<u16>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitialState {
    Healthy,
    Unhealthy,
}

/// How a service picks a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Balancing {
    pub algorithm: Algorithm,
    /// Client affinity: a client keeps its backend until it has been idle this long.
    pub affinity: Option<Duration>,
    pub client_key: ClientKey,
}

impl Default for Balancing {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::Random,
            affinity: None,
            client_key: ClientKey::Netns,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// A random backend for each new connection, in proportion to weights.
    Random,
    /// Consistent hashing of the client key over a lookup table of `table_size` entries.
    Maglev { table_size: u32 },
    /// Of two random choices in proportion to weights, the backend with fewer open
    /// connections, as the kernel counts them.
    LeastConnections,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKey {
    /// The socket's network namespace: a pod or container.
    Netns,
    /// The cgroup of the connecting task: a systemd unit or a container on a host network.
    Cgroup,
}

/// `[service.outlier]`, Envoy's semantics applied to connect outcomes the kernel observes. A
/// backend is ejected after `consecutive_failures` failed connects in a row, or when failures
/// exceed `failure_percentage` of at least `min_requests` connects within one `interval`; it
/// comes back after `base_ejection_time` × the number of times it was ejected (at most
/// `max_ejection_time`). At most `max_ejection_percent` of a service's backends are ejected at
/// once (at least one may always be).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutlierConfig {
    /// 0 turns the rule off.
    pub consecutive_failures: u32,
    /// 0 turns the rule off.
    pub failure_percentage: u8,
    pub min_requests: u32,
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    pub max_ejection_percent: u8,
}

/// `[service.rebalance]`: the agent closes idle connections a service's clients keep open, so
/// that they reconnect through the VIP: those older than `max_connection_age` (each with its
/// own jitter), and, with `on_skew`, those of backends holding more than their share while
/// another holds less. A connection is closed only when idle (see `datapath::survey`); its
/// client sees it as closed by the server, as pooled clients expect of keep-alive
/// connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RebalanceConfig {
    pub max_connection_age: Option<Duration>,
    /// Each connection's age limit is moved by up to this much, so that connections opened
    /// together are not closed together.
    pub age_jitter: Duration,
    pub on_skew: bool,
    /// Percent of a backend's fair share its count may differ by (at least one connection)
    /// before the skew is corrected.
    pub tolerance: u8,
    /// How long a connection must have carried no data, either way, to be closed.
    pub idle_after: Duration,
    /// Per service: a bound on the reconnects the rebalance causes.
    pub max_closes_per_second: u32,
}

/// `[service.discovery]`: where a service's backends come from when they are not listed in
/// the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryConfig {
    pub source: SourceConfig,
    /// Exponential backoff bounds between failed attempts.
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// Loopback and link-local addresses from the source are used (otherwise skipped).
    pub allow_loopback_backends: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceConfig {
    Dns(DnsConfig),
    Etcd(EtcdConfig),
    Consul(ConsulConfig),
}

impl SourceConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            SourceConfig::Dns(_) => "dns",
            SourceConfig::Etcd(_) => "etcd",
            SourceConfig::Consul(_) => "consul",
        }
    }

    /// What is asked, for logs and `stats`: the name, the prefix or the Consul service.
    pub fn target(&self) -> String {
        match self {
            SourceConfig::Dns(d) => d.name.clone(),
            SourceConfig::Etcd(e) => e.prefix.clone(),
            SourceConfig::Consul(c) => c.service.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    pub name: String,
    pub record: DnsRecord,
    /// Empty: the system resolver configuration (/etc/resolv.conf).
    pub nameservers: Vec<SocketAddr>,
    /// The record TTL decides when to ask again, clamped to these bounds.
    pub min_refresh: Duration,
    pub max_refresh: Duration,
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsRecord {
    /// A (and AAAA) records; every address serves on `port`.
    Address { port: u16 },
    /// SRV records: each gives a target name, port and weight.
    Srv,
}

/// `Hash`: services with equal settings but for the prefix share a connection (`sources::etcd`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EtcdConfig {
    /// `http://` or `https://` URLs. Empty in the file means "from `ETCD_ENDPOINTS`", which
    /// `load` resolves, so this is never empty in a loaded config.
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsulConfig {
    /// `http://host:port` or `https://host:port` of a Consul agent.
    pub address: String,
    /// With https: the CA bundle (PEM) that the agent's certificate must chain to.
    pub ca_file: Option<PathBuf>,
    /// With https: the name the certificate must carry, when not the address's host.
    pub tls_server_name: Option<String>,
    pub service: String,
    pub datacenter: Option<String>,
    pub tag: Option<String>,
    /// ACL token; when absent, `CONSUL_HTTP_TOKEN` is used if set.
    pub token_file: Option<PathBuf>,
    /// How long one blocking query may wait for a change.
    pub wait: Duration,
    pub timeout: Duration,
}

/// `[kubernetes]`: services and their backends from a Kubernetes API server (ClusterIP
/// Services and their EndpointSlices), next to the services listed in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesConfig {
    /// `None`: `$KUBECONFIG` or `~/.kube/config` when present, else the in-cluster service
    /// account.
    pub kubeconfig: Option<PathBuf>,
    /// Empty: every namespace.
    pub namespaces: Vec<String>,
    /// Only Services matching this label selector (`k=v,k2!=v2,k3`) are balanced.
    pub label_selector: Option<String>,
    /// `scheme://host:port` of the API server, reached with the in-cluster service account's
    /// token and CA instead of `KUBERNETES_SERVICE_HOST`/`_PORT` (a ClusterIP that nothing
    /// translates before the agent runs on a node without kube-proxy).
    pub api_server: Option<String>,
    /// This node's name, for `internalTrafficPolicy: Local` and node hints; `None`: `$NODE_NAME`.
    pub node_name: Option<String>,
    /// This node's zone, for zone hints; `None`: the `topology.kubernetes.io/zone` label of
    /// the node named by `node_name`/`$NODE_NAME` (read at each watch start), if any.
    pub zone: Option<String>,
    /// Services beyond this many (oldest first) are left out.
    pub max_services: usize,
    /// Endpoints beyond this many per service port (lowest addresses first) are left out.
    pub max_endpoints_per_service: usize,
    /// Endpoints in 127/8, ::1, 169.254/16 or fe80::/10 are refused unless this is set.
    pub allow_loopback_backends: bool,
}

/// `[kubernetes] max_services` when not given: Kubernetes' own tested scale.
pub const DEFAULT_KUBE_MAX_SERVICES: usize = 10_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_as_str() {
        assert_eq!(Protocol::Tcp.as_str(), "tcp");
        assert_eq!(Protocol::Udp.as_str(), "udp");
    }
}
