//! The virtio-mmio transport, version 2 (virtio 1.x, modern only): the register file (reads,
//! the dispatch of writes, notifications and interrupt acknowledgement) here; the register
//! layout in `registers`, feature negotiation with the device-status state machine and queue
//! configuration in `negotiation`, the saved registers in `persist`.
//!
//! Bad driver behaviour (out-of-order status, features never offered, queue writes at the
//! wrong time, bad queue sizes) never panics: the write is refused, the error is kept in
//! `last_error`, and the device reports DEVICE_NEEDS_RESET with a configuration interrupt.

mod negotiation;
mod persist;
mod registers;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER as DRIVER, VIRTIO_CONFIG_S_DRIVER_OK as DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK as FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET as NEEDS_RESET,
};
use virtio_queue::{Queue, QueueT};

pub use persist::MmioTransportState;
use registers::*;
pub use registers::{MMIO_REGION_SIZE, REG_QUEUE_NOTIFY};

use super::{VirtioDevice, VirtioError};
use crate::bus_device::{BusDevice, VmRequest};
use crate::interrupt::INT_CONFIG;

/// A virtio device behind the MMIO register file.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<Queue>,
    last_error: Option<VirtioError>,
}

impl<D: VirtioDevice> std::fmt::Debug for MmioTransport<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("last_error", &self.last_error)
            .finish_non_exhaustive()
    }
}

fn new_queues(max_sizes: &[u16]) -> Vec<Queue> {
    // A max size of 0 or above 32768 is a bug in the device, not guest input.
    max_sizes.iter().map(|&max| Queue::new(max).expect("device queue max size is 1..=32768")).collect()
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// A freshly reset transport around `device`.
    pub fn new(device: D) -> Self {
        let queues = new_queues(device.queue_max_sizes());
        MmioTransport {
            device,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            last_error: None,
        }
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The device-status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The last configuration error the driver caused, if any.
    pub fn last_error(&self) -> Option<&VirtioError> {
        self.last_error.as_ref()
    }

    /// Features both sides agreed on (valid once FEATURES_OK is set).
    pub fn negotiated_features(&self) -> u64 {
        self.driver_features
    }

    /// A notification for queue `index` that arrived through an ioeventfd.
    pub fn notify(&mut self, index: u32) {
        let live = self.status & DRIVER_OK != 0 && self.status & NEEDS_RESET == 0;
        if let (true, Ok(index)) = (live, u16::try_from(index)) {
            if usize::from(index) < self.queues.len() {
                self.device.queue_notify(index);
            }
        }
    }

    fn fail(&mut self, error: VirtioError) {
        self.last_error = Some(error);
        if self.status & DRIVER != 0 {
            self.status |= NEEDS_RESET;
            self.device.interrupt().raise(INT_CONFIG);
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.queues = new_queues(self.device.queue_max_sizes());
        self.device.interrupt().set_status(0);
        self.last_error = None;
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.device_features() as u32,
                1 => (self.device.device_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.device.interrupt().status(),
            REG_STATUS if self.device.needs_reset() && self.status & DRIVER_OK != 0 => self.status | NEEDS_RESET,
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let result = match offset {
            REG_DEVICE_FEATURES_SEL => {
                self.device_features_sel = value;
                Ok(())
            }
            REG_DRIVER_FEATURES_SEL => {
                self.driver_features_sel = value;
                Ok(())
            }
            REG_DRIVER_FEATURES => {
                if self.status & (DRIVER | FEATURES_OK) != DRIVER {
                    Err(VirtioError::WriteOutOfOrder { register: offset, status: self.status })
                } else {
                    match self.driver_features_sel {
                        0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
                        1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32),
                        _ => {}
                    }
                    Ok(())
                }
            }
            REG_QUEUE_SEL => {
                self.queue_sel = value;
                Ok(())
            }
            REG_QUEUE_NUM | REG_QUEUE_READY | REG_QUEUE_DESC_LOW | REG_QUEUE_DESC_HIGH | REG_QUEUE_AVAIL_LOW
            | REG_QUEUE_AVAIL_HIGH | REG_QUEUE_USED_LOW | REG_QUEUE_USED_HIGH => self.write_queue(offset, value),
            REG_QUEUE_NOTIFY => {
                self.notify(value);
                Ok(())
            }
            REG_INTERRUPT_ACK => {
                self.device.interrupt().ack(value);
                Ok(())
            }
            REG_STATUS => {
                self.set_status(value);
                Ok(())
            }
            // Writes to read-only or unknown registers are ignored, as on hardware.
            _ => Ok(()),
        };
        if let Err(e) = result {
            self.fail(e);
        }
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            return self.device.read_config(offset - REG_CONFIG, data);
        }
        // Registers are 32 bits wide and read whole; anything else reads as zero.
        let value = if data.len() == 4 && offset.is_multiple_of(4) { self.read_register(offset) } else { 0 };
        let bytes = value.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
        data[n..].fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        // The config spaces of our devices are read-only; partial register writes are dropped.
        if offset < REG_CONFIG && offset.is_multiple_of(4) {
            if let Ok(bytes) = <[u8; 4]>::try_from(data) {
                self.write_register(offset, u32::from_le_bytes(bytes));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests;
