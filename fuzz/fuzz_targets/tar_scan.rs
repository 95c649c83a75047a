//! The coordinator's artifact scanner on an archive (what `ferry deploy --artifact x.tar` and an
//! upload to `ferry serve` go through): extraction into a private directory with every refusal,
//! then the manifest. Nothing may panic, and whatever it accepts must be a valid manifest.
#![no_main]
use std::io::Write;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else { return };
    let path = dir.path().join("artifact.tar");
    let Ok(mut f) = std::fs::File::create(&path) else { return };
    if f.write_all(data).is_err() {
        return;
    }
    drop(f);
    if let Ok(a) = ferry_coordinator::artifact::Artifact::scan_within(&path, None, 1 << 20) {
        ferry_proto::manifest::validate(&a.manifest).expect("an accepted archive gives a valid manifest");
    }
});
