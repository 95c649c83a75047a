//! The release engine over real mTLS gRPC on loopback: what crosses the wire, what lands on disk,
//! how hostile or broken input is refused without touching the current release, and what a
//! kill -9 at each failpoint leaves behind.
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use std::sync::Arc;
use std::time::Duration;

use ferry_agent::store::{DiskSpace, ManifestSource};
use ferry_coordinator::artifact::Artifact;
use ferry_coordinator::cache::Cache;
use ferry_coordinator::client::{Agent, Timeouts};
use ferry_coordinator::config::{FleetConfig, Host};
use ferry_coordinator::rollout::{DeployReport, HostOutcome};
use ferry_coordinator::state::DeploymentStatus;
use ferry_coordinator::tls::ClientTls;
use ferry_proto::identity::Role;
use ferry_proto::v1;
use ferry_tests::agents::{AgentProcess, TestAgent, agent_toml, fleet_config};
use ferry_tests::pki::TestPki;
use ferry_tests::pseudo_random;

const TIMEOUTS: Timeouts = Timeouts { connect: Duration::from_secs(3), request: Duration::from_secs(10) };

/// A build output: `files` (path, content) written under a fresh directory.
fn build(dir: &Path, name: &str, files: &[(&str, Vec<u8>)]) -> PathBuf {
    let root = dir.join(name);
    for (p, data) in files {
        let path = root.join(p);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, data).expect("write");
    }
    root
}

async fn deploy_dir(config: &FleetConfig, tls: &ClientTls, dir: &Path, version: &str) -> DeployReport {
    let artifact = Arc::new(Artifact::scan(dir, None).expect("scan"));
    ferry_tests::engine::deploy(config, tls, "test", artifact, version, None).await.expect("deploy runs")
}

async fn rollback(config: &FleetConfig, tls: &ClientTls, to: Option<&str>) -> DeployReport {
    ferry_tests::engine::rollback(config, tls, "test", to).await.expect("rollback runs")
}

fn current(app_root: &Path) -> String {
    std::fs::read_to_string(app_root.join("VERSION")).expect("VERSION through the app root").trim().to_string()
}

struct Setup {
    _pki: TestPki,
    dir: tempfile::TempDir,
    agent: TestAgent,
    config: FleetConfig,
    tls: ClientTls,
}

impl Setup {
    async fn new() -> Setup {
        let pki = TestPki::new();
        let dir = tempfile::tempdir().expect("tempdir");
        let agent = TestAgent::start(&pki.issue("web-1", Role::Agent, &["127.0.0.1"]), &dir.path().join("data"))
            .await
            .expect("start agent");
        let ctl = pki.issue("ctl", Role::Coordinator, &[]);
        let config = fleet_config(dir.path(), &ctl, &[("web-1", agent.addr.to_string())]);
        Setup { tls: ctl.client_tls(), _pki: pki, dir, agent, config }
    }
    fn data(&self) -> PathBuf {
        self.dir.path().join("data/apps/web")
    }
    fn app_root(&self) -> PathBuf {
        PathBuf::from(format!("{}-web", self.dir.path().join("data").display()))
    }
    async fn client(&self) -> v1::agent_client::AgentClient<tonic::transport::Channel> {
        let host = Host { name: "web-1".into(), address: "127.0.0.1".into(), port: self.agent.addr.port() };
        Agent::connect(&host, &self.tls, TIMEOUTS).await.expect("connect").client
    }
}

fn tree_v(n: u32) -> Vec<(&'static str, Vec<u8>)> {
    let mut files: Vec<(&str, Vec<u8>)> = vec![
        ("VERSION", format!("{n}\n").into_bytes()),
        ("bin/app", pseudo_random(2_000_000, 7)),
        ("static/a.css", pseudo_random(50_000, 8)),
    ];
    for (i, name) in ["lib/1.so", "lib/2.so", "lib/3.so", "lib/4.so"].iter().enumerate() {
        files.push((name, pseudo_random(100_000, 100 + i as u64)));
    }
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_sends_only_what_changed_and_rollback_is_a_swap() {
    let s = Setup::new().await;
    let v1 = build(s.dir.path(), "v1", &tree_v(1));
    let r1 = deploy_dir(&s.config, &s.tls, &v1, "1").await;
    assert_eq!(r1.status, DeploymentStatus::Succeeded, "{r1:?}");
    assert!(r1.bytes_sent > 2_000_000 / 2, "the first deploy sends the content (compressed): {}", r1.bytes_sent);
    assert_eq!(current(&s.app_root()), "1");

    // v2: one small file changed.
    let v2 = build(s.dir.path(), "v2", &tree_v(2));
    let r2 = deploy_dir(&s.config, &s.tls, &v2, "2").await;
    assert_eq!(r2.status, DeploymentStatus::Succeeded, "{r2:?}");
    assert!(r2.bytes_sent < 100, "only the changed file crosses the wire: {} bytes", r2.bytes_sent);
    assert_eq!(current(&s.app_root()), "2");
    // Unchanged files are the same inode in both releases, and read-only.
    let ino = |rel: &str| std::fs::metadata(s.data().join("releases").join(rel).join("bin/app")).expect("stat");
    let (a, b) = (ino(&r1.release_id), ino(&r2.release_id));
    assert_eq!(a.ino(), b.ino());
    assert_eq!(b.mode() & 0o222, 0, "release files are read-only");

    // Deploying the same release again changes nothing and sends nothing.
    let again = deploy_dir(&s.config, &s.tls, &v2, "2").await;
    assert_eq!(again.hosts[0].status, HostOutcome::Unchanged);
    assert_eq!(again.bytes_sent, 0);

    // Rollback: no transfer, previous release current again; then forward to a named version.
    let rb = rollback(&s.config, &s.tls, None).await;
    assert_eq!(rb.status, DeploymentStatus::Succeeded);
    assert_eq!(current(&s.app_root()), "1");
    let fwd = rollback(&s.config, &s.tls, Some("2")).await;
    assert_eq!(fwd.hosts[0].status, HostOutcome::Succeeded);
    assert_eq!(current(&s.app_root()), "2");
    let same = rollback(&s.config, &s.tls, Some("2")).await;
    assert_eq!(same.hosts[0].status, HostOutcome::Unchanged, "a host already on the target is not touched");
    let journal = std::fs::read_to_string(s.data().join("journal")).expect("journal");
    assert_eq!(journal.lines().count(), 4, "{journal}");
    assert!(journal.lines().nth(2).unwrap_or_default().contains("\"action\":\"rollback\""), "{journal}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_change_inside_a_large_file_sends_only_changed_chunks() {
    let s = Setup::new().await;
    let mut big = pseudo_random(8_000_000, 42);
    let v1 = build(s.dir.path(), "v1", &[("VERSION", b"1\n".to_vec()), ("big.bin", big.clone())]);
    assert_eq!(deploy_dir(&s.config, &s.tls, &v1, "1").await.status, DeploymentStatus::Succeeded);
    // Overwrite 64 KiB in the middle.
    let mid = big.len() / 2;
    big[mid..mid + 65_536].copy_from_slice(&pseudo_random(65_536, 43));
    let v2 = build(s.dir.path(), "v2", &[("VERSION", b"2\n".to_vec()), ("big.bin", big.clone())]);
    let r = deploy_dir(&s.config, &s.tls, &v2, "2").await;
    assert_eq!(r.status, DeploymentStatus::Succeeded, "{r:?}");
    assert!(r.bytes_sent < 1_000_000, "a 64 KiB change in 8 MB sent {} bytes", r.bytes_sent);
    let on_host = std::fs::read(s.app_root().join("big.bin")).expect("read");
    assert!(on_host == big, "the assembled file equals the artifact");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redeploy_sends_manifest_changes_and_piece_deltas() {
    let s = Setup::new().await;
    let cache = Cache::new(s.dir.path().join("cache"));
    let deploy_cached = |dir: PathBuf, version: &'static str| {
        let (config, tls, cache) = (&s.config, &s.tls, &cache);
        async move {
            let artifact = Arc::new(Artifact::scan(&dir, Some(cache)).expect("scan"));
            ferry_tests::engine::deploy(config, tls, "test", artifact, version, Some(cache)).await.expect("deploy runs")
        }
    };
    let mut files = tree_v(1);
    let r1 = deploy_cached(build(s.dir.path(), "v1", &files), "1").await;
    assert_eq!(r1.status, DeploymentStatus::Succeeded, "{r1:?}");
    assert!(!r1.hosts[0].manifest_delta, "nothing to send changes against yet");

    // v2: 4 KiB rewritten in the middle of the 2 MB binary and of a 100 KB library.
    files[0].1 = b"2\n".to_vec();
    files[1].1[1_000_000..1_004_096].copy_from_slice(&pseudo_random(4096, 77));
    files[4].1[50_000..54_096].copy_from_slice(&pseudo_random(4096, 78));
    let r2 = deploy_cached(build(s.dir.path(), "v2", &files), "2").await;
    assert_eq!(r2.status, DeploymentStatus::Succeeded, "{r2:?}");
    let host = &r2.hosts[0];
    assert!(host.manifest_delta, "the host runs a release the cache knows: {host:?}");
    assert_eq!(host.delta_chunks, 2, "both edited chunks go as deltas: {host:?}");
    // Whole chunks would be ~2 x 64 KiB of random bytes; deltas are the 2 x 4 KiB edits plus the
    // pieces they straddle.
    assert!(host.bytes_sent < 2 * 4096 + 4 * 4096, "sent {} bytes", host.bytes_sent);
    for (path, content) in &files {
        assert!(std::fs::read(s.app_root().join(path)).expect("read") == *content, "{path} on the host");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_releases_prunes_old_releases_but_never_current_or_previous() {
    let s = Setup::new().await;
    for n in 1..=7 {
        let d = build(s.dir.path(), &format!("v{n}"), &[("VERSION", format!("{n}\n").into_bytes())]);
        assert_eq!(deploy_dir(&s.config, &s.tls, &d, &n.to_string()).await.status, DeploymentStatus::Succeeded);
    }
    let kept: Vec<String> = std::fs::read_dir(s.data().join("releases"))
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(kept.len(), 5, "{kept:?}");
    // Roll back to 6, then deploy 8: 7 (the previous of 8's predecessor chain) and 6 are kept.
    rollback(&s.config, &s.tls, Some("6")).await;
    let d = build(s.dir.path(), "v8", &[("VERSION", b"8\n".to_vec())]);
    deploy_dir(&s.config, &s.tls, &d, "8").await;
    let names = std::fs::read_dir(s.data().join("releases"))
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect::<Vec<_>>();
    assert!(names.iter().any(|n| n.starts_with("8-")) && names.iter().any(|n| n.starts_with("6-")), "{names:?}");
    assert_eq!(names.len(), 5, "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_are_refused_and_the_current_release_is_untouched() {
    let s = Setup::new().await;
    let v1 = build(s.dir.path(), "v1", &tree_v(1));
    let r1 = deploy_dir(&s.config, &s.tls, &v1, "1").await;
    assert_eq!(r1.status, DeploymentStatus::Succeeded);
    let mut c = s.client().await;

    let good = Artifact::scan(&build(s.dir.path(), "v2", &tree_v(2)), None).expect("scan");
    let prepare = |m: v1::Manifest, version: &str| v1::PrepareRequest {
        app: "web".into(),
        version: version.into(),
        deployment_id: "d-test".into(),
        manifest_hash: ferry_proto::manifest::hash(&m).to_vec(),
        manifest: Some(m),
        ..Default::default()
    };
    let code_and_message = |r: Result<tonic::Response<v1::PrepareResponse>, tonic::Status>| {
        let e = r.expect_err("must be refused");
        (e.code(), e.message().to_string())
    };

    // Path traversal, absolute path, symlink escape, unknown (device) kind.
    for (path, kind, target, needle) in [
        ("../../etc/cron.d/x", v1::EntryKind::File, "", "'..' path component"),
        ("/etc/passwd", v1::EntryKind::File, "", "absolute path"),
        ("escape", v1::EntryKind::Symlink, "../../../../etc", "points outside the release"),
        ("dev", v1::EntryKind::Unspecified, "", "unknown entry kind"),
    ] {
        let mut m = good.manifest.clone();
        let mut e = m.entries.iter().find(|e| e.path == "VERSION").cloned().expect("VERSION entry");
        e.path = path.into();
        e.kind = kind as i32;
        if kind != v1::EntryKind::File {
            e.hash.clear();
            e.chunks.clear();
            e.size = 0;
            e.link_target = target.into();
        }
        m.entries.insert(0, e);
        m.entries.sort_by(|a, b| a.path.cmp(&b.path));
        let (code, msg) = code_and_message(c.prepare(prepare(m, "2")).await);
        assert_eq!(code, tonic::Code::InvalidArgument, "{msg}");
        assert!(msg.contains(needle) && msg.contains(path), "{path}: {msg}");
    }
    // A setuid-root program, a world-writable file, and a symlink that climbs out through the
    // release's own symlinks (`d/u -> ..`): refused by the agent, naming the entry.
    for (extra, needle) in [
        (vec![("id", v1::EntryKind::File, 0o4755, "")], "setuid or setgid"),
        (vec![("open.txt", v1::EntryKind::File, 0o666, "")], "world-writable"),
        (
            vec![
                ("d", v1::EntryKind::Dir, 0o755, ""),
                ("d/u", v1::EntryKind::Symlink, 0o777, ".."),
                ("x", v1::EntryKind::Symlink, 0o777, "d/u/d/u/../../etc/shadow"),
            ],
            "points outside the release",
        ),
    ] {
        let mut m = good.manifest.clone();
        let template = m.entries.iter().find(|e| e.path == "VERSION").cloned().expect("VERSION entry");
        let named = extra.last().map(|e| e.0).unwrap_or_default();
        for (path, kind, mode, target) in extra {
            let mut e = template.clone();
            (e.path, e.kind, e.mode) = (path.into(), kind as i32, mode);
            if kind != v1::EntryKind::File {
                e.hash.clear();
                e.chunks.clear();
                e.size = 0;
                e.link_target = target.into();
            }
            m.entries.push(e);
        }
        m.entries.sort_by(|a, b| a.path.cmp(&b.path));
        let (code, msg) = code_and_message(c.prepare(prepare(m, "2")).await);
        assert_eq!(code, tonic::Code::InvalidArgument, "{msg}");
        assert!(msg.contains(needle) && msg.contains(named), "{named}: {msg}");
    }
    // A manifest hash that does not match the manifest.
    let mut req = prepare(good.manifest.clone(), "2");
    req.manifest_hash[0] ^= 1;
    let (code, msg) = code_and_message(c.prepare(req).await);
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert!(msg.contains("manifest hash mismatch"), "{msg}");
    // An app this agent does not manage.
    let mut req = prepare(good.manifest.clone(), "2");
    req.app = "db".into();
    let (code, msg) = code_and_message(c.prepare(req).await);
    assert_eq!(code, tonic::Code::NotFound);
    assert!(msg.contains("app \"db\" is not declared"), "{msg}");

    // Uploads: for a stage never prepared; a chunk not requested; a chunk whose bytes lie.
    let upload = |stage: &str, chunks: Vec<v1::ContentChunk>| {
        let mut msgs = vec![v1::UploadRequest {
            msg: Some(v1::upload_request::Msg::Start(v1::UploadStart { app: "web".into(), stage_id: stage.into() })),
        }];
        msgs.extend(chunks.into_iter().map(|c| v1::UploadRequest { msg: Some(v1::upload_request::Msg::Chunk(c)) }));
        msgs.push(v1::UploadRequest { msg: Some(v1::upload_request::Msg::Finish(v1::UploadFinish {})) });
        tokio_stream_iter(msgs)
    };
    let e = c.upload(upload("9.9-abcdef01", vec![])).await.expect_err("never prepared");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("nothing prepared"), "{}", e.message());

    // Manifest deltas: against a release the host does not keep, or that do not give the claimed
    // manifest, the host asks for the whole manifest; a request with both is malformed.
    let base = Artifact::scan(&v1, None).expect("scan v1").manifest;
    let delta = ferry_proto::manifest::diff(&base, &good.manifest);
    let with_delta = |base_release: &str, hash: Vec<u8>| v1::PrepareRequest {
        app: "web".into(),
        version: "2".into(),
        manifest_hash: hash,
        base_release: base_release.into(),
        delta: Some(delta.clone()),
        ..Default::default()
    };
    let (code, msg) = code_and_message(c.prepare(with_delta("9-00000000", good.manifest_hash.to_vec())).await);
    assert_eq!(code, tonic::Code::FailedPrecondition, "{msg}");
    assert!(msg.contains("9-00000000 of the manifest delta is not kept"), "{msg}");
    let (code, msg) = code_and_message(c.prepare(with_delta(&r1.release_id, vec![7; 32])).await);
    assert_eq!(code, tonic::Code::FailedPrecondition, "{msg}");
    assert!(msg.contains("does not give the manifest hash"), "{msg}");
    let mut both = with_delta(&r1.release_id, good.manifest_hash.to_vec());
    both.manifest = Some(good.manifest.clone());
    let (code, _) = code_and_message(c.prepare(both).await);
    assert_eq!(code, tonic::Code::InvalidArgument);
    let by_delta = c.prepare(with_delta(&r1.release_id, good.manifest_hash.to_vec())).await.expect("delta applies");
    assert_eq!(by_delta.into_inner().release_id, good.release_id("2"));

    let p = c.prepare(prepare(good.manifest.clone(), "2")).await.expect("prepare v2").into_inner();
    assert!(!p.missing_chunks.is_empty());
    let stranger = v1::ContentChunk {
        hash: blake3::hash(b"not in v2").as_bytes().to_vec(),
        raw_length: 9,
        compression: 0,
        data: b"not in v2".to_vec(),
        ..Default::default()
    };
    let e = c.upload(upload(&p.stage_id, vec![stranger])).await.expect_err("not requested");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("not part of the prepared release"), "{}", e.message());

    let wanted = p.missing_chunks[0].clone();
    let liar =
        v1::ContentChunk { hash: wanted, raw_length: 5, compression: 0, data: b"bogus".to_vec(), ..Default::default() };
    let e = c.upload(upload(&p.stage_id, vec![liar])).await.expect_err("corrupt");
    assert_eq!(e.code(), tonic::Code::DataLoss);
    assert!(e.message().contains("does not match its hash"), "{}", e.message());

    // A delta against a basis the host never offered.
    let unknown = v1::ContentChunk {
        hash: p.missing_chunks[0].clone(),
        raw_length: 4,
        data: b"abcd".to_vec(),
        basis: vec![9; 16],
        ops: vec![v1::DeltaOp { basis_offset: 0, length: 4, literal: true }],
        ..Default::default()
    };
    let e = c.upload(upload(&p.stage_id, vec![unknown])).await.expect_err("unknown basis");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("was not offered"), "{}", e.message());

    // A decompression bomb: claims 10 bytes, inflates to far more.
    let bomb = zstd::bulk::compress(&vec![0u8; 200_000], 19).expect("compress");
    let b = v1::ContentChunk {
        hash: p.missing_chunks[0].clone(),
        raw_length: 10,
        compression: 1,
        data: bomb,
        ..Default::default()
    };
    let e = c.upload(upload(&p.stage_id, vec![b])).await.expect_err("bomb");
    assert_eq!(e.code(), tonic::Code::DataLoss, "{}", e.message());

    // Commit before the content arrived.
    let stream = c
        .commit(v1::CommitRequest {
            app: "web".into(),
            stage_id: p.stage_id.clone(),
            deployment_id: "d".into(),
            ..Default::default()
        })
        .await;
    let e = match stream {
        Err(e) => e,
        Ok(s) => s.into_inner().message().await.expect_err("commit must fail"),
    };
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("were never uploaded"), "{}", e.message());

    // Activate an unknown release; roll back where there is nothing to roll back to.
    let e = c
        .activate(v1::ActivateRequest { app: "web".into(), release_id: "7-00000000".into(), ..Default::default() })
        .await
        .map(|_| ())
        .expect_err("unknown release");
    assert_eq!(e.code(), tonic::Code::NotFound);
    // A unit the agent's config does not declare.
    let e = c
        .activate(v1::ActivateRequest {
            app: "web".into(),
            release_id: "1-00000000".into(),
            units: vec!["ssh.service".into()],
            ..Default::default()
        })
        .await
        .map(|_| ())
        .expect_err("undeclared unit");
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.message().contains("\"ssh.service\" is not declared"), "{}", e.message());

    // Through all of it, v1 stayed current and intact.
    assert_eq!(current(&s.app_root()), "1");
    let app = std::fs::read(s.app_root().join("bin/app")).expect("read");
    assert!(app == pseudo_random(2_000_000, 7));
}

fn tokio_stream_iter(msgs: Vec<v1::UploadRequest>) -> impl tokio_stream::Stream<Item = v1::UploadRequest> {
    tokio_stream::iter(msgs)
}

/// Replaces `path` (inside a kept release) the way a local user with write access to its
/// directory could: with a FIFO, a symlink, or a file of their own of the same size and mode.
enum Swapped {
    Fifo,
    Symlink(&'static str),
    Foreign,
}

fn tamper(path: &Path, how: Swapped) {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().expect("parent");
    let mode = std::fs::metadata(dir).expect("stat dir").permissions().mode();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    let old = std::fs::symlink_metadata(path).expect("stat");
    std::fs::remove_file(path).expect("remove");
    match how {
        Swapped::Fifo => nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o644)).expect("mkfifo"),
        Swapped::Symlink(to) => std::os::unix::fs::symlink(to, path).expect("symlink"),
        Swapped::Foreign => {
            std::fs::write(path, vec![b'X'; old.len() as usize]).expect("write");
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(old.mode() & 0o7777)).expect("chmod");
            std::os::unix::fs::chown(path, Some(65534), Some(65534)).expect("chown");
        }
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).expect("chmod dir back");
}

/// Every file of the tree at `root` equals the build output `src`, and is a regular file.
fn assert_same_files(root: &Path, src: &Path, files: &[(&str, Vec<u8>)]) {
    for (p, data) in files {
        let meta = std::fs::symlink_metadata(root.join(p)).expect("stat");
        assert!(meta.is_file(), "{p} is not a regular file on the host");
        assert!(std::fs::read(root.join(p)).expect("read") == *data, "{p} differs from {}", src.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_files_changed_on_disk_are_never_reused_and_never_block_the_agent() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "!!! SKIPPED kept_files_changed_on_disk_are_never_reused_and_never_block_the_agent: needs root to chown"
        );
        assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "CI=true must run this test as root");
        return;
    }
    let s = Setup::new().await;
    let v1 = build(s.dir.path(), "v1", &tree_v(1));
    let r1 = deploy_dir(&s.config, &s.tls, &v1, "1").await;
    assert_eq!(r1.status, DeploymentStatus::Succeeded, "{r1:?}");
    // A local user swaps files of the kept release v1: unchanged ones (hard-linked by v2) and
    // bin/app, whose unchanged chunks v2 reads back.
    let kept = s.data().join("releases").join(&r1.release_id);
    tamper(&kept.join("bin/app"), Swapped::Fifo);
    tamper(&kept.join("lib/1.so"), Swapped::Fifo);
    tamper(&kept.join("lib/2.so"), Swapped::Symlink("/etc/shadow"));
    tamper(&kept.join("static/a.css"), Swapped::Foreign);

    let mut files = tree_v(2);
    if let Some((_, app)) = files.iter_mut().find(|(p, _)| *p == "bin/app") {
        app[1_000_000..1_000_100].copy_from_slice(&[7u8; 100]);
    }
    let v2 = build(s.dir.path(), "v2", &files);
    let r2 = tokio::time::timeout(Duration::from_secs(60), deploy_dir(&s.config, &s.tls, &v2, "2"))
        .await
        .expect("the deploy must not hang on a FIFO in a kept release");
    assert_eq!(r2.status, DeploymentStatus::Succeeded, "{r2:?}");
    assert_eq!(current(&s.app_root()), "2");
    // The swapped files' content came from the coordinator, not from the kept release.
    assert!(r2.bytes_sent > 1_000_000, "the tampered content was sent again: {} bytes", r2.bytes_sent);
    assert_same_files(&s.data().join("releases").join(&r2.release_id), &v2, &files);
    let untouched = s.data().join("releases").join(&r2.release_id).join("lib/3.so");
    assert_eq!(
        std::fs::metadata(&untouched).expect("stat").ino(),
        std::fs::metadata(kept.join("lib/3.so")).expect("stat").ino(),
        "files nobody touched are still shared"
    );
}

#[test]
fn a_kept_file_swapped_after_prepare_fails_the_commit_at_once_and_is_sent_next_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ferry_agent::store::AppStore::new(dir.path().join("store"));
    let stage = |version: &str, art: &Artifact, upload: bool| {
        let p = store
            .prepare(version, ManifestSource::Whole(art.manifest.clone()), &art.manifest_hash, DiskSpace::UNLIMITED)
            .expect("prepare");
        if upload {
            let mut up = store.upload(&p.release_id).expect("upload");
            for h in &p.missing {
                let data = art.read_chunk(h).expect("chunk");
                let raw_length = data.len() as u64;
                up.put(&v1::ContentChunk { hash: h.clone(), raw_length, data, ..Default::default() }).expect("put");
            }
        }
        p
    };
    let a1 = Artifact::scan(&build(dir.path(), "v1", &tree_v(1)), None).expect("scan");
    let p1 = stage("1", &a1, true);
    store.commit(&p1.release_id, |_, _| {}).expect("commit v1");
    store.activate(&p1.release_id, "d1").expect("activate v1");

    let a2 = Artifact::scan(&build(dir.path(), "v2", &tree_v(2)), None).expect("scan");
    let p2 = stage("2", &a2, true);
    assert!(p2.missing_bytes < 100, "v2 reuses v1's files: {} bytes missing", p2.missing_bytes);
    let kept = dir.path().join("store/releases").join(&p1.release_id);
    tamper(&kept.join("static/a.css"), Swapped::Fifo);
    let (tx, rx) = std::sync::mpsc::channel();
    let commit_dir = dir.path().join("store");
    let id = p2.release_id.clone();
    std::thread::spawn(move || {
        let _ =
            tx.send(ferry_agent::store::AppStore::new(commit_dir).commit(&id, |_, _| {}).map_err(|e| e.to_string()));
    });
    let err = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the commit must not block on a FIFO")
        .expect_err("a swapped kept file must not be reused");
    assert!(err.contains("static/a.css") && err.contains("it is a FIFO") && err.contains("deploy again"), "{err}");
    assert_eq!(store.current().expect("current").as_deref(), Some(p1.release_id.as_str()), "v1 stays current");
    // The next Prepare asks for that content instead of trusting the kept file.
    let again = stage("2", &a2, false);
    let css = a2.manifest.entries.iter().find(|e| e.path == "static/a.css").expect("static/a.css");
    assert!(css.chunks.iter().all(|c| again.missing.contains(&c.hash)), "static/a.css must be asked for");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_that_cannot_be_recorded_is_put_back_and_says_so() {
    let s = Setup::new().await;
    let v1 = build(s.dir.path(), "v1", &tree_v(1));
    assert_eq!(deploy_dir(&s.config, &s.tls, &v1, "1").await.status, DeploymentStatus::Succeeded);
    // The journal cannot be appended to (here: something else is in its place).
    let journal = s.data().join("journal");
    let kept = std::fs::read(&journal).expect("journal");
    std::fs::remove_file(&journal).expect("rm");
    std::fs::create_dir(&journal).expect("mkdir");
    let v2 = build(s.dir.path(), "v2", &tree_v(2));
    let r = deploy_dir(&s.config, &s.tls, &v2, "2").await;
    assert_eq!(r.status, DeploymentStatus::Failed, "{r:?}");
    let error = r.hosts[0].error.clone().unwrap_or_default();
    assert!(error.contains("journal") && error.contains("was put back to 1-"), "{error}");
    assert!(error.contains("nothing was changed"), "{error}");
    assert_eq!(current(&s.app_root()), "1", "the host runs what it ran");
    std::fs::remove_dir(&journal).expect("rmdir");
    std::fs::write(&journal, kept).expect("restore journal");
    let r = deploy_dir(&s.config, &s.tls, &v2, "2").await;
    assert_eq!(r.status, DeploymentStatus::Succeeded, "{r:?}");
    assert_eq!(current(&s.app_root()), "2");
}

#[test]
fn a_full_disk_is_refused_early_with_numbers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let art = Artifact::scan(&build(dir.path(), "v1", &tree_v(1)), None).expect("scan");
    let store = ferry_agent::store::AppStore::new(dir.path().join("store"));
    let err = store
        .prepare(
            "1",
            ManifestSource::Whole(art.manifest.clone()),
            &art.manifest_hash,
            DiskSpace { free: 1_000_000, total: 1 << 30 },
        )
        .expect_err("no room")
        .to_string();
    assert!(err.contains("not enough disk space") && err.contains("1000000 bytes free"), "{err}");
    assert!(err.contains("staging needs"), "{err}");
    // Nothing was written: the refusal comes before any bookkeeping.
    assert!(!dir.path().join("store/staging").exists());
}

/// A release needs room for its new content plus the margin (0.1 % of the filesystem, 2 to 64
/// MiB), and no more: chunks go straight into their files, so nothing is held twice. One byte
/// less is refused, naming both numbers.
#[test]
fn the_disk_check_asks_for_the_new_content_plus_the_margin_and_no_more() {
    use ferry_agent::store::margin;
    assert_eq!((margin(1 << 30), margin(10 << 30), margin(1 << 50)), (2 << 20, (10 << 30) / 1000, 64 << 20));
    let dir = tempfile::tempdir().expect("tempdir");
    let art = Artifact::scan(&build(dir.path(), "v1", &tree_v(1)), None).expect("scan");
    let new = ferry_proto::manifest::total_bytes(&art.manifest);
    let total = 4u64 << 30;
    let need = new + margin(total);
    let prepare = |store: &str, free: u64| {
        ferry_agent::store::AppStore::new(dir.path().join(store)).prepare(
            "1",
            ManifestSource::Whole(art.manifest.clone()),
            &art.manifest_hash,
            DiskSpace { free, total },
        )
    };
    prepare("fits", need).expect("exactly enough room");
    let err = prepare("tight", need - 1).expect_err("one byte short").to_string();
    assert!(err.contains(&format!("{} bytes free, staging needs {need}", need - 1)), "{err}");
    assert!(err.contains(&format!("({new} bytes of new content plus a margin of {}", margin(total))), "{err}");
}

/// An upload cut midway resumes where it stopped. A staged file whose content is wrong (a torn
/// write, a change on disk) never reaches a release: the commit refuses it and drops the stage,
/// and the next Prepare asks for every chunk again.
#[test]
fn an_upload_cut_midway_resumes_and_a_wrong_staged_file_is_never_trusted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ferry_agent::store::AppStore::new(dir.path().join("store"));
    let art = Artifact::scan(&build(dir.path(), "v1", &tree_v(1)), None).expect("scan");
    let prepare = || {
        store
            .prepare("1", ManifestSource::Whole(art.manifest.clone()), &art.manifest_hash, DiskSpace::UNLIMITED)
            .expect("prepare")
    };
    let put = |hashes: &[Vec<u8>]| {
        let mut up = store.upload(&prepare().release_id).expect("upload");
        for h in hashes {
            let data = art.read_chunk(h).expect("chunk");
            let raw_length = data.len() as u64;
            up.put(&v1::ContentChunk { hash: h.clone(), raw_length, data, ..Default::default() }).expect("put");
        }
    };
    let p = prepare();
    let all = p.missing.clone();
    assert!(all.len() > 4, "{} chunks", all.len());
    put(&all[..all.len() / 2]);
    let err = store.commit(&p.release_id, |_, _| {}).expect_err("half uploaded").to_string();
    assert!(err.contains("were never uploaded"), "{err}");
    assert_eq!(prepare().missing, all[all.len() / 2..].to_vec(), "the upload resumes where it stopped");
    put(&all[all.len() / 2..]);
    // bin/app, as staged, gets a byte changed.
    let n = art.manifest.entries.iter().position(|e| e.path == "bin/app").expect("bin/app");
    let staged = dir.path().join("store/staging").join(&p.release_id).join("files").join(n.to_string());
    let mut bytes = std::fs::read(&staged).expect("the staged file");
    bytes[1000] ^= 0xff;
    std::fs::write(&staged, bytes).expect("write");
    let err = store.commit(&p.release_id, |_, _| {}).expect_err("wrong content").to_string();
    assert!(err.contains("bin/app: the assembled file does not match its hash"), "{err}");
    assert!(store.current().expect("current").is_none(), "nothing was promoted");
    assert!(!dir.path().join("store/staging").join(&p.release_id).exists(), "the stage is gone");
    assert_eq!(prepare().missing, all, "every chunk is asked for again");
    put(&all);
    store.commit(&p.release_id, |_, _| {}).expect("commit");
    store.activate(&p.release_id, "d1").expect("activate");
    assert_release_intact(&dir.path().join("store"));
}

#[test]
fn enospc_during_staging_fails_cleanly() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("!!! SKIPPED enospc_during_staging_fails_cleanly: needs root to mount a small tmpfs");
        assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "CI=true must run this test as root");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let small = dir.path().join("small");
    std::fs::create_dir(&small).expect("mkdir");
    let mounted =
        Command::new("mount").args(["-t", "tmpfs", "-o", "size=3m", "tmpfs"]).arg(&small).status().expect("mount");
    assert!(mounted.success());
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(small.clone());

    // v1 (small) is current; v2 lies about the free space so staging starts, then hits ENOSPC.
    let store = ferry_agent::store::AppStore::new(small.join("store"));
    let v1 = Artifact::scan(&build(dir.path(), "v1", &[("VERSION", b"1\n".to_vec())]), None).expect("scan");
    let p = store
        .prepare("1", ManifestSource::Whole(v1.manifest.clone()), &v1.manifest_hash, DiskSpace::UNLIMITED)
        .expect("prepare");
    let mut up = store.upload(&p.release_id).expect("upload");
    for h in &p.missing {
        let data = v1.read_chunk(h).expect("chunk");
        up.put(&v1::ContentChunk {
            hash: h.clone(),
            raw_length: data.len() as u64,
            compression: 0,
            data,
            ..Default::default()
        })
        .expect("put");
    }
    store.commit(&p.release_id, |_, _| {}).expect("commit v1");
    store.activate(&p.release_id, "d1").expect("activate v1");

    let v2 = Artifact::scan(
        &build(dir.path(), "v2", &[("VERSION", b"2\n".to_vec()), ("big", pseudo_random(3_500_000, 9))]),
        None,
    )
    .expect("scan");
    let p2 = store
        .prepare("2", ManifestSource::Whole(v2.manifest.clone()), &v2.manifest_hash, DiskSpace::UNLIMITED)
        .expect("prepare v2");
    let mut up = store.upload(&p2.release_id).expect("upload");
    let mut failed = None;
    for h in &p2.missing {
        let data = v2.read_chunk(h).expect("chunk");
        if let Err(e) = up.put(&v1::ContentChunk {
            hash: h.clone(),
            raw_length: data.len() as u64,
            compression: 0,
            data,
            ..Default::default()
        }) {
            failed = Some(e.to_string());
            break;
        }
    }
    let err = match failed {
        Some(e) => e,
        None => store.commit(&p2.release_id, |_, _| {}).expect_err("the disk fills while building").to_string(),
    };
    assert!(err.contains("is full (ENOSPC)"), "{err}");
    assert_eq!(store.current().expect("current").as_deref(), Some(p.release_id.as_str()), "v1 stays current");
    assert_eq!(std::fs::read_to_string(small.join("store/current/VERSION")).expect("read"), "1\n");
}

// ---- crash safety -------------------------------------------------------------------------------

/// Every entry of the current release matches the manifest the agent recorded for it.
fn assert_release_intact(data: &Path) {
    use prost::Message;
    let id = std::fs::read_link(data.join("current")).expect("current exists");
    let id = id.file_name().expect("name").to_string_lossy().into_owned();
    let bytes = std::fs::read(data.join("manifests").join(format!("{id}.manifest"))).expect("manifest of current");
    let m = v1::Manifest::decode(bytes.as_slice()).expect("decode");
    for e in &m.entries {
        let p = data.join("releases").join(&id).join(&e.path);
        if e.kind == v1::EntryKind::File as i32 {
            let content = std::fs::read(&p).expect("file of the current release");
            assert_eq!(blake3::hash(&content).as_bytes().as_slice(), e.hash.as_slice(), "{}", e.path);
        } else {
            assert!(std::fs::symlink_metadata(&p).is_ok(), "{} missing", e.path);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_each_failpoint_leaves_the_old_or_the_new_release() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let files = pki.issue("web-1", Role::Agent, &["127.0.0.1"]);
    // A fixed port: the agent is restarted between phases.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        l.local_addr().expect("addr").port()
    };
    let config_path = dir.path().join("agent.toml");
    std::fs::write(
        &config_path,
        agent_toml(&files, &dir.path().join("data")).replace("127.0.0.1:0", &format!("127.0.0.1:{port}")),
    )
    .expect("write config");
    let ctl = pki.issue("ctl", Role::Coordinator, &[]);
    let config = fleet_config(dir.path(), &ctl, &[("web-1", format!("127.0.0.1:{port}"))]);
    let tls = ctl.client_tls();
    let data = dir.path().join("data/apps/web");
    let wait_up = || async {
        let host = Host { name: "web-1".into(), address: "127.0.0.1".into(), port };
        for _ in 0..100 {
            if Agent::connect(&host, &tls, TIMEOUTS).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the agent did not come up");
    };

    let v1 = build(dir.path(), "v1", &tree_v(1));
    {
        let _agent = AgentProcess::start(&config_path, None, None);
        wait_up().await;
        assert_eq!(deploy_dir(&config, &tls, &v1, "1").await.status, DeploymentStatus::Succeeded);
    }
    for (n, failpoint) in ["after-upload", "mid-materialize", "before-promote", "before-swap-rename"].iter().enumerate()
    {
        let version = format!("{}", n + 2);
        let tree = build(dir.path(), &format!("v{version}"), &tree_v(n as u32 + 2));
        {
            let mut agent = AgentProcess::start(&config_path, Some(failpoint), None);
            wait_up().await;
            let r = deploy_dir(&config, &tls, &tree, &version).await;
            assert_eq!(r.status, DeploymentStatus::Failed, "{failpoint}: {r:?}");
            assert!(agent.wait_killed(), "{failpoint}: the agent was not killed at the failpoint");
        }
        // On disk right after the kill: current still names a complete, intact release.
        assert_release_intact(&data);
        let _agent = AgentProcess::start(&config_path, None, None);
        wait_up().await;
        // The restarted agent cleaned staging and serves the old release.
        assert_eq!(std::fs::read_dir(data.join("staging")).expect("ls").count(), 0, "{failpoint}: staging not cleaned");
        assert!(
            !std::fs::read_dir(data.join("releases"))
                .expect("ls")
                .any(|e| e.map(|e| e.file_name().to_string_lossy().starts_with('.')).unwrap_or(false)),
            "{failpoint}: a hidden partial release remains"
        );
        let cur = std::fs::read_to_string(data.join("current/VERSION")).expect("read");
        assert_eq!(cur.trim(), format!("{}", n + 1), "{failpoint}: the old release must still be current");
        // And the same deployment now goes through.
        let r = deploy_dir(&config, &tls, &tree, &version).await;
        assert_eq!(r.status, DeploymentStatus::Succeeded, "{failpoint}: {r:?}");
        assert_release_intact(&data);
    }
}

/// `request_timeout` bounds unary calls only: an activation that honestly takes longer (slow hooks,
/// restarts, probes) must not fail on the coordinator while the agent carries on. (The upload
/// variant of this, which did fail before, is proven on the fleet with a rate-limited link.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_activation_longer_than_request_timeout_succeeds() {
    let s = Setup::new().await;
    let toml_path = s.dir.path().join("fleet.toml");
    let text = std::fs::read_to_string(&toml_path)
        .expect("read")
        .replace("request_timeout = \"5s\"", "request_timeout = \"1s\"")
        .replace("[tls]", "[app.hooks]\nvalidate = \"hooks/slow\"\n\n[tls]");
    std::fs::write(&toml_path, &text).expect("write");
    let config = FleetConfig::from_toml(&toml_path, &text).expect("valid");
    let mut files = tree_v(1);
    files.push(("hooks/slow", b"#!/bin/sh\nsleep 2\necho slow but fine\n".to_vec()));
    let dir = build(s.dir.path(), "v1", &files);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join("hooks/slow"), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let r = deploy_dir(&config, &s.tls, &dir, "1").await;
    assert_eq!(r.status, DeploymentStatus::Succeeded, "{r:?}");
    assert!(r.hosts[0].duration_ms >= 2000, "the hook ran: {r:?}");
}

/// `[app] shared`, `shared_files`, `user` and `group`: the app's state lives once per host,
/// outside the releases, owned by the app's user; it survives deploys and rollbacks; the release
/// itself belongs to root and the app's group, and nothing in it is writable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_paths_outlive_releases_and_belong_to_the_app_user() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: ownership needs root");
        return;
    }
    use ferry_coordinator::artifact::Layout;
    let mut s = Setup::new().await;
    s.config.app.shared = vec!["log".into(), "public/uploads".into()];
    s.config.app.shared_files = vec!["config/local.yml".into()];
    s.config.app.user = Some("nobody".into());
    s.config.app.group = Some("nogroup".into());
    let nobody = nix::unistd::User::from_name("nobody").expect("lookup").expect("nobody exists");
    let nogroup = nix::unistd::Group::from_name("nogroup").expect("lookup").expect("nogroup exists");
    let deploy = |s: &Setup, dir: PathBuf, v: &'static str| {
        let layout = Layout::of(&s.config.app);
        let (config, tls) = (s.config.clone(), s.tls.clone());
        async move {
            let artifact = Arc::new(Artifact::scan_for(&dir, None, &layout, u64::MAX).expect("scan"));
            ferry_tests::engine::deploy(&config, &tls, "test", artifact, v, None).await.expect("deploy runs")
        }
    };
    let tree = |v: &str| -> Vec<(&'static str, Vec<u8>)> {
        vec![
            ("VERSION", format!("{v}\n").into_bytes()),
            ("public/index.html", format!("<h1>{v}</h1>").into_bytes()),
            ("config/app.yml", b"name: web\n".to_vec()),
        ]
    };
    let r1 = deploy(&s, build(s.dir.path(), "s1", &tree("1")), "1").await;
    assert_eq!(r1.status, DeploymentStatus::Succeeded, "{r1:?}");

    // The app writes its state through its root, as it would.
    let root = s.app_root();
    let append = |rel: &str, line: &str| {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).create(true).open(root.join(rel)).expect("open");
        writeln!(f, "{line}").expect("write");
    };
    append("log/app.log", "written under 1");
    append("public/uploads/avatar.png", "png");
    let shared = s.data().join("shared");
    let meta = |p: PathBuf| std::fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    for (rel, uid, mode) in
        [("log", nobody.uid, 0o750), ("public/uploads", nobody.uid, 0o750), ("config/local.yml", nobody.uid, 0o640)]
    {
        let m = meta(shared.join(rel));
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (uid.as_raw(), nogroup.gid.as_raw(), mode), "{rel}");
    }
    assert_eq!(meta(shared.join("public")).uid(), 0, "the directories leading to a shared path stay root's");
    assert_eq!(meta(shared.join("config/local.yml")).len(), 0, "a shared file the host lacked is created empty");
    let release = s.data().join("releases").join(&r1.release_id);
    for rel in ["VERSION", "public/index.html", "config/app.yml", "public", ""] {
        let m = meta(release.join(rel));
        assert_eq!((m.uid(), m.gid()), (0, nogroup.gid.as_raw()), "{rel:?} belongs to root and the app's group");
        assert_eq!(m.mode() & 0o222 & if m.is_dir() { 0o022 } else { 0o222 }, 0, "{rel:?} is not writable by the app");
    }

    // Deploy 2, roll back to 1: the state is there throughout.
    let r2 = deploy(&s, build(s.dir.path(), "s2", &tree("2")), "2").await;
    assert_eq!(r2.status, DeploymentStatus::Succeeded, "{r2:?}");
    assert_eq!(current(&root), "2");
    append("log/app.log", "written under 2");
    let rb = rollback(&s.config, &s.tls, None).await;
    assert_eq!(rb.status, DeploymentStatus::Succeeded, "{rb:?}");
    assert_eq!(current(&root), "1");
    let log = std::fs::read_to_string(root.join("log/app.log")).expect("the log through the app root");
    assert_eq!(log, "written under 1\nwritten under 2\n");
    assert_eq!(std::fs::read_to_string(root.join("public/uploads/avatar.png")).expect("upload"), "png\n");

    // A build that ships a shared path is refused as it is scanned, before any host changes.
    let mut bad = tree("3");
    bad.push(("log/old.log", b"from the build".to_vec()));
    let bad = build(s.dir.path(), "s3", &bad);
    let e = Artifact::scan_for(&bad, None, &Layout::of(&s.config.app), u64::MAX).expect_err("refused").to_string();
    assert!(e.contains("it ships \"log/old.log\", inside the shared path \"log\" ([app] shared in fleet.toml)"), "{e}");

    // A shared path the app's user replaced with a symlink is never followed by the agent.
    let log_dir = shared.join("log");
    std::fs::rename(&log_dir, shared.join("log.moved")).expect("move");
    std::os::unix::fs::symlink("/etc", &log_dir).expect("plant a symlink");
    let r4 = deploy(&s, build(s.dir.path(), "s4", &tree("4")), "4").await;
    assert_eq!(r4.status, DeploymentStatus::Failed, "{r4:?}");
    let error = r4.hosts[0].error.clone().unwrap_or_default();
    assert!(error.contains("it is not the directory ferry made"), "{error}");
    assert_eq!(meta(PathBuf::from("/etc")).uid(), 0, "/etc was not given to the app's user");
    assert_eq!(current(&root), "1", "nothing changed on the host");
    std::fs::remove_file(&log_dir).expect("remove the symlink");
    std::fs::rename(shared.join("log.moved"), &log_dir).expect("move back");

    // An app user the host does not have refuses the deployment before anything changes.
    s.config.app.user = Some("ferry-no-such-user".into());
    s.config.app.group = None;
    let r5 = deploy(&s, build(s.dir.path(), "s5", &tree("5")), "5").await;
    assert_eq!(r5.status, DeploymentStatus::Failed, "{r5:?}");
    let error = r5.hosts[0].error.clone().unwrap_or_default();
    assert!(error.contains("the app's user \"ferry-no-such-user\" does not exist on this host"), "{error}");
    assert_eq!(current(&root), "1");
    assert!(!s.data().join("staging").join("5").exists());
}

/// `[[app.templates]]`, `[app] env_file` and `[environments.X] vars` / `env`: each host renders its
/// files at staging with its environment's values and its own name and address; a changed value
/// is a new release that sends no content, and a rollback brings the old values back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_render_per_environment_and_host_and_a_config_change_is_a_tiny_release() {
    use ferry_coordinator::artifact::Layout;
    use ferry_coordinator::config::TemplateConfig;
    let mut s = Setup::new().await;
    s.config.app.templates =
        vec![TemplateConfig { template: "config/app.yml.tmpl".into(), path: "config/app.yml".into(), mode: 0o640 }];
    s.config.app.env_file = Some("config/app.env".into());
    let set_vars = |s: &mut Setup, db: &str| {
        let e = s.config.environments.get_mut("test").expect("env test");
        e.vars = [("db_host".to_string(), db.to_string())].into();
        e.labels = [("web-1".to_string(), [("zone".to_string(), "eu-1a".to_string())].into())].into();
        e.env = [
            ("DB_URL".to_string(), "postgres://{{ vars.db_host }}/app".to_string()),
            ("RAILS_ENV".to_string(), "say \"{{ env }}\"".to_string()),
        ]
        .into();
    };
    set_vars(&mut s, "db-1.test");
    let build = build(
        s.dir.path(),
        "t1",
        &[
            ("VERSION", b"1\n".to_vec()),
            ("bin/app", pseudo_random(300_000, 3)),
            (
                "config/app.yml.tmpl",
                b"env: {{ env }}\nhost: {{host}} ({{ address }}) in {{ labels.zone }}\nversion: {{ version }}\ndb: {{ vars.db_host }}\n"
                    .to_vec(),
            ),
        ],
    );
    let deploy = |s: &Setup, v: &'static str| {
        let layout = Layout::for_env(&s.config, "test");
        let (config, tls, dir) = (s.config.clone(), s.tls.clone(), build.clone());
        async move {
            let artifact = Arc::new(Artifact::scan_for(&dir, None, &layout, u64::MAX).expect("scan"));
            ferry_tests::engine::deploy(&config, &tls, "test", artifact, v, None).await.expect("deploy runs")
        }
    };
    let r1 = deploy(&s, "1").await;
    assert_eq!(r1.status, DeploymentStatus::Succeeded, "{r1:?}");
    let root = s.app_root();
    let read = |rel: &str| std::fs::read_to_string(root.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    assert_eq!(read("config/app.yml"), "env: test\nhost: web-1 (127.0.0.1) in eu-1a\nversion: 1\ndb: db-1.test\n");
    assert_eq!(read("config/app.env"), "DB_URL=\"postgres://db-1.test/app\"\nRAILS_ENV=\"say \\\"test\\\"\"\n");
    let meta = std::fs::metadata(root.join("config/app.yml")).expect("stat");
    assert_eq!(meta.mode() & 0o777, 0o440, "rendered files are read-only like the rest of the release");

    // Only a value changes: a new release, no content crosses the wire.
    set_vars(&mut s, "db-2.test");
    let r2 = deploy(&s, "1").await;
    assert_eq!(r2.status, DeploymentStatus::Succeeded, "{r2:?}");
    assert_ne!(r2.release_id, r1.release_id, "a changed value is a new release");
    assert!(r2.bytes_sent < 2_000, "a config-only change sends the manifest's changes only: {} bytes", r2.bytes_sent);
    assert!(read("config/app.yml").ends_with("db: db-2.test\n"));
    assert!(read("config/app.env").starts_with("DB_URL=\"postgres://db-2.test/app\""));

    // A rollback brings the old values back, with the old release.
    let rb = rollback(&s.config, &s.tls, None).await;
    assert_eq!(rb.status, DeploymentStatus::Succeeded, "{rb:?}");
    assert!(read("config/app.yml").ends_with("db: db-1.test\n"));

    // A label a host lacks, and a placeholder without a value, are refused as the build is
    // scanned, before any host changes.
    s.config.environments.get_mut("test").expect("env").labels.clear();
    let e = Artifact::scan_for(&build, None, &Layout::for_env(&s.config, "test"), u64::MAX).expect_err("refused");
    assert!(
        e.to_string().contains("{{ labels.zone }}: host(s) web-1 of environment test have no label \"zone\""),
        "{e}"
    );
    set_vars(&mut s, "db-1.test");
    s.config.environments.get_mut("test").expect("env").vars.clear();
    let e = Artifact::scan_for(&build, None, &Layout::for_env(&s.config, "test"), u64::MAX).expect_err("refused");
    assert!(
        e.to_string()
            .contains("template \"config/app.yml.tmpl\", line 4: {{ vars.db_host }} has no value in environment test"),
        "{e}"
    );
}

/// Secrets reach the agent with the activation only: written to `secrets_dir/<app>/<release>/`,
/// named by path in rendered files, never in the manifest, the release, the registry or the
/// audit log; a changed value restarts the release in place, an unchanged one changes nothing;
/// a rollback brings back the values the old release had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_travel_with_the_activation_only_and_a_changed_value_restarts_in_place() {
    use ferry_coordinator::artifact::Layout;
    use ferry_coordinator::config::TemplateConfig;
    use ferry_coordinator::secrets::Secrets;
    let mut s = Setup::new().await;
    s.config.app.templates =
        vec![TemplateConfig { template: "app.conf.tmpl".into(), path: "app.conf".into(), mode: 0o640 }];
    let e = s.config.environments.get_mut("test").expect("env test");
    e.secrets = [(
        "db_password".to_string(),
        ferry_coordinator::config::SecretSource {
            file: None,
            command: Some("unused: the test brings the values".into()),
            timeout: Duration::from_secs(1),
        },
    )]
    .into();
    let deploy = |s: &Setup, v: &'static str, value: &'static str| {
        let layout = Layout::for_env(&s.config, "test");
        let (config, tls) = (s.config.clone(), s.tls.clone());
        let dir = build(
            s.dir.path(),
            &format!("sec{v}"),
            &[
                ("VERSION", format!("{v}\n").into_bytes()),
                ("app.conf.tmpl", b"password_file = {{ secrets.db_password }}\n".to_vec()),
            ],
        );
        async move {
            let artifact = Artifact::scan_for(&dir, None, &layout, u64::MAX).expect("scan");
            let artifact = artifact.with_secrets(Secrets::from_values([("db_password".into(), value.into())]));
            ferry_tests::engine::deploy(&config, &tls, "test", Arc::new(artifact), v, None).await.expect("deploy runs")
        }
    };
    let secrets_dir = PathBuf::from(format!("{}-secrets/web", s.dir.path().join("data").display()));
    let r1 = deploy(&s, "1", "hunter2-one").await;
    assert_eq!(r1.status, DeploymentStatus::Succeeded, "{r1:?}");
    let file = secrets_dir.join(&r1.release_id).join("db_password");
    assert_eq!(std::fs::read_to_string(&file).expect("the secret"), "hunter2-one");
    let conf = std::fs::read_to_string(s.app_root().join("app.conf")).expect("rendered");
    assert_eq!(conf, format!("password_file = {}\n", file.display()), "the release names the file, not the value");

    // The same value again: nothing to do. A new value: the release is activated again in place.
    let same = deploy(&s, "1", "hunter2-one").await;
    assert_eq!(same.hosts[0].status, HostOutcome::Unchanged, "{same:?}");
    let rotated = deploy(&s, "1", "hunter2-two").await;
    assert_eq!(rotated.hosts[0].status, HostOutcome::Succeeded, "{rotated:?}");
    assert_eq!(rotated.release_id, r1.release_id, "a secret is not part of the release");
    assert_eq!(std::fs::read_to_string(&file).expect("the secret"), "hunter2-two");

    // A new value the app fails with is rolled back in place: the host runs on the old value.
    s.config.app.health = vec![
        serde_json::from_value(serde_json::json!({
            "name": "secret",
            "exec": ["sh", "-c", "test \"$(cat \"$(sed -n 's/^password_file = //p' app.conf)\")\" != hunter2-broken"],
            "interval": "50ms",
            "retries": 2,
        }))
        .expect("probe"),
    ];
    let broken = deploy(&s, "1", "hunter2-broken").await;
    assert_eq!(broken.status, DeploymentStatus::Failed, "{broken:?}");
    assert_eq!(broken.hosts[0].status, HostOutcome::RolledBack, "{broken:?}");
    assert_eq!(std::fs::read_to_string(&file).expect("the secret"), "hunter2-two", "the old value is back");
    s.config.app.health.clear();

    // Release 2 with its own value; a rollback goes back to release 1 and the value it had.
    let r2 = deploy(&s, "2", "hunter2-three").await;
    assert_eq!(r2.status, DeploymentStatus::Succeeded, "{r2:?}");
    let rb = rollback(&s.config, &s.tls, None).await;
    assert_eq!(rb.status, DeploymentStatus::Succeeded, "{rb:?}");
    let conf = std::fs::read_to_string(s.app_root().join("app.conf")).expect("rendered");
    assert!(conf.contains(&r1.release_id), "{conf}");
    assert_eq!(std::fs::read_to_string(&file).expect("the secret"), "hunter2-two");

    // No value anywhere but in the secrets directory: not in the store (releases, manifests,
    // journal), the audit log or the registry.
    let found = grep_tree(s.dir.path(), "hunter2", &secrets_dir);
    assert!(found.is_empty(), "a secret value leaked into: {found:?}");

    // A secret gone from the host (a reboot empties the tmpfs) is said, not ignored.
    std::fs::remove_dir_all(&secrets_dir).expect("reboot");
    let again = rollback(&s.config, &s.tls, Some("2")).await;
    assert_eq!(again.status, DeploymentStatus::Failed, "{again:?}");
    let error = again.hosts[0].error.clone().unwrap_or_default();
    assert!(error.contains("the secrets [db_password] of this release are not on this host"), "{error}");
}

/// Files under `root` (but not under `except`) whose bytes contain `needle`.
fn grep_tree(root: &Path, needle: &str, except: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&p) else { continue };
            if p.starts_with(except) {
                continue;
            }
            if meta.is_dir() {
                todo.push(p);
            } else if meta.is_file()
                && std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes()))
            {
                found.push(p);
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_uploads_go_no_faster_than_peer_upload_mbit() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    // Both agents serve peers at 8 Mbit/s (a million bytes a second) at most.
    let mut agents = Vec::new();
    for name in ["web-1", "web-2"] {
        let files = pki.issue(name, Role::Agent, &["127.0.0.1"]);
        let data = dir.path().join(format!("data-{name}"));
        agents.push(TestAgent::start_with(&files, &data, "peer_upload_mbit = 8").await.expect("start agent"));
    }
    let ctl = pki.issue("ctl", Role::Coordinator, &[]);
    let hosts: Vec<(&str, String)> = vec![("web-1", agents[0].addr.to_string()), ("web-2", agents[1].addr.to_string())];
    let config = fleet_config(dir.path(), &ctl, &hosts);
    assert!(config.peer_fetch, "peer fetch is on by default");
    let size = 4_000_000;
    let v1 = build(dir.path(), "v1", &[("VERSION", b"1\n".to_vec()), ("bin/app", pseudo_random(size, 31))]);

    let started = std::time::Instant::now();
    let report = deploy_dir(&config, &ctl.client_tls(), &v1, "1").await;
    let took = started.elapsed();
    assert_eq!(report.status, DeploymentStatus::Succeeded, "{report:?}");
    // One host got the release from the coordinator, the other from it: the incompressible 4 MB
    // came paced to a million bytes a second, so no sooner than 4 s after the first chunk.
    let from_peers: u64 = report.hosts.iter().map(|h| h.bytes_from_peers).sum();
    assert!(from_peers >= size as u64, "one host fetched the release from the other: {report:?}");
    assert!(took >= Duration::from_millis(3_500), "4 MB at 8 Mbit/s went in {took:?}");
    for (i, _) in agents.iter().enumerate() {
        let root = PathBuf::from(format!("{}-web", dir.path().join(format!("data-web-{}", i + 1)).display()));
        assert_eq!(current(&root), "1");
    }
}
