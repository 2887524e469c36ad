//! The run report: JSON (stdout and `--report FILE`) and a self-contained HTML page with SVG
//! plots (`--html FILE`): latency over time, the latency percentile curve, and the gateway's
//! RSS and CPU over time.

use std::fmt::Write as _;

use plotters::prelude::*;
use serde::Serialize;

use crate::procfs::ProcStats;
use crate::stats::{Recorder, Summary, TimePoint};

/// The report every scenario produces.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// The scenario's name.
    pub scenario: &'static str,
    /// Its parameters.
    pub params: serde_json::Value,
    /// Its figures (throughputs, counts, times).
    pub figures: serde_json::Value,
    /// The main latency distribution, if the scenario measures one.
    pub latency_ms: Option<Summary>,
    /// `(percentile, milliseconds)` points of that distribution, for the percentile plot.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub latency_percentiles: Vec<(f64, f64)>,
    /// The same distribution second by second, for the latency-over-time plot.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub latency_timeline: Vec<TimePoint>,
    /// The gateway's CPU and memory over the run, when its pid is known.
    pub gateway: Option<ProcStats>,
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
            failures,
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
             <h1>syncgate-loadtest: {0}</h1>{verdict}\
             <h2>Parameters</h2><pre>{1}</pre><h2>Figures</h2><pre>{2}</pre>",
            self.scenario,
            escape(&pretty(&self.params)),
            escape(&pretty(&self.figures)),
        );
        if let Some(l) = &self.latency_ms {
            let _ = write!(
                h,
                "<h2>Latency</h2><pre>{}</pre>",
                escape(&serde_json::to_string_pretty(l).unwrap_or_default())
            );
        }
        if !self.latency_timeline.is_empty() {
            h.push_str("<h3>Latency over time (per second, ms)</h3>");
            h.push_str(&timeline_svg(&self.latency_timeline));
        }
        if !self.latency_percentiles.is_empty() {
            h.push_str("<h3>Latency by percentile (ms)</h3>");
            h.push_str(&percentile_svg(&self.latency_percentiles));
        }
        if let Some(g) = self.gateway.as_ref().filter(|g| !g.series.is_empty()) {
            h.push_str("<h2>Gateway process</h2>");
            h.push_str(&gateway_svg(g));
        }
        h.push_str("</body></html>\n");
        h
    }
}

fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
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

fn percentile_svg(points: &[(f64, f64)]) -> String {
    // x = -log10(1 - p/100): 90 → 1, 99 → 2, 99.9 → 3 (the usual HDR percentile plot).
    let nines = |p: f64| -(1.0 - (p / 100.0).min(0.99999)).log10();
    let x_max = points.iter().map(|(p, _)| nines(*p)).fold(1.0, f64::max);
    let y_max = points.iter().map(|(_, v)| *v).fold(0.1, f64::max) * 1.1;
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
                points.iter().map(|(p, v)| (nines(*p), *v)),
                &BLUE,
            ))
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(
                points
                    .iter()
                    .map(|(p, v)| Circle::new((nines(*p), *v), 3, BLUE.filled())),
            )
            .map_err(|e| e.to_string())?;
        Ok(())
    })
}

fn gateway_svg(g: &ProcStats) -> String {
    let t0 = g.series.first().map_or(0.0, |s| s.0);
    let x_max = g.series.last().map_or(1.0, |s| (s.0 - t0).max(1.0));
    let rss_max = g.series.iter().map(|s| s.1).max().unwrap_or(1) as f64 / 1024.0 * 1.1;
    let cpu_max = g.series.iter().map(|s| s.2).fold(100.0, f64::max) * 1.1;
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
                g.series.iter().map(|s| (s.0 - t0, s.1 as f64 / 1024.0)),
                &BLUE,
            ))
            .map_err(|e| e.to_string())?
            .label("RSS")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        chart
            .draw_secondary_series(LineSeries::new(
                g.series.iter().map(|s| (s.0 - t0, s.2)),
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
        r.gateway = Some(ProcStats {
            series: vec![(0.0, 10_000, 5.0), (1.0, 12_000, 50.0)],
            ..ProcStats::default()
        });
        let html = r.to_html();
        assert!(html.contains("nothing lost"));
        assert_eq!(html.matches("<svg").count(), 3, "three plots");
        assert!(html.contains("RSS"));
        r.failures.push("subscriber 1: <missing> 3".into());
        let html = r.to_html();
        assert!(html.contains("Correctness FAILED: 1 problem(s)"));
        assert!(html.contains("&lt;missing&gt;"));
    }
}
