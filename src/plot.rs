//! Pictures: training curves (`training.png`) and the confusion matrix (`confusion.png`).
//! Text is drawn with a TrueType font from the system (Debian's fonts-dejavu-core).
use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::record::EpochRecord;

const FONT_FILES: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// Registers a sans-serif font with plotters once per process.
fn ensure_font() -> Result<()> {
    static FONT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let path = std::env::var("SAC_FONT").ok().into_iter().chain(FONT_FILES.iter().map(|s| s.to_string()));
        for p in path {
            if let Ok(bytes) = std::fs::read(&p) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                return plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                    .map_err(|_| format!("{p} is not a usable TrueType font"));
            }
        }
        Err(format!(
            "no TrueType font found (install fonts-dejavu-core, or set SAC_FONT); looked at {}",
            FONT_FILES.join(", ")
        ))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("{e:?}")
}

/// A named line of points per epoch.
type Series<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

/// One panel of per-epoch lines with markers and a legend.
fn epoch_panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    caption: &str,
    x: std::ops::Range<f64>,
    y: std::ops::Range<f64>,
    series: Vec<Series<'_>>,
    thin: Option<(&str, &[(f64, f64)])>,
    legend: SeriesLabelPosition,
) -> Result<()> {
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(x, y)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .x_labels(20)
        // Epochs are whole numbers: label only those.
        .x_label_formatter(&|x| if (x - x.round()).abs() < 1e-6 { format!("{x:.0}") } else { String::new() })
        .draw()
        .map_err(err)?;
    if let Some((name, pts)) = thin {
        let color = RGBColor(140, 170, 230);
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(1)))
            .map_err(err)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(1)));
    }
    for (name, color, pts) in series.into_iter().filter(|s| !s.2.is_empty()) {
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled()))).map_err(err)?;
    }
    chart.configure_series_labels().position(legend).border_style(BLACK).background_style(WHITE).draw().map_err(err)?;
    Ok(())
}

/// Loss (train and validation) and accuracy (top-1, top-5) per epoch, side by side; with
/// `intervals` (points of metrics.jsonl: epochs done, mean training loss of the interval), the
/// training loss within epochs as a thin line.
pub fn training_curves(path: &Path, history: &[EpochRecord], intervals: &[(f64, f64)]) -> Result<()> {
    ensure_font()?;
    crate::infra::files::replace_with(path, |tmp| {
        let root = BitMapBackend::new(tmp, (1200, 450)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (left, right) = root.split_horizontally(600);
        let epochs: Vec<f64> = history.iter().map(|r| f64::from(r.epoch)).collect();
        let x_max = epochs.last().copied().unwrap_or(1.0).max(1.0) + 0.5;
        let x_min = if intervals.is_empty() {
            epochs.first().copied().unwrap_or(1.0).min(1.0) - 0.5
        } else {
            intervals.iter().map(|p| p.0).fold(f64::INFINITY, f64::min).min(0.0)
        };
        let per_epoch = |f: &dyn Fn(&EpochRecord) -> Option<f64>| -> Vec<(f64, f64)> {
            history.iter().filter_map(|r| f(r).map(|v| (f64::from(r.epoch), v))).collect()
        };
        let mut losses: Vec<f64> = history.iter().flat_map(|r| [Some(r.train_loss), r.val_loss]).flatten().collect();
        losses.extend(intervals.iter().map(|p| p.1));
        let y_max = losses.iter().cloned().fold(0.0, f64::max).max(1e-3) * 1.1;
        let loss =
            vec![("train", BLUE, per_epoch(&|r| Some(r.train_loss))), ("validation", RED, per_epoch(&|r| r.val_loss))];
        let within = (!intervals.is_empty()).then_some(("train, within epochs", intervals));
        epoch_panel(&left, "loss", x_min..x_max, 0.0..y_max, loss, within, SeriesLabelPosition::UpperRight)?;
        let accuracy = vec![
            ("top-1", BLUE, per_epoch(&|r| r.top1.map(|v| 100.0 * v))),
            ("top-5", GREEN, per_epoch(&|r| r.top5.map(|v| 100.0 * v))),
        ];
        let caption = "validation accuracy (%)";
        epoch_panel(&right, caption, x_min..x_max, 0.0..100.0, accuracy, None, SeriesLabelPosition::LowerRight)?;
        root.present().map_err(err)?;
        Ok(())
    })
}

/// A heat map of the confusion counts among the most frequent classes (rows: true class, columns:
/// predicted): `counts[i][j]` images of class `names[i]` predicted as `names[j]`, each row
/// normalized by `support[i]`, all images of its class. `classes_present` (classes with an image)
/// goes into the title when it is more than are shown.
pub fn confusion(
    path: &Path,
    counts: &[Vec<u64>],
    support: &[u64],
    classes_present: usize,
    names: &[String],
) -> Result<()> {
    ensure_font()?;
    let n = counts.len();
    let cell = if n <= 10 {
        48
    } else if n <= 25 {
        28
    } else {
        16
    };
    let label_w = 170;
    let side = (n as u32) * cell;
    crate::infra::files::replace_with(path, |tmp| {
        let root = BitMapBackend::new(tmp, (side + label_w + 40, side + label_w + 60)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let title = if classes_present > n {
            format!("confusion matrix ({n} most frequent of {} classes; rows: true, normalized)", classes_present)
        } else {
            "confusion matrix (rows: true class, columns: predicted; normalized by row)".to_string()
        };
        root.draw(&Text::new(title, (10, 10), ("sans-serif", 16))).map_err(err)?;
        let (x0, y0) = (label_w as i32, 40);
        let font = ("sans-serif", (cell as i32 * 6 / 10).clamp(9, 14));
        for (i, row) in counts.iter().enumerate() {
            let total = support[i];
            for (j, &count) in row.iter().enumerate() {
                let v = if total > 0 { count as f64 / total as f64 } else { 0.0 };
                let color = ViridisRGB::get_color(v);
                let (x, y) = (x0 + (j as u32 * cell) as i32, y0 + (i as u32 * cell) as i32);
                root.draw(&Rectangle::new([(x, y), (x + cell as i32, y + cell as i32)], color.filled()))
                    .map_err(err)?;
                if cell >= 28 && count > 0 {
                    let ink = if v > 0.6 { BLACK } else { WHITE };
                    root.draw(&Text::new(
                        count.to_string(),
                        (x + 3, y + cell as i32 / 3),
                        font.into_font().color(&ink),
                    ))
                    .map_err(err)?;
                }
            }
            let name: String = names.get(i).map_or_else(|| format!("class {i}"), |s| s.chars().take(22).collect());
            root.draw(&Text::new(name.clone(), (5, y0 + (i as u32 * cell) as i32 + cell as i32 / 3), font))
                .map_err(err)?;
            let x = x0 + (i as u32 * cell) as i32 + cell as i32 / 3;
            let style = font.into_font().transform(FontTransform::Rotate90);
            root.draw(&Text::new(name, (x, y0 + side as i32 + 5), style)).map_err(err)?;
        }
        root.present().map_err(err)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(epoch: u32, loss: f64, top1: f64) -> EpochRecord {
        EpochRecord {
            epoch,
            train_loss: loss,
            val_loss: Some(loss * 1.1),
            top1: Some(top1),
            top5: Some(0.99),
            images_per_second: 100.0,
            seconds: 1.0,
            skipped_images: 0,
            nonfinite_steps: 0,
            lr: Some(4e-4),
            ema_top1: None,
            precision: None,
            device: None,
        }
    }

    #[test]
    fn training_curves_and_confusion_matrix_are_pngs() {
        let dir = tempfile::tempdir().unwrap();
        let curves = dir.path().join("training.png");
        let within = [(0.5, 1.1), (1.0, 0.9), (1.5, 0.7), (2.0, 0.6), (2.5, 0.5), (3.0, 0.45)];
        training_curves(&curves, &[record(1, 0.8, 0.7), record(2, 0.5, 0.8), record(3, 0.4, 0.85)], &within).unwrap();
        let img = image::open(&curves).unwrap();
        assert_eq!((img.width(), img.height()), (1200, 450));
        let confusion_png = dir.path().join("confusion.png");
        let counts: Vec<Vec<u64>> = (0..50).map(|i| (0..50).map(|j| u64::from(i == j) * 5 + 1).collect()).collect();
        let names: Vec<String> = (0..50).map(|i| format!("class {}", i * 3)).collect();
        confusion(&confusion_png, &counts, &[60; 50], 900, &names).unwrap();
        let img = image::open(&confusion_png).unwrap();
        assert!(img.width() > 50 * 16, "50 of the 60 classes are drawn");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2, "no temporary files left");
    }
}
