//! A manifest as an agent receives it (Prepare): decode, validate; a valid one must hash, diff
//! against itself to nothing and come back whole from a delta against an empty base.
#![no_main]
use ferry_proto::{manifest, v1};
use prost::Message;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(m) = v1::Manifest::decode(data) else { return };
    if manifest::validate(&m).is_err() {
        return;
    }
    let _ = manifest::hash(&m);
    let _ = manifest::total_bytes(&m);
    assert!(manifest::diff(&m, &m).upserts.is_empty(), "a manifest differs from itself");
    let empty = v1::Manifest::default();
    let rebuilt = manifest::apply_delta(&empty, &manifest::diff(&empty, &m)).expect("a delta from diff applies");
    assert_eq!(rebuilt, m, "diff then apply_delta must give the manifest back");
});
