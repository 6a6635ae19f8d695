//! The report's claims (each a ratio against its same-run reference) and their text forms.

use std::fmt::Write;

use vmm::clone::ClonePath;

use super::{Entry, Report};

/// `measured / reference`, with a target the ratio must not exceed.
fn ratio(key: &'static str, measured: (f64, String), reference: (f64, String), target: f64) -> Entry {
    let value = measured.0 / reference.0;
    Entry {
        key,
        value,
        unit: "x",
        measured: measured.0,
        measured_what: measured.1,
        reference: reference.0,
        reference_what: reference.1,
        target,
        met: value <= target,
    }
}

/// The claims of `report`, in the order.
pub(super) fn entries(r: &Report) -> Vec<Entry> {
    let precopy = r.clone.paths.iter().find(|p| p.path == ClonePath::Precopy).unwrap_or(&r.clone.paths[0]);
    let ram = |mib| r.by_ram.iter().find(|s| s.mem_mib == mib).map_or(f64::NAN, |s| s.pause_us_p50 as f64);
    let fleet = &r.fleet;
    let last = fleet.points.last();
    let at_300 = fleet.points.iter().find(|p| p.vms > 300).or(last);
    let mut out = vec![
        ratio(
            "clone_pause_vs_fork",
            (precopy.pause_us_p50 as f64, format!("clone pause p50 (1 GiB, {} pages dirty), us", r.clone.dirty_pages)),
            (r.fork_us_p50, "fork() of this process holding 1 GiB of populated anonymous memory, p50, us".into()),
            1.0,
        ),
        ratio(
            "clone_8g_vs_1g",
            (ram(8192), format!("clone pause p50, 8 GiB, {} pages dirty, us", r.clone.dirty_pages)),
            (ram(1024), "the same, 1 GiB, us".into()),
            1.5,
        ),
        ratio(
            "first_write_vs_anon_fault",
            (r.first_write.clone_first_write_ns, "first write into a clone's page, ns".into()),
            (r.first_write.anon_fault_ns, "first write into an anonymous page, ns".into()),
            1.2,
        ),
        ratio(
            "reset_vs_floor",
            (r.reset.reset_us_p50, format!("reset p50 ({} dirty pages), us", r.reset.dirty_pages)),
            (r.reset.memcpy_us + r.reset.kvm_run_us, "memcpy of the dirty pages + one KVM_RUN, us".into()),
            1.5,
        ),
    ];
    if let Some(p) = last {
        out.push(ratio(
            "pss_vs_ideal",
            (p.pss_kib as f64, format!("Pss with {} VMs (each wrote 1 % of 64 MiB), KiB", p.vms)),
            (p.ideal_kib as f64, "Pss before the clones + every clone's own pages, KiB".into()),
            1.1,
        ));
    }
    out.push(ratio(
        "diff_snapshot_vs_write_floor",
        (r.snapshot.diff_call_us_p50, format!("Diff snapshot call p50 ({} dirty pages), us", r.snapshot.dirty_pages)),
        (r.snapshot.write_floor_us_p50, "writing those pages to a sparse file + fsync, us".into()),
        2.0,
    ));
    if let Some(p) = at_300 {
        out.push(Entry {
            key: "idle_cpu_paused",
            value: p.idle_cpu_percent,
            unit: "%",
            measured: p.idle_cpu_percent,
            measured_what: format!("CPU of the process with {} paused VMs, % of one CPU", p.vms),
            reference: fleet.idle_window_s,
            reference_what: "window, s".into(),
            target: 1.0,
            met: p.idle_cpu_percent < 1.0,
        });
    }
    if let Some(p) = last {
        out.push(Entry {
            key: "vms_list_ms_1000",
            value: p.vms_list_ms,
            unit: "ms",
            measured: p.vms_list_ms,
            measured_what: format!("GET /vms p50 with {} VMs, ms", p.vms),
            reference: p.vms as f64,
            reference_what: "VMs listed".into(),
            target: 100.0,
            met: p.vms_list_ms < 100.0,
        });
    }
    if let Some(p) = &r.restore_peer {
        out.push(ratio(
            "restore_vs_qemu",
            (p.zygote_ms_p50, "zygote run --restore: spawn to the guest's first line, p50, ms".into()),
            (p.qemu_ms_p50, format!("{} -incoming + cont: the same, p50, ms", p.qemu_version)),
            1.0,
        ));
    }
    out.push(ratio(
        "clone_busy_vs_idle",
        (fleet.clone_busy_ms_p50, format!("PUT /clone p50 with {} clones running, ms", fleet.busy)),
        (fleet.clone_idle_ms_p50, "PUT /clone p50 with none running, ms".into()),
        2.0,
    ));
    out
}

/// The claims as a plain-text table.
pub fn table(report: &Report) -> String {
    let mut s = format!(
        "{:<30} {:>10} {:>7}  {:>12}  {:>12}  {}\n",
        "claim", "value", "target", "measured", "reference", "what"
    );
    for e in &report.entries {
        let _ = writeln!(
            s,
            "{:<30} {:>9.3}{:<1} {:>7}  {:>12.1}  {:>12.1}  {} / {}{}",
            e.key,
            e.value,
            e.unit,
            format!("{}{}", e.target, e.unit),
            e.measured,
            e.reference,
            e.measured_what,
            e.reference_what,
            if e.met { "" } else { "  (target missed)" }
        );
    }
    let _ = writeln!(s, "took {:.0} s{}", report.took_s, if report.quick { " (--quick)" } else { "" });
    s
}

/// The markdown summary, linking `plots` (file names in the same directory).
pub fn markdown(report: &Report, plots: &[(String, String)]) -> String {
    let mut s = String::from("# Zygote benchmark report\n\n");
    let _ = writeln!(
        s,
        "`zygote bench report{}` on `{}`, {:.0} s. Every ratio is against a reference measured in the same run.\n",
        if report.quick { " --quick" } else { "" },
        report.host,
        report.took_s
    );
    s.push_str("| claim | value | target | measured | reference |\n|---|---|---|---|---|\n");
    for e in &report.entries {
        let _ = writeln!(
            s,
            "| `{}` | {:.3}{} {} | {}{} | {:.1} ({}) | {:.1} ({}) |",
            e.key,
            e.value,
            e.unit,
            if e.met { "" } else { "**missed**" },
            e.target,
            e.unit,
            e.measured,
            e.measured_what,
            e.reference,
            e.reference_what
        );
    }
    s.push_str("\n## Limits with the fleet held\n\n| limit | used | limit |\n|---|---|---|\n");
    for l in &report.fleet.limits {
        let _ = writeln!(s, "| {} | {} | {} |", l.name, l.used, l.limit);
    }
    s.push('\n');
    for (file, title) in plots {
        let _ = writeln!(s, "### {title}\n\n![{title}]({file})\n");
    }
    s
}
