//! `zygote ctl`: the control API's calls from the command line.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::{report, EXIT_BAD_INPUT, EXIT_FAILURE};

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The API socket of the `zygote run` to control.
    #[arg(long, value_name = "PATH")]
    api_sock: PathBuf,
    #[command(subcommand)]
    verb: CtlVerb,
}

#[derive(Debug, Subcommand)]
enum CtlVerb {
    /// Show one VM (GET /).
    Info {
        #[arg(long)]
        vm: Option<u64>,
    },
    /// Show the clone tree (GET /vms).
    Vms,
    /// Pause a VM (PATCH /vm).
    Pause {
        #[arg(long)]
        vm: Option<u64>,
    },
    /// Resume a VM (PATCH /vm).
    Resume {
        #[arg(long)]
        vm: Option<u64>,
    },
    /// Clone a VM (PUT /clone); prints the new id and the clone report.
    Clone {
        #[arg(long)]
        vm: Option<u64>,
    },
    /// Write a snapshot (PUT /snapshot/create).
    SnapshotCreate {
        #[arg(long, value_name = "FILE")]
        path: PathBuf,
        #[arg(long, value_name = "DIR")]
        mem_dir: Option<PathBuf>,
        /// Only the pages changed since this VM's previous snapshot.
        #[arg(long)]
        diff: bool,
        #[arg(long)]
        vm: Option<u64>,
    },
    /// Restore a snapshot as a new VM (PUT /snapshot/load).
    SnapshotLoad {
        #[arg(long, value_name = "FILE")]
        path: PathBuf,
        #[arg(long)]
        resume: bool,
    },
    /// Reset a VM to the snapshot it came from (PUT /reset).
    Reset {
        #[arg(long)]
        vm: Option<u64>,
        /// Wait up to this long for DMA pins instead of refusing.
        #[arg(long, value_name = "MS")]
        wait_ms: Option<u64>,
    },
    /// Stop every VM and the server (PUT /actions Shutdown).
    Shutdown,
}

fn vm_body(vm: Option<u64>) -> serde_json::Value {
    vm.map_or(serde_json::json!({}), |id| serde_json::json!({ "vm_id": id }))
}

pub(super) fn ctl(args: CtlArgs) -> i32 {
    use serde_json::json;
    let (method, path, body) = match args.verb {
        CtlVerb::Info { vm } => ("GET", vm.map_or("/".to_string(), |id| format!("/?vm_id={id}")), None),
        CtlVerb::Vms => ("GET", "/vms".into(), None),
        CtlVerb::Pause { vm } => {
            let mut body = vm_body(vm);
            body["state"] = json!("Paused");
            ("PATCH", "/vm".into(), Some(body))
        }
        CtlVerb::Resume { vm } => {
            let mut body = vm_body(vm);
            body["state"] = json!("Resumed");
            ("PATCH", "/vm".into(), Some(body))
        }
        CtlVerb::Clone { vm } => ("PUT", "/clone".into(), Some(vm_body(vm))),
        CtlVerb::SnapshotCreate { path, mem_dir, diff, vm } => {
            let mut body = vm_body(vm);
            body["snapshot_path"] = json!(path);
            if let Some(dir) = mem_dir {
                body["mem_dir"] = json!(dir);
            }
            body["snapshot_type"] = json!(if diff { "Diff" } else { "Full" });
            ("PUT", "/snapshot/create".into(), Some(body))
        }
        CtlVerb::SnapshotLoad { path, resume } => {
            ("PUT", "/snapshot/load".into(), Some(json!({ "snapshot_path": path, "resume_vm": resume })))
        }
        CtlVerb::Reset { vm, wait_ms } => {
            let mut body = vm_body(vm);
            if let Some(ms) = wait_ms {
                body["wait_for_pins_ms"] = json!(ms);
            }
            ("PUT", "/reset".into(), Some(body))
        }
        CtlVerb::Shutdown => ("PUT", "/actions".into(), Some(json!({ "action_type": "Shutdown" }))),
    };
    let body = body.map(|b| b.to_string());
    match crate::api::client::call(&args.api_sock, method, &path, body.as_deref()) {
        Ok(response) if response.is_success() => {
            // 204 No Content (Firecracker's success answer) prints `{}`: ctl's output is JSON.
            println!("{}", if response.body.is_empty() { "{}" } else { response.body.as_str() });
            0
        }
        Ok(response) => {
            eprintln!("zygote: HTTP {}: {}", response.status, response.body);
            // A 4xx is the request's fault (bad JSON, unknown VM id, refused snapshot): the same
            // exit code as bad input on the command line. A 5xx is the VMM's failure.
            if (400..500).contains(&response.status) {
                EXIT_BAD_INPUT
            } else {
                EXIT_FAILURE
            }
        }
        Err(e) => {
            eprintln!("{}", report(&e));
            EXIT_FAILURE
        }
    }
}
