//! `etcdctl watch` (key, `--prefix`, `--rev`, `--prev-kv`, `-w json`) against Cairn, as a
//! child process whose output is read until the expected events have been printed.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::harness::{Cairn, etcdctl_binary};

/// A running `etcdctl watch`; killed on drop.
struct CliWatch {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl CliWatch {
    fn start(endpoint: &str, args: &[&str]) -> CliWatch {
        let bin = etcdctl_binary().expect("etcdctl not found: run scripts/test.sh");
        let mut child = Command::new(bin)
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoint}"))
            .arg("watch")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        CliWatch { child, lines }
    }

    /// Collects `n` lines of output (or fails after 15 s).
    fn lines(&self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut out = Vec::new();
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => out.push(l),
                Err(_) => panic!("etcdctl printed only {out:?}, expected {n} lines"),
            }
        }
        out
    }
}

impl Drop for CliWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn skip() -> bool {
    if etcdctl_binary().is_none() && std::env::var_os("CAIRN_REQUIRE_ETCD").is_none() {
        eprintln!("no etcdctl; skipping");
        return true;
    }
    false
}

#[tokio::test]
async fn etcdctl_watch_prints_key_and_prefix_events_as_they_happen() {
    if skip() {
        return;
    }
    let srv = Cairn::start().await;
    let mut c = srv.client().await;
    // Starting at the next revision makes the watches independent of when etcdctl
    // finishes connecting.
    let next = (c.get("x", None).await.unwrap().header().unwrap().revision() + 1).to_string();
    let key = CliWatch::start(&srv.endpoint(), &["foo", "--rev", &next]);
    let prefix = CliWatch::start(&srv.endpoint(), &["--prefix", "fo", "--rev", &next]);
    c.put("foo", "bar", None).await.unwrap();
    c.put("fox", "1", None).await.unwrap();
    c.put("zoo", "z", None).await.unwrap();
    c.delete("foo", None).await.unwrap();
    let (key, prefix) =
        tokio::task::spawn_blocking(move || (key.lines(6), prefix.lines(9))).await.unwrap();
    assert_eq!(key, ["PUT", "foo", "bar", "DELETE", "foo", ""]);
    assert_eq!(prefix, ["PUT", "foo", "bar", "PUT", "fox", "1", "DELETE", "foo", ""]);
}

#[tokio::test]
async fn etcdctl_watch_replays_from_a_revision_with_prev_kv_and_prints_json() {
    if skip() {
        return;
    }
    let srv = Cairn::start().await;
    let mut c = srv.client().await;
    c.put("foo", "bar", None).await.unwrap(); // 2
    c.put("foo", "baz", None).await.unwrap(); // 3
    c.delete("foo", None).await.unwrap(); // 4
    let ep = srv.endpoint();
    let (text, json) = tokio::task::spawn_blocking(move || {
        let text = CliWatch::start(&ep, &["foo", "--rev", "2", "--prev-kv"]).lines(13);
        let json = CliWatch::start(&ep, &["foo", "--rev", "2", "-w", "json"]).lines(1);
        (text, json)
    })
    .await
    .unwrap();
    // With --prev-kv etcdctl prints the previous pair before the current one.
    let want = [
        "PUT", "foo", "bar", // create: no previous pair
        "PUT", "foo", "bar", "foo", "baz", // update
        "DELETE", "foo", "baz", "foo", "", // delete
    ];
    assert_eq!(text, want);
    let json = &json[0];
    // One response carries the replayed history (keys and values are base64).
    for part in [
        r#""Events":[{"kv":{"key":"Zm9v","create_revision":2,"mod_revision":2,"version":1,"value":"YmFy"}}"#,
        r#"{"kv":{"key":"Zm9v","create_revision":2,"mod_revision":3,"version":2,"value":"YmF6"}}"#,
        r#"{"type":1,"kv":{"key":"Zm9v","mod_revision":4}}]"#,
        r#""CompactRevision":0,"Canceled":false,"Created":false"#,
    ] {
        assert!(json.contains(part), "{part} not in {json}");
    }
    assert!(json.contains(r#""revision":4"#), "{json}");
}
