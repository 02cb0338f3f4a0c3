//! Active health checks: which configured backends may receive connections.

pub mod probe;
pub mod runner;
pub mod state;
