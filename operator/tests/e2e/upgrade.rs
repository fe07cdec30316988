//! Rolling upgrades on the test bed: an image change restarts one member at a time,
//! followers first, the leader after its leadership was moved, each back and caught up
//! before the next, while a client keeps writing; a downgrade and a skip of two minor
//! versions are refused with a condition; an image that does not come back stops the roll,
//! and reverting the image resumes it.
//!
//! The two builds are two real binaries: `cairn:0.1.0` runs the normal `cairn` (it reports
//! the crate's version) and `cairn:0.2.0` a second build of the same sources compiled with
//! `CAIRN_BUILD_VERSION=0.2.0` (`scripts/cairn-next.sh`; the bed maps that image to it, see
//! `bed::cairn_next_bin`), which reports 0.2.0 in `cairn --version` and in its
//! `cairn_build_info{version}` metric. The test scrapes every member's metric while the roll
//! runs and asserts each member goes from the old build to the new one exactly once, in the
//! order the operator restarted them, that the cluster ran both builds at once midway, and
//! that every member runs the new build at the end. The two builds differ only in the version
//! they report: no wire or storage format changes between them, so the store's own
//! version-compatibility behaviour is still not exercised. `cairn-broken:0.3.0` is in no
//! image map: its container cannot start, standing in for a build that does not come back
//! healthy.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cairn_operator::crd::{Cluster, ClusterStatus};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;

use crate::bed::{self, Bed, wait_for};
use crate::kubelet::http_get;
use crate::operator::{STEP_TIMEOUT, client_url, condition, etcd, operator, settled, status};

fn cluster(ns: &str, image: &str) -> String {
    format!(
        "apiVersion: cairn.dev/v1alpha1\nkind: Cluster\nmetadata:\n  name: up\n  namespace: {ns}\nspec:\n  replicas: 3\n  image: {image}\n  storage: {{size: 1Gi}}\n"
    )
}

async fn set_image(bed: &Bed, ns: &str, image: &str) {
    let patch = format!(r#"{{"spec":{{"image":"{image}"}}}}"#);
    bed.kubectl(&["patch", "cc", "up", "-n", ns, "--type=merge", "-p", &patch]).await.unwrap();
}

/// The image of each store pod, by name.
async fn pod_images(pods: &Api<Pod>) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = pods
        .list(&kube::api::ListParams::default().labels("app.kubernetes.io/instance=up"))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|p| {
            let image = p.spec.unwrap().containers[0].image.clone().unwrap_or_default();
            (p.metadata.name.unwrap(), image)
        })
        .collect();
    out.sort();
    out
}

/// The version a `cairn` binary reports in `--version`.
fn binary_version(bin: &std::path::Path) -> String {
    let out = std::process::Command::new(bin).arg("--version").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("cairn Version: "))
        .unwrap_or_else(|| panic!("no version in `{} --version`: {text}", bin.display()))
        .to_owned()
}

/// The build member `ordinal` of `up` runs now: the `version` label of its
/// `cairn_build_info` metric, or `None` while it does not answer.
async fn member_build(ns: &str, ordinal: u32) -> Option<String> {
    let host = format!("up-{ordinal}.up-peer.{ns}.svc");
    let (code, body) = http_get(&host, 2379, "/metrics", Duration::from_secs(2)).await.ok()?;
    if code != 200 {
        return None;
    }
    let line = body.lines().find(|l| l.starts_with("cairn_build_info{"))?;
    let labels = line.split_once('{')?.1.split_once('}')?.0;
    labels
        .split(',')
        .find_map(|kv| kv.strip_prefix("version=\"")?.strip_suffix('"').map(str::to_owned))
}

/// Every member's build, by ordinal.
async fn member_builds(ns: &str) -> Vec<Option<String>> {
    futures::future::join_all((0..3).map(|o| member_build(ns, o))).await
}

/// Events of the namespace in order: (reason, message).
async fn ordered_events(bed: &Bed, ns: &str) -> Vec<(String, String)> {
    let out = bed
        .kubectl(&[
            "get",
            "events",
            "-n",
            ns,
            "-o",
            "jsonpath={range .items[*]}{.eventTime}{\"\\t\"}{.metadata.creationTimestamp}{\"\\t\"}{.reason}{\"\\t\"}{.message}{\"\\n\"}{end}",
        ])
        .await
        .unwrap();
    // The operator's events carry a microsecond eventTime (events.k8s.io); creationTimestamp
    // has whole seconds only, so two events of one second would come in any order. Events
    // of other controllers have no eventTime and sort by their second.
    let mut events: Vec<(String, String, String)> = out
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(4, '\t');
            let (at, created, reason, message) = (f.next()?, f.next()?, f.next()?, f.next()?);
            let at = if at.is_empty() { created } else { at };
            Some((at.to_owned(), reason.to_owned(), message.to_owned()))
        })
        .collect();
    events.sort_by(|a, b| a.0.cmp(&b.0));
    events.into_iter().map(|(_, r, m)| (r, m)).collect()
}

/// Waits for `Degraded=True` with `reason` and a message naming `about`.
async fn degraded_with(api: &Api<Cluster>, reason: &str, about: &str) -> ClusterStatus {
    wait_for(&format!("Degraded {reason} about {about}"), STEP_TIMEOUT, || async {
        let s = status(api, "up").await?;
        let hit = condition(&s, "Degraded")
            .is_some_and(|c| c.status == "True" && c.reason == reason && c.message.contains(about));
        Ok(hit.then_some(s))
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_change_rolls_followers_first_and_the_leader_last() {
    let bed = bed::shared();
    operator(bed).await;
    let ns = bed.namespace("op-upgrade").await.unwrap();
    let _logs = bed.dump_on_failure(&ns);
    let client = bed.client().await.unwrap();
    let api: Api<Cluster> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let old = "registry.example/cairn:0.1.0";
    let new = format!("registry.example/cairn:{}", bed::NEXT_VERSION);
    let new = new.as_str();
    // The two builds the images run: the normal one and the second build.
    let old_build = binary_version(&bed::cairn_bin().unwrap());
    let new_build = binary_version(&bed::cairn_next_bin().unwrap());
    assert_eq!(new_build, bed::NEXT_VERSION, "the second build reports another version");
    assert_ne!(old_build, new_build, "the two builds report the same version");
    bed.apply(&cluster(&ns, old)).await.unwrap();
    let s = wait_for("up: 3 voters", STEP_TIMEOUT, || settled(&api, "up", 3)).await.unwrap();
    let leader = s.leader.clone().unwrap();
    assert_eq!(s.current_image.as_deref(), Some(old));
    let urls: Vec<String> = (0..3).map(|o| client_url(&ns, "up", o)).collect();
    let before = wait_for("every member to report its build", STEP_TIMEOUT, || async {
        let builds = member_builds(&ns).await;
        Ok(builds.iter().all(Option::is_some).then_some(builds))
    })
    .await
    .unwrap();
    assert!(before.iter().all(|b| b.as_deref() == Some(old_build.as_str())), "{before:?}");

    // A client writes throughout; each write either is acknowledged or fails.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, urls) = (stop.clone(), urls.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let (mut acked, mut failed) = (Vec::new(), Vec::new());
            let mut c = etcd(&urls).await.unwrap();
            let mut i = 0u64;
            let mut rerouted = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let (k, v) = (format!("up/{i:05}"), format!("v{i}"));
                // A request that could not even connect (the client balances over every
                // member's address, one of which is restarting) never reached a server:
                // it is sent again, as etcd's clientv3 does; anything else counts.
                let mut attempts = 0;
                loop {
                    attempts += 1;
                    let r = tokio::time::timeout(
                        Duration::from_secs(5),
                        c.put(k.clone(), v.clone(), None),
                    )
                    .await;
                    let at = started.elapsed().as_secs_f64();
                    match r {
                        Ok(Ok(_)) => acked.push((k.clone(), v.clone())),
                        Ok(Err(e))
                            if attempts < 10
                                && (e.to_string().contains("tcp connect error")
                                    || e.to_string().contains("dns error")) =>
                        {
                            rerouted += 1;
                            continue;
                        }
                        Ok(Err(e)) => failed.push(format!("{at:.1}s {k}: {e}")),
                        Err(_) => failed.push(format!("{at:.1}s {k}: timed out")),
                    }
                    break;
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (acked, failed, rerouted)
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;

    let started = Instant::now();
    set_image(bed, &ns, new).await;
    // Every member's build, scraped at each poll of the roll.
    let seen = std::sync::Mutex::new(vec![before]);
    wait_for("every member on the new image", STEP_TIMEOUT, || async {
        let builds = member_builds(&ns).await;
        seen.lock().unwrap().push(builds);
        let s = settled(&api, "up", 3).await?;
        let images = pod_images(&pods).await;
        let done = s
            .as_ref()
            .is_some_and(|s| s.current_image.as_deref() == Some(new) && s.rollout.is_none())
            && images.len() == 3
            && images.iter().all(|(_, i)| i == new);
        Ok(done.then_some(()))
    })
    .await
    .unwrap();
    eprintln!("upgrade: 3 members rolled to {new} in {:.1}s", started.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let (acked, failed, rerouted) = writer.await.unwrap();
    eprintln!(
        "upgrade: {} writes acknowledged, {} failed, {rerouted} attempts re-sent after a refused connection: {failed:?}",
        acked.len(),
        failed.len()
    );

    // The order: two followers, then the former leader after a LeaderMoved.
    let events = ordered_events(bed, &ns).await;
    let restarts: Vec<&(String, String)> =
        events.iter().filter(|(r, _)| r == "MemberRestarting").collect();
    eprintln!("upgrade: {restarts:?}");
    assert_eq!(restarts.len(), 3, "{events:?}");
    let restarted: Vec<String> =
        restarts.iter().map(|(_, m)| m.split_whitespace().nth(1).unwrap().to_owned()).collect();
    assert_eq!(restarted.last(), Some(&leader), "the leader restarts last: {restarted:?}");
    for (_, m) in &restarts {
        assert!(m.contains("(follower)"), "a member restarted while leading: {m}");
    }
    let moved = events
        .iter()
        .position(|(r, m)| r == "LeaderMoved" && m.contains(&format!("from {leader} ")))
        .expect("no LeaderMoved event for the leader");
    let last_restart = events.iter().rposition(|(r, _)| r == "MemberRestarting").unwrap();
    let second_restart = events
        .iter()
        .enumerate()
        .filter(|(_, (r, _))| r == "MemberRestarting")
        .map(|(i, _)| i)
        .nth(1)
        .unwrap();
    assert!(second_restart < moved && moved < last_restart, "{events:?}");
    // Complete only once the last member restarted is back, and the order names all three.
    let completed = events
        .iter()
        .position(|(r, m)| r == "UpgradeCompleted" && restarted.iter().all(|n| m.contains(n)))
        .unwrap_or_else(|| panic!("no UpgradeCompleted naming {restarted:?}: {events:?}"));
    let upgraded = events.iter().rposition(|(r, _)| r == "MemberUpgraded").unwrap();
    assert!(last_restart < upgraded && upgraded < completed, "{events:?}");

    // The builds: each member went from the old build to the new one once, in the order the
    // members were restarted; midway both ran at once; at the end every member runs the new.
    let after = member_builds(&ns).await;
    assert!(after.iter().all(|b| b.as_deref() == Some(new_build.as_str())), "{after:?}");
    let mut seen = seen.into_inner().unwrap();
    seen.push(after);
    let mut first_new = Vec::new();
    for o in 0..3 {
        let mut path: Vec<&str> = seen.iter().filter_map(|b| b[o].as_deref()).collect();
        path.dedup();
        eprintln!("upgrade: up-{o} ran builds {path:?}");
        assert_eq!(path, [old_build.as_str(), new_build.as_str()], "up-{o}'s builds");
        first_new
            .push(seen.iter().position(|b| b[o].as_deref() == Some(new_build.as_str())).unwrap());
    }
    let by_restart: Vec<usize> = restarted
        .iter()
        .map(|name| first_new[name.rsplit('-').next().unwrap().parse::<usize>().unwrap()])
        .collect();
    assert!(
        by_restart.is_sorted(),
        "members reported the new build out of restart order {restarted:?}: first seen at polls {by_restart:?}"
    );
    let mixed = seen
        .iter()
        .filter(|b| b.contains(&Some(old_build.clone())) && b.contains(&Some(new_build.clone())))
        .count();
    eprintln!(
        "upgrade: {} polls; the new build first seen at polls {by_restart:?} in restart order; {mixed} polls saw both builds",
        seen.len()
    );
    assert!(mixed > 0, "no poll saw both builds running: {seen:?}");

    // Clients saw no failure beyond the leader move, and every acknowledged write is there.
    assert!(acked.len() > 50, "too few writes: {}", acked.len());
    assert!(failed.len() <= 3, "{} failed writes: {failed:?}", failed.len());
    let mut c = etcd(&urls).await.unwrap();
    for (k, v) in &acked {
        let r = c.get(k.as_str(), None).await.unwrap();
        let got = r.kvs().first().map(|kv| kv.value_str().unwrap().to_owned());
        assert_eq!(got.as_deref(), Some(v.as_str()), "acknowledged write {k} lost");
    }

    // A skip of two minor versions and a downgrade are refused: nothing restarts.
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let template_image = || async {
        sts.get("up").await.unwrap().spec.unwrap().template.spec.unwrap().containers[0]
            .image
            .clone()
            .unwrap()
    };
    for (image, words) in [
        ("registry.example/cairn:0.4.0", "more than one minor"),
        ("registry.example/cairn:0.1.0", "downgrade"),
    ] {
        set_image(bed, &ns, image).await;
        let s = degraded_with(&api, "UpgradeRefused", image).await;
        let c = condition(&s, "Degraded").unwrap();
        assert!(c.message.contains(words) && c.message.contains(image), "{c:?}");
        assert_eq!(template_image().await, new);
        assert!(pod_images(&pods).await.iter().all(|(_, i)| i == new));
        eprintln!("upgrade: {image} refused: {}", c.message);
    }

    // An image that does not come back stops the roll after the first member.
    let broken = "registry.example/cairn-broken:0.3.0";
    set_image(bed, &ns, broken).await;
    let s = degraded_with(&api, "UpgradeStalled", broken).await;
    eprintln!("upgrade: stalled: {}", condition(&s, "Degraded").unwrap().message);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let images = pod_images(&pods).await;
    assert_eq!(images.iter().filter(|(_, i)| i == broken).count(), 1, "{images:?}");
    assert_eq!(images.iter().filter(|(_, i)| i == new).count(), 2, "{images:?}");
    let s = status(&api, "up").await.unwrap();
    assert_eq!(condition(&s, "Available").unwrap().status, "True", "{s:?}");
    wait_for("a write during the stall", Duration::from_secs(30), || {
        let urls = urls.clone();
        async move { Ok(Some(etcd(&urls).await?.put("up/during-stall", "ok", None).await?)) }
    })
    .await
    .unwrap();

    // Reverting the image resumes: the broken member is restarted first, on the old image.
    set_image(bed, &ns, new).await;
    wait_for("back to 3 healthy members on the old image", STEP_TIMEOUT, || async {
        let s = settled(&api, "up", 3).await?;
        let images = pod_images(&pods).await;
        let ok = s.as_ref().is_some_and(|s| {
            s.rollout.is_none() && condition(s, "Degraded").is_some_and(|c| c.status == "False")
        }) && images.iter().all(|(_, i)| i == new);
        Ok(ok.then_some(()))
    })
    .await
    .unwrap();
    let builds = member_builds(&ns).await;
    assert!(builds.iter().all(|b| b.as_deref() == Some(new_build.as_str())), "{builds:?}");
    bed.kubectl(&["delete", "cc", "up", "-n", &ns, "--wait=false"]).await.unwrap();
}
