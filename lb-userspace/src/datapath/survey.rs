//! The survey of translated TCP connections, and closing chosen idle ones: what
//! `max_connection_age` and the rebalance (`rebalance.rs`) act on. One `iter/tcp` program
//! does both in a single walk of a network namespace's sockets. For each socket the data
//! plane translated (its state in `LB_SOCKETS`), it either closes it with `bpf_sock_destroy()`,
//! when the agent chose it and it is still idle, or writes a record for the agent: its cookie,
//! service, backend, and how long it has been quiet.
//!
//! "Idle" is read from the kernel's own `struct tcp_sock`, at offsets from the kernel's BTF:
//! - nothing sent is unacknowledged (`snd_una == write_seq`) and nothing received is unread
//!   (`rcv_nxt == copied_seq`);
//! - the last data went *to* the client, so a request whose answer has not come yet is never
//!   idle, however long the server takes. Two signs say a request is waiting: the last data
//!   sent is newer than the last received (`lsndtime` after `icsk_ack.lrcvtime`), or the
//!   peer's last acknowledgement of our data came on a segment without data (`snd_wl1`, the
//!   sequence number of the segment that last moved `snd_una`, equals `rcv_nxt`). The
//!   second is needed because those times are in jiffies: a client that sends its next
//!   request within the same tick as it received the last answer shows equal times. A
//!   connection that never carried data also counts as waiting;
//! - "quiet" is the time since the last data either way (jiffies; the agent measures the
//!   kernel's tick rate once at load).
//!
//! The kernel checks idleness again at the moment of closing, so a request sent after the
//! survey keeps its connection.

use crate::datapath::btf_offsets::KernelTypes;
use crate::datapath::iter::{
    in_each_namespace, insn, kernel_func, load_iterator, run_iterator, Asm, Insn, ADD_K, AND_K,
    CALL, CTX_META, CTX_SOCKET, HELPER_GET_SOCKET_COOKIE, HELPER_JIFFIES64, HELPER_KTIME_GET_NS,
    HELPER_SEQ_WRITE, HELPER_SKC_TO_TCP_SOCK, JA, JEQ_K, JEQ_X, JLT_X, JNE_K, JNE_X, JSLT32_K,
    LDX_B, LDX_DW, LDX_W, MOV_K, MOV_X, PSEUDO_KFUNC_CALL, STX_DW, STX_W, ST_DW, ST_W, SUB32_X,
};
use crate::datapath::sys::{map_create, map_delete, map_lookup, map_update, BPF_MAP_TYPE_HASH};
use anyhow::{ensure, Context, Result};
use aya::maps::MapData;
use aya_obj::btf::Btf;
use lb_common::{SocketPeer, SocketState, SOCKET_DONE};
use std::collections::{BTreeMap, BTreeSet};
use std::mem::{offset_of, size_of};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

/// At most this many connections are closed in one pass (the map's size).
pub const MAX_CLOSES_PER_PASS: u32 = 4_096;
/// At most this many services are surveyed (the map's size); the rest are not rebalanced.
pub const MAX_SURVEYED_SERVICES: u32 = 65_536;

/// One translated TCP connection, as the survey saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connection {
    /// The socket's cookie: unique on this host while it lives.
    pub cookie: u64,
    pub service_id: u32,
    pub backend_id: u32,
    pub generation: u32,
    /// Since the last data either way.
    pub quiet: Duration,
    /// A request is unanswered, or data is queued either way: never closed.
    pub awaiting: bool,
}

/// What one pass saw and closed, over every network namespace.
#[derive(Debug, Default)]
pub struct Pass {
    /// The connections not closed.
    pub connections: Vec<Connection>,
    pub closed: BTreeSet<u64>,
}

/// A record the program writes: a connection, or (cookie 0, at the end of the walk) the
/// kernel's clock in jiffies and nanoseconds.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Record {
    cookie: u64,
    service_id: u32,
    backend_id: u32,
    generation: u32,
    quiet: u32,
    awaiting: u32,
    _pad: u32,
}
const RECORD: usize = size_of::<Record>();

/// `cull` value, keyed by cookie: the quiet time (jiffies) the socket must still have.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Cull {
    quiet_min: u32,
    /// Set by the program when it closed the socket.
    closed: u32,
}

/// Where the program reads `struct tcp_sock`.
#[derive(Clone, Copy, Debug)]
struct TcpOffsets {
    snd_una: i16,
    write_seq: i16,
    rcv_nxt: i16,
    copied_seq: i16,
    lsndtime: i16,
    lrcvtime: i16,
    snd_wl1: i16,
}

impl TcpOffsets {
    fn read(types: &KernelTypes) -> Result<Self> {
        let at = |path: &[&str]| -> Result<i16> {
            let offset = types.offset_of("tcp_sock", path)?;
            i16::try_from(offset).context("a tcp_sock member beyond 32 KiB")
        };
        Ok(Self {
            snd_una: at(&["snd_una"])?,
            write_seq: at(&["write_seq"])?,
            rcv_nxt: at(&["rcv_nxt"])?,
            copied_seq: at(&["copied_seq"])?,
            lsndtime: at(&["lsndtime"])?,
            lrcvtime: at(&["inet_conn", "icsk_ack", "lrcvtime"])?,
            snd_wl1: at(&["snd_wl1"])?,
        })
    }
}

/// The loaded program, its map of connections to close, and the kernel's tick rate.
pub struct Surveyor {
    link: OwnedFd,
    cull: OwnedFd,
    /// The service ids whose connections the program reports (`watch`): a node's other
    /// connections cost one lookup each and no record.
    services: OwnedFd,
    watched: BTreeSet<u32>,
    hz: u32,
}

impl Surveyor {
    /// Loads the program against the pinned `LB_SOCKETS`. Fails on kernels without
    /// `bpf_sock_destroy()`, socket iterators or BTF, with the kernel's own reason.
    pub fn load(sockets: &MapData) -> Result<Self> {
        let btf = Btf::from_sys_fs().context("reading the kernel's BTF")?;
        let offsets = TcpOffsets::read(&KernelTypes::from_sys_fs()?)?;
        let cull = map_create(
            BPF_MAP_TYPE_HASH,
            size_of::<u64>() as u32,
            size_of::<Cull>() as u32,
            MAX_CLOSES_PER_PASS,
        )
        .context("creating the map of connections to close")?;
        let services = map_create(BPF_MAP_TYPE_HASH, 4, 4, MAX_SURVEYED_SERVICES)
            .context("creating the map of surveyed services")?;
        let maps = Maps {
            sockets: sockets.fd().as_fd().as_raw_fd(),
            cull: cull.as_raw_fd(),
            services: services.as_raw_fd(),
        };
        let insns = program(maps, kernel_func(&btf, "bpf_sock_destroy")?, offsets);
        let link = load_iterator(&insns, kernel_func(&btf, "bpf_iter_tcp")?, "lb_survey")
            .context("loading the connection survey")?;
        let mut surveyor = Self {
            link,
            cull,
            services,
            watched: BTreeSet::new(),
            hz: 0,
        };
        surveyor.hz = surveyor.measure_hz()?;
        Ok(surveyor)
    }

    /// The kernel's tick rate: jiffies over two walks 50 ms apart, rounded to the nearest
    /// rate Linux can be built with.
    fn measure_hz(&self) -> Result<u32> {
        let clock = || -> Result<(u64, u64)> {
            let out = run_iterator(&self.link)?;
            let (_, clock) = parse(&out, 1000);
            clock.context("the survey wrote no clock record")
        };
        let (j0, ns0) = clock()?;
        std::thread::sleep(Duration::from_millis(50));
        let (j1, ns1) = clock()?;
        ensure!(ns1 > ns0, "the kernel's clock did not advance");
        let measured = (j1 - j0) as f64 * 1e9 / (ns1 - ns0) as f64;
        let hz = [100, 250, 300, 1000]
            .into_iter()
            .min_by(|a, b| {
                let d = |x: u32| (f64::from(x) - measured).abs();
                d(*a).total_cmp(&d(*b))
            })
            .expect("a list of rates");
        Ok(hz)
    }

    /// Reports the connections of these services only from now on.
    pub fn watch(&mut self, ids: &BTreeSet<u32>) -> Result<()> {
        for gone in self.watched.difference(ids) {
            let _ = map_delete(&self.services, gone);
        }
        self.watched.retain(|id| ids.contains(id));
        let room = (MAX_SURVEYED_SERVICES as usize).saturating_sub(self.watched.len());
        let new: Vec<u32> = ids.difference(&self.watched).take(room).copied().collect();
        for id in new {
            map_update(&self.services, &id, &1u32)?;
            self.watched.insert(id);
        }
        Ok(())
    }

    /// Walks every network namespace that holds balanced processes: closes the connections
    /// in `close` (cookie → the quiet time it must still have) that are still idle, and
    /// reports the others.
    pub fn pass(&self, cgroup: &Path, close: &BTreeMap<u64, Duration>) -> Result<Pass> {
        let chosen: Vec<(u64, Cull)> = (close.iter().take(MAX_CLOSES_PER_PASS as usize))
            .map(|(cookie, quiet)| {
                let jiffies = quiet.as_millis() as u64 * u64::from(self.hz) / 1000;
                let cull = Cull {
                    quiet_min: jiffies.min(u64::from(u32::MAX)) as u32,
                    closed: 0,
                };
                (*cookie, cull)
            })
            .collect();
        for (cookie, cull) in &chosen {
            map_update(&self.cull, cookie, cull)?;
        }
        let walked = in_each_namespace(cgroup, || run_iterator(&self.link));
        let mut pass = Pass::default();
        for (cookie, _) in &chosen {
            let mut cull = Cull::default();
            if map_lookup(&self.cull, cookie, &mut cull).is_ok() && cull.closed != 0 {
                pass.closed.insert(*cookie);
            }
            let _ = map_delete(&self.cull, cookie);
        }
        for out in walked? {
            pass.connections.extend(parse(&out, self.hz).0);
        }
        Ok(pass)
    }
}

/// The connections and the clock (jiffies, ns) in a walk's output.
fn parse(out: &[u8], hz: u32) -> (Vec<Connection>, Option<(u64, u64)>) {
    let mut connections = Vec::new();
    let mut clock = None;
    for chunk in out.chunks_exact(RECORD) {
        let u32_at = |at: usize| u32::from_ne_bytes(chunk[at..at + 4].try_into().expect("4"));
        let u64_at = |at: usize| u64::from_ne_bytes(chunk[at..at + 8].try_into().expect("8"));
        let cookie = u64_at(offset_of!(Record, cookie));
        if cookie == 0 {
            clock = Some((u64_at(8), u64_at(16)));
            continue;
        }
        let quiet = u64::from(u32_at(offset_of!(Record, quiet)));
        connections.push(Connection {
            cookie,
            service_id: u32_at(offset_of!(Record, service_id)),
            backend_id: u32_at(offset_of!(Record, backend_id)),
            generation: u32_at(offset_of!(Record, generation)),
            quiet: Duration::from_millis(quiet * 1000 / u64::from(hz.max(1))),
            awaiting: u32_at(offset_of!(Record, awaiting)) != 0,
        });
    }
    (connections, clock)
}

/// The maps the program uses, by descriptor.
#[derive(Clone, Copy)]
struct Maps {
    sockets: RawFd,
    cull: RawFd,
    services: RawFd,
}

/// The program (r9 = ctx, r6 = socket, r8 = its tcp_sock, the record at fp-32):
///
/// ```text
/// sk = ctx->socket; if !sk: write the clock record; done          (the walk's last call)
/// tp = bpf_skc_to_tcp_sock(sk); if !tp: done                     (time-wait, request)
/// state = bpf_sk_storage_get(LB_SOCKETS, tp, 0, 0); if !state: done  (never translated)
/// if !(state.flags & CONNECTED) or state.flags & DONE: done
/// record = {cookie, service, backend, generation}
/// if !surveyed[service]: done
/// awaiting = snd_una != write_seq or rcv_nxt != copied_seq or snd_wl1 == rcv_nxt
///            or lsndtime after lrcvtime
/// quiet = jiffies - (the later of lsndtime and lrcvtime)
/// c = cull[cookie]; if c and !awaiting and quiet >= c.quiet_min:
///     c.closed = 1; bpf_sock_destroy(sk); done
/// bpf_seq_write(ctx->meta->seq, record)
/// ```
fn program(maps: Maps, destroy_btf_id: u32, tcp: TcpOffsets) -> Vec<Insn> {
    let peer = offset_of!(SocketState, peers) as i16;
    let field = |f: usize| peer + f as i16;
    let flags = offset_of!(SocketState, flags) as i16;
    let rec = |f: usize| -(RECORD as i16) + f as i16;
    let mut a = Asm::default();
    a.push(insn(MOV_X, 9, 1, 0, 0));
    a.push(insn(LDX_DW, 6, 9, CTX_SOCKET, 0));
    let to_clock = a.jump(JEQ_K, 6, 0, 0);
    a.push(insn(MOV_X, 1, 6, 0, 0));
    a.push(insn(CALL, 0, 0, 0, HELPER_SKC_TO_TCP_SOCK));
    a.exit_if_zero(0);
    a.push(insn(MOV_X, 8, 0, 0, 0));
    a.connected_state(maps.sockets, 8);
    a.push(insn(LDX_B, 1, 7, flags, 0));
    a.push(insn(AND_K, 1, 0, 0, i32::from(SOCKET_DONE)));
    a.exit_if_nonzero(1);
    for (from, to) in [
        (
            offset_of!(SocketPeer, service_id),
            offset_of!(Record, service_id),
        ),
        (
            offset_of!(SocketPeer, backend_id),
            offset_of!(Record, backend_id),
        ),
        (
            offset_of!(SocketPeer, generation),
            offset_of!(Record, generation),
        ),
    ] {
        a.push(insn(LDX_W, 1, 7, field(from), 0));
        a.push(insn(STX_W, 10, 1, rec(to), 0));
    }
    a.lookup(maps.services, rec(offset_of!(Record, service_id)));
    a.exit_if_zero(0);
    a.push(insn(ST_W, 10, 0, rec(offset_of!(Record, _pad)), 0));
    a.push(insn(ST_W, 10, 0, rec(offset_of!(Record, awaiting)), 0));
    a.push(insn(MOV_X, 1, 6, 0, 0));
    a.push(insn(CALL, 0, 0, 0, HELPER_GET_SOCKET_COOKIE));
    a.push(insn(STX_DW, 10, 0, rec(offset_of!(Record, cookie)), 0));
    a.push(insn(CALL, 0, 0, 0, HELPER_JIFFIES64));
    a.push(insn(MOV_X, 7, 0, 0, 0));
    let awaiting = rec(offset_of!(Record, awaiting));
    for (x, y) in [(tcp.snd_una, tcp.write_seq), (tcp.rcv_nxt, tcp.copied_seq)] {
        a.push(insn(LDX_W, 1, 8, x, 0));
        a.push(insn(LDX_W, 2, 8, y, 0));
        let same = a.jump(JEQ_X, 1, 2, 0);
        a.push(insn(ST_W, 10, 0, awaiting, 1));
        a.land(same);
    }
    a.push(insn(LDX_W, 1, 8, tcp.snd_wl1, 0));
    a.push(insn(LDX_W, 2, 8, tcp.rcv_nxt, 0));
    let data_acked_us = a.jump(JNE_X, 1, 2, 0);
    a.push(insn(ST_W, 10, 0, awaiting, 1));
    a.land(data_acked_us);
    a.push(insn(LDX_W, 2, 8, tcp.lsndtime, 0));
    a.push(insn(LDX_W, 3, 8, tcp.lrcvtime, 0));
    a.push(insn(MOV_X, 1, 3, 0, 0));
    a.push(insn(SUB32_X, 1, 2, 0, 0));
    let sent_last = a.jump(JSLT32_K, 1, 0, 0);
    a.push(insn(SUB32_X, 7, 3, 0, 0));
    let quiet_known = a.jump(JA, 0, 0, 0);
    a.land(sent_last);
    a.push(insn(ST_W, 10, 0, awaiting, 1));
    a.push(insn(SUB32_X, 7, 2, 0, 0));
    a.land(quiet_known);
    a.push(insn(STX_W, 10, 7, rec(offset_of!(Record, quiet)), 0));
    a.lookup(maps.cull, rec(offset_of!(Record, cookie)));
    let not_chosen = a.jump(JEQ_K, 0, 0, 0);
    a.push(insn(LDX_W, 1, 10, awaiting, 0));
    let busy = a.jump(JNE_K, 1, 0, 0);
    a.push(insn(LDX_W, 1, 0, offset_of!(Cull, quiet_min) as i16, 0));
    a.push(insn(LDX_W, 2, 10, rec(offset_of!(Record, quiet)), 0));
    let too_recent = a.jump(JLT_X, 2, 1, 0);
    a.push(insn(ST_W, 0, 0, offset_of!(Cull, closed) as i16, 1));
    a.push(insn(MOV_X, 1, 6, 0, 0));
    a.push(insn(CALL, 0, PSEUDO_KFUNC_CALL, 0, destroy_btf_id as i32));
    a.goto_exit();
    for from in [not_chosen, busy, too_recent] {
        a.land(from);
    }
    write_record(&mut a);
    a.goto_exit();
    a.land(to_clock);
    a.push(insn(CALL, 0, 0, 0, HELPER_JIFFIES64));
    a.push(insn(STX_DW, 10, 0, rec(8), 0));
    a.push(insn(CALL, 0, 0, 0, HELPER_KTIME_GET_NS));
    a.push(insn(STX_DW, 10, 0, rec(16), 0));
    a.push(insn(ST_DW, 10, 0, rec(0), 0));
    a.push(insn(ST_DW, 10, 0, rec(24), 0));
    write_record(&mut a);
    a.finish()
}

/// `bpf_seq_write(ctx->meta->seq, fp - RECORD, RECORD)`.
fn write_record(a: &mut Asm) {
    a.push(insn(LDX_DW, 1, 9, CTX_META, 0));
    a.push(insn(LDX_DW, 1, 1, 0, 0));
    a.push(insn(MOV_X, 2, 10, 0, 0));
    a.push(insn(ADD_K, 2, 0, 0, -(RECORD as i32)));
    a.push(insn(MOV_K, 3, 0, 0, RECORD as i32));
    a.push(insn(CALL, 0, 0, 0, HELPER_SEQ_WRITE));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::iter::tests::check_jumps;

    fn offsets() -> TcpOffsets {
        TcpOffsets {
            snd_una: 100,
            write_seq: 104,
            rcv_nxt: 108,
            copied_seq: 112,
            lsndtime: 116,
            lrcvtime: 120,
            snd_wl1: 124,
        }
    }

    #[test]
    fn jumps_stay_inside_and_the_destroy_comes_after_the_idle_checks() {
        let maps = Maps {
            sockets: 3,
            cull: 4,
            services: 5,
        };
        let p = program(maps, 99, offsets());
        check_jumps(&p);
        let kfunc = p
            .iter()
            .position(|i| i.code == CALL && i.regs >> 4 == PSEUDO_KFUNC_CALL)
            .unwrap();
        assert_eq!(p[kfunc].imm, 99);
        let before = &p[..kfunc];
        for needed in [JLT_X, JNE_K] {
            assert!(
                before.iter().any(|i| i.code == needed),
                "{needed:#x} before the kfunc"
            );
        }
        let writes = p
            .iter()
            .filter(|i| i.imm == HELPER_SEQ_WRITE && i.code == CALL);
        assert_eq!(writes.count(), 2, "one for a connection, one for the clock");
    }

    #[test]
    fn parses_connections_and_the_clock() {
        let mut out = Vec::new();
        let push = |out: &mut Vec<u8>, words: [u32; 8]| {
            for w in words {
                out.extend_from_slice(&w.to_ne_bytes());
            }
        };
        // cookie 7, service 1, backend 2, generation 3, quiet 500 jiffies, awaiting.
        push(&mut out, [7, 0, 1, 2, 3, 500, 1, 0]);
        // The clock: jiffies 1000, ns 5.
        push(&mut out, [0, 0, 1000, 0, 5, 0, 0, 0]);
        out.extend_from_slice(&[1, 2, 3]); // a torn tail is ignored
        let (c, clock) = parse(&out, 250);
        assert_eq!(clock, Some((1000, 5)));
        assert_eq!(
            c,
            vec![Connection {
                cookie: 7,
                service_id: 1,
                backend_id: 2,
                generation: 3,
                quiet: Duration::from_secs(2),
                awaiting: true,
            }]
        );
    }
}
