//! The vsock device's queue work: TX packets to the muxer (held while `hold_tx`), the
//! muxer's packets and control replies into RX buffers (held while `hold_rx`), and
//! TRANSPORT_RESET on the event queue; each publishes used buffers and signals the guest.

use super::*;

impl VsockDevice {
    pub(super) fn record(&mut self, error: VsockError) {
        self.stats.bad_buffers += 1;
        self.last_error = Some(error);
    }

    pub(super) fn publish(&mut self, q: usize, head: u16, len: u32) {
        if self.queues[q].add_used(&*self.ram, head, len).is_err() {
            self.broken = true;
        }
    }

    pub(super) fn signal_used(&mut self, q: usize) {
        if self.queues.get_mut(q).is_some_and(|queue| queue.needs_notification(&*self.ram).unwrap_or(true)) {
            self.interrupt.raise(INT_USED_RING);
        }
    }

    /// The next chain of queue `q`, or `None`; an avail index that jumped breaks the device.
    pub(super) fn pop(&mut self, q: usize, ram: &Arc<GuestRam>) -> Option<DescriptorChain<Arc<GuestRam>>> {
        match self.queues[q].iter(Arc::clone(ram)) {
            Ok(mut iter) => iter.next(),
            Err(_) => {
                self.broken = true;
                None
            }
        }
    }

    /// Serves TX until the ring is empty (re-arming EVENT_IDX notifications on the way out),
    /// or until control packets pile up for want of RX buffers.
    pub(super) fn process_tx(&mut self) {
        if self.queues.is_empty() || self.broken {
            return;
        }
        self.tx_paused = false;
        let ram = Arc::clone(&self.ram);
        loop {
            while !self.broken {
                if self.muxer.control_full() {
                    self.tx_paused = true;
                    break;
                }
                let Some(chain) = self.pop(TXQ, &ram) else { break };
                let head = chain.head_index();
                let pinned = parse_tx(&ram, chain).and_then(|packet| Ok((packet, pin_tx(&ram, &packet)?)));
                match pinned {
                    Ok((packet, pins)) if self.hold_tx => self.tx_held.push_back(HeldTx { packet, pins }),
                    Ok((packet, pins)) => self.handle_tx(packet, pins),
                    Err(e) => {
                        self.record(e);
                        self.publish(TXQ, head, 0);
                    }
                }
            }
            if self.tx_paused || self.broken || !self.queues[TXQ].enable_notification(&*ram).unwrap_or(false) {
                break;
            }
        }
        self.signal_used(TXQ);
    }

    /// Reads a pinned TX packet, hands it to the muxer and publishes it (then unpins).
    pub(super) fn handle_tx(&mut self, packet: TxPacket, pins: Vec<PinGuard>) {
        let h = packet.header;
        if h.src_cid != self.cid || h.dst_cid != HOST_CID {
            self.record(VsockError::WrongCid { src: h.src_cid, dst: h.dst_cid, guest: self.cid });
        } else {
            let mut data = vec![0u8; pins.get(1).map_or(0, PinGuard::len)];
            let read = pins.get(1).map_or(Ok(()), |pin| pin.read_at(0, &mut data));
            match read {
                Ok(()) => {
                    if let Some(e) = self.muxer.handle_tx(&h, &data) {
                        self.last_error = Some(e);
                    }
                    self.stats.tx_packets += 1;
                }
                Err(e) => self.record(VsockError::Pin(e)),
            }
        }
        self.publish(TXQ, packet.head, 0);
        drop(pins);
    }

    /// Whether RX may carry packets: not before the guest took a pending TRANSPORT_RESET.
    pub(super) fn rx_open(&mut self) -> bool {
        if self.event_pending {
            return false;
        }
        if let Some(at) = self.rx_gate {
            let now = self.queues[EVQ].avail_idx(&*self.ram, std::sync::atomic::Ordering::Acquire);
            if now.is_ok_and(|idx| idx.0 != at) {
                self.rx_gate = None;
            }
        }
        self.rx_gate.is_none()
    }

    /// Fills RX buffers with what the muxer has for the guest: control packets first, then
    /// connection data, each buffer pinned for write before the first byte lands in it.
    pub(super) fn process_rx(&mut self) {
        if self.queues.is_empty() || self.broken || !self.rx_open() {
            return;
        }
        let ram = Arc::clone(&self.ram);
        let mut used = false;
        while !self.broken {
            let Some(chain) = self.pop(RXQ, &ram) else {
                // Out of buffers: have the guest notify when it posts more.
                if self.queues[RXQ].enable_notification(&*ram).unwrap_or(false) && self.muxer.has_rx_work() {
                    continue;
                }
                break;
            };
            let Some(item) = self.muxer.next_rx() else {
                self.queues[RXQ].go_to_previous_position();
                break;
            };
            let head = chain.head_index();
            match self.fill_rx(&ram, chain, item) {
                Ok(Some((len, pins))) => {
                    self.stats.rx_packets += 1;
                    if self.hold_rx {
                        self.rx_held.push_back(HeldRx { head, len, _pins: pins });
                    } else {
                        self.publish(RXQ, head, len);
                        used = true;
                    }
                }
                // The stream had nothing after all: the buffer stays the guest's.
                Ok(None) => self.queues[RXQ].go_to_previous_position(),
                Err(e) => {
                    if let RxItem::Data(key) = item {
                        self.muxer.schedule_rx(key);
                    }
                    self.record(e);
                    self.publish(RXQ, head, 0);
                    used = true;
                }
            }
        }
        if used {
            self.signal_used(RXQ);
        }
    }

    /// Writes `item` into the RX chain: pins the header (and for data the data buffer) for
    /// write, reads host bytes into the pinned buffer, then writes the header through the
    /// crate. Returns the used length and the pins (dropped after publication).
    pub(super) fn fill_rx(
        &mut self,
        ram: &GuestRam,
        chain: DescriptorChain<Arc<GuestRam>>,
        item: RxItem,
    ) -> Result<Option<(u32, Vec<PinGuard>)>, VsockError> {
        let head = chain.head_index();
        let (layout, mut packet) = parse_rx(ram, chain)?;
        let mut pins =
            vec![ram.pin(GuestAddress(layout.header_at), PKT_HEADER_SIZE, Access::Write).map_err(VsockError::Pin)?];
        let header = match item {
            RxItem::Control => self.muxer.take_control(),
            RxItem::Data(key) => {
                let (data_at, capacity) = layout.data;
                let Some(&slice) = packet.data_slice().filter(|_| capacity > 0) else {
                    return Err(VsockError::NoRxRoom { head });
                };
                pins.push(ram.pin(GuestAddress(data_at), capacity as usize, Access::Write).map_err(VsockError::Pin)?);
                let mut slice = slice.subslice(0, capacity as usize).map_err(|_| VsockError::NoRxRoom { head })?;
                self.muxer.read_for_guest(key, &mut slice)
            }
        };
        let Some(header) = header else { return Ok(None) };
        packet.set_header_from_raw(&header.to_bytes()).map_err(|source| VsockError::BadPacket { head, source })?;
        Ok(Some((PKT_HEADER_SIZE as u32 + header.len, pins)))
    }

    /// Delivers a pending TRANSPORT_RESET into the next event buffer.
    pub(super) fn process_evq(&mut self) {
        if self.queues.is_empty() || self.broken || !self.event_pending {
            return;
        }
        let ram = Arc::clone(&self.ram);
        while self.event_pending && !self.broken {
            let Some(chain) = self.pop(EVQ, &ram) else {
                let _ = self.queues[EVQ].enable_notification(&*ram);
                break;
            };
            let head = chain.head_index();
            let first: Option<Descriptor> = chain.into_iter().next();
            let written = first
                .filter(|d| d.is_write_only() && d.len() >= 4)
                .ok_or(VsockError::BadEventBuffer { head })
                .and_then(|d| ram.pin(d.addr(), 4, Access::Write).map_err(VsockError::Pin))
                .and_then(|pin| {
                    pin.write_at(0, &EVENT_TRANSPORT_RESET.to_le_bytes()).map_err(VsockError::Pin).map(|()| pin)
                });
            match written {
                Ok(pin) => {
                    self.publish(EVQ, head, 4);
                    drop(pin);
                    self.event_pending = false;
                    self.stats.events += 1;
                    let idx = self.queues[EVQ].avail_idx(&*ram, std::sync::atomic::Ordering::Acquire);
                    self.rx_gate = Some(idx.map_or(0, |i| i.0));
                    // RX opens when the guest posts a fresh event buffer: have it notify us
                    // then (a Linux guest, whose RX buffers are all posted, sends no other
                    // kick, and host connections waiting for RX would time out).
                    if let Some(at) = self.rx_gate {
                        self.notify_beyond(EVQ, at);
                    }
                }
                Err(e) => {
                    self.record(e);
                    self.publish(EVQ, head, 0);
                }
            }
        }
        self.signal_used(EVQ);
    }

    /// Asks the driver to notify queue `q` as soon as it makes anything available beyond avail
    /// index `idx`. virtio-queue's `enable_notification` sets avail_event to the device's own
    /// next index, which lies behind `idx` while buffers it has not popped are available (Linux
    /// keeps 8 event buffers posted): the driver's vring_need_event then sends no kick for a
    /// new buffer.
    pub(super) fn notify_beyond(&mut self, q: usize, idx: u16) {
        let ram = Arc::clone(&self.ram);
        if self.queues[q].enable_notification(&*ram).is_err() {
            self.broken = true;
            return;
        }
        let queue = &self.queues[q];
        if !queue.event_idx_enabled() {
            return;
        }
        // avail_event follows the used ring's flags, index and `size` 8-byte elements.
        let at = queue.used_ring().checked_add(4 + 8 * u64::from(queue.size()));
        let written = at.map(|at| ram.write_slice(&idx.to_le_bytes(), GuestAddress(at)));
        if !matches!(written, Some(Ok(()))) {
            self.broken = true;
        }
        // The write lands before any later read of the avail index (rx_open's).
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }

    /// TX, then RX, again while TX waited only for RX to drain.
    pub(super) fn run(&mut self) {
        for _ in 0..4 {
            self.process_tx();
            self.process_rx();
            if !self.tx_paused || self.muxer.control_full() {
                break;
            }
        }
    }
}
