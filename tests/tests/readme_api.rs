//! README.md's tables of Firecracker's endpoints and Zygote's extensions tell the truth: every
//! endpoint a row says is served is in `ROUTES` and answered by the router, every route is in
//! a row, and the refused row names exactly the `REFUSED` paths, each answered 400 "not
//! supported". A route added or a device endpoint taken off `REFUSED` fails here until the
//! README says so.

use std::collections::BTreeSet;

use vmm::api::routes::{route, REFUSED, ROUTES};
use vmm::api::telemetry::Telemetry;
use vmm::api::Controller;

/// `{drive_id}` and `{id}` alike: `{}`.
fn normalize(path: &str) -> String {
    path.split('/').map(|segment| if segment.starts_with('{') { "{}" } else { segment }).collect::<Vec<_>>().join("/")
}

/// The backticked items of the first cell of each row of the table under `header`.
fn first_cells(readme: &str, header: &str) -> Vec<Vec<String>> {
    let mut lines = readme.lines().skip_while(|l| *l != header);
    assert!(lines.next().is_some(), "README.md has no table {header:?}");
    lines
        .skip(1) // |---|
        .take_while(|l| l.starts_with('|'))
        .map(|row| {
            let cell = row.trim_start_matches('|').replace("\\|", "/").split('|').next().unwrap_or("").to_string();
            cell.split('`').skip(1).step_by(2).map(str::to_string).collect()
        })
        .collect()
}

/// (METHOD, normalized path) pairs of `item` (`GET/PUT /x`), or None for a bare path.
fn operations(item: &str) -> Option<Vec<(String, String)>> {
    let (methods, path) = item.split_once(' ')?;
    Some(methods.split('/').map(|m| (m.to_string(), normalize(path))).collect())
}

#[test]
fn the_readme_endpoint_tables_match_the_router() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let routes: BTreeSet<(String, String)> = ROUTES.iter().map(|(m, p)| (m.to_string(), normalize(p))).collect();
    let mut listed = BTreeSet::new();
    let mut refused = BTreeSet::new();
    let rows = first_cells(&readme, "| Firecracker endpoint | Zygote |");
    let extensions = first_cells(&readme, "| endpoint | body | answer |");
    for item in rows.iter().chain(&extensions).flatten() {
        match operations(item) {
            Some(ops) => listed.extend(ops),
            None => {
                let prefix = item.strip_suffix('*');
                let matched: Vec<&str> = REFUSED
                    .iter()
                    .copied()
                    .filter(|r| prefix.map_or(normalize(r) == normalize(item), |p| r.starts_with(p)))
                    .collect();
                assert!(!matched.is_empty(), "README.md refuses {item}, which REFUSED does not list");
                refused.extend(matched);
            }
        }
    }
    let unlisted: Vec<_> = routes.difference(&listed).collect();
    assert!(unlisted.is_empty(), "routes the README tables do not list: {unlisted:?}");
    let unserved: Vec<_> = listed.difference(&routes).collect();
    assert!(unserved.is_empty(), "README.md lists endpoints the server does not have: {unserved:?}");
    let missing: Vec<_> = REFUSED.iter().filter(|r| !refused.contains(*r)).collect();
    assert!(missing.is_empty(), "refused paths README.md does not name: {missing:?}");

    // And the router answers as the tables say: served routes are routed, refused ones are
    // refused as unsupported.
    let (mut controller, mut telemetry) = (Controller::empty(), Telemetry::default());
    for (method, template) in ROUTES {
        if (*method, *template) == ("PUT", "/actions") {
            continue; // an empty body; Shutdown must not be sent
        }
        let url = template.replace("{drive_id}", "d");
        let reply = route(&mut controller, &mut telemetry, method, &url, b"");
        let body = reply.body.map(|b| b.to_string()).unwrap_or_default();
        assert!(!body.contains("Invalid request method and/or path"), "{method} {url}: {body}");
    }
    for path in REFUSED {
        let url = path.replace("{iface_id}", "eth0").replace("{id}", "p0");
        let reply = route(&mut controller, &mut telemetry, "PUT", &url, b"{}");
        let body = reply.body.map(|b| b.to_string()).unwrap_or_default();
        assert_eq!(reply.status, 400, "PUT {url}: {body}");
        assert!(body.contains("is not supported by Zygote"), "PUT {url}: {body}");
    }
}
