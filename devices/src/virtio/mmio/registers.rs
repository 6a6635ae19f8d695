//! The virtio-mmio register file's layout (virtio 1.2, 4.2.2): offsets and identification
//! values. What a read or write of each register does is in the parent module.

/// Bytes of MMIO space one virtio-mmio device occupies (registers + config space).
pub const MMIO_REGION_SIZE: u64 = 0x1000;

pub(super) const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
pub(super) const MMIO_VERSION: u32 = 2;
pub(super) const VENDOR_ID: u32 = 0x5a59_4754; // "ZYGT"

// Register offsets (virtio 1.2, 4.2.2).
pub(super) const REG_MAGIC: u64 = 0x000;
pub(super) const REG_VERSION: u64 = 0x004;
pub(super) const REG_DEVICE_ID: u64 = 0x008;
pub(super) const REG_VENDOR_ID: u64 = 0x00c;
pub(super) const REG_DEVICE_FEATURES: u64 = 0x010;
pub(super) const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
pub(super) const REG_DRIVER_FEATURES: u64 = 0x020;
pub(super) const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
pub(super) const REG_QUEUE_SEL: u64 = 0x030;
pub(super) const REG_QUEUE_NUM_MAX: u64 = 0x034;
pub(super) const REG_QUEUE_NUM: u64 = 0x038;
pub(super) const REG_QUEUE_READY: u64 = 0x044;
/// Offset of QueueNotify: the VMM registers an ioeventfd here (datamatch = queue index).
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
pub(super) const REG_INTERRUPT_STATUS: u64 = 0x060;
pub(super) const REG_INTERRUPT_ACK: u64 = 0x064;
pub(super) const REG_STATUS: u64 = 0x070;
pub(super) const REG_QUEUE_DESC_LOW: u64 = 0x080;
pub(super) const REG_QUEUE_DESC_HIGH: u64 = 0x084;
pub(super) const REG_QUEUE_AVAIL_LOW: u64 = 0x090;
pub(super) const REG_QUEUE_AVAIL_HIGH: u64 = 0x094;
pub(super) const REG_QUEUE_USED_LOW: u64 = 0x0a0;
pub(super) const REG_QUEUE_USED_HIGH: u64 = 0x0a4;
pub(super) const REG_CONFIG_GENERATION: u64 = 0x0fc;
pub(super) const REG_CONFIG: u64 = 0x100;
