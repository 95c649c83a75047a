//! agent.toml: any text gets a value or an error naming the file, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = std::path::Path::new("/etc/ferry/agent.toml");
    if let Err(e) = ferry_agent::AgentConfig::from_toml(path, text) {
        assert!(e.to_string().contains("/etc/ferry/agent.toml"), "an error must name the file: {e}");
    }
});
