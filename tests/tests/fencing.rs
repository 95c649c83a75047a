//! Fenced agents, against a real agent over mTLS: once a command of some coordinator epoch came,
//! commands of a lower epoch (or of none) are refused, audited, and the highest epoch survives a
//! restart.
use std::time::Duration;

use ferry_coordinator::client::{Agent, Timeouts, fenced};
use ferry_coordinator::config::Host;
use ferry_proto::identity::Role;
use ferry_proto::v1;
use ferry_tests::agents::TestAgent;
use ferry_tests::pki::TestPki;

const TIMEOUTS: Timeouts = Timeouts { connect: Duration::from_secs(3), request: Duration::from_secs(5) };

/// A Prepare that carries no manifest: past the fence the agent refuses it as invalid, so the
/// status code tells whether the fence let it through.
async fn prepare(agent: &TestAgent, tls: &ferry_coordinator::tls::ClientTls, epoch: i64) -> tonic::Status {
    let host = Host { name: "web-1".into(), address: agent.addr.ip().to_string(), port: agent.addr.port() };
    let mut a = Agent::connect(&host, tls, TIMEOUTS).await.expect("connect");
    let req = v1::PrepareRequest { app: "web".into(), version: "1".into(), ..Default::default() };
    a.client.prepare(fenced(tonic::Request::new(req), epoch)).await.expect_err("no manifest")
}

#[tokio::test]
async fn a_lower_epoch_is_refused_audited_and_remembered_across_a_restart() {
    let pki = TestPki::new();
    let data = tempfile::tempdir().expect("tempdir");
    let files = pki.issue("web-1", Role::Agent, &["127.0.0.1"]);
    let tls = pki.issue("ctl", Role::Coordinator, &[]).client_tls();
    let agent = TestAgent::start(&files, data.path()).await.expect("start");

    // Before any epoch: commands without one pass (a fleet without a shared registry).
    assert_eq!(prepare(&agent, &tls, 0).await.code(), tonic::Code::InvalidArgument);
    // The leader of epoch 5 comes: from now on this host follows it.
    assert_eq!(prepare(&agent, &tls, 5).await.code(), tonic::Code::InvalidArgument);
    for old in [4, 0] {
        let s = prepare(&agent, &tls, old).await;
        assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s:?}");
        assert!(
            s.message().contains(&format!("follows coordinator epoch 5, and this command carries epoch {old}")),
            "{s:?}"
        );
    }
    assert_eq!(std::fs::read_to_string(data.path().join("epoch")).expect("kept").trim(), "5");
    let audit = std::fs::read_to_string(data.path().join("audit.log")).expect("audit");
    let fenced_lines =
        audit.lines().filter(|l| l.contains("\"Prepare\"") && l.contains("fenced: this host follows")).count();
    assert_eq!(fenced_lines, 2, "{audit}");

    // Restarted, it still follows epoch 5; a newer leader moves it on.
    drop(agent);
    let agent = TestAgent::start(&files, data.path()).await.expect("restart");
    assert_eq!(prepare(&agent, &tls, 4).await.code(), tonic::Code::FailedPrecondition);
    assert_eq!(prepare(&agent, &tls, 5).await.code(), tonic::Code::InvalidArgument);
    assert_eq!(prepare(&agent, &tls, 6).await.code(), tonic::Code::InvalidArgument);
    assert_eq!(prepare(&agent, &tls, 5).await.code(), tonic::Code::FailedPrecondition);
}
