//! Kernel constants the programs compare context fields against (uapi values that aya's
//! bindings do not export), in one place.

/// `AF_INET6`, as `bpf_sock.family` and `bpf_sock_ops.family` hold it.
pub const AF_INET6: u32 = 10;
/// TCP states (`include/net/tcp_states.h`), as `bpf_sock.state` and the sock_ops state
/// callback's arguments hold them.
pub const TCP_SYN_SENT: u32 = 2;
pub const TCP_CLOSE: u32 = 7;
