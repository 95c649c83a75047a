//! `ferry-fleet clean`: tears down test-fleet runs whose owning process died (an interrupted
//! test). `scripts/test.sh` calls it after the suite; it is safe to run at any time.
fn main() -> std::process::ExitCode {
    match std::env::args().nth(1).as_deref() {
        Some("clean") => {
            let reaped = ferry_tests::fleet::reap_stale();
            for run in &reaped {
                eprintln!("ferry-fleet: removed stale test fleet {run}");
            }
            std::process::ExitCode::SUCCESS
        }
        _ => {
            eprintln!("usage: ferry-fleet clean   (remove test fleets whose test process has died)");
            std::process::ExitCode::from(2)
        }
    }
}
