//! The eval's PNG charts, drawn with plotters from the results file alone. Text uses DejaVu
//! Sans embedded in the binary, so charts render the same on machines without fonts.

use std::path::Path;
use std::sync::Once;

use plotters::coord::types::RangedCoordf64;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use super::results::{ArmSummary, Evaluation, Results, ENTROPY_BIN, ENTROPY_BINS};

const SIZE: (u32, u32) = (900, 540);
const FONT: &str = "sans-serif";

fn register_fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bytes are a known-good TTF; registering can only fail on a corrupt font.
        let _ = register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
    });
}

fn color(i: usize) -> RGBColor {
    const PALETTE: [RGBColor; 6] = [
        RGBColor(90, 90, 90),
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
    ];
    PALETTE[i % PALETTE.len()]
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;
type Plot<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;
type Chart = fn(&Results, &Path) -> DrawResult;
/// A bar per arm: legend, colour, offset from the arm's slot, and the value.
type Bar = (&'static str, RGBColor, f64, fn(&ArmSummary) -> usize);

/// A chart's caption and margins; the caller sets the ranges.
fn frame<'a, 'b>(
    root: &'a DrawingArea<BitMapBackend<'b>, plotters::coord::Shift>,
    caption: &str,
    y_label_area: u32,
) -> ChartBuilder<'a, 'b, BitMapBackend<'b>> {
    let mut builder = ChartBuilder::on(root);
    builder
        .caption(caption, (FONT, 24))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(y_label_area);
    builder
}

fn legend<'a: 'b, 'b>(chart: &mut Plot<'b, 'a>, position: SeriesLabelPosition) -> DrawResult {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 14))
        .position(position)
        .draw()?;
    Ok(())
}

/// accuracy.png, length.png, entropy.png and tokens.png in `dir`.
pub fn draw_all(results: &Results, dir: &Path) -> anyhow::Result<()> {
    register_fonts();
    let charts: [(&str, Chart); 4] = [
        ("accuracy.png", accuracy),
        ("length.png", length),
        ("entropy.png", entropy),
        ("tokens.png", tokens),
    ];
    for (name, draw) in charts {
        draw(results, &dir.join(name)).map_err(|e| anyhow::anyhow!("drawing {name}: {e}"))?;
    }
    Ok(())
}

/// Per adapted arm, (episode, value) points, starting from the base arm's episode 0.
fn series(results: &Results, value: impl Fn(&Evaluation) -> f64) -> Vec<(String, Vec<(f64, f64)>)> {
    let base = base_evaluation(results);
    results
        .arms
        .iter()
        .filter(|arm| arm.arm != "base")
        .map(|arm| {
            let mut points: Vec<(f64, f64)> = base
                .into_iter()
                .chain(&arm.evaluations)
                .map(|e| (e.episode as f64, value(e)))
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            (arm.arm.clone(), points)
        })
        .collect()
}

fn base_evaluation(results: &Results) -> Option<&Evaluation> {
    results.arm("base").and_then(|a| a.evaluation(0))
}

/// A dashed level across every episode: where the base model stands, the line to beat.
struct Reference {
    label: String,
    value: f64,
    color: RGBColor,
}

fn line_chart(
    path: &Path,
    caption: &str,
    y_label: &str,
    lines: &[(String, Vec<(f64, f64)>)],
    references: &[Reference],
    y_range: Option<(f64, f64)>,
) -> DrawResult {
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let x_max = lines
        .iter()
        .flat_map(|(_, p)| p.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let (y_min, y_max) = y_range.unwrap_or_else(|| {
        let top = lines
            .iter()
            .flat_map(|(_, p)| p.iter().map(|p| p.1))
            .chain(references.iter().map(|r| r.value))
            .fold(1.0, f64::max);
        (0.0, top * 1.1)
    });
    let mut chart =
        frame(&root, caption, 60).build_cartesian_2d(-0.1..x_max + 0.1, y_min..y_max)?;
    chart
        .configure_mesh()
        .x_desc("episode")
        .y_desc(y_label)
        .x_labels(x_max as usize + 1)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .label_style((FONT, 15))
        .draw()?;
    for r in references {
        let style = r.color.stroke_width(2);
        chart
            .draw_series(DashedLineSeries::new(
                [(0.0, r.value), (x_max, r.value)],
                8,
                6,
                style,
            ))?
            .label(&r.label)
            .legend(move |(x, y)| DashedPathElement::new(vec![(x, y), (x + 20, y)], 5, 3, style));
    }
    // Colour 0 is the base model's; the adapted arms take the rest.
    for (i, (name, points)) in lines.iter().enumerate() {
        let c = color(i + 1);
        chart
            .draw_series(LineSeries::new(points.iter().copied(), c.stroke_width(3)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3)));
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, c.filled())))?;
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    root.present()?;
    Ok(())
}

fn accuracy(results: &Results, path: &Path) -> DrawResult {
    let k = results.setup.k;
    let lines = series(results, |e| e.pass_at_1);
    let base = base_evaluation(results);
    let references: Vec<Reference> = base
        .map(|e| {
            vec![
                Reference {
                    label: "base pass@1".into(),
                    value: e.pass_at_1,
                    color: color(0),
                },
                Reference {
                    label: format!("base maj@{k}"),
                    value: e.maj_at_k,
                    color: BLACK,
                },
            ]
        })
        .unwrap_or_default();
    line_chart(
        path,
        &format!("pass@1 (mean of {k} samples) after each episode"),
        "pass@1",
        &lines,
        &references,
        Some((0.0, 1.0)),
    )
}

fn length(results: &Results, path: &Path) -> DrawResult {
    let lines = series(results, |e| e.mean_length);
    let references: Vec<Reference> = base_evaluation(results)
        .map(|e| Reference {
            label: "base".into(),
            value: e.mean_length,
            color: color(0),
        })
        .into_iter()
        .collect();
    line_chart(
        path,
        "mean response length after each episode",
        "tokens",
        &lines,
        &references,
        None,
    )
}

/// Forking-token entropy share per bin, first episode against last, per adapted arm.
fn entropy(results: &Results, path: &Path) -> DrawResult {
    let mut lines = Vec::new();
    for arm in results.arms.iter().filter(|a| !a.batches.is_empty()) {
        let episodes: Vec<_> = results
            .episodes
            .iter()
            .filter(|e| e.arm == arm.arm)
            .collect();
        let (Some(first), Some(last)) = (episodes.first(), episodes.last()) else {
            continue;
        };
        let ends = if first.episode == last.episode {
            vec![("only", first)]
        } else {
            vec![("first", first), ("last", last)]
        };
        for (label, e) in ends {
            let total = e.forking_histogram.iter().sum::<u32>().max(1) as f64;
            let points = e
                .forking_histogram
                .iter()
                .enumerate()
                .map(|(i, &c)| ((i as f64 + 0.5) * ENTROPY_BIN as f64, c as f64 / total))
                .collect::<Vec<_>>();
            lines.push((
                arm.arm.clone(),
                format!("{} episode {} ({label})", arm.arm, e.episode),
                points,
            ));
        }
    }
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let top = lines
        .iter()
        .flat_map(|(_, _, p): &(String, String, Vec<(f64, f64)>)| p.iter().map(|p| p.1))
        .fold(0.1, f64::max);
    let mut chart = frame(&root, "forking-token entropy, first vs last episode", 60)
        .build_cartesian_2d(
            0.0..(ENTROPY_BINS as f32 * ENTROPY_BIN) as f64,
            0.0..top * 1.1,
        )?;
    chart
        .configure_mesh()
        .x_desc("entropy (nats)")
        .y_desc("share of forking tokens")
        .label_style((FONT, 15))
        .draw()?;
    let mut arm_index = 0;
    for (i, (arm, name, points)) in lines.iter().enumerate() {
        // One colour per arm; its last episode drawn thicker.
        if i > 0 && lines[i - 1].0 != *arm {
            arm_index += 1;
        }
        let c = color(arm_index + 1);
        let width = if name.ends_with("(first)") { 1 } else { 3 };
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                c.stroke_width(width),
            ))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(width))
            });
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    root.present()?;
    Ok(())
}

/// Tokens each arm spent: rollouts, and what flat sampling would have spent for the same
/// leaves.
fn tokens(results: &Results, path: &Path) -> DrawResult {
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let arms: Vec<_> = results.summary.iter().filter(|a| a.arm != "base").collect();
    let top = arms
        .iter()
        .map(|a| a.flat_equivalent_tokens.max(a.rollout_tokens))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let names: Vec<String> = arms.iter().map(|a| a.arm.clone()).collect();
    let mut chart = frame(&root, "adaptation tokens per arm", 80)
        .build_cartesian_2d(-0.5..names.len().max(1) as f64 - 0.5, 0.0..top * 1.15)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(names.len().max(1))
        .x_label_formatter(&|x| names.get(x.round() as usize).cloned().unwrap_or_default())
        .y_label_formatter(&|y| format!("{y:.0}"))
        .y_desc("tokens")
        .label_style((FONT, 15))
        .draw()?;
    let bars: [Bar; 2] = [
        ("rollout tokens", color(1), -0.35, |a| a.rollout_tokens),
        ("flat-equivalent tokens", color(2), 0.02, |a| {
            a.flat_equivalent_tokens
        }),
    ];
    for (label, c, offset, value) in bars {
        chart
            .draw_series(arms.iter().enumerate().map(|(i, a)| {
                let x = i as f64 + offset;
                Rectangle::new([(x, 0.0), (x + 0.33, value(a) as f64)], c.filled())
            }))?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], c.filled()));
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    root.present()?;
    Ok(())
}
