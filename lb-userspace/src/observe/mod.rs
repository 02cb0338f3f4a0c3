//! Reading the maps and the status file back for people: one `report` that every view shares,
//! the `stats` `table`, `/metrics` (`prometheus`), the live `top` view, and the HTTP listener
//! for `/healthz`, `/readyz` and `/metrics`.

pub mod report;
pub mod table;
pub mod prometheus;
pub mod top;
pub mod http;
