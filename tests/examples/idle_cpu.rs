//! What paused VMs cost the host CPU: builds a `spin` VM through the vmm library, clones it
//! `--vms` - 1 times (clones start paused, as API clones do), pauses it too, then reads the
//! process's utime + stime from /proc/self/stat over `--seconds` and prints one JSON line.
//! `--disk` gives every VM a virtio-blk disk (and with it an event-loop thread).
//!
//! cargo run -p zygote-tests --example idle_cpu -- [--vms 300] [--seconds 10] [--disk]
//!
//! Issue 15's target: 300 paused VMs use < 1 % of a CPU.

use std::time::{Duration, Instant};

use memory::GuestAddress;
use vmm::clone::clone_vm;
use vmm::layout::VM_ID_ADDR;
use vmm::{Console, VmConfig};

/// utime + stime of this process, in seconds.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("reading /proc/self/stat");
    // Fields after the command name (which may hold spaces) start at field 3; utime and stime
    // are fields 14 and 15.
    let after_comm = &stat[stat.rfind(')').expect("stat has the command in parentheses") + 2..];
    let fields: Vec<&str> = after_comm.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf reads a constant and touches no memory of ours.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks as f64 / hz as f64
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, Iterator::count)
}

fn main() {
    let (mut vms, mut seconds, mut disk) = (300u64, 10u64, false);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--vms" => vms = args.next().and_then(|v| v.parse().ok()).filter(|&v| v >= 1).expect("--vms N (N >= 1)"),
            "--seconds" => {
                seconds = args.next().and_then(|v| v.parse().ok()).filter(|&v| v >= 1).expect("--seconds S (S >= 1)")
            }
            "--disk" => disk = true,
            other => panic!("unknown argument {other:?}; expected --vms N, --seconds S, --disk"),
        }
    }
    let disk_file = disk.then(|| {
        let path = std::env::temp_dir().join(format!("zygote-idle-cpu-{}.img", std::process::id()));
        std::fs::write(&path, vec![0u8; 1 << 20]).expect("writing the test disk");
        path
    });
    let (console, _out) = Console::capture();
    let config = VmConfig { vm_id: 0, console: console.clone(), disk: disk_file.clone(), ..VmConfig::default() };
    let spin = vmm::guests::find("spin").expect("spin is bundled");
    let mut source = vmm::build_tiny_vm(&config, spin, 0).expect("building VM 0");
    source.start();
    let build_start = Instant::now();
    let mut clones = Vec::new();
    for id in 1..vms {
        let (clone, _) = clone_vm(&mut source, id, &console, Some(GuestAddress(VM_ID_ADDR))).expect("cloning VM 0");
        clones.push(clone);
    }
    let _paused = source.pause().expect("pausing VM 0");
    let built_s = build_start.elapsed().as_secs_f64();

    let before = cpu_seconds();
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    let cpu = cpu_seconds() - before;
    let wall = start.elapsed().as_secs_f64();
    println!(
        "{{\"vms\":{vms},\"disk\":{disk},\"threads\":{},\"seconds\":{wall:.2},\"cpu_seconds\":{cpu:.3},\"cpu_percent\":{:.3},\"clone_seconds\":{built_s:.2}}}",
        threads(),
        100.0 * cpu / wall
    );
    drop(clones);
    drop(source);
    if let Some(path) = disk_file {
        let _ = std::fs::remove_file(path);
    }
}
