//! Client compatibility at the edges: etcdctl 3.4 (the one Debian and Ubuntu ship) given
//! endpoints with an `http://` scheme, and `MoveLeader` answered exactly as etcd answers it,
//! compared against a real etcd 3.5.1.

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Client, MemberAddOptions};

use crate::cluster::Cluster;
use crate::harness::{Cairn, Etcd, etcdctl_binary, free_port};

/// Runs Debian's etcdctl (3.4 in CI) and returns its stdout, failing the test on an error.
fn etcdctl(args: &[&str]) -> String {
    etcdctl_output(args).0
}

/// Runs Debian's etcdctl and returns (stdout, stderr), failing the test on an error
/// (`endpoint health` reports on stderr).
fn etcdctl_output(args: &[&str]) -> (String, String) {
    let out = etcdctl_command().args(args).output().unwrap();
    assert!(out.status.success(), "etcdctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (text(&out.stdout), text(&out.stderr))
}

/// Debian's etcdctl with the v3 API, without the harness's `ETCDCTL_BIN` (etcdctl reads every
/// ETCDCTL_* variable and warns about unknown ones).
fn etcdctl_command() -> Command {
    let mut cmd = Command::new(etcdctl_binary().expect("etcdctl"));
    cmd.env("ETCDCTL_API", "3").env_remove("ETCDCTL_BIN");
    cmd
}

/// The commands of etcd's guides, each given `--endpoints` with the `http://` scheme.
fn run_guide_commands(endpoints: &str, cluster: bool) {
    let e = format!("--endpoints={endpoints}");
    let with_cluster = |cmd: &[&str]| {
        let mut args = vec![e.as_str()];
        args.extend_from_slice(cmd);
        if cluster {
            args.push("--cluster");
        }
        let (stdout, stderr) = etcdctl_output(&args);
        stdout + &stderr
    };
    let status = with_cluster(&["endpoint", "status"]);
    let health = with_cluster(&["endpoint", "health"]);
    let members = endpoints.split(',').count().max(if cluster { 3 } else { 1 });
    assert_eq!(status.lines().filter(|l| l.starts_with("http://")).count(), members, "{status}");
    assert_eq!(health.matches("is healthy").count(), members, "{health}");
    assert_eq!(etcdctl(&[&e, "put", "greeting", "hello"]), "OK\n");
    assert_eq!(etcdctl(&[&e, "get", "greeting"]), "greeting\nhello\n");
    assert_eq!(etcdctl(&[&e, "member", "list"]).lines().count(), members);

    // `watch` streams: start it, write, and read the event it prints.
    let mut watch = etcdctl_command()
        .args([e.as_str(), "watch", "greeting"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut stdout = watch.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        let mut all = String::new();
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            all.push_str(&String::from_utf8_lossy(&buf[..n]));
            if all.contains("world") {
                break;
            }
        }
        all
    });
    // The watch is registered once etcdctl connected; keep writing until the event shows.
    while !reader.is_finished() && Instant::now() < deadline {
        etcdctl(&[&e, "put", "greeting", "world"]);
        std::thread::sleep(Duration::from_millis(300));
    }
    // Killing etcdctl closes its stdout, which ends the reader.
    let _ = watch.kill();
    let _ = watch.wait();
    let seen = reader.join().unwrap();
    assert!(seen.contains("PUT\ngreeting\nworld"), "watch printed {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_34_works_with_http_endpoints_on_one_member() {
    if !crate::etcdctl::have_etcdctl() {
        return;
    }
    let srv = Cairn::start().await;
    let ep = srv.client_url.clone();
    assert!(ep.starts_with("http://"));
    tokio::task::spawn_blocking(move || run_guide_commands(&ep, false)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_34_cluster_commands_work_with_http_endpoints() {
    if !crate::etcdctl::have_etcdctl() {
        return;
    }
    let cluster = Cluster::start(3, &[]).await;
    let all = cluster.endpoints().join(",");
    let first = cluster.endpoints()[0].clone();
    tokio::task::spawn_blocking(move || {
        run_guide_commands(&all, true);
        run_guide_commands(&first, true);
    })
    .await
    .unwrap();
}

/// What a client sees of one MoveLeader call: the response's header presence, or the error.
#[derive(Clone, Debug, PartialEq)]
enum Moved {
    /// Success; `true` when the response carried a header.
    Ok { header: bool },
    /// The gRPC error's code and message.
    Err(tonic::Code, String),
}

async fn move_leader(client: &mut Client, target: u64) -> Moved {
    match client.move_leader(target).await {
        Ok(resp) => Moved::Ok { header: resp.header().is_some() },
        Err(etcd_client::Error::GRpcStatus(s)) => Moved::Err(s.code(), s.message().to_owned()),
        Err(e) => panic!("MoveLeader failed outside gRPC: {e}"),
    }
}

/// MoveLeader's cases on a one-member cluster: to itself, to an unknown member, to a learner.
async fn single_member_move_leader_cases(url: &str) -> Vec<Moved> {
    let mut c = Client::connect([url], None).await.unwrap();
    let me = c.status().await.unwrap().header().unwrap().member_id();
    let learner_peer = format!("http://127.0.0.1:{}", free_port());
    let learner = c
        .member_add([learner_peer], Some(MemberAddOptions::new().with_is_learner()))
        .await
        .unwrap()
        .member()
        .unwrap()
        .id();
    vec![
        move_leader(&mut c, me).await,
        move_leader(&mut c, 0x1234_5678).await,
        move_leader(&mut c, learner).await,
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_leader_answers_as_etcd_does() {
    let cairn = Cairn::start().await;
    let ours = single_member_move_leader_cases(&cairn.client_url).await;
    assert_eq!(ours[0], Moved::Ok { header: false }, "etcd's response to a move to itself");
    let bad =
        Moved::Err(tonic::Code::FailedPrecondition, "etcdserver: bad leader transferee".into());
    assert_eq!(ours[1], bad);
    assert_eq!(ours[2], bad);
    if let Some(etcd) = Etcd::start().await {
        let theirs = single_member_move_leader_cases(&etcd.client_url).await;
        assert_eq!(ours, theirs, "Cairn (left) and etcd (right) differ");
    }

    // A member that does not lead refuses, whatever the target; the leader moves and
    // answers with no header. The same calls against a three-member etcd.
    let cluster = Cluster::start(3, &[]).await;
    let urls: Vec<String> = cluster.endpoints();
    let ours = three_member_move_leader_cases(&urls).await;
    let refused = Moved::Err(tonic::Code::FailedPrecondition, "etcdserver: not leader".to_owned());
    assert_eq!(ours, vec![refused.clone(), refused, Moved::Ok { header: false }]);
    if let Some(etcd) = Etcd::cluster(3).await {
        let urls: Vec<String> = etcd.iter().map(|m| m.client_url.clone()).collect();
        assert_eq!(ours, three_member_move_leader_cases(&urls).await, "Cairn (left), etcd (right)");
    }
}

/// On a three-member cluster: a follower asked to move leadership to the leader and to
/// itself, then the leader asked to move it to that follower (which must then lead).
async fn three_member_move_leader_cases(urls: &[String]) -> Vec<Moved> {
    let mut clients = Vec::new();
    let mut ids = Vec::new();
    let mut leader = None;
    for (i, url) in urls.iter().enumerate() {
        let mut c = Client::connect([url], None).await.unwrap();
        let status = c.status().await.unwrap();
        ids.push(status.header().unwrap().member_id());
        if status.leader() == ids[i] {
            leader = Some(i);
        }
        clients.push(c);
    }
    let leader = leader.expect("a leader");
    let follower = (leader + 1) % urls.len();
    let (leader_id, follower_id) = (ids[leader], ids[follower]);
    let cases = vec![
        move_leader(&mut clients[follower], leader_id).await,
        move_leader(&mut clients[follower], follower_id).await,
        move_leader(&mut clients[leader], follower_id).await,
    ];
    // The new leader may still be between its election and its first status update; give
    // it a moment rather than reading its view once.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut now = clients[follower].status().await.unwrap().leader();
    while now != follower_id && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        now = clients[follower].status().await.unwrap().leader();
    }
    assert_eq!(now, follower_id, "leadership moved to the follower");
    cases
}
