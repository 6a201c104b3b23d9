//! `registrar render`'s metrics.

use super::*;

/// `registrar render`'s metrics. Cheap to clone; clones share the values.
#[derive(Clone)]
pub struct RenderMetrics {
    registry: Arc<Registry>,
    pub renders: Counter,
    pub writes: Counter,
    pub check_failures: Counter,
    pub reload_failures: Counter,
    pub template_errors: Counter,
    pub min_hosts_refusals: Counter,
    pub rendered_revision: Gauge,
    pub registry_revision: Gauge,
    /// Templates whose last render was refused by min_hosts (their
    /// previous file stays).
    pub refusing: Gauge,
    /// Fail static: hosts held in the templates' output.
    pub holds: HoldMetrics,
    /// Reload commands run.
    pub reloads: Counter,
    /// Server changes applied through haproxy's runtime API.
    pub runtime_changes: Counter,
    /// Written files haproxy took through its runtime API, without a reload.
    pub reloads_avoided: Counter,
    /// Written files of a template with `haproxy:` that needed a reload,
    /// by reason.
    pub runtime_fallbacks: Family<ReasonLabels, Counter>,
    ready: Arc<std::sync::atomic::AtomicBool>,
}

impl Default for RenderMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl RenderMetrics {
    pub fn new() -> RenderMetrics {
        let mut registry = Registry::with_prefix("registrar_render");
        let m = RenderMetrics {
            registry: Arc::new(Registry::default()),
            renders: Counter::default(),
            writes: Counter::default(),
            check_failures: Counter::default(),
            reload_failures: Counter::default(),
            template_errors: Counter::default(),
            min_hosts_refusals: Counter::default(),
            rendered_revision: Gauge::default(),
            registry_revision: Gauge::default(),
            refusing: Gauge::default(),
            holds: HoldMetrics::default(),
            reloads: Counter::default(),
            runtime_changes: Counter::default(),
            reloads_avoided: Counter::default(),
            runtime_fallbacks: Family::default(),
            ready: Arc::default(),
        };
        for (name, help, c) in [
            ("renders", "Templates rendered", &m.renders),
            ("reloads", "Reload commands run", &m.reloads),
            (
                "runtime_changes",
                "Server changes applied through haproxy's runtime API",
                &m.runtime_changes,
            ),
            (
                "reloads_avoided",
                "Written files haproxy took through its runtime API instead of a reload",
                &m.reloads_avoided,
            ),
            (
                "writes",
                "Files written (their content, mode or owner changed)",
                &m.writes,
            ),
            (
                "check_failures",
                "Renders refused by their check command",
                &m.check_failures,
            ),
            (
                "reload_failures",
                "Reload commands that failed (the previous files were restored)",
                &m.reload_failures,
            ),
            (
                "template_errors",
                "Renders that failed in the template",
                &m.template_errors,
            ),
            (
                "min_hosts_refusals",
                "Renders refused for listing fewer hosts than min_hosts",
                &m.min_hosts_refusals,
            ),
        ] {
            registry.register(name, help, c.clone());
        }
        registry.register(
            "rendered_revision",
            "The registry revision of the last render",
            m.rendered_revision.clone(),
        );
        registry.register(
            "registry_revision",
            "The newest registry revision the watch has applied; minus rendered_revision, the lag",
            m.registry_revision.clone(),
        );
        registry.register(
            "min_hosts_refusing_templates",
            "Templates whose last render was refused by min_hosts; their previous file stays",
            m.refusing.clone(),
        );
        registry.register(
            "runtime_fallbacks",
            "Written files of a template with haproxy: that needed a reload, by reason",
            m.runtime_fallbacks.clone(),
        );
        m.holds.register(&mut registry, "templates");
        RenderMetrics {
            registry: Arc::new(registry),
            ..m
        }
    }

    /// Every template has rendered once (or is held by min_hosts).
    pub fn set_ready(&self) {
        self.ready.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Exposed for RenderMetrics {
    fn render(&self) -> String {
        encode(&self.registry)
    }
    fn health(&self) -> Result<String, String> {
        if !self.ready.load(std::sync::atomic::Ordering::Relaxed) {
            return Err("not rendered yet\n".into());
        }
        let mut text = "rendered".to_string();
        if self.refusing.get() > 0 {
            text.push_str("; a template is held by min_hosts and its previous file stays");
        }
        text.push_str(&self.holds.said());
        text.push('\n');
        Ok(text)
    }
}
