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
    /// Which job: an index into the plot's legend, so a job keeps its
    /// colour in every panel, even where another job has no such metric.
    pub job: usize,
    pub points: Vec<(u64, f64)>,
}

/// A metric and its curves (one per job that has it).
pub struct Panel {
    pub metric: String,
    pub curves: Vec<Curve>,
}

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

const WIDTH: u32 = 960;
const TITLE_HEIGHT: u32 = 44;
const LEGEND_ROW: u32 = 24;
const PANEL_HEIGHT: u32 = 320;

/// Tableau's ten qualitative colours (told apart by most people, colour
/// blind included), then plotters' 99 for larger overlays.
fn colour(job: usize) -> RGBAColor {
    const TEN: [(u8, u8, u8); 10] = [
        (78, 121, 167),
        (242, 142, 43),
        (225, 87, 89),
        (118, 183, 178),
        (89, 161, 79),
        (237, 201, 72),
        (176, 122, 161),
        (255, 157, 167),
        (156, 117, 95),
        (186, 176, 172),
    ];
    match TEN.get(job) {
        Some(&(r, g, b)) => RGBColor(r, g, b).to_rgba(),
        None => Palette99::pick(job).to_rgba(),
    }
}

fn register_font() -> Result<(), String> {
    static ONCE: std::sync::Once = std::sync::Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
            .map_err(|_| "the compiled-in font does not load".to_string());
    });
    result
}

/// The legend's rows: entries (swatch and label) placed left to right,
/// wrapping at the plot's width. Text widths are estimated from the font
/// size (DejaVu Sans averages ~0.6 em), which errs wide.
fn legend_rows(labels: &[String]) -> Vec<Vec<usize>> {
    let mut rows: Vec<Vec<usize>> = vec![];
    let mut x = 0;
    for (i, l) in labels.iter().enumerate() {
        let w = entry_width(l);
        if rows.is_empty() || x + w > WIDTH - 20 {
            rows.push(vec![]);
            x = 10;
        }
        rows.last_mut().expect("a row").push(i);
        x += w;
    }
    rows
}

fn entry_width(label: &str) -> u32 {
    34 + (label.chars().count() as u32 * 9).min(WIDTH - 60)
}

/// Draw `panels` into `path` (`.svg` or `.png`), the jobs named once in a
/// legend above the panels (never over a line).
pub fn draw(path: &Path, title: &str, jobs: &[String], panels: &[Panel]) -> Result<(), String> {
    register_font()?;
    let legend = LEGEND_ROW * legend_rows(jobs).len() as u32 + 8;
    let size = (
        WIDTH,
        TITLE_HEIGHT + legend + PANEL_HEIGHT * panels.len().max(1) as u32,
    );
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let fail = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    match ext {
        "svg" => draw_on(
            SVGBackend::new(path, size).into_drawing_area(),
            title,
            jobs,
            panels,
        ),
        "png" => draw_on(
            BitMapBackend::new(path, size).into_drawing_area(),
            title,
            jobs,
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

/// `title` at the largest size from 22 down to 13 points that fits the
/// width, cut in the middle with an ellipsis if even 13 does not.
fn fit_title<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, title: &str) -> (String, u32) {
    let fits = |t: &str, size: u32| {
        area.estimate_text_size(t, &("sans-serif", size).into_text_style(area))
            .is_ok_and(|(w, _)| w + 40 <= WIDTH)
    };
    for size in (13..=22).rev() {
        if fits(title, size) {
            return (title.to_string(), size);
        }
    }
    let chars: Vec<char> = title.chars().collect();
    let mut keep = chars.len();
    while keep > 8 {
        keep -= 1;
        let head: String = chars[..keep / 2].iter().collect();
        let tail: String = chars[chars.len() - (keep - keep / 2)..].iter().collect();
        let cut = format!("{head}…{tail}");
        if fits(&cut, 13) {
            return (cut, 13);
        }
    }
    (chars.iter().take(8).collect(), 13)
}

fn draw_on<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    jobs: &[String],
    panels: &[Panel],
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(err)?;
    let (top, rest) = root.split_vertically(TITLE_HEIGHT);
    let (text, size) = fit_title(&top, title);
    top.titled(&text, ("sans-serif", size)).map_err(err)?;
    let rows = legend_rows(jobs);
    let (legend, body) = rest.split_vertically(LEGEND_ROW * rows.len() as u32 + 8);
    for (r, row) in rows.iter().enumerate() {
        let y = (r as u32 * LEGEND_ROW + LEGEND_ROW / 2) as i32;
        let mut x = 10;
        for &i in row {
            let c = colour(i);
            legend
                .draw(&PathElement::new(
                    vec![(x, y), (x + 24, y)],
                    c.stroke_width(3),
                ))
                .map_err(err)?;
            legend
                .draw(&Text::new(
                    jobs[i].clone(),
                    (x + 30, y - 7),
                    ("sans-serif", 15).into_font(),
                ))
                .map_err(err)?;
            x += entry_width(&jobs[i]) as i32;
        }
    }
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
            .margin_right(36) // room for the last x tick's label
            .x_label_area_size(40)
            .y_label_area_size(80)
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
        for c in &panel.curves {
            let line = c
                .points
                .iter()
                .filter(|(_, v)| v.is_finite())
                .map(|(s, v)| (*s as f64, *v));
            chart
                .draw_series(LineSeries::new(line, colour(c.job).stroke_width(2)))
                .map_err(err)?;
        }
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

    fn jobs() -> Vec<String> {
        vec!["first".into(), "second".into(), "third".into()]
    }

    /// Three jobs; the second has no `lr`, so the third is the second line
    /// of that panel.
    fn panels() -> Vec<Panel> {
        let curve = |job: usize| Curve {
            job,
            points: (0..50)
                .map(|s| (s, (job + 1) as f64 / (s as f64 + 1.0)))
                .collect(),
        };
        vec![
            Panel {
                metric: "loss".into(),
                curves: vec![curve(0), curve(1), curve(2)],
            },
            Panel {
                metric: "lr".into(),
                curves: vec![curve(0), curve(2)],
            },
        ]
    }

    /// The stroke colour of each polyline, in drawing order.
    fn strokes(svg: &str) -> Vec<String> {
        svg.split("<polyline")
            .skip(1)
            .filter_map(|p| p.split("stroke=\"").nth(1))
            .map(|s| s.split('"').next().unwrap().to_string())
            .collect()
    }

    #[test]
    fn svg_has_a_panel_per_metric_and_a_colour_per_job() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.svg");
        draw(
            &path,
            "loss, lr: first vs second vs third",
            &jobs(),
            &panels(),
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        if std::env::var_os("SHOW_SVG").is_some() {
            println!("{svg}");
        }
        assert!(svg.contains("loss, lr: first vs second vs third"));
        for text in ["loss", "lr", "first", "second", "third", "step"] {
            assert!(
                svg.contains(&format!(">{text}<")) || svg.contains(&format!(">\n{text}\n<")),
                "{text}"
            );
        }
        // Coloured lines: the legend's three swatches, loss for all three,
        // lr for the first and third, each job in its own colour throughout.
        let s: Vec<String> = strokes(&svg)
            .into_iter()
            .filter(|c| c != "#000000")
            .collect();
        assert_eq!(s.len(), 8, "{s:?}");
        let (legend, loss, lr) = (&s[0..3], &s[3..6], &s[6..8]);
        assert!(legend[0] != legend[1] && legend[1] != legend[2] && legend[0] != legend[2]);
        assert_eq!(loss, legend);
        assert_eq!(lr, [legend[0].clone(), legend[2].clone()]);
        // Each name once: in the legend, not repeated per panel.
        assert_eq!(
            svg.matches(">third<").count() + svg.matches(">\nthird\n<").count(),
            1
        );
    }

    #[test]
    fn a_long_title_fits_the_width() {
        register_font().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let long = format!("loss: {}", vec!["a-very-long-job-name"; 20].join(" vs "));
        let path = dir.path().join("t.svg");
        let area = SVGBackend::new(&path, (WIDTH, 50)).into_drawing_area();
        let (fitted, size) = fit_title(&area, &long);
        assert!(
            fitted.contains('…') && fitted.starts_with("loss: a-very"),
            "{fitted}"
        );
        let (w, _) = area
            .estimate_text_size(&fitted, &("sans-serif", size).into_text_style(&area))
            .unwrap();
        assert!(w <= WIDTH, "{w}");
        assert_eq!(
            fit_title(&area, "loss: a vs b"),
            ("loss: a vs b".into(), 22)
        );
    }

    #[test]
    fn png_and_bad_extensions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.png");
        draw(&path, "t", &jobs(), &panels()).unwrap();
        assert!(std::fs::read(&path).unwrap().starts_with(b"\x89PNG"));
        let err = draw(&dir.path().join("p.jpg"), "t", &jobs(), &panels()).unwrap_err();
        assert!(err.contains(".svg or .png"), "{err}");
    }
}
