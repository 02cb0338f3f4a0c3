//! The kernel hands sock_addr programs the address and port in network byte order
//! (`user_ip4` is the four octets as they sit in memory, `user_port` holds the big-endian port
//! in its low 16 bits). These helpers are the one place that conversion is written.

/// IPv4 octets as `bpf_sock_addr.user_ip4` holds them.
#[inline(always)]
pub const fn ipv4_to_raw(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

#[inline(always)]
pub const fn ipv4_from_raw(raw: u32) -> [u8; 4] {
    raw.to_ne_bytes()
}

/// Host port as the low 16 bits of `bpf_sock_addr.user_port`.
#[inline(always)]
pub const fn port_to_raw(port: u16) -> u16 {
    port.to_be()
}

#[inline(always)]
pub const fn port_from_raw(raw: u16) -> u16 {
    u16::from_be(raw)
}

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_ipv4_keeps_octet_order_in_memory() {
        let raw = ipv4_to_raw([10, 96, 0, 1]);
        assert_eq!(raw.to_ne_bytes(), [10, 96, 0, 1]);
        assert_eq!(ipv4_from_raw(raw), [10, 96, 0, 1]);
    }

    #[test]
    fn raw_port_is_big_endian() {
        assert_eq!(port_to_raw(0x1f90).to_ne_bytes(), [0x1f, 0x90]);
        assert_eq!(port_from_raw(port_to_raw(8080)), 8080);
    }
}
