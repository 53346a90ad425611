//! The fault-injection harness (`prefixd-faults`, `scripts/dev.sh faults`) in CI: 200 random
//! faults (kill -9 and SIGSTOP of producers and consumers on both data paths, server SIGKILL
//! and restart, pool exhaustion) against real processes; every byte read is checked, and
//! nothing may stay reserved, leased or quarantined after the TTL, or hang.

use prefixd_tests::bin;

#[test]
fn two_hundred_faults_leave_no_corruption_leak_or_hang() {
    let server = bin("prefixd");
    let bin_dir = server.parent().expect("bin dir");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_prefixd-faults"))
        .args(["--faults", "200", "--bin-dir"])
        .arg(bin_dir)
        .output()
        .expect("run prefixd-faults");
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    println!("{text}{err}");
    assert!(out.status.success(), "prefixd-faults failed:\n{text}\n{err}");
    for line in
        ["corrupt reads: 0", "leaked reservations after TTL: 0", "leaked leases after TTL: 0", "hangs past 30s: 0"]
    {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
}
