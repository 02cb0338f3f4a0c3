//! The kernel hands sock_addr programs addresses and ports in network byte order: `user_ip4` is
//! the four octets as they sit in memory, `user_ip6` the sixteen octets as four words, and
//! `user_port` holds the big-endian port in its low 16 bits. These helpers are the one place
//! that conversion is written.
//!
//! Every map stores addresses as 16 bytes; an IPv4 address is stored in its v4-mapped form
//! (`::ffff:a.b.c.d`). That is exactly what an IPv6 socket passes to connect6 when it connects
//! to an IPv4 address, so a dual-stack client finds an IPv4 service with no extra lookup.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An address as `bpf_sock_addr.user_ip6` holds it (IPv4 in v4-mapped form).
pub type RawAddr = [u32; 4];

/// Third word of a v4-mapped address: the octets 0, 0, 0xff, 0xff.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// IPv4 octets as `bpf_sock_addr.user_ip4` holds them.
#[inline(always)]
pub const fn ipv4_to_raw(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

#[inline(always)]
pub const fn ipv4_from_raw(raw: u32) -> [u8; 4] {
    raw.to_ne_bytes()
}

/// `user_ip4` in the stored 16-byte form.
#[inline(always)]
pub const fn v4_mapped(raw_ip4: u32) -> RawAddr {
    [0, 0, V4_MAPPED_WORD, raw_ip4]
}

/// The `user_ip4` of a v4-mapped address, `None` for a real IPv6 address.
#[inline(always)]
pub const fn as_v4(addr: &RawAddr) -> Option<u32> {
    if addr[0] == 0 && addr[1] == 0 && addr[2] == V4_MAPPED_WORD {
        Some(addr[3])
    } else {
        None
    }
}

pub fn ip_to_raw(ip: IpAddr) -> RawAddr {
    match ip {
        IpAddr::V4(v4) => v4_mapped(ipv4_to_raw(v4.octets())),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            [word(0), word(4), word(8), word(12)]
        }
    }
}

/// The inverse of `ip_to_raw`: a v4-mapped address comes back as IPv4.
pub fn ip_from_raw(raw: &RawAddr) -> IpAddr {
    if let Some(v4) = as_v4(raw) {
        return IpAddr::V4(Ipv4Addr::from(ipv4_from_raw(v4)));
    }
    let mut o = [0u8; 16];
    for (i, w) in raw.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    IpAddr::V6(Ipv6Addr::from(o))
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

    #[test]
    fn ipv4_is_stored_v4_mapped_and_comes_back_as_ipv4() {
        let v4: IpAddr = "10.96.0.1".parse().unwrap();
        let raw = ip_to_raw(v4);
        let mapped: Ipv6Addr = "::ffff:10.96.0.1".parse().unwrap();
        assert_eq!(raw, ip_to_raw(IpAddr::V6(mapped)));
        assert_eq!(as_v4(&raw), Some(ipv4_to_raw([10, 96, 0, 1])));
        assert_eq!(ip_from_raw(&raw), v4);
    }

    #[test]
    fn ipv6_round_trips_in_network_order() {
        let v6: IpAddr = "fd00::1:2".parse().unwrap();
        let raw = ip_to_raw(v6);
        assert_eq!(raw[0].to_ne_bytes(), [0xfd, 0, 0, 0]);
        assert_eq!(raw[3].to_ne_bytes(), [0, 1, 0, 2]);
        assert_eq!(as_v4(&raw), None);
        assert_eq!(ip_from_raw(&raw), v6);
    }
}
