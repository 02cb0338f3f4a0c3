//! `bpf(2)` commands aya 0.14 does not offer: batch updates and deletions (one syscall for
//! thousands of hash map entries instead of one each), and the plain map commands the socket
//! terminator needs for a map of its own. Each attr struct is the prefix of the kernel's
//! `union bpf_attr` its command reads; the kernel treats bytes past the size given as zero.

use anyhow::{Context, Result};
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

const BPF_MAP_CREATE: u32 = 0;
const BPF_MAP_LOOKUP_ELEM: u32 = 1;
const BPF_MAP_UPDATE_ELEM: u32 = 2;
const BPF_MAP_DELETE_ELEM: u32 = 3;
const BPF_MAP_UPDATE_BATCH: u32 = 26;
const BPF_MAP_DELETE_BATCH: u32 = 27;
pub const BPF_MAP_TYPE_HASH: u32 = 1;
pub const BPF_MAP_TYPE_ARRAY: u32 = 2;

#[repr(C)]
#[derive(Default)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct MapElem {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default)]
struct Batch {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    /// In: the entries given; out: the entries done.
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn sys_bpf<T>(cmd: u32, attr: &mut T) -> Result<i64, std::io::Error> {
    // SAFETY: `attr` is a live, properly laid out `union bpf_attr` prefix of the size given.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            size_of::<T>(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

/// A command that returns a new descriptor.
pub fn bpf<T>(cmd: u32, attr: &mut T) -> Result<OwnedFd, std::io::Error> {
    let fd = sys_bpf(cmd, attr)?;
    // SAFETY: these commands return a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn bpf_no_fd<T>(cmd: u32, attr: &mut T) -> Result<(), std::io::Error> {
    sys_bpf(cmd, attr).map(drop)
}

pub fn map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> Result<OwnedFd> {
    let mut attr = MapCreate {
        map_type,
        key_size,
        value_size,
        max_entries,
        map_flags: 0,
    };
    Ok(bpf(BPF_MAP_CREATE, &mut attr)?)
}

fn elem<K, V>(map: &OwnedFd, key: &K, value: *const V) -> MapElem {
    MapElem {
        map_fd: map.as_raw_fd() as u32,
        key: key as *const K as u64,
        value: value as u64,
        ..MapElem::default()
    }
}

pub fn map_update<K, V>(map: &OwnedFd, key: &K, value: &V) -> Result<()> {
    Ok(bpf_no_fd(BPF_MAP_UPDATE_ELEM, &mut elem(map, key, value))?)
}

pub fn map_lookup<K, V>(map: &OwnedFd, key: &K, value: &mut V) -> Result<()> {
    Ok(bpf_no_fd(
        BPF_MAP_LOOKUP_ELEM,
        &mut elem(map, key, value as *mut V),
    )?)
}

pub fn map_delete<K>(map: &OwnedFd, key: &K) -> Result<()> {
    Ok(bpf_no_fd(
        BPF_MAP_DELETE_ELEM,
        &mut elem::<K, u8>(map, key, std::ptr::null()),
    )?)
}

/// Entries per batch call: bounded, so a failure names a small range and the kernel's
/// temporary copy stays small.
const BATCH: usize = 4_096;

/// Writes `entries` in batches; in order, so a failure leaves a prefix written.
pub fn update_batch<K: Copy, V: Copy>(map: BorrowedFd, entries: &[(K, V)]) -> Result<()> {
    for chunk in entries.chunks(BATCH) {
        let keys: Vec<K> = chunk.iter().map(|e| e.0).collect();
        let values: Vec<V> = chunk.iter().map(|e| e.1).collect();
        let mut attr = Batch {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Batch::default()
        };
        bpf_no_fd(BPF_MAP_UPDATE_BATCH, &mut attr).with_context(|| {
            format!(
                "batch update of {} entries ({} done)",
                chunk.len(),
                attr.count
            )
        })?;
    }
    Ok(())
}

/// Deletes `keys` in batches; absent keys are skipped (a deletion is retried after an
/// interruption, so some may be gone already).
pub fn delete_batch<K: Copy>(map: BorrowedFd, keys: &[K]) -> Result<()> {
    for chunk in keys.chunks(BATCH) {
        let mut attr = Batch {
            keys: chunk.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Batch::default()
        };
        match bpf_no_fd(BPF_MAP_DELETE_BATCH, &mut attr) {
            Ok(()) => {}
            // The batch stops at the first absent key: the rest go one by one.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                for key in &chunk[attr.count as usize..] {
                    let mut one = Batch {
                        keys: key as *const K as u64,
                        count: 1,
                        map_fd: map.as_raw_fd() as u32,
                        ..Batch::default()
                    };
                    match bpf_no_fd(BPF_MAP_DELETE_BATCH, &mut one) {
                        Err(e) if e.raw_os_error() != Some(libc::ENOENT) => {
                            return Err(e).context("batch delete");
                        }
                        _ => {}
                    }
                }
            }
            Err(e) => return Err(e).context("batch delete"),
        }
    }
    Ok(())
}
