//! mTLS between `ferry` and `ferry-agent` with real certificates over real loopback sockets.
//! Each refusal must name its cause, on the side that refused and, where TLS lets it know, on the
//! other side too.
use ferry_coordinator::client::{Agent, ErrorKind, HostError, Timeouts};
use ferry_coordinator::config::{Host, TlsFiles};
use ferry_coordinator::tls::ClientTls;
use ferry_proto::identity::Role;
use ferry_tests::agents::TestAgent;
use ferry_tests::pki::{CertFiles, TestPki};
use std::time::Duration;

const TIMEOUTS: Timeouts = Timeouts { connect: Duration::from_secs(3), request: Duration::from_secs(5) };

fn host(name: &str, agent: &TestAgent) -> Host {
    Host { name: name.into(), address: agent.addr.ip().to_string(), port: agent.addr.port() }
}

fn client_tls(files: &CertFiles) -> ClientTls {
    ClientTls::load(&files.tls_files()).expect("load coordinator TLS")
}

async fn connect(name: &str, agent: &TestAgent, tls: &ClientTls) -> Result<Agent, HostError> {
    Agent::connect(&host(name, agent), tls, TIMEOUTS).await
}

fn expect_refused(result: Result<Agent, HostError>) -> HostError {
    match result {
        Ok(_) => panic!("the connection was accepted but must be refused"),
        Err(e) => e,
    }
}

#[tokio::test]
async fn good_handshake_reports_host_facts() {
    let pki = TestPki::new();
    let data = tempfile::tempdir().expect("tempdir");
    let agent = TestAgent::start(&pki.issue("web-1", Role::Agent, &["127.0.0.1"]), data.path()).await.expect("start");
    let tls = client_tls(&pki.issue("ctl", Role::Coordinator, &[]));

    let connected = connect("web-1", &agent, &tls).await.expect("handshake and GetStatus");
    let s = connected.status;
    assert_eq!(s.agent_name, "web-1");
    assert_eq!(s.agent_version, env!("CARGO_PKG_VERSION"));
    assert!(s.cpu_count >= 1 && s.memory_total_bytes > 0 && s.data_dir_total_bytes > 0, "{s:?}");
    assert!(!s.hostname.is_empty() && !s.os.is_empty());
    assert_eq!(s.apps.len(), 1);
    assert_eq!(s.apps[0].name, "web");
    assert_eq!(s.apps[0].current_release, "");
    assert!(agent.refusals.list().is_empty(), "{:?}", agent.refusals.list());
}

#[tokio::test]
async fn agent_named_only_by_inventory_name_is_accepted() {
    // No IP SAN: the coordinator dials 127.0.0.1 but the certificate names the inventory entry.
    let pki = TestPki::new();
    let data = tempfile::tempdir().expect("tempdir");
    let agent = TestAgent::start(&pki.issue("web-1", Role::Agent, &[]), data.path()).await.expect("start");
    let tls = client_tls(&pki.issue("ctl", Role::Coordinator, &[]));
    connect("web-1", &agent, &tls).await.expect("accepted by inventory name");
}

#[tokio::test]
async fn coordinator_certificate_from_another_ca_is_refused() {
    let fleet = TestPki::new();
    let other = TestPki::new();
    let data = tempfile::tempdir().expect("tempdir");
    let agent = TestAgent::start(&fleet.issue("web-1", Role::Agent, &["127.0.0.1"]), data.path()).await.expect("start");
    // Trusts the fleet CA (so it accepts the agent) but holds a certificate of another CA.
    let mut foreign = other.issue("ctl", Role::Coordinator, &[]);
    foreign.ca = fleet.ca_cert();
    let err = expect_refused(connect("web-1", &agent, &foreign.client_tls()).await);

    assert_eq!(err.kind, ErrorKind::Tls, "{err}");
    assert!(
        err.to_string().contains("the agent refused our certificate: it is not signed by the CA the agent trusts"),
        "{err}"
    );
    assert!(err.to_string().starts_with("host web-1 (127.0.0.1:"), "{err}");
    agent.refusal_containing("not issued by this fleet's CA").await.expect("agent logs the cause");
}

#[tokio::test]
async fn agent_certificate_from_another_ca_is_refused() {
    let fleet = TestPki::new();
    let other = TestPki::new();
    let data = tempfile::tempdir().expect("tempdir");
    let mut rogue = other.issue("web-1", Role::Agent, &["127.0.0.1"]);
    rogue.ca = fleet.ca_cert(); // the agent itself trusts the fleet CA
    let agent = TestAgent::start(&rogue, data.path()).await.expect("start");
    let err = expect_refused(connect("web-1", &agent, &client_tls(&fleet.issue("ctl", Role::Coordinator, &[]))).await);

    assert_eq!(err.kind, ErrorKind::Tls, "{err}");
    assert!(err.message.contains("not signed by the fleet CA (unknown issuer)"), "{err}");
}

#[tokio::test]
async fn expired_coordinator_certificate_is_refused() {
    let pki = TestPki::new();
    let data = tempfile::tempdir().expect("tempdir");
    let agent = TestAgent::start(&pki.issue("web-1", Role::Agent, &["127.0.0.1"]), data.path()).await.expect("start");
    let tls = client_tls(&pki.issue_expired("ctl", Role::Coordinator, &[]));
    let err = expect_refused(connect("web-1", &agent, &tls).await);

    assert_eq!(err.kind, ErrorKind::Tls, "{err}");
    assert!(err.message.contains("the agent refused our certificate: it has expired"), "{err}");
    agent.refusal_containing("expired").await.expect("agent logs the cause");
}

#[tokio::test]
async fn expired_agent_certificate_is_refused() {
    let pki = TestPki::new();
    let data = tempfile::tempdir().expect("tempdir");
    let agent =
        TestAgent::start(&pki.issue_expired("web-1", Role::Agent, &["127.0.0.1"]), data.path()).await.expect("start");
    let err = expect_refused(connect("web-1", &agent, &client_tls(&pki.issue("ctl", Role::Coordinator, &[]))).await);

    assert_eq!(err.kind, ErrorKind::Tls, "{err}");
    assert!(err.message.contains("certificate expired"), "{err}");
}

#[tokio::test]
async fn agent_role_certificate_used_as_coordinator_is_refused() {
    let pki = TestPki::new();
    let data = tempfile::tempdir().expect("tempdir");
    let agent = TestAgent::start(&pki.issue("web-1", Role::Agent, &["127.0.0.1"]), data.path()).await.expect("start");
    let stolen = pki.issue("web-2", Role::Agent, &["127.0.0.2"]);
    let files = TlsFiles { ca: stolen.ca.clone(), cert: stolen.cert.clone(), key: stolen.key.clone(), revoked: None };

    // `ferry` itself refuses to use it...
    let local = ClientTls::load(&files).expect_err("ferry must not use an agent certificate");
    assert!(local.to_string().contains("has role agent; the coordinator needs one issued with"), "{local}");

    // ...and an agent refuses it every command (a peer's certificate gets GetChunks only).
    let tls = ClientTls::load_any_role(&files).expect("load without the local check");
    let err = expect_refused(connect("web-1", &agent, &tls).await);
    assert_eq!(err.kind, ErrorKind::Tls, "{err}");
    assert!(err.message.contains("refused this certificate: GetStatus needs a coordinator certificate"), "{err}");
    let audit = std::fs::read_to_string(data.path().join("audit.log")).expect("audit");
    assert!(audit.contains("\"peer\":\"web-2\"") && audit.contains("unauthenticated"), "{audit}");
}

#[tokio::test]
async fn agent_certificate_for_another_host_is_refused() {
    let pki = TestPki::new();
    let data = tempfile::tempdir().expect("tempdir");
    // A valid agent certificate, but for web-2 at another address.
    let agent = TestAgent::start(&pki.issue("web-2", Role::Agent, &["10.9.9.2"]), data.path()).await.expect("start");
    let err = expect_refused(connect("web-1", &agent, &client_tls(&pki.issue("ctl", Role::Coordinator, &[]))).await);

    assert_eq!(err.kind, ErrorKind::Identity, "{err}");
    assert!(
        err.message.contains(
            "the agent's certificate is for web-2 (names: web-2, 10.9.9.2), not for host web-1 (address 127.0.0.1)"
        ),
        "{err}"
    );
}

#[tokio::test]
async fn coordinator_certificate_presented_by_an_agent_is_refused() {
    let pki = TestPki::new();
    let data = tempfile::tempdir().expect("tempdir");
    // A coordinator certificate (serverAuth too, for the API daemon) installed on a host by mistake.
    let misissued = pki.issue("web-1", Role::Coordinator, &["127.0.0.1"]);
    let start = TestAgent::start(&misissued, data.path()).await;
    let err = start.err().expect("the agent refuses to start with a coordinator certificate").to_string();
    assert!(
        err.contains("has role coordinator, but an agent needs one issued with `ferry cert issue --role agent`"),
        "{err}"
    );
}

#[tokio::test]
async fn missing_or_unreadable_key_files_are_named() {
    let pki = TestPki::new();
    let data = tempfile::tempdir().expect("tempdir");
    let mut files = pki.issue("web-1", Role::Agent, &["127.0.0.1"]);
    files.key = pki.path().join("missing.key");
    let err = TestAgent::start(&files, data.path()).await.err().expect("refuses to start").to_string();
    assert!(err.contains("cannot read private key file") && err.contains("missing.key"), "{err}");

    // A directory where the key should be (root reads any file, so mode 000 proves nothing here).
    files.key = pki.path().to_path_buf();
    let err = TestAgent::start(&files, data.path()).await.err().expect("refuses to start").to_string();
    assert!(err.contains(&format!("cannot read private key file {}", pki.path().display())), "{err}");

    // A key file holding no key.
    let garbage = pki.path().join("garbage.key");
    std::fs::write(&garbage, "not a key\n").expect("write");
    let ctl = pki.issue("ctl", Role::Coordinator, &[]);
    let err = ClientTls::load(&TlsFiles { ca: ctl.ca, cert: ctl.cert, key: garbage, revoked: None })
        .expect_err("refused")
        .to_string();
    assert!(err.contains("private key file") && err.contains("garbage.key holds no PEM private key"), "{err}");

    // A key that belongs to another certificate.
    let other = pki.issue("ctl-2", Role::Coordinator, &[]);
    let ctl = pki.issue("ctl", Role::Coordinator, &[]);
    let err = ClientTls::load(&TlsFiles { ca: ctl.ca, cert: ctl.cert, key: other.key, revoked: None })
        .expect_err("refused")
        .to_string();
    assert!(err.contains("do not belong together"), "{err}");
}

#[tokio::test]
async fn plaintext_client_is_refused() {
    let pki = TestPki::new();
    let data = tempfile::tempdir().expect("tempdir");
    let agent = TestAgent::start(&pki.issue("web-1", Role::Agent, &["127.0.0.1"]), data.path()).await.expect("start");

    // A gRPC client without TLS.
    let plain = ferry_proto::v1::agent_client::AgentClient::connect(format!("http://{}", agent.addr)).await;
    let answered = match plain {
        Ok(mut c) => c.get_status(ferry_proto::v1::GetStatusRequest {}).await.is_ok(),
        Err(_) => false,
    };
    assert!(!answered, "a plaintext client got an answer");
    agent.refusal_containing("does not speak TLS").await.expect("agent logs the cause");
}

#[tokio::test]
async fn coordinator_explains_a_peer_that_does_not_speak_tls() {
    let pki = TestPki::new();
    // Something that answers plain HTTP where an agent should be.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n").await;
        }
    });
    let tls = client_tls(&pki.issue("ctl", Role::Coordinator, &[]));
    let host = Host { name: "web-1".into(), address: "127.0.0.1".into(), port: addr.port() };
    let err = expect_refused(Agent::connect(&host, &tls, TIMEOUTS).await);
    assert_eq!(err.kind, ErrorKind::Protocol, "{err}");
    assert!(err.message.contains("does not speak TLS"), "{err}");
}

/// The audit log names who was refused (the name on the certificate it presented) and who was
/// served, with the RPC and its result; the refusal counter agrees. An operator's certificate is
/// refused in the handshake; another agent's (a peer) gets through it, but any RPC other than
/// GetChunks is refused to it and audited.
#[tokio::test]
async fn refusals_and_commands_are_audited_with_the_peer_name() {
    let pki = TestPki::new();
    let data = tempfile::tempdir().expect("tempdir");
    let agent = TestAgent::start(&pki.issue("web-1", Role::Agent, &["127.0.0.1"]), data.path()).await.expect("start");
    let any_role = |name: &str, role: Role| {
        let c = pki.issue(name, role, &[]);
        let files = TlsFiles { ca: c.ca.clone(), cert: c.cert.clone(), key: c.key.clone(), revoked: None };
        ClientTls::load_any_role(&files).expect("load without the local check")
    };
    // Right CA, wrong role.
    expect_refused(connect("web-1", &agent, &any_role("alice", Role::Operator)).await);
    agent.refusal_containing("coordinator role").await.expect("refused for its role");
    // A peer: its GetStatus is refused.
    let e = expect_refused(connect("web-1", &agent, &any_role("web-2", Role::Agent)).await);
    assert!(e.message.contains("needs a coordinator certificate"), "{e}");
    connect("web-1", &agent, &client_tls(&pki.issue("ctl", Role::Coordinator, &[]))).await.expect("accepted");

    let log = std::fs::read_to_string(data.path().join("audit.log")).expect("the audit log is in the data dir");
    let records: Vec<ferry_agent::audit::Entry> =
        log.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    let refused: Vec<_> = records.iter().filter(|r| r.result == "refused").collect();
    assert_eq!(refused.len(), 1, "{records:#?}");
    assert_eq!((refused[0].rpc.as_str(), refused[0].peer.as_str()), ("connect", "alice"), "{records:#?}");
    assert!(refused[0].detail.contains("does not carry the coordinator role"), "{records:#?}");
    assert!(refused[0].peer_addr.starts_with("127.0.0.1:"), "{records:#?}");
    let peer: Vec<_> = records.iter().filter(|r| r.peer == "web-2").collect();
    assert_eq!(peer.len(), 1, "{records:#?}");
    assert_eq!((peer[0].rpc.as_str(), peer[0].result.as_str()), ("GetStatus", "error: unauthenticated"));
    assert!(peer[0].detail.contains("an agent certificate may call GetChunks only"), "{records:#?}");
    let served: Vec<_> = records.iter().filter(|r| r.rpc == "GetStatus" && r.result == "ok").collect();
    assert_eq!(served.len(), 1, "{records:#?}");
    assert_eq!(served[0].peer.as_str(), "ctl", "{records:#?}");
}

/// Regression: every connection got a handshake task holding its descriptor for the whole
/// handshake timeout, so a flood of idle TCP connections took the agent down. Past the caps (16
/// handshakes from one address, 256 in all) a new connection is closed at once, and a coordinator
/// from another address is still served while the flood holds its slots.
#[tokio::test]
async fn a_flood_of_idle_connections_from_one_address_is_shed_and_the_coordinator_still_gets_in() {
    use tokio::io::AsyncReadExt;
    let pki = TestPki::new();
    let data = tempfile::tempdir().expect("tempdir");
    let agent = TestAgent::start(&pki.issue("web-1", Role::Agent, &["127.0.0.1"]), data.path()).await.expect("start");
    let tls = client_tls(&pki.issue("ctl", Role::Coordinator, &[]));
    // The flood comes from 127.0.0.2 (still loopback) and never starts TLS.
    let mut flood = Vec::new();
    for _ in 0..ferry_agent::server::MAX_HANDSHAKES_PER_ADDR + 24 {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind("127.0.0.2:0".parse().expect("addr")).expect("bind 127.0.0.2");
        flood.push(socket.connect(agent.addr).await.expect("connect"));
    }
    // The ones past the cap are closed by the agent at once, long before its 10 s handshake
    // timeout; the first ones are still waiting for their handshake.
    let reads = flood.iter_mut().map(|conn| async move {
        let mut byte = [0u8; 1];
        matches!(tokio::time::timeout(Duration::from_millis(1000), conn.read(&mut byte)).await, Ok(Ok(0) | Err(_)))
    });
    let closed = futures_util::future::join_all(reads).await.into_iter().filter(|c| *c).count();
    assert_eq!(closed, 24, "connections past the per-address cap are closed at once");
    // The coordinator, from 127.0.0.1, gets in while the flood holds its 16 slots.
    let connected = connect("web-1", &agent, &tls).await.expect("served during the flood");
    assert_eq!(connected.status.agent_name, "web-1");
    drop(connected);
    // A flood from the coordinator's own address: it is turned away too, and told why.
    let mut own = Vec::new();
    for _ in 0..ferry_agent::server::MAX_HANDSHAKES_PER_ADDR {
        own.push(tokio::net::TcpStream::connect(agent.addr).await.expect("connect"));
    }
    let e = expect_refused(connect("web-1", &agent, &tls).await);
    assert!(e.message.contains("dropped the connection during the TLS handshake") && e.message.contains("busy"), "{e}");
}

/// Regression: each refused connection was its own fsync'd audit line, so a stream of refusals
/// rotated the command records out of the audit log. Refusals from one address are recorded once
/// a minute (all are still counted); a coordinator's commands are recorded as before.
#[tokio::test]
async fn a_stream_of_refusals_is_sampled_in_the_audit_log() {
    use tokio::io::AsyncWriteExt;
    let pki = TestPki::new();
    let data = tempfile::tempdir().expect("tempdir");
    let agent = TestAgent::start(&pki.issue("web-1", Role::Agent, &["127.0.0.1"]), data.path()).await.expect("start");
    for _ in 0..30 {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind("127.0.0.2:0".parse().expect("addr")).expect("bind 127.0.0.2");
        let mut conn = socket.connect(agent.addr).await.expect("connect");
        // Not TLS: refused at once.
        let _ = conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    }
    let all_refused = ferry_tests::wait_for(200, || (agent.refusals.list().len() >= 30).then_some(())).await;
    assert!(all_refused.is_some(), "{:?}", agent.refusals.list());
    connect("web-1", &agent, &client_tls(&pki.issue("ctl", Role::Coordinator, &[]))).await.expect("accepted");
    let log = std::fs::read_to_string(data.path().join("audit.log")).expect("audit log");
    let records: Vec<ferry_agent::audit::Entry> =
        log.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    let refused = records.iter().filter(|r| r.result == "refused").count();
    assert_eq!(refused, 1, "30 refusals from one address are one line: {records:#?}");
    assert_eq!(records.iter().filter(|r| r.rpc == "GetStatus").count(), 1, "{records:#?}");
}
