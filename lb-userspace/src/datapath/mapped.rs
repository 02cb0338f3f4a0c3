//! A BPF array created with `BPF_F_MMAPABLE`, mapped into the agent's memory: elements are
//! read and written in place, without a syscall each, so a million counters or slots are read
//! or written in milliseconds. The programs see every store at once (the same pages).

use anyhow::{bail, Context, Result};
use aya::maps::MapData;
use aya::Pod;
use std::marker::PhantomData;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::ptr::NonNull;

pub struct MappedArray<T> {
    base: NonNull<T>,
    len: u32,
    bytes: usize,
    _values: PhantomData<T>,
}

// SAFETY: the mapping is plain shared memory; every access is a volatile read or write of a
// whole element, which the kernel side tolerates as it tolerates concurrent CPUs.
unsafe impl<T: Send> Send for MappedArray<T> {}
unsafe impl<T: Sync> Sync for MappedArray<T> {}

impl<T: Pod> MappedArray<T> {
    /// Maps the pinned array at `path`, of `entries` elements of `value_size` bytes (its kind,
    /// sizes and flags checked by the caller), as an array of `T`: an element holds
    /// `value_size / size_of::<T>()` of them.
    pub fn open(path: &Path, entries: u32, value_size: usize) -> Result<Self> {
        // The kernel lays elements out 8-byte aligned; ours are multiples of 8 so that they
        // lie back to back, and multiples of `T`.
        if !value_size.is_multiple_of(8) || !value_size.is_multiple_of(size_of::<T>()) {
            bail!(
                "{}: element size {value_size} is not a multiple of 8 and of {}",
                path.display(),
                size_of::<T>()
            );
        }
        let data = MapData::from_pin(path)
            .with_context(|| format!("cannot open pinned map {}", path.display()))?;
        let bytes = (value_size * entries as usize).max(1);
        let len = u32::try_from(bytes / size_of::<T>()).context("array too large")?;
        // SAFETY: a fresh shared mapping of the map's fd; the kernel checks the length and the
        // map's mmap flag, and the mapping outlives the fd (closed when `data` drops).
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            bail!(
                "cannot map {} into memory: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(Self {
            base: NonNull::new(addr.cast()).context("mmap returned null")?,
            len,
            bytes,
            _values: PhantomData,
        })
    }

    /// Elements of `T` (never 0: the kernel has no empty arrays).
    pub fn count(&self) -> u32 {
        self.len
    }

    pub fn get(&self, index: u32) -> Option<T> {
        // SAFETY: in bounds of the mapping; a racing writer makes the value approximate,
        // never invalid (every bit pattern is a valid Pod).
        (index < self.len)
            .then(|| unsafe { self.base.as_ptr().add(index as usize).read_volatile() })
    }

    pub fn set(&self, index: u32, value: T) -> Result<()> {
        if index >= self.len {
            bail!("index {index} beyond the map's {} entries", self.len);
        }
        // SAFETY: in bounds of a writable shared mapping.
        unsafe { self.base.as_ptr().add(index as usize).write_volatile(value) };
        Ok(())
    }
}

impl<T> Drop for MappedArray<T> {
    fn drop(&mut self) {
        // SAFETY: exactly the region mmap returned; nothing refers to it after this.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}
