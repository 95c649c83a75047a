//! `ferry ca init`: create the fleet CA.
use std::path::PathBuf;

use serde::Serialize;

use crate::pki::{self, Validity};

#[derive(Debug, Serialize)]
pub struct CaInitOutcome {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub subject: String,
    pub not_after_unix: i64,
}

pub fn init(out: &std::path::Path, force: bool, days: u32) -> anyhow::Result<CaInitOutcome> {
    let issued = pki::init_ca(out, force, Validity::days_from_now(days))?;
    Ok(CaInitOutcome {
        cert: issued.cert,
        key: issued.key,
        subject: issued.identity.subject,
        not_after_unix: issued.identity.not_after_unix,
    })
}
