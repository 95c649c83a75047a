//! Piece deltas: how a host rebuilds a changed chunk from old content it keeps, so a small edit
//! costs about its own size on the wire (rsync's block matching, with content-defined pieces in
//! place of a rolling checksum).
//!
//! The host cuts the old content it offers (a *basis*) into pieces and sends each piece's
//! truncated hash and length ([`signature`]). The coordinator cuts the new chunk the same way;
//! every piece the basis has becomes a copy, the rest literal bytes ([`encode`]). Because the cut
//! points depend on content only, the pieces after an edit line up again with the old ones. The
//! host rebuilds the chunk ([`apply`]) and checks it against the chunk's full blake3 hash, so a
//! false match on a truncated piece hash can fail an upload but never corrupt a release.
use std::collections::HashMap;

use crate::v1;

/// FastCDC parameters of pieces (the smallest FastCDC allows, for edits of a few KiB).
pub const PIECE_MIN: u32 = 256;
pub const PIECE_AVG: u32 = 1024;
pub const PIECE_MAX: u32 = 4096;
/// Bytes of blake3 kept per piece in a signature.
pub const PIECE_HASH_LEN: usize = 16;

/// A rebuilt chunk that does not fit its ops.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("delta: {0}")]
pub struct DeltaError(String);

fn piece_hash(piece: &[u8]) -> [u8; PIECE_HASH_LEN] {
    let mut out = [0u8; PIECE_HASH_LEN];
    out.copy_from_slice(&blake3::hash(piece).as_bytes()[..PIECE_HASH_LEN]);
    out
}

fn pieces(data: &[u8]) -> impl Iterator<Item = (usize, usize)> + '_ {
    fastcdc::v2020::FastCDC::new(data, PIECE_MIN, PIECE_AVG, PIECE_MAX).map(|c| (c.offset, c.length))
}

/// The signature of a basis: piece hashes (concatenated) and lengths.
pub fn signature(basis: &[u8]) -> (Vec<u8>, Vec<u32>) {
    let (mut hashes, mut lengths) = (Vec::new(), Vec::new());
    for (offset, length) in pieces(basis) {
        hashes.extend_from_slice(&piece_hash(&basis[offset..offset + length]));
        lengths.push(length as u32);
    }
    (hashes, lengths)
}

/// Ops that rebuild `new` from a basis with this signature, and the literal bytes they take.
/// Consecutive copies and literals are merged.
pub fn encode(new: &[u8], piece_hashes: &[u8], piece_lengths: &[u32]) -> (Vec<v1::DeltaOp>, Vec<u8>) {
    let mut at: HashMap<([u8; PIECE_HASH_LEN], u32), u64> = HashMap::with_capacity(piece_lengths.len());
    let mut offset = 0u64;
    for (h, &len) in piece_hashes.chunks_exact(PIECE_HASH_LEN).zip(piece_lengths) {
        let mut key = [0u8; PIECE_HASH_LEN];
        key.copy_from_slice(h);
        at.entry((key, len)).or_insert(offset);
        offset += u64::from(len);
    }
    let mut ops: Vec<v1::DeltaOp> = Vec::new();
    let mut literal = Vec::new();
    for (start, length) in pieces(new) {
        let piece = &new[start..start + length];
        let len = length as u32;
        let op = match at.get(&(piece_hash(piece), len)) {
            Some(&basis_offset) => v1::DeltaOp { basis_offset, length: len, literal: false },
            None => {
                literal.extend_from_slice(piece);
                v1::DeltaOp { basis_offset: 0, length: len, literal: true }
            }
        };
        match ops.last_mut() {
            Some(last) if last.literal && op.literal => last.length += len,
            Some(last)
                if !last.literal && !op.literal && last.basis_offset + u64::from(last.length) == op.basis_offset =>
            {
                last.length += len;
            }
            _ => ops.push(op),
        }
    }
    (ops, literal)
}

/// Rebuilds a chunk of `expected_len` bytes from `basis`, `ops` and `literal`. Refuses ops that
/// reach outside the basis or the literal data, leave literal bytes unused, or do not add up.
pub fn apply(basis: &[u8], ops: &[v1::DeltaOp], literal: &[u8], expected_len: usize) -> Result<Vec<u8>, DeltaError> {
    let mut out = Vec::with_capacity(expected_len);
    let mut lit = 0usize;
    for op in ops {
        let len = op.length as usize;
        if out.len() + len > expected_len {
            return Err(DeltaError(format!("the ops make more than the chunk's {expected_len} bytes")));
        }
        if op.literal {
            let piece = literal
                .get(lit..lit + len)
                .ok_or_else(|| DeltaError(format!("a literal op reads past the {} literal bytes", literal.len())))?;
            out.extend_from_slice(piece);
            lit += len;
        } else {
            let start = usize::try_from(op.basis_offset).unwrap_or(usize::MAX);
            let piece = start
                .checked_add(len)
                .and_then(|end| basis.get(start..end))
                .ok_or_else(|| DeltaError(format!("a copy op reads past the basis ({} bytes)", basis.len())))?;
            out.extend_from_slice(piece);
        }
    }
    if out.len() != expected_len || lit != literal.len() {
        return Err(DeltaError(format!(
            "the ops make {} bytes of {expected_len} and use {lit} of {} literal bytes",
            out.len(),
            literal.len()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn noise(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn a_small_edit_costs_about_its_size() {
        let old = noise(7, 64 * 1024);
        let mut new = old.clone();
        new[30_000..34_096].copy_from_slice(&noise(9, 4096));
        let (h, l) = signature(&old);
        let (ops, literal) = encode(&new, &h, &l);
        assert!(literal.len() >= 4096 && literal.len() < 4096 + 3 * PIECE_MAX as usize, "literal {}", literal.len());
        assert!(ops.len() <= 5, "{ops:?}");
        assert_eq!(apply(&old, &ops, &literal, new.len()), Ok(new));
    }

    #[test]
    fn hostile_ops_are_refused() {
        let basis = vec![1u8; 100];
        let copy = |basis_offset, length| v1::DeltaOp { basis_offset, length, literal: false };
        let lit = |length| v1::DeltaOp { basis_offset: 0, length, literal: true };
        assert!(apply(&basis, &[copy(90, 20)], &[], 20).is_err(), "past the basis");
        assert!(apply(&basis, &[copy(u64::MAX, 2)], &[], 2).is_err(), "offset overflow");
        assert!(apply(&basis, &[lit(5)], &[0; 4], 5).is_err(), "past the literal");
        assert!(apply(&basis, &[lit(4)], &[0; 5], 4).is_err(), "unused literal");
        assert!(apply(&basis, &[copy(0, 10), copy(0, 10)], &[], 15).is_err(), "too long");
        assert!(apply(&basis, &[copy(0, 10)], &[], 15).is_err(), "too short");
        assert_eq!(apply(&basis, &[copy(0, 3), lit(2)], &[7, 8], 5), Ok(vec![1, 1, 1, 7, 8]));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
        /// Whatever the basis and the edit, the ops rebuild exactly the new bytes.
        #[test]
        fn encode_then_apply_rebuilds_the_chunk(
            seed in any::<u64>(),
            len in 0usize..40_000,
            edits in proptest::collection::vec((any::<usize>(), 0usize..3000, any::<u64>()), 0..4),
        ) {
            let old = noise(seed, len);
            let mut new = old.clone();
            for (at, n, s) in edits {
                let at = if new.is_empty() { 0 } else { at % new.len() };
                let end = (at + n).min(new.len());
                new.splice(at..end, noise(s, n / 2 + 1));
            }
            let (h, l) = signature(&old);
            let (ops, literal) = encode(&new, &h, &l);
            prop_assert_eq!(apply(&old, &ops, &literal, new.len()), Ok(new));
        }
    }
}
