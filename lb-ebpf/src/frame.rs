//! What the shared stages need of a frame, whichever hook holds it: XDP's `xdp_md` or tc's
//! `__sk_buff`. Each hook's entry module passes its own context; the stages are compiled once
//! per hook.

use aya_ebpf::{
    EbpfContext as _,
    bindings::__sk_buff,
    cty::c_void,
    helpers::{bpf_skb_load_bytes, bpf_xdp_load_bytes},
    programs::{TcContext, XdpContext},
};

pub trait Frame {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// The device the frame arrived on.
    fn ingress_ifindex(&self) -> u32;
    /// Copies `len` bytes at `offset` from the frame's start into `to`: 0, or a negative
    /// error if the frame is shorter.
    fn load_bytes(&self, offset: u32, to: *mut c_void, len: u32) -> i64;
}

impl Frame for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }

    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: the context the kernel passed, valid for this run.
        unsafe { (*self.ctx).ingress_ifindex }
    }

    #[inline(always)]
    fn load_bytes(&self, offset: u32, to: *mut c_void, len: u32) -> i64 {
        // SAFETY: the helper checks the frame's bounds; the caller gives `len` bytes at `to`.
        unsafe { bpf_xdp_load_bytes(self.ctx, offset, to, len) }
    }
}

impl Frame for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        let skb = self.as_ptr().cast::<__sk_buff>();
        // At tc ingress the skb's device is the one it arrived on (and a test run sets only
        // this one).
        // SAFETY: the context the kernel passed, valid for this run.
        unsafe { (*skb).ifindex }
    }

    #[inline(always)]
    fn load_bytes(&self, offset: u32, to: *mut c_void, len: u32) -> i64 {
        // SAFETY: the helper checks the frame's bounds; the caller gives `len` bytes at `to`.
        unsafe { bpf_skb_load_bytes(self.as_ptr(), offset, to, len) }
    }
}
