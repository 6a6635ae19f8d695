//! `zygote fuzz`: a short VM-mode campaign on real VMs, and `--replay` of VM-mode files.

use zygote_tests::{run_zygote, scratch_dir};

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_short_vm_mode_campaign_finds_nothing_and_reports_its_rate() {
    let out = run_zygote(&["fuzz", "--mode", "vm", "--runs", "20", "--seed", "3"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.starts_with("vm mode: 20 runs, ") && text.contains(" runs/s), seed 3, 0 violation(s)"), "{text}");
}

#[test]
fn vm_mode_reproducers_replay_and_bad_ones_exit_2() {
    let dir = scratch_dir("fuzz_cli");
    let clean = dir.join("clean.json");
    let steps = r#"[{"op":"dma_start","vm":0,"page":3,"pages":2,"pattern":81985529216486895,"chunk":1024,"by_guest":true},
        {"op":"dma_step","vm":0},{"op":"clone","vm":0},{"op":"dma_complete","vm":0},{"op":"dma_complete","vm":1},
        {"op":"take_dirty","vm":1}]"#;
    let file =
        format!(r#"{{"format":1,"mode":"vm","seed":1,"run":0,"planted_bug":null,"violation":"-","steps":{steps}}}"#);
    std::fs::write(&clean, file).unwrap();
    let out = run_zygote(&["fuzz", "--replay", clean.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout(&out), "6 steps replayed, no violation\n");

    let bad = dir.join("bad.json");
    std::fs::write(
        &bad,
        r#"{"format":1,"mode":"vm","seed":1,"run":0,"planted_bug":null,"violation":"-","steps":[{"op":"fly"}]}"#,
    )
    .unwrap();
    let out = run_zygote(&["fuzz", "--replay", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("is not a schedule") && err.contains("fly"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
