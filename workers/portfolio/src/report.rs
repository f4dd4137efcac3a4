//! SVG charts of an optimisation run (`mtx optimize --report <dir>`),
//! rendered with plotters into strings; the caller decides where they go.
//!
//! - [`allocation_bars_svg`]: one horizontal bar per strategy (percent of
//!   equity) with the per-strategy cap drawn as a dashed line.
//! - [`correlation_heatmap_svg`]: the correlation matrix, blue (−1) → white
//!   (0) → red (+1), each cell labelled with its coefficient.
//! - [`frontier_svg`]: the efficient frontier over the feasible set
//!   (annualised volatility vs annualised expected return) with the chosen
//!   allocation, the minimum-variance and the equal-weight portfolios marked.
//!
//! Only the SVG backend is compiled in: text is emitted as SVG `<text>`, so
//! no font files or native libraries are needed.

use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::backtest::TRADING_DAYS_PER_YEAR;
use crate::optimize::FrontierPoint;

/// Rendering failed (plotters reports layout or backend errors as text).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("cannot draw the {chart} chart: {message}")]
pub struct ReportError {
    /// Which chart.
    pub chart: &'static str,
    /// plotters' message.
    pub message: String,
}

fn err<E: std::fmt::Display>(chart: &'static str) -> impl Fn(E) -> ReportError {
    move |e| ReportError {
        chart,
        message: e.to_string(),
    }
}

/// One point of a risk/return chart, daily decimals.
#[derive(Debug, Clone, PartialEq)]
pub struct MarkedPoint {
    /// Label drawn next to the marker.
    pub label: String,
    /// Expected daily return (decimal).
    pub daily_return: f64,
    /// Daily volatility (decimal).
    pub daily_volatility: f64,
}

fn annual_return_pct(daily: f64) -> f64 {
    100.0 * daily * TRADING_DAYS_PER_YEAR
}

fn annual_vol_pct(daily: f64) -> f64 {
    100.0 * daily * TRADING_DAYS_PER_YEAR.sqrt()
}

fn padded(lo: f64, hi: f64) -> (f64, f64) {
    let (lo, hi) = if lo.is_finite() && hi.is_finite() {
        (lo.min(hi), lo.max(hi))
    } else {
        (0.0, 1.0)
    };
    let span = (hi - lo).max(1e-9);
    (lo - 0.08 * span, hi + 0.08 * span)
}

/// Horizontal bars of `allocations` (strategy id, percent of equity), the
/// first on top, with `cap_pct` (e.g. 50) as a dashed vertical line.
pub fn allocation_bars_svg(
    title: &str,
    allocations: &[(String, f64)],
    cap_pct: f64,
) -> Result<String, ReportError> {
    const CHART: &str = "allocation";
    let e = err(CHART);
    if allocations.is_empty() {
        return Err(ReportError {
            chart: CHART,
            message: "no strategies".into(),
        });
    }
    let n = allocations.len();
    let max_pct = allocations
        .iter()
        .map(|(_, p)| *p)
        .fold(cap_pct.max(1.0), f64::max)
        * 1.1;
    let label_width = allocations
        .iter()
        .map(|(id, _)| id.chars().count())
        .max()
        .unwrap_or(8) as u32
        * 8
        + 20;
    let height = (90 + 34 * n as u32).max(240);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (820, height)).into_drawing_area();
        root.fill(&WHITE).map_err(&e)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(label_width)
            .build_cartesian_2d(0.0..max_pct, (0..n - 1).into_segmented())
            .map_err(&e)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .x_desc("allocation (% of account equity)")
            .y_labels(n)
            .y_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) if *i < n => allocations
                    .get(n - 1 - *i)
                    .map(|(id, _)| id.clone())
                    .unwrap_or_default(),
                _ => String::new(),
            })
            .draw()
            .map_err(&e)?;
        chart
            .draw_series(allocations.iter().enumerate().map(|(k, (_, p))| {
                let i = n - 1 - k;
                let mut bar = Rectangle::new(
                    [
                        (0.0, SegmentValue::Exact(i)),
                        (*p, SegmentValue::Exact(i + 1)),
                    ],
                    BLUE.mix(0.7).filled(),
                );
                bar.set_margin(5, 5, 0, 0);
                bar
            }))
            .map_err(&e)?;
        chart
            .draw_series(allocations.iter().enumerate().map(|(k, (_, p))| {
                let i = n - 1 - k;
                Text::new(
                    format!("{p:.2} %"),
                    (*p + max_pct * 0.01, SegmentValue::CenterOf(i)),
                    ("sans-serif", 13).into_font(),
                )
            }))
            .map_err(&e)?;
        chart
            .draw_series(DashedLineSeries::new(
                [
                    (cap_pct, SegmentValue::Exact(0)),
                    (cap_pct, SegmentValue::Exact(n)),
                ],
                6,
                4,
                RED.stroke_width(2),
            ))
            .map_err(&e)?
            .label(format!("cap {cap_pct} %"))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], RED.stroke_width(2)));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(&e)?;
        root.present().map_err(&e)?;
    }
    Ok(svg)
}

/// Diverging colour for a correlation in [−1, 1]: blue → white → red.
fn corr_color(c: f64) -> RGBColor {
    let c = if c.is_finite() {
        c.clamp(-1.0, 1.0)
    } else {
        0.0
    };
    let lerp = |a: u8, b: u8, t: f64| (f64::from(a) + (f64::from(b) - f64::from(a)) * t) as u8;
    if c >= 0.0 {
        RGBColor(255, lerp(255, 40, c), lerp(255, 40, c))
    } else {
        let t = -c;
        RGBColor(lerp(255, 40, t), lerp(255, 90, t), 255)
    }
}

/// Heatmap of the `ids.len()²` correlation matrix given as rows.
pub fn correlation_heatmap_svg(
    title: &str,
    ids: &[String],
    corr: &[Vec<f64>],
) -> Result<String, ReportError> {
    const CHART: &str = "correlation";
    let e = err(CHART);
    let n = ids.len();
    if n == 0 || corr.len() != n || corr.iter().any(|r| r.len() != n) {
        return Err(ReportError {
            chart: CHART,
            message: format!("need a {n}×{n} matrix for {n} strategies"),
        });
    }
    let label_width = ids.iter().map(|id| id.chars().count()).max().unwrap_or(8) as u32 * 8 + 20;
    let cell = 64u32;
    let side = cell * n as u32;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (side + label_width + 40, side + 150))
            .into_drawing_area();
        root.fill(&WHITE).map_err(&e)?;
        let row_name = |v: &SegmentValue<usize>| match v {
            SegmentValue::CenterOf(i) => ids
                .get(n.saturating_sub(1 + *i))
                .cloned()
                .unwrap_or_default(),
            _ => String::new(),
        };
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(90)
            .y_label_area_size(label_width)
            .build_cartesian_2d((0..n - 1).into_segmented(), (0..n - 1).into_segmented())
            .map_err(&e)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(n)
            .y_labels(n)
            // Column names are drawn below (rotated, hanging from the axis).
            .x_label_formatter(&|_| String::new())
            .y_label_formatter(&row_name)
            .draw()
            .map_err(&e)?;
        // Row i of the matrix is drawn at y = n-1-i so row 0 is on top.
        let cells = (0..n).flat_map(|i| (0..n).map(move |j| (i, j)));
        chart
            .draw_series(cells.clone().map(|(i, j)| {
                let y = n - 1 - i;
                Rectangle::new(
                    [
                        (SegmentValue::Exact(j), SegmentValue::Exact(y)),
                        (SegmentValue::Exact(j + 1), SegmentValue::Exact(y + 1)),
                    ],
                    corr_color(corr[i][j]).filled(),
                )
            }))
            .map_err(&e)?;
        chart
            .draw_series(cells.map(|(i, j)| {
                Text::new(
                    format!("{:.2}", corr[i][j]),
                    (SegmentValue::CenterOf(j), SegmentValue::CenterOf(n - 1 - i)),
                    TextStyle::from(("sans-serif", 12).into_font())
                        .pos(Pos::new(HPos::Center, VPos::Center)),
                )
            }))
            .map_err(&e)?;
        let column_style = TextStyle::from(
            ("sans-serif", 12)
                .into_font()
                .transform(FontTransform::Rotate90),
        )
        .pos(Pos::new(HPos::Left, VPos::Center));
        for (j, id) in ids.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(SegmentValue::CenterOf(j), SegmentValue::Exact(0)));
            root.draw(&Text::new(id.clone(), (x, y + 10), column_style.clone()))
                .map_err(&e)?;
        }
        root.present().map_err(&e)?;
    }
    Ok(svg)
}

/// The efficient frontier (`points`, daily figures, ascending return) with
/// `marked` portfolios drawn on top (the first one highlighted: the chosen
/// allocation). Axes are annualised: volatility × √252 and return × 252, in percent.
pub fn frontier_svg(
    title: &str,
    points: &[FrontierPoint],
    marked: &[MarkedPoint],
) -> Result<String, ReportError> {
    const CHART: &str = "frontier";
    let e = err(CHART);
    if points.is_empty() && marked.is_empty() {
        return Err(ReportError {
            chart: CHART,
            message: "nothing to draw".into(),
        });
    }
    let xs = points
        .iter()
        .map(|p| annual_vol_pct(p.volatility_daily))
        .chain(marked.iter().map(|m| annual_vol_pct(m.daily_volatility)));
    let ys = points
        .iter()
        .map(|p| annual_return_pct(p.expected_daily_return))
        .chain(marked.iter().map(|m| annual_return_pct(m.daily_return)));
    let (x0, x1) = padded(
        xs.clone().fold(f64::INFINITY, f64::min),
        xs.fold(f64::NEG_INFINITY, f64::max),
    );
    let (y0, y1) = padded(
        ys.clone().fold(f64::INFINITY, f64::min),
        ys.fold(f64::NEG_INFINITY, f64::max),
    );
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (820, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(&e)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(14)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(&e)?;
        chart
            .configure_mesh()
            .x_desc("volatility (% per year)")
            .y_desc("expected return (% per year)")
            .x_label_formatter(&|v| format!("{v:.1}"))
            .y_label_formatter(&|v| format!("{v:.1}"))
            .draw()
            .map_err(&e)?;
        let line: Vec<(f64, f64)> = points
            .iter()
            .map(|p| {
                (
                    annual_vol_pct(p.volatility_daily),
                    annual_return_pct(p.expected_daily_return),
                )
            })
            .collect();
        chart
            .draw_series(LineSeries::new(line.clone(), BLUE.stroke_width(2)))
            .map_err(&e)?
            .label("efficient frontier")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLUE.stroke_width(2)));
        chart
            .draw_series(line.iter().map(|p| Circle::new(*p, 2, BLUE.filled())))
            .map_err(&e)?;
        for (k, m) in marked.iter().enumerate() {
            let at = (
                annual_vol_pct(m.daily_volatility),
                annual_return_pct(m.daily_return),
            );
            let (color, size) = if k == 0 { (RED, 8) } else { (BLACK, 5) };
            chart
                .draw_series(std::iter::once(Circle::new(at, size, color.filled())))
                .map_err(&e)?;
            chart
                .draw_series(std::iter::once(Text::new(
                    m.label.clone(),
                    (at.0 + (x1 - x0) * 0.012, at.1),
                    ("sans-serif", 13).into_font().color(&color),
                )))
                .map_err(&e)?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(&e)?;
        root.present().map_err(&e)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_heatmap_and_frontier_render() {
        let alloc = vec![("SPX_1-D_Opt".to_string(), 50.0), ("TLT".to_string(), 0.0)];
        let svg = allocation_bars_svg("Allocation", &alloc, 50.0).expect("bars");
        assert!(
            svg.starts_with("<svg") && svg.contains("SPX_1-D_Opt"),
            "{svg}"
        );
        assert!(svg.contains("50.00 %"));

        let ids = vec!["A".to_string(), "B".to_string()];
        let corr = vec![vec![1.0, -0.25], vec![-0.25, 1.0]];
        let svg = correlation_heatmap_svg("Correlation", &ids, &corr).expect("heatmap");
        assert!(svg.contains("-0.25") && svg.contains("\nA\n"), "{svg}");
        assert!(correlation_heatmap_svg("x", &ids, &corr[..1]).is_err());

        let pts: Vec<FrontierPoint> = (0..5)
            .map(|k| FrontierPoint {
                target_return: 0.001 * f64::from(k),
                expected_daily_return: 0.001 * f64::from(k),
                volatility_daily: 0.01 + 0.001 * f64::from(k * k),
                weights: vec![],
            })
            .collect();
        let chosen = MarkedPoint {
            label: "max-sharpe".into(),
            daily_return: 0.002,
            daily_volatility: 0.0125,
        };
        let svg = frontier_svg("Frontier", &pts, &[chosen]).expect("frontier");
        assert!(svg.contains("max-sharpe") && svg.contains("efficient frontier"));
    }

    #[test]
    fn colors_are_diverging() {
        assert_eq!(corr_color(0.0), RGBColor(255, 255, 255));
        assert_eq!(corr_color(1.0), RGBColor(255, 40, 40));
        assert_eq!(corr_color(-1.0), RGBColor(40, 90, 255));
        assert_eq!(corr_color(f64::NAN), RGBColor(255, 255, 255));
    }
}
