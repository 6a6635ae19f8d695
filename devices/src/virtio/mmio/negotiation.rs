//! The driver's side of bringing a device up: the device-status state machine (ACKNOWLEDGE,
//! DRIVER, FEATURES_OK, DRIVER_OK, and the refusals that set NEEDS_RESET), the check of the
//! features the driver accepted, and queue configuration between FEATURES_OK and DRIVER_OK.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE as ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER as DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK as DRIVER_OK, VIRTIO_CONFIG_S_FAILED as FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK as FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET as NEEDS_RESET,
};
use virtio_queue::{Queue, QueueT};

use super::registers::*;
use super::MmioTransport;
use crate::virtio::{VirtioDevice, VirtioError, VIRTIO_F_VERSION_1};

impl<D: VirtioDevice> MmioTransport<D> {
    pub(super) fn set_status(&mut self, value: u32) {
        if value == 0 {
            return self.reset();
        }
        if value & FAILED != 0 {
            self.status |= FAILED;
            return;
        }
        if self.status & NEEDS_RESET != 0 {
            // Only a reset (or FAILED) gets a device that needs a reset going again.
            return;
        }
        let old = self.status;
        // Drivers write back what they read plus one bit; NEEDS_RESET is the device's bit.
        let value = value & !NEEDS_RESET;
        let ok = match (old, value) {
            (0, ACKNOWLEDGE) => true,
            (ACKNOWLEDGE, v) if v == ACKNOWLEDGE | DRIVER => true,
            (o, v) if o == ACKNOWLEDGE | DRIVER && v == o | FEATURES_OK => {
                if let Err(e) = self.check_features() {
                    // FEATURES_OK stays clear: the driver reads it back and gives up.
                    self.last_error = Some(e);
                    return;
                }
                true
            }
            (o, v) if o == ACKNOWLEDGE | DRIVER | FEATURES_OK && v == o | DRIVER_OK => {
                if let Err(e) = self.activate() {
                    return self.fail(e);
                }
                true
            }
            (o, v) => o == v,
        };
        if ok {
            self.status = value;
        } else {
            self.fail(VirtioError::BadStatusTransition { from: self.status, to: value });
        }
    }

    fn check_features(&self) -> Result<(), VirtioError> {
        let offered = self.device.device_features();
        let accepted = self.driver_features;
        if accepted & !offered != 0 {
            return Err(VirtioError::UnofferedFeatures { accepted, offered });
        }
        if accepted & VIRTIO_F_VERSION_1 == 0 {
            return Err(VirtioError::LegacyDriver { accepted });
        }
        Ok(())
    }

    fn activate(&mut self) -> Result<(), VirtioError> {
        let mut live = Vec::with_capacity(self.queues.len());
        for (index, queue) in self.queues.iter().enumerate() {
            if !queue.ready() {
                return Err(VirtioError::QueueInvalid { queue: index });
            }
            live.push(Queue::try_from(queue.state()).map_err(|e| VirtioError::BadQueueState(e.to_string()))?);
        }
        self.device.activate(live, self.driver_features)
    }

    /// Applies a queue-configuration write; allowed only between FEATURES_OK and DRIVER_OK,
    /// on a queue that is not ready yet.
    pub(super) fn write_queue(&mut self, offset: u64, value: u32) -> Result<(), VirtioError> {
        let queue_index = self.queue_sel;
        let configuring = self.status & FEATURES_OK != 0 && self.status & (DRIVER_OK | NEEDS_RESET) == 0;
        let queue = self.queues.get_mut(queue_index as usize);
        let Some(queue) = queue.filter(|q| configuring && (!q.ready() || offset == REG_QUEUE_READY)) else {
            return Err(VirtioError::WriteOutOfOrder { register: offset, status: self.status });
        };
        let half = |old: u64, high_half: bool| {
            if high_half {
                (old & 0xffff_ffff) | (u64::from(value) << 32)
            } else {
                (old & !0xffff_ffff) | u64::from(value)
            }
        };
        let bad_addr = |ring, addr| VirtioError::BadQueueAddress { queue: queue_index, ring, addr };
        match offset {
            REG_QUEUE_NUM => {
                let size = u16::try_from(value).ok();
                size.and_then(|s| queue.try_set_size(s).ok()).ok_or(VirtioError::BadQueueSize {
                    queue: queue_index,
                    size: value,
                    max: queue.max_size(),
                })?
            }
            REG_QUEUE_READY => queue.set_ready(value == 1),
            REG_QUEUE_DESC_LOW | REG_QUEUE_DESC_HIGH => {
                let addr = half(queue.desc_table(), offset == REG_QUEUE_DESC_HIGH);
                queue
                    .try_set_desc_table_address(vm_memory::GuestAddress(addr))
                    .map_err(|_| bad_addr("descriptor", addr))?
            }
            REG_QUEUE_AVAIL_LOW | REG_QUEUE_AVAIL_HIGH => {
                let addr = half(queue.avail_ring(), offset == REG_QUEUE_AVAIL_HIGH);
                queue.try_set_avail_ring_address(vm_memory::GuestAddress(addr)).map_err(|_| bad_addr("avail", addr))?
            }
            _ => {
                let addr = half(queue.used_ring(), offset == REG_QUEUE_USED_HIGH);
                queue.try_set_used_ring_address(vm_memory::GuestAddress(addr)).map_err(|_| bad_addr("used", addr))?
            }
        }
        Ok(())
    }
}
