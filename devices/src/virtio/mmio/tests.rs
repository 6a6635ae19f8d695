//! The transport against a recording device: the driver's side of negotiation, good and bad.

use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE as ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER as DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK as DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK as FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET as NEEDS_RESET,
};
use virtio_queue::{Queue, QueueT};

use super::*;
use crate::interrupt::{DeviceInterrupt, INT_USED_RING};
use crate::persist::Persist;
use crate::virtio::VIRTIO_F_VERSION_1;

const FEATURE_X: u64 = 1 << 3;

/// Records what the transport asks of it.
#[derive(Default)]
struct Recorder {
    interrupt: Arc<DeviceInterrupt>,
    activated: Option<(Vec<Queue>, u64)>,
    notified: Vec<u16>,
    resets: usize,
}

impl VirtioDevice for Recorder {
    fn device_type(&self) -> u32 {
        2
    }
    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | FEATURE_X
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16]
    }
    fn interrupt(&self) -> &Arc<DeviceInterrupt> {
        &self.interrupt
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(offset as u8 + 0x40);
    }
    fn activate(&mut self, queues: Vec<Queue>, features: u64) -> Result<(), VirtioError> {
        self.activated = Some((queues, features));
        Ok(())
    }
    fn queue_notify(&mut self, index: u16) {
        self.notified.push(index);
    }
    fn needs_reset(&self) -> bool {
        false
    }
    fn reset(&mut self) {
        self.resets += 1;
        self.activated = None;
    }
}

fn read(t: &mut MmioTransport<Recorder>, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    t.read(offset, &mut data);
    u32::from_le_bytes(data)
}

fn write(t: &mut MmioTransport<Recorder>, offset: u64, value: u32) {
    assert_eq!(t.write(offset, &value.to_le_bytes()), None);
}

fn add_status(t: &mut MmioTransport<Recorder>, bit: u32) {
    let status = read(t, REG_STATUS);
    write(t, REG_STATUS, status | bit);
}

/// Acknowledge, driver, accept `features`, FEATURES_OK.
fn negotiate(t: &mut MmioTransport<Recorder>, features: u64) {
    add_status(t, ACKNOWLEDGE);
    add_status(t, DRIVER);
    write(t, REG_DRIVER_FEATURES_SEL, 0);
    write(t, REG_DRIVER_FEATURES, features as u32);
    write(t, REG_DRIVER_FEATURES_SEL, 1);
    write(t, REG_DRIVER_FEATURES, (features >> 32) as u32);
    add_status(t, FEATURES_OK);
}

fn setup_queue(t: &mut MmioTransport<Recorder>, size: u32) {
    write(t, REG_QUEUE_SEL, 0);
    write(t, REG_QUEUE_NUM, size);
    write(t, REG_QUEUE_DESC_LOW, 0x1000);
    write(t, REG_QUEUE_DESC_HIGH, 0x1);
    write(t, REG_QUEUE_AVAIL_LOW, 0x2000);
    write(t, REG_QUEUE_USED_LOW, 0x3000);
    write(t, REG_QUEUE_READY, 1);
}

fn live() -> MmioTransport<Recorder> {
    let mut t = MmioTransport::new(Recorder::default());
    negotiate(&mut t, VIRTIO_F_VERSION_1 | FEATURE_X);
    setup_queue(&mut t, 8);
    add_status(&mut t, DRIVER_OK);
    t
}

#[test]
fn identifies_as_a_version_2_device() {
    let mut t = MmioTransport::new(Recorder::default());
    assert_eq!(read(&mut t, REG_MAGIC), 0x7472_6976);
    assert_eq!(read(&mut t, REG_VERSION), 2);
    assert_eq!(read(&mut t, REG_DEVICE_ID), 2);
    assert_eq!(read(&mut t, REG_DEVICE_FEATURES), FEATURE_X as u32);
    write(&mut t, REG_DEVICE_FEATURES_SEL, 1);
    assert_eq!(read(&mut t, REG_DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
    assert_eq!(read(&mut t, REG_QUEUE_NUM_MAX), 16);
    write(&mut t, REG_QUEUE_SEL, 5);
    assert_eq!(read(&mut t, REG_QUEUE_NUM_MAX), 0, "no queue 5");
    let mut config = [0u8; 2];
    t.read(REG_CONFIG + 2, &mut config);
    assert_eq!(config, [0x42, 0x42]);
    let mut narrow = [0xffu8; 2];
    t.read(REG_MAGIC, &mut narrow);
    assert_eq!(narrow, [0, 0], "registers read whole or not at all");
}

#[test]
fn negotiation_activates_the_configured_queue() {
    let mut t = live();
    assert_eq!(t.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(t.last_error(), None);
    let (queues, features) = t.device().activated.as_ref().expect("activated");
    assert_eq!(*features, VIRTIO_F_VERSION_1 | FEATURE_X);
    assert_eq!((queues[0].size(), queues[0].desc_table(), queues[0].avail_ring()), (8, 0x1_0000_1000, 0x2000));
    assert_eq!(queues[0].used_ring(), 0x3000);
    write(&mut t, REG_QUEUE_NOTIFY, 0);
    write(&mut t, REG_QUEUE_NOTIFY, 7);
    assert_eq!(t.device().notified, vec![0], "a notify of a queue that does not exist is dropped");
}

#[test]
fn out_of_order_status_sets_needs_reset_not_panic() {
    let mut t = MmioTransport::new(Recorder::default());
    write(&mut t, REG_STATUS, DRIVER_OK);
    assert_eq!(t.status(), 0);
    assert!(matches!(t.last_error(), Some(VirtioError::BadStatusTransition { from: 0, to: 4 })));

    add_status(&mut t, ACKNOWLEDGE);
    add_status(&mut t, DRIVER);
    add_status(&mut t, DRIVER_OK); // skipped FEATURES_OK
    assert_eq!(t.status() & NEEDS_RESET, NEEDS_RESET);
    assert_eq!(t.device().interrupt.status() & INT_CONFIG, INT_CONFIG);
    assert!(t.device().activated.is_none());
    add_status(&mut t, FEATURES_OK);
    assert_eq!(t.status() & FEATURES_OK, 0, "nothing but a reset helps now");

    write(&mut t, REG_STATUS, 0);
    assert_eq!((t.status(), t.device().resets, t.device().interrupt.status()), (0, 1, 0));
    assert_eq!(t.last_error(), None);
}

#[test]
fn features_never_offered_or_legacy_keep_features_ok_clear() {
    for features in [VIRTIO_F_VERSION_1 | 1 << 7, FEATURE_X] {
        let mut t = MmioTransport::new(Recorder::default());
        negotiate(&mut t, features);
        assert_eq!(t.status(), ACKNOWLEDGE | DRIVER, "features {features:#x}");
        assert!(t.last_error().unwrap().to_string().contains(&format!("{features:#x}")));
    }
}

#[test]
fn late_feature_and_early_queue_writes_need_reset() {
    let mut t = MmioTransport::new(Recorder::default());
    add_status(&mut t, ACKNOWLEDGE);
    add_status(&mut t, DRIVER);
    write(&mut t, REG_QUEUE_NUM, 8); // before FEATURES_OK
    assert_eq!(t.status() & NEEDS_RESET, NEEDS_RESET);
    assert!(matches!(t.last_error(), Some(VirtioError::WriteOutOfOrder { register: 0x38, .. })));

    let mut t = MmioTransport::new(Recorder::default());
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    write(&mut t, REG_DRIVER_FEATURES, 0); // after FEATURES_OK
    assert_eq!(t.status() & NEEDS_RESET, NEEDS_RESET);

    let mut t = live();
    write(&mut t, REG_QUEUE_DESC_LOW, 0x8000); // queue is live
    assert_eq!(t.status() & NEEDS_RESET, NEEDS_RESET);
    write(&mut t, REG_QUEUE_NOTIFY, 0);
    assert!(t.device().notified.is_empty(), "a device that needs a reset serves nothing");
}

#[test]
fn bad_queue_sizes_are_refused() {
    for size in [0, 3, 12, 32, 0x1_0000, u32::MAX] {
        let mut t = MmioTransport::new(Recorder::default());
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        write(&mut t, REG_QUEUE_NUM, size);
        assert!(matches!(t.last_error(), Some(VirtioError::BadQueueSize { size: s, max: 16, .. }) if *s == size));
        assert_eq!(t.status() & NEEDS_RESET, NEEDS_RESET);
        assert_eq!(t.state().queues[0].size, 16, "size {size} was not taken");
    }
    let mut t = MmioTransport::new(Recorder::default());
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    write(&mut t, REG_QUEUE_DESC_LOW, 0x1008); // descriptor tables are 16-byte aligned
    assert!(matches!(t.last_error(), Some(VirtioError::BadQueueAddress { addr: 0x1008, .. })));
}

#[test]
fn driver_ok_without_a_ready_queue_needs_reset() {
    let mut t = MmioTransport::new(Recorder::default());
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    add_status(&mut t, DRIVER_OK);
    assert_eq!(t.status() & (NEEDS_RESET | DRIVER_OK), NEEDS_RESET);
    assert_eq!(t.last_error(), Some(&VirtioError::QueueInvalid { queue: 0 }));
}

#[test]
fn interrupt_status_is_acknowledged_bit_by_bit() {
    let mut t = live();
    t.device().interrupt.raise(INT_USED_RING | INT_CONFIG);
    assert_eq!(read(&mut t, REG_INTERRUPT_STATUS), 3);
    write(&mut t, REG_INTERRUPT_ACK, INT_USED_RING);
    assert_eq!(read(&mut t, REG_INTERRUPT_STATUS), INT_CONFIG);
}

#[test]
fn state_round_trips_through_plain_data() {
    let t = live();
    t.device().interrupt.raise(INT_USED_RING);
    let state = t.state();
    assert_eq!(state.queues[0].desc_table, 0x1_0000_1000);
    let mut restored = MmioTransport::restore(Recorder::default(), &state).unwrap();
    assert_eq!(restored.state(), state);
    assert_eq!(read(&mut restored, REG_INTERRUPT_STATUS), INT_USED_RING);
    let mut bad = state.clone();
    bad.queues[0].size = 5;
    assert!(matches!(MmioTransport::restore(Recorder::default(), &bad), Err(VirtioError::BadQueueState(_))));
}
