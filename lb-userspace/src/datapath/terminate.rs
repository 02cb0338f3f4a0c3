//! Terminating the sockets translated to a backend that left its service: a connected UDP
//! socket would otherwise keep sending to a deleted pod forever, and a pooled TCP connection
//! keep its dead or drained backend. Done the way the kernel offers since 6.5: a BPF socket
//! iterator (`iter/tcp`, `iter/udp`) that finds each socket's state in `LB_SOCKETS` and calls
//! the `bpf_sock_destroy()` kfunc on those whose peer is a doomed (backend id, generation); the
//! socket's owner sees ECONNABORTED on its next call and reconnects, through the VIP, to a live
//! backend.
//!
//! The two iterator programs are assembled here and loaded with raw `bpf(2)` calls: aya loads
//! iterator programs, but cannot relocate a kfunc call in an object, and these programs are
//! thirty instructions each. A kernel without the kfunc (before 6.5) refuses them at load; the
//! agent then reports termination as unavailable and balances as before.

use crate::config::Terminate;
use crate::datapath::sys::{
    bpf, map_create, map_delete, map_lookup, map_update, BPF_MAP_TYPE_HASH,
};
use anyhow::{bail, Context, Result};
use aya::maps::MapData;
use aya_obj::btf::{Btf, BtfKind};
use lb_common::{SocketPeer, SocketState, SOCKET_CONNECTED};
use std::collections::BTreeMap;
use std::mem::{offset_of, size_of};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::Path;

/// The protocols' bits in a doomed entry.
fn mask(t: Terminate) -> u32 {
    match t {
        Terminate::Udp => UDP,
        Terminate::All => UDP | TCP,
        Terminate::None => 0,
    }
}

const UDP: u32 = 1;
const TCP: u32 = 2;

/// At most this many backends are doomed in one pass (the map's size).
pub const MAX_DOOMED: u32 = 4_096;

/// A doomed backend: `LB_DOOMED` value, keyed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Doomed {
    generation: u32,
    /// `UDP` and/or `TCP`.
    protocols: u32,
    /// Sockets destroyed (added to by the programs).
    destroyed: u64,
}

/// The loaded iterator programs and their map of doomed backends.
pub struct Terminator {
    doomed: OwnedFd,
    links: Vec<OwnedFd>,
}

/// What a pass destroyed, per backend id.
pub type Destroyed = BTreeMap<u32, u64>;

impl Terminator {
    /// Loads both programs against the pinned `LB_SOCKETS`. Fails on kernels without the
    /// kfunc or the iterators, with the kernel's own reason.
    pub fn load(sockets: &MapData) -> Result<Self> {
        let btf = Btf::from_sys_fs().context("reading the kernel's BTF")?;
        let func = |name: &str| {
            btf.id_by_type_name_kind(name, BtfKind::Func)
                .with_context(|| format!("the kernel has no {name}"))
        };
        let destroy = func("bpf_sock_destroy")?;
        let doomed = map_create(
            BPF_MAP_TYPE_HASH,
            size_of::<u32>() as u32,
            size_of::<Doomed>() as u32,
            MAX_DOOMED,
        )
        .context("creating the doomed backends map")?;
        let sockets = sockets.fd().as_fd().as_raw_fd();
        let mut links = Vec::new();
        for (target, protocol) in [("bpf_iter_udp", UDP), ("bpf_iter_tcp", TCP)] {
            let attach = func(target)?;
            let insns = program(protocol, sockets, doomed.as_raw_fd(), destroy);
            let prog = prog_load(&insns, attach)
                .with_context(|| format!("loading the {target} socket terminator"))?;
            links.push(link_create(&prog).with_context(|| format!("attaching {target}"))?);
        }
        Ok(Self { doomed, links })
    }

    /// Destroys the sockets translated to `backends` (id → generation, policy) in the
    /// network namespace of the calling thread; returns what each lost.
    pub fn destroy(&self, backends: &BTreeMap<u32, (u32, Terminate)>) -> Result<Destroyed> {
        let doomed: Vec<(u32, Doomed)> = backends
            .iter()
            .filter(|(_, (_, t))| *t != Terminate::None)
            .take(MAX_DOOMED as usize)
            .map(|(id, (generation, t))| {
                let value = Doomed {
                    generation: *generation,
                    protocols: mask(*t),
                    destroyed: 0,
                };
                (*id, value)
            })
            .collect();
        if doomed.is_empty() {
            return Ok(Destroyed::new());
        }
        for (id, value) in &doomed {
            map_update(&self.doomed, id, value)?;
        }
        let result = self.links.iter().try_for_each(run_iterator);
        let mut destroyed = Destroyed::new();
        for (id, _) in &doomed {
            let mut value = Doomed::default();
            if map_lookup(&self.doomed, id, &mut value).is_ok() && value.destroyed > 0 {
                destroyed.insert(*id, value.destroyed);
            }
            let _ = map_delete(&self.doomed, id);
        }
        result.map(|()| destroyed)
    }
}

/// The network namespaces of the processes in `cgroup` and below (where translated sockets
/// live), other than the agent's own: inode → a pid in it.
fn namespaces(cgroup: &Path) -> BTreeMap<u64, u32> {
    let own = netns_inode("self");
    let mut found = BTreeMap::new();
    let mut dirs = vec![cgroup.to_path_buf()];
    // A cgroup tree is finite and shallow; the bound only guards against a runaway walk.
    let mut visited = 0;
    while let Some(dir) = dirs.pop() {
        visited += 1;
        if visited > 100_000 {
            break;
        }
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            if let Some(inode) = netns_inode(&pid.to_string()).filter(|i| Some(*i) != own) {
                found.entry(inode).or_insert(pid);
            }
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        dirs.extend(
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path()),
        );
    }
    found
}

fn netns_inode(pid: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|m| m.ino())
}

impl Terminator {
    /// `destroy` in the agent's network namespace and in every one the processes of `cgroup`
    /// (the balanced cgroup) live in: an iterator sees only the sockets of the namespace it
    /// was created in, and each pod has its own.
    pub fn destroy_everywhere(
        &self,
        cgroup: &Path,
        backends: &BTreeMap<u32, (u32, Terminate)>,
    ) -> Result<Destroyed> {
        let mut total = self.destroy(backends)?;
        for (inode, pid) in namespaces(cgroup) {
            let Ok(ns) = std::fs::File::open(format!("/proc/{pid}/ns/net")) else {
                continue; // the process is gone, and with it, maybe, the namespace
            };
            // setns changes the calling thread only: a scoped thread enters, iterates, ends.
            let destroyed = std::thread::scope(|s| {
                s.spawn(|| {
                    // SAFETY: a namespace descriptor we opened; affects this thread only.
                    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        let e = std::io::Error::last_os_error();
                        return Err(anyhow::anyhow!("entering network namespace {inode}: {e}"));
                    }
                    self.destroy(backends)
                })
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("socket terminator thread panicked")))
            })?;
            for (id, n) in destroyed {
                *total.entry(id).or_default() += n;
            }
        }
        Ok(total)
    }
}

/// Reads the iterator to its end: the program runs once per socket of this network namespace.
fn run_iterator(link: &OwnedFd) -> Result<()> {
    let mut attr = IterCreate {
        link_fd: link.as_raw_fd() as u32,
        flags: 0,
    };
    let fd = bpf(BPF_ITER_CREATE, &mut attr).context("creating a socket iterator")?;
    let mut buf = [0u8; 64];
    loop {
        // SAFETY: reading into a buffer we own from a descriptor we own.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        match n {
            0 => return Ok(()),
            n if n > 0 => continue,
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e).context("running a socket iterator");
                }
            }
        }
    }
}

// ---- the programs -------------------------------------------------------------------------

/// One eBPF instruction.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Insn {
    code: u8,
    /// dst in the low nibble, src in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

const LDX_DW: u8 = 0x79;
const LDX_W: u8 = 0x61;
const LDX_B: u8 = 0x71;
const STX_W: u8 = 0x63;
const MOV_X: u8 = 0xbf;
const MOV_K: u8 = 0xb7;
const ADD_K: u8 = 0x07;
const AND_K: u8 = 0x57;
const JEQ_K: u8 = 0x15;
const JNE_X: u8 = 0x5d;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
const LD_IMM64: u8 = 0x18;
const ATOMIC_ADD_DW: u8 = 0xdb;
const PSEUDO_MAP_FD: u8 = 1;
const PSEUDO_KFUNC_CALL: u8 = 2;
const HELPER_MAP_LOOKUP: i32 = 1;
const HELPER_SK_STORAGE_GET: i32 = 107;
const HELPER_SKC_TO_TCP_SOCK: i32 = 137;
/// Both iterator contexts hold the socket at this offset, after the `meta` pointer.
const CTX_SOCKET: i16 = 8;

/// Jumps are filled in once the exit's index is known.
struct Asm {
    insns: Vec<Insn>,
    to_exit: Vec<usize>,
}

impl Asm {
    fn push(&mut self, i: Insn) {
        self.insns.push(i);
    }
    fn ld_map(&mut self, dst: u8, fd: RawFd) {
        self.push(insn(LD_IMM64, dst, PSEUDO_MAP_FD, 0, fd));
        self.push(insn(0, 0, 0, 0, 0));
    }
    /// `if reg == 0 goto exit`.
    fn exit_if_zero(&mut self, reg: u8) {
        self.to_exit.push(self.insns.len());
        self.push(insn(JEQ_K, reg, 0, 0, 0));
    }
    fn exit_if_ne(&mut self, a: u8, b: u8) {
        self.to_exit.push(self.insns.len());
        self.push(insn(JNE_X, a, b, 0, 0));
    }
    fn finish(mut self) -> Vec<Insn> {
        let exit = self.insns.len();
        for at in self.to_exit {
            self.insns[at].off = (exit - at - 1) as i16;
        }
        self.insns.push(insn(MOV_K, 0, 0, 0, 0));
        self.insns.push(insn(EXIT, 0, 0, 0, 0));
        self.insns
    }
}

/// The iterator program for `protocol`:
///
/// ```text
/// sk = ctx->socket; if !sk: done
/// full = (tcp ? bpf_skc_to_tcp_sock(sk) : sk); if !full: done        (TCP: a time-wait or request socket)
/// state = bpf_sk_storage_get(LB_SOCKETS, full, 0, 0); if !state: done  (never translated)
/// if !(state.flags & CONNECTED): done                                 (unconnected UDP re-chooses itself)
/// d = LB_DOOMED[state.peers[0].backend_id]; if !d: done
/// if d.generation != state.peers[0].generation: done                 (the id's earlier or later owner)
/// if !(d.protocols & protocol): done
/// bpf_sock_destroy(sk); d.destroyed += 1 (atomic)
/// ```
fn program(protocol: u32, sockets: RawFd, doomed: RawFd, destroy_btf_id: u32) -> Vec<Insn> {
    let peer = offset_of!(SocketState, peers) as i16;
    let backend_id = peer + offset_of!(SocketPeer, backend_id) as i16;
    let generation = peer + offset_of!(SocketPeer, generation) as i16;
    let flags = offset_of!(SocketState, flags) as i16;
    let mut a = Asm {
        insns: Vec::new(),
        to_exit: Vec::new(),
    };
    a.push(insn(LDX_DW, 6, 1, CTX_SOCKET, 0));
    a.exit_if_zero(6);
    if protocol == TCP {
        a.push(insn(MOV_X, 1, 6, 0, 0));
        a.push(insn(CALL, 0, 0, 0, HELPER_SKC_TO_TCP_SOCK));
        a.exit_if_zero(0);
        a.push(insn(MOV_X, 2, 0, 0, 0));
    } else {
        a.push(insn(MOV_X, 2, 6, 0, 0));
    }
    a.ld_map(1, sockets);
    a.push(insn(MOV_K, 3, 0, 0, 0));
    a.push(insn(MOV_K, 4, 0, 0, 0));
    a.push(insn(CALL, 0, 0, 0, HELPER_SK_STORAGE_GET));
    a.exit_if_zero(0);
    a.push(insn(MOV_X, 7, 0, 0, 0));
    a.push(insn(LDX_B, 1, 7, flags, 0));
    a.push(insn(AND_K, 1, 0, 0, i32::from(SOCKET_CONNECTED)));
    a.exit_if_zero(1);
    a.push(insn(LDX_W, 1, 7, backend_id, 0));
    a.push(insn(STX_W, 10, 1, -4, 0));
    a.ld_map(1, doomed);
    a.push(insn(MOV_X, 2, 10, 0, 0));
    a.push(insn(ADD_K, 2, 0, 0, -4));
    a.push(insn(CALL, 0, 0, 0, HELPER_MAP_LOOKUP));
    a.exit_if_zero(0);
    a.push(insn(MOV_X, 8, 0, 0, 0));
    a.push(insn(LDX_W, 1, 8, offset_of!(Doomed, generation) as i16, 0));
    a.push(insn(LDX_W, 2, 7, generation, 0));
    a.exit_if_ne(1, 2);
    a.push(insn(LDX_W, 1, 8, offset_of!(Doomed, protocols) as i16, 0));
    a.push(insn(AND_K, 1, 0, 0, protocol as i32));
    a.exit_if_zero(1);
    a.push(insn(MOV_X, 1, 6, 0, 0));
    a.push(insn(CALL, 0, PSEUDO_KFUNC_CALL, 0, destroy_btf_id as i32));
    a.push(insn(MOV_K, 1, 0, 0, 1));
    let destroyed = offset_of!(Doomed, destroyed) as i16;
    a.push(insn(ATOMIC_ADD_DW, 8, 1, destroyed, 0));
    a.finish()
}

// ---- loading and running them ----------------------------------------------------------------

const BPF_PROG_LOAD: u32 = 5;
const BPF_ITER_CREATE: u32 = 33;
const BPF_LINK_CREATE: u32 = 28;
const BPF_PROG_TYPE_TRACING: u32 = 26;
const BPF_TRACE_ITER: u32 = 28;

#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    prog_btf_fd: u32,
    func_info_rec_size: u32,
    func_info: u64,
    func_info_cnt: u32,
    line_info_rec_size: u32,
    line_info: u64,
    line_info_cnt: u32,
    attach_btf_id: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkCreate {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    iter_info: u64,
    iter_info_len: u32,
    _pad: u32,
}

#[repr(C)]
struct IterCreate {
    link_fd: u32,
    flags: u32,
}

fn prog_load(insns: &[Insn], attach_btf_id: u32) -> Result<OwnedFd> {
    let license = c"GPL";
    let mut log = vec![0u8; 1 << 16];
    let mut name = [0u8; 16];
    name[..13].copy_from_slice(b"lb_terminator");
    let mut attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_TRACING,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        prog_name: name,
        expected_attach_type: BPF_TRACE_ITER,
        attach_btf_id,
        ..ProgLoad::default()
    };
    match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => Ok(fd),
        Err(e) => {
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            let last: Vec<&str> = text.lines().rev().take(6).collect();
            bail!(
                "{e}; verifier: {}",
                last.into_iter().rev().collect::<Vec<_>>().join(" | ")
            )
        }
    }
}

fn link_create(prog: &OwnedFd) -> Result<OwnedFd> {
    let mut attr = LinkCreate {
        prog_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_TRACE_ITER,
        ..LinkCreate::default()
    };
    Ok(bpf(BPF_LINK_CREATE, &mut attr)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_jump_lands_on_the_exit() {
        for protocol in [UDP, TCP] {
            let p = program(protocol, 3, 4, 99);
            let exit = p.len() - 2;
            assert_eq!(p[exit], insn(MOV_K, 0, 0, 0, 0));
            assert_eq!(p[exit + 1].code, EXIT);
            for (at, i) in p.iter().enumerate() {
                if matches!(i.code, JEQ_K | JNE_X) {
                    assert_eq!(
                        at as i64 + 1 + i64::from(i.off),
                        exit as i64,
                        "jump at {at}"
                    );
                }
            }
            let kfunc = p
                .iter()
                .find(|i| i.code == CALL && i.regs >> 4 == PSEUDO_KFUNC_CALL);
            assert_eq!(kfunc.map(|i| i.imm), Some(99));
        }
    }
}
