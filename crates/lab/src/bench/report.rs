//! What the bench shows people: each scenario's chart and the Markdown tables of
//! `results.md`.

use std::fmt::Write as _;

use migrate_core::Report;

use super::{BenchResult, Mode, Run, Scenario, ScenarioResult, GOODPUT_BYTES};
use crate::chart::{Panel, Span};

pub(super) fn render_chart(s: &Scenario, ferry: &Run, baseline: Option<&Run>) -> String {
    let mut panels = vec![];
    let panel = |title: &str, run: &Run, start_unix: f64| -> Panel {
        let (samples, largest_gap) = run.timeline(start_unix);
        let note = match &run.error {
            Some(e) => format!("FAILED: {e}"),
            None => format!(
                "downtime {:.1} ms{}, total {:.1} ms, {} on the wire",
                run.downtime_ms,
                run.frozen_ms
                    .map(|f| format!(" (frozen {f:.1} ms)"))
                    .unwrap_or_default(),
                run.total_ms,
                crate::ops::human_bytes(run.wire_bytes)
            ),
        };
        Panel {
            title: title.into(),
            samples,
            phases: run
                .phases
                .iter()
                .map(|p| Span {
                    label: p.name.clone(),
                    start_ms: p.start_ms,
                    end_ms: p.start_ms + p.duration_ms,
                })
                .collect(),
            largest_gap,
            note,
        }
    };
    let ferry_start = ferry
        .report
        .as_ref()
        .map(|r| r.started_unix_ms)
        .unwrap_or(0.0);
    panels.push(panel(&format!("Ferry ({})", s.mode), ferry, ferry_start));
    if let Some(b) = baseline {
        let start = b
            .baseline_steps
            .as_ref()
            .map(|s| s.started_unix_ms)
            .unwrap_or(0.0);
        panels.push(panel("baseline (runc + CRIU by hand)", b, start));
    }
    let window = crate::chart::window(&panels, 300.0, 500.0);
    crate::chart::render(
        &format!(
            "{} on a {} link: probe round trips during the migration",
            s.workload.label(),
            s.link_label()
        ),
        &panels,
        window,
    )
}

/// Stop-and-copy's transfer against a bare QUIC stream, per memory scenario.
fn goodput_table(s: &mut String, r: &BenchResult) {
    if r.bare_quic.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\nStop-and-copy transfer (inside the freeze) against bare QUIC streams between the same hosts right before and after it (their mean):\n\n| scenario | link | transfer MB/s | bare QUIC MB/s | ratio |\n|---|---|--:|--:|--:|"
    );
    for x in &r.scenarios {
        if let Some(g) = x.transfer_goodput {
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} | {:.0} | {:.2} |",
                x.scenario.workload.label(),
                x.scenario.link_label(),
                g.transfer_mb_s,
                g.bare_quic_mb_s,
                g.ratio
            );
        }
    }
    for b in &r.bare_quic {
        let runs: Vec<String> = b.runs.iter().map(|g| format!("{:.0}", g.mb_s())).collect();
        let _ = writeln!(
            s,
            "\nBare QUIC on the {} link: {} MB/s (runs: {}; {} each).",
            b.link,
            format_args!("{:.0}", b.median_mb_s),
            runs.join(", "),
            crate::ops::human_bytes(GOODPUT_BYTES)
        );
    }
}

/// How each pre-copy run's memory crossed the freeze: frozen time split, eager and lazy pages,
/// the fill.
fn memory_table(s: &mut String, r: &BenchResult) {
    #[allow(clippy::type_complexity)]
    let rows: Vec<(&ScenarioResult, &Report, &migrate_core::MemoryReport)> = r
        .scenarios
        .iter()
        .filter_map(|x| {
            let rep = x.ferry.report.as_ref()?;
            Some((x, rep, rep.memory.as_ref()?))
        })
        .collect();
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\nMemory across the freeze (pre-copy and post-copy):\n\n| scenario | link | mode | restore | frozen ms | dump ms | transfer ms | restore ms | commit ms | round trips frozen | dirty pages | never-copied pages | eager pages | lazy pages | fill ms | fill MiB/s | probe RTT p50 / p99 before, ms | probe RTT p50 / p99 during the fill, ms | integrity checked / mismatched / corrected | post-copy pages fetched / on fault | fill error |"
    );
    let _ = writeln!(
        s,
        "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"
    );
    let f0 = |v: Option<f64>| v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into());
    for (x, rep, m) in rows {
        let commit = rep
            .phases
            .iter()
            .filter(|p| p.phase == migrate_core::Phase::Commit)
            .map(|p| p.duration_ms)
            .sum::<f64>();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            x.scenario.workload.label(),
            x.scenario.link_label(),
            x.scenario.mode,
            m.restore,
            rep.frozen_ms,
            rep.freeze_to_dump_ms,
            rep.transfer_ms,
            rep.restore_ms,
            commit,
            rep.frozen_round_trips,
            m.final_dirty_pages,
            m.unplaced_pages,
            m.eager_pages,
            m.lazy_pages,
            f0(m.fill_ms),
            f0(m.fill_mib_s),
            x.ferry.fill_rtt.map_or("-".into(), |f| format!("{:.2} / {:.2}", f.before_p50_ms, f.before_p99_ms)),
            x.ferry.fill_rtt.map_or("-".into(), |f| format!("{:.2} / {:.2} ({} answers)", f.fill_p50_ms, f.fill_p99_ms, f.fill_samples)),
            m.integrity.as_ref().map_or("-".into(), |i| format!(
                "{} / {} / {}{}",
                i.pages_checked,
                i.mismatches,
                i.corrected,
                if i.incomplete.is_some() { " (incomplete)" } else { "" }
            )),
            m.fetched_pages.map_or("-".into(), |f| format!(
                "{f} / {}",
                m.fetched_on_fault.unwrap_or(0)
            )),
            m.fill_error.as_deref().or(m.not_lazy.as_deref()).unwrap_or("-"),
        );
    }
}

/// Pre-copy next to stop-copy for the same workload and link: the client's gap, the bytes
/// between the hosts against the container's resident memory, and the rounds.
fn precopy_table(s: &mut String, r: &BenchResult) {
    let pairs: Vec<(&ScenarioResult, &ScenarioResult)> = r
        .scenarios
        .iter()
        .filter(|x| x.scenario.mode == Mode::PreCopy)
        .filter_map(|p| {
            r.scenarios
                .iter()
                .find(|x| {
                    x.scenario.mode == Mode::StopCopy
                        && x.scenario.workload == p.scenario.workload
                        && x.scenario.link_rate == p.scenario.link_rate
                })
                .map(|sc| (p, sc))
        })
        .collect();
    if pairs.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\nPre-copy against stop-copy (same run):\n\n| scenario | link | pre-copy gap ms | stop-copy gap ms | gap ratio | pre-copy frozen ms | rounds | stop reason | pre-copy wire | resident | wire / resident | memory intact |"
    );
    let _ = writeln!(s, "|---|---|--:|--:|--:|--:|--:|---|--:|--:|--:|---|");
    for (p, sc) in pairs {
        let (f, g) = (&p.ferry, &sc.ferry);
        let both = f.error.is_none() && g.error.is_none();
        let rep = f.report.as_ref();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            p.scenario.workload.label(),
            p.scenario.link_label(),
            if f.error.is_none() {
                format!("{:.1}", f.downtime_ms)
            } else {
                "failed".into()
            },
            if g.error.is_none() {
                format!("{:.1}", g.downtime_ms)
            } else {
                "failed".into()
            },
            if both && g.downtime_ms > 0.0 {
                format!("{:.2}", f.downtime_ms / g.downtime_ms)
            } else {
                "-".into()
            },
            f.frozen_ms
                .map(|v| format!("{v:.1}"))
                .unwrap_or_else(|| "-".into()),
            rep.map(|r| r.rounds.len().to_string())
                .unwrap_or_else(|| "-".into()),
            rep.and_then(|r| r.precopy_stop.as_ref())
                .map(|v| serde_json::to_value(v)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default())
                .unwrap_or_else(|| "-".into()),
            crate::ops::human_bytes(f.wire_bytes),
            f.resident_bytes
                .map(crate::ops::human_bytes)
                .unwrap_or_else(|| "-".into()),
            f.resident_bytes
                .filter(|&r| r > 0 && f.error.is_none())
                .map(|r| format!("{:.2}", f.wire_bytes as f64 / r as f64))
                .unwrap_or_else(|| "-".into()),
            match f.memory_intact {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "n/a",
            },
        );
    }
}

/// The Markdown table of a bench.
pub fn markdown(r: &BenchResult) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Machine: {}. Probe: one TCP connection, a request every {} ms.\n",
        r.machine, r.probe_interval_ms
    );
    let _ = writeln!(
        s,
        "| scenario | link | Ferry downtime ms | Ferry frozen ms | round trips frozen | gap - frozen ms | switch ms | baseline downtime ms | downtime ratio | Ferry total ms | baseline total ms | total ratio | Ferry wire | baseline wire | CPU ms Ferry / baseline | memory intact |"
    );
    let _ = writeln!(
        s,
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"
    );
    let f1 = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into());
    let f2 = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
    for x in &r.scenarios {
        let f = &x.ferry;
        let b = x.baseline.as_ref();
        let ok = |run: &Run| -> Option<f64> { run.error.is_none().then_some(0.0) };
        let val = |run: Option<&Run>, g: fn(&Run) -> f64| -> Option<f64> {
            run.and_then(|r| ok(r).map(|_| g(r)))
        };
        let intact = |run: Option<&Run>| match run {
            None => "-".to_string(),
            Some(r) if r.error.is_some() => "failed".into(),
            Some(r) => match r.memory_intact {
                None => "n/a".into(),
                Some(true) => "yes".into(),
                Some(false) => "NO".into(),
            },
        };
        let _ = writeln!(
            s,
            "| {} [{}] | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} / {} |",
            x.scenario.workload.label(),
            x.scenario.mode,
            x.scenario.link_label(),
            f1(val(Some(f), |r| r.downtime_ms)),
            f1(f.frozen_ms.filter(|_| f.error.is_none())),
            f.report
                .as_ref()
                .filter(|_| f.error.is_none())
                .map_or("-".into(), |r| r.frozen_round_trips.to_string()),
            f1(f.gap_minus_frozen_ms.filter(|_| f.error.is_none())),
            f1(f.network_switch_ms.filter(|_| f.error.is_none())),
            f1(val(b, |r| r.downtime_ms)),
            f2(x.downtime_ratio),
            f1(val(Some(f), |r| r.total_ms)),
            f1(val(b, |r| r.total_ms)),
            f2(x.total_ratio),
            if f.error.is_none() {
                crate::ops::human_bytes(f.wire_bytes)
            } else {
                "-".into()
            },
            b.filter(|r| r.error.is_none())
                .map(|r| crate::ops::human_bytes(r.wire_bytes))
                .unwrap_or_else(|| "-".into()),
            f1(val(Some(f), |r| r.cpu_ms)),
            f1(val(b, |r| r.cpu_ms)),
            intact(Some(f)),
            intact(b),
        );
    }
    precopy_table(&mut s, r);
    memory_table(&mut s, r);
    goodput_table(&mut s, r);
    let failures: Vec<String> = r
        .scenarios
        .iter()
        .flat_map(|x| {
            std::iter::once(&x.ferry)
                .chain(x.baseline.as_ref())
                .filter_map(move |run| {
                    run.error
                        .as_ref()
                        .map(|e| format!("- {} {}: {e}", x.scenario.id, run.method))
                })
        })
        .collect();
    if !failures.is_empty() {
        let _ = writeln!(s, "\nFailures:\n{}", failures.join("\n"));
    }
    if !r.skipped.is_empty() {
        let _ = writeln!(s, "\nSkipped:\n- {}", r.skipped.join("\n- "));
    }
    s
}
