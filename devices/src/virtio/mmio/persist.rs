//! The transport's saved state: its registers as plain data, taken for a clone or snapshot
//! and put back in place (a VM reset) or into a new transport (a restore). The device's own
//! state (live queue indices, requests in flight) is the device's `Persist`.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};

use super::MmioTransport;
use crate::persist::Persist;
use crate::virtio::{VirtioDevice, VirtioError};

/// The transport's registers as plain data (guest physical addresses only), for clone and
/// snapshot. The device's own state (live queue indices, requests in flight) is captured by
/// the device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    /// The queues as the driver configured them.
    #[serde(with = "crate::virtio::queue_serde::vec")]
    pub queues: Vec<QueueState>,
    pub interrupt_status: u32,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Puts captured registers back in place (a VM reset), all but the interrupt status,
    /// which the caller sets before the device re-executes anything. Checked first: on error
    /// nothing changed.
    pub fn restore_registers(&mut self, state: &MmioTransportState) -> Result<(), VirtioError> {
        let queues = state
            .queues
            .iter()
            .map(|&q| Queue::try_from(q).map_err(|e| VirtioError::BadQueueState(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        if queues.len() != self.device.queue_max_sizes().len() {
            return Err(VirtioError::BadQueueState(format!(
                "{} queues captured, the device has {}",
                queues.len(),
                self.device.queue_max_sizes().len()
            )));
        }
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.queues = queues;
        self.last_error = None;
        Ok(())
    }

    /// The transport's registers as plain data.
    pub fn state(&self) -> MmioTransportState {
        MmioTransportState {
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            queues: self.queues.iter().map(Queue::state).collect(),
            interrupt_status: self.device.interrupt().status(),
        }
    }
}

impl<D: VirtioDevice> Persist for MmioTransport<D> {
    type State = MmioTransportState;
    /// The device behind the transport, already restored.
    type ConstructorArgs = D;
    type Error = VirtioError;

    fn save(&self) -> Result<MmioTransportState, VirtioError> {
        Ok(self.state())
    }

    /// A transport with captured registers around an already restored `device`. Interrupt
    /// bits the device raised meanwhile (re-executed requests that completed) are kept.
    fn restore(device: D, state: &MmioTransportState) -> Result<Self, VirtioError> {
        let mut transport = MmioTransport::new(device);
        transport.restore_registers(state)?;
        let interrupt = transport.device.interrupt();
        interrupt.set_status(interrupt.status() | state.interrupt_status);
        Ok(transport)
    }
}
