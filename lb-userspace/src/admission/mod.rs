//! Which backends may receive traffic: active health checks (`health`), passive outlier
//! ejection from kernel-observed connect outcomes (`outlier`), and failing open when too few
//! are left (`fail_open`).

pub mod health;
pub mod outlier;
pub mod fail_open;
