//! Plots of metric curves: one panel per metric (each its own y axis), one
//! line per job with its name in the legend, real ticks, SVG or PNG by the
//! file's extension. Drawn with plotters; text with the DejaVu Sans font
//! compiled in (`assets/`), so labels render the same everywhere.
//! Sparklines for the terminal too.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

/// One job's points of one metric.
pub struct Curve {
    pub label: String,
    pub points: Vec<(u64, f64)>,
}

/// A metric and its curves (one per job).
pub struct Panel {
    pub metric: String,
    pub curves: Vec<Curve>,
}

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

fn register_font() -> Result<(), String> {
    static ONCE: std::sync::Once = std::sync::Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
            .map_err(|_| "the compiled-in font does not load".to_string());
    });
    result
}

/// Draw `panels` into `path` (`.svg` or `.png`).
pub fn draw(path: &Path, title: &str, panels: &[Panel]) -> Result<(), String> {
    register_font()?;
    let size = (960, 320 * panels.len().max(1) as u32 + 50);
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let fail = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    match ext {
        "svg" => draw_on(
            SVGBackend::new(path, size).into_drawing_area(),
            title,
            panels,
        ),
        "png" => draw_on(
            BitMapBackend::new(path, size).into_drawing_area(),
            title,
            panels,
        ),
        other => {
            return Err(format!(
                "{}: draw to .svg or .png, not {other:?}",
                path.display()
            ))
        }
    }
    .map_err(|e| fail(&e))
}

fn draw_on<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    panels: &[Panel],
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(err)?;
    let (top, body) = root.split_vertically(50);
    top.titled(title, ("sans-serif", 22)).map_err(err)?;
    let areas = body.split_evenly((panels.len().max(1), 1));
    for (area, panel) in areas.iter().zip(panels) {
        let pts = || {
            panel
                .curves
                .iter()
                .flat_map(|c| c.points.iter())
                .filter(|(_, v)| v.is_finite())
        };
        let (mut x0, mut x1) = pts().fold((f64::INFINITY, f64::NEG_INFINITY), |a, (s, _)| {
            (a.0.min(*s as f64), a.1.max(*s as f64))
        });
        let (mut y0, mut y1) = pts().fold((f64::INFINITY, f64::NEG_INFINITY), |a, (_, v)| {
            (a.0.min(*v), a.1.max(*v))
        });
        if !x0.is_finite() {
            (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
        }
        if x1 <= x0 {
            x1 = x0 + 1.0;
        }
        let pad = ((y1 - y0) * 0.05).max(y1.abs().max(1e-12) * 1e-3);
        (y0, y1) = (y0 - pad, y1 + pad);
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.metric, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc(&panel.metric)
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 15))
            .x_label_formatter(&|x| format!("{}", *x as u64))
            .y_label_formatter(&|y| tick(*y))
            .draw()
            .map_err(err)?;
        for (i, c) in panel.curves.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let line = c
                .points
                .iter()
                .filter(|(_, v)| v.is_finite())
                .map(|(s, v)| (*s as f64, *v));
            chart
                .draw_series(LineSeries::new(line, color.stroke_width(2)))
                .map_err(err)?
                .label(c.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)
}

/// A tick label: short and exact enough (`0.25`, `1e-5`, `1200`).
fn tick(y: f64) -> String {
    if y == 0.0 {
        return "0".into();
    }
    if y.abs() < 1e-3 || y.abs() >= 1e5 {
        return format!("{y:.2e}");
    }
    let s = format!("{y:.4}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn panels() -> Vec<Panel> {
        let curve = |label: &str, k: f64| Curve {
            label: label.into(),
            points: (0..50).map(|s| (s, k / (s as f64 + 1.0))).collect(),
        };
        ["loss", "lr"]
            .map(|m| Panel {
                metric: m.into(),
                curves: vec![curve("first", 1.0), curve("second", 2.0)],
            })
            .into()
    }

    #[test]
    fn svg_has_a_panel_per_metric_and_a_named_line_per_job() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.svg");
        draw(&path, "loss, lr: first vs second", &panels()).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        if std::env::var_os("SHOW_SVG").is_some() {
            println!("{svg}");
        }
        assert!(svg.contains("loss, lr: first vs second"));
        for text in ["loss", "lr", "first", "second", "step"] {
            assert!(
                svg.contains(&format!(">{text}<")) || svg.contains(&format!(">\n{text}\n<")),
                "{text}"
            );
        }
        assert!(svg.matches("<polyline").count() >= 4);
    }

    #[test]
    fn png_and_bad_extensions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.png");
        draw(&path, "t", &panels()).unwrap();
        assert!(std::fs::read(&path).unwrap().starts_with(b"\x89PNG"));
        let err = draw(&dir.path().join("p.jpg"), "t", &panels()).unwrap_err();
        assert!(err.contains(".svg or .png"), "{err}");
    }
}
