//! Terminating the sockets translated to a backend that left its service: a connected UDP
//! socket would otherwise keep sending to a deleted pod forever, and a pooled TCP connection
//! keep its dead or drained backend. A socket iterator (`iter`) finds each socket's state in
//! `LB_SOCKETS` and calls the `bpf_sock_destroy()` kfunc on those whose peer is a doomed
//! (backend id, generation); the socket's owner sees ECONNABORTED on its next call and
//! reconnects, through the VIP, to a live backend. A kernel without the kfunc (before 6.5)
//! refuses the programs at load; the agent then reports termination as unavailable and
//! balances as before.

use crate::config::Terminate;
use crate::datapath::iter::{
    in_each_namespace, insn, kernel_func, load_iterator, run_iterator, Asm, Insn, AND_K,
    ATOMIC_ADD_DW, ATOMIC_FETCH, CALL, CTX_SOCKET, HELPER_SKC_TO_TCP_SOCK, LDX_DW, LDX_W, MOV_K,
    MOV_X, PSEUDO_KFUNC_CALL, STX_W, ST_W,
};
use crate::datapath::sys::{
    map_create, map_delete, map_lookup, map_update, BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_HASH,
};
use anyhow::{Context, Result};
use aya::maps::MapData;
use aya_obj::btf::Btf;
use lb_common::{SocketPeer, SocketState};
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

/// The loaded iterator programs, their map of doomed backends, and the budget of sockets a
/// pass may still destroy.
pub struct Terminator {
    doomed: OwnedFd,
    budget: OwnedFd,
    links: Vec<OwnedFd>,
}

/// What a pass destroyed, per backend id.
pub type Destroyed = BTreeMap<u32, u64>;

/// What one pass did.
#[derive(Debug, Default)]
pub struct Pass {
    pub destroyed: Destroyed,
    /// The budget ran out: sockets of these backends may remain, for a later pass.
    pub exhausted: bool,
}

impl Terminator {
    /// Loads both programs against the pinned `LB_SOCKETS`. Fails on kernels without the
    /// kfunc or the iterators, with the kernel's own reason.
    pub fn load(sockets: &MapData) -> Result<Self> {
        let btf = Btf::from_sys_fs().context("reading the kernel's BTF")?;
        let destroy = kernel_func(&btf, "bpf_sock_destroy")?;
        let doomed = map_create(
            BPF_MAP_TYPE_HASH,
            size_of::<u32>() as u32,
            size_of::<Doomed>() as u32,
            MAX_DOOMED,
        )
        .context("creating the doomed backends map")?;
        let budget = map_create(BPF_MAP_TYPE_ARRAY, 4, size_of::<i64>() as u32, 1)
            .context("creating the termination budget map")?;
        let maps = Maps {
            sockets: sockets.fd().as_fd().as_raw_fd(),
            doomed: doomed.as_raw_fd(),
            budget: budget.as_raw_fd(),
        };
        let mut links = Vec::new();
        for (target, protocol) in [("bpf_iter_udp", UDP), ("bpf_iter_tcp", TCP)] {
            let insns = program(protocol, maps, destroy);
            let link = load_iterator(&insns, kernel_func(&btf, target)?, "lb_terminator")
                .with_context(|| format!("loading the {target} socket terminator"))?;
            links.push(link);
        }
        Ok(Self {
            doomed,
            budget,
            links,
        })
    }

    /// Destroys at most `budget` sockets translated to `backends` (id → generation, policy),
    /// in every network namespace that holds balanced processes ([`in_each_namespace`]).
    pub fn destroy_everywhere(
        &self,
        cgroup: &Path,
        backends: &BTreeMap<u32, (u32, Terminate)>,
        budget: u64,
    ) -> Result<Pass> {
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
        if doomed.is_empty() || budget == 0 {
            let exhausted = !doomed.is_empty();
            return Ok(Pass {
                exhausted,
                ..Pass::default()
            });
        }
        for (id, value) in &doomed {
            map_update(&self.doomed, id, value)?;
        }
        let start = i64::try_from(budget).unwrap_or(i64::MAX);
        map_update(&self.budget, &0u32, &start)?;
        let walked = in_each_namespace(cgroup, || {
            self.links
                .iter()
                .try_for_each(|l| run_iterator(l).map(drop))
        });
        let mut pass = Pass::default();
        for (id, _) in &doomed {
            let mut value = Doomed::default();
            if map_lookup(&self.doomed, id, &mut value).is_ok() && value.destroyed > 0 {
                pass.destroyed.insert(*id, value.destroyed);
            }
            let _ = map_delete(&self.doomed, id);
        }
        let mut left = 0i64;
        map_lookup(&self.budget, &0u32, &mut left)?;
        pass.exhausted = left <= 0;
        walked.map(|_| pass)
    }
}

/// The maps the programs use, by descriptor.
#[derive(Clone, Copy)]
struct Maps {
    sockets: RawFd,
    doomed: RawFd,
    budget: RawFd,
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
/// if fetch_add(budget, -1) <= 0: done                                (the pass's bound)
/// bpf_sock_destroy(sk); d.destroyed += 1 (atomic)
/// ```
fn program(protocol: u32, maps: Maps, destroy_btf_id: u32) -> Vec<Insn> {
    let peer = offset_of!(SocketState, peers) as i16;
    let backend_id = peer + offset_of!(SocketPeer, backend_id) as i16;
    let generation = peer + offset_of!(SocketPeer, generation) as i16;
    let mut a = Asm::default();
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
    a.connected_state(maps.sockets, 2);
    a.push(insn(LDX_W, 1, 7, backend_id, 0));
    a.push(insn(STX_W, 10, 1, -4, 0));
    a.lookup(maps.doomed, -4);
    a.exit_if_zero(0);
    a.push(insn(MOV_X, 8, 0, 0, 0));
    a.push(insn(LDX_W, 1, 8, offset_of!(Doomed, generation) as i16, 0));
    a.push(insn(LDX_W, 2, 7, generation, 0));
    a.exit_if_ne(1, 2);
    a.push(insn(LDX_W, 1, 8, offset_of!(Doomed, protocols) as i16, 0));
    a.push(insn(AND_K, 1, 0, 0, protocol as i32));
    a.exit_if_zero(1);
    a.push(insn(ST_W, 10, 0, -8, 0));
    a.lookup(maps.budget, -8);
    a.exit_if_zero(0);
    a.push(insn(MOV_K, 1, 0, 0, -1));
    a.push(insn(ATOMIC_ADD_DW, 0, 1, 0, ATOMIC_FETCH));
    a.exit_if_not_positive(1);
    a.push(insn(MOV_X, 1, 6, 0, 0));
    a.push(insn(CALL, 0, PSEUDO_KFUNC_CALL, 0, destroy_btf_id as i32));
    a.push(insn(MOV_K, 1, 0, 0, 1));
    let destroyed = offset_of!(Doomed, destroyed) as i16;
    a.push(insn(ATOMIC_ADD_DW, 8, 1, destroyed, 0));
    a.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::iter::tests::check_jumps;

    #[test]
    fn every_jump_lands_on_the_exit_and_the_kfunc_is_called() {
        for protocol in [UDP, TCP] {
            let maps = Maps {
                sockets: 3,
                doomed: 4,
                budget: 5,
            };
            let p = program(protocol, maps, 99);
            check_jumps(&p);
            let kfunc = p
                .iter()
                .find(|i| i.code == CALL && i.regs >> 4 == PSEUDO_KFUNC_CALL);
            assert_eq!(kfunc.map(|i| i.imm), Some(99));
        }
    }
}
