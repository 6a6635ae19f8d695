//! `NetDevice`: virtio-net as the MMIO transport sees it, plus what the VMM, the clone path and
//! tests need: the TAP subscriber for the event loop, capture and reset at one instant with
//! the RAM, and host-stepped receive and transmit.

use std::sync::{Arc, Mutex, MutexGuard};

use memory::GuestRam;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::VIRTIO_NET_S_LINK_UP;
use virtio_queue::{Queue, QueueT};

use super::core::{NetCore, NetCounters, Queues};
use super::events::NetTapEvents;
use super::persist::{apply_state, state_of};
use super::{MacAddr, NetArgs, NetError, NetState, Tap, NET_QUEUE_SIZE};
use crate::interrupt::DeviceInterrupt;
use crate::persist::Persist;
use crate::virtio::{VirtioDevice, VirtioError};

/// What one `step_rx` / `step_tx` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetStep {
    /// Nothing to do: no buffer or frame posted, nothing waiting on the TAP, not running.
    Idle,
    /// Chains popped and their buffers pinned (receive: enough for a frame).
    Claimed { chains: usize, bytes: u64 },
    /// The kernel copied a frame of `bytes` (header included): from the TAP into the claimed
    /// buffers, or out of them into the TAP.
    Copied { bytes: usize },
    /// Receive: the kernel took a frame too big for the claimed buffers (they stay claimed).
    /// Transmit: the frame was dropped (no link, or the TAP refused it).
    Dropped,
    /// Used entries published (then the buffers unpinned and the interrupt raised).
    Published { chains: usize },
}

/// A virtio-net device on a TAP (or on nothing: link down).
pub struct NetDevice {
    core: Arc<Mutex<NetCore>>,
    interrupt: Arc<DeviceInterrupt>,
    mac: Option<MacAddr>,
}

impl std::fmt::Debug for NetDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetDevice").field("mac", &self.mac).field("tap", &self.tap_name()).finish_non_exhaustive()
    }
}

impl NetDevice {
    /// A device on `ram`, interrupting through `interrupt`, attached to `backend` (link up)
    /// or to nothing (link down). With `mac` it offers VIRTIO_NET_F_MAC; without, the driver
    /// picks a MAC.
    pub fn new(
        ram: Arc<GuestRam>,
        interrupt: Arc<DeviceInterrupt>,
        backend: Option<Tap>,
        mac: Option<MacAddr>,
    ) -> NetDevice {
        let core = NetCore::new(ram, Arc::clone(&interrupt), backend);
        NetDevice { core: Arc::new(Mutex::new(core)), interrupt, mac }
    }

    /// The features a device with `mac` offers.
    pub fn offered_features(mac: Option<MacAddr>) -> u64 {
        super::offered_features(mac)
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, NetCore> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn mac(&self) -> Option<MacAddr> {
        self.mac
    }

    /// The attached TAP's name, if any (also after it went away, until the event loop drops it).
    pub fn tap_name(&self) -> Option<String> {
        self.lock().backend.as_ref().map(|t| t.name().to_string())
    }

    /// Whether the guest sees its link up: a TAP is attached and has not gone away.
    pub fn link_up(&self) -> bool {
        self.lock().link_up()
    }

    pub fn counters(&self) -> NetCounters {
        self.lock().counters
    }

    /// The latest error (a bad chain, a dropped frame, a TAP failure), taken.
    pub fn take_error(&self) -> Option<NetError> {
        self.lock().last_error.take()
    }

    /// Chains popped and not published: (receive, transmit).
    pub fn in_flight(&self) -> (usize, usize) {
        let core = self.lock();
        (core.rx_claims.len(), usize::from(core.tx.is_some()))
    }

    /// Host-stepped: only `step_rx` and `step_tx` move frames; queue notifications and TAP
    /// events do nothing (frames wait on the TAP). A clone inherits it. Turning it off
    /// finishes what the steps left half done and serves the queues.
    pub fn set_host_stepped(&self, stepped: bool) {
        let mut core = self.lock();
        core.host_stepped = stepped;
        if stepped || core.broken {
            return;
        }
        if core.tx.as_ref().is_some_and(|t| !t.sent) {
            core.step_tx();
        }
        if core.tx.is_some() {
            core.step_tx();
        }
        if core.rx_filled.is_some() {
            core.step_rx();
        }
        core.give_back_rx();
        core.process_tx();
        core.process_rx();
    }

    pub fn host_stepped(&self) -> bool {
        self.lock().host_stepped
    }

    /// One receive stage: claim (pop and pin buffers for a frame), then copy (the kernel reads
    /// a frame from the TAP into them), then publish (used entries, interrupt, unpin).
    pub fn step_rx(&self) -> NetStep {
        self.lock().step_rx()
    }

    /// One transmit stage: claim (pop and pin one frame), then copy (the kernel writes it to
    /// the TAP), then publish.
    pub fn step_tx(&self) -> NetStep {
        self.lock().step_tx()
    }

    /// The state, read under the device lock: what `Persist::save` returns.
    pub(crate) fn state_locked(&self, core: &NetCore) -> NetState {
        state_of(core, self.mac)
    }

    /// The clone or snapshot instant, atomic against receive and transmit: with the device
    /// locked (no frame copied or published meanwhile) captures the state and runs
    /// `freeze_ram` (e.g. `|| ram.clone_cow()`). Call it with the vCPUs paused.
    pub fn capture_with<R>(&self, freeze_ram: impl FnOnce() -> R) -> (NetState, R) {
        let core = self.lock();
        let state = self.state_locked(&core);
        (state, freeze_ram())
    }

    /// Brings this device back to `state` (a VM reset; the TAP stays), at one instant with
    /// `reset_ram`: checks `state`, then with the device locked runs `reset_ram` (refused
    /// while buffers are pinned, which covers every chain in flight; then nothing changed),
    /// drops what is in flight and takes the queues, features and stepping of `state`.
    pub fn reset_with<E: From<NetError>>(
        &mut self,
        state: &NetState,
        reset_ram: impl FnOnce() -> Result<(), E>,
    ) -> Result<(), E> {
        let mut core = self.lock();
        if state.mac != self.mac {
            return Err(NetError::bad_state("mac", format!("{:?}, this device has {:?}", state.mac, self.mac)).into());
        }
        let queues = state.check(&core.ram)?;
        reset_ram()?;
        core.drop_in_flight();
        apply_state(&mut core, state, queues);
        Ok(())
    }

    /// The subscriber that receives frames as the TAP has them, for the VM's event loop; None
    /// without a TAP. One per device.
    pub fn tap_events(&self) -> Option<NetTapEvents> {
        let fd = self.lock().backend.as_ref().map(std::os::fd::AsRawFd::as_raw_fd)?;
        Some(NetTapEvents::new(Arc::clone(&self.core), fd))
    }
}

impl Persist for NetDevice {
    type State = NetState;
    type ConstructorArgs = NetArgs;
    type Error = NetError;

    /// Takes the device lock; on a running VM use `capture_with`, which also freezes the RAM
    /// under it.
    fn save(&self) -> Result<NetState, NetError> {
        Ok(self.state_locked(&self.lock()))
    }

    /// A device on `args` (the VM's own RAM, interrupt and TAP or none) in `state`, checked
    /// first. If the link the guest saw differs from the one it gets (a clone without a TAP),
    /// it raises a configuration interrupt.
    fn restore(args: NetArgs, state: &NetState) -> Result<NetDevice, NetError> {
        let queues = state.check(&args.ram)?;
        let device = NetDevice::new(args.ram, args.interrupt, args.backend, state.mac);
        apply_state(&mut device.lock(), state, queues);
        Ok(device)
    }
}

impl VirtioDevice for NetDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn device_features(&self) -> u64 {
        NetDevice::offered_features(self.mac)
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[NET_QUEUE_SIZE, NET_QUEUE_SIZE]
    }

    fn interrupt(&self) -> &Arc<DeviceInterrupt> {
        &self.interrupt
    }

    /// `virtio_net_config`: mac (6 bytes), status (u16); max_virtqueue_pairs and mtu (not
    /// offered) and the rest read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 12];
        config[..6].copy_from_slice(&self.mac.map_or([0; 6], |m| m.0));
        let status = if self.link_up() { VIRTIO_NET_S_LINK_UP as u16 } else { 0 };
        config[6..8].copy_from_slice(&status.to_le_bytes());
        for (i, byte) in data.iter_mut().enumerate() {
            *byte =
                offset.checked_add(i as u64).and_then(|o| config.get(usize::try_from(o).ok()?)).copied().unwrap_or(0);
        }
    }

    fn activate(&mut self, queues: Vec<Queue>, features: u64) -> Result<(), VirtioError> {
        let mut core = self.lock();
        let mut queues = queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            return Err(VirtioError::QueueInvalid { queue: 1 });
        };
        for (index, queue) in [&rx, &tx].into_iter().enumerate() {
            if !queue.is_valid(&*core.ram) {
                return Err(VirtioError::QueueInvalid { queue: index });
            }
        }
        core.drop_in_flight();
        core.features = features;
        core.queues = Some(Queues::new(rx, tx));
        core.broken = false;
        core.apply_offloads();
        Ok(())
    }

    fn queue_notify(&mut self, index: u16) {
        let mut core = self.lock();
        match index {
            super::RX_QUEUE => core.process_rx(),
            super::TX_QUEUE => core.process_tx(),
            _ => {}
        }
    }

    fn needs_reset(&self) -> bool {
        self.lock().broken
    }

    /// Drops what is in flight (the copies are synchronous: nothing is still being DMA'd),
    /// forgets the queues and features, and turns the TAP's offloads off again.
    fn reset(&mut self) {
        let mut core = self.lock();
        core.drop_in_flight();
        core.queues = None;
        core.features = 0;
        core.broken = false;
        core.apply_offloads();
    }
}
