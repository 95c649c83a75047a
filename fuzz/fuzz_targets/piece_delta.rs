//! The piece-delta applier an agent runs on each chunk sent as a delta (Upload): any ops and
//! literal bytes against a basis it holds. Also: what `encode` makes from the input applies back
//! to the input exactly.
#![no_main]
use ferry_proto::{delta, v1};
use prost::Message;

/// The basis and its signature, made once.
fn basis() -> &'static (Vec<u8>, Vec<u8>, Vec<u32>) {
    static BASIS: std::sync::OnceLock<(Vec<u8>, Vec<u8>, Vec<u32>)> = std::sync::OnceLock::new();
    BASIS.get_or_init(|| {
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let basis: Vec<u8> = (0..96 * 1024)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 24) as u8
            })
            .collect();
        let (hashes, lengths) = delta::signature(&basis);
        (basis, hashes, lengths)
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (basis, hashes, lengths) = basis();
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode % 2 == 0 {
        // A chunk message as it comes off the wire: its ops, literal data and length.
        let Ok(c) = v1::ContentChunk::decode(rest) else { return };
        let len = usize::try_from(c.raw_length).unwrap_or(usize::MAX).min(1 << 20);
        if let Ok(out) = delta::apply(basis, &c.ops, &c.data, len) {
            assert_eq!(out.len(), len, "apply must make exactly the expected length");
        }
    } else {
        // New content made of the basis and the input: encode, then apply, must round-trip.
        let mut new = basis[1000..1000 + (rest.len() * 37) % 60_000].to_vec();
        let at = new.len() / 2;
        new.splice(at..at, rest.iter().copied());
        let (ops, literal) = delta::encode(&new, hashes, lengths);
        let back = delta::apply(basis, &ops, &literal, new.len()).expect("encode's ops apply");
        assert!(back == new, "encode then apply must give the content back");
    }
});
