//! The client a choice is made for: the socket's network namespace (one pod, one container) or
//! the calling task's cgroup. Read at most once per program run, and only when a service needs
//! it (Maglev or client affinity).

use aya_ebpf::{
    helpers::generated::{bpf_get_current_cgroup_id, bpf_get_netns_cookie},
    programs::SockAddrContext,
    EbpfContext,
};
use lb_common::FLAG_CLIENT_CGROUP;

pub struct Client<'a> {
    ctx: &'a SockAddrContext,
    key: Option<u64>,
}

impl<'a> Client<'a> {
    #[inline(always)]
    pub fn new(ctx: &'a SockAddrContext) -> Self {
        Self { ctx, key: None }
    }

    #[inline(always)]
    pub fn key(&mut self, flags: u8) -> u64 {
        if let Some(k) = self.key {
            return k;
        }
        let k = if flags & FLAG_CLIENT_CGROUP != 0 {
            // SAFETY: plain helper call without arguments.
            unsafe { bpf_get_current_cgroup_id() }
        } else {
            // SAFETY: the context pointer is the program's own, valid for this run.
            unsafe { bpf_get_netns_cookie(self.ctx.as_ptr()) }
        };
        self.key = Some(k);
        k
    }
}
