//! Where devices live: the port-I/O and MMIO buses being filled, MMIO slot and GSI allocation,
//! and how a device's interrupt reaches the guest.
//!
//! How devices reach the guest depends on the VM (`Wiring`). Tiny guests run without an
//! in-kernel irqchip: interrupts are polled (the guest reads the interrupt-status register)
//! and QueueNotify writes are MMIO exits served on the vCPU thread. A VM with an irqchip
//! (Linux, and its clones) gets each device interrupt as an irqfd on the device's GSI and
//! virtio QueueNotify as an ioeventfd (datamatch = queue index) served by the device's event
//! loop.

use std::sync::{Arc, Mutex};

use devices::virtio::{MmioTransport, QueueNotifier, VirtioDevice, MMIO_REGION_SIZE, REG_QUEUE_NOTIFY};
use devices::DeviceInterrupt;
use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::event_loop::Subscriber;
use super::DeviceError;
use crate::bus::{Bus, SharedDevice};
use crate::layout::MMIO_DEVICES_END;

/// How a VM's devices interrupt the guest and hear its queue notifications.
#[derive(Clone, Copy)]
pub enum Wiring<'a> {
    /// No in-kernel irqchip (tiny guests): polled interrupt status, QueueNotify as MMIO exits.
    Polled,
    /// The VM has an in-kernel irqchip: irqfds on the devices' GSIs, ioeventfds on QueueNotify.
    Irqchip(&'a VmFd),
}

impl std::fmt::Debug for Wiring<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Wiring::Polled => "Polled",
            Wiring::Irqchip(_) => "Irqchip",
        })
    }
}

/// A device's MMIO window and the GSI its interrupt arrives on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioSlot {
    pub base: u64,
    pub size: u64,
    pub gsi: u32,
}

/// First GSI the allocator hands out: 4 is COM1, 5 and 6 are the fixed slots of virtio-blk
/// and the DMA engine.
const FIRST_FREE_GSI: u32 = 7;
/// Last GSI: the IOAPIC has 24 pins.
const LAST_GSI: u32 = 23;

/// The buses a VM's devices are being placed on, and the MMIO slots and GSIs still free.
/// Allocation is deterministic: the same devices in the same registry order get the same
/// slots, so a restored VM's devices sit where the source's did.
#[derive(Debug)]
pub struct DeviceSpace {
    pub pio: Bus,
    pub mmio: Bus,
    next_base: u64,
    next_gsi: u32,
}

impl Default for DeviceSpace {
    fn default() -> Self {
        DeviceSpace { pio: Bus::new(), mmio: Bus::new(), next_base: MMIO_DEVICES_END, next_gsi: FIRST_FREE_GSI }
    }
}

impl DeviceSpace {
    /// `fixed` if given, else the next free one-page window and GSI.
    pub fn slot(&mut self, kind: &'static str, fixed: Option<MmioSlot>) -> Result<MmioSlot, DeviceError> {
        if let Some(slot) = fixed {
            return Ok(slot);
        }
        if self.next_gsi > LAST_GSI {
            return Err(DeviceError::NoSlot { kind });
        }
        let base = self.next_base;
        self.next_base = base.checked_add(MMIO_REGION_SIZE).ok_or(DeviceError::NoSlot { kind })?;
        let gsi = self.gsi(kind)?;
        Ok(MmioSlot { base, size: MMIO_REGION_SIZE, gsi })
    }

    /// The next free GSI, for a device that has no MMIO window (the VM generation ID's GED).
    pub fn gsi(&mut self, kind: &'static str) -> Result<u32, DeviceError> {
        if self.next_gsi > LAST_GSI {
            return Err(DeviceError::NoSlot { kind });
        }
        let gsi = self.next_gsi;
        self.next_gsi += 1;
        Ok(gsi)
    }

    /// Puts `device` on the MMIO bus at `slot`.
    pub fn insert_mmio(&mut self, slot: MmioSlot, device: SharedDevice) -> Result<(), DeviceError> {
        Ok(self.mmio.insert(slot.base, slot.size, device)?)
    }
}

/// A device's interrupt as `wiring` makes it: polled, or an irqfd on `gsi`.
pub fn device_interrupt(wiring: Wiring, gsi: u32) -> Result<Arc<DeviceInterrupt>, DeviceError> {
    match wiring {
        Wiring::Polled => Ok(DeviceInterrupt::polled()),
        Wiring::Irqchip(vm) => {
            let irqfd = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
            vm.register_irqfd(&irqfd, gsi).map_err(|source| DeviceError::Irqfd { gsi, source })?;
            Ok(DeviceInterrupt::with_trigger(Arc::new(irqfd)))
        }
    }
}

/// With an irqchip, `transport`'s queue notifications as KVM ioeventfds on its QueueNotify
/// register at `base` (datamatch = queue index), for a `QueueNotifier` on the device's event
/// loop; polled, they are MMIO exits served on the vCPU thread and there is none.
pub fn queue_notifications<D: VirtioDevice + 'static>(
    transport: &Arc<Mutex<MmioTransport<D>>>,
    base: u64,
    wiring: Wiring,
) -> Result<Option<Subscriber>, DeviceError> {
    let Wiring::Irqchip(vm) = wiring else { return Ok(None) };
    let notifier = QueueNotifier::new(Arc::clone(transport)).map_err(DeviceError::EventFd)?;
    let addr = base + REG_QUEUE_NOTIFY;
    for (queue, event) in notifier.eventfds() {
        vm.register_ioevent(event, &IoEventAddress::Mmio(addr), queue).map_err(|source| DeviceError::Ioeventfd {
            addr,
            queue,
            source,
        })?;
    }
    Ok(Some(Arc::new(Mutex::new(notifier))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_handed_out_in_order_until_the_gsis_run_out() {
        let mut space = DeviceSpace::default();
        let fixed = MmioSlot { base: 1, size: 2, gsi: 3 };
        assert_eq!(space.slot("fixed", Some(fixed)).unwrap(), fixed);
        let first = space.slot("a", None).unwrap();
        assert_eq!((first.base, first.gsi), (MMIO_DEVICES_END, FIRST_FREE_GSI));
        let second = space.slot("b", None).unwrap();
        assert_eq!((second.base, second.gsi), (MMIO_DEVICES_END + MMIO_REGION_SIZE, FIRST_FREE_GSI + 1));
        for _ in second.gsi..LAST_GSI {
            space.slot("more", None).unwrap();
        }
        assert!(matches!(space.slot("late", None), Err(DeviceError::NoSlot { kind: "late" })));
    }
}
