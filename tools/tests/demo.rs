//! `zygote demo`: clones taken mid-DMA all end with the full data, and so does the source.

use zygote_tests::run_zygote;

#[test]
fn every_clone_taken_mid_transfer_is_verified() {
    let report = tools::demo::run_demo(3).unwrap();
    assert!(report.source_dma_complete, "{report:?}");
    assert_eq!(report.clones.len(), 3);
    assert!(report.clones.iter().all(|c| c.verified), "{report:?}");
    // Clones land during the ~0.5 s transfer: the buffer was pinned, copied eagerly and re-run.
    assert!(report.clones.iter().any(|c| c.eager_copied_pages > 0 && c.reexecuted_requests > 0), "{report:?}");
}

#[test]
fn demo_json_has_the_documented_fields() {
    let out = run_zygote(&["demo", "--json", "--clones", "2"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["source_dma_complete"], true);
    let clones = v["clones"].as_array().unwrap();
    assert_eq!(clones.len(), 2);
    for c in clones {
        for field in ["pause_us", "eager_copied_pages", "shared_pages"] {
            assert!(c[field].is_u64(), "{field} in {c}");
        }
        assert_eq!(c["verified"], true);
    }
}
