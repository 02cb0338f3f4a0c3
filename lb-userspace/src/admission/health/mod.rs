//! Active health checks: which configured backends may receive connections.

pub mod state;
pub mod probe;
pub mod runner;
