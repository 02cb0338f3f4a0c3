//! Reading and writing the address a sock_addr program sees. The kernel accepts only 4-byte
//! accesses to `user_ip6` and `user_port`, so each word is read and written on its own with
//! volatile accesses the compiler cannot merge into 8-byte ones.

use aya_ebpf::bindings::bpf_sock_addr;
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use lb_common::{as_v4, v4_mapped, RawAddr};

/// The address in the 16-byte map form. `V6` is the program's family, fixed at compile time:
/// an IPv4 program may not touch `user_ip6`.
#[inline(always)]
pub fn addr<const V6: bool>(sa: &bpf_sock_addr) -> RawAddr {
    // SAFETY: fields of the context the kernel passed, read one word at a time.
    unsafe {
        if V6 {
            let p = addr_of!(sa.user_ip6) as *const u32;
            [
                read_volatile(p),
                read_volatile(p.add(1)),
                read_volatile(p.add(2)),
                read_volatile(p.add(3)),
            ]
        } else {
            v4_mapped(read_volatile(addr_of!(sa.user_ip4)))
        }
    }
}

/// Port in network byte order.
#[inline(always)]
pub fn port(sa: &bpf_sock_addr) -> u16 {
    // SAFETY: as above.
    unsafe { read_volatile(addr_of!(sa.user_port)) as u16 }
}

/// Writes `addr`:`port`. False (and nothing written) when an IPv4 program is handed an IPv6
/// address, which a service's own family check should have made impossible.
#[inline(always)]
pub fn set<const V6: bool>(sa: &mut bpf_sock_addr, addr: &RawAddr, port: u16) -> bool {
    // SAFETY: fields of the context the kernel passed, written one word at a time.
    unsafe {
        if V6 {
            let p = addr_of_mut!(sa.user_ip6) as *mut u32;
            write_volatile(p, addr[0]);
            write_volatile(p.add(1), addr[1]);
            write_volatile(p.add(2), addr[2]);
            write_volatile(p.add(3), addr[3]);
        } else {
            let Some(v4) = as_v4(addr) else {
                return false;
            };
            write_volatile(addr_of_mut!(sa.user_ip4), v4);
        }
        write_volatile(addr_of_mut!(sa.user_port), u32::from(port));
    }
    true
}
