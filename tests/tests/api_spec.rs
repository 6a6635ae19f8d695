//! docs/openapi.yaml tells the truth: every route the server has is in it, every path and
//! method in it is served (the live server answers none of them "Invalid request method and/or
//! path"), and Firecracker's endpoints Zygote refuses are marked so.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};

use vmm::api::client::call;
use vmm::api::routes::{matches, REFUSED, ROUTES};
use zygote_tests::{scratch_dir, wait_for_api_socket, zygote_bin};

const METHODS: &[&str] = &["get", "put", "patch", "post", "delete"];

/// (METHOD, path) of every operation in the spec, and the paths marked `x-zygote-refused`.
fn spec() -> (BTreeSet<(String, String)>, BTreeSet<String>) {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.yaml")).unwrap();
    let (mut operations, mut refused) = (BTreeSet::new(), BTreeSet::new());
    let mut in_paths = false;
    let mut path: Option<String> = None;
    for line in text.lines() {
        if !line.starts_with(' ') && !line.is_empty() && !line.starts_with('#') {
            in_paths = line == "paths:";
            continue;
        }
        if !in_paths {
            continue;
        }
        if let Some(p) = line.strip_prefix("  /").and_then(|l| l.strip_suffix(':')) {
            path = Some(format!("/{p}"));
        } else if let (Some(p), Some(rest)) = (&path, line.strip_prefix("    ")) {
            let key = rest.split(':').next().unwrap_or("");
            if METHODS.contains(&key) {
                operations.insert((key.to_uppercase(), p.clone()));
            } else if key == "x-zygote-refused" {
                refused.insert(p.clone());
            }
        }
    }
    (operations, refused)
}

#[test]
fn every_route_is_in_the_spec_and_every_spec_path_is_served() {
    let (operations, refused) = spec();
    assert!(operations.len() > 20, "{operations:?}");
    for (method, path) in ROUTES {
        assert!(
            operations.contains(&(method.to_string(), path.to_string())),
            "{method} {path} is not in docs/openapi.yaml"
        );
    }
    let refused_routes: BTreeSet<String> = REFUSED.iter().map(|p| p.to_string()).collect();
    assert_eq!(refused, refused_routes, "the spec's refused paths and the server's differ");
    for (method, path) in &operations {
        let served = ROUTES.contains(&(method.as_str(), path.as_str()));
        assert!(served || refused.contains(path), "{method} {path} is in the spec but not served");
    }

    // The live server agrees: nothing in the spec is an unknown route to it.
    let socket = scratch_dir("api-spec").join("api.sock");
    let mut child = Command::new(zygote_bin())
        .args(["run", "--api-sock"])
        .arg(&socket)
        .stdout(Stdio::null())
        .spawn()
        .expect("spawning zygote run");
    wait_for_api_socket(&socket);
    for (method, path) in &operations {
        // A path parameter filled in; bodies empty (each is refused or answered, never routed away).
        let url = path.replace("{drive_id}", "d").replace("{iface_id}", "eth0").replace("{id}", "p");
        let mut templates = ROUTES.iter().map(|(_, t)| *t).chain(REFUSED.iter().copied());
        assert!(templates.any(|t| matches(t, &url)), "{url} matches no route");
        if method == "PUT" && url == "/actions" {
            continue; // an empty body is a bad action either way; Shutdown would stop the server
        }
        let response = call(&socket, method, &url, Some("")).expect("API call");
        assert!(!response.body.contains("Invalid request method and/or path"), "{method} {url}: {}", response.body);
        if refused.contains(path) {
            assert_eq!(response.status, 400, "{method} {url}: {response:?}");
            assert!(response.body.contains("not supported by Zygote"), "{method} {url}: {}", response.body);
        }
    }
    let unknown = call(&socket, "DELETE", "/vm", None).unwrap();
    assert!(unknown.body.contains("Invalid request method and/or path"), "{unknown:?}");
    let _ = child.kill();
    let _ = child.wait();
}
