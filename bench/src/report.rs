//! Summaries, a markdown table, a per-second CSV and an SVG chart of the runs.

use crate::scenario::RunResult;
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::fmt::Write as _;

#[derive(Debug, Clone)]
pub struct Summary {
    pub scenario: String,
    pub variant: &'static str,
    pub sent: u64,
    pub ok: u64,
    pub failed: u64,
    pub success_pct: f64,
    /// Mean successful requests per second before the rollout.
    pub steady_rps: f64,
    /// Mean successful requests per second from rollout start until Envoy caught up, as a share
    /// of the steady state.
    pub rollout_rps_pct: Option<f64>,
    /// The worst second's successful requests, over the whole run after warm-up.
    pub worst_second_rps: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub envoy_cpu_us: Option<f64>,
    pub failures: BTreeMap<String, u64>,
}

fn merged(result: &RunResult, from: usize, to: usize) -> Histogram<u64> {
    let mut h = Histogram::new_with_bounds(1, 60_000_000, 2).unwrap_or_else(|_| unreachable!());
    for s in result.seconds.iter().skip(from).take(to.saturating_sub(from)) {
        let _ = h.add(&s.latency_us);
    }
    h
}

pub fn summarize(result: &RunResult) -> Summary {
    // Second 0 includes connection set-up; leave it out of steady-state figures.
    let secs = &result.seconds;
    let (sent, ok, failed) = secs.iter().fold((0, 0, 0), |(s, o, f), x| (s + x.sent, o + x.ok, f + x.failed_total()));
    let mut failures = BTreeMap::new();
    for s in secs {
        for (k, v) in &s.failed {
            *failures.entry(k.clone()).or_insert(0) += v;
        }
    }
    let steady_end = result.rollout.map_or(secs.len(), |(began, _, _)| began as usize).min(secs.len());
    let steady: Vec<u64> = secs.iter().take(steady_end).skip(1).map(|s| s.ok).collect();
    let steady_rps = if steady.is_empty() { 0.0 } else { steady.iter().sum::<u64>() as f64 / steady.len() as f64 };
    let rollout_rps_pct = result.rollout.map(|(began, _, caught_up)| {
        let window: Vec<u64> =
            secs.iter().skip(began as usize).take((caught_up - began).ceil() as usize).map(|s| s.ok).collect();
        let mean = window.iter().sum::<u64>() as f64 / window.len().max(1) as f64;
        100.0 * mean / steady_rps.max(1e-9)
    });
    let worst_second_rps = secs.iter().skip(1).map(|s| s.ok).min().unwrap_or(0);
    let h = merged(result, 1, secs.len());
    Summary {
        scenario: result.scenario.clone(),
        variant: result.variant,
        sent,
        ok,
        failed,
        success_pct: 100.0 * ok as f64 / sent.max(1) as f64,
        steady_rps,
        rollout_rps_pct,
        worst_second_rps,
        p50_ms: h.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
        envoy_cpu_us: result.envoy_cpu_us_per_request,
        failures,
    }
}

pub fn table(summaries: &[Summary]) -> String {
    let mut out = String::from(
        "| scenario | configuration | requests | failed | success | steady ok/s | ok/s during rollout | worst second ok/s | p50 ms | p99 ms | Envoy CPU µs/request | main failures |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for s in summaries {
        let mut kinds: Vec<(&String, &u64)> = s.failures.iter().collect();
        kinds.sort_by(|a, b| b.1.cmp(a.1));
        let kinds: Vec<String> = kinds.iter().take(3).map(|(k, v)| format!("{k}: {v}")).collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.3}% | {:.0} | {} | {} | {:.2} | {:.2} | {} | {} |",
            s.scenario,
            s.variant,
            s.sent,
            s.failed,
            s.success_pct,
            s.steady_rps,
            s.rollout_rps_pct.map_or("-".into(), |p| format!("{p:.1}%")),
            s.worst_second_rps,
            s.p50_ms,
            s.p99_ms,
            s.envoy_cpu_us.map_or("-".into(), |c| format!("{c:.1}")),
            if kinds.is_empty() { "-".into() } else { kinds.join(", ") },
        );
    }
    out
}

/// Envoy's stats for each run: how each configuration got its result.
pub fn inside_table(results: &[RunResult]) -> String {
    let mut out = String::from(
        "| configuration | retries | attempts via the Service | steered requests | churn-guard ejections |\n|---|---:|---:|---:|---:|\n",
    );
    for r in results {
        let i = &r.inside;
        let _ =
            writeln!(out, "| {} | {} | {} | {} | {} |", r.variant, i.retries, i.via_service, i.steered, i.ejections);
    }
    out
}

pub fn csv(results: &[RunResult]) -> String {
    let mut out = String::from("scenario,configuration,second,sent,ok,failed,p50_ms,p99_ms,failures\n");
    for r in results {
        for (i, s) in r.seconds.iter().enumerate() {
            let kinds: Vec<String> = s.failed.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = writeln!(
                out,
                "{},{},{i},{},{},{},{:.3},{:.3},\"{}\"",
                r.scenario,
                r.variant,
                s.sent,
                s.ok,
                s.failed_total(),
                s.latency_us.value_at_quantile(0.5) as f64 / 1000.0,
                s.latency_us.value_at_quantile(0.99) as f64 / 1000.0,
                kinds.join(";")
            );
        }
    }
    out
}

const COLORS: [&str; 6] = ["#d62728", "#ff7f0e", "#9467bd", "#1f77b4", "#2ca02c", "#17becf"];

/// Successful requests per second (top) and error rate (bottom), one line per configuration.
pub fn svg(title: &str, results: &[RunResult]) -> String {
    let (w, h, left, right, top) = (960.0, 560.0, 70.0, 200.0, 40.0);
    let panel = 210.0;
    let gap = 50.0;
    let plot_w = w - left - right;
    let max_t = results.iter().map(|r| r.seconds.len()).max().unwrap_or(1).max(2) as f64 - 1.0;
    let max_rps =
        results.iter().flat_map(|r| r.seconds.iter().map(|s| s.sent.max(s.ok))).max().unwrap_or(1).max(1) as f64;
    let err = |s: &crate::load::Second| 100.0 * s.failed_total() as f64 / s.sent.max(1) as f64;
    let max_err = results.iter().flat_map(|r| r.seconds.iter().map(err)).fold(1.0_f64, f64::max).min(100.0);
    let x = |t: f64| left + plot_w * t / max_t;
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        o,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{left}" y="22" font-size="15" font-weight="bold">{title}</text>"#
    );
    if let Some((began, _, caught_up)) = results.iter().find_map(|r| r.rollout) {
        for (y0, label) in [(top, "rollout until Envoy catches up"), (top + panel + gap, "")] {
            let _ = writeln!(
                o,
                r##"<rect x="{:.1}" y="{y0}" width="{:.1}" height="{panel}" fill="#f2f2f2"/><text x="{:.1}" y="{:.1}" fill="#777">{label}</text>"##,
                x(began),
                x(caught_up) - x(began),
                x(began) + 4.0,
                y0 + 14.0
            );
        }
    }
    for (i, (y0, label, max)) in
        [(top, "successful requests/s", max_rps), (top + panel + gap, "failed requests (%)", max_err)]
            .iter()
            .enumerate()
    {
        let _ =
            writeln!(o, r##"<rect x="{left}" y="{y0}" width="{plot_w}" height="{panel}" fill="none" stroke="#999"/>"##);
        let _ = writeln!(
            o,
            r#"<text x="14" y="{:.1}" transform="rotate(-90 14 {:.1})" text-anchor="middle">{label}</text>"#,
            y0 + panel / 2.0,
            y0 + panel / 2.0
        );
        for k in 0..=4 {
            let v = max * f64::from(k) / 4.0;
            let y = y0 + panel - panel * f64::from(k) / 4.0;
            let _ = writeln!(
                o,
                r##"<line x1="{left}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                left + plot_w,
                left - 6.0,
                y + 4.0,
                if i == 0 { format!("{v:.0}") } else { format!("{v:.1}") }
            );
        }
        for (n, r) in results.iter().enumerate() {
            let color = COLORS.get(n % COLORS.len()).copied().unwrap_or("black");
            let points: Vec<String> = r
                .seconds
                .iter()
                .enumerate()
                .map(|(t, s)| {
                    let v = if i == 0 { s.ok as f64 } else { err(s) };
                    format!("{:.1},{:.1}", x(t as f64), y0 + panel - panel * (v / max).min(1.0))
                })
                .collect();
            let _ = writeln!(
                o,
                r#"<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{}"/>"#,
                points.join(" ")
            );
        }
    }
    let bottom = top + 2.0 * panel + gap;
    for k in 0..=5 {
        let t = max_t * f64::from(k) / 5.0;
        let _ = writeln!(o, r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{t:.0}s</text>"#, x(t), bottom + 16.0);
    }
    for (n, r) in results.iter().enumerate() {
        let color = COLORS.get(n % COLORS.len()).copied().unwrap_or("black");
        let y = top + 10.0 + 20.0 * n as f64;
        let _ = writeln!(
            o,
            r#"<line x1="{:.1}" x2="{:.1}" y1="{y}" y2="{y}" stroke="{color}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            w - right + 15.0,
            w - right + 40.0,
            w - right + 46.0,
            y + 4.0,
            r.variant
        );
    }
    o.push_str("</svg>\n");
    o
}

fn verdict(ok: bool, miss: String) -> String {
    if ok {
        "met".into()
    } else {
        format!("**missed** ({miss})")
    }
}

/// The issue's targets, checked against the measured summaries, with what explains a miss.
pub fn targets(all: &[Summary]) -> String {
    let find = |scenario: &str, variant: &str| all.iter().find(|s| s.scenario == scenario && s.variant == variant);
    let guards = ["churn-guard", "churn-guard+override", "churn-guard+fallback"];
    let mut out = String::from("## Targets\n\n");
    if let Some(builtin) = find("S1", "builtin") {
        for g in guards {
            let Some(s) = find("S1", g) else { continue };
            let rps = s.rollout_rps_pct.unwrap_or(0.0);
            let _ = writeln!(
                out,
                "- S1 {g}: success {:.3}% ≥ 99.99%: {}; ok/s during rollout {rps:.1}% ≥ 95%: {}; failed {} ≤ builtin's {} / 10: {}",
                s.success_pct,
                verdict(s.success_pct >= 99.99, format!("by {:.3} points", 99.99 - s.success_pct)),
                verdict(rps >= 95.0, format!("by {:.1} points", 95.0 - rps)),
                s.failed,
                builtin.failed,
                verdict(s.failed * 10 <= builtin.failed, format!("{:.1}x builtin's tenth", s.failed as f64 * 10.0 / builtin.failed.max(1) as f64)),
            );
        }
        out.push_str(
            "\n  In S1 the rollout is over in about 12 s and the control plane is 30 s late: for some 20 s every \
             endpoint Envoy knows is gone. Nothing that chooses among those endpoints can succeed then, so only \
             the configuration with a Service fallback can meet the S1 targets.\n\n",
        );
    }
    for g in guards {
        if let Some(s) = find("S2", g) {
            let _ = writeln!(
                out,
                "- S2 {g}: success {:.3}% ≥ 99.9%: {}; p99 {:.0} ms (2 s connect and per-try timeouts, 15 s route timeout)",
                s.success_pct,
                verdict(s.success_pct >= 99.9, format!("by {:.3} points", 99.9 - s.success_pct)),
                s.p99_ms
            );
        }
    }
    if find("S2", "churn-guard+fallback").is_some() {
        out.push_str(
            "\n  A vanished pod shows itself only by timing out: until the first connect timeouts, requests \
             keep going to it, and some exhaust their attempts there. See the per-second CSV for when failures \
             happen.\n\n",
        );
    }
    out.push_str(&rollout_targets(all));
    // What the filter costs on top of loading any Wasm filter: compared with the no-op module.
    let s3_guards = ["churn-guard", "churn-guard+override", "churn-guard+fallback"];
    if let (Some(plain), Some(noop)) = (find("S3-saturation", "plain"), find("S3-saturation", "wasm-noop")) {
        for g in s3_guards {
            let Some(s) = find("S3-saturation", g) else { continue };
            // The recipe's gateway (override_host balancing, a second route) costs Envoy
            // something with any filter, or none: shown against the no-op on the same gateway.
            if let (true, Some(base)) = (g == "churn-guard+fallback", find("S3-saturation", "wasm-noop+fallback")) {
                let _ = writeln!(
                    out,
                    "- S3b {g} against wasm-noop on the same gateway: {:.1}% of its throughput ({:.0}/s against {:.0}/s); Envoy CPU per request {:.1} µs against {:.1} µs, so the filter's own {:+.1} µs",
                    100.0 * s.steady_rps / base.steady_rps.max(1.0),
                    s.steady_rps,
                    base.steady_rps,
                    s.envoy_cpu_us.unwrap_or(0.0),
                    base.envoy_cpu_us.unwrap_or(0.0),
                    s.envoy_cpu_us.unwrap_or(0.0) - base.envoy_cpu_us.unwrap_or(0.0),
                );
            }
            let ratio = 100.0 * s.steady_rps / noop.steady_rps.max(1.0);
            let _ = writeln!(
                out,
                "- S3b {g}: throughput at saturation {ratio:.1}% of wasm-noop's, in separate runs (plain {:.0}/s, wasm-noop {:.0}/s, {g} {:.0}/s; Envoy CPU per request: plain {:.1} µs, wasm-noop {:.1} µs, {g} {:.1} µs, so the filter's own {:+.1} µs)",
                plain.steady_rps,
                noop.steady_rps,
                s.steady_rps,
                plain.envoy_cpu_us.unwrap_or(0.0),
                noop.envoy_cpu_us.unwrap_or(0.0),
                s.envoy_cpu_us.unwrap_or(0.0),
                s.envoy_cpu_us.unwrap_or(0.0) - noop.envoy_cpu_us.unwrap_or(0.0),
            );
        }
    }
    if let Some(noop) = find("S3-fixed-rate", "wasm-noop") {
        for g in s3_guards {
            let Some(s) = find("S3-fixed-rate", g) else { continue };
            let added = s.p99_ms - noop.p99_ms;
            let _ = writeln!(
                out,
                "- S3a {g}: p99 at 500 requests/s {:.2} ms against wasm-noop's {:.2} ms in separate runs, added {added:+.2} ms; p50 added {:+.2} ms; Envoy CPU per request {:.1} µs (wasm-noop {:.1} µs)",
                s.p99_ms,
                noop.p99_ms,
                s.p50_ms - noop.p50_ms,
                s.envoy_cpu_us.unwrap_or(0.0),
                noop.envoy_cpu_us.unwrap_or(0.0),
            );
        }
        out.push_str(
            "\n  Any proxy-wasm filter costs Envoy a share of its throughput (the no-op row); churn-guard's own \
             cost on top is mostly host calls for properties and headers on every request. Envoy runs with Wasm \
             logs at info, as a production gateway does. The 85% and 0.1 ms verdicts are S3c's and S3d's: \
             separate runs compare two Envoy processes minutes apart, and two identical ones differ by up to \
             10% in throughput for as long as they run.\n\n",
        );
    }
    if let Some(tuned) = find("S6", "builtin-tuned") {
        for g in guards {
            let Some(s) = find("S6", g) else { continue };
            let _ = writeln!(
                out,
                "- S6 {g} (gRPC): success {:.3}%, failed {} (builtin-tuned {}), ok/s during rollout {:.1}%, p99 {:.2} ms (builtin-tuned {:.2} ms)",
                s.success_pct,
                s.failed,
                tuned.failed,
                s.rollout_rps_pct.unwrap_or(0.0),
                s.p99_ms,
                tuned.p99_ms,
            );
        }
        out.push_str(
            "\n  S6 failures are calls in flight on a pod that dies: Envoy can retry them only under `reset`, \
             which builtin-tuned's route policy applies to every method. churn-guard does not replay a call \
             that may have run unless told the service is idempotent (`retry.grpcIdempotent`).\n",
        );
    }
    out
}

/// The targets of the rollout scenarios that a client feels: failures, served requests/s during
/// the rollout, p99, each against the best native configuration measured in the same run.
fn rollout_targets(all: &[Summary]) -> String {
    let find = |scenario: &str, variant: &str| all.iter().find(|s| s.scenario == scenario && s.variant == variant);
    let rps = |s: &Summary| s.rollout_rps_pct.unwrap_or(0.0);
    let mut out = String::new();
    let recipe = "churn-guard+fallback";
    for scenario in ["S1", "S2"] {
        let Some(s) = find(scenario, recipe) else { continue };
        let want = if scenario == "S1" { 100.0 } else { 99.9 };
        let _ = writeln!(
            out,
            "- {scenario} {recipe}: success {:.3}% ≥ {want}%: {}; ok/s during rollout {:.1}% ≥ 95%: {}; p99 {:.2} ms ≤ 50 ms: {}",
            s.success_pct,
            verdict(s.success_pct >= want, format!("by {:.3} points", want - s.success_pct)),
            rps(s),
            verdict(rps(s) >= 95.0, format!("by {:.1} points", 95.0 - rps(s))),
            s.p99_ms,
            verdict(s.p99_ms <= 50.0, format!("{:.0}x", s.p99_ms / 50.0)),
        );
    }
    if let (Some(s), Some(tuned)) = (find("S4", recipe), find("S4", "builtin-tuned")) {
        let failed_pct = 100.0 * s.failed as f64 / s.sent.max(1) as f64;
        let _ = writeln!(
            out,
            "- S4 {recipe}: failed {failed_pct:.4}% ≤ 0.01%: {}; failed {} ≤ builtin-tuned's {} / 10: {}; ok/s during rollout {:.1}% ≥ 95%: {}; p99 {:.2} ms ≤ 2 × builtin-tuned's {:.2} ms: {}",
            verdict(failed_pct <= 0.01, format!("by {:.4} points", failed_pct - 0.01)),
            s.failed,
            tuned.failed,
            verdict(s.failed * 10 <= tuned.failed, format!("{:.1}x the tenth", s.failed as f64 * 10.0 / tuned.failed.max(1) as f64)),
            rps(s),
            verdict(rps(s) >= 95.0, format!("by {:.1} points", 95.0 - rps(s))),
            s.p99_ms,
            tuned.p99_ms,
            verdict(s.p99_ms <= 2.0 * tuned.p99_ms, format!("{:.1}x builtin-tuned's", s.p99_ms / tuned.p99_ms.max(1e-9))),
        );
    }
    if let (Some(s), Some(builtin)) = (find("S4", "churn-guard"), find("S4", "builtin")) {
        let _ = writeln!(
            out,
            "- S4 churn-guard `{{}}`: failed {} ≤ builtin's {}: {}; ok/s during rollout {:.1}% within 10 points of builtin's {:.1}%: {}",
            s.failed,
            builtin.failed,
            verdict(s.failed <= builtin.failed, format!("{:.1}x builtin's", s.failed as f64 / builtin.failed.max(1) as f64)),
            rps(s),
            rps(builtin),
            verdict(rps(s) >= rps(builtin) - 10.0, format!("by {:.1} points", rps(builtin) - 10.0 - rps(s))),
        );
    }
    if let Some(s) = find("S5", recipe) {
        let _ = writeln!(
            out,
            "- S5 {recipe} (1 s connect and per-try timeouts, as builtin-tuned+timeouts): success {:.3}% ≥ 99.9%: {}; ok/s during rollout {:.1}% ≥ 90%: {}; worst second {} ok/s > 0: {}",
            s.success_pct,
            verdict(s.success_pct >= 99.9, format!("by {:.3} points", 99.9 - s.success_pct)),
            rps(s),
            verdict(rps(s) >= 90.0, format!("by {:.1} points", 90.0 - rps(s))),
            s.worst_second_rps,
            verdict(s.worst_second_rps > 0, "a second with no success".into()),
        );
    }
    out
}
