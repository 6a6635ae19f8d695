//! Zygote devices: the virtio-mmio transport, virtio-blk on io_uring, virtio-vsock (Firecracker's
//! hybrid model over Unix sockets), virtio-rng, and the DMA test engine.
//! Depend on `memory`, never on `vmm`.

pub mod block;
mod bus_device;
pub mod clock;
pub mod dma;
pub mod host_events;
pub mod interrupt;
pub mod metrics;
pub mod net;
pub mod persist;
pub mod rng;
pub mod subscriber;
pub mod virtio;
pub mod vsock;

// Unit tests that need test-only hooks reuse the integration tests' driver, which names this
// crate `devices`.
#[cfg(test)]
extern crate self as devices;

pub use bus_device::{BusDevice, VmRequest};
pub use interrupt::{DeviceInterrupt, IrqTrigger};
pub use persist::Persist;
