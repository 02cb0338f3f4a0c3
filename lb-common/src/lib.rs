//! Map keys, values and names shared by the eBPF programs (`lb-ebpf`) and the agent
//! (`lb-userspace`). Both sides compile this one definition, so a layout change cannot drift
//! between kernel and user space. Every type is `#[repr(C)]` with explicit padding fields and a
//! compile-time size check: the padding must be written as zero by the agent because hash-map
//! keys are compared byte for byte.
#![no_std]

pub mod addr;
pub mod hash;
pub mod layout;
pub mod limits;
pub mod names;

pub use addr::*;
pub use hash::*;
pub use layout::*;
pub use limits::*;
