//! Line charts of several series, as SVG and PNG: the demo's loss curves and every plot of
//! `rho report`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use plotters::prelude::*;

/// One line of a chart.
pub struct Series {
    /// The legend's text.
    pub label: String,
    /// `(x, y)` points, in order of x.
    pub points: Vec<(f64, f64)>,
}

/// A chart: its title, axis labels and lines.
pub struct Chart<'a> {
    /// Shown above the plot.
    pub title: &'a str,
    /// Under the x axis, with its unit.
    pub x_label: &'a str,
    /// Beside the y axis, with its unit.
    pub y_label: &'a str,
    /// Divide x by this for the axis (1e6 for millions), as the label says.
    pub x_scale: f64,
    /// Leave out each series' first point when fitting the y axis (an untrained start would
    /// flatten the part where curves differ).
    pub zoom: bool,
    /// The lines.
    pub series: Vec<Series>,
}

/// The colors of the lines, in order (then again).
const COLORS: [RGBColor; 6] = [
    RGBColor(200, 60, 40),
    RGBColor(34, 139, 34),
    RGBColor(31, 119, 180),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

fn register_font() {
    static FONT: std::sync::Once = std::sync::Once::new();
    FONT.call_once(|| {
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            include_bytes!("../../assets/DejaVuSansMono.ttf"),
        );
    });
}

impl Chart<'_> {
    /// Writes `<stem>.svg` and `<stem>.png` into `dir`; returns the SVG's path.
    pub fn write(&self, dir: &Path, stem: &str) -> anyhow::Result<PathBuf> {
        register_font();
        let svg = dir.join(format!("{stem}.svg"));
        self.draw(SVGBackend::new(&svg, (800, 500)).into_drawing_area())
            .with_context(|| svg.display().to_string())?;
        let png = dir.join(format!("{stem}.png"));
        self.draw(BitMapBackend::new(&png, (800, 500)).into_drawing_area())
            .with_context(|| png.display().to_string())?;
        Ok(svg)
    }

    /// The y range: every point (or every point but the first of each series, when zoomed),
    /// padded by 5%.
    fn y_range(&self) -> (f64, f64) {
        let skip = usize::from(self.zoom);
        let ys = self
            .series
            .iter()
            .flat_map(|s| {
                s.points
                    .iter()
                    .skip(skip.min(s.points.len().saturating_sub(1)))
            })
            .map(|p| p.1)
            .filter(|y| y.is_finite());
        let (lo, hi) = ys.fold((f64::MAX, f64::MIN), |(a, b), y| (a.min(y), b.max(y)));
        let (lo, hi) = match (lo < hi, lo == hi) {
            (true, _) => (lo, hi),
            (false, true) => (lo - 0.5, hi + 0.5),
            (false, false) => (0.0, 1.0),
        };
        let pad = (hi - lo) * 0.05;
        (lo - pad, hi + pad)
    }

    fn draw<DB: DrawingBackend>(
        &self,
        root: DrawingArea<DB, plotters::coord::Shift>,
    ) -> anyhow::Result<()>
    where
        DB::ErrorType: 'static,
    {
        let e = |e: DrawingAreaErrorKind<DB::ErrorType>| {
            anyhow::anyhow!("drawing {}: {e:?}", self.title)
        };
        root.fill(&WHITE).map_err(e)?;
        let xs = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0 / self.x_scale));
        let (x_min, x_max) = xs.fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
        let (x_min, x_max) = if x_min < x_max {
            (x_min.min(0.0), x_max)
        } else {
            (0.0, 1.0)
        };
        let (y_min, y_max) = self.y_range();
        let mut chart = ChartBuilder::on(&root)
            .caption(self.title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(x_min..x_max, y_min..y_max)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc(self.x_label)
            .y_desc(self.y_label)
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(e)?;
        for (i, s) in self.series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let points: Vec<(f64, f64)> = s
                .points
                .iter()
                .filter(|p| p.1.is_finite())
                .map(|&(x, y)| (x / self.x_scale, y.clamp(y_min, y_max)))
                .collect();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(e)?
                .label(s.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            if points.len() <= 60 {
                chart
                    .draw_series(
                        points
                            .into_iter()
                            .map(|p| Circle::new(p, 2, color.filled())),
                    )
                    .map_err(e)?;
            }
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(e)?;
        root.present().map_err(e)?;
        Ok(())
    }
}
