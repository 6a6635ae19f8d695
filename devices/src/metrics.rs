//! Device counters for the metrics (`PUT /metrics`), as Firecracker's users read them: each
//! device keeps its counters in a struct of atomics, cumulative since the device was built,
//! that its threads bump without a lock and the API thread reads without one. A device's
//! counters are one `device_counters!` struct, a field on the device bumped where the event
//! happens, and the device manager's `VmDevice::metrics` naming its group.
//!
//! Names follow Firecracker's `block`, `uart`, `entropy` groups where it has the counter; the DMA
//! engine (Zygote's own) has its own group.

use std::sync::atomic::{AtomicU64, Ordering};

/// A device's counters, read as (name, value) pairs in declaration order.
pub trait Counters: Send + Sync {
    fn values(&self) -> Vec<(&'static str, u64)>;
}

/// Adds `n` to `counter` (wrapping: a counter of 2^64 events wraps as Firecracker's do).
pub fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// Declares a struct of `AtomicU64` counters implementing `Counters`.
#[macro_export]
macro_rules! device_counters {
    ($(#[$doc:meta])* $vis:vis struct $name:ident { $($(#[$fdoc:meta])* $field:ident),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Default)]
        $vis struct $name {
            $($(#[$fdoc])* pub $field: std::sync::atomic::AtomicU64,)+
        }

        impl $crate::metrics::Counters for $name {
            fn values(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($field), self.$field.load(std::sync::atomic::Ordering::Relaxed)),)+]
            }
        }
    };
}

device_counters! {
    /// virtio-blk (Firecracker's `block` group): requests completed, by kind, and their bytes.
    pub struct BlockMetrics {
        /// IN requests completed successfully.
        read_count,
        read_bytes,
        /// OUT requests completed successfully.
        write_count,
        write_bytes,
        flush_count,
        /// GET_ID requests answered.
        get_id_count,
        /// Requests the driver made wrong (bad descriptors, unsupported types): answered with
        /// an error status without touching the disk.
        invalid_reqs_count,
        /// Requests whose disk I/O failed (IOERR).
        execute_fails,
    }
}

device_counters! {
    /// The DMA test engine (Zygote's `dma_engine` group).
    pub struct DmaMetrics {
        /// Transfers the guest (or a restore) started.
        transfers_started,
        /// Transfers that wrote their last byte.
        transfers_done,
        /// Transfers that ended in error.
        transfer_fails,
        /// Bytes written into guest RAM.
        bytes_written,
    }
}

device_counters! {
    /// The 16550 UART (Firecracker's `uart` group), fed by vm-superio's serial events.
    pub struct UartMetrics {
        /// Bytes the guest read from the receive FIFO.
        read_count,
        /// Bytes written to the console.
        write_count,
        /// Bytes the console failed to take.
        missed_write_count,
    }
}

device_counters! {
    /// virtio-rng (Firecracker's `entropy` group).
    pub struct EntropyMetrics {
        /// Times the driver's activation was refused (a queue outside RAM).
        activate_fails,
        /// Queue notifications served.
        entropy_event_count,
        /// Requests answered with nothing (a malformed chain, a buffer that could not be
        /// pinned, or a failed getrandom).
        entropy_event_fails,
        /// Bytes of entropy written into guest buffers.
        entropy_bytes,
        /// Requests the host's getrandom failed for.
        host_rng_fails,
        /// Times the rate limit put a request back.
        entropy_rate_limiter_throttled,
        /// Rate-limit timer wake-ups served.
        rate_limiter_event_count,
    }
}

impl vm_superio::serial::SerialEvents for UartMetrics {
    fn buffer_read(&self) {
        bump(&self.read_count, 1);
    }

    fn out_byte(&self) {
        bump(&self.write_count, 1);
    }

    fn tx_lost_byte(&self) {
        bump(&self.missed_write_count, 1);
    }

    fn in_buffer_empty(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_read_in_declaration_order() {
        let block = BlockMetrics::default();
        bump(&block.read_count, 1);
        bump(&block.read_bytes, 4096);
        bump(&block.read_bytes, 512);
        let values = block.values();
        assert_eq!(values[..3], [("read_count", 1), ("read_bytes", 4608), ("write_count", 0)]);
        assert_eq!(values.len(), 8);
    }
}
