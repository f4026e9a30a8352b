//! The loss curves of the demo report.

use std::path::Path;

use anyhow::Context;

/// The held-out loss curves of both target runs, as SVG and PNG.
pub(super) fn plot(
    out: &Path,
    causal: &[(f64, f64)],
    slm: &[(f64, f64)],
    ratio: f64,
) -> anyhow::Result<()> {
    use plotters::prelude::*;
    static FONT: std::sync::Once = std::sync::Once::new();
    FONT.call_once(|| {
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            include_bytes!("../../../assets/DejaVuSansMono.ttf"),
        );
    });
    fn draw<DB: DrawingBackend>(
        root: DrawingArea<DB, plotters::coord::Shift>,
        causal: &[(f64, f64)],
        slm: &[(f64, f64)],
        ratio: f64,
    ) -> anyhow::Result<()>
    where
        DB::ErrorType: 'static,
    {
        let e = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("drawing the plot: {e:?}");
        root.fill(&WHITE).map_err(e)?;
        let all = causal.iter().chain(slm);
        let x_max = all.clone().map(|p| p.0).fold(1.0, f64::max) / 1e6;
        // Skip the untrained start so that the end of training is readable.
        let tail = |c: &[(f64, f64)]| c.iter().skip(1).map(|p| p.1).collect::<Vec<_>>();
        let ys: Vec<f64> = tail(causal).into_iter().chain(tail(slm)).collect();
        let (y_min, y_max) = ys
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), &y| (a.min(y), b.max(y)));
        let (y_min, y_max) = if y_min < y_max {
            (y_min, y_max)
        } else {
            (0.0, 10.0)
        };
        let pad = (y_max - y_min) * 0.05;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Held-out loss of the clean target distribution",
                ("sans-serif", 22),
            )
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max, (y_min - pad)..(y_max + pad))
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc("training tokens read (millions)")
            .y_desc("loss (nats per token)")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(e)?;
        let red = RGBColor(200, 60, 40);
        let green = RGBColor(34, 139, 34);
        let to_m = |c: &[(f64, f64)]| c.iter().map(|&(x, y)| (x / 1e6, y)).collect::<Vec<_>>();
        chart
            .draw_series(LineSeries::new(to_m(causal), red.stroke_width(2)))
            .map_err(e)?
            .label("causal LM (every token)")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], red.stroke_width(2)));
        chart
            .draw_series(LineSeries::new(to_m(slm), green.stroke_width(2)))
            .map_err(e)?
            .label(format!("SLM (top {:.0}% by excess loss)", ratio * 100.0))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], green.stroke_width(2))
            });
        chart
            .draw_series(
                to_m(causal)
                    .into_iter()
                    .map(|p| Circle::new(p, 2, red.filled())),
            )
            .map_err(e)?;
        chart
            .draw_series(
                to_m(slm)
                    .into_iter()
                    .map(|p| Circle::new(p, 2, green.filled())),
            )
            .map_err(e)?;
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
    let svg = out.join("loss.svg");
    draw(
        SVGBackend::new(&svg, (800, 500)).into_drawing_area(),
        causal,
        slm,
        ratio,
    )
    .with_context(|| svg.display().to_string())?;
    let png = out.join("loss.png");
    draw(
        BitMapBackend::new(&png, (800, 500)).into_drawing_area(),
        causal,
        slm,
        ratio,
    )
    .with_context(|| png.display().to_string())?;
    Ok(())
}
