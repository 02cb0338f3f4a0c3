//! The comparison's charts, drawn with plotters' SVG backend (text is left to the viewer's
//! sans-serif font): short-connection ratio to direct by number of services (log scale, bars
//! from the lowest to the highest repeat), and the latency CDF of short connections at one
//! service.

use super::contenders::Contender;
use super::report::Summary;
use super::Case;
use anyhow::{anyhow, Result};
use plotters::prelude::*;

const SIZE: (u32, u32) = (960, 540);

fn color(c: Contender) -> RGBColor {
    let (r, g, b) = c.color();
    RGBColor(r, g, b)
}

/// plotters' errors borrow the backend; keep their text only.
fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("chart: {e:?}")
}

/// (file name part, SVG text). Only the contenders that are installed with many services
/// are in the ratio chart; the others are in the one-service tables.
pub fn charts(s: &Summary) -> Vec<(&'static str, Result<String>)> {
    vec![("ratio", ratio_chart(s)), ("cdf", cdf_chart(s))]
}

/// Points (services, median, lowest, highest) of `c`'s ratio to direct under `case` (`Short`
/// for the middle VIP, `ShortEnd` for the last; with one service both are `Short`).
fn ratio_points(s: &Summary, c: Contender, case: Case) -> Vec<(f64, f64, f64, f64)> {
    s.sizes()
        .into_iter()
        .filter_map(|n| {
            let case = if n == 1 { Case::Short } else { case };
            let r = s.cell(c, n, case)?.ratio?;
            Some((n as f64, r.median, r.low, r.high))
        })
        .collect()
}

fn ratio_chart(s: &Summary) -> Result<String> {
    let sizes = s.sizes();
    let x_max = sizes.last().copied().unwrap_or(1).max(10) as f64 * 2.0;
    let shown: Vec<Contender> = Contender::ALL
        .into_iter()
        .filter(|c| c.scales())
        .filter(|&c| !ratio_points(s, c, Case::Short).is_empty())
        .collect();
    let y_max = shown
        .iter()
        .flat_map(|&c| ratio_points(s, c, Case::Short))
        .map(|p| p.3)
        .fold(1.2f64, f64::max)
        * 1.05;
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Short TCP connections/s relative to direct, by services installed",
                ("sans-serif", 20),
            )
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(60)
            .build_cartesian_2d((0.7f64..x_max).log_scale(), 0f64..y_max)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("services installed (log scale)")
            .y_desc("ratio to direct (median; bars: lowest–highest repeat)")
            .light_line_style(BLACK.mix(0.04))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.1}"))
            .draw()
            .map_err(err)?;
        chart
            .draw_series(LineSeries::new(
                [(0.7, 1.0), (x_max, 1.0)],
                BLACK.mix(0.6).stroke_width(1),
            ))
            .map_err(err)?
            .label("direct (= 1.0, the ceiling)")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.mix(0.6)));
        for &c in &shown {
            let col = color(c);
            let mid = ratio_points(s, c, Case::Short);
            let end = ratio_points(s, c, Case::ShortEnd);
            let scales = mid.len() > 1;
            chart
                .draw_series(LineSeries::new(
                    mid.iter().map(|p| (p.0, p.1)),
                    col.stroke_width(2),
                ))
                .map_err(err)?
                .label(if scales {
                    format!("{} (middle VIP)", c.name())
                } else {
                    c.name().to_string()
                })
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], col.stroke_width(2)));
            chart
                .draw_series(
                    mid.iter()
                        .map(|p| ErrorBar::new_vertical(p.0, p.2, p.1, p.3, col.filled(), 8)),
                )
                .map_err(err)?;
            if scales {
                chart
                    .draw_series(DashedLineSeries::new(
                        end.iter().map(|p| (p.0, p.1)),
                        6,
                        4,
                        col.stroke_width(2),
                    ))
                    .map_err(err)?
                    .label(format!("{} (last VIP)", c.name()))
                    .legend(move |(x, y)| {
                        PathElement::new([(x, y), (x + 8, y)], col.stroke_width(2))
                    });
                // The last VIP's bars sit a little to the right so they do not hide the
                // middle one's.
                chart
                    .draw_series(end.iter().filter(|p| p.0 > 1.0).map(|p| {
                        ErrorBar::new_vertical(p.0 * 1.15, p.2, p.1, p.3, col.mix(0.6).filled(), 6)
                    }))
                    .map_err(err)?;
            }
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .position(SeriesLabelPosition::LowerLeft)
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(out)
}

fn cdf_chart(s: &Summary) -> Result<String> {
    let curves: Vec<(Contender, Vec<u32>)> = Contender::ALL
        .into_iter()
        .map(|c| (c, s.cdf(c, 1, Case::Short)))
        .filter(|(_, cdf)| cdf.len() > 1)
        .collect();
    // Up to the highest contender's p99.5: the last half percent is a few stragglers.
    let x_max = curves
        .iter()
        .map(|(_, cdf)| f64::from(cdf[(cdf.len() - 1) * 995 / 1000]))
        .fold(100.0f64, f64::max)
        * 1.2;
    let x_min = curves
        .iter()
        .map(|(_, cdf)| f64::from(cdf[(cdf.len() - 1) / 200].max(1)))
        .fold(x_max, f64::min)
        .max(1.0)
        * 0.8;
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Short TCP connection latency, one service (connect, request, answer)",
                ("sans-serif", 20),
            )
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(60)
            .build_cartesian_2d((x_min..x_max).log_scale(), 0f64..1f64)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("latency, µs (log scale)")
            .y_desc("fraction of connections at or below")
            .light_line_style(BLACK.mix(0.04))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.1}"))
            .draw()
            .map_err(err)?;
        for (c, cdf) in &curves {
            let col = color(*c);
            let steps = (cdf.len() - 1) as f64;
            let points = cdf
                .iter()
                .enumerate()
                .map(|(i, &us)| (f64::from(us).clamp(x_min, x_max), i as f64 / steps));
            chart
                .draw_series(LineSeries::new(points, col.stroke_width(2)))
                .map_err(err)?
                .label(c.name())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], col.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .position(SeriesLabelPosition::LowerRight)
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(out)
}
