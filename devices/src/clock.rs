//! Time as devices see it: a monotonic `Clock` they are given (so tests drive timeouts and rate
//! limits with a `ManualClock` instead of sleeping), and a `WakeTimer` that wakes an event loop
//! at a device's next deadline. The clock decides what has expired; the timer only wakes the
//! loop, so a test's manual clock and a real timerfd never disagree about an expiry.

use std::fmt::Debug;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

/// A monotonic clock: the time since some fixed instant of its own.
pub trait Clock: Send + Sync + Debug {
    fn now(&self) -> Duration;
}

/// The host's monotonic clock (`Instant`), counted from the clock's creation.
#[derive(Debug)]
pub struct MonotonicClock {
    start: Instant,
}

impl MonotonicClock {
    /// A shared clock starting now, as devices take it.
    pub fn shared() -> Arc<dyn Clock> {
        Arc::new(MonotonicClock { start: Instant::now() })
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }
}

/// A clock that moves only when told to (tests).
#[derive(Debug, Default)]
pub struct ManualClock {
    nanos: AtomicU64,
}

impl ManualClock {
    pub fn new() -> Arc<ManualClock> {
        Arc::new(ManualClock::default())
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_add(by, Ordering::AcqRel);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Ordering::Acquire))
    }
}

/// A timerfd armed for a device's next deadline on its clock. Readable when it fired; the
/// device then asks its clock what expired.
#[derive(Debug)]
pub struct WakeTimer {
    timer: TimerFd,
    armed_for: Option<Duration>,
}

impl WakeTimer {
    pub fn new() -> std::io::Result<WakeTimer> {
        let timer = TimerFd::new().map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        // Non-blocking, so reading an expiry that is not there answers EAGAIN instead of
        // blocking the event loop.
        // SAFETY: the fd is the timerfd `timer` owns, open for the whole call; F_SETFL with
        // O_NONBLOCK changes only its status flags.
        if unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(WakeTimer { timer, armed_for: None })
    }

    /// Arms the timer for `deadline` on `clock` (at once if it has passed), or disarms it.
    /// Re-arming for the deadline it already has is a no-op.
    pub fn arm(&mut self, clock: &dyn Clock, deadline: Option<Duration>) -> std::io::Result<()> {
        if deadline == self.armed_for {
            return Ok(());
        }
        self.armed_for = deadline;
        let set = match deadline {
            // A zero duration would disarm a timerfd: wake after a nanosecond instead.
            Some(at) => self.timer.reset(at.saturating_sub(clock.now()).max(Duration::from_nanos(1)), None),
            None => self.timer.clear(),
        };
        set.map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }

    /// Consumes an expiry, if there is one, so the loop does not see it again. The caller then
    /// arms the timer for its next deadline.
    pub fn acknowledge(&mut self) {
        if self.timer.wait().is_ok() {
            self.armed_for = None;
        }
    }
}

impl AsRawFd for WakeTimer {
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_advanced() {
        let clock = ManualClock::new();
        assert_eq!(clock.now(), Duration::ZERO);
        clock.advance(Duration::from_millis(1500));
        assert_eq!(clock.now(), Duration::from_millis(1500));
    }

    #[test]
    fn wake_timer_fires_for_a_passed_deadline_and_is_acknowledged() {
        let clock = ManualClock::new();
        clock.advance(Duration::from_secs(5));
        let mut timer = WakeTimer::new().unwrap();
        timer.arm(&*clock, Some(Duration::from_secs(1))).unwrap();
        let mut fds = [libc::pollfd { fd: timer.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
        // SAFETY: `fds` is a valid array of one pollfd for the duration of the call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 1, 5000) };
        assert_eq!(ready, 1, "a deadline in the past fires at once");
        timer.acknowledge();
        // SAFETY: as above.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
        assert_eq!(ready, 0, "acknowledged");
        timer.arm(&*clock, None).unwrap();
    }
}
