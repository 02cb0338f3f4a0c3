//! The operations a reconcile plans and `apply` performs, one map update each (a slot table is
//! written or deleted as one operation of many updates).

use crate::config::Name;
use lb_common::{ServiceKey, ServiceValue};
use std::net::SocketAddr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Zero a reused id's counters before anything references it.
    ResetServiceCounters(u32),
    /// A backend new to its id: the id's next generation (`Maps::new_backend_generation`,
    /// counters zeroed), then its entry naming that generation, so sockets of the id's earlier
    /// owner count for nobody. One operation, as a plan of a million backends holds one each.
    PutBackend {
        id: u32,
        addr: SocketAddr,
        service_id: u32,
    },
    /// A table written into a range of the slot array that no service uses.
    PutSlots {
        base: u32,
        backends: Vec<u32>,
    },
    PutName {
        service_id: u32,
        name: Name,
    },
    PutService {
        key: ServiceKey,
        value: ServiceValue,
    },
    DeleteService(ServiceKey),
    DeleteName(u32),
    DeleteBackend(u32),
}
