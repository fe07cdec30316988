//! The operator's Prometheus metrics: reconcile outcomes and durations, and per-Cluster
//! member, ready-member and quorum gauges, and per-Cluster backup gauges (scheduled, time of
//! the last success recorded in `status.lastBackup`). One registry, rendered by `/metrics`.

use std::time::Instant;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The operator's metric handles and the registry that owns them.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `cairn_operator_reconcile_total{result}`: passes by outcome (`ok` or an error label).
    pub reconciles: IntCounterVec,
    /// `cairn_operator_reconcile_duration_seconds`: time per pass.
    pub duration: HistogramVec,
    /// `cairn_operator_cluster_members{namespace,cluster}`: members in the member list.
    pub members: IntGaugeVec,
    /// `cairn_operator_cluster_ready_members{namespace,cluster}`: healthy members.
    pub ready_members: IntGaugeVec,
    /// `cairn_operator_cluster_has_quorum{namespace,cluster}`: 1 while a quorum of voters is healthy.
    pub has_quorum: IntGaugeVec,
    /// `cairn_operator_cluster_backup_scheduled{namespace,cluster}`: 1 when `spec.backup` is set.
    pub backup_scheduled: IntGaugeVec,
    /// `cairn_operator_backup_last_success_timestamp{namespace,cluster}`: Unix seconds of
    /// `status.lastBackup.time`; absent until a backup succeeded.
    pub backup_last_success: IntGaugeVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Creates the handles in a fresh registry.
    ///
    /// # Errors
    /// Fails only on a duplicate or malformed metric definition.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new("cairn_operator_reconcile_total", "Reconcile passes by result."),
            &["result"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "cairn_operator_reconcile_duration_seconds",
                "Duration of one reconcile pass.",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            &[],
        )?;
        let gauge = |name: &str, help: &str| {
            IntGaugeVec::new(Opts::new(name, help), &["namespace", "cluster"])
        };
        let members =
            gauge("cairn_operator_cluster_members", "Members in the store's member list.")?;
        let ready_members =
            gauge("cairn_operator_cluster_ready_members", "Members answering Status.")?;
        let has_quorum =
            gauge("cairn_operator_cluster_has_quorum", "1 while a quorum of voters answers.")?;
        let backup_scheduled = gauge(
            "cairn_operator_cluster_backup_scheduled",
            "1 when the Cluster schedules backups (spec.backup).",
        )?;
        let backup_last_success = gauge(
            "cairn_operator_backup_last_success_timestamp",
            "Unix time in seconds of the Cluster's last successful backup (status.lastBackup).",
        )?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(members.clone()))?;
        registry.register(Box::new(ready_members.clone()))?;
        registry.register(Box::new(has_quorum.clone()))?;
        registry.register(Box::new(backup_scheduled.clone()))?;
        registry.register(Box::new(backup_last_success.clone()))?;
        Ok(Self {
            registry,
            reconciles,
            duration,
            members,
            ready_members,
            has_quorum,
            backup_scheduled,
            backup_last_success,
        })
    }

    /// Starts timing a pass; the duration is observed when the guard drops.
    pub fn timer(&self) -> ReconcileTimer<'_> {
        ReconcileTimer { metrics: self, start: Instant::now() }
    }

    /// Removes a deleted Cluster's gauges.
    pub fn forget(&self, namespace: &str, cluster: &str) {
        for g in [
            &self.members,
            &self.ready_members,
            &self.has_quorum,
            &self.backup_scheduled,
            &self.backup_last_success,
        ] {
            let _ = g.remove_label_values(&[namespace, cluster]);
        }
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// Observes a pass's duration when dropped (so early returns are timed too).
#[derive(Debug)]
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .duration
            .with_label_values(&[] as &[&str])
            .observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_text_names_every_metric() {
        let m = Metrics::new().unwrap();
        m.reconciles.with_label_values(&["ok"]).inc();
        m.members.with_label_values(&["ns", "a"]).set(3);
        m.ready_members.with_label_values(&["ns", "a"]).set(3);
        m.has_quorum.with_label_values(&["ns", "a"]).set(1);
        m.backup_scheduled.with_label_values(&["ns", "a"]).set(1);
        m.backup_last_success.with_label_values(&["ns", "a"]).set(1_700_000_000);
        drop(m.timer());
        let text = m.render();
        for name in [
            "cairn_operator_reconcile_total{result=\"ok\"} 1",
            "cairn_operator_reconcile_duration_seconds_count 1",
            "cairn_operator_cluster_members{cluster=\"a\",namespace=\"ns\"} 3",
            "cairn_operator_cluster_has_quorum{cluster=\"a\",namespace=\"ns\"} 1",
            "cairn_operator_cluster_backup_scheduled{cluster=\"a\",namespace=\"ns\"} 1",
            "cairn_operator_backup_last_success_timestamp{cluster=\"a\",namespace=\"ns\"} 1700000000",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
        m.forget("ns", "a");
        assert!(!m.render().contains("cluster=\"a\""));
    }
}
