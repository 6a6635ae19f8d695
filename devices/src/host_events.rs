//! Devices with host-side events of their own (vsock's sockets and timeouts, the entropy
//! device's rate-limit timer) expose them as one pollable fd, and one subscriber serves it on
//! the VM's event loop: when the fd is readable it locks the device's transport (the same lock
//! the vCPUs' MMIO accesses and the queue notifier take, so a capture holding it sees the
//! device at one instant) and lets the device handle whatever is ready.
//!
//! Without an event loop (tests, host-stepped fuzzing) the caller invokes
//! `HostEvents::process_host` itself, at the instant it chooses.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use crate::subscriber::{watch, DeviceSubscriber, EventOps, EventSet, Events, MutEventSubscriber};
use crate::virtio::{MmioTransport, VirtioDevice};

/// A device with host-side event sources behind one fd.
pub trait HostEvents: VirtioDevice {
    /// The fd that becomes readable when the device has host-side work (level-triggered: it
    /// stays readable until the work is done or the device stops wanting it).
    fn host_fd(&self) -> RawFd;
    /// Does the host-side work that is ready now, without blocking.
    fn process_host(&mut self);
}

/// Serves a device's `host_fd` on the event loop.
pub struct HostEventSubscriber<D: HostEvents> {
    transport: Arc<Mutex<MmioTransport<D>>>,
    fd: RawFd,
    init_error: Option<event_manager::Error>,
}

impl<D: HostEvents> std::fmt::Debug for HostEventSubscriber<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostEventSubscriber").field("fd", &self.fd).finish_non_exhaustive()
    }
}

impl<D: HostEvents> HostEventSubscriber<D> {
    /// The subscriber for `transport`'s device. The device keeps its fd open for its lifetime,
    /// and the subscriber keeps the device alive.
    pub fn new(transport: Arc<Mutex<MmioTransport<D>>>) -> Self {
        let fd = transport.lock().unwrap_or_else(|e| e.into_inner()).device().host_fd();
        HostEventSubscriber { transport, fd, init_error: None }
    }
}

impl<D: HostEvents> MutEventSubscriber for HostEventSubscriber<D> {
    fn init(&mut self, ops: &mut EventOps) {
        watch(ops, Events::with_data_raw(self.fd, 0, EventSet::IN), &mut self.init_error);
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.transport.lock().unwrap_or_else(|e| e.into_inner()).device_mut().process_host();
    }
}

impl<D: HostEvents> DeviceSubscriber for HostEventSubscriber<D> {
    fn take_init_error(&mut self) -> Option<event_manager::Error> {
        self.init_error.take()
    }
}
