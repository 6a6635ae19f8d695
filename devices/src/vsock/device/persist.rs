//! Save and restore of the vsock device (`Persist`): the queues and the heads in flight;
//! a restored device publishes those heads unused and tells the guest TRANSPORT_RESET.

use super::*;

impl Persist for VsockDevice {
    type State = VsockState;
    type ConstructorArgs = VsockArgs;
    type Error = VsockError;

    /// The state at this instant; the caller holds the transport's lock across this and the
    /// RAM freeze, so no buffer is published or pinned in between.
    fn save(&self) -> Result<VsockState, VsockError> {
        Ok(VsockState {
            cid: self.cid,
            features: self.features,
            queues: self.queues.iter().map(Queue::state).collect(),
            tx_in_flight: self.tx_held.iter().map(|h| h.packet.head).collect(),
            rx_in_flight: self.rx_held.iter().map(|h| h.head).collect(),
            hold_tx: self.hold_tx,
            hold_rx: self.hold_rx,
        })
    }

    /// A clone's or restored VM's device on its own `uds_path`, with no connections: the
    /// buffers that were in flight go back to the guest unused, and the guest is sent
    /// TRANSPORT_RESET (now if it has an event buffer posted, else when it posts one). The VMM
    /// then notifies every queue on resume.
    fn restore(args: VsockArgs, state: &VsockState) -> Result<VsockDevice, VsockError> {
        let queues = state.check(&args.ram)?;
        let mut device = VsockDevice::new(args, state.cid)?;
        device.features = state.features;
        device.hold_tx = state.hold_tx;
        device.hold_rx = state.hold_rx;
        if queues.is_empty() {
            return Ok(device);
        }
        device.queues = queues;
        for &head in &state.tx_in_flight {
            device.publish(TXQ, head, 0);
        }
        for &head in &state.rx_in_flight {
            device.publish(RXQ, head, 0);
        }
        device.signal_used(TXQ);
        device.signal_used(RXQ);
        device.event_pending = true;
        device.process_evq();
        Ok(device)
    }
}
