//! The device manager: owns every device of a VM and carries them, in one loop, through build,
//! capture (clone, snapshot), restore and reset. The device kinds are listed once, in the
//! `registry!` below; adding a device is a module implementing `VmDevice` plus one line there.
//!
//! Where things are: `device.rs` the `VmDevice` trait; `persist.rs` the loops and the saved
//! state of all devices; `mmio.rs` MMIO slots, GSIs and interrupt wiring; `legacy.rs`,
//! `serial.rs`, `console.rs` the port devices; `block.rs`, `dma.rs`, `net.rs`, `rng.rs` the MMIO devices;
//! `event_loop.rs` the thread serving a device's eventfds.

pub mod block;
pub mod console;
pub mod device;
pub mod dma;
pub mod event_loop;
pub mod legacy;
pub mod mmio;
pub mod net;
pub mod net_config;
#[macro_use]
mod persist;
pub mod rng;
pub mod serial;
pub mod vmgenid;
pub mod vsock;
pub mod vsock_config;

use std::sync::{Arc, Mutex};

use devices::dma::DmaEngine;
use memory::MemoryError;

use crate::bus::{Bus, BusError};
pub use block::{BlockSlot, BlockSlotState, BlockTransport};
pub use console::Console;
pub use device::{
    AttachConfig, CaptureMode, CapturedDisk, DeviceDescription, DeviceHost, DeviceMetrics, DeviceOverrides, ResetArgs,
    RestoreArgs, RestoreReason, VmDevice,
};
pub use dma::DmaSlot;
pub use event_loop::{DeviceEventLoop, EventLoopError};
use legacy::{ControlPorts, I8042};
pub use mmio::{DeviceSpace, MmioSlot, Wiring};
pub use net::{NetSlot, NetSlotState, NetSlots};
pub use net_config::{NetConfig, NetOverride};
pub use rng::{EntropyConfig, RngSlot, RngSlotState};
pub use serial::{SerialDevice, SerialPort, SerialRegisters, SERIAL_GSI};
pub use vmgenid::VmGenIdSlot;
pub use vsock::{VsockConfig, VsockSlot, VsockSlotState};

// The one list of device kinds, in the order they are built, locked and described.
registry! {
    serial: SerialPort,
    i8042: I8042,
    control: ControlPorts,
    block: BlockSlot,
    dma: DmaSlot,
    net: NetSlots,
    rng: RngSlot,
    vsock: VsockSlot,
    vmgenid: VmGenIdSlot,
}

/// What failed building, capturing, restoring or resetting a VM's devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot create the serial interrupt eventfd")]
    IrqLine(#[source] std::io::Error),
    #[error("cannot place a device on a bus")]
    Bus(#[from] BusError),
    #[error("no MMIO slot or GSI left for {kind}")]
    NoSlot { kind: &'static str },
    #[error("cannot set up the virtio-blk disk")]
    Disk(#[from] devices::block::BlockError),
    #[error("cannot restore the virtio-mmio transport")]
    Transport(#[source] devices::virtio::VirtioError),
    #[error("cannot restore the DMA engine")]
    Dma(#[source] devices::dma::DmaError),
    #[error("{kind}: saved state is invalid: {reason}")]
    BadState { kind: &'static str, reason: String },
    #[error("cannot start a device thread")]
    Thread(#[source] std::io::Error),
    #[error("cannot create a device eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot register an irqfd on GSI {gsi}")]
    Irqfd {
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot register an ioeventfd on MMIO {addr:#x} for queue {queue}")]
    Ioeventfd {
        addr: u64,
        queue: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot start a device event loop")]
    EventLoop(#[from] EventLoopError),
    #[error("virtio-net interface {iface_id}")]
    Net {
        iface_id: String,
        #[source]
        source: devices::net::NetError,
    },
    #[error("virtio-vsock")]
    Vsock(#[from] devices::vsock::VsockError),
    #[error("{kind}: {reason}")]
    BadConfig { kind: &'static str, reason: String },
    #[error("saved devices do not match: {0}")]
    Mismatch(String),
    #[error("cannot give the VM a new generation ID")]
    VmGenId(#[from] crate::acpi::vmgenid::VmGenIdError),
    #[error("cannot reset the RAM with the devices")]
    Ram(#[source] MemoryError),
    #[error("virtio-rng")]
    Rng(#[source] devices::rng::RngError),
}

/// Every device of a VM and the buses they sit on.
pub struct DeviceManager {
    // Field order: the devices (and their threads) go before the buses' last references.
    devices: Devices,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
}

impl std::fmt::Debug for DeviceManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceManager").field("devices", &self.devices.descriptions()).finish_non_exhaustive()
    }
}

impl DeviceManager {
    fn from_space(devices: Devices, space: DeviceSpace) -> DeviceManager {
        DeviceManager { devices, pio: Arc::new(space.pio), mmio: Arc::new(space.mmio) }
    }

    /// The devices a fresh VM gets, on `host`, as `config` asks.
    pub fn attach(host: &DeviceHost, config: &AttachConfig) -> Result<DeviceManager, DeviceError> {
        let mut space = DeviceSpace::default();
        let devices = Devices::attach(&mut space, host, config)?;
        Ok(DeviceManager::from_space(devices, space))
    }

    /// Refuses a saved state `args` cannot restore, before anything is built.
    pub fn check_saved(state: &DevicesState, args: &RestoreArgs) -> Result<(), DeviceError> {
        Devices::check_saved(state, args)
    }

    /// The devices of `state`, rebuilt on `args.host` (a clone or a restored snapshot): every
    /// request and transfer in flight at the capture instant is started again against the
    /// VM's own RAM and disk. `state` is checked first.
    pub fn restore(state: &DevicesState, mut args: RestoreArgs) -> Result<DeviceManager, DeviceError> {
        Devices::check_saved(state, &args)?;
        let mut space = DeviceSpace::default();
        let devices = Devices::restore(&mut space, state, &mut args)?;
        if args.disk.is_some() {
            return Err(DeviceError::Mismatch("the saved state has no virtio-blk, the snapshot has a disk".into()));
        }
        if args.overrides.vsock_uds_path.is_some() && state.vsock.is_none() {
            return Err(DeviceError::Mismatch("vsock_override: the saved VM has no vsock device".into()));
        }
        Ok(DeviceManager::from_space(devices, space))
    }

    /// Saves every device, takes what `mode` asks of their host resources, and runs
    /// `freeze_ram` at one instant with respect to all of them: every device is locked
    /// across the whole capture and `freeze_ram`, so no request completes in between.
    pub fn capture<R>(
        &self,
        mode: CaptureMode,
        freeze_ram: impl FnOnce() -> R,
    ) -> Result<(DevicesState, Option<CapturedDisk>, R), DeviceError> {
        self.devices.capture(mode, freeze_ram)
    }

    /// Brings every device back to `state` (and the disk to `args.disk`) at one instant with
    /// `reset_ram`: with every device locked runs `reset_ram` (refused while anything is
    /// pinned, which covers every DMA transfer and data request in flight); if it fails
    /// nothing has changed and `DeviceError::Ram` says why. Then restores each device and
    /// re-executes what was in flight in `state`. A state for other devices is refused
    /// before anything changes.
    pub fn reset(
        &self,
        state: &DevicesState,
        args: &ResetArgs,
        reset_ram: impl FnOnce() -> Result<(), MemoryError>,
    ) -> Result<(), DeviceError> {
        self.devices.reset(state, args, || reset_ram().map_err(DeviceError::Ram))
    }

    /// Where the guest finds each device, in registry order.
    pub fn descriptions(&self) -> Vec<DeviceDescription> {
        self.devices.descriptions()
    }

    /// Signals every device's interrupt again whose status has a bit set (`VmDevice::
    /// resend_interrupt`): for a restored VM, once its vCPUs' state is restored.
    pub fn resend_interrupts(&self) {
        self.devices.resend_interrupts();
    }

    /// Every device's counters, in registry order (devices that keep none left out).
    pub fn metrics(&self) -> Vec<DeviceMetrics> {
        self.devices.metrics()
    }

    /// The port-I/O and MMIO buses.
    pub fn buses(&self) -> (&Arc<Bus>, &Arc<Bus>) {
        (&self.pio, &self.mmio)
    }

    /// COM1.
    pub fn serial(&self) -> Option<&Arc<Mutex<SerialDevice>>> {
        self.devices.serial.as_ref().map(|s| &s.device)
    }

    /// virtio-blk's transport, if the VM has a disk.
    pub fn block(&self) -> Option<&BlockTransport> {
        self.devices.block.as_ref().map(|b| &b.transport)
    }

    /// The virtio-net interfaces, in the order configured (empty without any).
    pub fn net(&self) -> &[NetSlot] {
        self.devices.net.as_ref().map_or(&[], |n| n.interfaces.as_slice())
    }

    /// virtio-rng, if the VM has one.
    pub fn rng(&self) -> Option<&RngSlot> {
        self.devices.rng.as_ref()
    }

    /// The vsock device, if the VM has one.
    pub fn vsock(&self) -> Option<&VsockSlot> {
        self.devices.vsock.as_ref()
    }

    /// The VM generation ID, if the VM has one.
    pub fn vmgenid(&self) -> Option<&VmGenIdSlot> {
        self.devices.vmgenid.as_ref()
    }

    /// A clone, restored or reset VM is a new generation: a fresh generation ID and its
    /// interrupt on `vm`, this VM's (nothing without the device). Call once the vCPUs and
    /// irqchip are restored.
    pub fn new_generation(&self, vm: &kvm_ioctls::VmFd) -> Result<(), DeviceError> {
        self.vmgenid().map_or(Ok(()), |device| device.new_generation(vm))
    }

    /// The DMA test engine.
    pub fn dma(&self) -> Option<&Arc<Mutex<DmaEngine>>> {
        self.devices.dma.as_ref().map(|d| &d.engine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{DMA_ENGINE_MMIO_ADDR, VIRTIO_BLK_MMIO_ADDR};
    use memory::GuestRam;

    #[test]
    fn devices_answer_at_their_addresses() {
        let ram = Arc::new(GuestRam::new(&[(memory::GuestAddress(0), 1 << 20)]).unwrap());
        let file = std::env::temp_dir().join(format!("zygote-mmio-{}", std::process::id()));
        std::fs::write(&file, vec![0u8; 4096]).unwrap();
        let console = Console::capture().0;
        let host = DeviceHost { ram: &ram, wiring: Wiring::Polled, console: &console };
        let devices =
            DeviceManager::attach(&host, &AttachConfig { disk: Some(file.clone()), ..AttachConfig::default() })
                .unwrap();
        std::fs::remove_file(&file).unwrap();
        let mmio = devices.buses().1;
        let mut word = [0u8; 4];
        assert!(mmio.read(VIRTIO_BLK_MMIO_ADDR, &mut word));
        assert_eq!(&word, b"virt");
        assert!(mmio.read(VIRTIO_BLK_MMIO_ADDR + 8, &mut word));
        assert_eq!(u32::from_le_bytes(word), 2, "block device id");
        assert!(mmio.read(DMA_ENGINE_MMIO_ADDR, &mut word));
        assert_eq!(&word, b"DMAE");
        let kinds: Vec<_> = devices.descriptions().iter().map(|d| d.kind).collect();
        assert_eq!(kinds, ["serial", "i8042", "control-ports", "virtio-blk", "dma-engine"]);
    }

    #[test]
    fn a_saved_state_round_trips_and_names_each_kind() {
        let ram = Arc::new(GuestRam::new(&[(memory::GuestAddress(0), 1 << 20)]).unwrap());
        let console = Console::capture().0;
        let host = DeviceHost { ram: &ram, wiring: Wiring::Polled, console: &console };
        let devices = DeviceManager::attach(&host, &AttachConfig::default()).unwrap();
        let (state, disk, ()) = devices.capture(CaptureMode::Clone, || ()).unwrap();
        assert!(disk.is_none() && state.block.is_none() && state.dma.is_some() && state.serial.is_some());
        let json = serde_json::to_string(&state).unwrap();
        assert_eq!(serde_json::from_str::<DevicesState>(&json).unwrap(), state);
        let args =
            RestoreArgs { reason: RestoreReason::Clone, overrides: DeviceOverrides::default(), host, disk: None };
        let restored = DeviceManager::restore(&state, args).unwrap();
        assert_eq!(restored.capture(CaptureMode::Leave, || ()).unwrap().0, state);
        // A reset to a state without a device the VM has changes nothing and says which.
        let without_serial = DevicesState { serial: None, ..state.clone() };
        let mut ram_reset = false;
        let reset_ram = || {
            ram_reset = true;
            Ok(())
        };
        let err = restored.reset(&without_serial, &ResetArgs::default(), reset_ram).unwrap_err();
        assert!(!ram_reset, "the RAM was reset before the mismatch was found");
        assert!(err.to_string().contains("serial"), "{err}");
    }
}
