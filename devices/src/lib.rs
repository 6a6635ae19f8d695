//! Zygote devices: the virtio-mmio transport, virtio-blk on io_uring, and the DMA test engine.
//! Depend on `memory`, never on `vmm`.

pub mod block;
mod bus_device;
pub mod dma;
pub mod interrupt;
pub mod persist;
pub mod subscriber;
pub mod virtio;

// Unit tests that need test-only hooks reuse the integration tests' driver, which names this
// crate `devices`.
#[cfg(test)]
extern crate self as devices;

pub use bus_device::{BusDevice, VmRequest};
pub use interrupt::{DeviceInterrupt, IrqTrigger};
pub use persist::Persist;
