//! The API's HTTP request parser and router on arbitrary client bytes: whatever arrives on a
//! connection is read as requests (pipelined, with bodies) and each one is routed on an empty
//! server; any input must get an answer or an HTTP error, never a panic, hang or unbounded
//! allocation. Requests that would touch the host outside the process (files named by
//! /logger, /metrics and /snapshot/*, the kernel InstanceStart boots) are parsed but not
//! routed. Seeds: `seeds/api_request/` (Firecracker client requests).
#![no_main]

use std::io::Write;
use std::os::unix::net::UnixStream;

use libfuzzer_sys::fuzz_target;
use vmm::api::http::Connection;
use vmm::api::requests::{Action, ActionType};
use vmm::api::routes::route;
use vmm::api::telemetry::Telemetry;
use vmm::api::Controller;

/// More than this is not written at once into the socket (its buffer would fill).
const MAX_INPUT: usize = 64 << 10;

/// Whether routing `method path body` would reach files or a kernel outside the process.
fn touches_the_host(path: &str, body: &[u8]) -> bool {
    let path = path.split('?').next().unwrap_or_default();
    if ["/logger", "/metrics", "/snapshot/create", "/snapshot/load"].contains(&path) {
        return true;
    }
    path == "/actions"
        && serde_json::from_slice::<Action>(body).is_ok_and(|a| matches!(a.action_type, ActionType::InstanceStart))
}

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_INPUT {
        return;
    }
    let (mut client, server) = UnixStream::pair().expect("a socket pair");
    client.write_all(data).expect("the input fits the socket buffer");
    client.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut connection = Connection::new(server);
    let (mut controller, mut telemetry) = (Controller::empty(), Telemetry::default());
    while let Ok(Some(request)) = connection.read_request() {
        if touches_the_host(&request.url, &request.body) {
            continue;
        }
        let reply = route(&mut controller, &mut telemetry, &request.method, &request.url, &request.body);
        assert!(reply.status >= 200 && reply.status < 600, "status {}", reply.status);
        if reply.shutdown {
            break;
        }
    }
});
