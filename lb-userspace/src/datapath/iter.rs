//! BPF socket iterators (`iter/tcp`, `iter/udp`), the kernel's way since 6.5 to visit every
//! socket of a network namespace and call `bpf_sock_destroy()` on some: the programs are
//! assembled here (`Asm`), loaded and attached with raw `bpf(2)` calls, and run once per
//! network namespace that holds balanced processes. aya loads iterator programs, but cannot
//! relocate a kfunc call in an object, and these programs are a few dozen instructions each.

use crate::datapath::sys::bpf;
use anyhow::{bail, Context, Result};
use aya_obj::btf::{Btf, BtfKind};
use lb_common::{SocketState, SOCKET_CONNECTED};
use std::collections::BTreeMap;
use std::mem::offset_of;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;

/// One eBPF instruction.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    /// dst in the low nibble, src in the high one.
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

pub fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

pub const LDX_DW: u8 = 0x79;
pub const LDX_W: u8 = 0x61;
pub const LDX_B: u8 = 0x71;
pub const STX_DW: u8 = 0x7b;
pub const STX_W: u8 = 0x63;
pub const ST_DW: u8 = 0x7a;
pub const ST_W: u8 = 0x62;
pub const MOV_X: u8 = 0xbf;
pub const MOV_K: u8 = 0xb7;
pub const MOV32_X: u8 = 0xbc;
pub const SUB32_X: u8 = 0x1c;
pub const ADD_K: u8 = 0x07;
pub const AND_K: u8 = 0x57;
pub const JA: u8 = 0x05;
pub const JEQ_K: u8 = 0x15;
pub const JNE_K: u8 = 0x55;
pub const JNE_X: u8 = 0x5d;
/// 64-bit signed `<=` against an immediate.
pub const JSLE_K: u8 = 0xd5;
pub const JLT_X: u8 = 0xad;
pub const JEQ_X: u8 = 0x1d;
/// 32-bit signed `<` against an immediate (BPF_JMP32 | BPF_JSLT | BPF_K).
pub const JSLT32_K: u8 = 0xc6;
pub const CALL: u8 = 0x85;
pub const EXIT: u8 = 0x95;
pub const LD_IMM64: u8 = 0x18;
pub const ATOMIC_ADD_DW: u8 = 0xdb;
/// `imm` of [`ATOMIC_ADD_DW`] that also returns the old value in the source register.
pub const ATOMIC_FETCH: i32 = 1;
pub const PSEUDO_MAP_FD: u8 = 1;
pub const PSEUDO_KFUNC_CALL: u8 = 2;
pub const HELPER_MAP_LOOKUP: i32 = 1;
pub const HELPER_KTIME_GET_NS: i32 = 5;
pub const HELPER_GET_SOCKET_COOKIE: i32 = 46;
pub const HELPER_SK_STORAGE_GET: i32 = 107;
pub const HELPER_JIFFIES64: i32 = 118;
pub const HELPER_SEQ_WRITE: i32 = 127;
pub const HELPER_SKC_TO_TCP_SOCK: i32 = 137;
/// Both iterator contexts hold the `bpf_iter_meta` pointer first and the socket after it.
pub const CTX_META: i16 = 0;
pub const CTX_SOCKET: i16 = 8;

/// A program being assembled. Jumps to the exit are filled in once its index is known.
#[derive(Default)]
pub struct Asm {
    pub insns: Vec<Insn>,
    to_exit: Vec<usize>,
}

impl Asm {
    pub fn push(&mut self, i: Insn) {
        self.insns.push(i);
    }
    pub fn ld_map(&mut self, dst: u8, fd: RawFd) {
        self.push(insn(LD_IMM64, dst, PSEUDO_MAP_FD, 0, fd));
        self.push(insn(0, 0, 0, 0, 0));
    }
    /// `if reg == 0 goto exit`.
    pub fn exit_if_zero(&mut self, reg: u8) {
        self.to_exit.push(self.insns.len());
        self.push(insn(JEQ_K, reg, 0, 0, 0));
    }
    /// `if reg != 0 goto exit`.
    pub fn exit_if_nonzero(&mut self, reg: u8) {
        self.to_exit.push(self.insns.len());
        self.push(insn(JNE_K, reg, 0, 0, 0));
    }
    /// `if (s64) reg <= 0 goto exit`.
    pub fn exit_if_not_positive(&mut self, reg: u8) {
        self.to_exit.push(self.insns.len());
        self.push(insn(JSLE_K, reg, 0, 0, 0));
    }
    pub fn exit_if_ne(&mut self, a: u8, b: u8) {
        self.to_exit.push(self.insns.len());
        self.push(insn(JNE_X, a, b, 0, 0));
    }
    /// `goto exit`.
    pub fn goto_exit(&mut self) {
        self.to_exit.push(self.insns.len());
        self.push(insn(JA, 0, 0, 0, 0));
    }
    /// A forward jump whose target is set later with [`Asm::land`].
    pub fn jump(&mut self, code: u8, dst: u8, src: u8, imm: i32) -> usize {
        self.push(insn(code, dst, src, 0, imm));
        self.insns.len() - 1
    }
    /// Points the jump at `from` to the next instruction pushed.
    pub fn land(&mut self, from: usize) {
        self.insns[from].off = (self.insns.len() - from - 1) as i16;
    }
    /// `r0 = bpf_map_lookup_elem(map, fp + key)`.
    pub fn lookup(&mut self, map: RawFd, key: i16) {
        self.ld_map(1, map);
        self.push(insn(MOV_X, 2, 10, 0, 0));
        self.push(insn(ADD_K, 2, 0, 0, key.into()));
        self.push(insn(CALL, 0, 0, 0, HELPER_MAP_LOOKUP));
    }
    /// `r7 = bpf_sk_storage_get(sockets, r<sk>, 0, 0)`, the socket's state in `LB_SOCKETS`;
    /// done unless the socket was connected through a VIP.
    pub fn connected_state(&mut self, sockets: RawFd, sk: u8) {
        self.ld_map(1, sockets);
        self.push(insn(MOV_X, 2, sk, 0, 0));
        self.push(insn(MOV_K, 3, 0, 0, 0));
        self.push(insn(MOV_K, 4, 0, 0, 0));
        self.push(insn(CALL, 0, 0, 0, HELPER_SK_STORAGE_GET));
        self.exit_if_zero(0);
        self.push(insn(MOV_X, 7, 0, 0, 0));
        let flags = offset_of!(SocketState, flags) as i16;
        self.push(insn(LDX_B, 1, 7, flags, 0));
        self.push(insn(AND_K, 1, 0, 0, i32::from(SOCKET_CONNECTED)));
        self.exit_if_zero(1);
    }
    /// Appends `return 0`, where every exit jump lands.
    pub fn finish(mut self) -> Vec<Insn> {
        let exit = self.insns.len();
        for at in self.to_exit {
            self.insns[at].off = (exit - at - 1) as i16;
        }
        self.insns.push(insn(MOV_K, 0, 0, 0, 0));
        self.insns.push(insn(EXIT, 0, 0, 0, 0));
        self.insns
    }
}

/// The BTF id of the kernel function `name` (a kfunc or an iterator target), from `btf`.
pub fn kernel_func(btf: &Btf, name: &str) -> Result<u32> {
    btf.id_by_type_name_kind(name, BtfKind::Func)
        .with_context(|| format!("the kernel has no {name}"))
}

/// Loads `insns` as an iterator program for the target whose BTF id is `target`, and
/// attaches it. The verifier's last lines are in the error when the kernel refuses it.
pub fn load_iterator(insns: &[Insn], target: u32, name: &str) -> Result<OwnedFd> {
    let prog = prog_load(insns, target, name)?;
    let mut attr = LinkCreate {
        prog_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_TRACE_ITER,
        ..LinkCreate::default()
    };
    Ok(bpf(BPF_LINK_CREATE, &mut attr)?)
}

/// Runs the iterator to its end (the program once per socket of the calling thread's network
/// namespace) and returns what it wrote with `bpf_seq_write`.
pub fn run_iterator(link: &OwnedFd) -> Result<Vec<u8>> {
    let mut attr = IterCreate {
        link_fd: link.as_raw_fd() as u32,
        flags: 0,
    };
    let fd = bpf(BPF_ITER_CREATE, &mut attr).context("creating a socket iterator")?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: reading into a buffer we own from a descriptor we own.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        match n {
            0 => return Ok(out),
            n if n > 0 => out.extend_from_slice(&buf[..n as usize]),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e).context("running a socket iterator");
                }
            }
        }
    }
}

/// Runs `f` in the agent's network namespace and in every one the processes of `cgroup` (the
/// balanced cgroup) live in, and returns each result: an iterator sees only the sockets of
/// the namespace it was created in, and each pod has its own. A namespace whose processes
/// are gone by then is skipped.
pub fn in_each_namespace<T: Send>(
    cgroup: &Path,
    f: impl Fn() -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let mut all = vec![f()?];
    for (inode, pid) in namespaces(cgroup) {
        let Ok(ns) = std::fs::File::open(format!("/proc/{pid}/ns/net")) else {
            continue;
        };
        // setns changes the calling thread only: a scoped thread enters, iterates, ends.
        let one = std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: a namespace descriptor we opened; affects this thread only.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    let e = std::io::Error::last_os_error();
                    bail!("entering network namespace {inode}: {e}");
                }
                f()
            })
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("socket iterator thread panicked")))
        })?;
        all.push(one);
    }
    Ok(all)
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

fn prog_load(insns: &[Insn], attach_btf_id: u32, name: &str) -> Result<OwnedFd> {
    let license = c"GPL";
    let mut log = vec![0u8; 1 << 16];
    let mut prog_name = [0u8; 16];
    let len = name.len().min(15);
    prog_name[..len].copy_from_slice(&name.as_bytes()[..len]);
    let mut attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_TRACING,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        prog_name,
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Every jump lands inside the program, and every exit jump on the final `return 0`.
    pub(crate) fn check_jumps(p: &[Insn]) {
        let exit = p.len() - 2;
        assert_eq!(p[exit], insn(MOV_K, 0, 0, 0, 0));
        assert_eq!(p[exit + 1].code, EXIT);
        for (at, i) in p.iter().enumerate() {
            let is_jump = i.code & 0x07 == 0x05 || i.code & 0x07 == 0x06;
            if is_jump && !matches!(i.code, CALL | EXIT) {
                let to = at as i64 + 1 + i64::from(i.off);
                assert!(to > at as i64 && to <= exit as i64, "jump at {at} to {to}");
            }
        }
    }

    #[test]
    fn jumps_land_where_they_were_pointed() {
        let mut a = Asm::default();
        let j = a.jump(JEQ_K, 1, 0, 0);
        a.exit_if_zero(2);
        a.land(j);
        a.push(insn(MOV_K, 3, 0, 0, 7));
        let p = a.finish();
        assert_eq!(p[0].off, 1, "lands on the MOV after the exit jump");
        assert_eq!(p[1].off, 1, "the exit jump skips the MOV");
        check_jumps(&p);
    }
}
