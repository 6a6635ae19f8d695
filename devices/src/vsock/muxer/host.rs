//! The muxer facing the host: its epoll set's events (the listener's accepts, handshakes in
//! progress, readable and writable streams), host-side port allocation, and the timeouts.

use super::*;

impl Muxer {
    /// Serves what the host side has ready (without blocking), then the timeouts.
    pub fn process_host(&mut self) {
        let mut events = [EpollEvent::default(); 32];
        // Again while something was ready (a stream accepted in one round is read in the
        // next), but a few rounds at most: level-triggered sources the device cannot clear
        // (accept failing for want of fds) come back on the next wake-up instead of spinning.
        for _ in 0..4 {
            let n = self.epoll.wait(0, &mut events).unwrap_or(0);
            if n == 0 {
                break;
            }
            for event in &events[..n] {
                self.handle_event(event.data(), event.event_set());
            }
        }
        self.expire();
        self.arm_timer();
    }

    pub(super) fn handle_event(&mut self, token: u64, set: EventSet) {
        match token {
            TOKEN_LISTENER => self.accept_all(),
            TOKEN_TIMER => self.timer.acknowledge(),
            _ if self.handshakes.contains_key(&token) => self.continue_handshake(token),
            _ => {
                let Some(&key) = self.tokens.get(&token) else { return };
                let Some(conn) = self.conns.get_mut(&key) else { return };
                if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR)
                    && conn.can_read_host()
                {
                    conn.readable = true;
                }
                if !conn.flushed() {
                    match conn.flush_to_host() {
                        Ok(()) => self.after_flush(key),
                        Err(HostGone) => self.kill(key, true),
                    }
                }
                self.schedule_rx(key);
                self.update_interest(key);
            }
        }
    }

    pub(super) fn accept_all(&mut self) {
        while let Ok((stream, _)) = self.listener.accept() {
            if self.conns.len() + self.handshakes.len() >= MAX_CONNECTIONS || stream.set_nonblocking(true).is_err() {
                continue;
            }
            let token = self.new_token();
            if self.epoll.ctl(ControlOperation::Add, stream.as_raw_fd(), EpollEvent::new(EventSet::IN, token)).is_ok() {
                self.handshakes.insert(token, Handshake::new(stream, self.clock.now() + HANDSHAKE_TIMEOUT));
            }
        }
    }

    pub(super) fn continue_handshake(&mut self, token: u64) {
        let Some(handshake) = self.handshakes.get_mut(&token) else { return };
        let port = match handshake.read_step() {
            HandshakeStep::Pending => return,
            HandshakeStep::Failed => None,
            HandshakeStep::Connect(port) => Some(port),
        };
        let handshake = self.handshakes.remove(&token).expect("looked up above");
        let _ = self.epoll.ctl(ControlOperation::Delete, handshake.stream.as_raw_fd(), EpollEvent::default());
        let Some(port) = port else { return };
        let key = (self.allocate_local_port(), port);
        // Until the REQUEST reaches the guest (`take_control`), which may wait for RX to open.
        let deadline = self.clock.now() + HANDSHAKE_TIMEOUT;
        self.conns.insert(key, Connection::new(token, handshake.stream, ConnState::LocalInit { deadline }));
        self.tokens.insert(token, key);
        self.queue_control(key, OP_REQUEST, 0);
    }

    /// A host-side port no connection uses.
    pub(super) fn allocate_local_port(&mut self) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|k| k.0 == port) {
                return port;
            }
        }
    }

    /// Drops handshakes and connections whose time is up: requests the guest never answered
    /// and full closes whose bytes the host never took get an RST.
    pub(super) fn expire(&mut self) {
        let now = self.clock.now();
        let stale: Vec<u64> = self.handshakes.iter().filter(|(_, h)| h.deadline <= now).map(|(&t, _)| t).collect();
        for token in stale {
            if let Some(h) = self.handshakes.remove(&token) {
                let _ = self.epoll.ctl(ControlOperation::Delete, h.stream.as_raw_fd(), EpollEvent::default());
            }
        }
        let expired: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(c.state, ConnState::LocalInit { deadline } | ConnState::Draining { deadline } if deadline <= now))
            .map(|(&k, _)| k)
            .collect();
        for key in expired {
            self.kill(key, true);
        }
    }

    /// The earliest deadline of a handshake or connection.
    pub fn next_deadline(&self) -> Option<Duration> {
        let conns = self.conns.values().filter_map(|c| match c.state {
            ConnState::LocalInit { deadline } | ConnState::Draining { deadline } => Some(deadline),
            ConnState::Established => None,
        });
        self.handshakes.values().map(|h| h.deadline).chain(conns).min()
    }

    pub(super) fn arm_timer(&mut self) {
        let deadline = self.next_deadline();
        let _ = self.timer.arm(&*self.clock, deadline);
    }
}
