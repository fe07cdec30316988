//! One reconcile pass over a Cluster: observe (API objects, then each member's Status and
//! the member list over the etcd API) → decide (at most one membership step) → act
//! (server-side apply of the owned objects, the membership call, Events) → status (a
//! server-side apply of the status subresource, every pass).
//!
//! Level-triggered: nothing here remembers the previous pass except what status records.
//! Create-then-record: a step's effect is made before status says it happened, so a crash
//! in between leaves a state the next pass recognises from the store's member list.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Context;
use super::membership::{self, MemberHealth, MemberView, Observed, Step};
use super::resources::{self as res, ROLE_LABEL};
use super::status::{self, Summary};
use super::{backup, compaction, created, defrag, parse_time, restore, upgrade};
use crate::crd::{
    Backup, BackupPhase, Cluster, ClusterStatus, CompactionSpec, CompactionState, Condition,
    DefragRun, DefragSpec, DefragState, LastBackup, LastCompaction, MemberDefrag, MemberStatus,
    QuorumLossPolicy, RecoveryProgress, Rollout, Target,
};
use crate::etcd::{self, hex_id};
use crate::schedule::parse_duration;
use crate::{Error, FIELD_MANAGER, Result};

/// Requeue while a change is in flight.
const BUSY: Duration = Duration::from_secs(2);
/// Requeue when steady (a resync; pod and object events trigger passes sooner).
const IDLE: Duration = Duration::from_secs(30);

/// The reconcile entry point: one pass, counted and timed, failures published as Events.
///
/// # Errors
/// The pass's error; `error_policy` picks the requeue delay.
pub async fn reconcile(c: Arc<Cluster>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.timer();
    // The cached object can trail this operator's own last status write by a moment; the
    // lock (`status.target`) and the recorded cluster id must never be read stale, so each
    // pass starts from a fresh read.
    let ns = c.namespace().ok_or(Error::MissingObjectKey("metadata.namespace"))?;
    let fresh =
        match Api::<Cluster>::namespaced(ctx.client.clone(), &ns).get_opt(&c.name_any()).await {
            Ok(Some(fresh)) => fresh,
            Ok(None) => return Ok(Action::await_change()),
            Err(e) => {
                ctx.metrics.reconciles.with_label_values(&["kube"]).inc();
                return Err(e.into());
            }
        };
    let c = Arc::new(fresh);
    let result = Pass::new(&c, &ctx)?.run().await;
    let label = result.as_ref().map_or_else(Error::metric_label, |_| "ok");
    ctx.metrics.reconciles.with_label_values(&[label]).inc();
    if let Err(e) = &result {
        publish(&ctx, &c, EventType::Warning, "ReconcileFailed", "Reconcile", e.to_string()).await;
    }
    result
}

async fn publish(
    ctx: &Context,
    c: &Cluster,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let ev = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: action.to_owned(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &c.object_ref(&())).await {
        tracing::warn!(error = %e, reason, "publishing an event failed");
    }
}

fn ordinal_of_pod(cluster: &str, pod: &str) -> Option<u32> {
    pod.strip_prefix(cluster)?.strip_prefix('-')?.parse().ok()
}

fn plus(t: Timestamp, d: Duration) -> Timestamp {
    let d = SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX);
    t.checked_add(d).unwrap_or(t)
}

fn since(now: Timestamp, then: Timestamp) -> Duration {
    Duration::try_from(now.duration_since(then)).unwrap_or(Duration::ZERO)
}

/// What the store said this pass.
#[derive(Default)]
struct Store {
    /// Cluster id from the member list header (0 when nobody answered).
    cluster_id: u64,
    /// The member list, if a member answered.
    members: Vec<etcd::Member>,
    /// Status per ordinal.
    health: HashMap<u32, etcd::Status>,
    /// When no member gave a linearizable member list: one member's own view of it.
    local_members: Vec<etcd::Member>,
}

struct Pass<'a> {
    c: &'a Cluster,
    ctx: &'a Context,
    ns: String,
    name: String,
    now: Timestamp,
    old: ClusterStatus,
    /// Publish the force flag in the members ConfigMap (a recovery is forcing).
    force: bool,
    /// The snapshot the seed restores (`spec.bootstrap.fromBackup`), once resolved.
    restore: Option<restore::Source>,
    /// The existing StatefulSet's claim templates: immutable in Kubernetes, so they are kept
    /// as created (a grown `storage.size` needs volume expansion, reported by an Event).
    existing_claims: Option<Vec<PersistentVolumeClaim>>,
    /// The image the store pods get: the requested one, or the current one while the
    /// requested one is refused.
    image: String,
    /// The operator's client TLS towards the members (`spec.tls.client`), loaded each pass.
    tls: Option<etcd::Tls>,
}

impl<'a> Pass<'a> {
    fn new(c: &'a Cluster, ctx: &'a Context) -> Result<Self> {
        Ok(Self {
            c,
            ctx,
            ns: c.namespace().ok_or(Error::MissingObjectKey("metadata.namespace"))?,
            name: c.name_any(),
            now: Timestamp::now(),
            old: c.status.clone().unwrap_or_default(),
            existing_claims: None,
            restore: None,
            force: false,
            image: c.image(&ctx.settings.default_repository),
            tls: None,
        })
    }

    fn api<K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>>(
        &self,
    ) -> Api<K> {
        Api::namespaced(self.ctx.client.clone(), &self.ns)
    }

    async fn apply<K>(&self, obj: &K) -> Result<()>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Serialize
            + DeserializeOwned
            + Clone
            + std::fmt::Debug,
    {
        let name = obj.meta().name.clone().ok_or(Error::MissingObjectKey("metadata.name"))?;
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        self.api::<K>().patch(&name, &pp, &Patch::Apply(obj)).await?;
        Ok(())
    }

    async fn event(&self, type_: EventType, reason: &str, note: String) {
        tracing::info!(cluster = %self.name, namespace = %self.ns, reason, %note, "event");
        publish(self.ctx, self.c, type_, reason, reason, note).await;
    }

    /// An Event about one member: its own action, so Events of the same reason about
    /// different members are not folded into one series.
    async fn member_event(&self, type_: EventType, reason: &str, member: &str, note: String) {
        tracing::info!(cluster = %self.name, namespace = %self.ns, reason, %note, "event");
        publish(self.ctx, self.c, type_, reason, &format!("{reason}/{member}"), note).await;
    }

    fn client_url(&self, ordinal: u32) -> String {
        res::client_url(&self.name, &self.ns, ordinal, self.c.spec.client_tls().is_some())
    }

    fn peer_tls(&self) -> bool {
        self.c.spec.peer_tls().is_some()
    }

    /// A pass that cannot talk to the members or start pods because a `spec.tls` Secret is
    /// missing or incomplete: nothing is changed, status says why (Degraded,
    /// `TLSSecretInvalid`, with an Event when the reason is new), and the pass is retried.
    async fn blocked_on_tls(&self, why: String) -> Result<Action> {
        const REASON: &str = "TLSSecretInvalid";
        let reported = self.old.conditions.iter().any(|c| c.reason == REASON && c.message == why);
        if !reported {
            self.event(EventType::Warning, REASON, why.clone()).await;
        }
        let degraded = |type_: &str| Condition {
            type_: type_.to_owned(),
            status: if type_ == "Degraded" { "True" } else { "False" }.to_owned(),
            reason: REASON.to_owned(),
            message: why.clone(),
            observed_generation: None,
            last_transition_time: String::new(),
        };
        let mut conditions: Vec<Condition> =
            self.old.conditions.iter().filter(|c| c.type_ != "Degraded").cloned().collect();
        if !conditions.iter().any(|c| c.type_ == "Available") {
            conditions.push(degraded("Available"));
        }
        conditions.push(degraded("Degraded"));
        let generation = self.c.meta().generation;
        let mut new = self.old.clone();
        new.conditions =
            status::merge(&self.old.conditions, conditions, generation, &self.now.to_string());
        new.phase = Some(crate::crd::Phase::Degraded);
        new.observed_generation = generation;
        self.write_status(&new).await?;
        Ok(Action::requeue(Duration::from_secs(10)))
    }

    /// Asks every candidate member for its Status (concurrently), then the member list
    /// from the leader or, failing that, any voter that answered.
    async fn observe_store(&self, ordinals: &[u32]) -> Store {
        let probes = ordinals.iter().map(|&o| async move {
            let url = self.client_url(o);
            let status = match etcd::Client::connect(&url, self.tls.as_ref()).await {
                Ok(client) => client.status().await.map(|s| (client, s)),
                Err(e) => Err(e),
            };
            (o, status)
        });
        let mut clients = Vec::new();
        let mut store = Store::default();
        for (o, r) in join_all(probes).await {
            match r {
                Ok((client, s)) => {
                    clients.push((o, client, s.clone()));
                    store.health.insert(o, s);
                }
                Err(e) => {
                    tracing::debug!(cluster = %self.name, ordinal = o, error = %e, "member did not answer")
                }
            }
        }
        // The leader first, then voters, then learners.
        clients.sort_by_key(|(_, _, s)| (s.leader != s.member_id, s.is_learner));
        for (_, client, _) in &clients {
            match client.member_list().await {
                Ok((cluster_id, members)) => {
                    store.cluster_id = cluster_id;
                    store.members = members;
                    break;
                }
                Err(e) => tracing::debug!(error = %e, "member list failed"),
            }
        }
        if store.members.is_empty() {
            for (_, client, _) in &clients {
                if let Ok((_, members)) = client.local_member_list().await {
                    store.local_members = members;
                    break;
                }
            }
        }
        store
    }

    async fn run(mut self) -> Result<Action> {
        let c = self.c;
        if c.meta().deletion_timestamp.is_some() {
            // Owner references cascade; nothing needs the store to clean up.
            self.ctx.metrics.forget(&self.ns, &self.name);
            return Ok(Action::await_change());
        }
        match super::tls::load(&self.ctx.client, &self.ns, &c.spec).await? {
            Ok(tls) => self.tls = tls,
            Err(why) => return self.blocked_on_tls(why).await,
        }
        let selector = res::selector_string(&self.name);
        let lp = ListParams::default().labels(&selector);
        let pods: BTreeMap<u32, Pod> = self
            .api::<Pod>()
            .list(&lp)
            .await?
            .items
            .into_iter()
            .filter_map(|p| Some((ordinal_of_pod(&self.name, &p.name_any())?, p)))
            .collect();
        let claims: BTreeMap<u32, PersistentVolumeClaim> = self
            .api::<PersistentVolumeClaim>()
            .list(&lp)
            .await?
            .items
            .into_iter()
            .filter_map(|p| {
                let pod = p.name_any().strip_prefix("data-")?.to_owned();
                Some((ordinal_of_pod(&self.name, &pod)?, p))
            })
            .collect();
        let sts = self.api::<StatefulSet>().get_opt(&self.name).await?;
        let sts_replicas = sts.as_ref().and_then(|s| s.spec.as_ref()?.replicas);
        self.existing_claims =
            sts.as_ref().and_then(|s| s.spec.as_ref()?.volume_claim_templates.clone());
        // Upgrades: the requested image is checked against the one every member runs (the
        // StatefulSet's for a cluster from before this was recorded); a refused one leaves
        // the template as it is.
        let requested = self.image.clone();
        let mut current_image = self
            .old
            .current_image
            .clone()
            .or_else(|| template_image(sts.as_ref()))
            .unwrap_or_else(|| requested.clone());
        let refused = (current_image != requested)
            .then(|| upgrade::check(&current_image, &requested).err())
            .flatten();
        if let Some(why) = &refused {
            self.image = current_image.clone();
            let reported = self
                .old
                .conditions
                .iter()
                .any(|c| c.reason == "UpgradeRefused" && c.message == *why);
            if !reported {
                self.event(EventType::Warning, "UpgradeRefused", why.clone()).await;
            }
        }

        let mut candidates: Vec<u32> = pods.keys().copied().collect();
        candidates
            .extend(self.old.members.iter().filter_map(|m| ordinal_of_pod(&self.name, &m.name)));
        candidates.sort_unstable();
        candidates.dedup();
        let store = self.observe_store(&candidates).await;

        // Membership as the decision sees it. A cluster being rebuilt from a backup has no
        // cluster ID until its restored seed answers (every old member is gone by then).
        let rebuilding = self
            .old
            .recovery
            .as_ref()
            .is_some_and(|r| r.from_backup.is_some() && r.forced_at.is_some());
        let mut cluster_id = self
            .old
            .cluster_id
            .as_deref()
            .and_then(|s| u64::from_str_radix(s, 16).ok())
            .filter(|_| !rebuilding);
        if cluster_id.is_none() && store.cluster_id != 0 && store.health.contains_key(&0) {
            cluster_id = Some(store.cluster_id);
            self.event(
                EventType::Normal,
                "ClusterFormed",
                format!("seed member formed cluster {:x}", store.cluster_id),
            )
            .await;
        }
        let members: Vec<MemberView> = store
            .members
            .iter()
            .map(|m| {
                let ordinal = m
                    .peer_urls
                    .iter()
                    .find_map(|u| res::ordinal_of_peer_url(&self.name, &self.ns, u));
                let status = ordinal.and_then(|o| store.health.get(&o)).map(|s| MemberHealth {
                    member_id: s.member_id,
                    cluster_id: s.cluster_id,
                    applied: s.applied_index,
                    leader: s.leader,
                });
                let recorded = self.old.members.iter().find(|r| r.id == hex_id(m.id));
                let unhealthy_for = match (&status, recorded) {
                    (Some(_), _) => Duration::ZERO,
                    (None, Some(r)) => r
                        .unhealthy_since
                        .as_deref()
                        .and_then(parse_time)
                        .map_or(Duration::ZERO, |t| since(self.now, t)),
                    (None, None) => Duration::ZERO,
                };
                MemberView {
                    id: m.id,
                    ordinal,
                    learner: m.is_learner,
                    started: !m.name.is_empty(),
                    status,
                    unhealthy_for,
                    recorded_applied: recorded.and_then(|r| r.applied_index),
                }
            })
            .collect();
        // The member a roll restarted is the roll's to judge (it stops the roll when the
        // member does not come back), never replaced: a replacement would run the same image.
        let rolling_member = self
            .old
            .rollout
            .as_ref()
            .and_then(|r| r.member.as_deref())
            .and_then(|m| ordinal_of_pod(&self.name, m));
        let mut members = members;
        for m in &mut members {
            if m.ordinal.is_some() && m.ordinal == rolling_member {
                m.unhealthy_for = Duration::ZERO;
            }
        }
        let member_ordinals: Vec<u32> = members.iter().filter_map(|m| m.ordinal).collect();

        // The locked target.
        let spec_replicas = c.spec.replicas.max(0);
        let mut target = self.old.target.clone();
        let mut deadline_exceeded = false;
        if let Some(t) = &target {
            let past = parse_time(&t.deadline).is_none_or(|d| d < self.now);
            if past && t.replicas != spec_replicas && t.replacing.is_none() {
                target = None;
            } else {
                deadline_exceeded = past;
            }
        }
        // A replacement is done once its ordinal is a voter with a new id.
        if let Some(t) = target.as_mut()
            && let Some(name) = t.replacing.clone()
        {
            let ordinal = ordinal_of_pod(&self.name, &name);
            let done = members.iter().any(|m| {
                m.ordinal == ordinal && !m.learner && Some(hex_id(m.id)) != t.replacing_id
            });
            if done {
                self.event(
                    EventType::Normal,
                    "MemberReplaced",
                    format!("{name} rejoined as a new voter"),
                )
                .await;
                t.replacing = None;
                t.replacing_id = None;
            }
        }
        let goal = target.as_ref().map_or(spec_replicas, |t| t.replicas);
        let formed = cluster_id.is_some();

        // Quorum loss, and with `recovery.quorumLoss: FromSurvivor` past its window, a
        // recovery from the most caught-up voter that still answers.
        // Voters as (ordinal, id, applied index if it answers): from the member list, or,
        // when no member could give one (a linearizable MemberList needs a quorum), from a
        // member's local view of it.
        let voter_health: Vec<(Option<u32>, u64, Option<u64>)> =
            if members.is_empty() && store.local_members.is_empty() && formed {
                // No member answers at all: the voters the members ConfigMap names, none healthy.
                self.configured_ordinals().await?.into_iter().map(|o| (Some(o), 0, None)).collect()
            } else if members.is_empty() {
                store
                    .local_members
                    .iter()
                    .filter(|m| !m.is_learner)
                    .map(|m| {
                        let o = m
                            .peer_urls
                            .iter()
                            .find_map(|u| res::ordinal_of_peer_url(&self.name, &self.ns, u));
                        let s =
                            o.and_then(|o| store.health.get(&o)).filter(|s| s.member_id == m.id);
                        (o, m.id, s.map(|s| s.applied_index))
                    })
                    .collect()
            } else {
                members
                    .iter()
                    .filter(|m| !m.learner)
                    .map(|m| {
                        let applied = m.status.filter(|h| h.member_id == m.id).map(|h| h.applied);
                        (m.ordinal, m.id, applied)
                    })
                    .collect()
            };
        let voters_now = voter_health.len();
        let healthy_now = voter_health.iter().filter(|v| v.2.is_some()).count();
        let lost = formed && voters_now > 0 && healthy_now < membership::quorum(voters_now);
        let quorum_lost_since = if lost {
            let since = self.old.quorum_lost_since.clone();
            if since.is_none() {
                self.event(
                    EventType::Warning,
                    "QuorumLost",
                    format!("only {healthy_now} of {voters_now} voters answer"),
                )
                .await;
            }
            Some(since.unwrap_or_else(|| self.now.to_string()))
        } else {
            None
        };
        let mut recovery = self.old.recovery.clone();
        // Both policies recover from a survivor when one answers (its data is the newest);
        // `FromBackup` rebuilds from the newest good backup when none does.
        let policy = c.spec.recovery.as_ref().filter(|r| r.quorum_loss != QuorumLossPolicy::Manual);
        let mut no_backup = None;
        if let (None, Some(p), Some(lost_since)) = (&recovery, policy, &quorum_lost_since) {
            let window = parse_duration(&p.window).unwrap_or(Duration::from_secs(300));
            let lost_for = parse_time(lost_since).map_or(Duration::ZERO, |t| since(self.now, t));
            let survivor = voter_health
                .iter()
                .filter_map(|(o, id, applied)| Some((o.as_ref()?, id, applied.as_ref()?)))
                .max_by_key(|v| *v.2);
            if lost_for >= window
                && !c.spec.paused
                && survivor.is_none()
                && p.quorum_loss == QuorumLossPolicy::FromBackup
            {
                match self.newest_good_backup().await {
                    Some(b) => {
                        self.event(
                            EventType::Warning,
                            "QuorumLossRecovery",
                            format!("quorum lost for {}s and no member answers with data: rebuilding from backup {} (revision {}); writes after it are lost", lost_for.as_secs(), b.name, b.revision),
                        )
                        .await;
                        recovery = Some(RecoveryProgress {
                            from_backup: Some(b.name),
                            since: self.now.to_string(),
                            ..Default::default()
                        });
                    }
                    None => {
                        no_backup = Some(
                            "quorum lost and no member answers, but no successful backup of this cluster exists to rebuild from".to_owned(),
                        );
                    }
                }
            }
            if lost_for >= window
                && !c.spec.paused
                && let Some((o, id, applied)) = survivor
            {
                let name = res::pod_name(&self.name, *o);
                self.event(
                        EventType::Warning,
                        "QuorumLossRecovery",
                        format!("quorum lost for {}s: recovering from {name} (applied index {applied}), the other members are dropped", lost_for.as_secs()),
                    )
                    .await;
                recovery = Some(RecoveryProgress {
                    survivor: name,
                    survivor_id: hex_id(*id),
                    since: self.now.to_string(),
                    ..Default::default()
                });
            }
        }
        self.force =
            recovery.as_ref().is_some_and(|r| r.forced_at.is_some() && r.settled_at.is_none());
        if formed
            && !members.is_empty()
            && target.is_none()
            && recovery.is_none()
            // Paused: no change starts, so no lock is taken on a spec edited meanwhile.
            && !c.spec.paused
            && members.len() != usize::try_from(goal).unwrap_or(0)
            && goal > 0
        {
            let diff = (i64::try_from(members.len()).unwrap_or(0) - i64::from(goal)).unsigned_abs();
            let deadline = plus(
                self.now,
                self.ctx.settings.step_deadline * u32::try_from(diff.max(1)).unwrap_or(1),
            );
            target = Some(Target {
                replicas: goal,
                since: self.now.to_string(),
                deadline: deadline.to_string(),
                ..Default::default()
            });
        }
        let change_since = target.as_ref().and_then(|t| parse_time(&t.since));
        let stale = |o: u32| {
            let old = |t: Option<Timestamp>| match (t, change_since) {
                (Some(t), Some(s)) => t < s,
                _ => true,
            };
            let claim_stale = claims
                .get(&o)
                .is_some_and(|p| p.meta().deletion_timestamp.is_some() || old(created(p.meta())));
            let pod_stale = !member_ordinals.contains(&o)
                && pods.get(&o).is_some_and(|p| old(created(p.meta())));
            claim_stale || pod_stale
        };
        let replacing = target
            .as_ref()
            .and_then(|t| t.replacing.as_deref())
            .and_then(|n| ordinal_of_pod(&self.name, n));
        let observed = Observed {
            goal: u32::try_from(goal).unwrap_or(0),
            cluster_id,
            members: members.clone(),
            replacing,
            replaced_volume_stale: replacing.is_some_and(stale),
            leftover_volumes: (0..u32::try_from(goal).unwrap_or(0))
                .filter(|&o| !member_ordinals.contains(&o) && stale(o))
                .collect(),
            failure_window: self.ctx.settings.failure_window,
            promote_lag: self.ctx.settings.promote_lag,
        };
        let step = if let Some(r) = &recovery {
            match &r.from_backup {
                Some(b) => Step::Wait(format!("rebuilding from backup {b} after quorum loss")),
                None => Step::Wait(format!("recovering from quorum loss from {}", r.survivor)),
            }
        } else if goal == 0 {
            Step::Wait("spec.replicas is 0: pods stopped, membership kept".into())
        } else {
            membership::decide(&observed)
        };

        let mut failure = no_backup;
        let mut waiting = None;
        let mut busy = !matches!(step, Step::Steady);
        // Restore at creation: the seed must never start without the snapshot, so an
        // unresolvable source holds everything back until the cluster has formed.
        // A rebuild after quorum loss restores the same way, from the Backup it chose.
        let rebuild_from = recovery
            .as_ref()
            .and_then(|r| r.from_backup.clone())
            .map(|name| crate::crd::FromBackup { name: Some(name), ..Default::default() });
        let restoring = rebuild_from
            .as_ref()
            .or_else(|| c.spec.bootstrap.as_ref().and_then(|b| b.from_backup.as_ref()));
        let mut hold = false;
        if let Some(from) = restoring {
            let backups = self
                .api::<Backup>()
                .list(&ListParams::default())
                .await
                .map(|l| l.items)
                .unwrap_or_default();
            let own = c.spec.backup.as_ref().map(|b| &b.destination);
            match restore::resolve(from, &backups, own) {
                Ok(src) => self.restore = Some(src),
                Err(e) if !formed => {
                    failure = Some(e);
                    hold = true;
                }
                Err(e) => {
                    tracing::debug!(cluster = %self.name, error = %e, "restore source gone after formation")
                }
            }
            if !formed && let Some(why) = pods.get(&0).and_then(restore::failure) {
                failure = Some(format!("restore from backup failed: {why}"));
            }
        }
        if c.spec.paused || hold {
            busy = hold;
        } else {
            self.announce_spec().await;
            // StatefulSet size follows the member list (never what is running).
            // A recovery keeps no pod above the survivor: the dropped members' pods are not
            // recreated on their old claims while those are being deleted.
            let survivor = recovery.as_ref().and_then(|r| ordinal_of_pod(&self.name, &r.survivor));
            // A rebuild from a backup stops every pod until all old data is gone.
            let dropping_all =
                recovery.as_ref().is_some_and(|r| r.from_backup.is_some() && r.forced_at.is_none());
            let replicas = if goal == 0 || dropping_all {
                0
            } else if !formed {
                1
            } else if let Some(o) = survivor {
                i32::try_from(o + 1).unwrap_or(1)
            } else if member_ordinals.is_empty() {
                sts_replicas.unwrap_or(1)
            } else {
                member_ordinals.iter().max().map_or(1, |m| i32::try_from(*m + 1).unwrap_or(1))
            };
            let voters = members.iter().filter(|m| !m.learner).count();
            let pdb_voters = voters.max(usize::try_from(goal).unwrap_or(0));
            // Without a linearizable member list (quorum lost), `--initial-cluster` keeps the
            // members a member still knows of: an empty one would stop every restart.
            // A recovering survivor starts alone, so it is the whole list then; otherwise the
            // voters a member still knows of, else what the ConfigMap already says.
            let mut known = member_ordinals.clone();
            if let Some(o) = survivor
                && (known.is_empty() || self.force)
            {
                known = vec![o];
            }
            if known.is_empty() {
                known = voter_health.iter().filter_map(|v| v.0).collect();
            }
            if known.is_empty() && formed {
                known = self.configured_ordinals().await?;
            }
            self.apply_objects(formed, &known, replicas, pdb_voters).await?;
            self.label_roles(&pods, &members).await?;
            match self.recover(&mut recovery, &store, &pods, &claims, formed).await {
                Ok(Some(w)) => waiting = Some(w),
                Ok(None) => {}
                Err(e) => failure = Some(format!("recovery from quorum loss: {e}")),
            }
            match self.act(&step, &store, &member_ordinals, &claims, &pods, &mut target).await {
                Ok(Outcome::Done) => {}
                Ok(Outcome::Waiting(w)) => waiting = Some(w),
                Ok(Outcome::Blocked(b)) => failure = Some(b),
                Err(e) => {
                    self.event(EventType::Warning, "StepFailed", format!("{step:?}: {e}")).await;
                    failure = Some(format!("{step:?} failed: {e}"));
                }
            }
        }
        if matches!(step, Step::Steady) && target.as_ref().is_some_and(|t| t.replacing.is_none()) {
            target = None;
        }
        // A roll (image or template change) advances only while membership is steady.
        let mut rollout = self.old.rollout.clone();
        let mut rolling = None;
        let mut stalled = None;
        if formed
            && recovery.is_none()
            && target.is_none()
            && !c.spec.paused
            && !hold
            && goal > 0
            // A member down for a restart makes membership wait, not change.
            && matches!(step, Step::Steady | Step::Wait(_))
        {
            match self
                .roll(&mut rollout, sts.as_ref(), &pods, &members, &store, &mut current_image)
                .await
            {
                Ok(w) => rolling = w,
                Err(e) => stalled = Some(e),
            }
        }
        busy |= rolling.is_some();

        // Status.
        let leader_id = store.health.values().map(|s| s.leader).find(|&l| l != 0);
        let member_status: Vec<MemberStatus> = members
            .iter()
            .zip(&store.members)
            .map(|(v, m)| {
                let s = v.ordinal.and_then(|o| store.health.get(&o));
                let healthy = v.status.is_some_and(|h| h.member_id == v.id);
                let recorded = self.old.members.iter().find(|r| r.id == hex_id(m.id));
                let unhealthy_since = if healthy {
                    None
                } else {
                    Some(
                        recorded
                            .and_then(|r| r.unhealthy_since.clone())
                            .unwrap_or_else(|| self.now.to_string()),
                    )
                };
                MemberStatus {
                    name: v
                        .ordinal
                        .map_or_else(|| m.name.clone(), |o| res::pod_name(&self.name, o)),
                    id: hex_id(m.id),
                    client_url: m.client_urls.first().cloned(),
                    learner: m.is_learner,
                    leader: leader_id == Some(m.id),
                    healthy,
                    applied_index: s
                        .map(|s| s.applied_index)
                        .or(recorded.and_then(|r| r.applied_index)),
                    revision: s.map(|s| s.revision),
                    unhealthy_since,
                }
            })
            .collect();
        let healthy_voters = member_status.iter().filter(|m| m.healthy && !m.learner).count();
        let voters = member_status.iter().filter(|m| !m.learner).count();
        let mut compactor = Compactor {
            state: self.old.compaction.clone(),
            last: self.old.last_compaction.clone(),
            next_tick: None,
        };
        let quorate = formed && voters > 0 && healthy_voters >= membership::quorum(voters);
        if let Some(spec) = c.spec.compaction.as_ref().filter(|_| !c.spec.paused && quorate)
            && let Err(e) = self.scheduled_compaction(spec, &store, &mut compactor).await
        {
            failure.get_or_insert(e);
        }
        let mut defrag_state = self.old.defrag.clone();
        let mut defrag_next = None;
        let all_healthy =
            formed && !member_status.is_empty() && member_status.iter().all(|m| m.healthy);
        if let Some(spec) = c.spec.defrag.as_ref().filter(|_| {
            !c.spec.paused && all_healthy && matches!(step, Step::Steady) && target.is_none()
        }) {
            let state = defrag_state.get_or_insert_with(Default::default);
            match self.defrag_step(spec, &store, &member_status, state).await {
                Ok(true) => defrag_next = Some(plus(self.now, BUSY)),
                Ok(false) => defrag_next = defrag::next_tick(spec, state),
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        let backups = match self.backups(quorate && !c.spec.paused).await {
            Ok(b) => b,
            Err(e) => {
                failure.get_or_insert(e);
                Backups { last: self.old.last_backup.clone(), ..Default::default() }
            }
        };
        if let Step::Wait(w) | Step::Blocked(w) = &step {
            if matches!(step, Step::Blocked(_)) {
                failure.get_or_insert_with(|| w.clone());
            } else {
                waiting.get_or_insert_with(|| w.clone());
            }
        }
        let summary = Summary {
            formed,
            restoring: restoring.is_some(),
            voters,
            healthy_voters,
            members: member_status.len(),
            desired: usize::try_from(spec_replicas).unwrap_or(0),
            paused: c.spec.paused,
            changing: target.is_some(),
            deadline_exceeded,
            waiting,
            failure,
            rolling,
            upgrade_stalled: stalled,
            upgrade_refused: refused,
        };
        let m = &self.ctx.metrics;
        let labels = [self.ns.as_str(), self.name.as_str()];
        m.members.with_label_values(&labels).set(i64::try_from(member_status.len()).unwrap_or(0));
        m.ready_members
            .with_label_values(&labels)
            .set(i64::try_from(member_status.iter().filter(|m| m.healthy).count()).unwrap_or(0));
        m.has_quorum
            .with_label_values(&labels)
            .set(i64::from(formed && voters > 0 && healthy_voters >= membership::quorum(voters)));
        m.backup_scheduled.with_label_values(&labels).set(i64::from(c.spec.backup.is_some()));
        match backups.last.as_ref().and_then(|l| parse_time(&l.time)) {
            Some(t) => m.backup_last_success.with_label_values(&labels).set(t.as_second()),
            None => {
                let _ = m.backup_last_success.remove_label_values(&labels);
            }
        }
        let now = self.now.to_string();
        let ready = i32::try_from(healthy_voters).unwrap_or(0);
        let new = ClusterStatus {
            observed_generation: c.meta().generation,
            phase: Some(status::phase(&summary)),
            conditions: status::merge(
                &self.old.conditions,
                status::conditions(&summary).into_iter().chain(backups.condition).collect(),
                c.meta().generation,
                &now,
            ),
            replicas: i32::try_from(member_status.len()).unwrap_or(0),
            ready_replicas: ready,
            ready: Some(format!("{ready}/{spec_replicas}")),
            member_count: i32::try_from(member_status.len()).unwrap_or(0),
            selector: Some(res::selector_string(&self.name)),
            cluster_id: cluster_id.map(hex_id),
            leader: member_status.iter().find(|m| m.leader).map(|m| m.name.clone()),
            version: store
                .health
                .values()
                .next()
                .map(|s| s.version.clone())
                .or(self.old.version.clone()),
            members: member_status,
            target,
            last_compaction: compactor.last,
            compaction: compactor.state,
            defrag: defrag_state,
            quorum_lost_since,
            recovery,
            last_backup: backups.last,
            current_image: Some(current_image),
            rollout,
        };
        self.write_status(&new).await?;
        let mut requeue = if busy { BUSY } else { IDLE };
        for next in [compactor.next_tick, backups.next_tick, defrag_next].into_iter().flatten() {
            requeue = requeue.min(since(next, self.now).max(Duration::from_millis(200)));
        }
        Ok(Action::requeue(requeue))
    }

    /// One scheduled-compaction step: on a due tick, record the revision and compact to the
    /// one a retention old (through the leader), unless a backup of this cluster is running.
    /// A failed compaction is an Event and a failure message; the next tick retries.
    async fn scheduled_compaction(
        &self,
        spec: &CompactionSpec,
        store: &Store,
        out: &mut Compactor,
    ) -> Result<(), String> {
        let current = store
            .health
            .values()
            .find(|s| s.member_id == s.leader)
            .or_else(|| store.health.values().max_by_key(|s| s.revision))
            .map_or(0, |s| s.revision);
        let plan = compaction::plan(spec, out.state.as_ref(), out.last.as_ref(), self.now, current)
            .map_err(|e| format!("spec.compaction: {e}"))?;
        out.next_tick = plan.next_tick;
        out.state = Some(plan.state);
        let Some(revision) = plan.compact_to else { return Ok(()) };
        if let Some(b) = self.running_backup().await {
            tracing::info!(cluster = %self.name, backup = %b, revision, "compaction deferred while a backup runs");
            return Ok(());
        }
        let result = match self.leader_client(store).await {
            Ok(client) => client.compact(revision).await.map_err(Error::Etcd),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                out.last = Some(LastCompaction { time: self.now.to_string(), revision });
                self.event(
                    EventType::Normal,
                    "Compacted",
                    format!("compacted history to revision {revision} (current {current})"),
                )
                .await;
                Ok(())
            }
            // Someone compacted further already (etcdctl, the store's own compactor).
            Err(Error::Etcd(e)) if e.compacted() => Ok(()),
            Err(e) => {
                let msg = format!("compaction to revision {revision} failed: {e}");
                self.event(EventType::Warning, "CompactionFailed", msg.clone()).await;
                Err(msg)
            }
        }
    }

    /// The ordinals the members ConfigMap's `initial-cluster` names now.
    async fn configured_ordinals(&self) -> Result<Vec<u32>> {
        let cm = self.api::<ConfigMap>().get_opt(&res::config_map_name(&self.name)).await?;
        let list = cm.and_then(|cm| cm.data?.get("initial-cluster").cloned()).unwrap_or_default();
        Ok(list
            .split(',')
            .filter_map(|e| ordinal_of_pod(&self.name, e.split_once('=')?.0))
            .collect())
    }

    /// One recovery step (level-triggered, see `RecoveryProgress`): drop the other members'
    /// pods and data, publish the force flag, restart the survivor, wait until it is alone,
    /// withdraw the flag and restart the others empty; membership then grows the cluster
    /// back by learners. Returns what it waits for.
    async fn recover(
        &self,
        recovery: &mut Option<RecoveryProgress>,
        store: &Store,
        pods: &BTreeMap<u32, Pod>,
        claims: &BTreeMap<u32, PersistentVolumeClaim>,
        formed: bool,
    ) -> Result<Option<String>> {
        if recovery.as_ref().is_some_and(|r| r.from_backup.is_some()) {
            return self.rebuild(recovery, pods, claims, formed).await;
        }
        let Some(r) = recovery.as_mut() else { return Ok(None) };
        let survivor = ordinal_of_pod(&self.name, &r.survivor).ok_or_else(|| {
            Error::InvalidSpec(format!("survivor {} is not a pod of this cluster", r.survivor))
        })?;
        let others: std::collections::BTreeSet<u32> =
            pods.keys().chain(claims.keys()).copied().filter(|o| *o != survivor).collect();
        let before = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
                      t: Timestamp| { created(meta).is_none_or(|c| c < t) };
        let started = parse_time(&r.since).unwrap_or(self.now);
        if let Some(settled) = r.settled_at.as_deref().and_then(parse_time) {
            // The flag is gone from this pass's ConfigMap: pods started before hold it (or a
            // stale member list) in their environment.
            for o in &others {
                if pods.get(o).is_some_and(|p| before(p.meta(), settled)) {
                    ignore_missing(
                        self.api::<Pod>()
                            .delete(&res::pod_name(&self.name, *o), &DeleteParams::default())
                            .await
                            .map(|_| ()),
                    )?;
                }
            }
            self.event(
                EventType::Normal,
                "Recovered",
                format!(
                    "{} runs alone with its data after {}s; members are added back as learners",
                    r.survivor,
                    since(self.now, started).as_secs()
                ),
            )
            .await;
            *recovery = None;
            return Ok(None);
        }
        let Some(forced) = r.forced_at.as_deref().and_then(parse_time) else {
            let mut dropping = false;
            for o in &others {
                let old_pod = pods.get(o).is_some_and(|p| before(p.meta(), started));
                let old_claim = claims.get(o).is_some_and(|p| {
                    before(p.meta(), started) || p.meta().deletion_timestamp.is_some()
                });
                if old_pod || old_claim {
                    self.delete_member_volume(*o, pods, claims).await?;
                    dropping = true;
                }
            }
            if dropping {
                return Ok(Some("dropping the other members' pods and data".into()));
            }
            r.forced_at = Some(self.now.to_string());
            return Ok(Some(format!("publishing --force-new-cluster for {}", r.survivor)));
        };
        if pods.get(&survivor).is_some_and(|p| before(p.meta(), forced)) {
            ignore_missing(
                self.api::<Pod>().delete(&r.survivor, &DeleteParams::default()).await.map(|_| ()),
            )?;
            return Ok(Some(format!("restarting {} with --force-new-cluster", r.survivor)));
        }
        let id = u64::from_str_radix(&r.survivor_id, 16).unwrap_or(0);
        let alone = matches!(store.members.as_slice(), [m] if m.id == id)
            && store.health.get(&survivor).is_some_and(|s| s.member_id == id);
        if alone {
            r.settled_at = Some(self.now.to_string());
            return Ok(Some(format!("{} is alone; withdrawing the force flag", r.survivor)));
        }
        Ok(Some(format!("waiting for {} to come back alone", r.survivor)))
    }

    /// One step of a rebuild from a backup (`recovery.quorumLoss: FromBackup`, no survivor):
    /// every member's pod and claim goes (the StatefulSet is at 0 meanwhile), then the
    /// cluster ID is forgotten (`forced_at` marks that moment), so the seed starts `new` and
    /// its init container restores the Backup exactly as `bootstrap.fromBackup` does; once
    /// it has formed, membership grows back by learners.
    async fn rebuild(
        &self,
        recovery: &mut Option<RecoveryProgress>,
        pods: &BTreeMap<u32, Pod>,
        claims: &BTreeMap<u32, PersistentVolumeClaim>,
        formed: bool,
    ) -> Result<Option<String>> {
        let Some(r) = recovery.as_mut() else { return Ok(None) };
        let backup = r.from_backup.clone().unwrap_or_default();
        let started = parse_time(&r.since).unwrap_or(self.now);
        if r.forced_at.is_none() {
            let old = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
                created(meta).is_none_or(|c| c < started) || meta.deletion_timestamp.is_some()
            };
            let mut dropping = false;
            let ordinals: std::collections::BTreeSet<u32> =
                pods.keys().chain(claims.keys()).copied().collect();
            for o in ordinals {
                if pods.get(&o).is_some_and(|p| old(p.meta()))
                    || claims.get(&o).is_some_and(|p| old(p.meta()))
                {
                    self.delete_member_volume(o, pods, claims).await?;
                    dropping = true;
                }
            }
            if dropping {
                return Ok(Some(format!(
                    "dropping every member's pod and data before restoring backup {backup}"
                )));
            }
            r.forced_at = Some(self.now.to_string());
            return Ok(Some(format!("restoring the seed from backup {backup}")));
        }
        if formed {
            self.event(
                EventType::Normal,
                "Recovered",
                format!(
                    "rebuilt from backup {backup} after {}s; members are added back as learners",
                    since(self.now, started).as_secs()
                ),
            )
            .await;
            *recovery = None;
            return Ok(None);
        }
        Ok(Some(format!("waiting for the seed to restore backup {backup}")))
    }

    /// One step of a rolling restart (see `upgrade`): once the StatefulSet controller has
    /// seen the template, restart the next outdated member, or wait for the last one to be
    /// back (Ready, answering, caught up), or stop the roll when it is not back within the
    /// failure window. Returns what it waits for; the error is why the roll stopped.
    async fn roll(
        &self,
        rollout: &mut Option<Rollout>,
        sts: Option<&StatefulSet>,
        pods: &BTreeMap<u32, Pod>,
        members: &[MemberView],
        store: &Store,
        current_image: &mut String,
    ) -> Result<Option<String>, String> {
        let Some(sts) = sts else { return Ok(None) };
        let Some(st) = sts.status.as_ref() else { return Ok(None) };
        let Some(revision) = st.update_revision.clone() else { return Ok(None) };
        if st.observed_generation != sts.metadata.generation
            || template_image(Some(sts)).as_deref() != Some(self.image.as_str())
        {
            return Ok(Some("waiting for the StatefulSet to take the new template".into()));
        }
        let revision_of =
            |p: &Pod| p.labels().get("controller-revision-hash").cloned().unwrap_or_default();
        let outdated: Vec<u32> =
            pods.iter().filter(|(_, p)| revision_of(p) != revision).map(|(o, _)| *o).collect();
        if rollout.as_ref().is_some_and(|r| r.revision != revision) {
            // The spec changed again: a new roll replaces the old (stalled or not).
            *rollout = None;
        }
        // Every pod on the new revision is not yet the end: the member restarted last must
        // also be back (Ready, answering, caught up), which the pending-member step below
        // checks before it counts the member done.
        let last_back = rollout.as_ref().is_none_or(|r| r.member.is_none());
        if outdated.is_empty() && last_back {
            if let Some(r) = rollout.take() {
                self.event(
                    EventType::Normal,
                    "UpgradeCompleted",
                    format!(
                        "every member runs {} (restarted in order: {})",
                        r.image,
                        r.done.join(", ")
                    ),
                )
                .await;
            }
            *current_image = self.image.clone();
            return Ok(None);
        }
        if rollout.is_none() {
            self.event(
                EventType::Normal,
                "UpgradeStarted",
                format!(
                    "rolling {} member(s) to {} one at a time, followers first",
                    outdated.len(),
                    self.image
                ),
            )
            .await;
        }
        let r = rollout.get_or_insert_with(|| Rollout {
            image: self.image.clone(),
            revision: revision.clone(),
            since: self.now.to_string(),
            ..Default::default()
        });
        if let Some(why) = &r.stalled {
            return Err(why.clone());
        }
        let ready = |o: u32| {
            pods.get(&o).is_some_and(|p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
        };
        let view = |o: u32| members.iter().find(|m| m.ordinal == Some(o));
        let newest = members.iter().filter_map(|m| m.status.map(|s| s.applied)).max().unwrap_or(0);
        let lag = self.ctx.settings.promote_lag;
        let up = |o: u32| {
            ready(o)
                && view(o)
                    .and_then(|m| m.status.filter(|s| s.member_id == m.id))
                    .is_some_and(|s| s.applied.saturating_add(lag) >= newest)
        };
        if let Some(name) = r.member.clone() {
            let o = ordinal_of_pod(&self.name, &name).unwrap_or(u32::MAX);
            let renewed = pods.get(&o).is_some_and(|p| revision_of(p) == revision);
            if renewed && up(o) {
                self.member_event(
                    EventType::Normal,
                    "MemberUpgraded",
                    &name,
                    format!("{name} is back on {}, healthy and caught up", r.image),
                )
                .await;
                r.done.push(name.clone());
                r.member = None;
                r.restarted_at = None;
                return Ok(Some(format!("{name} is back; next member")));
            }
            let restarted = r.restarted_at.as_deref().and_then(parse_time).unwrap_or(self.now);
            if since(self.now, restarted) > self.ctx.settings.failure_window {
                let why = format!(
                    "{name} did not come back healthy within {}s of its restart on {}: the roll stopped (fix or revert spec.image/version)",
                    self.ctx.settings.failure_window.as_secs(),
                    r.image
                );
                self.event(EventType::Warning, "UpgradeStalled", why.clone()).await;
                r.stalled = Some(why.clone());
                return Err(why);
            }
            return Ok(Some(format!("waiting for {name} to come back healthy and caught up")));
        }
        let leader = store.health.values().map(|s| s.leader).find(|&l| l != 0);
        let candidates: Vec<upgrade::Outdated> = outdated
            .iter()
            .map(|&o| upgrade::Outdated {
                ordinal: o,
                leader: view(o).is_some_and(|m| Some(m.id) == leader),
                up: up(o),
            })
            .collect();
        let others_down = members
            .iter()
            .filter_map(|m| m.ordinal)
            .find(|o| !outdated.contains(o) && !up(*o))
            .map(|o| res::pod_name(&self.name, o));
        let voters = members.iter().filter(|m| !m.learner).count();
        match upgrade::next(&candidates, others_down.as_deref(), voters) {
            upgrade::Choice::Wait(w) => Ok(Some(w)),
            upgrade::Choice::MoveLeader(o) => {
                let from = view(o).map(|m| m.id).unwrap_or_default();
                let to = members
                    .iter()
                    .filter(|m| !m.learner && m.id != from)
                    .filter_map(|m| Some((m.id, m.status?.applied)))
                    .max_by_key(|(_, applied)| *applied)
                    .map(|(id, _)| id);
                let Some(to) = to else { return Ok(Some("no voter can take the lead".into())) };
                let client = self.leader_client(store).await.map_err(|e| e.to_string())?;
                client.move_leader(to).await.map_err(|e| format!("MoveLeader: {e}"))?;
                self.member_event(
                    EventType::Normal,
                    "LeaderMoved",
                    &res::pod_name(&self.name, o),
                    format!(
                        "leadership moved from {} ({from:x}) to {to:x} before its restart on {}",
                        res::pod_name(&self.name, o),
                        r.image
                    ),
                )
                .await;
                Ok(Some("leadership moved; the former leader restarts next".into()))
            }
            upgrade::Choice::Restart(o) => {
                let name = res::pod_name(&self.name, o);
                let role = match candidates.iter().find(|c| c.ordinal == o) {
                    Some(c) if !c.up => "down",
                    Some(c) if c.leader => "leader",
                    _ => "follower",
                };
                self.api::<Pod>()
                    .delete(&name, &DeleteParams::default())
                    .await
                    .map(|_| ())
                    .or_else(|e| match e {
                        kube::Error::Api(ae) if ae.code == 404 => Ok(()),
                        e => Err(format!("deleting {name}: {e}")),
                    })?;
                self.member_event(
                    EventType::Normal,
                    "MemberRestarting",
                    &name,
                    format!("restarting {name} ({role}) on {}", r.image),
                )
                .await;
                r.member = Some(name.clone());
                r.restarted_at = Some(self.now.to_string());
                Ok(Some(format!("restarting {name} on {}", r.image)))
            }
        }
    }

    /// The newest successful Backup of this cluster.
    async fn newest_good_backup(&self) -> Option<crate::crd::LastBackup> {
        let list = self.api::<Backup>().list(&ListParams::default()).await.ok()?;
        let mine: Vec<Backup> =
            list.items.into_iter().filter(|b| b.spec.cluster_name == self.name).collect();
        backup::last_good(&mine)
    }

    /// One defragmentation step: start a run when due, else defragment the next member
    /// (followers first, the leader last), else finish the run (and disarm NOSPACE if it
    /// was raised). Returns whether a run is still in progress.
    async fn defrag_step(
        &self,
        spec: &DefragSpec,
        store: &Store,
        members: &[MemberStatus],
        state: &mut DefragState,
    ) -> Result<bool, String> {
        let candidates: Vec<defrag::Candidate> = members
            .iter()
            .filter_map(|m| {
                let s = store.health.get(&ordinal_of_pod(&self.name, &m.name)?)?;
                Some(defrag::Candidate {
                    name: m.name.clone(),
                    leader: m.leader,
                    db_size: s.db_size,
                    db_size_in_use: s.db_size_in_use,
                })
            })
            .collect();
        if let Some(why) = defrag::due(spec, state, &candidates, self.now)
            .map_err(|e| format!("spec.defrag: {e}"))?
        {
            state.running = Some(DefragRun { started: self.now.to_string(), done: Vec::new() });
            state.last_tick = Some(self.now.to_string());
            self.event(
                EventType::Normal,
                "DefragStarted",
                format!("defragmentation run started ({why})"),
            )
            .await;
        }
        let Some(run) = state.running.as_mut() else { return Ok(false) };
        let Some(m) = defrag::next(&candidates, &run.done).cloned() else {
            let nospace =
                store.health.values().any(|s| s.errors.iter().any(|e| e.contains("NOSPACE")));
            if nospace {
                let disarmed = match self.leader_client(store).await {
                    Ok(c) => c.disarm_nospace().await.map_err(Error::Etcd),
                    Err(e) => Err(e),
                };
                match disarmed {
                    Ok(()) => {
                        self.event(
                            EventType::Normal,
                            "AlarmDisarmed",
                            "NOSPACE disarmed after defragmentation".into(),
                        )
                        .await
                    }
                    Err(e) => return Err(format!("disarming NOSPACE after defragmentation: {e}")),
                }
            }
            let done = run.done.join(", ");
            state.running = None;
            self.event(EventType::Normal, "DefragFinished", format!("defragmented {done}")).await;
            return Ok(false);
        };
        let url =
            ordinal_of_pod(&self.name, &m.name).map(|o| self.client_url(o)).unwrap_or_default();
        let result = match etcd::Client::connect_with_deadline(
            &url,
            etcd::DEFRAG_TIMEOUT,
            self.tls.as_ref(),
        )
        .await
        {
            Ok(c) => c.defragment().await,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            let msg = format!("defragmenting {}: {e}", m.name);
            self.event(EventType::Warning, "DefragFailed", msg.clone()).await;
            return Err(msg);
        }
        let role = if m.leader { "leader" } else { "follower" };
        state.members.retain(|d| d.name != m.name);
        state.members.push(MemberDefrag {
            name: m.name.clone(),
            time: Timestamp::now().to_string(),
            leader: m.leader,
            size_before: m.db_size,
        });
        run.done.push(m.name.clone());
        self.event(
            EventType::Normal,
            "Defragmented",
            format!("{} ({role}) defragmented, {} bytes before", m.name, m.db_size),
        )
        .await;
        Ok(true)
    }

    /// This cluster's Backups: the newest good one for status, and with `spec.backup` the
    /// schedule's step (a new Backup when due and `act`, retention's deletions) and the
    /// `BackupHealthy` condition.
    async fn backups(&self, act: bool) -> Result<Backups, String> {
        let Ok(list) = self.api::<Backup>().list(&ListParams::default()).await else {
            // The Backup resource is not installed: nothing to report.
            return Ok(Backups { last: self.old.last_backup.clone(), ..Default::default() });
        };
        let mine: Vec<Backup> =
            list.items.into_iter().filter(|b| b.spec.cluster_name == self.name).collect();
        let last = backup::last_good(&mine);
        let Some(spec) = &self.c.spec.backup else {
            return Ok(Backups { last, ..Default::default() });
        };
        let plan = backup::plan_schedule(&spec.schedule, spec.keep.as_ref(), &mine, self.now)
            .map_err(|e| format!("spec.backup: {e}"))?;
        if act && plan.create {
            let b = backup::scheduled_backup(self.c, self.now).map_err(|e| e.to_string())?;
            match self.api::<Backup>().create(&PostParams::default(), &b).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(format!("creating scheduled backup {}: {e}", b.name_any())),
            }
        }
        if act {
            for name in &plan.delete {
                match self.api::<Backup>().delete(name, &DeleteParams::default()).await {
                    Ok(_) => {
                        self.event(
                            EventType::Normal,
                            "BackupPruned",
                            format!("backup {name} deleted by spec.backup.keep"),
                        )
                        .await;
                    }
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(format!("deleting backup {name}: {e}")),
                }
            }
        }
        let last_done = last.as_ref().and_then(|l| parse_time(&l.time));
        let last_failure = mine
            .iter()
            .filter(|b| b.status.as_ref().and_then(|s| s.phase) == Some(BackupPhase::Failed))
            .filter(|b| {
                let created = b.metadata.creation_timestamp.as_ref().map(|t| t.0);
                last_done.is_none_or(|d| created.is_some_and(|c| c > d))
            })
            .max_by_key(|b| b.metadata.creation_timestamp.as_ref().map(|t| t.0))
            .and_then(|b| b.status.as_ref()?.reason.clone());
        let (ok, reason, message) =
            backup::health(&spec.schedule, last.as_ref(), last_failure.as_deref(), self.now);
        let condition = Condition {
            type_: "BackupHealthy".into(),
            status: if ok { "True" } else { "False" }.into(),
            reason: reason.into(),
            message,
            ..Default::default()
        };
        Ok(Backups { last, condition: Some(condition), next_tick: plan.next_tick })
    }

    /// The name of a Backup of this cluster that is running, if any (none when the Backup
    /// resource is not installed).
    async fn running_backup(&self) -> Option<String> {
        let list = self.api::<Backup>().list(&ListParams::default()).await.ok()?;
        list.items
            .into_iter()
            .find(|b| {
                b.spec.cluster_name == self.name
                    && b.status.as_ref().and_then(|s| s.phase) == Some(BackupPhase::Running)
            })
            .map(|b| b.name_any())
    }

    /// Warning Events, once per spec generation, for an even size and for accepted but
    /// not yet acted-on sections.
    async fn announce_spec(&self) {
        if self.old.observed_generation == self.c.meta().generation {
            return;
        }
        if self.c.spec.replicas % 2 == 0 && self.c.spec.replicas > 0 {
            self.event(
                EventType::Warning,
                "EvenReplicas",
                format!(
                    "{} members tolerate no more failures than {}; prefer an odd size",
                    self.c.spec.replicas,
                    self.c.spec.replicas - 1
                ),
            )
            .await;
        }
        let created_size = self.existing_claims.iter().flatten().find_map(|p| {
            p.spec.as_ref()?.resources.as_ref()?.requests.as_ref()?.get("storage").cloned()
        });
        let wanted = self
            .c
            .spec
            .storage
            .size
            .clone()
            .unwrap_or_else(|| res::DEFAULT_STORAGE_SIZE.to_owned());
        if self.c.spec.storage.empty_dir.is_none()
            && created_size.as_ref().is_some_and(|q| q.0 != wanted)
        {
            self.event(
                EventType::Warning,
                "StorageResizeNotApplied",
                format!("storage.size {wanted} is not applied: StatefulSet claim templates are immutable, so members keep {}; expand their claims through the storage class", created_size.map(|q| q.0).unwrap_or_default()),
            )
            .await;
        }
    }

    async fn apply_objects(
        &self,
        formed: bool,
        ordinals: &[u32],
        replicas: i32,
        pdb_voters: usize,
    ) -> Result<()> {
        let c = self.c;
        self.apply::<Service>(&res::peer_service(c)?).await?;
        self.apply::<Service>(&res::client_service(c)?).await?;
        // The state flag comes from status: once the cluster id is recorded, a member with an
        // empty volume joins (and fails fast if it is not in the member list) instead of
        // forming a stranger cluster.
        let (initial, state) = if formed {
            (res::initial_cluster(&self.name, &self.ns, ordinals, self.peer_tls()), "existing")
        } else {
            (res::initial_cluster(&self.name, &self.ns, &[0], self.peer_tls()), "new")
        };
        // No member list this pass (no member answered): keep the ConfigMap as it is rather
        // than hand a starting pod an empty `--initial-cluster`.
        if !initial.is_empty() {
            let mut cm = res::config_map(c, &initial, state)?;
            if self.force {
                cm.data
                    .get_or_insert_with(BTreeMap::new)
                    .insert(res::FORCE_KEY.into(), "true".into());
            }
            self.apply::<ConfigMap>(&cm).await?;
        }
        // A refused upgrade keeps the current image in the template.
        let pinned;
        let c = if self.image == c.image(&self.ctx.settings.default_repository) {
            c
        } else {
            let mut p = c.clone();
            p.spec.image = Some(self.image.clone());
            pinned = p;
            &pinned
        };
        let mut sts = res::stateful_set(c, replicas, &self.ctx.settings.default_repository)?;
        if let Some(src) = &self.restore {
            restore::add_to(&mut sts, c, src, self.image.clone());
        }
        if let (Some(spec), Some(existing)) = (sts.spec.as_mut(), &self.existing_claims) {
            spec.volume_claim_templates = Some(existing.clone());
        }
        self.apply::<StatefulSet>(&sts).await?;
        self.apply::<PodDisruptionBudget>(&res::pdb(c, pdb_voters)?).await?;
        Ok(())
    }

    /// Keeps `cairn.dev/role` on each pod in step with the member list (the PDB counts voters).
    async fn label_roles(&self, pods: &BTreeMap<u32, Pod>, members: &[MemberView]) -> Result<()> {
        for (o, pod) in pods {
            let role = match members.iter().find(|m| m.ordinal == Some(*o)) {
                Some(m) if !m.learner => "voter",
                Some(_) => "learner",
                None => "none",
            };
            if pod.labels().get(ROLE_LABEL).map(String::as_str) == Some(role) {
                continue;
            }
            // A merge patch, not an apply: applying to a pod deleted meanwhile would try to
            // create it.
            let patch = serde_json::json!({"metadata": {"labels": {ROLE_LABEL: role}}});
            let pp =
                PatchParams { field_manager: Some(FIELD_MANAGER.to_owned()), ..Default::default() };
            match self.api::<Pod>().patch(&pod.name_any(), &pp, &Patch::Merge(&patch)).await {
                Ok(_) => {}
                // The pod went away meanwhile.
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// A client of the leader, else of any voter that answered.
    async fn leader_client(&self, store: &Store) -> Result<etcd::Client> {
        let leader = store.health.values().map(|s| s.leader).find(|&l| l != 0);
        let mut order: Vec<(&u32, &etcd::Status)> = store.health.iter().collect();
        order.sort_by_key(|(_, s)| (Some(s.member_id) != leader, s.is_learner));
        let mut last = None;
        for (o, _) in order {
            match etcd::Client::connect(&self.client_url(*o), self.tls.as_ref()).await {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(e),
            }
        }
        Err(last.map_or_else(|| Error::InvalidSpec("no member answers".into()), Error::Etcd))
    }

    /// MemberRemove through the leader; a member already gone counts as removed (a pass
    /// that crashed after removing it is repeated).
    async fn remove_member(&self, store: &Store, id: u64) -> Result<()> {
        match self.leader_client(store).await?.member_remove(id).await {
            Err(e) if !e.member_not_found() => Err(e.into()),
            _ => Ok(()),
        }
    }

    async fn delete_member_volume(
        &self,
        o: u32,
        pods: &BTreeMap<u32, Pod>,
        claims: &BTreeMap<u32, PersistentVolumeClaim>,
    ) -> Result<()> {
        let dp = DeleteParams::default();
        if claims.contains_key(&o) {
            ignore_missing(
                self.api::<PersistentVolumeClaim>()
                    .delete(&res::claim_name(&self.name, o), &dp)
                    .await
                    .map(|_| ()),
            )?;
        }
        if pods.contains_key(&o) {
            ignore_missing(
                self.api::<Pod>().delete(&res::pod_name(&self.name, o), &dp).await.map(|_| ()),
            )?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn act(
        &self,
        step: &Step,
        store: &Store,
        ordinals: &[u32],
        claims: &BTreeMap<u32, PersistentVolumeClaim>,
        pods: &BTreeMap<u32, Pod>,
        target: &mut Option<Target>,
    ) -> Result<Outcome> {
        let name = |o: u32| res::pod_name(&self.name, o);
        match step {
            Step::Steady | Step::Wait(_) | Step::Bootstrap => Ok(Outcome::Done),
            Step::Blocked(why) => Ok(Outcome::Blocked(why.clone())),
            Step::AddLearner { ordinal } => {
                let client = self.leader_client(store).await?;
                let url = res::peer_url(&self.name, &self.ns, *ordinal, self.peer_tls());
                match client.member_add(&url, true).await {
                    Ok(id) => {
                        self.event(
                            EventType::Normal,
                            "MemberAdded",
                            format!("{} added as learner {:x}", name(*ordinal), id),
                        )
                        .await;
                    }
                    Err(e) if e.to_string().contains("Peer URLs already exists") => {}
                    Err(e) => return Err(e.into()),
                }
                // Scale up in the same pass: the pod starts with the learner in --initial-cluster.
                let mut with_new = ordinals.to_vec();
                with_new.push(*ordinal);
                let voters = store.members.iter().filter(|m| !m.is_learner).count();
                let goal = target.as_ref().map_or(0, |t| usize::try_from(t.replicas).unwrap_or(0));
                let replicas =
                    with_new.iter().max().map_or(1, |m| i32::try_from(*m + 1).unwrap_or(1));
                self.apply_objects(true, &with_new, replicas, voters.max(goal)).await?;
                Ok(Outcome::Done)
            }
            Step::Promote { id, ordinal } => {
                let client = self.leader_client(store).await?;
                match client.member_promote(*id).await {
                    Ok(()) => {
                        self.event(
                            EventType::Normal,
                            "MemberPromoted",
                            format!("learner {} ({:x}) is now a voter", name(*ordinal), id),
                        )
                        .await;
                        Ok(Outcome::Done)
                    }
                    Err(e) if e.learner_not_ready() => Ok(Outcome::Waiting(format!(
                        "learner {} not yet in sync with the leader",
                        name(*ordinal)
                    ))),
                    Err(e) => Err(e.into()),
                }
            }
            Step::MoveLeader { from, to } => {
                let client = self.leader_client(store).await?;
                client.move_leader(*to).await?;
                self.event(
                    EventType::Normal,
                    "LeaderMoved",
                    format!("leadership moved from {from:x} to {to:x} before removing {from:x}"),
                )
                .await;
                Ok(Outcome::Done)
            }
            Step::Remove { id, ordinal } => {
                match self.remove_member(store, *id).await {
                    Err(Error::Etcd(e)) if e.not_enough_started() => {
                        return Ok(Outcome::Waiting(format!(
                            "the leader does not yet see enough started members to remove {}",
                            name(*ordinal)
                        )));
                    }
                    other => other?,
                }
                self.event(
                    EventType::Normal,
                    "MemberRemoved",
                    format!("{} ({:x}) removed", name(*ordinal), id),
                )
                .await;
                // Shrink in the same pass; the claim follows retainOnScaleDown.
                let rest: Vec<u32> = ordinals.iter().copied().filter(|o| o != ordinal).collect();
                let voters = store.members.iter().filter(|m| !m.is_learner && m.id != *id).count();
                let replicas = rest.iter().max().map_or(1, |m| i32::try_from(*m + 1).unwrap_or(1));
                self.apply_objects(true, &rest, replicas, voters).await?;
                Ok(Outcome::Done)
            }
            Step::Replace { id, ordinal, reason } => {
                let t = target.get_or_insert_with(|| Target {
                    replicas: self.c.spec.replicas,
                    ..Default::default()
                });
                t.replacing = Some(name(*ordinal));
                t.replacing_id = Some(hex_id(*id));
                t.since = self.now.to_string();
                t.deadline = plus(self.now, self.ctx.settings.step_deadline * 2).to_string();
                self.remove_member(store, *id).await?;
                self.event(
                    EventType::Warning,
                    "MemberReplacing",
                    format!(
                        "{} ({:x}) {reason}: removed, to be re-added as a fresh learner",
                        name(*ordinal),
                        id
                    ),
                )
                .await;
                self.delete_member_volume(*ordinal, pods, claims).await?;
                Ok(Outcome::Done)
            }
            Step::ClearVolume { ordinal } => {
                let replacing = target.as_ref().is_some_and(|t| t.replacing.is_some());
                if self.c.spec.storage.retain_on_scale_down
                    && !replacing
                    && claims.contains_key(ordinal)
                {
                    return Ok(Outcome::Blocked(format!(
                        "volume claim {} is left from a removed member and storage.retainOnScaleDown is true; delete it to let {} join with an empty volume",
                        res::claim_name(&self.name, *ordinal),
                        name(*ordinal)
                    )));
                }
                // A claim already terminating (an earlier pass deleted it) is not news.
                let news = pods.contains_key(ordinal)
                    || claims.get(ordinal).is_some_and(|p| p.metadata.deletion_timestamp.is_none());
                self.delete_member_volume(*ordinal, pods, claims).await?;
                if news {
                    self.event(
                        EventType::Normal,
                        "VolumeCleared",
                        format!("old data of {} deleted so it joins empty", name(*ordinal)),
                    )
                    .await;
                }
                Ok(Outcome::Waiting(format!("volume of {} being recreated", name(*ordinal))))
            }
        }
    }

    async fn write_status(&self, s: &ClusterStatus) -> Result<()> {
        let patch = serde_json::json!({
            "apiVersion": "cairn.dev/v1alpha1",
            "kind": "Cluster",
            "status": s,
        });
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        self.api::<Cluster>().patch_status(&self.name, &pp, &Patch::Apply(&patch)).await?;
        Ok(())
    }
}

fn ignore_missing(r: Result<(), kube::Error>) -> Result<()> {
    match r {
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        other => Ok(other?),
    }
}

/// This cluster's backups as one pass sees them.
#[derive(Default)]
struct Backups {
    last: Option<LastBackup>,
    condition: Option<Condition>,
    next_tick: Option<Timestamp>,
}

/// The scheduled compactor's state through one pass.
struct Compactor {
    state: Option<CompactionState>,
    last: Option<LastCompaction>,
    next_tick: Option<Timestamp>,
}

/// How an act ended when it did not fail.
enum Outcome {
    Done,
    Waiting(String),
    Blocked(String),
}

/// The store container's image in a StatefulSet's template.
fn template_image(sts: Option<&StatefulSet>) -> Option<String> {
    sts?.spec.as_ref()?.template.spec.as_ref()?.containers.first()?.image.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_ordinals_parse_only_for_this_cluster() {
        assert_eq!(ordinal_of_pod("main", "main-3"), Some(3));
        assert_eq!(ordinal_of_pod("main", "main-x"), None);
        assert_eq!(ordinal_of_pod("main", "other-3"), None);
        assert_eq!(ordinal_of_pod("ma", "main-3"), None);
    }

    #[test]
    fn durations_between_timestamps_never_go_negative() {
        let t = Timestamp::now();
        assert_eq!(since(t, plus(t, Duration::from_secs(5))), Duration::ZERO);
        assert_eq!(since(plus(t, Duration::from_secs(5)), t), Duration::from_secs(5));
    }
}
