//! The API stays live whatever one client does (#11.6): a client that stalls mid-request or
//! announces a huge body affects only itself. No test here races a thread: a stalled client
//! is a socket that never finishes its request, held open while other clients are served.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use vmm::api::client::call;
use zygote_tests::{scratch_dir, SpinServer};

/// What these tests do with a server: stall clients on it and check it still answers.
trait Liveness {
    fn stalled(&self, bytes: &[u8]) -> UnixStream;
    fn assert_served(&self);
}

impl Liveness for SpinServer {
    /// A raw connection that has sent `bytes` and says no more.
    fn stalled(&self, bytes: &[u8]) -> UnixStream {
        let mut stream = UnixStream::connect(&self.socket).expect("connecting");
        stream.write_all(bytes).expect("sending the start of a request");
        stream
    }

    /// `GET /` answers while other clients stall.
    fn assert_served(&self) {
        let response = call(&self.socket, "GET", "/", None).expect("GET /");
        assert_eq!(response.status, 200, "{response:?}");
        assert!(response.body.contains("\"state\":\"Running\""), "{}", response.body);
    }
}

/// Everything the server sends on `stream` until it closes it.
fn answer(mut stream: UnixStream) -> String {
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("reading the answer");
    text
}

#[test]
fn stalled_clients_affect_only_themselves() {
    let api = SpinServer::start(scratch_dir("api-stalled"));
    // One stalled in its body (100 kB announced, 1 byte sent), one in its headers, one
    // connected and silent, one chunked: each held open while others are served.
    let body = api.stalled(b"PUT /clone HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{");
    let headers = api.stalled(b"PATCH /vm HTTP/1.1\r\nContent-Le");
    let silent = api.stalled(b"");
    let chunked = api.stalled(b"PUT /clone HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"vm");
    for _ in 0..3 {
        api.assert_served();
    }
    // Ten clients at once, each with its own request, all answered while the others stall.
    let clients: Vec<_> = (0..10)
        .map(|_| {
            let socket = api.socket.clone();
            std::thread::spawn(move || call(&socket, "GET", "/vms", None).expect("GET /vms").status)
        })
        .collect();
    for client in clients {
        assert_eq!(client.join().unwrap(), 200);
    }
    // A chunked body is refused at once (Firecracker's clients send Content-Length).
    let refused = answer(chunked);
    assert!(refused.starts_with("HTTP/1.1 411 "), "{refused}");
    assert!(refused.contains("fault_message"), "{refused}");
    // The stalled ones time out by themselves: each gets 408 and is closed (the wait is the
    // server's request timeout, a bound, not a race).
    for stalled in [body, headers] {
        let text = answer(stalled);
        assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
        assert!(text.contains("fault_message"), "{text}");
    }
    drop(silent);
    api.assert_served();
    let vms = call(&api.socket, "GET", "/vms", None).unwrap();
    assert!(!vms.body.contains("\"id\":1"), "a stalled clone request ran: {}", vms.body);
}

#[test]
fn a_body_too_large_gets_413_without_being_read() {
    let api = SpinServer::start(scratch_dir("api-huge"));
    // 64 MiB announced: answered at once, before any of the body is sent.
    let huge = api.stalled(b"PUT /snapshot/create HTTP/1.1\r\nContent-Length: 67108864\r\n\r\n");
    let text = answer(huge);
    assert!(text.starts_with("HTTP/1.1 413 "), "{text}");
    assert!(text.contains("body too large"), "{text}");
    // Sent whole (the client writes on after the answer: a broken pipe is its own problem).
    let mut sent = UnixStream::connect(&api.socket).unwrap();
    let head = format!("PUT /clone HTTP/1.1\r\nContent-Length: {}\r\n\r\n", 64 << 20);
    sent.write_all(head.as_bytes()).unwrap();
    let _ = sent.write_all(&vec![b' '; 4 << 20]);
    let text = answer(sent);
    assert!(text.starts_with("HTTP/1.1 413 "), "{text}");
    api.assert_served();
    let garbage = answer(api.stalled(b"\x00\x01 not http at all\r\n\r\n"));
    assert!(garbage.starts_with("HTTP/1.1 400 "), "{garbage}");
    api.assert_served();
}

#[test]
fn one_connection_carries_several_requests() {
    let api = SpinServer::start(scratch_dir("api-keepalive"));
    let mut stream = UnixStream::connect(&api.socket).unwrap();
    // Two requests at once (pipelined), then a third on the same connection that closes it.
    let requests = "GET /version HTTP/1.1\r\nHost: localhost\r\n\r\n\
                    PATCH /vm HTTP/1.1\r\nContent-Length: 18\r\n\r\n{\"state\":\"Paused\"}\
                    PATCH /vm HTTP/1.1\r\nContent-Length: 19\r\nConnection: close\r\n\r\n{\"state\":\"Resumed\"}";
    stream.write_all(requests.as_bytes()).unwrap();
    let text = answer(stream);
    // Bodies end without a newline: find each status line by its start.
    let statuses: Vec<&str> = text.split("HTTP/1.1 ").skip(1).map(|answer| &answer[..3]).collect();
    assert_eq!(statuses, ["200", "204", "204"], "{text}");
    assert!(text.contains("firecracker_version"), "{text}");
    api.assert_served();
}
