//! The run report: JSON (stdout and `--report FILE`) and a self-contained HTML page with SVG
//! plots (`--html FILE`): latency over time, the latency percentile curve, and the gateway's
//! RSS and CPU over time.

use std::fmt::Write as _;

use plotters::prelude::*;
use serde::Serialize;

use crate::procfs::{Machine, ProcStats};
use crate::stats::{PercentilePoint, Recorder, Summary, TimePoint};

/// What a run was: enough to tell, from the report alone, what was measured and where.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunInfo {
    /// The harness's command line, as given.
    pub command_line: Vec<String>,
    /// When the run started, RFC 3339 UTC.
    pub started_at: String,
    /// How long it took, seconds.
    pub duration_s: f64,
    /// The harness's version.
    pub harness_version: String,
    /// The machine.
    pub machine: Machine,
    /// The gateway, when the harness spawned it (a remote one is described by its URL only).
    pub gateway: Option<GatewayInfo>,
    /// The gateway's URL.
    pub url: String,
    /// The harness's open-file limit.
    pub nofile_limit: u64,
}

/// The spawned gateway's build and configuration.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GatewayInfo {
    /// `syncgate --version`.
    pub version: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Its effective configuration (`check-config`, secrets redacted), TOML.
    pub config: String,
}

/// The report every scenario produces.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// What the run was (command line, machine, gateway, time).
    pub run: Option<RunInfo>,
    /// The scenario's name.
    pub scenario: &'static str,
    /// Its parameters.
    pub params: serde_json::Value,
    /// Its figures (throughputs, counts, times).
    pub figures: serde_json::Value,
    /// The main latency distribution, if the scenario measures one.
    pub latency_ms: Option<Summary>,
    /// Points of that distribution by percentile, for the percentile plot.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub latency_percentiles: Vec<PercentilePoint>,
    /// The same distribution second by second, for the latency-over-time plot.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub latency_timeline: Vec<TimePoint>,
    /// The gateway's CPU and memory over the run, when its pid is known.
    pub gateway: Option<ProcStats>,
    /// The harness's own CPU and memory over the run: a harness near 100 % of a core per
    /// thread bounds what the run can show of the gateway.
    pub harness: Option<ProcStats>,
    /// Correctness failures; empty = nothing lost, doubled or reordered.
    pub failures: Vec<String>,
}

impl Report {
    /// A report whose latency fields all come from `rec`.
    pub fn new(
        scenario: &'static str,
        params: serde_json::Value,
        figures: serde_json::Value,
        rec: &Recorder,
        failures: Vec<String>,
    ) -> Report {
        Report {
            scenario,
            params,
            figures,
            latency_ms: Some(rec.summary()),
            latency_percentiles: rec.percentile_curve(),
            latency_timeline: rec.timeline(),
            gateway: None,
            harness: None,
            run: None,
            failures,
        }
    }

    /// What the gateway and the harness cost per unit of work, from the sampled CPU time:
    /// `gateway_cpu_s_per_million_deliveries` (or `_per_thousand_mutations` for ingest) — the
    /// figure that does not depend on how busy the rest of the machine was — and
    /// `harness_cpu_seconds` (this process and its workers), which says whether the harness
    /// was the limit.
    pub fn add_cost_figures(&mut self) {
        let Some(figures) = self.figures.as_object_mut() else {
            return;
        };
        let workers = figures
            .get("workers_cpu_seconds")
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(0.0);
        if let Some(h) = &self.harness {
            figures.insert(
                "harness_cpu_seconds".into(),
                (h.cpu_seconds + workers).into(),
            );
        }
        let Some(g) = &self.gateway else {
            return;
        };
        figures.insert("gateway_cpu_seconds".into(), g.cpu_seconds.into());
        let count = |k: &str| figures.get(k).and_then(serde_json::Value::as_u64);
        let (deliveries, mutations) = (count("deliveries"), count("acknowledged"));
        if let Some(d) = deliveries.filter(|d| *d > 0) {
            let per = g.cpu_seconds / d as f64 * 1e6;
            figures.insert("gateway_cpu_s_per_million_deliveries".into(), per.into());
        }
        if let Some(m) = mutations.filter(|m| *m > 0) {
            let per = g.cpu_seconds / m as f64 * 1e3;
            figures.insert("gateway_cpu_s_per_thousand_mutations".into(), per.into());
        }
    }

    /// The HTML page: verdict, parameters, figures, and the plots.
    pub fn to_html(&self) -> String {
        let mut h = String::new();
        let verdict = if self.failures.is_empty() {
            "<p class=ok>Correctness: nothing lost, doubled or reordered.</p>".to_owned()
        } else {
            let items: String = self
                .failures
                .iter()
                .take(200)
                .map(|f| format!("<li>{}</li>", escape(f)))
                .collect();
            format!(
                "<p class=bad>Correctness FAILED: {} problem(s).</p><ul>{items}</ul>",
                self.failures.len()
            )
        };
        let _ = write!(
            h,
            "<!doctype html><html><head><meta charset=utf-8><title>syncgate-loadtest: {0}</title>\
             <style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}\
             .ok{{color:#080}}.bad{{color:#b00;font-weight:bold}}\
             pre{{background:#f4f4f4;padding:1em;overflow:auto}}</style></head><body>\
             table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 8px;\
             text-align:left}}td.n{{text-align:right;font-variant-numeric:tabular-nums}}</style>\
             </head><body><h1>syncgate-loadtest: {0}</h1>{verdict}",
            self.scenario,
        );
        if let Some(run) = &self.run {
            h.push_str("<h2>Run</h2>");
            let mut rows = vec![
                ("command line", run.command_line.join(" ")),
                ("started", run.started_at.clone()),
                ("duration", format!("{:.1} s", run.duration_s)),
                ("harness", run.harness_version.clone()),
                (
                    "machine",
                    format!(
                        "{} ({} cores, {:.1} GiB, Linux {})",
                        run.machine.hostname,
                        run.machine.cores,
                        run.machine.memory_kib as f64 / 1024.0 / 1024.0,
                        run.machine.kernel
                    ),
                ),
                ("gateway URL", run.url.clone()),
            ];
            if let Some(g) = &run.gateway {
                rows.push(("gateway", format!("{} {}", g.version, g.args.join(" "))));
            }
            h.push_str(&table(
                rows.iter().map(|(k, v)| ((*k).to_owned(), v.clone())),
            ));
            if let Some(g) = &run.gateway {
                let _ = write!(
                    h,
                    "<details><summary>Gateway configuration</summary><pre>{}</pre></details>",
                    escape(&g.config)
                );
            }
        }
        h.push_str("<h2>Parameters</h2>");
        h.push_str(&table(flatten("", &self.params)));
        h.push_str("<h2>Figures</h2>");
        h.push_str(&table(flatten("", &self.figures)));
        if let Some(l) = &self.latency_ms {
            h.push_str("<h2>Latency</h2>");
            let v = serde_json::to_value(l).unwrap_or_default();
            h.push_str(&table(flatten("", &v)));
        }
        let cpu = |p: &Option<ProcStats>| {
            p.as_ref().map_or("not sampled".to_owned(), |p| {
                format!("{:.0} %", p.cpu_percent)
            })
        };
        h.push_str(&table([
            (
                "gateway CPU (% of one core, run average)".to_owned(),
                cpu(&self.gateway),
            ),
            (
                "harness CPU (% of one core, run average)".to_owned(),
                cpu(&self.harness),
            ),
        ]));
        if !self.latency_timeline.is_empty() {
            h.push_str("<h3>Latency over time (per second, ms)</h3>");
            h.push_str(&timeline_svg(&self.latency_timeline));
        }
        if !self.latency_percentiles.is_empty() {
            h.push_str("<h3>Latency by percentile (ms)</h3>");
            h.push_str(&percentile_svg(&self.latency_percentiles));
        }
        if let Some(g) = self.gateway.as_ref().filter(|g| !g.series.is_empty()) {
            h.push_str("<h2>Gateway process: RSS and CPU</h2>");
            h.push_str(&process_svg(g));
        }
        if self.gateway.is_some() || self.harness.is_some() {
            h.push_str("<h2>CPU: gateway and harness (% of one core)</h2>");
            h.push_str(&cpu_svg(self.gateway.as_ref(), self.harness.as_ref()));
        }
        h.push_str("</body></html>\n");
        h
    }
}

/// `key → value` rows of a JSON value: nested objects as dotted keys, arrays and scalars as
/// their JSON text.
fn flatten(prefix: &str, v: &serde_json::Value) -> Vec<(String, String)> {
    match v {
        serde_json::Value::Object(m) => m
            .iter()
            .flat_map(|(k, v)| {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v)
            })
            .collect(),
        serde_json::Value::String(s) => vec![(prefix.to_owned(), s.clone())],
        other => vec![(prefix.to_owned(), other.to_string())],
    }
}

fn table(rows: impl IntoIterator<Item = (String, String)>) -> String {
    let mut t = String::from("<table>");
    for (k, v) in rows {
        let class = if v.parse::<f64>().is_ok() {
            " class=n"
        } else {
            ""
        };
        let _ = write!(
            t,
            "<tr><th>{}</th><td{class}>{}</td></tr>",
            escape(&k),
            escape(&v)
        );
    }
    t.push_str("</table>");
    t
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

const SIZE: (u32, u32) = (900, 360);

/// Draws into an SVG string; a drawing error yields a note instead of a plot.
fn svg(
    draw: impl FnOnce(&DrawingArea<SVGBackend<'_>, plotters::coord::Shift>) -> PlotResult,
) -> String {
    let mut out = String::new();
    let res = {
        let root = SVGBackend::with_string(&mut out, SIZE).into_drawing_area();
        let r = root
            .fill(&WHITE)
            .map_err(|e| e.to_string())
            .and_then(|_| draw(&root));
        r.and_then(|_| root.present().map_err(|e| e.to_string()))
    };
    match res {
        Ok(()) => out,
        Err(e) => format!("<p>(plot unavailable: {})</p>", escape(&e)),
    }
}

type PlotResult = Result<(), String>;

/// A named line of the timeline plot: name, colour, and the value it draws.
type Series = (&'static str, RGBColor, fn(&TimePoint) -> f64);

fn timeline_svg(points: &[TimePoint]) -> String {
    let t0 = points.first().map_or(0, |p| p.sec);
    let x_max = points.last().map_or(1, |p| p.sec - t0 + 1) as f64;
    let y_max = points.iter().map(|p| p.max_ms).fold(0.1, f64::max) * 1.1;
    svg(|root| {
        let mut chart = ChartBuilder::on(root)
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(0f64..x_max, (0.01f64..y_max).log_scale())
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("seconds into the run")
            .y_desc("ms (log)")
            .draw()
            .map_err(|e| e.to_string())?;
        let series: [Series; 3] = [
            ("p50", BLUE, |p| p.p50_ms),
            ("p99", RED, |p| p.p99_ms),
            ("max", BLACK, |p| p.max_ms),
        ];
        for (name, color, f) in series {
            chart
                .draw_series(LineSeries::new(
                    points.iter().map(|p| ((p.sec - t0) as f64, f(p).max(0.01))),
                    color,
                ))
                .map_err(|e| e.to_string())?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())
    })
}

fn percentile_svg(points: &[PercentilePoint]) -> String {
    // x = -log10(1 - p/100): 90 → 1, 99 → 2, 99.9 → 3 (the usual HDR percentile plot).
    let nines = |p: f64| -(1.0 - (p / 100.0).min(0.99999)).log10();
    let x_max = points
        .iter()
        .map(|p| nines(p.percentile))
        .fold(1.0, f64::max);
    let y_max = points.iter().map(|p| p.ms).fold(0.1, f64::max) * 1.1;
    svg(|root| {
        let mut chart = ChartBuilder::on(root)
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(0f64..x_max, 0f64..y_max)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("percentile (1 = p90, 2 = p99, 3 = p99.9, 4 = p99.99)")
            .y_desc("ms")
            .draw()
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|p| (nines(p.percentile), p.ms)),
                &BLUE,
            ))
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(
                points
                    .iter()
                    .map(|p| Circle::new((nines(p.percentile), p.ms), 3, BLUE.filled())),
            )
            .map_err(|e| e.to_string())?;
        Ok(())
    })
}

fn process_svg(g: &ProcStats) -> String {
    let t0 = g.series.first().map_or(0.0, |s| s.sec);
    let x_max = g.series.last().map_or(1.0, |s| (s.sec - t0).max(1.0));
    let rss_max = g.series.iter().map(|s| s.rss_kib).max().unwrap_or(1) as f64 / 1024.0 * 1.1;
    let cpu_max = g.series.iter().map(|s| s.cpu_percent).fold(100.0, f64::max) * 1.1;
    svg(|root| {
        let mut chart = ChartBuilder::on(root)
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .right_y_label_area_size(55)
            .build_cartesian_2d(0f64..x_max, 0f64..rss_max)
            .map_err(|e| e.to_string())?
            .set_secondary_coord(0f64..x_max, 0f64..cpu_max);
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc("RSS MiB")
            .draw()
            .map_err(|e| e.to_string())?;
        chart
            .configure_secondary_axes()
            .y_desc("CPU % of one core")
            .draw()
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(LineSeries::new(
                g.series
                    .iter()
                    .map(|s| (s.sec - t0, s.rss_kib as f64 / 1024.0)),
                &BLUE,
            ))
            .map_err(|e| e.to_string())?
            .label("RSS")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        chart
            .draw_secondary_series(LineSeries::new(
                g.series.iter().map(|s| (s.sec - t0, s.cpu_percent)),
                &RED,
            ))
            .map_err(|e| e.to_string())?
            .label("CPU")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())
    })
}

/// The gateway's and the harness's CPU on one time axis (seconds since the run's clock).
fn cpu_svg(gateway: Option<&ProcStats>, harness: Option<&ProcStats>) -> String {
    let all = gateway
        .iter()
        .chain(harness.iter())
        .flat_map(|p| p.series.iter());
    let x_max = all.clone().map(|s| s.sec).fold(1.0, f64::max);
    let y_max = all.map(|s| s.cpu_percent).fold(100.0, f64::max) * 1.1;
    svg(|root| {
        let mut chart = ChartBuilder::on(root)
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(0f64..x_max, 0f64..y_max)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("seconds into the run")
            .y_desc("CPU % of one core")
            .draw()
            .map_err(|e| e.to_string())?;
        for (name, color, p) in [("gateway", RED, gateway), ("harness", BLUE, harness)] {
            let Some(p) = p else { continue };
            chart
                .draw_series(LineSeries::new(
                    p.series.iter().map(|s| (s.sec, s.cpu_percent)),
                    color,
                ))
                .map_err(|e| e.to_string())?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())
    })
}

/// RFC 3339 UTC for a time given as seconds since the Unix epoch (civil-from-days, H. Hinnant).
pub fn rfc3339(unix_s: u64) -> String {
    let (days, rem) = (unix_s / 86_400, unix_s % 86_400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn html_report_has_plots_and_the_verdict() {
        let mut rec = Recorder::default();
        for ms in 1..=200u64 {
            rec.record(Duration::from_millis(ms));
        }
        let mut r = Report::new(
            "fanout",
            serde_json::json!({"subscribers": 3}),
            serde_json::json!({"deliveries": 200}),
            &rec,
            vec![],
        );
        let reading = |sec, rss_kib, cpu_percent| crate::procfs::SeriesPoint {
            sec,
            rss_kib,
            cpu_percent,
        };
        r.gateway = Some(ProcStats {
            series: vec![reading(0.0, 10_000, 5.0), reading(1.0, 12_000, 50.0)],
            ..ProcStats::default()
        });
        r.harness = Some(ProcStats {
            cpu_percent: 37.0,
            series: vec![reading(0.0, 8_000, 20.0), reading(1.0, 8_000, 40.0)],
            ..ProcStats::default()
        });
        r.run = Some(RunInfo {
            command_line: vec!["syncgate-loadtest".into(), "fanout".into()],
            started_at: rfc3339(1_796_036_416),
            machine: crate::procfs::machine(),
            ..RunInfo::default()
        });
        let html = r.to_html();
        assert!(html.contains("nothing lost"));
        assert_eq!(html.matches("<svg").count(), 4, "four plots");
        assert!(html.contains("RSS") && html.contains("harness"));
        assert!(
            html.contains("<tr><th>subscribers</th><td class=n>3</td></tr>"),
            "{html}"
        );
        assert!(html.contains("2026-11-30T11:00:16Z") && html.contains("37 %"));
        let json = serde_json::to_value(&r).unwrap();
        assert!(
            json["latency_percentiles"][0]["percentile"].is_f64(),
            "labelled points"
        );
        assert!(
            json["gateway"]["series"][0]["rss_kib"].is_u64(),
            "labelled readings"
        );
        assert!(json["run"]["machine"]["cores"].as_u64().unwrap() >= 1);
        r.failures.push("subscriber 1: <missing> 3".into());
        let html = r.to_html();
        assert!(html.contains("Correctness FAILED: 1 problem(s)"));
        assert!(html.contains("&lt;missing&gt;"));
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_036_416), "2026-11-30T11:00:16Z");
    }
}
