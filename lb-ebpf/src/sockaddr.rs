//! Reading and writing the addresses the programs see in their contexts: the destination a
//! sock_addr program may rewrite, and its socket. The kernel accepts
//! only 4-byte accesses to the address and port fields, so each word is read and written on
//! its own with volatile accesses the compiler cannot merge into 8-byte ones.

use aya_ebpf::bindings::bpf_sock_addr;
use core::ffi::c_void;
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use lb_common::{as_v4, v4_mapped, RawAddr};

/// An IPv6 address field of a context, one word at a time.
///
/// # Safety
/// `p` points at the first of four readable words of a context the kernel passed.
#[inline(always)]
pub unsafe fn words(p: *const u32) -> RawAddr {
    [
        read_volatile(p),
        read_volatile(p.add(1)),
        read_volatile(p.add(2)),
        read_volatile(p.add(3)),
    ]
}

/// The address in the 16-byte map form. `V6` is the program's family, fixed at compile time:
/// an IPv4 program may not touch `user_ip6`.
#[inline(always)]
pub fn addr<const V6: bool>(sa: &bpf_sock_addr) -> RawAddr {
    // SAFETY: fields of the context the kernel passed, read one word at a time.
    unsafe {
        if V6 {
            words(addr_of!(sa.user_ip6) as *const u32)
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

/// The socket of a sock_addr context, for its storage. Never null in these programs.
#[inline(always)]
pub fn socket(sa: &bpf_sock_addr) -> *mut c_void {
    // SAFETY: the context's socket field, read as one 8-byte word as the verifier requires.
    unsafe { read_volatile(addr_of!(sa.__bindgen_anon_1.sk)).cast() }
}
