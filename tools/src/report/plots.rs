//! The report's SVG plots (plotters' SVG backend: text goes out as SVG text, so no font is
//! read from the system): pause and reset distributions, clone cost against dirty pages and
//! against RAM size, Pss against the clone count.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use super::Report;

/// What failed drawing a plot.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("cannot draw {path}: {message}")]
    Draw { path: PathBuf, message: String },
}

/// One line of a plot: its legend and its points.
struct Series {
    name: String,
    points: Vec<(f64, f64)>,
}

/// The fraction of samples at or below each sample: a distribution as a line.
fn cdf(name: &str, sorted: &[f64]) -> Series {
    let n = sorted.len().max(1) as f64;
    let points = sorted.iter().enumerate().map(|(i, &v)| (v, (i + 1) as f64 / n)).collect();
    Series { name: name.into(), points }
}

/// Draws `series` into `path`; axes from 0 to the largest value (x clipped at `x_cap` if set).
fn draw(path: &Path, title: &str, axes: (&str, &str), series: &[Series], x_cap: Option<f64>) -> Result<(), PlotError> {
    let fail = |e: &dyn std::fmt::Display| PlotError::Draw { path: path.to_path_buf(), message: e.to_string() };
    let max = |f: fn(&(f64, f64)) -> f64| {
        series.iter().flat_map(|s| s.points.iter().map(f)).filter(|v| v.is_finite()).fold(0.0, f64::max) * 1.05
    };
    let xmax = x_cap.map_or(max(|p| p.0), |cap| cap.min(max(|p| p.0))).max(1e-9);
    let ymax = max(|p| p.1).max(1e-9);
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)
        .map_err(|e| fail(&e))?;
    chart.configure_mesh().x_desc(axes.0).y_desc(axes.1).draw().map_err(|e| fail(&e))?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let points: Vec<(f64, f64)> = s.points.iter().copied().filter(|p| p.0 <= xmax).collect();
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
            .map_err(|e| fail(&e))?
            .label(s.name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        if points.len() <= 50 {
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(|e| fail(&e))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))
}

/// Draws every plot into `dir`; returns (file name, title) of each.
pub(super) fn draw_all(r: &Report, dir: &Path) -> Result<Vec<(String, String)>, PlotError> {
    let mut out = Vec::new();
    let mut plot = |file: &str, title: &str, axes, series: Vec<Series>, cap| {
        draw(&dir.join(file), title, axes, &series, cap)?;
        out.push((file.to_string(), title.to_string()));
        Ok::<(), PlotError>(())
    };
    let pauses: Vec<Series> = r
        .clone
        .paths
        .iter()
        .map(|p| cdf(&format!("{:?}", p.path), &p.pause_samples_us.iter().map(|&v| v as f64).collect::<Vec<_>>()))
        .collect();
    let p99 = r.clone.paths.iter().map(|p| p.pause_us_p99 as f64).fold(0.0, f64::max);
    plot(
        "pause.svg",
        &format!("Clone pause of a 1 GiB VM, {} pages dirty (CDF)", r.clone.dirty_pages),
        ("source pause, us", "fraction of clones"),
        pauses,
        Some(p99 * 1.5),
    )?;
    let reset_p99 = r.reset.reset_us_p99;
    plot(
        "reset.svg",
        &format!("Reset of a VM with {} dirty pages (CDF)", r.reset.dirty_pages),
        ("reset, us", "fraction of resets"),
        vec![cdf("reset", &r.reset.samples_us)],
        Some(reset_p99 * 1.5),
    )?;
    let line = |name: &str, points: Vec<(f64, f64)>| Series { name: name.into(), points };
    plot(
        "clone_vs_dirty.svg",
        "Clone pause p50 against pages dirtied since the last clone (1 GiB VM)",
        ("dirty pages", "source pause p50, us"),
        vec![line("pause p50", r.by_dirty.iter().map(|s| (s.dirty_pages as f64, s.pause_us_p50 as f64)).collect())],
        None,
    )?;
    plot(
        "clone_vs_ram.svg",
        &format!("Clone pause p50 against RAM size ({} pages dirty)", r.clone.dirty_pages),
        ("guest RAM, MiB", "source pause p50, us"),
        vec![line("pause p50", r.by_ram.iter().map(|s| (s.mem_mib as f64, s.pause_us_p50 as f64)).collect())],
        None,
    )?;
    let points = &r.fleet.points;
    let mib = |kib: u64| kib as f64 / 1024.0;
    plot(
        "pss_vs_clones.svg",
        "Process Pss against VMs held (64 MiB VMs, each wrote 1 %)",
        ("VMs", "Pss, MiB"),
        vec![
            line("Pss", points.iter().map(|p| (p.vms as f64, mib(p.pss_kib))).collect()),
            line("base + own pages", points.iter().map(|p| (p.vms as f64, mib(p.ideal_kib))).collect()),
        ],
        None,
    )?;
    Ok(out)
}
