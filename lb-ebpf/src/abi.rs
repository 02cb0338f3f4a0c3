//! Kernel constants the programs compare context fields against (uapi values that aya's
//! bindings do not export), in one place.

/// TCP states (`include/net/tcp_states.h`), as the sock_ops state callback's arguments hold
/// them.
pub const TCP_SYN_SENT: u32 = 2;
pub const TCP_CLOSE: u32 = 7;
