//! Zygote devices. Depend on `memory`, never on `vmm`.

mod bus_device;

pub use bus_device::{BusDevice, VmRequest};
