//! SVG charts for `ferry bench`: the probe's round-trip time over time, one panel per
//! migration (Ferry, and the baseline done by hand with runc and CRIU), with the migration's
//! phases shaded and the probe's largest gap between answers marked, so a person sees at a
//! glance where the time went.
//!
//! The output is a self-contained SVG 1.1 document: no scripts, no external fonts, all text
//! XML-escaped, every coordinate finite and clamped to its plot area. Thousands of samples are
//! decimated to at most two points per pixel column (the lowest and the highest round trip),
//! so spikes are never lost.

use std::fmt::{self, Write as _};

/// A shaded interval on the time axis.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    /// Phase name shown in the legend, e.g. "dump".
    pub label: String,
    /// Start, ms.
    pub start_ms: f64,
    /// End, ms.
    pub end_ms: f64,
}

/// One panel: the probe's samples and the phases of one migration, all times in ms on the same
/// clock (the caller has already shifted them so that 0 = migration start).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Panel {
    /// Panel title, e.g. "Ferry".
    pub title: String,
    /// (answer time ms, round trip ms) per answer, in time order.
    pub samples: Vec<(f64, f64)>,
    /// Phases to shade, in order; labels such as "dump", "transfer", "restore", "commit",
    /// "checkpoint", "copy".
    pub phases: Vec<Span>,
    /// The probe's largest gap between two answers (start ms, end ms), drawn as a bracket with
    /// its length written ("gap 123.4 ms").
    pub largest_gap: Option<(f64, f64)>,
    /// One-line note under the title, e.g. "downtime 123.4 ms, total 2.1 s, 270 MB".
    pub note: String,
}

/// Total width of the chart, px.
const WIDTH: f64 = 1000.0;
/// Room left of each plot for the y labels and the y axis title.
const MARGIN_LEFT: f64 = 72.0;
/// Room right of each plot.
const MARGIN_RIGHT: f64 = 24.0;
/// Width of each plot area.
const PLOT_W: f64 = WIDTH - MARGIN_LEFT - MARGIN_RIGHT;
/// Height of each plot area.
const PLOT_H: f64 = 170.0;
/// Band at the top for the chart's title.
const TITLE_H: f64 = 36.0;
/// Panel title and note, above the legend.
const HEADER_H: f64 = 44.0;
/// One row of a panel's legend.
const LEGEND_ROW_H: f64 = 16.0;
/// Below each plot, for the time tick labels.
const AXIS_H: f64 = 30.0;
/// Below the last panel, for the time axis title.
const FOOTER_H: f64 = 24.0;
/// Bottom of the round-trip axis, ms.
const RT_MIN_MS: f64 = 0.1;
/// Largest top of the round-trip axis, ms (higher values are drawn at the top).
const RT_CAP_MS: f64 = 1e6;
/// Windows are clamped to +/- this many ms (about 30 years).
const T_LIMIT_MS: f64 = 1e12;
/// Where the gap bracket's horizontal bar sits, in plot coordinates (from the top).
const GAP_BAR_Y: f64 = 30.0;

const FONT_TITLE: f64 = 16.0;
const FONT_PANEL: f64 = 14.0;
const FONT_NOTE: f64 = 12.0;
const FONT_LEGEND: f64 = 11.0;
const FONT_AXIS: f64 = 11.0;
const FONT_PHASE: f64 = 10.0;

const COLOR_SAMPLES: &str = "#17324d";
const COLOR_GAP: &str = "#d62728";
const COLOR_GRID: &str = "#dedede";
const COLOR_GRID_MINOR: &str = "#f1f1f1";
const COLOR_TEXT_DIM: &str = "#555555";
const FALLBACK_COLORS: [&str; 8] = [
    "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#31a354", "#e6550d",
];

/// Renders the panels stacked vertically, sharing the x axis window (start ms, end ms).
///
/// The round-trip axis is logarithmic, from 0.1 ms to the power of ten at or above the largest
/// round trip inside the window in any panel (at least 10 ms). A window that is not finite or
/// empty is replaced by a sane one, so the result is always a valid SVG document.
pub fn render(title: &str, panels: &[Panel], window: (f64, f64)) -> String {
    let (t0, t1) = sanitize_window(window);
    let y_max = y_max_ms(panels, t0, t1);
    let ticks = time_ticks(t0, t1);
    let legends: Vec<Vec<LegendItem>> = panels.iter().map(|p| legend_items(&p.phases)).collect();
    let layouts: Vec<(Vec<(f64, usize)>, usize)> =
        legends.iter().map(|items| legend_layout(items)).collect();

    let panel_h = |rows: usize| HEADER_H + rows as f64 * LEGEND_ROW_H + 6.0 + PLOT_H + AXIS_H;
    let height = TITLE_H + layouts.iter().map(|(_, rows)| panel_h(*rows)).sum::<f64>() + FOOTER_H;

    let mut out = String::with_capacity(64 * 1024);
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#,
        w = N(WIDTH),
        h = N(height)
    );
    let _ = writeln!(out, "<title>{}</title>", Esc(title));
    let _ = writeln!(
        out,
        r#"<defs><clipPath id="plot-clip"><rect x="0" y="0" width="{}" height="{}"/></clipPath></defs>"#,
        N(PLOT_W),
        N(PLOT_H)
    );
    let _ = writeln!(
        out,
        r##"<rect x="0" y="0" width="{}" height="{}" fill="#ffffff"/>"##,
        N(WIDTH),
        N(height)
    );
    let _ = writeln!(
        out,
        r#"<text x="{}" y="24" font-size="{}" font-weight="bold" text-anchor="middle">{}</text>"#,
        N(WIDTH / 2.0),
        N(FONT_TITLE),
        Esc(title)
    );

    let mut y = TITLE_H;
    for ((panel, items), (positions, rows)) in panels.iter().zip(&legends).zip(&layouts) {
        render_header(&mut out, panel, items, positions, y);
        let plot_top = y + HEADER_H + *rows as f64 * LEGEND_ROW_H + 6.0;
        render_plot(&mut out, panel, plot_top, (t0, t1), y_max, &ticks);
        y += panel_h(*rows);
    }

    let unit = if ticks.in_seconds { "s" } else { "ms" };
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" font-size="{}" text-anchor="middle" fill="{COLOR_TEXT_DIM}">time since migration start ({unit})</text>"#,
        N(MARGIN_LEFT + PLOT_W / 2.0),
        N(y + 12.0),
        N(FONT_AXIS)
    );
    out.push_str("</svg>\n");
    out
}

/// Picks a window: from `before_ms` before the earliest phase start to `after_ms` after the
/// latest phase end (or largest gap end) over all panels; falls back to the samples' range when
/// there are no phases.
///
/// A largest gap also widens the start if it begins before every phase. Phases and gaps with a
/// non-finite end are ignored; negative or non-finite margins count as 0. Without phases or samples the window is (-before_ms, after_ms). The
/// result is always finite with start < end (an empty range is widened to 1 s around it).
pub fn window(panels: &[Panel], before_ms: f64, after_ms: f64) -> (f64, f64) {
    let margin = |m: f64| if m.is_finite() { m.max(0.0) } else { 0.0 };
    let (before, after) = (margin(before_ms), margin(after_ms));

    let both_finite = |(a, b): &(f64, f64)| a.is_finite() && b.is_finite();
    let phase_times = panels
        .iter()
        .flat_map(|p| p.phases.iter().map(|s| (s.start_ms, s.end_ms)))
        .filter(both_finite)
        .flat_map(|(a, b)| [a, b]);
    if let Some((lo, hi)) = finite_range(phase_times) {
        let gap_times = panels
            .iter()
            .filter_map(|p| p.largest_gap)
            .filter(both_finite)
            .flat_map(|(a, b)| [a, b]);
        let (lo, hi) = match finite_range(gap_times) {
            Some((glo, ghi)) => (lo.min(glo), hi.max(ghi)),
            None => (lo, hi),
        };
        return sanitize_window((lo - before, hi + after));
    }
    let sample_times = panels.iter().flat_map(|p| p.samples.iter().map(|s| s.0));
    match finite_range(sample_times) {
        Some(range) => sanitize_window(range),
        None => sanitize_window((-before, after)),
    }
}

/// Maps a round trip (ms) to a y coordinate inside a plot (0 = top, `PLOT_H` = bottom) on the
/// log scale from 0.1 ms to `y_max_ms`. Values outside the scale are clamped to its ends.
pub(crate) fn rt_to_y(rt_ms: f64, y_max_ms: f64) -> f64 {
    let top = if y_max_ms.is_finite() && y_max_ms > RT_MIN_MS * 10.0 {
        y_max_ms
    } else {
        10.0
    };
    let rt = if rt_ms.is_nan() {
        RT_MIN_MS
    } else {
        rt_ms.clamp(RT_MIN_MS, top)
    };
    let lo = RT_MIN_MS.log10();
    let frac = (rt.log10() - lo) / (top.log10() - lo);
    clamp_finite(PLOT_H * (1.0 - frac), 0.0, PLOT_H)
}

/// Maps a time (ms) to an x coordinate inside a plot (0 = left, `PLOT_W` = right).
fn t_to_x(t_ms: f64, (t0, t1): (f64, f64)) -> f64 {
    clamp_finite((t_ms - t0) / (t1 - t0) * PLOT_W, 0.0, PLOT_W)
}

/// `v` clamped to `[lo, hi]`; `lo` when `v` is NaN.
fn clamp_finite(v: f64, lo: f64, hi: f64) -> f64 {
    if v.is_nan() {
        lo
    } else {
        v.clamp(lo, hi)
    }
}

/// Smallest and largest finite value, if any.
fn finite_range(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values
        .filter(|v| v.is_finite())
        .fold(None, |acc, v| match acc {
            None => Some((v, v)),
            Some((lo, hi)) => Some((f64::min(lo, v), f64::max(hi, v))),
        })
}

/// A finite window with start < end, within +/- `T_LIMIT_MS`.
fn sanitize_window((a, b): (f64, f64)) -> (f64, f64) {
    if !a.is_finite() || !b.is_finite() {
        return (0.0, 1000.0);
    }
    let a = a.clamp(-T_LIMIT_MS, T_LIMIT_MS);
    let b = b.clamp(-T_LIMIT_MS, T_LIMIT_MS);
    let (a, b) = if a <= b { (a, b) } else { (b, a) };
    if b - a < 1e-3 {
        let c = (a + b) / 2.0;
        (c - 500.0, c + 500.0)
    } else {
        (a, b)
    }
}

/// Top of the round-trip axis: the power of ten at or above the largest finite round trip
/// inside the window in any panel, at least 10 ms, at most `RT_CAP_MS`.
fn y_max_ms(panels: &[Panel], t0: f64, t1: f64) -> f64 {
    let largest = panels
        .iter()
        .flat_map(|p| p.samples.iter())
        .filter(|(t, rt)| t.is_finite() && rt.is_finite() && *t >= t0 && *t <= t1)
        .map(|s| s.1)
        .fold(0.0_f64, f64::max);
    let mut top = 10.0;
    while top < largest && top < RT_CAP_MS {
        top *= 10.0;
    }
    top
}

/// Label of a power of ten on the round-trip axis: "0.1 ms" ... "100 ms", "1 s", "10 s" ...
fn rt_label(exp: i32) -> String {
    match exp {
        i32::MIN..=-1 => format!("{} ms", 10f64.powi(exp)),
        0..=2 => format!("{} ms", 10i64.pow(exp.unsigned_abs())),
        _ => format!("{} s", 10i64.pow((exp - 3).unsigned_abs())),
    }
}

/// Ticks of the time axis.
struct Ticks {
    /// Tick positions, ms.
    at_ms: Vec<f64>,
    /// Labels, in `unit`.
    labels: Vec<String>,
    /// Whether the labels are in seconds (windows longer than 5 s) rather than ms.
    in_seconds: bool,
}

/// 5 to 10 "nice" ticks (steps of 1, 2 or 5 times a power of ten) over the window, as close to
/// that as the window allows; when no step fits, one tick too many beats one too few (11 ticks
/// rather than 4).
fn time_ticks(t0: f64, t1: f64) -> Ticks {
    let span = t1 - t0;
    let in_seconds = span > 5000.0;
    let count = |step: f64| ((t1 / step).floor() - (t0 / step).ceil() + 1.0).max(0.0);
    let k0 = span.log10().floor() as i32;
    let mut best: Option<(f64, f64)> = None; // (score, step)
    for k in (k0 - 2)..=(k0 + 1) {
        for m in [1.0, 2.0, 5.0] {
            let step = m * 10f64.powi(k);
            let n = count(step);
            let score = if n < 5.0 {
                5.0 - n
            } else if n > 10.0 {
                (n - 10.0) / 2.0
            } else {
                0.0
            };
            // Ties go to the larger step (fewer labels): steps are visited in growing order.
            match best {
                Some((best_score, _)) if score > best_score => {}
                _ => best = Some((score, step)),
            }
        }
    }
    let step = best.map_or(span, |(_, s)| s);
    let unit_step = if in_seconds { step / 1000.0 } else { step };
    let decimals = if unit_step >= 1.0 {
        0
    } else {
        (-unit_step.log10()).ceil().clamp(0.0, 6.0) as usize
    };
    let first = (t0 / step).ceil();
    let n = count(step).min(50.0) as usize;
    let mut at_ms = Vec::with_capacity(n);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let t = (first + i as f64) * step;
        let v = if in_seconds { t / 1000.0 } else { t };
        // Adding 0.0 turns -0.0 into 0.0; tiny values from rounding print as 0.
        let v = if v.abs() < unit_step * 1e-6 {
            0.0
        } else {
            v + 0.0
        };
        at_ms.push(t);
        labels.push(format!("{v:.decimals$}"));
    }
    Ticks {
        at_ms,
        labels,
        in_seconds,
    }
}

/// One line of a panel's legend: all phases with the same label, merged.
struct LegendItem {
    label: String,
    color: &'static str,
    total_ms: f64,
    count: usize,
}

impl LegendItem {
    fn text(&self) -> String {
        if self.count > 1 {
            format!(
                "{} {} ({}\u{00d7})",
                self.label,
                fmt_ms(self.total_ms),
                self.count
            )
        } else {
            format!("{} {}", self.label, fmt_ms(self.total_ms))
        }
    }

    /// Estimated width, px, swatch included.
    fn width(&self) -> f64 {
        14.0 + text_width(&self.text(), FONT_LEGEND)
    }
}

/// Legend items in order of first appearance; phases with non-finite times are left out.
fn legend_items(phases: &[Span]) -> Vec<LegendItem> {
    let mut items: Vec<LegendItem> = Vec::new();
    for span in phases {
        if !span.start_ms.is_finite() || !span.end_ms.is_finite() {
            continue;
        }
        let duration = (span.end_ms - span.start_ms).abs();
        let label = span.label.trim();
        match items.iter_mut().find(|i| i.label == label) {
            Some(item) => {
                item.total_ms += duration;
                item.count += 1;
            }
            None => items.push(LegendItem {
                label: label.to_string(),
                color: phase_color(label),
                total_ms: duration,
                count: 1,
            }),
        }
    }
    items
}

/// Positions of the legend items (x offset from the plot's left edge, row), wrapped to the
/// plot's width, and the number of rows.
fn legend_layout(items: &[LegendItem]) -> (Vec<(f64, usize)>, usize) {
    let mut positions = Vec::with_capacity(items.len());
    let (mut x, mut row) = (0.0, 0);
    for item in items {
        let w = item.width();
        if x > 0.0 && x + w > PLOT_W {
            x = 0.0;
            row += 1;
        }
        positions.push((x, row));
        x += w + 18.0;
    }
    let rows = if items.is_empty() { 0 } else { row + 1 };
    (positions, rows)
}

/// The fixed colour of a known phase label, else one from a fallback palette picked by the
/// label's hash (so a label keeps its colour across panels and runs).
fn phase_color(label: &str) -> &'static str {
    match label.trim().to_ascii_lowercase().as_str() {
        "preflight" => "#9e9e9e",
        "prepare" => "#bcbd22",
        "checkpoint" => "#1f77b4",
        "dump" => "#ff7f0e",
        "copy" => "#17becf",
        "transfer" => "#2ca02c",
        "netns" => "#8c564b",
        "network" => "#c49c94",
        "restore" => "#9467bd",
        "commit" => "#e377c2",
        "redirect" => "#e7ba52",
        "cleanup" => "#7f7f7f",
        other => {
            // FNV-1a.
            let hash = other.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
            FALLBACK_COLORS[(hash % FALLBACK_COLORS.len() as u64) as usize]
        }
    }
}

/// A duration for people: "48.9 ms", "1300 ms", "152.3 s".
fn fmt_ms(ms: f64) -> String {
    if !ms.is_finite() {
        return "? ms".to_string();
    }
    let ms = ms.max(0.0) + 0.0;
    if ms < 1000.0 {
        format!("{ms:.1} ms")
    } else if ms < 100_000.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{:.1} s", ms / 1000.0)
    }
}

/// Rough width of a text in the default sans-serif font, px.
fn text_width(text: &str, font_size: f64) -> f64 {
    text.chars().count() as f64 * font_size * 0.6
}

/// Panel title, note and legend.
fn render_header(
    out: &mut String,
    panel: &Panel,
    items: &[LegendItem],
    positions: &[(f64, usize)],
    y: f64,
) {
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" font-size="{}" font-weight="bold">{}</text>"#,
        N(MARGIN_LEFT),
        N(y + 18.0),
        N(FONT_PANEL),
        Esc(&panel.title)
    );
    if !panel.note.is_empty() {
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" font-size="{}" fill="{COLOR_TEXT_DIM}">{}</text>"#,
            N(MARGIN_LEFT),
            N(y + 36.0),
            N(FONT_NOTE),
            Esc(&panel.note)
        );
    }
    for (item, (dx, row)) in items.iter().zip(positions) {
        let base = y + HEADER_H + *row as f64 * LEGEND_ROW_H + 10.0;
        let x = MARGIN_LEFT + dx;
        let _ = writeln!(
            out,
            r#"<rect class="swatch" x="{}" y="{}" width="10" height="10" fill="{}" fill-opacity="0.55"/><text class="legend" x="{}" y="{}" font-size="{}">{}</text>"#,
            N(x),
            N(base - 9.0),
            item.color,
            N(x + 14.0),
            N(base),
            N(FONT_LEGEND),
            Esc(&item.text())
        );
    }
}

/// One panel's plot: grid, phases, samples, largest gap, frame. Drawn in a group translated to
/// the plot's top-left corner, so all coordinates inside are plot coordinates.
fn render_plot(
    out: &mut String,
    panel: &Panel,
    plot_top: f64,
    win: (f64, f64),
    y_max: f64,
    ticks: &Ticks,
) {
    let _ = writeln!(
        out,
        r#"<g transform="translate({},{})">"#,
        N(MARGIN_LEFT),
        N(plot_top)
    );

    // Round-trip grid: a labelled line per power of ten, faint lines at 2..9 times it.
    let top_exp = y_max.log10().round() as i32;
    for exp in -1..=top_exp {
        let decade = 10f64.powi(exp);
        let y = rt_to_y(decade, y_max);
        let _ = writeln!(
            out,
            r#"<line x1="0" y1="{y}" x2="{w}" y2="{y}" stroke="{COLOR_GRID}"/><text x="-6" y="{ty}" font-size="{f}" text-anchor="end" fill="{COLOR_TEXT_DIM}">{label}</text>"#,
            y = N(y),
            w = N(PLOT_W),
            ty = N(y + 4.0),
            f = N(FONT_AXIS),
            label = Esc(&rt_label(exp))
        );
        if exp < top_exp {
            for m in 2..=9 {
                let y = rt_to_y(decade * f64::from(m), y_max);
                let _ = writeln!(
                    out,
                    r#"<line x1="0" y1="{y}" x2="{w}" y2="{y}" stroke="{COLOR_GRID_MINOR}"/>"#,
                    y = N(y),
                    w = N(PLOT_W)
                );
            }
        }
    }
    let _ = writeln!(
        out,
        r#"<text transform="translate({},{}) rotate(-90)" font-size="{}" text-anchor="middle" fill="{COLOR_TEXT_DIM}">round trip</text>"#,
        N(14.0 - MARGIN_LEFT),
        N(PLOT_H / 2.0),
        N(FONT_AXIS)
    );

    // Time grid.
    for (t, label) in ticks.at_ms.iter().zip(&ticks.labels) {
        let x = t_to_x(*t, win);
        let _ = writeln!(
            out,
            r#"<line x1="{x}" y1="0" x2="{x}" y2="{h}" stroke="{COLOR_GRID}"/><text x="{x}" y="{ty}" font-size="{f}" text-anchor="middle" fill="{COLOR_TEXT_DIM}">{label}</text>"#,
            x = N(x),
            h = N(PLOT_H),
            ty = N(PLOT_H + 16.0),
            f = N(FONT_AXIS),
            label = Esc(label)
        );
    }

    // Phases: full-height translucent bands, at least 1 px wide, named inside when they fit.
    for span in &panel.phases {
        let Some((x, w)) = x_extent(span.start_ms, span.end_ms, win) else {
            continue;
        };
        let label = span.label.trim();
        let color = phase_color(label);
        let _ = writeln!(
            out,
            r#"<rect class="phase" x="{}" y="0" width="{}" height="{}" fill="{color}" fill-opacity="0.22"><title>{}</title></rect>"#,
            N(x),
            N(w),
            N(PLOT_H),
            Esc(&format!(
                "{label} {}",
                fmt_ms((span.end_ms - span.start_ms).abs())
            ))
        );
        if w >= text_width(label, FONT_PHASE) + 6.0 {
            let _ = writeln!(
                out,
                r##"<text x="{}" y="12" font-size="{}" text-anchor="middle" fill="#333333">{}</text>"##,
                N(x + w / 2.0),
                N(FONT_PHASE),
                Esc(label)
            );
        }
    }

    // Samples.
    let d = sample_path(&panel.samples, win, y_max);
    if d.is_empty() {
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle" fill="{COLOR_TEXT_DIM}">no probe answers in this window</text>"#,
            N(PLOT_W / 2.0),
            N(PLOT_H / 2.0)
        );
    } else {
        let _ = writeln!(
            out,
            r#"<path class="rtt" d="{d}" fill="none" stroke="{COLOR_SAMPLES}" stroke-width="1" stroke-linejoin="round" stroke-linecap="round" clip-path="url(#plot-clip)"/>"#
        );
    }

    // Largest gap: dashed edges and a bracket near the top, with its length.
    if let Some((start, end)) = panel.largest_gap {
        if let Some((x, w)) = x_extent(start, end, win) {
            let label = format!("gap {}", fmt_ms((end - start).abs()));
            let tw = text_width(&label, FONT_AXIS);
            let cx = clamp_finite(
                x + w / 2.0,
                tw / 2.0 + 2.0,
                (PLOT_W - tw / 2.0 - 2.0).max(tw / 2.0 + 2.0),
            );
            let _ = writeln!(
                out,
                r##"<g class="gap" stroke="{COLOR_GAP}" fill="none"><path d="M{x0} {y0}V{h}M{x1} {y0}V{h}" stroke-dasharray="3 3" stroke-opacity="0.6"/><path d="M{x0} {yt}V{y0}H{x1}V{yt}" stroke-width="1.5"/></g><rect x="{rx}" y="{ry}" width="{rw}" height="14" fill="#ffffff" fill-opacity="0.8"/><text x="{cx}" y="{ty}" font-size="{f}" text-anchor="middle" fill="{COLOR_GAP}">{label}</text>"##,
                x0 = N(x),
                x1 = N(x + w),
                y0 = N(GAP_BAR_Y),
                yt = N(GAP_BAR_Y + 6.0),
                h = N(PLOT_H),
                rx = N(clamp_finite(cx - tw / 2.0 - 2.0, 0.0, PLOT_W)),
                ry = N(GAP_BAR_Y - 16.0),
                rw = N(clamp_finite(tw + 4.0, 0.0, PLOT_W)),
                cx = N(cx),
                ty = N(GAP_BAR_Y - 5.0),
                f = N(FONT_AXIS),
                label = Esc(&label)
            );
        }
    }

    let _ = writeln!(
        out,
        r##"<rect class="frame" x="0" y="0" width="{}" height="{}" fill="none" stroke="#999999"/>"##,
        N(PLOT_W),
        N(PLOT_H)
    );
    out.push_str("</g>\n");
}

/// Left edge and width (px, at least 1) of the interval's part inside the window, or None when
/// it is not finite or lies wholly outside the window.
fn x_extent(start: f64, end: f64, win: (f64, f64)) -> Option<(f64, f64)> {
    if !start.is_finite() || !end.is_finite() {
        return None;
    }
    let (start, end) = if start <= end {
        (start, end)
    } else {
        (end, start)
    };
    if end < win.0 || start > win.1 {
        return None;
    }
    let x0 = t_to_x(start, win);
    let x1 = t_to_x(end, win);
    let w = (x1 - x0).max(1.0);
    Some(((PLOT_W - w).min(x0).max(0.0), w))
}

/// The samples inside the window as SVG path data in plot coordinates, decimated to at most
/// two points per pixel column (the lowest and highest round trip, in time order), so no spike
/// is lost. The line breaks where answers stop for much longer than usual (the probe's gaps);
/// a lone point gets a tiny segment so that it shows.
fn sample_path(samples: &[(f64, f64)], win: (f64, f64), y_max: f64) -> String {
    let (t0, t1) = win;
    let mut pts: Vec<(f64, f64)> = samples
        .iter()
        .copied()
        .filter(|(t, rt)| t.is_finite() && rt.is_finite() && *t >= t0 && *t <= t1)
        .collect();
    if pts.is_empty() {
        return String::new();
    }
    if !pts.windows(2).all(|w| w[0].0 <= w[1].0) {
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    }

    let ms_per_px = (t1 - t0) / PLOT_W;
    let mut dts: Vec<f64> = pts.windows(2).map(|w| w[1].0 - w[0].0).collect();
    let median_dt = if dts.is_empty() {
        0.0
    } else {
        let mid = dts.len() / 2;
        *dts.select_nth_unstable_by(mid, f64::total_cmp).1
    };
    let break_ms = (4.0 * median_dt).max(2.0 * ms_per_px);
    let last_col = PLOT_W as usize - 1;
    let col_of = |t: f64| (clamp_finite((t - t0) / ms_per_px, 0.0, last_col as f64)) as usize;

    let mut columns: Vec<Column> = Vec::new();
    let mut prev_t = f64::NEG_INFINITY;
    let mut cur_col = usize::MAX;
    for &(t, rt) in &pts {
        let col = col_of(t);
        let new_line = t - prev_t > break_ms;
        match columns.last_mut() {
            Some(c) if col == cur_col && !new_line => {
                if rt < c.lo.1 {
                    c.lo = (t, rt);
                }
                if rt > c.hi.1 {
                    c.hi = (t, rt);
                }
            }
            _ => columns.push(Column {
                new_line,
                lo: (t, rt),
                hi: (t, rt),
            }),
        }
        cur_col = col;
        prev_t = t;
    }

    let mut d = String::with_capacity(columns.len() * 24);
    for (i, c) in columns.iter().enumerate() {
        let (first, second) = if c.lo.0 <= c.hi.0 {
            (c.lo, c.hi)
        } else {
            (c.hi, c.lo)
        };
        let (x, y) = (t_to_x(first.0, win), rt_to_y(first.1, y_max));
        let cmd = if c.new_line { "M" } else { "L" };
        let _ = write!(d, "{cmd}{} {} ", N(x), N(y));
        if c.lo != c.hi {
            let (x, y) = (t_to_x(second.0, win), rt_to_y(second.1, y_max));
            let _ = write!(d, "L{} {} ", N(x), N(y));
        } else if c.new_line && !matches!(columns.get(i + 1), Some(next) if !next.new_line) {
            // A lone point: a zero-length line would not show.
            let x2 = if x + 0.8 <= PLOT_W { x + 0.8 } else { x - 0.8 };
            let _ = write!(d, "L{} {} ", N(x2), N(y));
        }
    }
    d.truncate(d.trim_end().len());
    d
}

/// One pixel column of the samples' line.
struct Column {
    /// Whether the line starts anew here (after a gap in the answers).
    new_line: bool,
    /// (time, round trip) of the column's lowest round trip.
    lo: (f64, f64),
    /// (time, round trip) of the column's highest round trip.
    hi: (f64, f64),
}

/// A coordinate, written with at most one decimal; never NaN or infinite.
struct N(f64);

impl fmt::Display for N {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = if self.0.is_finite() { self.0 } else { 0.0 };
        let s = format!("{v:.1}");
        let s = s.strip_suffix(".0").unwrap_or(&s);
        f.write_str(if s == "-0" { "0" } else { s })
    }
}

/// Text escaped for XML content and attribute values; characters XML 1.0 forbids are dropped,
/// line breaks and tabs become spaces.
struct Esc<'a>(&'a str);

impl fmt::Display for Esc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            match c {
                '&' => f.write_str("&amp;")?,
                '<' => f.write_str("&lt;")?,
                '>' => f.write_str("&gt;")?,
                '"' => f.write_str("&quot;")?,
                '\'' => f.write_str("&apos;")?,
                '\t' | '\n' | '\r' => f.write_char(' ')?,
                '\u{0}'..='\u{1f}' | '\u{fffe}' | '\u{ffff}' => {}
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
