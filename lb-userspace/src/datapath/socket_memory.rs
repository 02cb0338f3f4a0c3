//! What one balanced socket's state (`LB_SOCKETS`) costs in kernel memory. A socket's first
//! storage gets a header (`struct bpf_local_storage`) and each map's value an element
//! (`struct bpf_local_storage_elem` up to its data, then the value). Each comes from the
//! kmalloc size class above its size, and the kernel charges both to the memory cgroup of the
//! agent that created the map, whichever process opened the socket. The map's own memory
//! figure leaves them out, so a container's memory limit would not show them coming. The
//! structs' sizes come from the kernel's BTF: they differ between kernel versions.

use super::btf_offsets::KernelTypes;
use anyhow::Result;
use lb_common::SocketState;
use std::sync::OnceLock;

/// Bytes of kernel memory one balanced socket's state takes on this kernel, if its type
/// information is readable. Read once per process: the answer cannot change while it runs.
pub fn per_socket() -> Option<u64> {
    static BYTES: OnceLock<Option<u64>> = OnceLock::new();
    *BYTES.get_or_init(|| {
        let types = KernelTypes::from_sys_fs().ok()?;
        from_types(&types).ok()
    })
}

fn from_types(types: &KernelTypes) -> Result<u64> {
    let header = types.size_of("bpf_local_storage")?;
    let data = types.offset_of("bpf_local_storage_elem", &["sdata", "data"])?;
    Ok(bytes(
        u64::from(header),
        u64::from(data),
        size_of::<SocketState>() as u64,
    ))
}

/// The header and the element with `value` bytes of data starting at `data`, each rounded up
/// to its kmalloc size class.
fn bytes(header: u64, data: u64, value: u64) -> u64 {
    kmalloc_class(header) + kmalloc_class(data + value)
}

/// The size kmalloc really hands out for `n` bytes: the power-of-two classes, plus 96 and 192
/// (x86-64's smallest class is 8 bytes). Beyond 8 KiB it takes whole pages, a power of two of
/// them.
fn kmalloc_class(n: u64) -> u64 {
    match n {
        0..=8 => 8,
        65..=96 => 96,
        129..=192 => 192,
        _ if n <= 8192 => n.next_power_of_two(),
        _ => n.div_ceil(4096).next_power_of_two() * 4096,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_to_the_kmalloc_classes() {
        let cases = [
            (1, 8),
            (8, 8),
            (9, 16),
            (64, 64),
            (65, 96),
            (96, 96),
            (97, 128),
            (129, 192),
            (193, 256),
            (284, 512),
            (8192, 8192),
            (8193, 16384),
        ];
        for (n, class) in cases {
            assert_eq!(kmalloc_class(n), class, "{n} bytes");
        }
    }

    #[test]
    fn a_socket_takes_a_header_and_an_element() {
        // Kernel 6.18: a 176-byte header and the element's data at byte 72. With the 212-byte
        // state that is the 192-byte and 512-byte classes, as the slab counters showed for
        // 4,000 open connections.
        assert_eq!(bytes(176, 72, 212), 704);
        // One peer (56 bytes) would fit the element in the 128-byte class.
        assert_eq!(bytes(176, 72, 56), 320);
    }

    #[test]
    fn reads_this_kernels_structs() {
        let Ok(types) = KernelTypes::from_sys_fs() else {
            eprintln!("skipped: this kernel has no /sys/kernel/btf/vmlinux");
            return;
        };
        let per_socket = from_types(&types).unwrap();
        let state = size_of::<SocketState>() as u64;
        assert!(
            per_socket > state + 64 && per_socket.is_multiple_of(8),
            "{per_socket} bytes a socket for a {state}-byte state"
        );
        assert_eq!(super::per_socket(), Some(per_socket));
    }
}
