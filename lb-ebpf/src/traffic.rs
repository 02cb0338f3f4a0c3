//! `cgroup_skb` egress and ingress: bytes and packets each backend exchanges with balanced
//! sockets. The packet's socket holds its state (`socket.rs`): a connected socket's packets
//! are all with its one backend; for an unconnected UDP socket talking to several, the
//! packet's remote address and port pick the peer.

use crate::{counters, socket};
use aya_ebpf::programs::SkBuffContext;
use core::ptr::{addr_of, read_volatile};
use lb_common::{v4_mapped, RawAddr, SocketPeer, SOCKET_CONNECTED};
use network_types::ip::{IpProto, Ipv4Hdr, Ipv6Hdr};

#[inline(always)]
pub fn count(ctx: &SkBuffContext, to_backend: bool) {
    let Some(peer) = peer(ctx, to_backend) else {
        return;
    };
    let len = u64::from(ctx.len());
    counters::backend(&peer, |c| {
        if to_backend {
            counters::add(&mut c.packets_to, 1);
            counters::add(&mut c.bytes_to, len);
        } else {
            counters::add(&mut c.packets_from, 1);
            counters::add(&mut c.bytes_from, len);
        }
    });
}

#[inline(always)]
fn peer(ctx: &SkBuffContext, to_backend: bool) -> Option<SocketPeer> {
    // SAFETY: the context's socket field, read as one 8-byte word as the verifier requires.
    let sk = unsafe { read_volatile(addr_of!((*ctx.skb.skb).__bindgen_anon_2.sk)) };
    if sk.is_null() {
        return None;
    }
    let state = socket::state(sk.cast(), false)?;
    if state.used == 0 {
        return None;
    }
    if state.flags & SOCKET_CONNECTED != 0 {
        return Some(state.peers[0]);
    }
    let (addr, port) = remote(ctx, to_backend)?;
    socket::by_backend(state, &addr, port)
}

/// The peer's address and network-order port of a TCP or UDP packet: the destination of an
/// outgoing one, the source of an incoming one. cgroup_skb data starts at the IP header.
#[inline(always)]
fn remote(ctx: &SkBuffContext, outgoing: bool) -> Option<(RawAddr, u16)> {
    let version = ctx.load::<u8>(0).ok()? >> 4;
    let (addr, proto, l4) = if version == 4 {
        let ip: Ipv4Hdr = ctx.load(0).ok()?;
        let raw = u32::from_ne_bytes(if outgoing { ip.dst_addr } else { ip.src_addr });
        (v4_mapped(raw), ip.proto, usize::from(ip.ihl()))
    } else if version == 6 {
        let ip: Ipv6Hdr = ctx.load(0).ok()?;
        let o = if outgoing { ip.dst_addr } else { ip.src_addr };
        let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
        // Extension headers are not walked: balanced traffic does not carry them.
        (
            [word(0), word(4), word(8), word(12)],
            ip.next_hdr,
            Ipv6Hdr::LEN,
        )
    } else {
        return None;
    };
    if proto != IpProto::Tcp as u8 && proto != IpProto::Udp as u8 {
        return None;
    }
    // TCP and UDP both start with the source port, then the destination port.
    let ports: [u8; 4] = ctx.load(l4).ok()?;
    let port = if outgoing {
        [ports[2], ports[3]]
    } else {
        [ports[0], ports[1]]
    };
    Some((addr, u16::from_ne_bytes(port)))
}
