//! Metric plots: an SVG line chart (one polyline per series, with axes and
//! a legend) and a one-line terminal sparkline.

use std::fmt::Write;

const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

/// An SVG chart of `series` (name, points).
pub fn svg(title: &str, series: &[(String, Vec<(u64, f64)>)]) -> String {
    let (w, h, m) = (720.0, 400.0, 50.0);
    let pts: Vec<&(u64, f64)> = series
        .iter()
        .flat_map(|s| s.1.iter())
        .filter(|p| p.1.is_finite())
        .collect();
    let (x0, x1) = pts.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |a, p| {
        (a.0.min(p.0 as f64), a.1.max(p.0 as f64))
    });
    let (y0, y1) = pts.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |a, p| {
        (a.0.min(p.1), a.1.max(p.1))
    });
    let (x0, x1) = if pts.is_empty() {
        (0.0, 1.0)
    } else if x0 == x1 {
        (x0 - 1.0, x1 + 1.0)
    } else {
        (x0, x1)
    };
    let (y0, y1) = if pts.is_empty() {
        (0.0, 1.0)
    } else if y0 == y1 {
        (y0 - 1.0, y1 + 1.0)
    } else {
        (y0, y1)
    };
    let sx = |x: f64| m + (x - x0) / (x1 - x0) * (w - 2.0 * m);
    let sy = |y: f64| h - m - (y - y0) / (y1 - y0) * (h - 2.0 * m);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="20" font-family="sans-serif" font-size="14" text-anchor="middle">{}</text>"#,
        w / 2.0,
        escape(title)
    );
    let _ = writeln!(
        s,
        r#"<line x1="{m}" y1="{}" x2="{}" y2="{}" stroke="black"/>"#,
        h - m,
        w - m,
        h - m
    );
    let _ = writeln!(
        s,
        r#"<line x1="{m}" y1="{m}" x2="{m}" y2="{}" stroke="black"/>"#,
        h - m
    );
    for (v, y) in [(y0, h - m), (y1, m)] {
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" font-family="sans-serif" font-size="10" text-anchor="end">{}</text>"#,
            m - 4.0,
            y + 3.0,
            fmt(v)
        );
    }
    for (v, x) in [(x0, m), (x1, w - m)] {
        let _ = writeln!(
            s,
            r#"<text x="{x}" y="{}" font-family="sans-serif" font-size="10" text-anchor="middle">{}</text>"#,
            h - m + 14.0,
            fmt(v)
        );
    }
    for (i, (name, points)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let coords: Vec<String> = points
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|p| format!("{:.1},{:.1}", sx(p.0 as f64), sy(p.1)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline class="series" data-name="{}" fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
            escape(name),
            coords.join(" ")
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" font-family="sans-serif" font-size="11" fill="{color}">{}</text>"#,
            w - m - 120.0,
            m + 14.0 * i as f64,
            escape(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn fmt(v: f64) -> String {
    if v.abs() >= 1e4 || (v != 0.0 && v.abs() < 1e-3) {
        format!("{v:.2e}")
    } else {
        format!("{v:.3}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// ▁▂▃▄▅▆▇█ of the last `width` values.
pub fn sparkline(values: &[f64], width: usize) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let vals: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    let vals = &vals[vals.len().saturating_sub(width)..];
    let (lo, hi) = vals
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |a, v| {
            (a.0.min(*v), a.1.max(*v))
        });
    vals.iter()
        .map(|v| {
            if hi > lo {
                BARS[(((v - lo) / (hi - lo)) * 7.0).round() as usize]
            } else {
                BARS[3]
            }
        })
        .collect()
}
