//! `ferry key new`: the ed25519 key pair that signs releases (see [`crate::signing`]).
pub use crate::signing::{NewKey, new};
