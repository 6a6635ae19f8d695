//! Save and restore of the vsock device (`Persist`): the queues and the heads in flight;
//! a restored (or reset) device publishes those heads unused and tells the guest
//! TRANSPORT_RESET.

use super::*;

impl VsockDevice {
    /// Takes `state`'s queues (already checked), features and stepping, gives the heads that
    /// were in flight back to the guest unused and queues a TRANSPORT_RESET (delivered now if
    /// the guest has an event buffer posted, else when it posts one).
    fn apply_state(&mut self, state: &VsockState, queues: Vec<Queue>) {
        self.features = state.features;
        self.hold_tx = state.hold_tx;
        self.hold_rx = state.hold_rx;
        if queues.is_empty() {
            return;
        }
        self.queues = queues;
        for &head in &state.tx_in_flight {
            self.publish(TXQ, head, 0);
        }
        for &head in &state.rx_in_flight {
            self.publish(RXQ, head, 0);
        }
        self.signal_used(TXQ);
        self.signal_used(RXQ);
        self.event_pending = true;
        self.process_evq();
    }

    /// Brings this device back to `state` in place (a VM reset; the listener and its
    /// `uds_path` stay), at one instant with `reset_ram`: checks `state`, runs `reset_ram`
    /// (refused while buffers are pinned, which covers every packet held in flight; then
    /// nothing changed), closes every connection, drops what is held and takes `state` as a
    /// restore would: the heads in flight at the capture go back unused and the guest is sent
    /// TRANSPORT_RESET.
    pub fn reset_with<E: From<VsockError>>(
        &mut self,
        state: &VsockState,
        reset_ram: impl FnOnce() -> Result<(), E>,
    ) -> Result<(), E> {
        if state.cid != self.cid {
            return Err(VsockError::BadState(format!("guest CID {}, this device has {}", state.cid, self.cid)).into());
        }
        let queues = state.check(&self.ram)?;
        reset_ram()?;
        VirtioDevice::reset(self);
        self.apply_state(state, queues);
        Ok(())
    }
}

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
        device.apply_state(state, queues);
        Ok(device)
    }
}
