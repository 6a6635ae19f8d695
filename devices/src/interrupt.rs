//! A device's interrupt: the status bits the guest reads and acknowledges, and an optional
//! trigger (an irqfd `EventFd` when the VM has an in-kernel irqchip).
//!
//! The tiny guests run without an irqchip: they poll the status register instead, so a
//! `DeviceInterrupt` without a trigger is a complete, working interrupt ("polled" mode).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// Status bit: the device put buffers in a used ring (virtio `VIRTIO_MMIO_INT_VRING`).
pub const INT_USED_RING: u32 = 1;
/// Status bit: the device configuration changed, or the device needs a reset.
pub const INT_CONFIG: u32 = 2;

/// Something that injects an interrupt into the guest: the irqfd eventfd KVM listens on.
pub trait IrqTrigger: Send + Sync {
    fn trigger(&self) -> std::io::Result<()>;
}

impl IrqTrigger for EventFd {
    fn trigger(&self) -> std::io::Result<()> {
        self.write(1)
    }
}

/// One device's interrupt line and status register. Shared between the transport (which the
/// guest reads and acknowledges through) and the device's completion paths.
#[derive(Default)]
pub struct DeviceInterrupt {
    status: AtomicU32,
    trigger: Option<Arc<dyn IrqTrigger>>,
}

impl std::fmt::Debug for DeviceInterrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceInterrupt")
            .field("status", &self.status())
            .field("has_trigger", &self.trigger.is_some())
            .finish()
    }
}

impl DeviceInterrupt {
    /// An interrupt the guest polls for (no irqchip).
    pub fn polled() -> Arc<DeviceInterrupt> {
        Arc::new(DeviceInterrupt::default())
    }

    /// An interrupt that also signals `trigger` (an irqfd) whenever it is raised.
    pub fn with_trigger(trigger: Arc<dyn IrqTrigger>) -> Arc<DeviceInterrupt> {
        Arc::new(DeviceInterrupt { status: AtomicU32::new(0), trigger: Some(trigger) })
    }

    /// Sets `bits` in the status register and signals the trigger. A failed signal is not
    /// fatal: the status bits stay set and a polling guest still sees them.
    pub fn raise(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::AcqRel);
        if let Some(trigger) = &self.trigger {
            let _ = trigger.trigger();
        }
    }

    /// Signals the trigger again if a status bit is set. For a restored device: KVM injects
    /// irqfd signals asynchronously, so a signal sent just before a clone instant may not be in
    /// the irqchip state the clone got, and a driver whose interrupt is lost waits forever. An
    /// extra one is harmless (the driver reads status 0 and ignores it).
    pub fn resend_if_pending(&self) {
        if let (true, Some(trigger)) = (self.status() != 0, &self.trigger) {
            let _ = trigger.trigger();
        }
    }

    /// The status register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// Clears the acknowledged `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// Puts back a captured status register (restore).
    pub fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raise_sets_bits_and_signals_the_eventfd() {
        let fd = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let irq = DeviceInterrupt::with_trigger(fd.clone());
        irq.raise(INT_USED_RING);
        irq.raise(INT_CONFIG);
        assert_eq!(irq.status(), INT_USED_RING | INT_CONFIG);
        assert_eq!(fd.read().unwrap(), 2);
        irq.ack(INT_USED_RING);
        assert_eq!(irq.status(), INT_CONFIG);
    }

    #[test]
    fn resend_signals_only_while_a_status_bit_is_set() {
        let fd = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let irq = DeviceInterrupt::with_trigger(fd.clone());
        irq.resend_if_pending();
        assert!(fd.read().is_err(), "nothing pending: no signal");
        irq.set_status(INT_USED_RING);
        irq.resend_if_pending();
        assert_eq!(fd.read().unwrap(), 1);
    }

    #[test]
    fn a_polled_interrupt_only_keeps_status() {
        let irq = DeviceInterrupt::polled();
        irq.raise(INT_USED_RING);
        assert_eq!(irq.status(), INT_USED_RING);
        irq.set_status(0);
        assert_eq!(irq.status(), 0);
    }
}
