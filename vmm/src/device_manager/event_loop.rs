//! The event loop that serves a device's eventfds: an `event-manager` `EventManager` on its own
//! thread with one subscriber per event source (virtio-blk's io_uring completions, and its
//! queue notifications when they arrive as ioeventfds). Dropping the handle stops and joins it.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use devices::subscriber::{watch, DeviceSubscriber, EventOps, EventSet, Events, MutEventSubscriber};
use event_manager::{EventManager, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// A subscriber as the loop holds it (`Arc<Mutex<_>>`, as event-manager's own examples do).
pub type Subscriber = Arc<Mutex<dyn DeviceSubscriber>>;

/// What failed starting an event loop.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    #[error("cannot create the event manager (epoll)")]
    Create(#[source] event_manager::Error),
    #[error("cannot watch the eventfds of {what}")]
    Register {
        what: &'static str,
        #[source]
        source: event_manager::Error,
    },
    #[error("cannot create the event loop's stop eventfd")]
    StopEvent(#[source] std::io::Error),
    #[error("cannot start the {name} event loop thread")]
    Thread {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// The loop's own subscriber: `DeviceEventLoop`'s drop signals it, and the loop ends.
struct StopEvent {
    event: Arc<EventFd>,
    stopped: Arc<AtomicBool>,
    init_error: Option<event_manager::Error>,
}

impl MutEventSubscriber for StopEvent {
    fn init(&mut self, ops: &mut EventOps) {
        watch(ops, Events::new(&*self.event, EventSet::IN), &mut self.init_error);
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.event.read();
        self.stopped.store(true, Ordering::Release);
    }
}

impl DeviceSubscriber for StopEvent {
    fn take_init_error(&mut self) -> Option<event_manager::Error> {
        self.init_error.take()
    }
}

/// A running event loop; stops (after the event it is serving) and joins when dropped.
pub struct DeviceEventLoop {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for DeviceEventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceEventLoop").field("stop", &self.stop.as_raw_fd()).finish_non_exhaustive()
    }
}

fn add(
    manager: &mut EventManager<Subscriber>,
    what: &'static str,
    subscriber: Subscriber,
) -> Result<(), EventLoopError> {
    manager.add_subscriber(Arc::clone(&subscriber));
    match subscriber.lock().unwrap_or_else(|e| e.into_inner()).take_init_error() {
        Some(source) => Err(EventLoopError::Register { what, source }),
        None => Ok(()),
    }
}

impl DeviceEventLoop {
    /// Registers every `(what, subscriber)` with a new event manager and runs it on a thread
    /// called `name`. Every fd is watched before this returns.
    pub fn spawn(name: &str, subscribers: Vec<(&'static str, Subscriber)>) -> Result<Self, EventLoopError> {
        let mut manager = EventManager::<Subscriber>::new().map_err(EventLoopError::Create)?;
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(EventLoopError::StopEvent)?);
        let stopped = Arc::new(AtomicBool::new(false));
        let stop_event = StopEvent { event: Arc::clone(&stop), stopped: Arc::clone(&stopped), init_error: None };
        add(&mut manager, "the stop event", Arc::new(Mutex::new(stop_event)))?;
        for (what, subscriber) in subscribers {
            add(&mut manager, what, subscriber)?;
        }
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                crate::seccomp::thread_start(crate::seccomp::ThreadClass::EventLoop);
                while !stopped.load(Ordering::Acquire) {
                    // `run` answers 0 when a signal interrupts the wait; any other error is an
                    // epoll failure that would repeat forever.
                    if let Err(e) = manager.run() {
                        eprintln!("zygote: device event loop stopped: {e}");
                        break;
                    }
                }
            })
            .map_err(|source| EventLoopError::Thread { name: name.to_string(), source })?;
        Ok(DeviceEventLoop { stop, thread: Some(thread) })
    }
}

impl Drop for DeviceEventLoop {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// Sends the eventfd's counter on a channel each time the loop serves it.
    struct Probe {
        event: Arc<EventFd>,
        seen: mpsc::Sender<u64>,
        init_error: Option<event_manager::Error>,
    }

    impl MutEventSubscriber for Probe {
        fn init(&mut self, ops: &mut EventOps) {
            watch(ops, Events::new(&*self.event, EventSet::IN), &mut self.init_error);
        }

        fn process(&mut self, _events: Events, _ops: &mut EventOps) {
            let _ = self.seen.send(self.event.read().unwrap_or(0));
        }
    }

    impl DeviceSubscriber for Probe {
        fn take_init_error(&mut self) -> Option<event_manager::Error> {
            self.init_error.take()
        }
    }

    fn probe() -> (Arc<EventFd>, mpsc::Receiver<u64>, Subscriber) {
        let event = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let (seen, rx) = mpsc::channel();
        (Arc::clone(&event), rx, Arc::new(Mutex::new(Probe { event, seen, init_error: None })))
    }

    #[test]
    fn serves_each_subscriber_on_its_thread_and_stops_when_dropped() {
        let (a, seen_a, sub_a) = probe();
        let (b, seen_b, sub_b) = probe();
        let event_loop = DeviceEventLoop::spawn("test-loop", vec![("a", sub_a), ("b", sub_b)]).unwrap();
        a.write(3).unwrap();
        assert_eq!(seen_a.recv_timeout(Duration::from_secs(5)), Ok(3));
        b.write(1).unwrap();
        assert_eq!(seen_b.recv_timeout(Duration::from_secs(5)), Ok(1));
        drop(event_loop);
        // The loop (and with it the subscribers' senders) is gone.
        assert_eq!(seen_a.recv_timeout(Duration::from_secs(5)), Err(mpsc::RecvTimeoutError::Disconnected));
    }

    #[test]
    fn refuses_a_subscriber_whose_fd_is_already_watched() {
        let (event, _seen, first) = probe();
        let (seen, _rx) = mpsc::channel();
        let twin: Subscriber = Arc::new(Mutex::new(Probe { event, seen, init_error: None }));
        let err = DeviceEventLoop::spawn("test-loop", vec![("first", first), ("twin", twin)]).unwrap_err();
        assert!(matches!(err, EventLoopError::Register { what: "twin", .. }), "{err}");
    }
}
