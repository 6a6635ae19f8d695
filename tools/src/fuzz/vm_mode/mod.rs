//! VM mode: schedules drive real KVM VMs running the `mailbox` guest, with the DMA engine
//! (host-stepped) and virtio-blk on a scratch copy-on-write disk, through clones, clones of
//! clones, in-memory snapshots, restores, resets and drops. After every step an oracle reads
//! every paused VM's data area and every snapshot from the host and compares them with the
//! shadow model (`model`), checks the DMA engine's progress and the pages copied eagerly at a
//! clone, and at `take_dirty` that no written page is missing.
//!
//! Determinism: every VM is paused between steps. The guest writes only what a command asks
//! for and acknowledges it, DMA chunks move only when a step says so, and virtio-blk requests
//! are held from the kernel until a step completes them (a clone's re-executed requests are
//! completed at the clone step). So the checked bytes never depend on when a thread ran.

mod driver;
mod model;
mod ops;
mod steps;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use memory::{Bytes, GuestAddress, PAGE_SIZE};

use super::{pick, Violation, World};
use driver::BlkQueue;
use model::{first_diff, BlkModel, VmModel};
pub use steps::{draw_vm_step, generate_vm, VmStep};
use vmm::builder::{build_tiny_vm, VmConfig};
use vmm::device_manager::Console;
use vmm::machine::{Paused, Vmm};
use vmm::snapshot::VmSnapshot;

/// The guest-physical range every VM's oracle models byte by byte (clear of the guest's code,
/// mailbox and page tables, and of the virtio queue in `driver`).
pub const DATA_ADDR: u64 = 0x30_0000;
pub const DATA_PAGES: u8 = 24;
pub const DATA_BYTES: usize = DATA_PAGES as usize * PAGE_SIZE;
/// The scratch disk: 64 KiB.
pub const DISK_SECTORS: u64 = 128;
/// Guest RAM per VM.
const MEM_MIB: u64 = 4;
/// Live VMs at most (each has a vCPU thread, a DMA runner and a virtio-blk completion thread).
const MAX_VMS: usize = 4;

/// One VM, always paused between steps.
struct FuzzVm {
    vmm: Vmm,
    /// Taken only for the duration of a guest command.
    token: Option<Paused>,
    model: VmModel,
}

/// A snapshot and the model bytes it must keep forever.
struct SnapModel {
    snap: VmSnapshot,
    /// The VM as it was taken (a clone's model of it: the transfer in flight restarted, the
    /// requests in flight still held): a VM restored or reset from it re-executes both.
    model: VmModel,
}

/// The VMs and snapshots of one run, with their shadow models.
pub struct VmWorld {
    vms: Vec<Option<FuzzVm>>,
    snaps: Vec<SnapModel>,
    next_id: u64,
    disk: PathBuf,
}

impl Drop for VmWorld {
    fn drop(&mut self) {
        self.vms.clear();
        self.snaps.clear();
        let _ = std::fs::remove_file(&self.disk);
    }
}

impl World for VmWorld {
    type Step = VmStep;
    const MODE: &'static str = "vm";

    fn new() -> Result<Self, Violation> {
        static RUNS: AtomicU64 = AtomicU64::new(0);
        let n = RUNS.fetch_add(1, Ordering::Relaxed);
        let disk = std::env::temp_dir().join(format!("zygote-fuzz-vm-{}-{n}.img", std::process::id()));
        std::fs::write(&disk, model::initial_disk())
            .map_err(|e| Violation(format!("cannot write the scratch disk {}: {e}", disk.display())))?;
        let mut world = VmWorld { vms: Vec::new(), snaps: Vec::new(), next_id: 1, disk };
        let config = VmConfig {
            mem_mib: MEM_MIB,
            console: quiet_console(),
            disk: Some(world.disk.clone()),
            ..VmConfig::default()
        };
        let guest = vmm::guests::find("mailbox").expect("the mailbox guest is bundled");
        let mut vmm =
            build_tiny_vm(&config, guest, 0).map_err(|e| Violation(format!("cannot build the root VM: {e}")))?;
        set_host_stepped(&vmm)?;
        let queue = BlkQueue::setup(&vmm)?;
        hold_blk(&vmm, true);
        let token = pause(&mut vmm)?;
        let blk = BlkModel { queue, disk: model::initial_disk(), held: Vec::new() };
        world.vms.push(Some(FuzzVm { vmm, token: Some(token), model: VmModel::new(Some(blk)) }));
        world.check()?;
        Ok(world)
    }

    fn apply(&mut self, step: &VmStep) -> Result<(), Violation> {
        self.execute(step)?;
        self.check()
    }

    fn schedule(seed: u64, run: u64) -> Vec<VmStep> {
        generate_vm(seed, run)
    }
}

/// The guests print nothing; a captured console keeps stray output off the terminal.
fn quiet_console() -> Console {
    Console::capture().0
}

fn pause(vmm: &mut Vmm) -> Result<Paused, Violation> {
    vmm.pause().map_err(|e| Violation(format!("cannot pause VM {}: {e}", vmm.id())))
}

/// Makes the DMA engine of `vmm` move only when a step says so (clones inherit it).
fn set_host_stepped(vmm: &Vmm) -> Result<(), Violation> {
    let dma = vmm.devices().dma().ok_or_else(|| Violation(format!("VM {} has no DMA engine", vmm.id())))?;
    dma.lock().unwrap_or_else(|e| e.into_inner()).set_host_stepped(true);
    Ok(())
}

/// While held, virtio-blk pins and queues requests but does not hand them to the kernel.
fn hold_blk(vmm: &Vmm, held: bool) {
    if let Some(block) = vmm.devices().block() {
        block.lock().unwrap_or_else(|e| e.into_inner()).device().hold_submissions(held);
    }
}

/// Releases every held request of `vmm` to the kernel, waits for all, and holds again.
fn complete_blk(vmm: &Vmm) {
    if let Some(block) = vmm.devices().block() {
        let transport = block.lock().unwrap_or_else(|e| e.into_inner());
        transport.device().complete_all();
        transport.device().hold_submissions(true);
    }
}

pub(crate) use super::ensure;

impl VmWorld {
    fn live(&self) -> usize {
        self.vms.iter().flatten().count()
    }

    /// Every paused VM holds exactly its model's bytes and its DMA engine is where the model
    /// says; every snapshot still holds the bytes it was taken with.
    fn check(&self) -> Result<(), Violation> {
        let mut buf = vec![0u8; DATA_BYTES];
        for vm in self.vms.iter().flatten() {
            let id = vm.vmm.id();
            vm.vmm
                .ram()
                .read_slice(&mut buf, GuestAddress(DATA_ADDR))
                .map_err(|e| Violation(format!("VM {id}: cannot read RAM: {e}")))?;
            if let Some(at) = first_diff(&buf, &vm.model.bytes) {
                return Err(Violation(format!("VM {id} differs from the model at {at}")));
            }
            let dma = vm.vmm.devices().dma().ok_or_else(|| Violation(format!("VM {id} lost its DMA engine")))?;
            let engine = dma.lock().unwrap_or_else(|e| e.into_inner());
            ensure!(
                engine.busy() == vm.model.dma.is_some(),
                "VM {id}: DMA engine busy {} but the model has {:?}",
                engine.busy(),
                vm.model.dma
            );
            if let Some(d) = vm.model.dma {
                ensure!(
                    engine.progress() == d.done as u64,
                    "VM {id}: DMA progress {} but {} bytes were stepped",
                    engine.progress(),
                    d.done
                );
            }
        }
        for (i, s) in self.snaps.iter().enumerate() {
            s.snap
                .ram
                .read_slice(&mut buf, GuestAddress(DATA_ADDR))
                .map_err(|e| Violation(format!("snapshot {i}: cannot read: {e}")))?;
            if let Some(at) = first_diff(&buf, &s.model.bytes) {
                return Err(Violation(format!("snapshot {i} does not hold its instant's bytes at {at}")));
            }
        }
        Ok(())
    }
}
