//! Harness for the privileged end-to-end tests and the demo. Every resource a test creates (a
//! network namespace, a child cgroup, a bpffs pin folder, processes) is owned by a value whose
//! Drop removes it, so a failing test cleans up too. All traffic happens inside the namespace,
//! which has only a loopback device: an untranslated VIP connect fails with ENETUNREACH there.

pub mod cgroup;
pub mod config;
pub mod join;
pub mod kube_mock;
pub mod netns;
pub mod paths;
pub mod pins;
pub mod pooled;
pub mod previous;
pub mod privilege;
pub mod procs;
pub mod scenario;
pub mod servers;
pub mod stats;

pub use cgroup::TestCgroup;
pub use kube_mock::KubeMock;
pub use netns::TestNet;
pub use pins::PinDir;
pub use privilege::require_privileged;
pub use procs::{Agent, Backends, ClientReport, Proto, ServeMode, SteadyClient};
pub use scenario::Scenario;
pub use servers::{
    consul_raw, consul_state, http_get, http_status, ConsulMock, Dns, DnsRecords, Etcd, KeepAlive,
    SrvRecord,
};
pub use stats::{agent_stats, wait_backends, wait_for};
