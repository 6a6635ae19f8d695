//! Queue notifications through ioeventfds: KVM signals an eventfd when the guest writes a
//! queue's index to QueueNotify (no exit to the VMM), and the VM's event loop passes it on to
//! the transport. The VMM registers each eventfd with KVM (`eventfds`) before handing the
//! notifier to the loop.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{MmioTransport, VirtioDevice};
use crate::subscriber::{watch, DeviceSubscriber, EventOps, EventSet, Events, MutEventSubscriber};

/// One eventfd per queue of a virtio-mmio device, served on the event loop.
pub struct QueueNotifier<D: VirtioDevice> {
    transport: Arc<Mutex<MmioTransport<D>>>,
    /// Index = queue index.
    events: Vec<EventFd>,
    init_error: Option<event_manager::Error>,
}

impl<D: VirtioDevice> std::fmt::Debug for QueueNotifier<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let fds: Vec<_> = self.events.iter().map(AsRawFd::as_raw_fd).collect();
        f.debug_struct("QueueNotifier").field("events", &fds).finish_non_exhaustive()
    }
}

impl<D: VirtioDevice> QueueNotifier<D> {
    /// An eventfd for each queue of `transport`'s device.
    pub fn new(transport: Arc<Mutex<MmioTransport<D>>>) -> std::io::Result<Self> {
        let queues = transport.lock().unwrap_or_else(|e| e.into_inner()).device().queue_max_sizes().len();
        let events = (0..queues).map(|_| EventFd::new(EFD_NONBLOCK)).collect::<Result<Vec<_>, _>>()?;
        Ok(QueueNotifier { transport, events, init_error: None })
    }

    /// (queue index, eventfd) for each queue: what the VMM registers as ioeventfds, with the
    /// queue index as datamatch on QueueNotify.
    pub fn eventfds(&self) -> impl Iterator<Item = (u32, &EventFd)> {
        (0u32..).zip(&self.events)
    }
}

impl<D: VirtioDevice> MutEventSubscriber for QueueNotifier<D> {
    fn init(&mut self, ops: &mut EventOps) {
        for (queue, event) in (0u32..).zip(&self.events) {
            watch(ops, Events::with_data(event, queue, EventSet::IN), &mut self.init_error);
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let queue = events.data();
        if let Some(event) = self.events.get(queue as usize) {
            // Reset the counter first: a notification after this serves the queue again.
            let _ = event.read();
            self.transport.lock().unwrap_or_else(|e| e.into_inner()).notify(queue);
        }
    }
}

impl<D: VirtioDevice> DeviceSubscriber for QueueNotifier<D> {
    fn take_init_error(&mut self) -> Option<event_manager::Error> {
        self.init_error.take()
    }
}
